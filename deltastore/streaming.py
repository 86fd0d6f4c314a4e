"""Recording a step in pieces: delta, encoder and writer stream the state a few data chunks at a time.

The only buffer the size of the model is the *base*: the previous state ``S_{t-1}`` for the exact codec, and for a
lossy codec ``R_{t-1} = theta_0 + sum of the decoded deltas so far`` (what a reader reconstructs). A lossy codec
encodes ``S_t - R_{t-1}`` and adds what it stored, decoded, to ``R``: that is error feedback (``delta_t +
residual_{t-1} = S_t - R_{t-1}``) without keeping the residual, which is ``S - R`` whenever it is needed (at a
checkpoint, at the end). Everything else is per piece (:data:`DEFAULT_PIECE_ELEMS` parameters, 16 MiB of float32):
the delta buffers (two on CUDA, so that training waits only if copying a piece out is slower than computing the
next), the encoder's temporaries, and the writer's fixed pool of host buffers. So recording adds about 4 bytes per
parameter plus a bounded amount, whatever the model's size (``benchmarks/memory.py``).

Nothing here waits for the device: pieces are queued to the writer with the copy event of their buffer, and a delta
buffer is only overwritten after the compute stream waited (on the device) for that event. For the lossy codecs the
streams handed over are fresh tensors, so nothing waits at all.

Example:
    >>> import tempfile, numpy as np, torch
    >>> from deltastore import DeltaStore
    >>> state = {"w": torch.zeros(5)}
    >>> store = DeltaStore.create(tempfile.mkdtemp() + "/s", state, codec="fp32", chunk_elems=2, durable=False)
    >>> streamer = StepStreamer(store, state, device="cpu", piece_elems=2)
    >>> state["w"] += torch.arange(5.0)
    >>> streamer.record(state, {"ids": np.array([0])})
    0
    >>> streamer.close(); store.read_step(0).tolist()
    [0.0, 1.0, 2.0, 3.0, 4.0]
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from .writer import DEFAULT_BUFFER_BYTES, AsyncStepWriter

DEFAULT_PIECE_ELEMS = 1 << 22  # 16 MiB of float32 parameters: the 16-64 MiB, small against any big model


class StepStreamer:
    """Turns successive model states into committed steps of ``store``, piece by piece.

    Args:
        store: a writable :class:`~deltastore.DeltaStore` whose layout matches ``state``.
        state: the current state (``S_0``, or the state at the step a run resumes from).
        device: where the state lives and the encoding runs.
        piece_elems: parameters per piece (rounded down to whole data chunks, at least one).
        slots, max_buffer_bytes: the writer's host buffer pool (see :class:`~deltastore.writer.AsyncStepWriter`;
            None: its defaults).
        residual: a lossy codec's error-feedback residual to continue from (``S - R``, from a checkpoint).
    """

    def __init__(self, store, state: Mapping[str, torch.Tensor], *, device: torch.device | str,
                 piece_elems: int = DEFAULT_PIECE_ELEMS, slots: int | None = None,
                 max_buffer_bytes: int | None = None, residual: torch.Tensor | None = None):
        self.store, self.layout, self.codec = store, store.layout, store.codec
        self.device = torch.device(device)
        self._cuda = self.device.type == "cuda"
        c, n = self.codec.chunk_elems, self.layout.numel
        budget = DEFAULT_BUFFER_BYTES if max_buffer_bytes is None else max_buffer_bytes
        self.writer = AsyncStepWriter(store, device=self.device, slots=slots, max_buffer_bytes=budget,
                                      piece_chunks=max(1, piece_elems // c))
        per = self.writer.chunks_per_piece
        self.piece_elems = per * c
        # the base is padded to whole chunks so that a piece is always a (chunks, chunk_elems) matrix; the padding
        # stays zero (a top-k pick there adds zero to zero)
        self.base = torch.zeros(self.codec.num_chunks * c, device=self.device)
        self.layout.flatten(state, out=self.base[:n])
        if residual is not None:
            if not self.codec.lossy:
                raise ValueError("an exact codec has no residual to continue from")
            self.base[:n] -= residual.reshape(-1).to(self.device, torch.float32)
        self._buffers = [torch.zeros(self.piece_elems, device=self.device) for _ in range(2 if self._cuda else 1)]
        self._events: list = [None] * len(self._buffers)
        self._pieces = []  # (c0, c1, lo, hi, [(tensor name, its offset, a, z) overlapping [lo, hi)])
        for c0 in range(0, self.codec.num_chunks, per):
            c1 = min(c0 + per, self.codec.num_chunks)
            lo, hi = c0 * c, min(c1 * c, n)
            parts = [(e.name, e.offset, max(lo, e.offset), min(hi, e.offset + e.numel))
                     for e in self.layout.entries if e.offset < hi and e.offset + e.numel > lo]
            self._pieces.append((c0, c1, lo, hi, parts))
        self._versions = _versions(state)

    @property
    def steps_submitted(self) -> int:
        return self.writer.next_step

    def record(self, state: Mapping[str, torch.Tensor], metadata: Mapping[str, np.ndarray]) -> int:
        """Record ``state - previous`` as the next step with ``metadata``; returns its number (queued, not yet
        committed: :meth:`flush` waits). Raises :class:`~deltastore.WriterError` if the writer failed."""
        c = self.codec.chunk_elems
        with torch.no_grad():
            for j, (c0, c1, lo, hi, parts) in enumerate(self._pieces):
                which = j % len(self._buffers)
                if self._events[which] is not None:
                    # the exact codec hands this very buffer to the writer: wait (on the device) until the copy of
                    # the piece that used it last has run; never a host wait
                    torch.cuda.current_stream(self.device).wait_event(self._events[which])
                buf = self._buffers[which][:(c1 - c0) * c]
                self._delta_into(state, parts, lo, buf[:hi - lo])
                if hi - lo < buf.numel():
                    buf[hi - lo:].zero_()  # the vector's last chunk: its padding encodes as zeros
                streams, side = self._encode(buf, c0, c1, hi - lo)
                event = self.writer.submit_piece(c0, c1, streams, side)
                if not self.codec.lossy:
                    self._events[which] = event
        step = self.writer.end_step(metadata)
        self._versions = _versions(state)
        return step

    def _delta_into(self, state, parts, lo: int, out: torch.Tensor) -> None:
        exact = not self.codec.lossy
        for name, offset, a, z in parts:
            src = state[name].detach().reshape(-1)[a - offset:z - offset]
            base = self.base[a:z]
            torch.sub(src, base, out=out[a - lo:z - lo])
            if exact:
                base.copy_(src)  # the exact codec's base is the previous state itself

    def _encode(self, buf: torch.Tensor, c0: int, c1: int, n: int):
        """Encode one piece (``buf``: its chunks, padded with zeros); a lossy codec adds what it stored, decoded,
        to the base. Returns (streams, side arrays) as device tensors."""
        c = self.codec.chunk_elems
        return self.codec.encode_piece(buf.view(c1 - c0, c), self.base[c0 * c:c1 * c].view(c1 - c0, c), n)

    # ------------------------------------------------------------ the state since the last step
    def changed(self, state: Mapping[str, torch.Tensor]) -> bool:
        """Whether ``state`` moved since the last recorded step (BatchNorm statistics updated by a forward pass
        after it, say). Exact codec: compared value by value against the base. Lossy codecs, whose base is not the
        previous state: any state tensor modified in place since (its version counter; ``num_batches_tracked``
        counts every training-mode BatchNorm forward); a change made behind autograd's back (``.data``) is not
        seen, but still ends up in the final residual, so theta_0 + deltas + residual stays theta_final."""
        if self.codec.lossy:
            return _versions(state) != self._versions
        for _, _, lo, hi, parts in self._pieces:
            for name, offset, a, z in parts:
                if not torch.equal(state[name].detach().reshape(-1)[a - offset:z - offset].float(),
                                   self.base[a:z]):
                    return True
        return False

    def residual_range(self, state: Mapping[str, torch.Tensor], lo: int, hi: int) -> torch.Tensor:
        """Elements ``[lo, hi)`` of a lossy codec's residual ``S - R`` (float32, on the host)."""
        out = torch.empty(hi - lo, device=self.device)
        for e in self.layout.entries:
            a, z = max(lo, e.offset), min(hi, e.offset + e.numel)
            if a < z:
                torch.sub(state[e.name].detach().reshape(-1)[a - e.offset:z - e.offset], self.base[a:z],
                          out=out[a - lo:z - lo])
        return out.cpu()

    def residual(self, state: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        """The whole residual (for a checkpoint), or None for the exact codec."""
        if not self.codec.lossy:
            return None
        return self.residual_range(state, 0, self.layout.numel)

    def finalize(self, state: Mapping[str, torch.Tensor]) -> None:
        """Save the final state and (lossy codecs) the residual, piece by piece; mark the store complete."""
        residual = (lambda lo, hi: self.residual_range(state, lo, hi)) if self.codec.lossy else None
        self.store.finalize(state, residual)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _versions(state: Mapping[str, torch.Tensor]) -> list[int]:
    return [t._version for t in state.values()]
