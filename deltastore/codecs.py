"""Delta codecs: how one step's flat float32 delta becomes fixed-size streams on disk, and back.

Every codec cuts the flat vector into chunks of ``chunk_elems`` elements and produces, per step, streams whose
length is fixed by the layout (so pinned host slots can be preallocated) plus small per-chunk side arrays (scales).

- ``fp32``: the exact float32 delta (lossless compression happens later, in the storage backend).
- ``fp16``: per-chunk scale so the chunk's largest magnitude maps near fp16's top; nothing underflows.
- ``bf16``: float32's range with 8 mantissa bits; stored as the raw 16 bits (uint16).
- ``topk:F``: the largest fraction ``F`` of each chunk; values in fp16 with a per-chunk scale, indices within the
  chunk sorted and delta-coded (small integers that compress well).

Lossy codecs keep an error-feedback residual on the encoding device: what a step's encoding lost is added to the
next step's delta before encoding. So ``theta_0 + sum(stored deltas) + residual == theta_final`` up to float32
rounding, and the residual is stored when the run is closed. The price (see DESIGN.md section 5): the residual
carries part of step ``s`` into later steps, so undoing ``s`` removes slightly less of it.

Extension point: a codec is one subclass of :class:`Codec` and one :func:`register_codec` call (as zarr-python
registers its codecs); :func:`parse_codec` finds it by the part of the name before any ``:``. Nothing else in
deltastore or amnesiac names a codec. The subclass states its streams and side arrays (:meth:`Codec.streams`,
:meth:`Codec.side_arrays`), encodes on the training device (:meth:`Codec.encode`, called once per step through an
:class:`Encoder` that keeps the residual) and decodes by accumulating (:meth:`Codec.accumulate`, called by the
reduce for a block of data chunks at a time, on the CPU or the GPU). Call order: ``parse_codec`` ->
``streams``/``side_arrays`` (the store sizes its files and slots) -> ``encoder(device)`` once per recording ->
``Encoder.encode`` per step -> ``accumulate`` per block read.

Example:
    >>> import torch
    >>> codec = parse_codec("fp16", numel=5, chunk_elems=4)
    >>> enc = codec.encoder(torch.device("cpu"))
    >>> streams, side = enc.encode(torch.tensor([1e-6, -2e-6, 3.0, 0.0, 5e-9]))
    >>> block = torch.zeros(5)
    >>> codec.accumulate(block, 0, 2, {k: v.numpy() for k, v in streams.items()}, {k: v.numpy() for k, v in side.items()})
    >>> torch.allclose(block, torch.tensor([1e-6, -2e-6, 3.0, 0.0, 5e-9]), rtol=1e-3, atol=0)
    True
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from .errors import CorruptionError, UnknownCodecError

_TOPK_GROUP_ELEMS = 1 << 22  # top-k takes |x| of this many elements at a time
_FP16_TARGET = 32768.0  # a chunk's largest |value| maps here: headroom below fp16's 65504, far above its underflow
ArrayLike = np.ndarray | torch.Tensor


@dataclass(frozen=True)
class StreamSpec:
    """One fixed-length array written per step: ``per_chunk`` of its elements belong to each data chunk."""

    name: str
    dtype: str  # numpy dtype name
    length: int
    per_chunk: int

    def chunk_range(self, c0: int, c1: int) -> tuple[int, int]:
        """The stream elements that belong to data chunks ``[c0, c1)``."""
        return c0 * self.per_chunk, min(c1 * self.per_chunk, self.length)


class Codec(ABC):
    """A codec for a vector of ``numel`` elements cut into chunks of ``chunk_elems``; subclass and register it.

    Class attributes a subclass sets: ``kind`` (its registry key: the name before any ``:``), ``syntax`` (how its
    name is written in :data:`CODEC_NAMES`, e.g. ``"topk:F"``), ``argument_help`` (what may follow the ``:``)
    and ``lossy``.
    """

    kind: ClassVar[str]
    syntax: ClassVar[str]
    lossy: ClassVar[bool] = True
    argument_help: ClassVar[str | None] = None  # what the part after ':' may be, for error messages

    def __init__(self, numel: int, chunk_elems: int):
        self.numel, self.chunk_elems = numel, chunk_elems

    @classmethod
    def from_name(cls, argument: str | None, *, numel: int, chunk_elems: int) -> Codec | None:
        """The codec for ``kind[:argument]``, or None when ``argument`` is not valid for it (the default takes
        none)."""
        return cls(numel, chunk_elems) if argument is None else None

    @property
    def name(self) -> str:
        """The name stored in store.json; :func:`parse_codec` of it gives this codec back."""
        return self.kind

    @property
    def num_chunks(self) -> int:
        return max(1, math.ceil(self.numel / self.chunk_elems))

    @abstractmethod
    def streams(self) -> tuple[StreamSpec, ...]:
        """The arrays written per step, in a fixed order."""

    def side_arrays(self) -> dict[str, int]:
        """Per-step float32 side arrays (name -> length) that commit with the step in the step log."""
        return {}

    def stored_bytes_per_step(self) -> int:
        """Bytes of the encoded streams before lossless compression."""
        return sum(s.length * np.dtype(s.dtype).itemsize for s in self.streams())

    def encoder(self, device: torch.device | str) -> Encoder:
        """An encoder for successive deltas on ``device`` (it keeps a lossy codec's residual there)."""
        return Encoder(self, torch.device(device))

    @abstractmethod
    def encode(self, enc: Encoder, delta: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Encode one flat float32 delta on its device; a lossy codec takes ``enc.add_residual(delta)`` and leaves
        what it lost in ``enc.residual``. Returns (streams, side arrays) as tensors."""

    def encode_piece(self, x: torch.Tensor, base: torch.Tensor, n: int) -> tuple[dict[str, torch.Tensor],
                                                                               dict[str, torch.Tensor]]:
        """Encode one piece of a step streamed by :class:`~deltastore.streaming.StepStreamer`: ``x`` is the
        piece's ``S_t - base`` as a (chunks, chunk_elems) matrix whose ``n`` real elements are followed by zeros.
        A lossy codec adds what it stores, decoded exactly as a reader decodes it, to ``base`` (the same shape:
        what readers reconstruct), which is its error feedback. Returns (streams, side arrays) for those chunks.

        This default serves a codec that only defines :meth:`encode` and :meth:`accumulate`: it encodes the piece
        with a piece-sized codec of the same name (no residual) and decodes it into ``base``. The built-in codecs
        override it to skip the extra buffers."""
        piece = parse_codec(self.name, numel=n, chunk_elems=x.shape[1])
        streams, side = piece.encode(piece.encoder(x.device), x.reshape(-1)[:n])
        if self.lossy:
            piece.accumulate(base.reshape(-1)[:n], 0, x.shape[0], streams, side)
        return streams, side

    @abstractmethod
    def accumulate(self, acc: torch.Tensor, c0: int, c1: int, streams: dict[str, ArrayLike],
                   side: dict[str, ArrayLike], sign: float = 1.0) -> None:
        """Add ``sign`` times the decoded data chunks ``[c0, c1)`` to ``acc`` (the block's float32 elements).

        ``streams`` hold exactly the block's part of each stream (see :meth:`StreamSpec.chunk_range`); ``side``
        holds the step's whole side arrays, or just the block's. Streams may be numpy or torch and are moved to
        ``acc``'s device without blocking (pinned host memory makes that asynchronous); side arrays and top-k
        indices are read on the host, so decoding never waits for the device.
        """

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, numel={self.numel}, chunk_elems={self.chunk_elems})"

    def __eq__(self, other: object) -> bool:
        return (type(other) is type(self) and (self.name, self.numel, self.chunk_elems)
                == (other.name, other.numel, other.chunk_elems))

    def __hash__(self) -> int:
        return hash((type(self), self.name, self.numel, self.chunk_elems))


_REGISTRY: dict[str, type[Codec]] = {}


def register_codec(cls: type[Codec]) -> type[Codec]:
    """Make ``cls`` known to :func:`parse_codec` under ``cls.kind`` (usable as a class decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, Codec)) or ":" in getattr(cls, "kind", ":"):
        raise TypeError(f"register_codec takes a Codec subclass with a 'kind' without ':', not {cls!r}")
    _REGISTRY[cls.kind] = cls
    return cls


def codec_names() -> tuple[str, ...]:
    """How each registered codec's name is written (``topk:F`` for a parameter), in registration order."""
    return tuple(c.syntax for c in _REGISTRY.values())


def parse_codec(name: str, *, numel: int, chunk_elems: int) -> Codec:
    """Look ``name`` (``fp32``, ``fp16``, ``bf16``, ``topk:F`` with 0 < F <= 1, or a registered codec) up."""
    if not isinstance(name, str):
        raise UnknownCodecError(f"codec must be a string such as 'fp16', not {type(name).__name__}")
    kind, colon, argument = name.partition(":")
    cls = _REGISTRY.get(kind)
    codec = cls.from_name(argument if colon else None, numel=numel, chunk_elems=chunk_elems) if cls else None
    if codec is None:
        choices = ", ".join(c.syntax + (f" with {c.argument_help}" if c.argument_help else "")
                            for c in _REGISTRY.values())
        raise UnknownCodecError(f"unknown codec {name!r}; choose one of {choices}")
    return codec


def as_tensor(a: ArrayLike, device: torch.device) -> torch.Tensor:
    """``a`` (numpy or torch) as a tensor on ``device``, copied without blocking: what ``accumulate`` starts from."""
    t = a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a))
    return t.to(device, non_blocking=True)


