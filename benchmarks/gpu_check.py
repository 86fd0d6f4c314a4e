"""The one prepared GPU run (issue 16): every check of the recording and reduce paths that needs a GPU, in one call.

``benchmarks/gpu_check.sh`` installs what the machine lacks and calls this script; each section runs in a child
process under its own timeout (a hang fails that section, not the run), writes its figures, and the parent collects
them into ``gpu_check.json`` and ``gpu_check.png`` under ``--out``. With ``--device cpu`` every section that can run
without a GPU runs (CI and machines without one); the others are reported as skipped, never as passed.

Sections:

- ``writer_stress``: every codec, 1 and 2 buffers, pieces of a few chunks, ``torch.cuda._sleep`` before each encode
  (so the copy's inputs are late), allocator churn after each submit (so freed encoder outputs are reused at once),
  random delays in the store; after close every stored step is compared bit for bit with a synchronous replay.
- ``recording``: a deterministic training recorded on the device against device-side snapshots (fp32 exact), and
  asynchronous against synchronous recording (a flush after every step) per codec (same stored bytes).
- ``encoders``: CPU against device encoders over successive steps with error feedback (fp32/fp16/bf16
  bit-identical streams, top-k compared by decoded values).
- ``reduce``: the pipelined (device) reduce against the CPU reduce for every codec, with tiny blocks and a small
  in-flight budget so every host buffer is reused many times.
- ``failures``: a store that fails at step k, a wrong-shaped submit with one buffer, both under a timeout.
- ``sync_debug`` (CUDA): ``torch.cuda.set_sync_debug_mode("error")`` around recording steps and the device reduce.
- ``sanitizer`` (CUDA): the ``small`` section's digest under ``TORCH_CUDA_SANITIZER=1`` and under
  ``CUDA_LAUNCH_BLOCKING=1`` must equal the plain run's.
- ``ddp`` (CUDA): a one-GPU DDP (nccl, world size 1) recording; the writer stays on the rank's device.
- ``perf``: ResNet-18 steps without recording, with every codec and with ``torch.save`` of the delta per step;
  writer statistics; one profiler trace of recorded steps and how much of the side stream's copying overlaps the
  training stream's kernels; forgetting one sample of a 10-epoch ResNet-18-sized run and the device reduce's GB/s.

Usage::

    bash benchmarks/gpu_check.sh --out bench-out/gpu              # on a GPU machine: under 8 minutes on one H100
    bash benchmarks/gpu_check.sh --cpu --out /tmp/gpu-check-cpu   # every CPU-capable check, under 3 minutes
    python benchmarks/gpu_check.py --device cpu --sections writer_stress failures --out DIR
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_model  # noqa: E402
from deltastore import DeltaStore, WriterError  # noqa: E402
from deltastore.writer import AsyncStepWriter  # noqa: E402

CODECS = ("fp32", "fp16", "bf16", "topk:0.05")
CUDA_ONLY = ("sync_debug", "sanitizer", "ddp")
SECTIONS = ("writer_stress", "recording", "encoders", "reduce", "failures", "sync_debug", "sanitizer", "ddp",
            "perf")


# ---------------------------------------------------------------------------------------------- helpers
def _cuda(device: torch.device) -> bool:
    return device.type == "cuda"


def _stored_streams(store: DeltaStore, step: int) -> dict[str, np.ndarray]:
    """The raw stored streams and side arrays of ``step`` (what a reader decodes), for bit-for-bit comparison."""
    side = store.side_arrays(step)
    out = {s.name: np.array(store.backend.read_range(step, s.name, 0, s.length, side), copy=True)
           for s in store.codec.streams()}
    out.update({f"side:{k}": np.asarray(v) for k, v in side.items() if not k.startswith("crc_")})
    return out


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()


def store_digest(store: DeltaStore) -> str:
    h = hashlib.sha256()
    for step in range(store.num_steps):
        for k, v in sorted(_stored_streams(store, step).items()):
            h.update(k.encode())
            h.update(np.ascontiguousarray(v).view(np.uint8).tobytes())
    return h.hexdigest()


class _DelayedAppender:
    """Wraps the store's step appender with random sleeps, so the writer thread runs late at random moments."""

    def __init__(self, inner, rng: random.Random, max_delay: float):
        self.inner, self.rng, self.max_delay = inner, rng, max_delay

    def _nap(self) -> None:
        time.sleep(self.rng.random() * self.max_delay)

    def write(self, *args):
        self._nap()
        return self.inner.write(*args)

    def commit(self, metadata):
        self._nap()
        return self.inner.commit(metadata)

    def abort(self):
        return self.inner.abort()


