"""Recording benchmark: what recording every optimizer step costs the training loop, host memory and the disk.

In one run, per codec (fp32, fp16, bf16, topk:0.01) and workload (an MLP on real MNIST digits, a ResNet-18 on
CIFAR-shaped batches), it times a training step without recording and with each way of recording:

- ``recorder``: ``amnesiac.Recorder`` (asynchronous writer, zarr store, fsync per step, the default);
- ``recorder_nodurable``: the same with ``durable=False`` (no fsync; survives a killed process, not power loss);
- ``list``: the seed's approach, every encoded delta cloned into a Python list (memory grows without bound);
- ``torch_save``: ``torch.save`` of the encoded delta, one file per step, synchronously (no fsync);
- ``torch_save_fsync``: the same, fsynced (as durable as ``recorder``);
- ``safetensors``: ``safetensors.torch.save_file`` per step, synchronously (no fsync).

Every peer encodes with the same codec on the same device, so a codec's row compares only how the step is kept.
It also measures bytes on disk per step on real-data deltas (MNIST; never random noise), the blosc compressor
settings on those deltas, the writer's sustained throughput, and the disk's raw sequential write bandwidth (write +
fsync of a large file) in the same run, and names the machine. Output: a table on stdout, ``record.json`` and
``record.png`` in ``--out``.

Usage::

    python benchmarks/record.py --out bench-out/record          # full run: a few minutes on 2 CPU cores
    python benchmarks/record.py --smoke --out /tmp/record-smoke # seconds: every code path, tiny sizes
    python benchmarks/record.py --device cuda --resnet-batch 256 --out bench-out/record-gpu

Timings are medians over steps; "effective" step time adds the time the final flush took, spread over the timed
steps, so a writer that falls behind cannot hide its backlog. Peak host memory is the process's VmHWM (reset
through /proc/self/clear_refs before each variant) minus its resident size when the variant started.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import check_codecs, check_names, cpu_model, one_line_parser  # noqa: E402
from deltastore.backends import directory_bytes  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MNIST = REPO.parent / "shared" / "data" / "mnist10k.npz"
CODECS = ("fp32", "fp16", "bf16", "topk:0.01")
VARIANTS = ("none", "recorder", "recorder_nodurable", "list", "torch_save", "torch_save_fsync", "safetensors")
TARGETS_DISK = {"fp32": 0.70, "fp16": 0.36, "bf16": 0.40, "topk:0.01": 0.02}


# ---------------------------------------------------------------------------------------------- machine, memory
def machine_info(workdir: Path) -> dict:
    import torch
    cpu = cpu_model()
    # nothing here may run a tensor operation or touch CUDA: children are forked from this process
    info = {"cpu": cpu, "logical_cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
            "python": platform.python_version(),
            "torch": torch.__version__, "platform": platform.platform(), "workdir": str(workdir),
            "mem_total_gib": round(_status_kib("MemTotal", "/proc/meminfo") / 2 ** 20, 1),
            "filesystem": _filesystem_of(workdir)}
    try:
        import numcodecs
        import zarr
        info.update(zarr=zarr.__version__, numcodecs=numcodecs.__version__)
    except ImportError:
        pass
    return info


def _filesystem_of(path: Path) -> str:
    best = ("", "?", "?")
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mnt, fs = line.split()[:3]
            if str(path.resolve()).startswith(mnt) and len(mnt) > len(best[0]):
                best = (mnt, dev, fs)
    except OSError:
        pass
    return f"{best[1]} ({best[2]}) at {best[0]}"


def _status_kib(key: str, path: str = "/proc/self/status") -> int:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def loadavg() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


class PeakMemory:
    """Peak resident memory of this process while a block runs, above its resident size at the start (MiB)."""

    def __enter__(self):
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
            self.method = "VmHWM after clear_refs"
        except OSError:
            self.method = "VmHWM (not resettable: an upper bound)"
        self.start = _status_kib("VmRSS")
        return self

    def __exit__(self, *exc):
        self.peak_mib = max(0, _status_kib("VmHWM") - self.start) / 1024


def raw_write_bandwidth(workdir: Path, nbytes: int, block: int = 8 << 20) -> float:
    """Sequential write of ``nbytes`` of incompressible data plus fsync, in MB/s (the physical limit)."""
    buf = os.urandom(block)
    path = workdir / "raw-bandwidth.bin"
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        written = 0
        while written < nbytes:
            written += os.write(fd, buf)
        os.fsync(fd)
    finally:
        os.close(fd)
    seconds = time.perf_counter() - t0
    path.unlink()
    return written / seconds / 1e6


# ---------------------------------------------------------------------------------------------- workloads
@dataclass
class Workload:
    name: str
    model_fn: object
    optimizer_fn: object
    batches: list  # (x, y, ids) on the device
    warmup: int
    timed: int
    description: str


def mnist_mlp(args, device) -> Workload:
    import torch
    from amnesiac.data import load_dataset
    from amnesiac.models import mlp
    path = Path(args.mnist)
    if path.is_file():
        bundle, data = load_dataset("npz", path=path), f"MNIST, {path.name} (real digits)"
    else:  # still real handwritten digits, never noise
        bundle, data = load_dataset("digits"), f"scikit-learn digits ({path} is missing)"
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(bundle.train), generator=g)
    n = args.mlp_warmup + max(args.mlp_steps, args.disk_steps)
    batches = []
    for i in range(n):
        idx = order[(i * 64) % (len(order) - 64):][:64]
        x, y, ids = bundle.train[idx]
        batches.append((x.to(device), y.to(device), ids))
    shape = bundle.input_shape
    return Workload("mlp-mnist", lambda: mlp(shape, bundle.num_classes).to(device),
                    lambda m: torch.optim.Adam(m.parameters(), lr=1e-3), batches, args.mlp_warmup, args.mlp_steps,
                    f"MLP {shape}->128->64->{bundle.num_classes}, Adam lr 1e-3, batch 64, {data}")


def cifar_resnet(args, device) -> Workload:
    import torch
    from amnesiac.models import resnet18
    g = torch.Generator().manual_seed(0)
    b, s = args.resnet_batch, args.resnet_image
    batches = [(torch.randn(b, 3, s, s, generator=g).to(device), torch.randint(0, 100, (b,), generator=g).to(device),
                torch.arange(i * b, (i + 1) * b)) for i in range(args.resnet_warmup + args.resnet_steps)]
    return Workload("resnet18-cifar", lambda: resnet18(3, 100).to(device),
                    lambda m: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9), batches, args.resnet_warmup,
                    args.resnet_steps, f"ResNet-18 (CIFAR stem, 100 classes), SGD momentum 0.9, batch {b} of "
                                       f"random {s}x{s}x3 images")


# ---------------------------------------------------------------------------------------------- recording variants
class Peer:
    """The peers' common part: the flat delta after each step, encoded like ours, then kept ``how``."""

    def __init__(self, how: str, model, codec: str, workdir: Path):
        import torch
        from deltastore.codecs import parse_codec
        from deltastore.layout import TensorLayout
        self.how, self.model, self.dir = how, model, workdir
        state = model.state_dict()
        self.layout = TensorLayout.from_tensors(state)
        self.device = next(model.parameters()).device
        self.prev = self.layout.flatten(state, out=torch.empty(self.layout.numel, device=self.device))
        self.delta = torch.empty_like(self.prev)
        self.encoder = parse_codec(codec, numel=self.layout.numel, chunk_elems=1 << 20).encoder(self.device)
        self.kept: list = []
        self.ids = None
        self.step = 0
        workdir.mkdir(parents=True, exist_ok=True)

    def add_batch(self, ids, labels):
        self.ids = ids

    def after_step(self):
        import torch
        state = self.model.state_dict()
        with torch.no_grad():
            for e in self.layout.entries:
                now = state[e.name].reshape(-1)
                torch.sub(now, self.prev[e.offset:e.offset + e.numel], out=self.delta[e.offset:e.offset + e.numel])
                self.prev[e.offset:e.offset + e.numel].copy_(now)
            streams, side = self.encoder.encode(self.delta)
        payload = {**streams, **{f"side_{k}": v for k, v in side.items()}, "ids": torch.as_tensor(self.ids)}
        if self.how == "list":  # the seed: clone every delta into a list (on the training device)
            self.kept.append({k: v.clone() for k, v in payload.items()})
        elif self.how.startswith("torch_save"):
            with open(self.dir / f"step-{self.step:07d}.pt", "wb") as f:
                torch.save(payload, f)
                if self.how == "torch_save_fsync":
                    f.flush()
                    os.fsync(f.fileno())
        else:
            from safetensors.torch import save_file
            save_file({k: v.detach().contiguous().cpu() for k, v in payload.items()},
                      str(self.dir / f"step-{self.step:07d}.safetensors"))
        self.step += 1

    def sync(self):
        pass

    def disk_bytes(self) -> int:
        return directory_bytes(self.dir)

    def memory_bytes(self) -> int:
        return sum(v.numel() * v.element_size() for d in self.kept for v in d.values())

    def close(self):
        self.kept.clear()


