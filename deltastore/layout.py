"""The tensor layout: how a set of named tensors maps onto one flat float32 vector.

A delta store holds numbered steps of one flat vector. The layout records, for every tensor, its name, shape, dtype
and offset in that vector, so that a flat sum can be turned back into tensors without the model's code.

Example:
    >>> import torch
    >>> from deltastore.layout import TensorLayout
    >>> layout = TensorLayout.from_tensors({"w": torch.zeros(2, 3), "b": torch.zeros(3)})
    >>> layout.numel, [e.offset for e in layout.entries]
    (9, [0, 6])
    >>> flat = layout.flatten({"w": torch.ones(2, 3), "b": torch.full((3,), 2.0)})
    >>> layout.unflatten(flat)["b"].tolist()
    [2.0, 2.0, 2.0]
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .errors import FormatError, LayoutMismatchError

# dtypes a layout may name; the string form is what goes to disk (never a pickled dtype object).
_DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
MAX_TENSORS = 1_000_000  # bounds what a crafted layout file can make us allocate
MAX_NUMEL = 1 << 40
MAX_NAME_CHARS = 4096


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not a size


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class TensorEntry:
    name: str
    shape: tuple[int, ...]
    dtype: str
    offset: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class TensorLayout:
    """Ordered tensors packed end to end into one float32 vector."""

    entries: tuple[TensorEntry, ...]

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> TensorLayout:
        """Layout of the floating-point tensors of ``tensors``, in their order; other dtypes are left out."""
        entries, offset = [], 0
        for name, t in tensors.items():
            if not torch.is_floating_point(t):
                continue
            if t.dtype not in _DTYPES.values():
                raise LayoutMismatchError(f"tensor {name!r} has dtype {t.dtype}, which the store cannot hold; "
                                          f"use one of {sorted(_DTYPES)}")
            entries.append(TensorEntry(name, tuple(t.shape), dtype_name(t.dtype), offset))
            offset += t.numel()
        return cls(tuple(entries))

    @property
    def numel(self) -> int:
        return self.entries[-1].offset + self.entries[-1].numel if self.entries else 0

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    def entry(self, name: str) -> TensorEntry:
        for e in self.entries:
            if e.name == name:
                return e
        raise KeyError(name)

    def tensors_in(self, lo: int, hi: int) -> list[str]:
        """Names of the tensors that overlap flat elements ``[lo, hi)``: what an error about that range names."""
        return [e.name for e in self.entries if e.offset < hi and e.offset + e.numel > lo]

    def check(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Raise :class:`LayoutMismatchError` naming every difference between ``tensors`` and this layout."""
        problems = []
        for e in self.entries:
            t = tensors.get(e.name)
            if t is None:
                problems.append(f"missing {e.name!r}")
            elif tuple(t.shape) != e.shape:
                problems.append(f"{e.name!r} has shape {tuple(t.shape)}, the run recorded {e.shape}")
        extra = [n for n, t in tensors.items() if torch.is_floating_point(t) and n not in self.names]
        problems += [f"unexpected {n!r}" for n in extra]
        if problems:
            shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
            raise LayoutMismatchError(f"the tensors do not match the recorded layout: {shown}. "
                                      "Use the same model architecture as the run that was recorded.")

    def flatten(self, tensors: Mapping[str, torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
        """Pack the layout's tensors into one float32 vector (on the tensors' device unless ``out`` is given)."""
        if out is None:
            device = next(iter(tensors.values())).device if tensors else "cpu"
            out = torch.empty(self.numel, dtype=torch.float32, device=device)
        for e in self.entries:
            out[e.offset:e.offset + e.numel].copy_(tensors[e.name].detach().reshape(-1))
        return out

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a flat vector back into named tensors of the recorded shapes and dtypes."""
        if flat.numel() != self.numel:
            raise LayoutMismatchError(f"flat vector has {flat.numel()} elements, the layout {self.numel}")
        return {e.name: flat[e.offset:e.offset + e.numel].reshape(e.shape).to(_DTYPES[e.dtype])
                for e in self.entries}

    def to_json(self) -> list[dict]:
        return [{"name": e.name, "shape": list(e.shape), "dtype": e.dtype, "offset": e.offset} for e in self.entries]

    @classmethod
    def from_json(cls, data: object) -> TensorLayout:
        """Parse and validate a layout read from disk; anything malformed raises :class:`FormatError`."""
        if not isinstance(data, list) or len(data) > MAX_TENSORS:
            raise FormatError("layout must be a list of at most %d tensor entries" % MAX_TENSORS)
        entries, expected_offset, names = [], 0, set()
        for i, item in enumerate(data):
            try:
                name, shape, dtype, offset = item["name"], item["shape"], item["dtype"], item["offset"]
                ok = (isinstance(name, str) and 0 < len(name) <= MAX_NAME_CHARS and name not in names
                      and isinstance(shape, list) and len(shape) <= 16
                      and all(_is_int(s) and 0 <= s < MAX_NUMEL for s in shape)
                      and isinstance(dtype, str) and dtype in _DTYPES and _is_int(offset)
                      and offset == expected_offset)
            except (TypeError, KeyError):
                ok = False
            if not ok:
                raise FormatError(f"layout entry {i} is malformed, duplicated or out of order: {str(item)[:200]}")
            entry = TensorEntry(name, tuple(shape), dtype, offset)
            expected_offset += entry.numel
            if expected_offset > MAX_NUMEL:
                raise FormatError("layout describes more than 2**40 elements")
            entries.append(entry)
            names.add(name)
        return cls(tuple(entries))
