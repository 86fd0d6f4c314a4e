"""Systematic mutation of every file of a run: each flipped bit or truncation is detected (by `deltastore verify`,
which then exits non-zero, and by the read that meets it, naming the step and the tensor), or it provably changes
nothing that can be read.

AMNESIAC_MUTATIONS_PER_FILE (default 8 bit flips per file, plus 3 truncations) sets the depth.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import amnesiac
from amnesiac import AmnesiacError
from deltastore import CorruptionError, DeltaStore, DeltaStoreError
from deltastore.cli import main as deltastore_main
from deltastore.verify import verify_store

FLIPS = int(os.environ.get("AMNESIAC_MUTATIONS_PER_FILE", "8"))


def build_run(path: Path, codec: str, backend: str) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.BatchNorm1d(10), torch.nn.Linear(10, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with amnesiac.Recorder(model, opt, path, codec=codec, backend=backend, chunk_elems=32, durable=False) as rec:
        for t in range(4):
            rec.add_batch([2 * t, 2 * t + 1], labels=[t % 3, 1])
            torch.nn.functional.cross_entropy(model(torch.randn(2, 6)), torch.tensor([t % 3, 1])).backward()
            opt.step()
            opt.zero_grad()


def readout(path: Path) -> dict:
    """Everything a reader can get out of a run."""
    store = DeltaStore.open(path)
    out = {"steps": store.num_steps, "status": store.status, "codec": store.codec.name,
           "layout": store.layout.to_json(), "attrs": store.attrs,
           "meta": {k: (v.values.tolist(), v.offsets.tolist()) for k, v in store.metadata().items()},
           "side": [{k: v.tolist() for k, v in store.side_arrays(s).items()} for s in range(store.num_steps)],
           "deltas": [store.read_step(s).tolist() for s in range(store.num_steps)],
           "start": store.read_snapshot_flat("start").tolist(), "commit": store.commit_record,
           "final": store.read_snapshot_flat("final").tolist() if store.complete else None}
    if store.codec.lossy and store.complete:
        out["residual"] = store.read_snapshot_flat("residual").tolist()
    return out


def step_of(rel: str) -> int | None:
    m = re.match(r"deltas/[^/]+/c/(\d+)/", rel) or re.match(r"deltas/step-(\d+)\.safetensors$", rel)
    return int(m.group(1)) if m else None


def mutations(pristine: Path, rng: random.Random):
    for file in sorted(p for p in pristine.rglob("*") if p.is_file() and p.name != "writer.lock"):
        rel, size = file.relative_to(pristine).as_posix(), file.stat().st_size
        positions = sorted({0, size - 1, size // 2, *(rng.randrange(size) for _ in range(max(0, FLIPS - 3)))})
        for pos in positions:
            yield rel, f"bit {rng.randrange(8)} of byte {pos}", ("flip", pos, rng.randrange(8))
        for cut in sorted({0, size // 2, size - 1}):
            yield rel, f"truncated to {cut} bytes", ("truncate", cut, 0)


def apply(file: Path, op) -> None:
    kind, pos, bit = op
    data = bytearray(file.read_bytes())
    if kind == "flip":
        data[pos] ^= 1 << bit
    else:
        del data[pos:]
    file.write_bytes(bytes(data))


@pytest.mark.slow
@pytest.mark.parametrize("codec,backend", [("fp32", "zarr"), ("fp16", "safetensors"), ("topk:0.25", "zarr")])
def test_every_mutation_is_detected_or_harmless(tmp_path, codec, backend, capsys):
    pristine = tmp_path / "pristine"
    build_run(pristine, codec, backend)
    reference = readout(pristine)
    assert verify_store(DeltaStore.open(pristine))["ok"]
    rng = random.Random(f"{codec}{backend}")
    counts = {"mutations": 0, "detected_at_open": 0, "detected_by_verify": 0, "harmless": 0}
    for rel, what, op in mutations(pristine, rng):
        counts["mutations"] += 1
        case = tmp_path / "case"
        shutil.rmtree(case, ignore_errors=True)
        shutil.copytree(pristine, case)
        apply(case / rel, op)
        label = f"{rel}, {what}"
        try:
            store = DeltaStore.open(case)
        except (DeltaStoreError, AmnesiacError):
            counts["detected_at_open"] += 1
            assert deltastore_main(["verify", "--json", str(case)]) != 0, label
            continue
        report = verify_store(store)
        if report["faults"]:
            counts["detected_by_verify"] += 1
            assert deltastore_main(["verify", "--json", str(case)]) != 0, label
            step = step_of(rel)
            if step is not None:  # a damaged step: verify and the read that meets it name the step and tensor
                assert any(f"step {step}" in f and "tensor" in f for f in report["faults"]), (label, report)
                with pytest.raises(CorruptionError, match=rf"step {step}, tensor"):
                    store.read_step(step)
                run = amnesiac.open_run(case)
                with pytest.raises((DeltaStoreError, AmnesiacError)):
                    run.unlearn(steps=[step])
            continue
        # verify found nothing: then nothing readable may differ
        counts["harmless"] += 1
        assert readout(case) == reference, f"undetected change: {label}"
    capsys.readouterr()
    print(f"\nintegrity {codec}/{backend}: {counts}")
    assert counts["detected_at_open"] + counts["detected_by_verify"] > 0.9 * counts["mutations"], counts


def test_verify_names_step_and_tensor_and_the_cli_exits_non_zero(tmp_path, capsys):
    build_run(tmp_path / "run", "fp32", "zarr")
    store = DeltaStore.open(tmp_path / "run")
    # flip a bit inside the last inner chunk of step 2's shard: the last tensor ("2.bias" or "2.weight")
    shard = tmp_path / "run" / "deltas" / "data" / "c" / "2" / "0"
    data = bytearray(shard.read_bytes())
    data[10] ^= 0x04
    shard.write_bytes(bytes(data))
    report = verify_store(store)
    assert not report["ok"] and report["damaged_steps"] == [2]
    assert any(f.startswith("step 2, tensor") for f in report["faults"]), report["faults"]
    assert deltastore_main(["verify", str(tmp_path / "run")]) == 1
    assert "DAMAGED" in capsys.readouterr().out
    with pytest.raises(CorruptionError, match="step 2, tensor"):
        amnesiac.open_run(tmp_path / "run").unlearn(steps=[2])
    # the other steps still read: one damaged step does not take the run with it
    assert torch.isfinite(store.read_step(1)).all()


def test_missing_files_are_detected(tmp_path):
    build_run(tmp_path / "run", "fp32", "zarr")
    for rel in ["commit.json", "start.safetensors", "final.safetensors", "steps.log", "deltas/data/c/1/0",
                "deltas/data/zarr.json"]:
        case = tmp_path / "case"
        shutil.rmtree(case, ignore_errors=True)
        shutil.copytree(tmp_path / "run", case)
        (case / rel).unlink()
        try:
            ok = verify_store(DeltaStore.open(case))["ok"]
        except DeltaStoreError:
            ok = False
        assert not ok, rel
        assert deltastore_main(["verify", "--json", str(case)]) != 0, rel
    assert np.isfinite(readout(tmp_path / "run")["start"]).all()
