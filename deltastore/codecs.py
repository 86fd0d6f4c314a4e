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
from dataclasses import dataclass

import numpy as np
import torch

from .errors import CorruptionError, UnknownCodecError

CODEC_NAMES = ("fp32", "fp16", "bf16", "topk:F")
_TOPK_GROUP_ELEMS = 1 << 22
_FP16_TARGET = 32768.0  # a chunk's largest |value| maps here: headroom below fp16's 65504, far above its underflow


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


@dataclass(frozen=True)
class Codec:
    """A parsed codec for a vector of ``numel`` elements cut into chunks of ``chunk_elems``."""

    name: str
    numel: int
    chunk_elems: int
    fraction: float = 1.0  # top-k only

    @property
    def kind(self) -> str:
        return self.name.split(":")[0]

    @property
    def lossy(self) -> bool:
        return self.kind != "fp32"

    @property
    def num_chunks(self) -> int:
        return max(1, math.ceil(self.numel / self.chunk_elems))

    @property
    def k_per_chunk(self) -> int:
        return max(1, math.ceil(self.fraction * min(self.chunk_elems, self.numel)))

    def streams(self) -> tuple[StreamSpec, ...]:
        n, c = self.numel, self.chunk_elems
        if self.kind == "fp32":
            return (StreamSpec("data", "float32", n, c),)
        if self.kind == "fp16":
            return (StreamSpec("data", "float16", n, c),)
        if self.kind == "bf16":
            return (StreamSpec("data", "uint16", n, c),)
        k, total = self.k_per_chunk, self.k_per_chunk * self.num_chunks
        return (StreamSpec("values", "float16", total, k), StreamSpec("indices", "int32", total, k))

    def side_arrays(self) -> dict[str, int]:
        """Per-step float32 side arrays (name -> length) that commit with the step in the step log."""
        return {"scale": self.num_chunks} if self.kind in ("fp16", "topk") else {}

    def stored_bytes_per_step(self) -> int:
        """Bytes of the encoded streams before lossless compression."""
        return sum(s.length * np.dtype(s.dtype).itemsize for s in self.streams())

    def encoder(self, device: torch.device) -> Encoder:
        return Encoder(self, torch.device(device))

    def accumulate(self, acc: torch.Tensor, c0: int, c1: int, streams: dict[str, np.ndarray | torch.Tensor],
                   side: dict[str, np.ndarray | torch.Tensor], sign: float = 1.0) -> None:
        """Add ``sign`` times the decoded data chunks ``[c0, c1)`` to ``acc`` (the block's float32 elements).

        ``streams`` hold exactly the block's part of each stream (see :meth:`StreamSpec.chunk_range`); ``side``
        holds the step's whole side arrays, or just the block's. Arrays may be numpy or torch; streams are moved to
        ``acc``'s device without blocking (pinned host memory makes that asynchronous), side arrays are read on the
        host.
        """
        dev, c = acc.device, self.chunk_elems
        # scales are read on the host (a step's side arrays come from the step log): reading them from a device
        # tensor would wait for the GPU once per chunk, and the device reduce could never run ahead
        scale = _host_array(side["scale"]) if "scale" in side else None
        if scale is not None and scale.size != c1 - c0:
            scale = scale[c0:c1]  # the step's whole array (else: just this block's)
        if self.kind == "topk":
            self._accumulate_topk(acc, c1 - c0, streams, scale, sign)
            return
        data = _as_tensor(streams["data"], dev)
        if self.kind == "bf16":
            data = data.view(torch.bfloat16)
        if scale is None:
            acc.add_(data, alpha=sign)
            return
        for i in range(c1 - c0):  # chunks are large (2**20): a Python loop over them costs nothing
            seg = slice(i * c, min((i + 1) * c, acc.numel()))
            acc[seg].add_(data[seg].float(), alpha=sign * float(scale[i]))

    def _accumulate_topk(self, acc: torch.Tensor, rows: int, streams, scale: np.ndarray, sign: float) -> None:
        """Add ``rows`` top-k chunks into ``acc``; the indices are checked on the host before they are uploaded.

        Every decision that needs values (indices in range, how many of the last chunk's entries fall in its
        padding) is made from the host copy, so nothing here waits for the device, and no boolean mask is applied
        on it (that would synchronise to learn the result's size).
        """
        k, c, dev = self.k_per_chunk, self.chunk_elems, acc.device
        coded = _host_array(streams["indices"]).reshape(rows, k)
        # delta-coded and sorted: every entry >= 0, and a chunk's last index (the sum of its row) is its largest.
        # Checksums stop accidents, not forgers: indices outside their chunk must not reach index_add_
        if coded.size and (int(coded.min()) < 0 or int(coded.sum(axis=1, dtype=np.int64).max()) >= c):
            raise CorruptionError(f"top-k indices of a block's chunks fall outside their chunk ({rows} chunks)")
        # only the vector's last chunk can reach into padding, and only with its last (largest) indices
        last_valid = int(np.count_nonzero(np.cumsum(coded[-1], dtype=np.int64) < acc.numel() - (rows - 1) * c))
        idx = torch.cumsum(_as_tensor(streams["indices"], dev).view(rows, k), dim=1, dtype=torch.int64)
        idx += (torch.arange(rows, device=dev) * c).unsqueeze(1)
        vals = _as_tensor(streams["values"], dev).view(rows, k)
        for i in range(rows):  # one index_add_ per chunk, scaled by its host-side scale
            n = k if i < rows - 1 else last_valid
            acc.index_add_(0, idx[i, :n], vals[i, :n].float(), alpha=sign * float(scale[i]))


