"""What an unlearning request forgets: exactly one of sample ids, classes or steps.

One type, used by :meth:`amnesiac.Run.unlearn`, :meth:`amnesiac.Run.steps_for`, the baselines'
:class:`~amnesiac.baselines.UnlearnTask` and the command line, so that the rule and its messages live in one place.

Example:
    >>> sel = Selection.of(classes=[3])
    >>> sel.kind, sel.values.tolist(), sel.kwargs(), sel.classes
    ('classes', [3], {'classes': [3]}, [3])
    >>> Selection.of(classes=[3], steps=[1])
    Traceback (most recent call last):
    ...
    amnesiac.errors.SelectionError: pass exactly one selection, not classes and steps
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .errors import SelectionError

KINDS = ("sample_ids", "classes", "steps")
_WHAT = {"sample_ids": "sample ids", "classes": "classes", "steps": "steps"}


def int_array(values, what: str) -> np.ndarray:
    """``values`` (a list, array or tensor of integers) as a flat int64 array; :class:`SelectionError` otherwise."""
    arr = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    arr = arr.reshape(-1)
    if arr.size and arr.dtype.kind not in "iu":
        raise SelectionError(f"{what} must be integers, got {arr.dtype}")
    return arr.astype(np.int64)


@dataclass(frozen=True, eq=False)
class Selection:
    """Exactly one of ``sample_ids``, ``classes`` or ``steps`` (``kind``), with its values as int64."""

    kind: str
    values: np.ndarray

    @classmethod
    def of(cls, *, sample_ids=None, classes=None, steps=None, kinds: tuple[str, ...] = KINDS) -> Selection:
        """The one selection given (``None`` means not given); :class:`SelectionError` for none, two, a kind not in
        ``kinds``, or values that are not integers."""
        given = [(k, v) for k, v in (("sample_ids", sample_ids), ("classes", classes), ("steps", steps))
                 if v is not None]
        if len(given) != 1:
            options = " or ".join(f"{k}=" for k in kinds)
            raise SelectionError(f"pass exactly one of {options}" if not given else
                                 f"pass exactly one selection, not {' and '.join(k for k, _ in given)}")
        kind, values = given[0]
        if kind not in kinds:
            raise SelectionError(f"{kind}= is not a selection here; pass one of {', '.join(f'{k}=' for k in kinds)}")
        return cls(kind, int_array(values, _WHAT[kind]))

    def kwargs(self) -> dict[str, list[int]]:
        """``{kind: [values]}``, the keyword arguments of :meth:`amnesiac.Run.unlearn` (JSON-ready)."""
        return {self.kind: self.values.tolist()}

    @property
    def classes(self) -> list[int]:
        """The classes selected (empty unless the selection is by class)."""
        return self.values.tolist() if self.kind == "classes" else []

    def __str__(self) -> str:
        return f"{self.kind}={self.values[:10].tolist()}" + ("..." if self.values.size > 10 else "")
