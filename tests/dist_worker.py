"""The training side of tests/test_distributed.py: run under torchrun (2 ranks, gloo) or, for the one-process
reference, imported by the test. Each scenario trains a tiny model on the same global batches and records it."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import amnesiac

LOCAL = 4  # samples per rank per micro-batch
STEPS = 5
ACCUMULATE_FROM = 3  # steps from this one on take two micro-batches (no_sync for the first)


def sample(i: int) -> tuple[torch.Tensor, int]:
    g = torch.Generator().manual_seed(1000 + i)
    return torch.randn(6, generator=g), i % 3


def batch(ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*(sample(i) for i in ids))
    return torch.stack(xs), torch.tensor(ys)


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = torch.nn.Linear(6, 8), torch.nn.Linear(8, 3)
        self.register_buffer("scale", torch.ones(3))  # a replicated floating buffer

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x))) * self.scale


def micro_batches(step: int, world: int) -> int:
    return 2 if step >= ACCUMULATE_FROM else 1


def ids_of(step: int, micro: int, rank: int, world: int) -> list[int]:
    """The ids rank ``rank`` trains on in micro-batch ``micro`` of ``step``; the global batch is all ranks'."""
    base = (step * 2 + micro) * LOCAL * world + rank * LOCAL
    return list(range(base, base + LOCAL))


def train(model, opt, rec, rank: int, world: int, no_sync=None, fail_at: int | None = None,
          steps=range(STEPS), checkpoint_at: tuple[int, Path] | None = None) -> list:
    """The same loop for every rank and for the reference (rank 0 of a world of 1 sees the global batch)."""
    raised = []
    for step in steps:
        k = micro_batches(step, world)
        try:
            for micro in range(k):
                ids = [i for r in ([rank] if world > 1 else range(2)) for i in ids_of(step, micro, r, 2)]
                x, y = (t.to(next(model.parameters()).device) for t in batch(ids))
                rec.add_batch(ids, labels=y)
                ctx = no_sync() if (no_sync is not None and micro < k - 1) else _null()
                with ctx:
                    (torch.nn.functional.cross_entropy(model(x), y) / k).backward()
            opt.step()
            opt.zero_grad()
            if checkpoint_at is not None and step == checkpoint_at[0]:
                assert rec.checkpoint(checkpoint_at[1]) == step + 1  # collective: every rank gets the step
        except Exception as e:  # noqa: BLE001 - reported to the test
            raised.append([step, type(e).__name__, str(e)[:300]])
            break
        if fail_at is not None and step in (fail_at - 1, fail_at) and rec.store is not None:
            rec._writer._work.join()  # rank 0 only: let the writer finish (or fail) what it holds, so the test is
            if step == fail_at - 1:   # deterministic; the other rank waits for it in the next step's exchange
                _break_writer(rec)
    return raised


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _break_writer(rec) -> None:
    """Make every later write fail as a full disk would."""
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    rec.store.backend.write_step = full
    rec.store.backend.begin_step = full  # steps reach the backend piece by piece (deltastore/pieces.py)


def ddp(out: Path, rank: int, world: int) -> dict:
    model = torch.nn.parallel.DistributedDataParallel(Net())
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    rec = amnesiac.Recorder(model, opt, out / "ddp", durable=False)
    touched = rec.store is not None
    raised = train(model, opt, rec, rank, world, no_sync=model.no_sync)
    rec.close()
    return {"raised": raised, "has_store": touched, "steps": rec.steps_submitted}


def ddp_resume(out: Path, rank: int, world: int) -> dict:
    """Checkpoint after step 1, crash after step 3, resume from the checkpoint on every rank, finish."""
    model = torch.nn.parallel.DistributedDataParallel(Net())
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    ckpt = out / "ddp_resume.ckpt.safetensors"
    rec = amnesiac.Recorder(model, opt, out / "ddp_resume", durable=False)
    raised = train(model, opt, rec, rank, world, no_sync=model.no_sync, steps=range(4), checkpoint_at=(1, ckpt))
    rec.close(finalize=False)
    model = torch.nn.parallel.DistributedDataParallel(Net())  # a fresh process would start from scratch
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    rec = amnesiac.Recorder(model, opt, out / "ddp_resume", durable=False, resume=True, checkpoint=ckpt)
    resumed_at = rec.steps_submitted
    raised += train(model, opt, rec, rank, world, no_sync=model.no_sync, steps=range(2, STEPS))
    rec.close()
    return {"raised": raised, "resumed_at": resumed_at}


def ddp_failure(out: Path, rank: int, world: int) -> dict:
    model = torch.nn.parallel.DistributedDataParallel(Net())
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    rec = amnesiac.Recorder(model, opt, out / "ddp_failure", durable=False)
    raised = train(model, opt, rec, rank, world, fail_at=1)
    closed = None
    try:
        rec.close(finalize=False)
    except Exception as e:  # noqa: BLE001
        closed = type(e).__name__
    return {"raised": raised, "close": closed}


def fsdp(out: Path, rank: int, world: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    model = Net()
    mesh = init_device_mesh("cpu", (world,))
    fully_shard(model.fc1, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    rec = amnesiac.Recorder(model, opt, out / "fsdp", durable=False)
    raised = train(model, opt, rec, rank, world)
    rec.close()
    return {"raised": raised, "local_rows": model.fc2.weight.to_local().shape[0]}


def ddp_cuda(out: Path, rank: int, world: int) -> dict:
    """One GPU per rank under NCCL (a 1-GPU DDP smoke: world 1 records as one process, on the GPU)."""
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    model = torch.nn.parallel.DistributedDataParallel(Net().to(device), device_ids=[device.index])
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    with amnesiac.Recorder(model, opt, out / "ddp_cuda", durable=False) as rec:
        raised = train(model, opt, rec, rank, world, no_sync=model.no_sync)
    return {"raised": raised}


SCENARIOS = {"ddp_cuda": ddp_cuda, "ddp": ddp, "ddp_resume": ddp_resume, "ddp_failure": ddp_failure, "fsdp": fsdp}


def reference(run_dir: Path) -> None:
    """One process, the same global batches (the two ranks' micro-batches side by side)."""
    model = Net()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    with amnesiac.Recorder(model, opt, run_dir, durable=False) as rec:
        assert not train(model, opt, rec, 0, 1)


def main() -> None:
    out = Path(sys.argv[1])
    if "ddp_cuda" in sys.argv[2:]:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if "ddp_cuda" in sys.argv[2:] else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    for name in sys.argv[2:]:
        results[name] = SCENARIOS[name](out, rank, world)
    (out / f"result-{rank}.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
