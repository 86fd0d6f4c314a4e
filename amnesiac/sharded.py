"""Runs recorded under FSDP2: one delta store per rank, put back together when read.

On disk (``run_dir`` as given to every rank's Recorder)::

    run_dir/
      sharding.json     written by rank 0 once every rank's store exists: world size, each rank's store (directory
                        and uid), and for every sharded tensor its global shape, dtype, sharded dimension and the
                        number of rows each rank holds; the names of the replicated tensors (rank 0 keeps those)
      rank-00000/       an ordinary delta store: rank 0's shards, the replicated tensors, the ledger
      rank-00001/ ...   the other ranks' shards (no ledger)

Every rank writes its own rows of the same step into its own store, so nothing is gathered while training and the
disk sees W writers of 1/W of the model each (on several nodes: a shared file system, or each node's local disk
copied together afterwards). A step counts once every store has committed it: a crash may leave some stores one
step ahead, and reading uses the steps committed everywhere. ``amnesiac.open_run(run_dir)`` returns a
:class:`ShardedRun`: the same interface as :class:`amnesiac.Run`, with full tensors (shards concatenated along their
dimension, in rank order). Each rank's store reads and verifies like any other (``deltastore verify run_dir/rank-00000``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch

from deltastore import DeltaStore, DeltaStoreError, TensorLayout
from deltastore.fileio import atomic_write_json, json_crc32c, read_json
from deltastore.reduce import UnlearnPlan, plan_unlearning, run_plan

from .errors import RecorderError, RunDamagedError, SelectionError
from .loops import is_sharded, local_tensor
from .run import Run, UnlearnReport, _damage_is_reported

SHARDING_FILE = "sharding.json"
SHARDING_FORMAT = 1
MAX_WORLD = 1 << 16
_DIR = re.compile(r"rank-\d{5,}")


def shard_dir(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / f"rank-{rank:05d}"


def _plain(name: str) -> str:
    return name.replace("_orig_mod.", "")


def sharding_description(state: dict[str, torch.Tensor], rank: int, uid: str) -> bytes:
    """This rank's part of ``sharding.json`` (JSON bytes): where its shard of every sharded tensor lies."""
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
    return json.dumps({"rank": rank, "uid": uid, "names": [_plain(n) for n in state], "tensors": tensors,
                       "replicated": replicated}).encode()


def write_sharding(run_dir: Path, parts: list[bytes]) -> None:
    """Rank 0: join every rank's description into ``sharding.json`` (atomically, with its own crc32c)."""
    ranks = [json.loads(p) for p in parts]
    head = ranks[0]
    tensors = {}
    for name, t in head["tensors"].items():
        rows = [r["tensors"].get(name, {}).get("rows") for r in ranks]
        if any(n is None for n in rows) or sum(rows) != t["shape"][t["dim"]]:
            raise RecorderError(f"the ranks' shards of {name!r} ({rows} rows) do not make up its shape {t['shape']}")
        tensors[name] = {"dim": t["dim"], "shape": t["shape"], "dtype": t["dtype"], "rows": rows}
    doc = {"format": "amnesiac-sharded", "version": SHARDING_FORMAT, "world_size": len(ranks),
           "shards": [{"dir": shard_dir(Path(), r["rank"]).name, "uid": r["uid"]} for r in ranks],
           "names": head["names"], "tensors": tensors, "replicated": head["replicated"]}
    doc["crc32c"] = json_crc32c(doc)
    atomic_write_json(Path(run_dir) / SHARDING_FILE, doc, durable=True)


def _check_doc(doc: dict, path: Path) -> None:
    def bad(why: str):
        raise RunDamagedError(f"{path / SHARDING_FILE} is damaged or malformed ({why}); the shard stores in "
                              f"{path} are still readable one by one with `deltastore verify`")
    if doc.get("crc32c") != json_crc32c(doc):
        bad("its crc32c does not match")
    if doc.get("format") != "amnesiac-sharded" or doc.get("version") != SHARDING_FORMAT:
        bad("unknown format or version")
    world, shards = doc.get("world_size"), doc.get("shards")
    if not (isinstance(world, int) and 1 <= world <= MAX_WORLD and isinstance(shards, list) and len(shards) == world
            and all(isinstance(s, dict) and isinstance(s.get("dir"), str) and _DIR.fullmatch(s["dir"])
                    and isinstance(s.get("uid"), str) for s in shards)):
        bad("bad world size or shard list")
    names, tensors, replicated = doc.get("names"), doc.get("tensors"), doc.get("replicated")
    if not (isinstance(names, list) and isinstance(tensors, dict) and isinstance(replicated, list)
            and all(isinstance(n, str) for n in names) and set(names) == set(tensors) | set(replicated)):
        bad("the tensor names do not add up")
    for name, t in tensors.items():
        ok = (isinstance(t, dict) and isinstance(t.get("shape"), list) and isinstance(t.get("rows"), list)
              and all(isinstance(s, int) and s >= 0 for s in t["shape"]) and isinstance(t.get("dim"), int)
              and 0 <= t["dim"] < len(t["shape"]) and len(t["rows"]) == world
              and all(isinstance(r, int) and r >= 0 for r in t["rows"]) and sum(t["rows"]) == t["shape"][t["dim"]]
              and isinstance(t.get("dtype"), str))
        if not ok:
            bad(f"the entry of {name!r}")


def open_sharded_run(path: str | Path) -> ShardedRun:
    path = Path(path)
    with _damage_is_reported(path):
        try:
            doc = read_json(path / SHARDING_FILE, "the sharding description")
        except DeltaStoreError as e:
            raise RunDamagedError(str(e)) from None
        _check_doc(doc, path)
        stores = []
        try:
            for s in doc["shards"]:
                store = DeltaStore.open(path / s["dir"])
                stores.append(store)
                if store.uid != s["uid"]:
                    raise RunDamagedError(f"{store.path} is not the store {SHARDING_FILE} names (another run's?)")
        except BaseException:
            for store in stores:
                store.close()
            raise
        return ShardedRun(path, doc, stores)


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

    def steps_for(self, *, sample_ids=None, classes=None) -> np.ndarray:
        steps = super().steps_for(sample_ids=sample_ids, classes=classes)
        return steps[steps < self.num_steps]  # rank 0 may have committed a step the others had not (a crash)

    def unlearn_report(self, *, sample_ids=None, classes=None, steps=None, device: str | torch.device = "cpu",
                       progress: bool = False, **reduce_options) -> UnlearnReport:
        """Every rank's shard with the selected steps undone, put together into a complete state_dict."""
        with _damage_is_reported(self.path):
            if steps is not None:
                arr = np.unique(np.asarray(steps, dtype=np.int64).reshape(-1))
                if arr.size and (arr[0] < 0 or arr[-1] >= self.num_steps):
                    raise SelectionError(f"steps must be committed steps 0..{self.num_steps - 1}")
                undo = arr
            else:
                undo = self._selected_steps(sample_ids, classes, None)
            n, parts, totals = self.num_steps, [], np.zeros(3, np.int64)
            seconds, plan_name = 0.0, None
            for store in self.shards:
                plan = plan_unlearning(store, undo)
                if store.num_steps != n:  # a crash left this store ahead: add the common steps to theta_0
                    plan = UnlearnPlan("start", np.setdiff1d(np.arange(n, dtype=np.int64), undo), 1.0, False, undo)
                result = run_plan(store, plan, device=torch.device(device), progress=progress, **reduce_options)
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
        from .errors import ModelMismatchError
        try:
            self.layout.check(model.state_dict())
        except DeltaStoreError as e:
            raise ModelMismatchError(str(e)) from None