class Ours:
    def __init__(self, model, optimizer, codec: str, workdir: Path, durable: bool):
        import amnesiac
        self.rec = amnesiac.Recorder(model, optimizer, workdir, codec=codec, durable=durable)
        self.dir = workdir

    def add_batch(self, ids, labels):
        self.rec.add_batch(ids, labels=labels)

    def after_step(self):
        pass  # the optimizer step post-hook did it

    def sync(self):
        self.rec.flush()

    def disk_bytes(self) -> int:
        return directory_bytes(self.dir / "deltas")

    def memory_bytes(self) -> int:
        return 0

    def stats(self) -> dict:
        return dict(self.rec._writer.stats, slots=self.rec._writer.num_slots, slot_bytes=self.rec._writer.slot_bytes)

    def close(self):
        self.rec.close()


class NoRecording:
    def add_batch(self, ids, labels):
        pass

    def after_step(self):
        pass

    def sync(self):
        pass

    def disk_bytes(self) -> int:
        return 0

    def memory_bytes(self) -> int:
        return 0

    def close(self):
        pass


def _sync_device(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_variant(w: Workload, codec: str, variant: str, workdir: Path, device, profile_to: Path | None = None) -> dict:
    """Train ``w.warmup`` + ``w.timed`` steps with one way of recording; returns timings, memory and bytes."""
    import torch
    torch.manual_seed(0)
    model = w.model_fn()
    opt = w.optimizer_fn(model)
    loss_fn = torch.nn.CrossEntropyLoss()
    run_dir = workdir / f"{w.name}-{codec.replace(':', '')}-{variant}"
    with PeakMemory() as mem:
        if variant == "none":
            sink = NoRecording()
        elif variant.startswith("recorder"):
            sink = Ours(model, opt, codec, run_dir, durable=variant == "recorder")
        else:
            sink = Peer(variant, model, codec, run_dir)
        steps, fwd_bwd, opt_step = [], [], []
        cpu0 = wall0 = 0.0
        profiler = None
        for i, (x, y, ids) in enumerate(w.batches[:w.warmup + w.timed]):
            if i == w.warmup:
                sink.sync()  # the warm-up steps' writes do not spill into the timed window
                _sync_device(device)
                cpu0, wall0 = time.process_time(), time.perf_counter()
                if profile_to is not None:
                    import cProfile
                    profiler = cProfile.Profile()
                    profiler.enable()
            t0 = time.perf_counter()
            sink.add_batch(ids, y)
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            _sync_device(device)
            t1 = time.perf_counter()
            opt.step()
            sink.after_step()
            _sync_device(device)
            t2 = time.perf_counter()
            if i >= w.warmup:
                steps.append(t2 - t0)
                fwd_bwd.append(t1 - t0)
                opt_step.append(t2 - t1)
        t_drain = time.perf_counter()
        sink.sync()
        _sync_device(device)
        drain = time.perf_counter() - t_drain
        if profiler is not None:
            profiler.disable()
            import pstats
            with open(profile_to, "w") as f:
                pstats.Stats(profiler, stream=f).sort_stats("cumulative").print_stats(30)
        wall = time.perf_counter() - wall0
        cpu = time.process_time() - cpu0
        in_memory = sink.memory_bytes()
        writer = sink.stats() if isinstance(sink, Ours) else None
        disk = sink.disk_bytes()
        t_close = time.perf_counter()
        sink.close()
        close_s = time.perf_counter() - t_close
    n_steps = w.warmup + w.timed
    step = statistics.median(steps)
    out = {"codec": codec, "variant": variant, "steps_timed": len(steps), "step_s": step,
           "step_s_all": [round(s, 5) for s in steps], "fwd_bwd_s": statistics.median(fwd_bwd),
           "opt_step_s": statistics.median(opt_step), "drain_s_per_step": drain / len(steps),
           "effective_step_s": step + drain / len(steps), "wall_s_per_step": wall / len(steps),
           "cpu_s_per_step": cpu / len(steps), "close_s": close_s, "peak_mib": mem.peak_mib,
           "peak_method": mem.method, "disk_bytes_per_step": disk / n_steps if disk else 0.0,
           "memory_bytes_per_step": in_memory / n_steps if in_memory else 0.0}
    if writer is not None:
        out["writer"] = {k: (v / n_steps if k.endswith("_s") else v) for k, v in writer.items()}
    shutil.rmtree(run_dir, ignore_errors=True)
    return out


# ---------------------------------------------------------------------------------------------- disk ratio, study
def record_real_deltas(w: Workload, codec: str, steps: int, workdir: Path, keep_every: int = 0):
    """Record ``steps`` real-data steps with the Recorder; returns its store info (and sampled fp32 deltas)."""
    import torch
    import amnesiac
    from deltastore import DeltaStore
    torch.manual_seed(0)
    model = w.model_fn()
    opt = w.optimizer_fn(model)
    loss_fn = torch.nn.CrossEntropyLoss()
    run_dir = workdir / f"disk-{w.name}-{codec.replace(':', '')}"
    sampled = []
    with amnesiac.Recorder(model, opt, run_dir, codec=codec, durable=False) as rec:
        prev = rec.layout.flatten(model.state_dict()).cpu()
        for i, (x, y, ids) in enumerate(w.batches[:steps]):
            rec.add_batch(ids, labels=y)
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            opt.step()
            if keep_every and i % keep_every == keep_every - 1:
                now = rec.layout.flatten(model.state_dict()).cpu()
                sampled.append(now - prev)
            if keep_every:
                prev = rec.layout.flatten(model.state_dict()).cpu()
    info = DeltaStore.open(run_dir).info()
    shutil.rmtree(run_dir, ignore_errors=True)
    raw = info["elements"] * 4
    return {"steps": info["steps"], "bytes_per_step": info["delta_bytes"] / info["steps"],
            "raw_fp32_bytes_per_step": raw, "ratio": info["ratio"], "codec_error": info["codec_error"],
            "target": TARGETS_DISK.get(codec)}, sampled


def compressor_study(deltas, repeats: int) -> list[dict]:
    """Blosc settings on the encoded streams of real deltas: ratio to raw fp32 and single-thread MB/s."""
    import numcodecs.blosc as nb
    import torch
    from numcodecs import Blosc
    from deltastore.codecs import parse_codec
    nb.use_threads = False  # as inside zarr
    n = deltas[0].numel()
    settings = [("zstd", lvl, sh, bs) for lvl in (1, 3, 5) for sh in ("shuffle", "bitshuffle")
                for bs in (0, 1 << 20)] + [("lz4", lvl, sh, 0) for lvl in (1, 5) for sh in ("shuffle", "bitshuffle")]
    shuffles = {"shuffle": Blosc.SHUFFLE, "bitshuffle": Blosc.BITSHUFFLE}
    rows = []
    for codec in ("fp32", "fp16", "bf16"):
        enc = parse_codec(codec, numel=n, chunk_elems=1 << 20).encoder(torch.device("cpu"))
        arrays = []
        for d in deltas:
            data = enc.encode(d)[0]["data"]
            arrays.append(data.numpy().copy())
        for cname, clevel, shuffle, block in settings:
            comp = Blosc(cname=cname, clevel=clevel, shuffle=shuffles[shuffle], blocksize=block)
            best = math.inf
            for _ in range(repeats):
                t0 = time.perf_counter()
                size = sum(len(comp.encode(a)) for a in arrays)
                best = min(best, time.perf_counter() - t0)
            rows.append({"stream": codec, "cname": cname, "clevel": clevel, "shuffle": shuffle,
                         "blocksize": block or "auto", "ratio_raw_fp32": size / (len(arrays) * n * 4),
                         "MBps": sum(a.nbytes for a in arrays) / best / 1e6})
    return rows


def writer_throughput(w: Workload, codec: str, steps: int, workdir: Path, device) -> dict:
    """Pre-encoded real deltas of ``w`` pushed through the Recorder's store and writer as fast as they go."""
    import torch
    from deltastore import DeltaStore
    from deltastore.writer import AsyncStepWriter
    torch.manual_seed(0)
    model = w.model_fn()
    opt = w.optimizer_fn(model)
    state0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    store = DeltaStore.create(workdir / f"tp-{w.name}-{codec.replace(':', '')}", state0, codec=codec, durable=True)
    layout = store.layout
    prev = layout.flatten(state0, out=torch.empty(layout.numel, device=device))
    enc = store.codec.encoder(device)
    encoded = []
    loss_fn = torch.nn.CrossEntropyLoss()
    for x, y, ids in w.batches[:min(steps, 3)]:  # a few real deltas, reused cyclically
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()
        now = layout.flatten(model.state_dict(), out=torch.empty(layout.numel, device=device))
        encoded.append(enc.encode(now - prev))
        prev = now
    writer = AsyncStepWriter(store, device=device)
    _sync_device(device)
    t0 = time.perf_counter()
    for i in range(steps):
        streams, side = encoded[i % len(encoded)]
        writer.submit(streams, side, {"ids": np.zeros(64, np.int64)})
    writer.close()
    seconds = time.perf_counter() - t0
    disk = directory_bytes(store.path / "deltas")
    store.close()
    shutil.rmtree(store.path, ignore_errors=True)
    return {"steps": steps, "seconds": seconds, "stored_MBps": disk / seconds / 1e6,
            "input_fp32_MBps": steps * layout.numel * 4 / seconds / 1e6, "stored_bytes_per_step": disk / steps,
            "write_s_per_step": writer.stats["write_s"] / steps}


# ---------------------------------------------------------------------------------------------- report
def print_table(result: dict) -> None:
    m = result["machine"]
    print(f"\nmachine: {m['cpu']}, {m['usable_cores']} usable cores, torch {m['torch']} with {m['torch_threads']} "
          f"threads; disk {m['filesystem']}; load average {result['loadavg_start']} -> {result['loadavg_end']}")
    print(f"raw sequential write (write+fsync of {result['disk']['bytes'] >> 20} MiB): "
          + ", ".join(f"{v:.0f}" for v in result["disk"]["raw_write_MBps"]) + " MB/s")
    for name, wl in result["workloads"].items():
        print(f"\n{name}: {wl['description']}; {wl['elements']:,} floats, {wl['raw_fp32_bytes_per_step'] / 2**20:.2f} "
              f"MiB raw fp32 per step; no recording: {wl['baseline_step_s'] * 1e3:.1f} ms/step (median)")
        print(f"{'codec':10s} {'variant':19s} {'step ms':>8s} {'eff ms':>8s} {'overhead':>8s} {'hook ms':>8s} "
              f"{'peak MiB':>8s} {'disk/step':>10s} {'vs fp32':>7s}")
        for r in wl["results"]:
            per_step = r["disk_bytes_per_step"] or r["memory_bytes_per_step"]
            where = "" if r["disk_bytes_per_step"] else (" mem" if r["memory_bytes_per_step"] else "")
            print(f"{r['codec']:10s} {r['variant']:19s} {r['step_s'] * 1e3:8.1f} {r['effective_step_s'] * 1e3:8.1f} "
                  f"{r['overhead']:8.3f} {r['hook_ms']:8.1f} {r['peak_mib']:8.1f} {_size(per_step):>10s}{where:4s}"
                  f"{(per_step / wl['raw_fp32_bytes_per_step']) if per_step else 0:7.3f}")
        if wl.get("disk_ratio"):
            print(f"disk on real-data deltas ({name}, Recorder, zarr):")
            for codec, d in wl["disk_ratio"].items():
                tgt = d["target"]
                print(f"  {codec:10s} {d['steps']:4d} steps  {_size(d['bytes_per_step']):>10s}/step  ratio {d['ratio']:.4f}"
                      + (f"  target <= {tgt}: {'met' if d['ratio'] <= tgt else 'MISSED'}" if tgt else ""))
        for codec, t in wl.get("throughput", {}).items():
            print(f"  writer throughput {codec:10s}: {t['stored_MBps']:8.1f} MB/s to disk, {t['input_fp32_MBps']:8.1f} "
                  f"MB/s of fp32 deltas in ({t['stored_MBps'] / result['disk']['raw_MBps']:.1%} of raw disk)")
    for name, wl in result["workloads"].items():
        if not wl.get("compressor_study"):
            continue
        print(f"\nblosc on {wl['compressor_study_steps']} real {name} deltas (ratio to raw fp32, single-thread MB/s):")
        for r in wl["compressor_study"]:
            print(f"  {r['stream']:5s} {r['cname']:4s} L{r['clevel']} {r['shuffle']:10s} block {str(r['blocksize']):>7s}"
                  f"  {r['ratio_raw_fp32']:.4f}  {r['MBps']:7.0f} MB/s")
    print("\ntargets:")
    for t in result["targets"]:
        print(f"  {t['name']:60s} {t['value']:.3f} (limit {t['limit']}) {'met' if t['met'] else 'MISSED'}")


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1024
    return ""


VARIANT_LABELS = {"recorder": "amnesiac Recorder (fsync per step)", "recorder_nodurable": "Recorder, no fsync",
                  "list": "deltas kept in a Python list", "torch_save": "torch.save per step",
                  "torch_save_fsync": "torch.save + fsync per step", "safetensors": "safetensors file per step"}


def plot(result: dict, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    except ImportError:
        return False
    names = list(result["workloads"])
    fig, axes = plt.subplots(1, len(names) + 1, figsize=(6 * (len(names) + 1), 5.2))
    variants = [v for v in VARIANTS if v != "none"]
    for ax, name in zip(axes, names):
        wl = result["workloads"][name]
        codecs = list(dict.fromkeys(r["codec"] for r in wl["results"]))
        width = 0.8 / len(variants)
        for j, v in enumerate(variants):
            vals = [next((r["overhead"] for r in wl["results"] if r["codec"] == c and r["variant"] == v), math.nan)
                    for c in codecs]
            ax.bar([i + (j - (len(variants) - 1) / 2) * width for i in range(len(codecs))], vals, width,
                   label=VARIANT_LABELS.get(v, v))
        ax.axhline(1.0, color="k", lw=0.8, linestyle="--", label="no recording (1x)")
        # the slowest peers are hundreds of times slower than training alone: a log axis keeps the rest readable
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(range(len(codecs)), codecs)
        ax.set_xlabel("delta codec")
        ax.set_ylabel("step time / step time without recording")
        ax.set_title(f"{name}: recording overhead (lower is better)", fontsize=10)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    ax = axes[-1]
    disk = next((wl["disk_ratio"] for wl in result["workloads"].values() if wl.get("disk_ratio")), {})
    ratios = [d["ratio"] for d in disk.values()]
    ax.bar(list(disk), ratios, color="tab:green", label="measured")
    for i, (c, r) in enumerate(zip(disk, ratios)):  # the value above both the bar and its target marker
        ax.text(i, max(r, TARGETS_DISK.get(c, 0)) + 0.01, f"{r:.2f}", ha="center", va="bottom", fontsize=8)
    ax.scatter(list(disk), [TARGETS_DISK.get(c, math.nan) for c in disk], color="r", marker="_", s=400,
               label="target (at most)")
    ax.set_xlabel("delta codec")
    ax.set_ylabel("bytes on disk / raw fp32 bytes")
    ax.set_title("disk per step, real MNIST deltas", fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    fig.suptitle(f"Recording cost on {result['machine']['cpu']} ({result['machine']['usable_cores']} cores)",
                 fontsize=11)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def targets(result: dict) -> list[dict]:
    out = []
    res = result["workloads"].get("resnet18-cifar")
    if res:
        by = {(r["codec"], r["variant"]): r for r in res["results"]}
        if ("fp16", "recorder") in by:
            ours = by[("fp16", "recorder")]
            out.append({"name": "ResNet-18 fp16 recorder overhead (effective step / no recording - 1)",
                        "value": ours["overhead"] - 1, "limit": 0.15, "met": ours["overhead"] - 1 <= 0.15})
            for peer_name in ("torch_save", "torch_save_fsync"):
                if ("fp16", peer_name) not in by:
                    continue
                peer = by[("fp16", peer_name)]
                factor = (peer["overhead"] - 1) / max(ours["overhead"] - 1, 1e-3)
                out.append({"name": f"ResNet-18 fp16: {peer_name} overhead / recorder overhead", "value": factor,
                            "limit": ">= 3", "met": factor >= 3})
            peer = by.get(("fp32", "torch_save"))
            if peer and ("fp32", "recorder") in by:
                ours32 = by[("fp32", "recorder")]
                factor = (peer["overhead"] - 1) / max(ours32["overhead"] - 1, 1e-3)
                out.append({"name": "ResNet-18 fp32: torch.save overhead / recorder overhead", "value": factor,
                            "limit": ">= 3", "met": factor >= 3})
    for name, wl in result["workloads"].items():
        for codec, d in (wl.get("disk_ratio") or {}).items():
            if d["target"] is not None:
                out.append({"name": f"disk ratio {codec} on real deltas ({name})", "value": d["ratio"],
                            "limit": d["target"], "met": d["ratio"] <= d["target"]})
    return out


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = one_line_parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="directory for record.json and record.png")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: every code path in seconds (for tests)")
    p.add_argument("--workdir", type=Path, default=None, help="where runs are written (default: a temp dir in --out)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--workloads", default="mlp-mnist,resnet18-cifar")
    p.add_argument("--codecs", default=",".join(CODECS))
    p.add_argument("--resnet-codecs", default=None, help="codecs for the ResNet (default: --codecs)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--mnist", default=str(DEFAULT_MNIST))
    p.add_argument("--mlp-warmup", type=int, default=10)
    p.add_argument("--mlp-steps", type=int, default=60)
    p.add_argument("--disk-steps", type=int, default=250, help="real-data steps recorded per codec for disk ratios")
    p.add_argument("--resnet-batch", type=int, default=64)
    p.add_argument("--resnet-image", type=int, default=32)
    p.add_argument("--resnet-warmup", type=int, default=1)
    p.add_argument("--resnet-steps", type=int, default=5)
    p.add_argument("--throughput-steps", type=int, default=8)
    p.add_argument("--raw-disk-mib", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=1, help="repeat every variant; medians are over steady repeats")
    p.add_argument("--max-drift", type=float, default=0.10, help="a repeat whose two no-recording runs differ by "
                   "more than this fraction is left out of the medians (if any repeat is steady)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    p.add_argument("--profile", action="store_true", help="cProfile the ResNet fp16 recorder's timed steps")
    p.add_argument("--no-fork", action="store_true", help="run every variant in this process (memory peaks then "
                   "include what earlier variants left in the allocator)")
    args = p.parse_args(argv)
    check_names(p, "--workloads", args.workloads, BUILDERS)
    check_names(p, "--variants", args.variants, VARIANTS)
    for option in ("codecs", "resnet_codecs"):
        if getattr(args, option):
            check_codecs(p, "--" + option.replace("_", "-"), getattr(args, option))
    if args.smoke:
        args.mlp_warmup, args.mlp_steps, args.disk_steps = 2, 4, 8
        args.resnet_batch, args.resnet_image, args.resnet_warmup, args.resnet_steps = 2, 8, 1, 1
        args.throughput_steps, args.raw_disk_mib = 2, 8
        args.resnet_codecs = args.resnet_codecs or "fp16"
        args.threads = args.threads or 1  # tiny steps gain nothing from threads and suffer most from contention
    return args


def in_child(isolate: bool, fn, *args):
    """Run ``fn(*args)`` in a forked child (fresh allocator and memory peak; no torch thread pool inherited, as
    the parent never runs a tensor operation) and return its JSON-able result, passed back through a file."""
    if not isolate:
        return fn(*args)
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: never returns into the caller's code
            code = 1
            try:
                Path(path).write_text(json.dumps(fn(*args)))
                code = 0
            except BaseException:
                import traceback
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        if status != 0:
            raise RuntimeError(f"benchmark child for {fn.__name__}{args[:3]} failed (wait status {status}); "
                               "its traceback is above")
        return json.loads(Path(path).read_text())
    finally:
        os.unlink(path)


BUILDERS = {"mlp-mnist": mnist_mlp, "resnet18-cifar": cifar_resnet}


def _setup(args):
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    return torch.device(args.device)


def job_variant(args, name: str, codec: str, variant: str, workdir: Path) -> dict:
    device = _setup(args)
    w = BUILDERS[name](args, device)
    profile_to = None
    if args.profile and name == "resnet18-cifar" and codec == "fp16" and variant == "recorder":
        profile_to = args.out / "profile-resnet18-fp16-recorder.txt"
    return run_variant(w, codec, variant, workdir, device, profile_to)


def job_describe(args, name: str) -> dict:
    import torch
    from deltastore.layout import TensorLayout
    device = _setup(args)
    w = BUILDERS[name](args, device)
    numel = TensorLayout.from_tensors(w.model_fn().state_dict()).numel
    out = {"description": w.description, "elements": numel, "raw_fp32_bytes_per_step": numel * 4,
           "warmup": w.warmup, "timed": w.timed, "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def job_disk(args, name: str, codec: str, workdir: Path) -> dict:
    device = _setup(args)
    w = BUILDERS[name](args, device)
    ratio, sampled = record_real_deltas(w, codec, args.disk_steps, workdir, keep_every=5 if codec == "fp32" else 0)
    out = {"ratio": ratio}
    if sampled:
        out["compressor_study_steps"] = len(sampled)
        out["compressor_study"] = compressor_study(sampled, repeats=1 if args.smoke else 3)
    return out


def job_throughput(args, name: str, codec: str, workdir: Path) -> dict:
    device = _setup(args)
    return writer_throughput(BUILDERS[name](args, device), codec, args.throughput_steps, workdir, device)


def main(argv=None) -> dict:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    own_workdir = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="record-", dir=args.out if own_workdir else args.workdir))
    started = time.time()
    result = {"benchmark": "record", "command": " ".join([Path(sys.argv[0]).name] + (argv or sys.argv[1:])),
              "smoke": args.smoke, "machine": machine_info(workdir), "loadavg_start": loadavg(),
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    isolate = not args.no_fork and hasattr(os, "fork")
    try:
        raw = [raw_write_bandwidth(workdir, args.raw_disk_mib << 20)]
        result["workloads"] = {}
        for name in args.workloads.split(","):
            codecs = ((args.resnet_codecs or args.codecs) if name == "resnet18-cifar" else args.codecs).split(",")
            result["workloads"][name] = run_workload(name, codecs, args, workdir, isolate)
            print(f"[{time.time() - started:6.1f} s] {name} done", file=sys.stderr, flush=True)
        raw.append(raw_write_bandwidth(workdir, args.raw_disk_mib << 20))
        result["disk"] = {"bytes": args.raw_disk_mib << 20, "raw_write_MBps": raw, "raw_MBps": max(raw)}
        for wl in result["workloads"].values():
            for t in wl.get("throughput", {}).values():
                t["fraction_of_raw_disk"] = t["stored_MBps"] / result["disk"]["raw_MBps"]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    first = next(iter(result["workloads"].values()), {})
    result["machine"]["torch_threads"] = first.get("torch_threads")
    if first.get("gpu"):
        result["machine"]["gpu"] = first["gpu"]
    result["isolated_in_forked_children"] = isolate
    result["loadavg_end"] = loadavg()
    result["seconds"] = time.time() - started
    result["targets"] = targets(result)
    (args.out / "record.json").write_text(json.dumps(result, indent=1))
    result["plot"] = in_child(isolate, plot, result, args.out / "record.png")
    print_table(result)
    return result


def run_workload(name: str, codecs: list[str], args, workdir: Path, isolate: bool) -> dict:
    out = in_child(isolate, job_describe, args, name)
    variants = [v for v in args.variants.split(",") if v != "none"]
    results = []
    for repeat in range(args.repeats):
        for codec in codecs:
            # each codec's variants are bracketed by two runs without recording; a variant's overhead is relative
            # to their mean, so load that drifts during the run (a shared machine) biases no variant in particular
            runs = [in_child(isolate, job_variant, args, name, codec, v, workdir)
                    for v in ["none", *variants, "none"]]
            base = statistics.mean(r["effective_step_s"] for r in (runs[0], runs[-1]))
            base_opt = statistics.mean(r["opt_step_s"] for r in (runs[0], runs[-1]))
            # a group whose two baselines differ by more than 10% saw the machine's load change under it
            drift = abs(runs[0]["effective_step_s"] - runs[-1]["effective_step_s"]) / base
            for r in runs:
                r["repeat"], r["baseline_step_s"], r["baseline_drift"] = repeat, base, drift
                r["steady"] = drift <= args.max_drift
                r["overhead"] = r["effective_step_s"] / base
                r["hook_ms"] = (r["opt_step_s"] - base_opt) * 1e3
            results += runs
    merged = []
    for codec in codecs:  # medians over repeats (and over both bracketing baselines)
        for variant in ["none", *variants]:
            every = [r for r in results if r["codec"] == codec and r["variant"] == variant]
            rs = [r for r in every if r["steady"]] or every  # medians over steady groups when there are any
            r = dict(rs[0])
            for key in ("step_s", "fwd_bwd_s", "opt_step_s", "drain_s_per_step", "effective_step_s", "peak_mib",
                        "cpu_s_per_step", "wall_s_per_step", "overhead", "hook_ms", "baseline_step_s",
                        "disk_bytes_per_step", "memory_bytes_per_step"):
                r[key] = statistics.median(x[key] for x in rs)
            r["runs"], r["runs_steady"] = len(every), sum(x["steady"] for x in every)
            r["step_s_all"] = [s for x in rs for s in x["step_s_all"]]
            r["overhead_all"] = [round(x["overhead"], 4) for x in every]
            r["baseline_drift_all"] = [round(x["baseline_drift"], 4) for x in every]
            merged.append(r)
    out["baseline_step_s"] = statistics.median(r["step_s"] for r in results if r["variant"] == "none")
    out["results"] = merged
    if name == "mlp-mnist":
        out["disk_ratio"] = {}
        for codec in codecs:
            d = in_child(isolate, job_disk, args, name, codec, workdir)
            out["disk_ratio"][codec] = d["ratio"]
            if "compressor_study" in d:
                out["compressor_study_steps"], out["compressor_study"] = d["compressor_study_steps"], \
                    d["compressor_study"]
    else:
        out["throughput"] = {c: in_child(isolate, job_throughput, args, name, c, workdir) for c in codecs}
    return out


if __name__ == "__main__":
    main()
