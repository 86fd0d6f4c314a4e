"""Recording's memory is bounded whatever the model size (issue 15): with a small forced piece size, no step
allocates anything near the model's size, and the long-lived buffers are the base plus a fixed pool.

``benchmarks/memory.py`` measures the peak resident memory of real trainings (10-250 M parameters); this test
guards the mechanism on a 1.5 M-parameter model: the torch profiler sees every tensor the training thread
allocates while steps are recorded (through ``StepStreamer``, from an optimizer post-hook as the Recorder does), tracemalloc every numpy array and bytes object of both threads.
"""

from __future__ import annotations

import tracemalloc

import numpy as np

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from deltastore import DeltaStore, StepStreamer

PIECE, CHUNK = 1 << 16, 1 << 14  # 256 KiB of float32 per piece, 64 KiB per chunk


@pytest.mark.parametrize("codec", ["fp32", "fp16", "bf16", "topk:0.05"])
def test_no_step_allocates_a_model_sized_temporary(tmp_path, codec):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1000, 1000), torch.nn.Linear(1000, 500))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    numel = sum(p.numel() for p in model.parameters())
    full = 4 * numel
    x = torch.randn(4, 1000)
    store = DeltaStore.create(tmp_path / "run", model.state_dict(), codec=codec, durable=False, chunk_elems=CHUNK)
    rec = StepStreamer(store, model.state_dict(), device="cpu", piece_elems=PIECE, max_buffer_bytes=8 * 4 * PIECE)
    opt.register_step_post_hook(lambda *_: rec.record(model.state_dict(), {"ids": np.array([0])}))
    for t in range(2):  # warm: the writer's pool and the encoder's first allocations
        model(x).sum().backward()
        opt.step()
    rec.flush()
    tracemalloc.start()
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            for t in range(2):
                model(x).sum().backward()
                with torch.profiler.record_function("recorded_step"):
                    opt.step()  # the optimizer step and, in its post-hook, the recording of the step
                opt.zero_grad()
            rec.flush()
        _, python_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    in_steps = [e for e in prof.events() if _inside(e, "recorded_step")]
    assert len(in_steps) > 20, "the profiler did not see the recording"
    largest = max(e.self_cpu_memory_usage for e in in_steps)
    assert largest <= 4 * 4 * PIECE, f"a step allocated {largest} bytes at once (the model is {full})"
    assert python_peak < full / 4, f"numpy/bytes peaked at {python_peak} bytes (the model is {full})"
    writer = rec.writer
    assert writer.pieces_per_step >= numel // PIECE and writer.pool.total_bytes <= 8 * 4 * PIECE + 4096
    rec.close()
    rec.finalize(model.state_dict())
    assert store.num_steps == 4 and store.complete


def _inside(event, name: str) -> bool:
    while event is not None:
        if event.name == name:
            return True
        event = event.cpu_parent
    return False