def _host_array(a: np.ndarray | torch.Tensor) -> np.ndarray:
    """``a`` as a host numpy array; a device tensor is copied once (pass host arrays to avoid that wait)."""
    if isinstance(a, torch.Tensor):
        a = a.detach()
        if a.dtype == torch.bfloat16:
            a = a.view(torch.int16)
        return a.cpu().numpy()
    return np.asarray(a)


def _as_tensor(a: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    t = a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a))
    return t.to(device, non_blocking=True)


class Encoder:
    """Encodes successive deltas on ``device``, keeping the error-feedback residual there.

    The hot path runs once per optimizer step on the training thread, so it allocates nothing proportional to the
    model beyond the returned streams and top-k's selection: the residual lives in one padded buffer, the delta
    plus residual in another; casts write straight into their output, and top-k, which leaves its residual in the
    work buffer, swaps the two instead of copying.
    """

    def __init__(self, codec: Codec, device: torch.device):
        self.codec, self.device = codec, device
        n = codec.numel
        # a padded buffer lets every chunk be handled as one row of a (chunks, chunk_elems) matrix; the padding
        # stays zero, so it never wins a top-k slot over a real value and never raises a chunk's scale
        padded = codec.num_chunks * codec.chunk_elems
        self._work = torch.zeros(padded, device=device) if codec.lossy else None
        self._spare = torch.zeros(padded, device=device) if codec.lossy else None
        self.residual = self._spare[:n] if codec.lossy else None

    def encode(self, delta: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Encode one flat float32 delta; returns (streams, side arrays) as tensors on the device."""
        codec = self.codec
        if codec.kind == "fp32":
            return {"data": delta}, {}
        n, work = codec.numel, self._work
        torch.add(delta, self.residual, out=work[:n])
        rows = work.view(codec.num_chunks, codec.chunk_elems)
        if codec.kind == "bf16":
            data = work[:n].to(torch.bfloat16)
            torch.sub(work[:n], data, out=self.residual)  # what bf16 lost is the next residual
            return {"data": data.view(torch.int16)}, {}
        if codec.kind == "fp16":
            low, high = torch.aminmax(rows, dim=1)  # no full-size |x| temporary
            scale = _chunk_scales(torch.maximum(high, low.neg()))
            q = torch.empty(rows.shape, dtype=torch.float16, device=rows.device)
            torch.div(rows, scale.unsqueeze(1), out=q)  # computed in float32, rounded once to float16
            # the residual is work minus exactly what a reader decodes (the float32 product, rounded as there);
            # the spare buffer held the residual just consumed, so it takes the decoded values, then the new one
            decoded = self._spare.view_as(rows)
            torch.mul(q, scale.unsqueeze(1), out=decoded)
            torch.sub(rows, decoded, out=decoded)
            return {"data": q.view(-1)[:n]}, {"scale": scale}
        k = codec.k_per_chunk
        # |x| is taken a few chunks at a time: a full-size float32 temporary per step is what issue 15 removed
        group = max(1, _TOPK_GROUP_ELEMS // codec.chunk_elems)
        idx = torch.cat([torch.topk(rows[g:g + group].abs(), k, dim=1, sorted=False).indices
                         for g in range(0, codec.num_chunks, group)]).sort(dim=1).values
        vals = torch.gather(rows, 1, idx)
        scale = _chunk_scales(vals.abs().amax(dim=1))
        q = (vals / scale.unsqueeze(1)).to(torch.float16)
        # residual: everything not kept, plus the rounding error of what was kept
        rows.scatter_(1, idx, vals - q.float() * scale.unsqueeze(1))
        self._swap()
        coded = torch.diff(idx, dim=1, prepend=torch.zeros_like(idx[:, :1])).to(torch.int32)
        return {"values": q.view(-1), "indices": coded.view(-1)}, {"scale": scale}

    def _swap(self) -> None:
        """The work buffer now holds the new residual: swap roles instead of copying it over."""
        self._work, self._spare = self._spare, self._work
        self.residual = self._spare[:self.codec.numel]


def _chunk_scales(amax: torch.Tensor) -> torch.Tensor:
    scale = amax / _FP16_TARGET
    return torch.where(scale > 0, scale, torch.ones_like(scale)).float()


def parse_codec(name: str, *, numel: int, chunk_elems: int) -> Codec:
    """Parse ``fp32``, ``fp16``, ``bf16`` or ``topk:F`` (0 < F <= 1)."""
    if not isinstance(name, str):
        raise UnknownCodecError(f"codec must be a string such as 'fp16', not {type(name).__name__}")
    if name in ("fp32", "fp16", "bf16"):
        return Codec(name, numel, chunk_elems)
    if name.startswith("topk:"):
        try:
            fraction = float(name[5:])
        except ValueError:
            fraction = -1.0
        if 0.0 < fraction <= 1.0:
            return Codec(f"topk:{fraction:g}", numel, chunk_elems, fraction)
    raise UnknownCodecError(f"unknown codec {name!r}; choose one of fp32, fp16, bf16, topk:F with 0 < F <= 1 "
                            "(for example topk:0.01)")
