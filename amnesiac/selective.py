"""Selective recording: which samples may have to be forgotten, and what a run recorded that way can undo.

``Recorder(..., deletable=ids_or_rule)`` stores a step's delta only when its batch held at least one deletable
sample. Every step still gets its ledger record (its ids, and which of them were deletable, in the field
``deletable``), S_0 and S_T are kept, and the store marks the other steps as not stored. Unlearning deletable
samples is then exact: ``S_T - sum(delta_t for the steps that saw them)`` needs only those steps, all of which were
stored, and the stored deltas are the same ``S_t - S_{t-1}`` a full recording keeps. What cannot be done: forgetting a
sample that was not declared deletable (:class:`~amnesiac.SelectionError` names it), undoing a step that was not
stored, the "start-plus-others" plan (it needs every step), unlearning a run that was not closed (it has no S_T),
and checking ``S_0 + sum(deltas) == S_T`` in ``verify`` (only checksums are checked).

Example:
    >>> rule = DeletableRule.of([7, 3])
    >>> rule.mask(np.array([1, 3, 7, 9])).tolist()
    [False, True, True, False]
    >>> DeletableRule.of(lambda i: i % 2 == 1).mask(np.array([1, 2])).tolist()
    [True, False]
    >>> rule.attrs()["count"], DeletableRule.of([3, 7]).attrs() == rule.attrs()
    (2, True)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from deltastore import crc32c

from .errors import RecorderError, ResumeError, SelectionError
from .selection import int_array

LEDGER_FIELD = "deletable"  # per step: the step's ids that were declared deletable


@dataclass(frozen=True)
class DeletableRule:
    """Says which sample ids are deletable: a sorted array of ids, or a callable ``id -> bool``."""

    ids: np.ndarray | None
    rule: Callable[[int], bool] | None

    @classmethod
    def of(cls, deletable, supported: bool = True) -> DeletableRule:
        """From an array of ids (list, array, tensor) or a callable; :class:`RecorderError` otherwise, or when not
        ``supported`` (the distributed recorder does not record selectively yet)."""
        if not supported:
            raise RecorderError("selective recording (deletable=) is not supported under torch.distributed yet; "
                                "record in full")
        if callable(deletable):
            return cls(None, deletable)
        try:
            ids = int_array(deletable, "deletable ids")
        except SelectionError as e:
            raise RecorderError(f"{e}; pass deletable= as an array of sample ids or a callable id -> bool") from None
        return cls(np.unique(ids), None)

    def mask(self, ids: np.ndarray) -> np.ndarray:
        """One bool per id in ``ids``: is it deletable."""
        if self.ids is not None:
            return np.isin(ids, self.ids)
        return np.fromiter((bool(self.rule(int(i))) for i in ids), bool, count=ids.size)

    def ledger(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """The ledger field of a step that trained on ``ids``: those of them declared deletable."""
        return {LEDGER_FIELD: ids[self.mask(ids)]}

    def attrs(self) -> dict:
        """What the run's attributes keep of the declaration: a flag, and for an array its size and crc32c
        (the ids themselves are in the ledger, step by step, as they were trained on)."""
        if self.ids is None:
            return {"selective": True, "rule": "callable", "count": None, "crc32c": None}
        return {"selective": True, "rule": "ids", "count": int(self.ids.size),
                "crc32c": crc32c(self.ids.astype("<i8").tobytes())}


def check_forgettable(fields: dict, wanted: np.ndarray) -> None:
    """Raise :class:`SelectionError` naming the ids of ``wanted`` that a selective run did not declare deletable
    (its ledger ``fields`` hold the ids trained on while declared deletable)."""
    declared = fields[LEDGER_FIELD].values if LEDGER_FIELD in fields else np.zeros(0, np.int64)
    undeclared = wanted[~np.isin(wanted, declared)]
    if undeclared.size:
        raise SelectionError(f"sample id(s) {undeclared[:10].tolist()} were not declared deletable when this run was "
                             "recorded selectively (Recorder(deletable=...)): the steps that saw them were not all "
                             "stored, so they cannot be forgotten exactly. Retrain without them, or record with them "
                             "declared deletable. Nothing was unlearned.")


def check_same_declaration(store, deletable: DeletableRule | None, checkpoint) -> bool:
    """Raise :class:`ResumeError` unless ``deletable`` is the declaration the run in ``store`` was recorded with;
    True for a selective run (which resumes only from a checkpoint: its stored deltas alone rebuild no state)."""
    spec = store.attrs.get("amnesiac", {}) if isinstance(store.attrs, dict) else {}
    declared = spec.get("deletable") if isinstance(spec, dict) else None
    if (declared is None) != (deletable is None):
        raise ResumeError(f"{store.path} was recorded " + ("selectively: pass the same deletable= to resume it"
                          if declared is not None else "in full: resume it without deletable="))
    if declared is None:
        return False
    mine = deletable.attrs()
    if declared.get("rule") != mine["rule"] or (declared.get("crc32c") is not None and mine != declared):
        raise ResumeError(f"deletable= is not the declaration {store.path} was recorded with; pass the same ids")
    if checkpoint is None:
        raise ResumeError(f"{store.path} was recorded selectively: resume it from a checkpoint (checkpoint=PATH), "
                          "since its stored deltas alone do not rebuild the model's state")
    return True
