"""Planning before a run: what a recording will weigh and what forgetting will cost, from measured figures.

The figures (compression ratio by codec, the writer's input speed, the reduce's speed) come from the benchmarks of
this repository, shipped as ``deltastore/calibration.json`` (each with the result file it was copied from), or from
an existing run (``calibrate=``: its own ratio, and a reduce speed timed on a few of its steps).

Model: a training of ``steps`` steps of ``params`` floats stores ``stored_steps`` deltas: every step, or with
selective recording (a ``deletable_fraction`` F of the samples may have to be forgotten, batch size B) the steps
whose batch holds a deletable sample: ``1 - (1 - F)**B`` of them under plain shuffling, about F of them (at least one
batch per epoch) with the isolating sampler. Forgetting one sample undoes one step per epoch it was seen in and reads
S_T once more.

Example:
    >>> p = plan(params=11_699_112, steps=7_813, codec="fp16", epochs=10)
    >>> round(p["raw_fp32_bytes"] / 1e9), round(p["bytes_on_disk"] / 1e9)
    (366, 155)
    >>> s = plan(params=11_699_112, steps=7_813, codec="fp16", epochs=10, deletable_fraction=0.01, batch_size=64,
    ...          isolate=True)
    >>> s["stored_steps"], round(s["bytes_on_disk"] / 1e9, 1)
    (80, 1.7)
"""

from __future__ import annotations

import json
import math
import time
from importlib import resources
from pathlib import Path

from .errors import InvalidArgumentError

SNAPSHOTS = 2  # S_0 and S_T, kept whole in fp32 whatever the codec
LEDGER_BYTES_PER_SAMPLE = 8  # one int64 id per sample per step in the step log (labels add as much again)


def calibration() -> dict:
    """The shipped figures (``deltastore/calibration.json``)."""
    return json.loads(resources.files("deltastore").joinpath("calibration.json").read_text())


def _figure(table: dict, codec: str, what: str) -> float:
    if codec in table:
        return float(table[codec])
    if codec.startswith("topk:") and "topk:0.01" in table:
        try:
            fraction = float(codec.split(":", 1)[1])
        except ValueError:
            raise InvalidArgumentError(f"codec {codec!r}: topk:F needs a fraction F") from None
        # top-k stores values and indices of F of the elements: size and work grow with F
        return float(table["topk:0.01"]) * (fraction / 0.01 if what == "ratio" else 1.0)
    known = ", ".join(k for k in table if k != "source")
    raise InvalidArgumentError(f"no measured {what} for codec {codec!r} (known: {known}); pass --calibrate RUN "
                               "with a run recorded with that codec")


def measure_run(path: str | Path, *, max_steps: int = 3) -> dict:
    """The ratio (delta bytes / raw fp32 of the stored steps) and elements of the run at ``path``, and the reduce's
    speed timed on up to ``max_steps`` of its stored steps (warm: read just after being written or listed)."""
    from .store import DeltaStore
    with DeltaStore.open(path) as store:
        info = store.info()
        stored = [int(t) for t in store.stored_mask.nonzero()[0][:max_steps]]
        if not stored:
            raise InvalidArgumentError(f"{path} has no stored steps to calibrate from")
        t0 = time.perf_counter()
        store.sum_steps(stored)
        seconds = time.perf_counter() - t0
    return {"codec": info["codec"], "elements": info["elements"], "ratio": info["ratio"],
            "reduce_GBps_fp32": len(stored) * info["elements"] * 4 / seconds / 1e9,
            "source": f"measured on {path} ({info['stored_steps']} stored steps; reduce timed on {len(stored)})"}


def stored_steps(steps: int, *, epochs: int = 1, deletable_fraction: float | None = None, batch_size: int = 1,
                 isolate: bool = False) -> int:
    """How many of ``steps`` keep their delta (all of them without ``deletable_fraction``)."""
    if deletable_fraction is None:
        return steps
    if isolate:  # ceil(F * N / B) batches per epoch of N / B steps
        return min(steps, epochs * math.ceil(deletable_fraction * steps / epochs))
    return min(steps, math.ceil(steps * (1.0 - (1.0 - deletable_fraction) ** batch_size)))


def plan(*, params: int, steps: int, codec: str, epochs: int = 1, deletable_fraction: float | None = None,
         batch_size: int | None = None, isolate: bool = False, calibrate: str | Path | None = None) -> dict:
    """Estimate a recording's size and the cost of forgetting one sample (see the module docstring).

    Returns a JSON-ready dict: ``raw_fp32_bytes`` (every step's delta in raw fp32), ``bytes_on_disk`` (stored
    deltas at the codec's ratio, plus S_0, S_T and the ledger), ``write_bytes_per_step`` (averaged over all steps),
    ``writer_seconds_per_stored_step``, ``forget_one_sample_seconds``, ``stored_steps``, the figures used and where
    they come from.
    """
    if params < 1 or steps < 1 or epochs < 1 or epochs > steps:
        raise InvalidArgumentError("params and steps must be >= 1, and epochs between 1 and steps")
    if deletable_fraction is not None and not 0.0 <= deletable_fraction <= 1.0:
        raise InvalidArgumentError(f"the deletable fraction must be between 0 and 1, got {deletable_fraction}")
    if deletable_fraction is not None and not isolate and batch_size is None:
        raise InvalidArgumentError("--deletable-fraction under plain shuffling needs --batch-size (or --isolate)")
    if isolate and deletable_fraction is None:
        raise InvalidArgumentError("--isolate needs --deletable-fraction")
    table = calibration()
    sources = {k: table[k]["source"] for k in ("ratio", "writer_input_fp32_MBps", "reduce_cold_GBps_fp32")}
    if calibrate is not None:
        run = measure_run(calibrate)
        if run["codec"] != codec:
            raise InvalidArgumentError(f"{calibrate} was recorded with codec {run['codec']}, not {codec}")
        ratio, reduce_gbps = run["ratio"], run["reduce_GBps_fp32"]
        sources["ratio"] = sources["reduce_cold_GBps_fp32"] = run["source"]
    else:
        ratio = _figure(table["ratio"], codec, "ratio")
        reduce_gbps = _figure(table["reduce_cold_GBps_fp32"], codec, "reduce speed")
    writer_mbps = _figure(table["writer_input_fp32_MBps"], codec, "writer speed")
    raw_step = params * 4
    kept = stored_steps(steps, epochs=epochs, deletable_fraction=deletable_fraction, batch_size=batch_size or 1,
                        isolate=isolate)
    deltas = kept * raw_step * ratio
    ledger = steps * (batch_size or 0) * LEDGER_BYTES_PER_SAMPLE
    return {"params": params, "steps": steps, "epochs": epochs, "codec": codec, "stored_steps": kept,
            "deletable_fraction": deletable_fraction, "batch_size": batch_size, "isolate": isolate,
            "raw_fp32_bytes": steps * raw_step,
            "bytes_on_disk": int(deltas + SNAPSHOTS * raw_step + ledger),
            "write_bytes_per_step": int(deltas / steps),
            "writer_seconds_per_stored_step": raw_step / (writer_mbps * 1e6),
            "steps_undone_per_sample": epochs,
            "forget_one_sample_seconds": (epochs + 1) * raw_step / (reduce_gbps * 1e9),
            "figures": {"ratio": ratio, "writer_input_fp32_MBps": writer_mbps, "reduce_GBps_fp32": reduce_gbps},
            "sources": sources}
