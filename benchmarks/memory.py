"""Memory benchmark: what recording adds to a training run's peak memory, per codec and model size.

For each model size (an MLP of four square layers with about ``N`` parameters) and codec, a fresh interpreter
trains a few steps of SGD with momentum (batch 16) without recording, and another records the same training with
:class:`amnesiac.Recorder` (zarr, ``durable=False``, close included: the final snapshot is part of the peak). The
figure of merit is the difference of the two peaks (host resident memory, ``ru_maxrss``; on CUDA also the device's
``max_memory_allocated`` and pinned host memory), in bytes per parameter. Separate processes keep one measurement
from inheriting another's allocator state.

Target (issue 15): extra peak memory at most ``4 bytes/param + 256 MiB`` for every codec, pinned host memory at most
1 GiB, whatever the model size.

Usage::

    python benchmarks/memory.py --out bench-out/memory                     # 10, 50, 250 M params, every codec
    python benchmarks/memory.py --sizes 10 50 --out DIR --code-root /old   # measure another checkout's code
    python benchmarks/memory.py --smoke --out /tmp/memory-smoke             # seconds: tiny sizes
    python benchmarks/memory.py --device cuda --out DIR                     # device memory too

``--baseline FILE`` (a memory.json of an earlier run, e.g. of the code before a change) adds a before/after table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CODECS = ("fp32", "fp16", "bf16", "topk:0.01")
BATCH = 16
BOUND_BYTES_PER_PARAM, BOUND_FIXED = 4.0, 256 << 20


def _width(params: int, layers: int = 4) -> int:
    return max(8, int(math.sqrt(params / layers)))


# ---------------------------------------------------------------------------------------------- child process
def child(args) -> dict:
    """Train (and maybe record) one model in this process; report peaks. Runs in a fresh interpreter."""
    import torch

    torch.manual_seed(0)
    device = torch.device(args.device)
    width = _width(args.params)
    model = torch.nn.Sequential(*[m for _ in range(4) for m in (torch.nn.Linear(width, width), torch.nn.ReLU())][:-1])
    model = model.to(device)
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(BATCH, width, device=device)
    y = torch.randn(BATCH, width, device=device)
    rec = None
    if args.codec != "none":
        import amnesiac
        options = {}
        if args.piece_elems:
            options["piece_elems"] = args.piece_elems
        rec = amnesiac.Recorder(model, opt, Path(args.workdir) / "run", codec=args.codec, durable=False, **options)
    times = []
    for step in range(args.steps):
        t0 = time.perf_counter()
        if rec is not None:
            rec.add_batch(list(range(step * BATCH, (step + 1) * BATCH)))
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if rec is not None:
        rec.close()
    out = {"params": params, "codec": args.codec, "steps": args.steps,
           "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
           "step_s_median": statistics.median(times[1:] or times)}
    if device.type == "cuda":
        out["peak_device_bytes"] = torch.cuda.max_memory_allocated(device)
        host_stats = getattr(torch.cuda, "host_memory_stats", None)
        if host_stats is not None:
            try:
                out["peak_pinned_bytes"] = int(host_stats().get("allocated_bytes.current.peak",
                                                                host_stats().get("reserved_bytes.peak", 0)))
            except Exception:  # noqa: BLE001 - an older torch without the counters: report none
                pass
    return out


def run_child(params: int, codec: str, args) -> dict:
    with tempfile.TemporaryDirectory(dir=args.tmp) as work:
        env = dict(os.environ, PYTHONPATH=str(args.code_root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        cmd = [sys.executable, __file__, "--child", "--params", str(params), "--codec", codec, "--steps",
               str(args.steps), "--device", args.device, "--workdir", work]
        if args.piece_elems:
            cmd += ["--piece-elems", str(args.piece_elems)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"child {params} {codec} failed ({proc.returncode}): {proc.stderr[-2000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- parent
def measure(args) -> dict:
    rows = []
    for millions in args.sizes:
        params = int(millions * 1e6)
        base = run_child(params, "none", args)
        print(f"{millions:>7g}M  no recording: peak RSS {base['peak_rss_bytes'] / 2**20:8.0f} MiB, "
              f"step {base['step_s_median'] * 1e3:.0f} ms", flush=True)
        for codec in args.codecs:
            rec = run_child(params, codec, args)
            n = rec["params"]
            extra = rec["peak_rss_bytes"] - base["peak_rss_bytes"]
            row = {"millions": millions, "params": n, "codec": codec, "extra_rss_bytes": extra,
                   "extra_rss_bytes_per_param": extra / n,
                   "bound_bytes": BOUND_BYTES_PER_PARAM * n + BOUND_FIXED,
                   "within_bound": extra <= BOUND_BYTES_PER_PARAM * n + BOUND_FIXED,
                   "peak_rss_bytes": rec["peak_rss_bytes"], "baseline_peak_rss_bytes": base["peak_rss_bytes"],
                   "step_s_median": rec["step_s_median"], "baseline_step_s_median": base["step_s_median"]}
            for key in ("peak_device_bytes", "peak_pinned_bytes"):
                if key in rec:
                    row[key] = rec[key]
                    row[f"baseline_{key}"] = base.get(key, 0)
            if "peak_device_bytes" in rec:
                row["extra_device_bytes_per_param"] = (rec["peak_device_bytes"] - base["peak_device_bytes"]) / n
            rows.append(row)
            print(f"{millions:>7g}M  {codec:>10}: +{extra / 2**20:8.0f} MiB = {extra / n:5.2f} B/param "
                  f"(bound {row['bound_bytes'] / 2**20:.0f} MiB: {'met' if row['within_bound'] else 'MISSED'}), "
                  f"step {rec['step_s_median'] * 1e3:.0f} ms", flush=True)
    return {"benchmark": "memory", "rows": rows, "machine": machine(), "device": args.device,
            "steps": args.steps, "batch": BATCH, "code_root": str(args.code_root),
            "bound": "extra peak <= 4 B/param + 256 MiB", "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def machine() -> dict:
    import torch
    info = {"cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)), "python": platform.python_version(),
            "torch": torch.__version__}
    try:
        info["mem_total_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30, 1)
    except (ValueError, OSError):
        pass
    return info


def table(result: dict, baseline: dict | None) -> str:
    before = {(r["millions"], r["codec"]): r for r in (baseline or {}).get("rows", [])}
    lines = ["| params | codec | extra peak RSS | bytes/param | bound (4 B/param + 256 MiB) |"
             + (" before: bytes/param |" if baseline else ""),
             "| ---: | --- | ---: | ---: | --- |" + (" ---: |" if baseline else "")]
    for r in result["rows"]:
        b = before.get((r["millions"], r["codec"]))
        lines.append(f"| {r['millions']:g} M | {r['codec']} | {r['extra_rss_bytes'] / 2**20:.0f} MiB | "
                     f"{r['extra_rss_bytes_per_param']:.2f} | {'met' if r['within_bound'] else 'missed'} |"
                     + ((f" {b['extra_rss_bytes_per_param']:.2f} |" if b else " - |") if baseline else ""))
    return "\n".join(lines)


def plot(result: dict, baseline: dict | None, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for source, style, label in ((result, "-o", ""), (baseline, ":x", " (before)")):
        for codec in sorted({r["codec"] for r in (source or {}).get("rows", [])}):
            rows = [r for r in source["rows"] if r["codec"] == codec]
            ax.plot([r["params"] for r in rows], [r["extra_rss_bytes_per_param"] for r in rows], style,
                    label=codec + label)
    sizes = sorted({r["params"] for r in result["rows"]})
    if sizes:
        xs = [sizes[0] * (sizes[-1] / sizes[0]) ** (i / 50) for i in range(51)] if sizes[-1] > sizes[0] else sizes
        ax.plot(xs, [BOUND_BYTES_PER_PARAM + BOUND_FIXED / x for x in xs], "k--", label="bound 4 B/param + 256 MiB")
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("extra peak host memory (bytes per parameter)")
    ax.set_title(f"Recording's extra peak memory ({result['device']})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench-out/memory"), help="where memory.json/.png go")
    p.add_argument("--sizes", type=float, nargs="+", default=[10, 50, 250], help="model sizes in millions")
    p.add_argument("--codecs", nargs="+", default=list(CODECS))
    p.add_argument("--steps", type=int, default=4, help="training steps per measurement")
    p.add_argument("--device", default="cpu")
    p.add_argument("--piece-elems", type=int, default=0, help="Recorder piece size (0: its default)")
    p.add_argument("--code-root", type=Path, default=REPO, help="checkout whose amnesiac/deltastore to measure")
    p.add_argument("--baseline", type=Path, help="an earlier memory.json: adds a before/after column")
    p.add_argument("--tmp", default=None, help="directory for the runs (default: the system's temp dir)")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, two steps: checks every code path in seconds")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--params", type=int, help=argparse.SUPPRESS)
    p.add_argument("--codec", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    if args.smoke:
        args.sizes, args.steps = [0.2, 1], 2
    args.code_root = args.code_root.resolve()
    result = measure(args)
    baseline = json.loads(args.baseline.read_text()) if args.baseline else None
    if baseline:
        result["baseline"] = {"code_root": baseline.get("code_root"), "when": baseline.get("when"),
                              "rows": baseline["rows"]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "memory.json").write_text(json.dumps(result, indent=1))
    plot(result, baseline, args.out / "memory.png")
    print(table(result, baseline))
    print(f"wrote {args.out / 'memory.json'} and memory.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
