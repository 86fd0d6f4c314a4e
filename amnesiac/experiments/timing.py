"""Fair, end-to-end timing of amnesiac unlearning and of retraining, each from a cold page cache.

Both clocks run from "a request arrives" to "the new weights are on disk": amnesiac opens the run, reads the ledger,
plans, reduces the deltas and writes the weights; retraining opens the run, reads S_0, trains on the retained data
and writes the weights. Before each repeat the run's files are flushed and dropped from the page cache with
``os.posix_fadvise(POSIX_FADV_DONTNEED)`` (the files are synced first: dirty pages cannot be dropped), so neither
is read from memory seconds after it was written. Callers interleave the repeats (amnesiac, retrain, amnesiac, ...)
and quote medians.

Example:
    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp()); (d / "f").write_bytes(b"x" * 4096)
    4096
    >>> drop_page_cache(d)
    1
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from ..run import open_run


def drop_page_cache(path: str | Path) -> int:
    """Sync every file under ``path`` and advise the kernel to drop its cached pages; returns the file count.
    Without ``posix_fadvise`` (not Linux) it only syncs, and timings are then warm: the caller says so."""
    count = 0
    for f in [Path(path)] if Path(path).is_file() else Path(path).rglob("*"):
        if not f.is_file():
            continue
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            count += 1
        finally:
            os.close(fd)
    return count


COLD_CACHE = hasattr(os, "posix_fadvise")


def _save(state: dict[str, torch.Tensor], out: Path) -> None:
    from safetensors.torch import save_file
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(out))
    fd = os.open(out, os.O_RDONLY)
    try:
        os.fsync(fd)  # the weights are on disk when the clock stops
    finally:
        os.close(fd)


def amnesiac_end_to_end(run_dir: Path, selection: dict, out: Path) -> tuple[float, dict[str, torch.Tensor]]:
    """Cold cache, then open + ledger + plan + reduce + write the weights; returns (seconds, state)."""
    drop_page_cache(run_dir)
    start = time.perf_counter()
    run = open_run(run_dir)
    report = run.unlearn_report(**selection)
    state = {k: v.cpu() for k, v in report.state.items()}
    _save(state, out)
    return time.perf_counter() - start, state


def retrain_end_to_end(run_dir: Path, task, *, init_seed: int | None, order_seed: int, out: Path
                       ) -> tuple[float, dict[str, torch.Tensor]]:
    """Cold cache, then open + read S_0 (or, with ``init_seed``, draw new initial weights) + train on the retained
    data with batch order ``order_seed`` + write the weights; returns (seconds, state)."""
    from ..models import build_model
    from ..training import make_optimizer, train
    drop_page_cache(run_dir)
    start = time.perf_counter()
    model = build_model(task.model_spec)
    if init_seed is None:
        model.load_state_dict(open_run(run_dir).start_state())
    else:
        torch.manual_seed(init_seed)
        model = build_model(task.model_spec)
    train(model, make_optimizer(model, task.optimizer, task.lr), task.retained, epochs=task.epochs,
          batch_size=task.batch_size, seed=order_seed)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    _save(state, out)
    return time.perf_counter() - start, state


__all__ = ["COLD_CACHE", "amnesiac_end_to_end", "drop_page_cache", "retrain_end_to_end"]