def _delay_store(writer: AsyncStepWriter, seed: int, max_delay: float) -> None:
    rng, real = random.Random(seed), writer._begin_step
    writer._begin_step = lambda: _DelayedAppender(real(), rng, max_delay)


def _delta_for(step: int, delta: torch.Tensor, gen: torch.Generator) -> None:
    delta.normal_(generator=gen)
    delta.mul_(10.0 ** -(step % 4))  # magnitudes over decades, as real deltas have


# ---------------------------------------------------------------------------------------------- sections
def writer_stress(device: torch.device, workdir: Path, *, numel: int, steps: int, codecs=CODECS,
                  slots=(1, 2), sleep_cycles: int = 500_000, max_delay: float = 0.002) -> dict:
    """Race stress of the write pipeline; every stored step equals a synchronous replay, bit for bit."""
    results = {}
    chunk = max(64, numel // 16)
    for codec in codecs:
        for n_slots in slots:
            path = workdir / f"stress-{codec.replace(':', '')}-{n_slots}"
            store = DeltaStore.create(path, {"w": torch.zeros(numel)}, codec=codec, chunk_elems=chunk, durable=False)
            chunk_bytes = store.codec.stored_bytes_per_step() // store.codec.num_chunks
            writer = AsyncStepWriter(store, device=device, slots=n_slots, piece_bytes=3 * chunk_bytes)
            _delay_store(writer, seed=n_slots, max_delay=max_delay)
            enc = store.codec.encoder(device)
            delta = torch.empty(numel, device=device)
            gen = torch.Generator(device=device).manual_seed(1234)
            for t in range(steps):
                writer.wait_copy_done()  # the delta buffer itself is the fp32 stream: as the Recorder does
                if _cuda(device):
                    torch.cuda._sleep(sleep_cycles)  # the encode, and so the copy's input, comes late
                _delta_for(t, delta, gen)
                streams, side = enc.encode(delta)
                writer.submit(streams, side, {"ids": np.array([t], np.int64)})
                del streams, side
                if _cuda(device):
                    for _ in range(3):  # churn: freed encoder outputs are handed to new tensors at once
                        torch.empty(numel, device=device).fill_(float("nan"))
            writer.close()
            # the synchronous replay: same generator, a fresh encoder, every output copied at once
            enc, gen = store.codec.encoder(device), torch.Generator(device=device).manual_seed(1234)
            bad = []
            for t in range(steps):
                _delta_for(t, delta, gen)
                streams, side = enc.encode(delta)
                want = {k: _as_numpy(v) for k, v in streams.items()}
                want.update({f"side:{k}": _as_numpy(v) for k, v in side.items()})
                got = _stored_streams(store, t)
                if any(not np.array_equal(got[k].view(np.uint8), np.ascontiguousarray(v).view(np.uint8))
                       for k, v in want.items()):
                    bad.append(t)
            results[f"{codec}/slots={n_slots}"] = {"steps": steps, "mismatched_steps": bad[:20],
                                                   "pieces_per_step": writer.pieces_per_step,
                                                   "submit_wait_s": round(writer.stats["submit_wait_s"], 4)}
            store.close()
    return {"ok": all(not r["mismatched_steps"] for r in results.values()), "runs": results}


def _mlp(device: torch.device, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 512), torch.nn.ReLU(), torch.nn.Linear(512, 512),
                               torch.nn.ReLU(), torch.nn.Linear(512, 10)).to(device)