def _host_array(a: ArrayLike) -> np.ndarray:
    """``a`` as a host numpy array; a device tensor is copied once (pass host arrays to avoid that wait)."""
    if isinstance(a, torch.Tensor):
        a = a.detach()
        return (a.view(torch.int16) if a.dtype == torch.bfloat16 else a).cpu().numpy()
    return np.asarray(a)


def _block_scales(side: dict[str, ArrayLike], c0: int, c1: int) -> np.ndarray:
    """The block's scales, read on the host: reading them from a device tensor would wait for the GPU once per
    chunk, and the device reduce could never run ahead."""
    scale = _host_array(side["scale"])
    return scale if scale.size == c1 - c0 else scale[c0:c1]


def _max_abs(rows: torch.Tensor) -> torch.Tensor:
    """Each row's largest magnitude, without a full-size ``|x|`` temporary."""
    low, high = torch.aminmax(rows, dim=1)
    return torch.maximum(high, low.neg())


def _chunk_scales(amax: torch.Tensor) -> torch.Tensor:
    scale = amax / _FP16_TARGET
    return torch.where(scale > 0, scale, torch.ones_like(scale)).float()


class Encoder:
    """Encodes successive deltas on ``device`` with ``codec``, keeping a lossy codec's error-feedback residual there.

    The hot path runs once per optimizer step on the training thread, so it allocates nothing proportional to the
    model beyond the returned streams and top-k's selection: the residual lives in one padded buffer, the delta
    plus residual in another; casts write straight into their output, and top-k, which leaves its residual in the
    work buffer, swaps the two instead of copying.
    """

    def __init__(self, codec: Codec, device: torch.device):
        self.codec, self.device = codec, device
        # a padded buffer lets every chunk be handled as one row of a (chunks, chunk_elems) matrix; the padding
        # stays zero, so it never wins a top-k slot over a real value and never raises a chunk's scale
        padded = codec.num_chunks * codec.chunk_elems
        self.work = torch.zeros(padded, device=device) if codec.lossy else None
        self.spare = torch.zeros(padded, device=device) if codec.lossy else None
        self.residual = self.spare[:codec.numel] if codec.lossy else None

    def encode(self, delta: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Encode one flat float32 delta; returns (streams, side arrays) as tensors on the device."""
        return self.codec.encode(self, delta)

    def add_residual(self, delta: torch.Tensor) -> torch.Tensor:
        """``delta + residual`` in the work buffer, as a (chunks, chunk_elems) matrix (zero padded)."""
        torch.add(delta, self.residual, out=self.work[:self.codec.numel])
        return self.work.view(self.codec.num_chunks, self.codec.chunk_elems)

    def swap(self) -> None:
        """The work buffer now holds the new residual: swap roles instead of copying it over."""
        self.work, self.spare = self.spare, self.work
        self.residual = self.spare[:self.codec.numel]


class _DenseCodec(Codec):
    """One ``data`` stream of ``numel`` elements of ``dtype``; ``scaled`` codecs add one float32 scale per chunk."""

    dtype: ClassVar[str]
    scaled: ClassVar[bool] = False

    def streams(self) -> tuple[StreamSpec, ...]:
        return (StreamSpec("data", self.dtype, self.numel, self.chunk_elems),)

    def side_arrays(self) -> dict[str, int]:
        return {"scale": self.num_chunks} if self.scaled else {}

    def decoded(self, data: torch.Tensor) -> torch.Tensor:
        """The stored ``data`` as a tensor torch can add (a bit-pattern view for types numpy lacks)."""
        return data

    def accumulate(self, acc: torch.Tensor, c0: int, c1: int, streams: dict[str, ArrayLike],
                   side: dict[str, ArrayLike], sign: float = 1.0) -> None:
        data = self.decoded(as_tensor(streams["data"], acc.device))
        if not self.scaled:
            acc.add_(data, alpha=sign)
            return
        scale, c = _block_scales(side, c0, c1), self.chunk_elems
        for i in range(c1 - c0):  # chunks are large (2**20): a Python loop over them costs nothing
            seg = slice(i * c, min((i + 1) * c, acc.numel()))
            acc[seg].add_(data[seg].float(), alpha=sign * float(scale[i]))


@register_codec
class Fp32Codec(_DenseCodec):
    """The exact float32 delta."""

    kind = syntax = "fp32"
    lossy = False
    dtype = "float32"

    def encode(self, enc: Encoder, delta: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        return {"data": delta}, {}

    def encode_piece(self, x: torch.Tensor, base: torch.Tensor, n: int):
        return {"data": x.view(-1)[:n]}, {}  # the streamer's base is the previous state itself


@register_codec
class Fp16Codec(_DenseCodec):
    """float16 with one float32 scale per chunk, so the chunk's largest magnitude maps near fp16's top."""

    kind = syntax = "fp16"
    dtype = "float16"
    scaled = True

    def encode(self, enc: Encoder, delta: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        rows = enc.add_residual(delta)
        scale = _chunk_scales(_max_abs(rows))
        q = torch.empty(rows.shape, dtype=torch.float16, device=rows.device)
        torch.div(rows, scale.unsqueeze(1), out=q)  # computed in float32, rounded once to float16
        # the residual is work minus exactly what a reader decodes (the float32 product, rounded as there);
        # the spare buffer held the residual just consumed, so it takes the decoded values, then the new one
        decoded = enc.spare.view_as(rows)
        torch.mul(q, scale.unsqueeze(1), out=decoded)
        torch.sub(rows, decoded, out=decoded)
        return {"data": q.view(-1)[:self.numel]}, {"scale": scale}

    def encode_piece(self, x: torch.Tensor, base: torch.Tensor, n: int):
        scale = _chunk_scales(_max_abs(x))
        q = torch.empty(x.shape, dtype=torch.float16, device=x.device)
        torch.div(x, scale.unsqueeze(1), out=q)
        base.add_(q.float().mul_(scale.unsqueeze(1)))  # the float32 product, rounded as a reader does
        return {"data": q.view(-1)[:n]}, {"scale": scale}


@register_codec
class Bf16Codec(_DenseCodec):
    """bfloat16 (float32's range, 8 mantissa bits), stored as its raw 16 bits."""

    kind = syntax = "bf16"
    dtype = "uint16"

    def encode(self, enc: Encoder, delta: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        work = enc.add_residual(delta).view(-1)[:self.numel]
        data = work.to(torch.bfloat16)
        torch.sub(work, data, out=enc.residual)  # what bf16 lost is the next residual
        return {"data": data.view(torch.int16)}, {}

    def encode_piece(self, x: torch.Tensor, base: torch.Tensor, n: int):
        data = x.view(-1)[:n].to(torch.bfloat16)
        base.view(-1)[:n].add_(data)  # bf16 -> float32 is exact: the base gains exactly what a reader decodes
        return {"data": data.view(torch.int16)}, {}

    def decoded(self, data: torch.Tensor) -> torch.Tensor:
        return data.view(torch.bfloat16)


@register_codec
class TopKCodec(Codec):
    """The largest fraction of each chunk: fp16 values with a per-chunk scale, sorted delta-coded int32 indices."""

    kind, syntax = "topk", "topk:F"
    argument_help = "0 < F <= 1 (for example topk:0.01)"

    def __init__(self, numel: int, chunk_elems: int, fraction: float):
        super().__init__(numel, chunk_elems)
        self.fraction = fraction

    @classmethod
    def from_name(cls, argument: str | None, *, numel: int, chunk_elems: int) -> TopKCodec | None:
        try:
            fraction = float(argument)
        except (TypeError, ValueError):
            return None
        return cls(numel, chunk_elems, fraction) if 0.0 < fraction <= 1.0 else None

    @property
    def name(self) -> str:
        return f"topk:{self.fraction:g}"

    @property
    def k_per_chunk(self) -> int:
        return max(1, math.ceil(self.fraction * min(self.chunk_elems, self.numel)))

    def streams(self) -> tuple[StreamSpec, ...]:
        k, total = self.k_per_chunk, self.k_per_chunk * self.num_chunks
        return StreamSpec("values", "float16", total, k), StreamSpec("indices", "int32", total, k)

    def side_arrays(self) -> dict[str, int]:
        return {"scale": self.num_chunks}

    def encode(self, enc: Encoder, delta: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        rows = enc.add_residual(delta)
        idx = self._select(rows)
        vals = torch.gather(rows, 1, idx)
        scale = _chunk_scales(vals.abs().amax(dim=1))
        q = (vals / scale.unsqueeze(1)).to(torch.float16)
        # residual: everything not kept, plus the rounding error of what was kept
        rows.scatter_(1, idx, vals - q.float() * scale.unsqueeze(1))
        enc.swap()
        coded = torch.diff(idx, dim=1, prepend=torch.zeros_like(idx[:, :1])).to(torch.int32)
        return {"values": q.view(-1), "indices": coded.view(-1)}, {"scale": scale}

    def _select(self, rows: torch.Tensor) -> torch.Tensor:
        """Each row's top-k positions, sorted; ``|x|`` is taken a few chunks at a time (no full-size temporary)."""
        group = max(1, _TOPK_GROUP_ELEMS // self.chunk_elems)
        return torch.cat([torch.topk(rows[g:g + group].abs(), self.k_per_chunk, dim=1, sorted=False).indices
                          for g in range(0, rows.shape[0], group)]).sort(dim=1).values

    def encode_piece(self, x: torch.Tensor, base: torch.Tensor, n: int):
        idx = self._select(x)
        vals = torch.gather(x, 1, idx)
        scale = _chunk_scales(vals.abs().amax(dim=1))
        q = (vals / scale.unsqueeze(1)).to(torch.float16)
        base.scatter_add_(1, idx, q.float().mul_(scale.unsqueeze(1)))  # padding picks add zero to zero
        coded = torch.diff(idx, dim=1, prepend=torch.zeros_like(idx[:, :1])).to(torch.int32)
        return {"values": q.view(-1), "indices": coded.view(-1)}, {"scale": scale}

    def accumulate(self, acc: torch.Tensor, c0: int, c1: int, streams: dict[str, ArrayLike],
                   side: dict[str, ArrayLike], sign: float = 1.0) -> None:
        # every decision that needs values (indices in range, how many of the last chunk's entries fall in its
        # padding) is made on the host copy, and no boolean mask is applied on the device: either would wait for it
        dev, c, k, rows = acc.device, self.chunk_elems, self.k_per_chunk, c1 - c0
        scale = _block_scales(side, c0, c1)
        coded = _host_array(streams["indices"]).reshape(rows, k)
        # delta-coded and sorted: every entry >= 0, and a chunk's last index (its row's sum) is its largest.
        # Checksums stop accidents, not forgers: indices outside their chunk must not reach index_add_
        if coded.size and (int(coded.min()) < 0 or int(coded.sum(axis=1, dtype=np.int64).max()) >= c):
            raise CorruptionError("top-k indices fall outside their chunk", chunks=(c0, c1))
        # only the vector's last chunk can reach into padding, and only with its last (largest) indices
        last_valid = int(np.count_nonzero(np.cumsum(coded[-1], dtype=np.int64) < acc.numel() - (rows - 1) * c))
        idx = torch.cumsum(as_tensor(streams["indices"], dev).view(rows, k), dim=1, dtype=torch.int64)
        idx += (torch.arange(rows, device=dev) * c).unsqueeze(1)
        vals = as_tensor(streams["values"], dev).view(rows, k)
        for i in range(rows):  # one index_add_ per chunk, scaled by its host-side scale
            n = k if i < rows - 1 else last_valid
            acc.index_add_(0, idx[i, :n], vals[i, :n].float(), alpha=sign * float(scale[i]))


CODEC_NAMES = codec_names()  # the built-in codecs' names as written: ("fp32", "fp16", "bf16", "topk:F")
