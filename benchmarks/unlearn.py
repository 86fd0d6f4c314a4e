"""Unlearning throughput and memory on generated ResNet-sized runs, against named peers measured in the same run.

For each model size, codec and backend this script writes a run of Adam-like deltas (lr times a sign-ish value with
exponents spread over decades; nothing is trained), then unlearns one sample (one step per epoch), 1% and 10% of the
steps, with a warm and a cold page cache, in a child process whose peak memory (VmHWM, reset before each
measurement through /proc/self/clear_refs) is read from /proc/self/status. Peers, in the same run: the raw
sequential read bandwidth of the disk, plain zarr row reads (``arr[step, :]``), the seed's in-memory sum of a list of
tensors, and retraining from scratch (a measured ResNet-18 CPU step time times the steps of the run).

    python benchmarks/unlearn.py --out /tmp/unlearn-results            # the full matrix (tens of GB under --workdir)
    python benchmarks/unlearn.py --smoke --out /tmp/unlearn-smoke      # seconds; what the tests run

Throughput is GB/s of raw-fp32-equivalent deltas reduced (steps x elements x 4 bytes / seconds); for a cold cache
the bytes actually read from disk per second are compared with the disk's sequential bandwidth as well.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_model  # noqa: E402

SIZES = {"resnet18": 11_173_962, "resnet50": 25_557_032}  # floating state_dict elements
EPOCHS = 10
CIFAR_TRAIN = 50_000


# ---------------------------------------------------------------- machine and page cache
def machine() -> dict:
    cpu = cpu_model()
    mem = 0
    try:
        mem = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    import torch
    return {"host": platform.node(), "cpu": cpu, "cores": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)),
            "memory_gib": round(mem / 2 ** 30, 1), "python": platform.python_version(), "torch": torch.__version__,
            "platform": platform.platform(), "load_average": os.getloadavg()}


def drop_cache(paths: list[Path]) -> str:
    """Evict ``paths`` from the page cache: drop_caches where permitted, else posix_fadvise(DONTNEED) per file."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "drop_caches"
    except OSError:
        pass
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return "posix_fadvise"


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def sequential_read(paths: list[Path], block: int = 16 << 20) -> tuple[int, float]:
    buf = bytearray(block)
    view, total, t0 = memoryview(buf), 0, time.perf_counter()
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while True:
                n = f.readinto(view)
                if not n:
                    break
                total += n
    return total, time.perf_counter() - t0