def _train(device, run_dir: Path | None, codec: str, steps: int, *, sync: bool = False, snapshots: list | None = None,
           piece_elems: int | None = None):
    """A deterministic training (fixed data, Adam), recorded into ``run_dir`` unless it is None."""
    import amnesiac
    model = _mlp(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    data = torch.randn(steps, 32, 64, generator=torch.Generator().manual_seed(7)).to(device)
    options = {"piece_elems": piece_elems} if piece_elems else {}
    rec = amnesiac.Recorder(model, opt, run_dir, codec=codec, durable=False, **options) if run_dir else None
    flat = lambda: torch.cat([v.detach().reshape(-1).float() for v in model.state_dict().values()])  # noqa: E731
    if snapshots is not None:
        snapshots.append(flat().clone())
    for t in range(steps):
        if rec is not None:
            rec.add_batch([t])
        model(data[t]).square().mean().backward()
        opt.step()
        opt.zero_grad()
        if snapshots is not None:
            snapshots.append(flat().clone())  # stays on the device: no host sync inside the loop
        if sync and rec is not None:
            rec.flush()
            if _cuda(device):
                torch.cuda.synchronize(device)
    if rec is not None:
        rec.close()
    return model


def recording(device: torch.device, workdir: Path, *, steps: int, codecs=CODECS) -> dict:
    snaps: list[torch.Tensor] = []
    _train(device, workdir / "exact", "fp32", steps, snapshots=snaps)
    store = DeltaStore.open(workdir / "exact")
    exact_bad = [t for t in range(steps) if not torch.equal(store.read_step(t), (snaps[t + 1] - snaps[t]).cpu())]
    same = {}
    for codec in codecs:
        name = codec.replace(":", "")
        _train(device, workdir / f"async-{name}", codec, steps)
        _train(device, workdir / f"sync-{name}", codec, steps, sync=True)
        same[codec] = (store_digest(DeltaStore.open(workdir / f"async-{name}"))
                       == store_digest(DeltaStore.open(workdir / f"sync-{name}")))
    return {"ok": not exact_bad and all(same.values()), "fp32_mismatched_steps": exact_bad[:20],
            "async_equals_sync": same}


def encoders(device: torch.device, workdir: Path, *, numel: int, steps: int, codecs=CODECS) -> dict:
    """CPU against ``device`` encoders (on the CPU: against themselves, a determinism check)."""
    from deltastore import parse_codec
    out = {}
    for name in codecs:
        codec = parse_codec(name, numel=numel, chunk_elems=max(64, numel // 8))
        cpu_enc, dev_enc = codec.encoder(torch.device("cpu")), codec.encoder(device)
        gen = torch.Generator().manual_seed(3)
        worst, identical = 0.0, True
        for t in range(steps):
            delta = torch.randn(numel, generator=gen) * 10.0 ** -(t % 4)
            a, sa = cpu_enc.encode(delta.clone())
            b, sb = dev_enc.encode(delta.to(device))
            dec_a, dec_b = torch.zeros(numel), torch.zeros(numel)
            codec.accumulate(dec_a, 0, codec.num_chunks, {k: _as_numpy(v) for k, v in a.items()},
                             {k: _as_numpy(v) for k, v in sa.items()})
            codec.accumulate(dec_b, 0, codec.num_chunks, {k: _as_numpy(v) for k, v in b.items()},
                             {k: _as_numpy(v) for k, v in sb.items()})
            identical &= all(np.array_equal(_as_numpy(a[k]), _as_numpy(b[k])) for k in a)
            worst = max(worst, float((dec_a - dec_b).abs().max()))
        # top-k is compared by decoded values: where two magnitudes tie, a GPU may keep the other one
        ok = identical if not name.startswith("topk") else worst <= 1e-5
        out[name] = {"bit_identical": identical, "max_decoded_diff": worst, "ok": ok}
    return {"ok": all(v["ok"] for v in out.values()), "codecs": out}


def reduce_check(device: torch.device, workdir: Path, *, numel: int, steps: int, codecs=CODECS) -> dict:
    """Pipelined reduce (host buffer pool, copies to ``device``) against the threaded CPU reduce, tiny blocks."""
    from deltastore.reduce import reduce_steps
    out = {}
    for name in codecs:
        path = workdir / f"reduce-{name.replace(':', '')}"
        store = DeltaStore.create(path, {"w": torch.zeros(numel)}, codec=name, chunk_elems=64, durable=False)
        enc, gen = store.codec.encoder(torch.device("cpu")), torch.Generator().manual_seed(5)
        for t in range(steps):
            store.append_delta(torch.randn(numel, generator=gen) * 10.0 ** -(t % 3), encoder=enc)
        sel = store.check_steps(range(0, steps, 2))
        want = reduce_steps(store, sel, device=torch.device("cpu"), block_bytes=256).total
        got = reduce_steps(store, sel, device=device, block_bytes=256, max_inflight_bytes=1024, workers=2,
                           pipeline=True).total.cpu()
        out[name] = {"bit_identical": bool(torch.equal(want, got)), "max_diff": float((want - got).abs().max())}
        store.close()
    return {"ok": all(v["bit_identical"] for v in out.values()), "codecs": out}


def _with_timeout(fn, seconds: float):
    box: list = []
    t = threading.Thread(target=lambda: box.append(_capture(fn)), daemon=True)
    t.start()
    t.join(seconds)
    return ("timeout", None) if t.is_alive() else box[0]


def _capture(fn):
    try:
        return "ok", fn()
    except BaseException as e:  # noqa: BLE001 - reported
        return "error", e


def failures(device: torch.device, workdir: Path, *, numel: int = 1 << 14, timeout: float = 60) -> dict:
    out = {}
    # a store that fails at step k: the error reaches the training thread, the k steps before it are committed
    store = DeltaStore.create(workdir / "fail", {"w": torch.zeros(numel)}, durable=False, chunk_elems=1024)
    writer = AsyncStepWriter(store, device=device, slots=1, piece_bytes=4096)
    real, k = writer._begin_step, 3

    def begin():
        if store.num_steps == k:
            raise OSError(28, "No space left on device (injected)")
        return real()

    writer._begin_step = begin

    def record_until_error():
        for t in range(10):
            writer.submit({"data": torch.full((numel,), float(t), device=device)}, {}, {})
        writer.flush()

    kind, value = _with_timeout(record_until_error, timeout)
    close_kind, _ = _with_timeout(writer.close, timeout)
    out["store_fails_at_k"] = {"raised": kind == "error" and isinstance(value, WriterError),
                               "committed": store.num_steps, "close": close_kind}
    out["store_fails_at_k"]["ok"] = (out["store_fails_at_k"]["raised"] and store.num_steps == k
                                     and close_kind == "error")
    store.close()
    # a wrong-shaped submit with one buffer: refused, nothing leaks, close returns
    store = DeltaStore.create(workdir / "shape", {"w": torch.zeros(numel)}, durable=False, chunk_elems=1024)
    writer = AsyncStepWriter(store, device=device, slots=1)
    kind, _ = _with_timeout(lambda: writer.submit({"data": torch.zeros(numel - 1, device=device)}, {}, {}), timeout)
    kind2, _ = _with_timeout(lambda: writer.submit({"data": torch.ones(numel, device=device)}, {}, {}), timeout)
    close_kind, _ = _with_timeout(writer.close, timeout)
    out["wrong_shape_one_slot"] = {"first": kind, "then_valid": kind2, "close": close_kind,
                                   "ok": kind == "error" and kind2 == "ok" and close_kind == "ok"
                                   and store.num_steps == 1}
    store.close()
    return {"ok": all(v["ok"] for v in out.values()), **out}


def sync_debug(device: torch.device, workdir: Path, *, steps: int) -> dict:
    """No hidden host synchronisation while recording steps or reducing on the device."""
    import amnesiac
    from deltastore.reduce import reduce_steps
    out = {}
    for codec in CODECS:
        model = _mlp(device)
        opt = torch.optim.SGD(model.parameters(), lr=1e-2)
        x = torch.randn(32, 64, device=device)
        rec = amnesiac.Recorder(model, opt, workdir / f"sync-{codec.replace(':', '')}", codec=codec, durable=False)
        error = None
        for t in range(steps):
            rec.add_batch([t])
            model(x).square().mean().backward()
            if t >= 1:  # the first step may allocate; every later one must run ahead of the GPU
                torch.cuda.set_sync_debug_mode("error")
            try:
                opt.step()
            except RuntimeError as e:
                error = error or str(e)[:300]
            finally:
                torch.cuda.set_sync_debug_mode("default")
            opt.zero_grad(set_to_none=False)
        rec.close()
        store = DeltaStore.open(workdir / f"sync-{codec.replace(':', '')}")
        torch.cuda.set_sync_debug_mode("error")
        reduce_error = None
        try:
            reduce_steps(store, store.check_steps(range(store.num_steps)), device=device, block_bytes=4096)
        except RuntimeError as e:
            reduce_error = str(e)[:300]
        finally:
            torch.cuda.set_sync_debug_mode("default")
        out[codec] = {"record_sync": error, "reduce_sync": reduce_error, "ok": error is None and reduce_error is None}
    return {"ok": all(v["ok"] for v in out.values()), "codecs": out}


def small(device: torch.device, workdir: Path) -> dict:
    """A small recording + stress run whose digest must not change under the sanitizer or launch blocking."""
    digests = {}
    for codec in CODECS:
        _train(device, workdir / f"small-{codec.replace(':', '')}", codec, 6)
        digests[codec] = store_digest(DeltaStore.open(workdir / f"small-{codec.replace(':', '')}"))
    stress = writer_stress(device, workdir, numel=1 << 14, steps=6, slots=(1,), sleep_cycles=100_000, max_delay=0)
    return {"ok": stress["ok"], "digests": digests, "stress_ok": stress["ok"]}


def sanitizer(device: torch.device, workdir: Path, args) -> dict:
    runs = {}
    for label, env in (("plain", {}), ("sanitizer", {"TORCH_CUDA_SANITIZER": "1"}),
                       ("launch_blocking", {"CUDA_LAUNCH_BLOCKING": "1"})):
        res = _run_section("small", args, workdir / label, extra_env=env)
        runs[label] = {"ok": res.get("ok", False), "digests": res.get("digests"), "error": res.get("error")}
    plain = runs["plain"]["digests"]
    same = all(r["digests"] == plain for r in runs.values())
    return {"ok": same and all(r["ok"] for r in runs.values()), "identical_output": same, "runs": runs}


DDP_CHILD = r"""
import json, os, sys, threading, torch, torch.distributed as dist
sys.path.insert(0, os.environ["GPU_CHECK_DIR"])
import gpu_check
from deltastore import DeltaStore
rank_dev = torch.device("cuda", torch.cuda.device_count() - 1)
torch.cuda.set_device(rank_dev)
dist.init_process_group("nccl", init_method="tcp://127.0.0.1:" + os.environ["PORT"], rank=0, world_size=1)
import amnesiac
model = torch.nn.parallel.DistributedDataParallel(gpu_check._mlp(rank_dev), device_ids=[rank_dev.index])
opt = torch.optim.SGD(model.parameters(), lr=1e-2)
seen = []
rec = amnesiac.Recorder(model, opt, os.environ["RUN"], durable=False)
real = rec._writer._begin_step
rec._writer._begin_step = lambda: (seen.append(torch.cuda.current_device()), real())[1]
for t in range(5):
    rec.add_batch([t])
    model(torch.randn(8, 64, device=rank_dev)).sum().backward()
    opt.step(); opt.zero_grad()
rec.close()
others = [i for i in range(torch.cuda.device_count()) if i != rank_dev.index and torch.cuda.memory_reserved(i)]
print(json.dumps({"steps": DeltaStore.open(os.environ["RUN"]).num_steps, "writer_devices": sorted(set(seen)),
                  "rank_device": rank_dev.index, "memory_on_other_devices": others}))
dist.destroy_process_group()
"""


def ddp(device: torch.device, workdir: Path, *, timeout: float = 120) -> dict:
    env = dict(os.environ, GPU_CHECK_DIR=str(Path(__file__).resolve().parent), PORT=str(29500 + os.getpid() % 1000),
               RUN=str(workdir / "ddp-run"))
    proc = subprocess.run([sys.executable, "-c", DDP_CHILD], capture_output=True, text=True, env=env,
                          timeout=timeout)
    if proc.returncode != 0:
        return {"ok": False, "error": proc.stderr[-1500:]}
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["ok"] = (res["steps"] == 5 and res["writer_devices"] == [res["rank_device"]]
                 and not res["memory_on_other_devices"])
    return res


def perf(device: torch.device, workdir: Path, *, batch: int, steps: int, warmup: int, image: int,
         unlearn_steps_per_epoch: int, unlearn_numel: int = 11_173_962) -> dict:
    """ResNet-18 training step times: no recording, each codec, torch.save of the delta per step; a profiler
    trace; the device reduce's throughput and the time to forget one sample of a 10-epoch run."""
    import torchvision
    import amnesiac
    out: dict = {"batch": batch, "image": image, "steps": steps}
    sync = (lambda: torch.cuda.synchronize(device)) if _cuda(device) else (lambda: None)
    x = torch.randn(batch, 3, image, image, device=device)
    y = torch.randint(0, 100, (batch,), device=device)

    def timed(variant: str) -> dict:
        torch.manual_seed(0)
        model = torchvision.models.resnet18(num_classes=100).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        rec, prev, stats = None, None, {}
        if variant in CODECS:
            rec = amnesiac.Recorder(model, opt, workdir / f"perf-{variant.replace(':', '')}", codec=variant,
                                    durable=False)
        elif variant == "torch_save":
            prev = torch.cat([v.detach().reshape(-1).float() for v in model.state_dict().values()])
        times = []
        for t in range(warmup + steps):
            sync()
            t0 = time.perf_counter()
            if rec is not None:
                rec.add_batch(list(range(t * batch, (t + 1) * batch)))
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=False)
            if prev is not None:
                now = torch.cat([v.detach().reshape(-1).float() for v in model.state_dict().values()])
                torch.save(now - prev, workdir / "torch-save-step.pt")
                prev = now
            sync()
            times.append(time.perf_counter() - t0)
        if rec is not None:
            t0 = time.perf_counter()
            rec.flush()
            flush_s = time.perf_counter() - t0
            stats = dict(rec._writer.stats, flush_s=flush_s)
            rec.close()
        return {"step_s": statistics.median(times[warmup:]), "writer": stats}

    variants = {v: timed(v) for v in ("none", *CODECS, "torch_save")}
    base = variants["none"]["step_s"]
    for v in variants.values():
        v["overhead"] = v["step_s"] / base - 1
    out["variants"] = variants
    out["trace"] = _profile(device, workdir, x, y)
    out["unlearn"] = _unlearn_timing(device, workdir, unlearn_steps_per_epoch, unlearn_numel)
    out["ok"] = True
    return out


def _profile(device: torch.device, workdir: Path, x, y) -> dict:
    """One profiler trace of three recorded fp16 steps; how much side-stream copying overlaps training kernels."""
    import torchvision
    import amnesiac
    from torch.profiler import ProfilerActivity, profile
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=100).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    rec = amnesiac.Recorder(model, opt, workdir / "trace-run", codec="fp16", durable=False)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if _cuda(device) else [])

    def step():
        rec.add_batch([0])
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=False)

    step()
    with profile(activities=activities) as prof:
        for _ in range(3):
            step()
        if _cuda(device):
            torch.cuda.synchronize(device)
    rec.close()
    trace = workdir / "trace.json"
    prof.export_chrome_trace(str(trace))
    events = json.loads(trace.read_text()).get("traceEvents", [])
    kernels = [(e["ts"], e["ts"] + e.get("dur", 0), e.get("tid")) for e in events if e.get("cat") == "kernel"]
    copies = [(e["ts"], e["ts"] + e.get("dur", 0), e.get("tid")) for e in events
              if e.get("cat") == "gpu_memcpy" and "DtoH" in e.get("name", "")]
    overlap = sum(max(0, min(c1, k1) - max(c0, k0)) for c0, c1, ct in copies for k0, k1, kt in kernels if kt != ct)
    copy_time = sum(c1 - c0 for c0, c1, _ in copies)
    return {"file": trace.name, "copy_us": copy_time, "copy_streams": sorted({str(c[2]) for c in copies}),
            "kernel_streams": sorted({str(k[2]) for k in kernels})[:8],
            "overlap_fraction": (overlap / copy_time) if copy_time else None}


