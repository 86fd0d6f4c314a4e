"""Opening a recorded run, finding the steps that saw given samples or classes, and unlearning them.

Everything here works offline from the run directory alone: no training code, no model class, no pickle.

Example:
    >>> import tempfile, torch, amnesiac
    >>> model = torch.nn.Linear(2, 2)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.5)
    >>> run_dir = tempfile.mkdtemp() + "/run"
    >>> with amnesiac.Recorder(model, opt, run_dir, durable=False) as rec:
    ...     for ids in ([0, 1], [2, 3], [1, 4]):
    ...         rec.add_batch(ids, labels=[i % 2 for i in ids])
    ...         model(torch.ones(2, 2)).sum().backward()
    ...         opt.step(); opt.zero_grad()
    >>> run = amnesiac.open_run(run_dir)
    >>> run.num_steps, run.steps_for(sample_ids=[1]).tolist(), run.steps_for(classes=[0]).tolist()
    (3, [0, 2], [0, 1, 2])
    >>> state = run.unlearn(sample_ids=[1])
    >>> sorted(state)
    ['bias', 'weight']
"""

from __future__ import annotations

import contextlib
import functools
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from deltastore import (PROGRAMMING_ERRORS, DeltaStore, DeltaStoreError, LayoutMismatchError, ReduceResult,
                        StepSelectionError, StoreNotFoundError, plan_unlearning, resolve_device, run_plan)

from .errors import AmnesiacError, ModelMismatchError, RunDamagedError, RunNotFoundError, SelectionError
from .selection import Selection
from .selective import check_forgettable

# what malformed bytes can make the parsers below raise; programming errors (deltastore.PROGRAMMING_ERRORS:
# AttributeError, TypeError...) are bugs, not damage, and reach the caller as they are
_STRAY = (ValueError, IndexError, KeyError, RuntimeError, struct.error, OSError, OverflowError)


@contextlib.contextmanager
def _damage_is_reported(path):
    """Whatever a damaged or crafted run directory makes the layers below raise reaches the caller as one of our
    errors: :class:`DeltaStoreError` / :class:`AmnesiacError` pass through, what malformed bytes make the parsers
    below raise becomes :class:`RunDamagedError`; out-of-memory, interrupts and programming errors pass unchanged."""
    try:
        yield
    except (DeltaStoreError, AmnesiacError, torch.OutOfMemoryError, *PROGRAMMING_ERRORS):
        raise
    except _STRAY as e:
        raise RunDamagedError(f"{path} is damaged or malformed ({type(e).__name__}: {str(e)[:300]}); run "
                              f"`deltastore verify {path}`") from e


