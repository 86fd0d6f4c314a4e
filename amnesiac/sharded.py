"""Runs recorded under FSDP2: one delta store per rank, put back together when read.

On disk (``run_dir`` as given to every rank's Recorder)::

    run_dir/
      rank-00000/       an ordinary delta store: rank 0's shards, the replicated tensors (buffers), the ledger, and
                        in its store.json (attrs "amnesiac" / "sharding") how to put the shards together: world size,
                        a run id, every sharded tensor's global shape, dtype, sharded dimension and rows per rank
      rank-00001/ ...   the other ranks' shards (no ledger); their store.json names their rank and the run id

Every rank writes its own rows of the same step into its own store, so nothing is gathered while training and the
disk sees W writers of 1/W of the model each (on several nodes: a shared file system, or each node's local disk
copied together afterwards). A step counts once every store has committed it: a crash may leave some stores one
step ahead, and reading uses the steps committed everywhere. ``amnesiac.open_run(run_dir)`` returns a
:class:`ShardedRun`: the same interface as :class:`amnesiac.Run`, with full tensors (shards concatenated along their
dimension, in rank order). Each rank's store reads and verifies like any other
(``deltastore verify run_dir/rank-00000``). The sharding description lives in store.json, which carries its own
crc32c, so it needs no file format of its own.
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import numpy as np
import torch

from deltastore import (DeltaStore, DeltaStoreError, TensorLayout, UnlearnPlan, plan_unlearning, resolve_device,
                        run_plan)

from .errors import ModelMismatchError, RecorderError, RunDamagedError, RunNotFoundError, SelectionError
from .loops import is_sharded, local_tensor
from .run import Run, UnlearnReport, _damage_is_reported
from .selection import Selection

SHARDING_FORMAT = 1
MAX_WORLD = 1 << 16


def shard_dir(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / f"rank-{rank:05d}"


def is_sharded_run(path: str | Path) -> bool:
    path = Path(path)
    return not (path / "store.json").exists() and (shard_dir(path, 0) / "store.json").is_file()


def _plain(name: str) -> str:
    return name.replace("_orig_mod.", "")


def local_description(state: dict[str, torch.Tensor], rank: int) -> dict:
    """This rank's part of the sharding description: the rows of every sharded tensor it holds."""
    tensors, replicated = {}, []
    for name, t in state.items():
        if not is_sharded(t):
            replicated.append(_plain(name))
            continue
        placements = tuple(t.placements)
        if len(placements) != 1 or not placements[0].is_shard():
            raise RecorderError(f"tensor {name!r} is placed as {placements}: only one-dimensional FSDP2 meshes "
                                "(each parameter Shard(dim) over the ranks) can be recorded, not HSDP or tensor "
                                "parallel layouts")
        dim = placements[0].dim
        tensors[_plain(name)] = {"dim": dim, "rows": local_tensor(t).shape[dim], "shape": list(t.shape),
                                 "dtype": str(t.dtype).removeprefix("torch.")}
    return {"rank": rank, "run_id": uuid.uuid4().hex, "names": [_plain(n) for n in state], "tensors": tensors,
            "replicated": replicated}


def sharding_attrs(parts: list[dict], rank: int) -> dict:
    """What rank ``rank`` keeps in its store's attrs: rank 0 the whole description, the others their rank."""
    head = parts[0]
    if rank:
        return {"format": SHARDING_FORMAT, "rank": rank, "run_id": head["run_id"]}
    tensors = {}
    for name, t in head["tensors"].items():
        rows = [p["tensors"].get(name, {}).get("rows") for p in parts]
        if any(n is None for n in rows) or sum(rows) != t["shape"][t["dim"]]:
            raise RecorderError(f"the ranks' shards of {name!r} ({rows} rows) do not make up its shape {t['shape']}")
        tensors[name] = {"dim": t["dim"], "shape": t["shape"], "dtype": t["dtype"], "rows": rows}
    return {"format": SHARDING_FORMAT, "rank": 0, "run_id": head["run_id"], "world_size": len(parts),
            "names": head["names"], "tensors": tensors, "replicated": head["replicated"]}


def _sharding_of(store: DeltaStore) -> dict:
    amnesiac_attrs = store.attrs.get("amnesiac")
    doc = amnesiac_attrs.get("sharding") if isinstance(amnesiac_attrs, dict) else None
    if not isinstance(doc, dict) or doc.get("format") != SHARDING_FORMAT:
        raise RunDamagedError(f"{store.path} is not a shard of an FSDP run recorded by amnesiac (its store.json has "
                              "no sharding description of a known version)")
    return doc


def _check_doc(doc: dict, path: Path) -> None:
    def bad(why: str):
        raise RunDamagedError(f"{path}: the sharding description in rank-00000/store.json is malformed ({why})")
    world = doc.get("world_size")
    if not (isinstance(world, int) and 1 <= world <= MAX_WORLD and isinstance(doc.get("run_id"), str)):
        bad("world size or run id")
    names, tensors, replicated = doc.get("names"), doc.get("tensors"), doc.get("replicated")
    if not (isinstance(names, list) and isinstance(tensors, dict) and isinstance(replicated, list)
            and all(isinstance(n, str) for n in names) and set(names) == set(tensors) | set(replicated)):
        bad("the tensor names do not add up")
    for name, t in tensors.items():
        ok = (isinstance(t, dict) and isinstance(t.get("shape"), list) and isinstance(t.get("rows"), list)
              and all(isinstance(s, int) and s >= 0 for s in t["shape"]) and isinstance(t.get("dim"), int)
              and 0 <= t["dim"] < len(t["shape"]) and len(t["rows"]) == world
              and all(isinstance(r, int) and r >= 0 for r in t["rows"]) and sum(t["rows"]) == t["shape"][t["dim"]]
              and t.get("dtype") in ("float32", "float16", "bfloat16", "float64"))
        if not ok:
            bad(f"the entry of {name!r}")