def _unlearn_timing(device: torch.device, workdir: Path, steps_per_epoch: int, numel: int = 11_173_962) -> dict:
    """A ResNet-18-sized fp16 run of 10 epochs; forget one sample (one step per epoch), warm; reduce GB/s."""
    epochs = 10
    store = DeltaStore.create(workdir / "unlearn-run", {"w": torch.zeros(numel)}, codec="fp16", durable=False)
    enc, gen = store.codec.encoder(device), torch.Generator(device=device).manual_seed(0)
    delta = torch.empty(numel, device=device)
    writer = AsyncStepWriter(store, device=device)
    for t in range(epochs * steps_per_epoch):
        delta.normal_(generator=gen).sign_().mul_(1e-3)
        writer.submit(*enc.encode(delta), {"ids": np.array([t % steps_per_epoch], np.int64)})
    writer.close()
    store.finalize({"w": torch.zeros(numel)}, enc.residual.detach().cpu() if enc.residual is not None else None)
    store = DeltaStore.open(workdir / "unlearn-run")
    undo = np.arange(3, epochs * steps_per_epoch, steps_per_epoch)  # sample 3's step in every epoch
    timings = []
    for _ in range(3):
        t0 = time.perf_counter()
        store.state_without(undo, device=device)
        timings.append(time.perf_counter() - t0)
    from deltastore.reduce import reduce_steps
    all_steps = store.check_steps(range(store.num_steps))
    reduce_steps(store, all_steps, device=device)  # warm the page cache
    res = reduce_steps(store, all_steps, device=device)
    return {"steps": store.num_steps, "forget_one_sample_s": min(timings[1:]),
            "reduce_gb_s_warm": res.raw_fp32_bytes / res.seconds / 1e9}


