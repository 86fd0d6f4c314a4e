"""How a run was trained, as one typed value: written into the run once, read back by everything that rebuilds
the model, reloads the data or repeats the training (the command line, the baselines, the experiments).

In the run it lives in the attributes the Recorder stores (``store.json``, under ``amnesiac``): ``model_spec`` (see
:func:`amnesiac.models.build_model`) and ``extra`` holding ``data`` (see :func:`amnesiac.data.bundle_from_spec`),
``optimizer``, ``lr``, ``batch_size``, ``epochs`` and ``seed``. Runs written before this type existed read the same
way; fields a run lacks take the defaults below.

Example:
    >>> import tempfile, torch, amnesiac
    >>> setting = TrainingSetting(model_spec={"name": "linear"}, data={"dataset": "digits", "seed": 0}, epochs=2)
    >>> model = torch.nn.Linear(2, 2); opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> run_dir = tempfile.mkdtemp() + "/run"
    >>> amnesiac.Recorder(model, opt, run_dir, durable=False, **setting.recorder_options()).close()
    >>> TrainingSetting.of_run(amnesiac.open_run(run_dir)) == setting
    True
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .errors import AmnesiacError, RunDamagedError


@dataclass(frozen=True)
class TrainingSetting:
    """The model, the data and the hyper-parameters of one recorded training run."""

    model_spec: dict | None = None  # how to rebuild the model (amnesiac.models.build_model); None: recorded from code
    data: dict = field(default_factory=dict)  # how to reload the data (amnesiac.data.bundle_from_spec)
    optimizer: str = "adam"
    lr: float = 1e-3
    batch_size: int = 64
    epochs: int = 5
    seed: int = 0

    def recorder_options(self) -> dict:
        """The ``model_spec`` and ``extra`` keyword arguments of :class:`amnesiac.Recorder` that store it."""
        extra = asdict(self)
        return {"model_spec": extra.pop("model_spec"), "extra": extra}

    @classmethod
    def of_run(cls, run) -> TrainingSetting:
        """The setting a run stores (defaults for what it lacks: a run recorded from Python may store none)."""
        spec = run.spec
        extra = spec.get("extra") or {}
        data = (extra.get("data") or {}) if isinstance(extra, dict) else None
        if not isinstance(data, dict):
            raise RunDamagedError(f"{run.path}/store.json: the run's training setting is not a JSON object")
        seed = extra.get("seed", data.get("seed", 0))
        try:
            return cls(model_spec=spec.get("model_spec") or None, data=dict(data),
                       optimizer=str(extra.get("optimizer", cls.optimizer)), lr=float(extra.get("lr", cls.lr)),
                       batch_size=int(extra.get("batch_size", cls.batch_size)),
                       epochs=int(extra.get("epochs", cls.epochs)), seed=int(seed))
        except (TypeError, ValueError) as e:
            raise RunDamagedError(f"{run.path}/store.json: the run's training setting is malformed ({e})") from None

    def require_model(self, what: str) -> dict:
        """The model spec, or :class:`AmnesiacError` saying that ``what`` needs a run recorded with one."""
        if not self.model_spec:
            raise AmnesiacError(f"{what} needs the model and data description that `amnesiac train` stores (model_spec"
                                "=... and the data in extra=..., see amnesiac.setting.TrainingSetting); this run was "
                                "recorded without it")
        return self.model_spec