def open_sharded_run(path: str | Path) -> ShardedRun:
    path = Path(path)
    stores: list[DeltaStore] = []
    try:
        with _damage_is_reported(path):
            stores.append(DeltaStore.open(shard_dir(path, 0)))
            doc = _sharding_of(stores[0])
            _check_doc(doc, path)
            for rank in range(1, doc["world_size"]):
                where = shard_dir(path, rank)
                if not (where / "store.json").is_file():
                    raise RunNotFoundError(f"{where} is missing: an FSDP run of {doc['world_size']} ranks needs "
                                           "every rank's store (copy all rank-NNNNN directories together)")
                stores.append(DeltaStore.open(where))
                mine = _sharding_of(stores[-1])
                if mine.get("rank") != rank or mine.get("run_id") != doc["run_id"]:
                    raise RunDamagedError(f"{where} is not rank {rank} of this run (another run's store?)")
            return ShardedRun(path, doc, stores)
    except BaseException:
        for store in stores:
            store.close()
        raise


class ShardedRun(Run):
    """A run recorded under FSDP2, read as one: full tensors, one ledger (rank 0's), the steps every rank committed.

    ``store`` is rank 0's store (ledger, replicated tensors); ``shards`` lists every rank's.
    """

    def __init__(self, path: Path, doc: dict, stores: list[DeltaStore]):
        super().__init__(stores[0])
        self._path, self.doc, self.shards = Path(path), doc, stores
        meta = {n: torch.empty(t["shape"], dtype=getattr(torch, t["dtype"]), device="meta")
                for n, t in doc["tensors"].items()}
        rank0 = stores[0].read_snapshot("start")
        meta.update({n: rank0[n].to("meta") for n in doc["replicated"] if n in rank0})
        self.layout = TensorLayout.from_tensors({n: meta[n] for n in doc["names"] if n in meta})

    @property
    def path(self) -> Path:
        return self._path

    @property
    def num_steps(self) -> int:
        """The steps every rank committed."""
        return min(s.num_steps for s in self.shards)

    @property
    def complete(self) -> bool:
        return all(s.complete for s in self.shards) and len({s.num_steps for s in self.shards}) == 1

    def refresh(self) -> None:
        for s in self.shards:
            s.refresh()
        self._ledger = None

    def samples_of_step(self, step: int) -> np.ndarray:
        if not 0 <= step < self.num_steps:
            raise SelectionError(f"step {step} is not a step every rank committed (there are {self.num_steps})")
        return super().samples_of_step(step)

    def _steps_of(self, selection: Selection) -> np.ndarray:
        if selection.kind == "steps":
            steps = np.unique(selection.values)
            if steps.size and (steps[0] < 0 or steps[-1] >= self.num_steps):
                raise SelectionError(f"steps must be steps every rank committed, 0..{self.num_steps - 1}")
            return steps
        steps = super()._steps_of(selection)
        return steps[steps < self.num_steps]  # rank 0 may have committed a step the others had not (a crash)

    def unlearn_report(self, *, sample_ids=None, classes=None, steps=None, device: str | torch.device = "cpu",
                       progress: bool = False, **reduce_options) -> UnlearnReport:
        """Every rank's shard with the selected steps undone, put together into a complete state_dict."""
        device = resolve_device(device)
        with _damage_is_reported(self.path):
            undo = self._steps_of(Selection.of(sample_ids=sample_ids, classes=classes, steps=steps))
            n, parts, totals = self.num_steps, [], np.zeros(3, np.int64)
            seconds, plan_name = 0.0, None
            for store in self.shards:
                plan = plan_unlearning(store, undo)
                if store.num_steps != n:  # a crash left this store ahead: add the common steps to theta_0
                    plan = UnlearnPlan("start", np.setdiff1d(np.arange(n, dtype=np.int64), undo), 1.0, False, undo)
                result = run_plan(store, plan, device=device, progress=progress, **reduce_options)
                local = {k: v.to(device) for k, v in store.read_snapshot(plan.base).items()}
                local.update(store.layout.unflatten(result.total))
                parts.append(local)
                totals += [result.steps_read, result.encoded_bytes_read, result.raw_fp32_bytes]
                seconds += result.seconds
                plan_name = plan_name or ("final-minus-selected" if plan.base == "final" else "start-plus-others")
            return UnlearnReport(self._assemble(parts), undo, n, plan_name, int(totals[0]), int(totals[1]),
                                 int(totals[2]), seconds)

    def _assemble(self, parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        out = {}
        for name in self.doc["names"]:
            t = self.doc["tensors"].get(name)
            if t is None:
                out[name] = parts[0][name]
                continue
            pieces = [parts[r][name] for r in range(len(parts))]
            full = torch.cat(pieces, dim=t["dim"])
            if list(full.shape) != t["shape"]:
                raise RunDamagedError(f"the shards of {name!r} make a {list(full.shape)} tensor, {t['shape']} "
                                      "was recorded")
            out[name] = full
        return out

    def final_state(self) -> dict[str, torch.Tensor]:
        if self.complete:
            with _damage_is_reported(self.path):
                return self._assemble([s.read_snapshot("final") for s in self.shards])
        return self.unlearn(steps=[])

    def start_state(self) -> dict[str, torch.Tensor]:
        with _damage_is_reported(self.path):
            return self._assemble([s.read_snapshot("start") for s in self.shards])

    def check_model(self, model: torch.nn.Module) -> None:
        try:
            self.layout.check(model.state_dict())
        except DeltaStoreError as e:
            raise ModelMismatchError(str(e)) from None