# ---------------------------------------------------------------------------------------------- driver
def run_section(name: str, device: torch.device, workdir: Path, args) -> dict:
    big = _cuda(device)
    if name in CUDA_ONLY and not big:
        return {"skipped": "needs a CUDA device"}
    if name == "writer_stress":
        return writer_stress(device, workdir, numel=(1 << 22) if big else (1 << 15), steps=40 if big else 12)
    if name == "recording":
        return recording(device, workdir, steps=20 if big else 6)
    if name == "encoders":
        return encoders(device, workdir, numel=(1 << 20) if big else (1 << 14), steps=8 if big else 4)
    if name == "reduce":
        return reduce_check(device, workdir, numel=5000, steps=12)
    if name == "failures":
        return failures(device, workdir)
    if name == "sync_debug":
        return sync_debug(device, workdir, steps=5)
    if name == "small":
        return small(device, workdir)
    if name == "sanitizer":
        return sanitizer(device, workdir, args)
    if name == "ddp":
        return ddp(device, workdir)
    if name == "perf":
        if big:
            return perf(device, workdir, batch=256, steps=20, warmup=5, image=32, unlearn_steps_per_epoch=20)
        return perf(device, workdir, batch=4, steps=1, warmup=1, image=16, unlearn_steps_per_epoch=1,
                    unlearn_numel=1 << 18)
    raise ValueError(f"unknown section {name!r}; choose from {', '.join(SECTIONS)}")


