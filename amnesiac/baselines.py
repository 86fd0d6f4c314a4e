"""Amnesiac unlearning and the baselines it is compared with, all on one recorded run and one forget set.

Each method takes an :class:`UnlearnTask` (the run, its data, the forget set, the training hyper-parameters) and
returns a :class:`MethodResult` with the new state_dict and the wall time it took:

- ``retrain``: train from the run's own initial weights S_0 on the retained data, as long as the original training
  (the gold standard: what the model would be had it never seen the forget set).
- ``finetune``: continue training the final model on the retained data for a few epochs (forgetting by neglect).
- ``relabel``: the paper's "Unlearning" baseline: give every forget sample a random wrong label and train the final
  model on the retained data plus the relabelled forget set.
- ``neggrad``: gradient ascent on the forget set's loss (optionally until the forget set is misclassified).
- ``amnesiac``: undo every recorded step whose batch held a forget sample (:meth:`amnesiac.Run.unlearn`).
- ``amnesiac-finetune``: the same, then fine-tune on the retained data (one epoch by default), as in the paper.

Example:
    >>> import tempfile, torch
    >>> from amnesiac import Recorder, open_run
    >>> from amnesiac.data import load_dataset
    >>> from amnesiac.models import build_model, model_spec
    >>> from amnesiac.training import make_optimizer, train
    >>> bundle = load_dataset("digits")
    >>> spec = model_spec("mlp", bundle.input_shape, 10)
    >>> _ = torch.manual_seed(0); model = build_model(spec); opt = make_optimizer(model)
    >>> run_dir = tempfile.mkdtemp() + "/run"
    >>> from amnesiac.setting import TrainingSetting
    >>> setting = TrainingSetting(model_spec=spec, data=bundle.spec, batch_size=64, epochs=1)
    >>> with Recorder(model, opt, run_dir, durable=False, **setting.recorder_options()) as rec:
    ...     _ = train(model, opt, bundle.train, epochs=1, recorder=rec)
    >>> task = UnlearnTask.from_run(open_run(run_dir), classes=[3], bundle=bundle)
    >>> result = METHODS["amnesiac"](task)
    >>> result.name, sorted(result.state) == sorted(model.state_dict()), result.seconds > 0
    ('amnesiac', True, True)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from .data import DataBundle, IndexedDataset, bundle_from_spec
from .errors import AmnesiacError, SelectionError
from .models import build_model
from .run import Run
from .selection import Selection
from .setting import TrainingSetting
from .training import make_optimizer, train, train_steps_ascent


@dataclass(frozen=True)
class UnlearnTask:
    """One unlearning request on one recorded run: what every method needs, fixed so that they are comparable."""

    run: Run
    model_spec: dict
    train_set: IndexedDataset   # the data the run was trained on
    forget_set: IndexedDataset  # the samples to forget (a subset of train_set)
    retained: IndexedDataset    # train_set without forget_set
    selection: Selection        # what Run.unlearn undoes: classes, sample ids or steps
    optimizer: str = "adam"
    lr: float = 1e-3
    batch_size: int = 64
    epochs: int = 5             # epochs of the original training (retraining repeats them)
    seed: int = 0
    test_set: IndexedDataset | None = field(default=None, repr=False)

    @classmethod
    def from_run(cls, run: Run, *, classes=None, sample_ids=None, steps=None, bundle: DataBundle | None = None,
                 download: bool = False, **overrides) -> UnlearnTask:
        """Build the task from a run recorded with a model and data description (``amnesiac train`` or the
        experiments store them, see :class:`~amnesiac.setting.TrainingSetting`); ``bundle`` skips reloading the
        data. ``overrides`` replace hyper-parameters."""
        setting = TrainingSetting.of_run(run)
        model_spec = setting.require_model("the baselines (which rebuild the model)")
        selection = Selection.of(classes=classes, sample_ids=sample_ids, steps=steps)
        if bundle is None:
            bundle = bundle_from_spec(setting.data, download=download)
        train_set = bundle.train
        if selection.kind == "classes":
            forget = train_set.only_classes(selection.values.tolist())
        elif selection.kind == "sample_ids":
            forget = train_set.only_ids(selection.values)
            missing = sorted(set(selection.values.tolist()) - set(forget.ids.tolist()))
            if missing:  # as amnesiac itself refuses them: a baseline must not silently forget nothing
                raise SelectionError(f"{len(missing)} sample id(s) are not in the run's training data, e.g. "
                                     f"{missing[:5]}; check the ids. Nothing was unlearned.")
        else:
            seen = [run.samples_of_step(s) for s in selection.values.tolist()]
            forget = train_set.only_ids(np.concatenate(seen) if seen else np.zeros(0, np.int64))
        if len(forget) == 0 and selection.kind != "steps":  # undoing no step is a valid point of a curve
            raise SelectionError(f"the selection {selection} holds no training sample of this run: nothing to forget")
        retained = train_set.without_ids(forget.ids.numpy())
        fields = {"optimizer": setting.optimizer, "lr": setting.lr, "batch_size": setting.batch_size,
                  "epochs": setting.epochs, "seed": setting.seed}
        fields.update({k: v for k, v in overrides.items() if v is not None})
        return cls(run, model_spec, train_set, forget, retained, selection, test_set=bundle.test, **fields)

    def model(self, state: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
        """A fresh model of the run's architecture, with ``state`` loaded (default: the run's final state)."""
        model = build_model(self.model_spec)
        model.load_state_dict(self.run.final_state() if state is None else state)
        return model

    def with_options(self, **changes) -> UnlearnTask:
        return replace(self, **changes)


@dataclass(frozen=True)
class MethodResult:
    """A method's outcome: the new weights, the wall time, and what it did (steps undone, epochs, ...)."""

    name: str
    state: dict[str, torch.Tensor]
    seconds: float
    info: dict = field(default_factory=dict)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def retrain(task: UnlearnTask, *, epochs: int | None = None) -> MethodResult:
    """Train from the run's initial weights S_0 on the retained data, with the original hyper-parameters."""
    epochs = task.epochs if epochs is None else epochs
    start = time.perf_counter()
    model = task.model(task.run.start_state())
    opt = make_optimizer(model, task.optimizer, task.lr)
    train(model, opt, task.retained, epochs=epochs, batch_size=task.batch_size, seed=task.seed)
    return MethodResult("retrain", _state(model), time.perf_counter() - start, {"epochs": epochs})