def disk_bandwidth(workdir: Path, size: int, repeats: int) -> dict:
    """Cold sequential read of one fresh file of ``size`` bytes (random, so no layer can compress it away)."""
    path = workdir / "bandwidth.bin"
    chunk = os.urandom(16 << 20)
    with open(path, "wb") as f:
        for _ in range(max(1, size // len(chunk))):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    cold, warm = [], []
    try:
        for _ in range(repeats):
            method = drop_cache([path])
            n, s = sequential_read([path])
            cold.append(n / s / 1e9)
            n, s = sequential_read([path])
            warm.append(n / s / 1e9)
    finally:
        path.unlink()
    return {"bytes": n, "cold_gbps": statistics.median(cold), "warm_gbps": statistics.median(warm),
            "cold_all": cold, "cache_drop": method}


# ---------------------------------------------------------------- generating runs
def adam_like(numel: int, seed: int, lr: float = 1e-3):
    import torch
    g = torch.Generator().manual_seed(seed)
    magnitude = torch.exp(torch.randn(numel, generator=g) * 1.2 - 0.5).clamp_(max=5.0)
    sign = torch.randint(0, 2, (numel,), generator=g, dtype=torch.int8).float().mul_(2).sub_(1)
    return magnitude.mul_(sign).mul_(lr)


def generate(path: Path, numel: int, steps: int, codec: str, backend: str, pool: int = 4) -> dict:
    """A complete run of ``steps`` steps; ``pool`` distinct encoded deltas are written in turn (each shard is
    compressed on its own, so repetition across steps changes neither the bytes on disk nor the reduce's work)."""
    import numpy as np
    import torch

    from deltastore import DeltaStore
    sizes = [numel // 2, numel // 4, numel - numel // 2 - numel // 4]
    start = {f"layer{i}.weight": torch.zeros(n) for i, n in enumerate(sizes)}
    t0 = time.perf_counter()
    with DeltaStore.create(path, start, codec=codec, backend=backend, durable=False) as store:
        encoder = store.codec.encoder(torch.device("cpu"))
        encoded = []
        for k in range(pool):
            streams, side = encoder.encode(adam_like(numel, k))
            to_np = lambda t: (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().copy()
            encoded.append(({n: to_np(v) for n, v in streams.items()}, {n: to_np(v) for n, v in side.items()}))
        per_epoch = max(1, steps // EPOCHS)
        for t in range(steps):
            streams, side = encoded[t % pool]
            store.append(streams, side, {"ids": np.array([t], np.int64), "epoch": np.array([t // per_epoch])})
        # S_T is not needed for timing: any state of the right layout will do
        store.finalize(start)
    os.sync()
    return {"write_seconds": time.perf_counter() - t0}


def selections(steps: int, seed: int = 0) -> dict[str, list[int]]:
    import numpy as np
    rng = np.random.default_rng(seed)
    per_epoch = max(1, steps // EPOCHS)
    one = sorted({e * per_epoch + int(rng.integers(per_epoch)) for e in range(EPOCHS)} & set(range(steps)))
    return {"one_sample": one,
            "1%": sorted(rng.choice(steps, max(1, steps // 100), replace=False).tolist()),
            "10%": sorted(rng.choice(steps, max(1, steps // 10), replace=False).tolist())}


def step_files(store, steps: list[int]) -> list[Path]:
    root = store.path / "deltas"
    if store.meta["backend"] == "zarr":
        return [root / s.name / "c" / str(t) / "0" for t in steps for s in store.codec.streams()]
    return [root / f"step-{t:010d}.safetensors" for t in steps]


# ---------------------------------------------------------------- the child: timed unlearning with peak memory
def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def child(args) -> None:
    import numpy as np
    import torch

    from deltastore import DeltaStore
    from deltastore.reduce import plan_unlearning, run_plan
    store = DeltaStore.open(args.child)
    plan = json.loads(args.plan)
    out = []
    raw_step = store.layout.numel * 4
    store.read_snapshot("final")  # warm the imports and the step log once
    store.metadata()
    for name, steps in plan["selections"].items():
        steps = np.asarray(steps, np.int64)
        files = step_files(store, steps.tolist()) + [store.path / "final.safetensors"]
        disk_bytes = sum(p.stat().st_size for p in files)
        for cache in ("cold", "warm"):
            times, peaks = [], []
            for _ in range(plan["repeats"]):
                if cache == "cold":
                    drop_cache(files_under(store.path))
                else:
                    run_plan(store, plan_unlearning(store, steps), device=torch.device("cpu"))  # fill the cache
                _reset_peak()
                base = _status("VmRSS")
                t0 = time.perf_counter()
                result = run_plan(store, plan_unlearning(store, steps), device=torch.device("cpu"))
                times.append(time.perf_counter() - t0)
                peaks.append(max(0, _status("VmHWM") - base))  # RSS counters lag by a few pages
                del result
            sec = statistics.median(times)
            out.append({"selection": name, "cache": cache, "steps": int(steps.size), "seconds": sec,
                        "seconds_all": times, "raw_fp32_gbps": steps.size * raw_step / sec / 1e9,
                        "disk_bytes": disk_bytes, "disk_gbps": disk_bytes / sec / 1e9,
                        "peak_extra_mib": max(peaks) / 2 ** 20})
    for count in plan.get("memory_steps", []):
        steps = np.arange(min(count, store.num_steps), dtype=np.int64)
        _reset_peak()
        base = _status("VmRSS")
        t0 = time.perf_counter()
        store.sum_steps(steps)
        sec = time.perf_counter() - t0
        out.append({"selection": f"sum of {steps.size} steps", "cache": "mixed", "steps": int(steps.size),
                    "seconds": sec, "raw_fp32_gbps": steps.size * raw_step / sec / 1e9,
                    "peak_extra_mib": max(0, _status("VmHWM") - base) / 2 ** 20})
    print(json.dumps(out))


def run_child(store_path: Path, plan: dict) -> list[dict]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(store_path), "--plan", json.dumps(plan)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode:
        raise RuntimeError(f"benchmark child failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- peers
def zarr_rows(store, steps: list[int], repeats: int) -> float | None:
    """Plain zarr: ``arr[step, :]`` per step, summed in numpy (dense codecs on the zarr backend only)."""
    import numpy as np
    import zarr
    if store.meta["backend"] != "zarr" or store.codec.lossy:
        return None
    arr = zarr.open_array(store.path / "deltas" / "data", mode="r")
    times = []
    for _ in range(repeats):
        acc = np.zeros(store.layout.numel, np.float32)
        t0 = time.perf_counter()
        for t in steps:
            acc += arr[t, :]
        times.append(time.perf_counter() - t0)
    return len(steps) * store.layout.numel * 4 / statistics.median(times) / 1e9


def in_memory_sum(numel: int, steps: int, repeats: int) -> float:
    """The seed's approach: every delta kept as a tensor in a Python list, summed when asked."""
    import torch
    deltas = [adam_like(numel, 100 + k % 2) for k in range(steps)]
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        total = torch.zeros(numel)
        for d in deltas:
            total += d
        times.append(time.perf_counter() - t0)
    return steps * numel * 4 / statistics.median(times) / 1e9


def retrain_step_seconds(batch: int, iterations: int) -> float:
    """Median seconds of one Adam step of the CIFAR ResNet-18 on this CPU at ``batch``."""
    import torch

    from amnesiac.models import build_model, model_spec
    torch.manual_seed(0)
    model = build_model(model_spec("resnet18", (3, 32, 32), 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    times = []
    for i in range(iterations + 1):
        t0 = time.perf_counter()
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if i:  # the first step pays for allocations
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ---------------------------------------------------------------- report
def table(rows: list[dict]) -> str:
    head = (f"{'model':9} {'codec':10} {'backend':11} {'steps':>5} {'select':>14} {'cache':5} {'read':>4} "
            f"{'seconds':>8} {'GB/s fp32':>9} {'disk GB/s':>9} {'peak MiB':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        disk = f"{r['disk_gbps']:.2f}" if "disk_gbps" in r else "-"
        lines.append(f"{r['model']:9} {r['codec']:10} {r['backend']:11} {r['run_steps']:>5} {r['selection']:>14} "
                     f"{r['cache']:5} {r['steps']:>4} {r['seconds']:>8.3f} {r['raw_fp32_gbps']:>9.2f} {disk:>9} "
                     f"{r['peak_extra_mib']:>8.0f}")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in result["rows"] if r["selection"] == "10%"]
    labels = sorted({(r["model"], r["codec"], r["backend"]) for r in rows})
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(labels)), 4.5))
    width = 0.4
    for i, cache in enumerate(("warm", "cold")):
        vals = [next((r["raw_fp32_gbps"] for r in rows if (r["model"], r["codec"], r["backend"]) == lab
                      and r["cache"] == cache), 0) for lab in labels]
        ax.bar([j + (i - 0.5) * width for j in range(len(labels))], vals, width, label=f"reduce, {cache} cache")
    peers = result["peers"]
    ax.axhline(peers["disk"]["cold_gbps"], color="k", ls="--", label="disk sequential read (cold)")
    if peers.get("in_memory_sum_gbps"):
        ax.axhline(peers["in_memory_sum_gbps"], color="g", ls=":", label="in-memory list sum (seed)")
    zr = [v for v in peers.get("zarr_rows_gbps", {}).values() if v]
    if zr:
        ax.axhline(statistics.median(zr), color="r", ls="-.", label="plain zarr row reads")
    ax.set_xticks(range(len(labels)), ["\n".join(lab) for lab in labels], fontsize=7)
    ax.set_ylabel("GB/s of raw fp32 deltas reduced")
    ax.set_title("Unlearning 10% of the steps, 2-core CPU")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="a tiny run of every part, in seconds")
    p.add_argument("--out", default="benchmarks/results-unlearn", help="folder for unlearn.json and unlearn.png")
    p.add_argument("--workdir", default="/tmp/unlearn-bench", help="where generated runs live (deleted after use)")
    p.add_argument("--models", default="resnet18,resnet50")
    p.add_argument("--codecs", default="fp32,fp16,bf16,topk:0.01")
    p.add_argument("--backends", default="zarr,safetensors")
    p.add_argument("--steps", type=int, default=500, help="steps of the ResNet-18 runs")
    p.add_argument("--resnet50-steps", type=int, default=100,
                   help="steps of the ResNet-50 runs (fewer by default: 100 steps of fp32 are 10 GB)")
    p.add_argument("--memory-steps", default="500,2000",
                   help="also sum this many steps (of a topk:0.01 ResNet-18 run of the largest) for peak memory")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--retrain-batch", type=int, default=64)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--plan", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return {}
    if args.smoke:
        sizes = {"tiny": 1_300_000}
        steps_of = {"tiny": 20}
        codecs, backends = ["fp32", "topk:0.01"], ["zarr", "safetensors"]
        combos = {("fp32", "zarr"), ("topk:0.01", "safetensors")}  # every code path once, in seconds
        repeats, memory_steps, bw_size, retrain_batch, retrain_iters = 1, [20], 32 << 20, 4, 1
    else:
        sizes = {m: SIZES[m] for m in args.models.split(",")}
        steps_of = {"resnet18": args.steps, "resnet50": args.resnet50_steps}
        codecs, backends = args.codecs.split(","), args.backends.split(",")
        repeats, bw_size, retrain_batch, retrain_iters = args.repeats, 4 << 30, args.retrain_batch, 3
        memory_steps = [int(x) for x in args.memory_steps.split(",") if x]
        combos = None
    workdir, out = Path(args.workdir), Path(args.out)
    workdir.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(workdir).free
    result = {"command": " ".join([Path(sys.argv[0]).name] + (sys.argv[1:] if argv is None else argv)),
              "date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine(),
              "free_disk_gb_at_start": free / 1e9, "smoke": args.smoke, "rows": [], "runs": [], "peers": {}}
    print(f"machine: {result['machine']['cpu']} x{result['machine']['affinity']}, "
          f"{result['machine']['memory_gib']} GiB; free disk {free / 1e9:.0f} GB", flush=True)

    from deltastore import DeltaStore
    peers = result["peers"]
    peers["disk"] = disk_bandwidth(workdir, bw_size, repeats)
    print(f"disk sequential read: cold {peers['disk']['cold_gbps']:.2f} GB/s, warm {peers['disk']['warm_gbps']:.2f}"
          f" GB/s (cache dropped with {peers['disk']['cache_drop']})", flush=True)
    first = next(iter(sizes))
    one = selections(steps_of[first])["one_sample"]
    peers["in_memory_sum_gbps"] = in_memory_sum(sizes[first], len(one), repeats)
    step_s = retrain_step_seconds(retrain_batch, retrain_iters)
    peers["retrain"] = {"model": "resnet18 (CIFAR stem)", "batch": retrain_batch, "step_seconds": step_s,
                        "seconds_for_10_epochs_of_cifar": step_s * EPOCHS * CIFAR_TRAIN / retrain_batch,
                        "note": "measured Adam step time x steps of 10 epochs of 50,000 images"}
    peers["zarr_rows_gbps"] = {}

    for model, numel in sizes.items():
        steps = steps_of[model]
        sel = selections(steps)
        for codec in codecs:
            for backend in backends:
                if combos is not None and (codec, backend) not in combos:
                    continue
                path = workdir / f"{model}-{codec.replace(':', '')}-{backend}"
                shutil.rmtree(path, ignore_errors=True)
                need = numel * 4 * steps * (0.1 if codec.startswith("topk") else 1.05)
                if need > shutil.disk_usage(workdir).free - (5 << 30):
                    print(f"skipping {path.name}: needs ~{need / 1e9:.0f} GB, disk too full", flush=True)
                    continue
                try:
                    gen = generate(path, numel, steps, codec, backend)
                    store = DeltaStore.open(path)
                    info = store.info()
                    mem = memory_steps if (codec.startswith("topk") and model == first and backend == "zarr") \
                        else [steps] if codec == "fp32" and backend == "zarr" and model == first else []
                    if mem and max(mem) > steps:  # a longer run for the memory check of many steps
                        shutil.rmtree(path)
                        gen = generate(path, numel, max(mem), codec, backend)
                        store, info = DeltaStore.open(path), DeltaStore.open(path).info()
                    run = {"model": model, "codec": codec, "backend": backend, "run_steps": store.num_steps,
                           "elements": numel, "delta_bytes": info["delta_bytes"], "ratio": info["ratio"], **gen}
                    result["runs"].append(run)
                    zr = zarr_rows(store, sel["10%"], repeats)
                    if zr:
                        peers["zarr_rows_gbps"][f"{model}-{codec}"] = zr
                    plan = {"selections": sel, "repeats": repeats, "memory_steps": mem}
                    for row in run_child(path, plan):
                        result["rows"].append({"model": model, "codec": codec, "backend": backend,
                                               "run_steps": store.num_steps, **row})
                        print(table([result["rows"][-1]]).splitlines()[-1], flush=True)
                finally:
                    shutil.rmtree(path, ignore_errors=True)

    (out / "unlearn.json").write_text(json.dumps(result, indent=1))
    plot(result, out / "unlearn.png")
    print()
    print(table(result["rows"]))
    print(f"\npeers: disk cold {peers['disk']['cold_gbps']:.2f} GB/s; in-memory list sum "
          f"{peers['in_memory_sum_gbps']:.2f} GB/s; plain zarr rows "
          + ", ".join(f"{k} {v:.2f} GB/s" for k, v in peers["zarr_rows_gbps"].items())
          + f"; retraining ResNet-18 10 epochs ~{peers['retrain']['seconds_for_10_epochs_of_cifar']:.0f} s")
    print(f"wrote {out / 'unlearn.json'} and {out / 'unlearn.png'}")
    return result


if __name__ == "__main__":
    main()