def _run_section(name: str, args, out_dir: Path, extra_env: dict | None = None) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    result_file = out_dir / "result.json"
    env = dict(os.environ, **(extra_env or {}))
    env.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    cmd = [sys.executable, __file__, "--child", name, "--device", args.device, "--out", str(out_dir)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.section_timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {args.section_timeout} s", "seconds": args.section_timeout}
    res = json.loads(result_file.read_text()) if result_file.is_file() else \
        {"ok": False, "error": f"exit {proc.returncode}: {proc.stderr[-2000:]}"}
    res["seconds"] = round(time.perf_counter() - t0, 1)
    return res


def child_main(name: str, device: torch.device, out_dir: Path, args) -> int:
    torch.use_deterministic_algorithms(True, warn_only=True)
    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        try:
            res = run_section(name, device, Path(work), args)
        except BaseException as e:  # noqa: BLE001 - reported as this section's failure
            import traceback
            res = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
        trace = Path(work) / "trace.json"
        if trace.is_file():
            trace.replace(out_dir / "trace.json")
    (out_dir / "result.json").write_text(json.dumps(res, indent=1, default=str))
    return 0


def machine(device: torch.device) -> dict:
    info = {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__, "device": str(device)}
    if _cuda(device):
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    names = list(report["sections"])
    colors = ["tab:gray" if "skipped" in report["sections"][n] else
              ("tab:green" if report["sections"][n].get("ok") else "tab:red") for n in names]
    ax1.barh(names, [report["sections"][n].get("seconds", 0) for n in names], color=colors)
    ax1.set_xlabel("seconds (green passed, red failed, grey skipped)")
    perf_res = report["sections"].get("perf", {})
    variants = perf_res.get("variants", {})
    if variants:
        ax2.bar(list(variants), [100 * v["overhead"] for v in variants.values()])
        ax2.set_ylabel("step time overhead vs no recording (%)")
        ax2.set_title(f"ResNet-18, batch {perf_res.get('batch')}")
        ax2.tick_params(axis="x", rotation=30)
    fig.suptitle(f"gpu_check on {report['machine'].get('gpu', report['machine']['cpu'])}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench-out/gpu-check"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    p.add_argument("--section-timeout", type=float, default=240)
    p.add_argument("--workdir", default=None, help="where runs are written (default: the system's temp dir)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.child:
        return child_main(args.child, device, args.out, args)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"benchmark": "gpu_check", "machine": machine(device), "sections": {},
              "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    for name in args.sections:
        if name in CUDA_ONLY and not _cuda(device):
            report["sections"][name] = {"skipped": "needs a CUDA device"}
        else:
            report["sections"][name] = _run_section(name, args, args.out / name)
        res = report["sections"][name]
        state = "skipped" if "skipped" in res else ("ok" if res.get("ok") else "FAILED")
        print(f"{name:>14}: {state:>7} {res.get('seconds', '')} {res.get('error', '')[:300]}", flush=True)
    report["ok"] = all(r.get("ok") for r in report["sections"].values() if "skipped" not in r)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    plot(report, args.out / "gpu_check.png")
    print(f"{'all checks passed' if report['ok'] else 'SOME CHECKS FAILED'}; wrote {args.out / 'gpu_check.json'}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