def finetune(task: UnlearnTask, *, epochs: int = 1, state: dict | None = None, name: str = "finetune") -> MethodResult:
    """Continue training the final model (or ``state``) on the retained data for ``epochs`` epochs."""
    start = time.perf_counter()
    model = task.model(state)
    opt = make_optimizer(model, task.optimizer, task.lr)
    train(model, opt, task.retained, epochs=epochs, batch_size=task.batch_size, seed=task.seed + 1)
    return MethodResult(name, _state(model), time.perf_counter() - start, {"epochs": epochs})


def relabel(task: UnlearnTask, *, epochs: int = 1, with_retained: bool = True) -> MethodResult:
    """The paper's "Unlearning": train on the forget set with random wrong labels (and, by default, on the retained
    data too, so the rest is kept) for ``epochs`` epochs, starting from the final model."""
    start = time.perf_counter()
    g = torch.Generator().manual_seed(task.seed + 2)
    classes = int(task.model_spec["num_classes"])
    wrong = (task.forget_set.labels + torch.randint(1, classes, (len(task.forget_set),), generator=g)) % classes
    mapping = dict(zip(task.forget_set.ids.tolist(), wrong.tolist()))
    data = task.train_set if with_retained else task.forget_set
    model = task.model()
    opt = make_optimizer(model, task.optimizer, task.lr)
    train(model, opt, data, epochs=epochs, batch_size=task.batch_size, seed=task.seed + 1, relabel=mapping)
    return MethodResult("relabel", _state(model), time.perf_counter() - start,
                        {"epochs": epochs, "with_retained": with_retained})


def neggrad(task: UnlearnTask, *, epochs: int = 1, lr: float | None = None, optimizer: str = "sgd",
            stop_at: float | None = None) -> MethodResult:
    """Gradient ascent on the forget set's cross-entropy, from the final model, for at most ``epochs`` epochs;
    with ``stop_at``, stop after the first epoch that brings the forget set's accuracy down to ``stop_at`` or below
    (plain ascent otherwise diverges and ruins the model)."""
    from .training import accuracy
    lr = task.lr if lr is None else lr
    start = time.perf_counter()
    model = task.model()
    opt = make_optimizer(model, optimizer, lr)
    done = 0
    for epoch in range(epochs):
        train_steps_ascent(model, opt, task.forget_set, epochs=1, batch_size=task.batch_size,
                           seed=task.seed + 1 + epoch)
        done += 1
        if stop_at is not None and accuracy(model, task.forget_set)["overall"] <= stop_at:
            break
    return MethodResult("neggrad", _state(model), time.perf_counter() - start,
                        {"epochs": done, "max_epochs": epochs, "lr": lr, "optimizer": optimizer, "stop_at": stop_at})


def amnesiac(task: UnlearnTask, *, device: str = "cpu") -> MethodResult:
    """Undo every recorded step whose batch held a forget sample."""
    start = time.perf_counter()
    report = task.run.unlearn_report(**task.selection.kwargs(), device=device)
    state = {k: v.cpu() for k, v in report.state.items()}
    return MethodResult("amnesiac", state, time.perf_counter() - start, report.summary())


def amnesiac_finetune(task: UnlearnTask, *, epochs: int = 1, device: str = "cpu") -> MethodResult:
    """Amnesiac unlearning, then ``epochs`` fine-tune epochs on the retained data (the paper used one)."""
    first = amnesiac(task, device=device)
    second = finetune(task, epochs=epochs, state=first.state) if epochs else None
    if second is None:
        return replace(first, name="amnesiac-finetune", info={**first.info, "finetune_epochs": 0})
    return MethodResult("amnesiac-finetune", second.state, first.seconds + second.seconds,
                        {**first.info, "finetune_epochs": epochs, "unlearn_seconds": first.seconds,
                         "finetune_seconds": second.seconds})


METHODS: dict[str, Callable[..., MethodResult]] = {
    "amnesiac": amnesiac,
    "amnesiac-finetune": amnesiac_finetune,
    "retrain": retrain,
    "finetune": finetune,
    "relabel": relabel,
    "neggrad": neggrad,
}


def run_method(name: str, task: UnlearnTask, **options) -> MethodResult:
    """Run ``METHODS[name]`` with ``options`` (e.g. ``epochs=2``); unknown names raise with the choices."""
    try:
        fn = METHODS[name]
    except KeyError:
        raise AmnesiacError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}") from None
    return fn(task, **options)