def _reading(method):
    """Decorate a :class:`Run` method with :func:`_damage_is_reported`."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with _damage_is_reported(self.path):
            return method(self, *args, **kwargs)
    return wrapper


@dataclass(frozen=True)
class UnlearnReport:
    """The outcome of one unlearning request."""

    state: dict[str, torch.Tensor]
    steps_undone: np.ndarray
    total_steps: int
    plan: str  # "final-minus-selected" or "start-plus-others"
    steps_read: int
    encoded_bytes_read: int
    raw_fp32_bytes_read: int
    seconds: float

    def __repr__(self) -> str:  # the state's tensors are left out: printing them is never what anyone wants
        return (f"<UnlearnReport: undid {self.steps_undone.size} of {self.total_steps} steps ({self.plan}), read "
                f"{self.steps_read} steps ({_size(self.encoded_bytes_read)}) in {self.seconds:.3f} s; state of "
                f"{len(self.state)} tensors>")

    def summary(self) -> dict:
        return {"steps_undone": int(self.steps_undone.size), "total_steps": self.total_steps, "plan": self.plan,
                "steps_read": self.steps_read, "encoded_bytes_read": self.encoded_bytes_read,
                "raw_fp32_bytes_read": self.raw_fp32_bytes_read, "seconds": self.seconds}


def open_run(path: str | Path) -> Run:
    """Open a recorded run for reading (also an incomplete one left by a crash: see :attr:`Run.complete`)."""
    from .sharded import is_sharded_run, open_sharded_run
    if is_sharded_run(path):  # recorded under FSDP2: one store per rank (amnesiac.sharded)
        return open_sharded_run(path)
    try:
        with _damage_is_reported(path):
            return Run(DeltaStore.open(path))
    except StoreNotFoundError as e:
        raise RunNotFoundError(str(e)) from None


class Run:
    """A recorded run, read-only."""

    def __init__(self, store: DeltaStore):
        self.store = store
        self._ledger = None

    def __repr__(self) -> str:
        info = self.store.info()
        return (f"<Run {self.path}: {self.num_steps} steps, codec {info['codec']}, "
                f"{'complete' if self.complete else 'incomplete'}, {_size(info['bytes_on_disk'])} on disk>")

    @property
    def path(self) -> Path:
        return self.store.path

    @property
    def num_steps(self) -> int:
        """The number of committed steps."""
        return self.store.num_steps

    @property
    def complete(self) -> bool:
        """True once the Recorder was closed normally; False after a crash (steps up to the last commit remain)."""
        return self.store.complete

    @property
    def spec(self) -> dict:
        """What the Recorder stored about the model and the data (``model_spec``, ``extra``)."""
        spec = self.store.attrs.get("amnesiac", {})
        if not isinstance(spec, dict):
            raise RunDamagedError(f"{self.path}/store.json: the 'amnesiac' attributes are not a JSON object")
        return spec

    def refresh(self) -> None:
        """See the steps a live Recorder committed since this run was opened (a consistent prefix)."""
        self.store.refresh()
        self._ledger = None

    def _fields(self):
        if self._ledger is None:
            fields = self.store.metadata()
            for name in ("ids", "labels"):
                if name in fields and fields[name].values.dtype.kind not in "iu":
                    raise RunDamagedError(f"{self.path}: the ledger's {name!r} are not integers")
            self._ledger = fields
        return self._ledger

    @property
    def has_labels(self) -> bool:
        return "labels" in self._fields()

    @_reading
    def sample_ids(self) -> np.ndarray:
        """Every sample id recorded, unique and sorted."""
        return np.unique(self._fields()["ids"].values) if "ids" in self._fields() else np.zeros(0, np.int64)

    @_reading
    def samples_of_step(self, step: int) -> np.ndarray:
        self.store.check_steps([step])
        return self._fields()["ids"].of(step)

    @_reading
    def steps_for(self, *, sample_ids=None, classes=None) -> np.ndarray:
        """Sorted int64 steps whose batches held any of ``sample_ids`` (or any sample of ``classes``)."""
        return self._steps_of(Selection.of(sample_ids=sample_ids, classes=classes, kinds=("sample_ids", "classes")))

    def _steps_of(self, selection: Selection) -> np.ndarray:
        """The sorted steps ``selection`` undoes (checked: known ids, recorded classes, committed steps)."""
        wanted = selection.values
        if selection.kind == "steps":
            try:
                return self.store.check_steps(wanted)
            except StepSelectionError as e:  # its message names the committed range
                raise SelectionError(str(e)) from None
        from .requests import refuse_folded  # samples whose steps retention folded away cannot be undone
        refuse_folded(self.store, **{selection.kind: wanted})
        fields = self._fields()
        if "ids" not in fields:
            return np.zeros(0, np.int64)
        ids = fields["ids"]
        if selection.kind == "sample_ids":
            known = np.isin(wanted, ids.values)
            if not known.all():
                missing = wanted[~known]
                raise SelectionError(f"{missing.size} sample id(s) never appear in this run's ledger, e.g. "
                                     f"{missing[:5].tolist()}; check the ids (the run has {self.sample_ids().size} "
                                     "distinct ids). Nothing was unlearned.")
            hits = np.isin(ids.values, wanted)
        else:
            if "labels" not in fields:
                raise SelectionError("this run recorded no labels, so it cannot select by class; pass labels= "
                                     "to Recorder.add_batch when recording, or select by sample_ids")
            if not np.array_equal(fields["labels"].offsets, ids.offsets):
                raise SelectionError("labels were recorded for only some steps of this run, so it cannot select "
                                     "by class; select by sample_ids")
            labels = fields["labels"].values
            unknown = wanted[~np.isin(wanted, labels)]
            if unknown.size:
                raise SelectionError(f"class(es) {unknown[:5].tolist()} never appear in this run; recorded classes "
                                     f"are {np.unique(labels)[:20].tolist()}. Nothing was unlearned.")
            hits = np.isin(labels, wanted)
        return np.unique(ids.step_of_each_value()[hits])

    @property
    def selective(self) -> bool:
        """True for a run recorded with ``Recorder(deletable=...)``: only deletable samples can be forgotten."""
        return self.spec.get("deletable") is not None

    def _check_undoable(self, selection: Selection, undo: np.ndarray) -> None:
        """On a selective run, :class:`SelectionError` for what cannot be undone exactly (see amnesiac/selective.py)."""
        if not self.complete:
            raise SelectionError(f"{self.path} was recorded selectively and not closed: without its final state "
                                 "nothing can be unlearned (the steps not stored are needed to rebuild it)")
        if selection.kind == "sample_ids":
            check_forgettable(self._fields(), selection.values)
        missing = undo[~self.store.stored_mask[undo]]
        if missing.size:
            raise SelectionError(f"{selection} needs {missing.size} step(s) whose deltas were not stored (selective "
                                 f"recording), e.g. {missing[:5].tolist()}; only samples declared deletable can be "
                                 "forgotten on this run. Nothing was unlearned.")

    @_reading
    def unlearn_report(self, *, sample_ids=None, classes=None, steps=None, device: str | torch.device = "cpu",
                       progress: bool = False, **reduce_options) -> UnlearnReport:
        """Like :meth:`unlearn`, with the bookkeeping: steps undone, plan, bytes read, seconds."""
        device = resolve_device(device)  # DeviceUnavailableError before anything is read: not a damaged run
        selection = Selection.of(sample_ids=sample_ids, classes=classes, steps=steps)
        undo = self._steps_of(selection)
        if self.selective:
            self._check_undoable(selection, undo)
        store = self.store
        result: ReduceResult = run_plan(store, plan_unlearning(store, undo), device=device,
                                        progress=progress, **reduce_options)
        floating = store.layout.unflatten(result.total)
        base = store.read_snapshot("final" if store.complete else "start")
        # non-floating tensors (BatchNorm's num_batches_tracked) are not deltas: they come from the final state
        state = {k: floating[k] if k in floating else v.to(device) for k, v in base.items()}
        plan = "final-minus-selected" if result.plan.base == "final" else "start-plus-others"
        return UnlearnReport(state, undo, store.num_steps, plan, result.steps_read, result.encoded_bytes_read,
                             result.raw_fp32_bytes, result.seconds)

    def unlearn(self, *, sample_ids=None, classes=None, steps=None, device: str | torch.device = "cpu",
                progress: bool = False, **reduce_options) -> dict[str, torch.Tensor]:
        """A complete state_dict with the selected steps' deltas undone (exactly one selection).

        Reads the cheaper of S_T minus the selected steps and S_0 plus the others.
        """
        return self.unlearn_report(sample_ids=sample_ids, classes=classes, steps=steps, device=device,
                                   progress=progress, **reduce_options).state

    @_reading
    def final_state(self) -> dict[str, torch.Tensor]:
        """S_T (for an incomplete run: S_0 plus every committed step)."""
        if self.complete:
            return self.store.read_snapshot("final")
        return self.unlearn(steps=[])

    @_reading
    def start_state(self) -> dict[str, torch.Tensor]:
        return self.store.read_snapshot("start")

    def check_model(self, model: torch.nn.Module) -> None:
        """Raise :class:`ModelMismatchError` if ``model``'s tensors differ from the recorded ones."""
        try:
            self.store.layout.check(model.state_dict())
        except LayoutMismatchError as e:
            raise ModelMismatchError(str(e)) from None

    def load_into(self, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
        self.check_model(model)
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise ModelMismatchError(f"the weights do not fit the model: {str(e)[:500]}") from None
        return model



def _size(n: int) -> str:
    """``1234567`` -> ``'1.2 MB'``."""
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
