"""Fuzz the readers over mutated and crafted run directories: open + steps_for + unlearn + verify either succeed
or raise one of our error classes (DeltaStoreError, AmnesiacError); never another exception, never a hang.

Mutations: byte flips, overwritten byte runs, truncations, JSON field replacements (with the file's and the store's
checksums recomputed half of the time, so that crafted-but-consistent files reach the deeper validation), symbolic
links and FIFOs. AMNESIAC_FUZZ_EXAMPLES sets the number of examples (default 40 per run kind).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import amnesiac
from amnesiac import AmnesiacError
from deltastore import DeltaStore, DeltaStoreError
from deltastore.fileio import crc32c, json_crc32c
from deltastore.verify import verify_store

EXAMPLES = int(os.environ.get("AMNESIAC_FUZZ_EXAMPLES", "40"))
TIME_LIMIT_S = 20
HOSTILE_VALUES = [None, -1, 0, 1, 2 ** 63, 2 ** 70, 1.5, float("nan"), True, "", "../../etc/passwd", "/dev/zero",
                  [], {}, [1, 2], {"a": 1}, "x" * 300, [-1], [2 ** 40, 2 ** 40]]


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang("a reader took longer than the time limit")


def build(path: Path, codec: str, backend: str) -> None:
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.Linear(6, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with amnesiac.Recorder(model, opt, path, codec=codec, backend=backend, chunk_elems=16, durable=False) as rec:
        for t in range(3):
            rec.add_batch([t, 10 + t], labels=[t % 3, 2])
            torch.nn.functional.cross_entropy(model(torch.randn(2, 4)), torch.tensor([t % 3, 2])).backward()
            opt.step()
            opt.zero_grad()


@pytest.fixture(scope="module")
def pristine_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    runs = {}
    for codec, backend in [("fp32", "zarr"), ("fp16", "safetensors"), ("topk:0.3", "zarr")]:
        path = root / f"{codec.replace(':', '')}-{backend}"
        build(path, codec, backend)
        runs[(codec, backend)] = path
    incomplete = root / "incomplete"
    build(incomplete, "fp32", "zarr")
    commit = json.loads((incomplete / "commit.json").read_text())
    commit = {k: v for k, v in commit.items() if k in ("steps", "log_bytes")} | {"status": "recording"}
    commit["crc32c"] = json_crc32c(commit)
    (incomplete / "commit.json").write_text(json.dumps(commit))
    runs[("fp32", "incomplete")] = incomplete
    return runs


def _paths(obj, prefix=()):
    """Every key path into a JSON value."""
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:20]):
            yield from _paths(v, prefix + (i,))


def _set(obj, path, value):
    if not path:
        return value
    obj[path[0]] = _set(obj[path[0]], path[1:], value)
    return obj


def reseal(run: Path) -> None:
    """Recompute every checksum the store keeps of its files, as a careful forger would."""
    if any(p.is_symlink() or (p.exists() and not p.is_file() and not p.is_dir()) for p in run.rglob("*")):
        return  # a forger who plants a pipe needs no checksums (and reading it here would block)
    try:
        meta = json.loads((run / "store.json").read_text())
        commit = json.loads((run / "commit.json").read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return
    if not isinstance(meta, dict) or not isinstance(commit, dict):
        return
    for name, holder in (("start", meta), ("final", commit), ("residual", commit)):
        f = run / f"{name}.safetensors"
        if f.is_file() and not f.is_symlink() and f"{name}_crc32c" in holder:
            data = f.read_bytes()
            holder[f"{name}_crc32c"], holder[f"{name}_bytes"] = crc32c(data), len(data)
    from deltastore.validation import _zarr_meta_digest
    if isinstance(meta.get("backend_meta_crc32c"), dict):
        for stream in list(meta["backend_meta_crc32c"]):
            try:
                z = json.loads((run / "deltas" / str(stream) / "zarr.json").read_text())
                meta["backend_meta_crc32c"][stream] = _zarr_meta_digest(z)
            except (OSError, ValueError, UnicodeDecodeError, TypeError, AttributeError):
                pass
    try:
        meta["crc32c"], commit["crc32c"] = json_crc32c(meta), json_crc32c(commit)
        (run / "store.json").write_text(json.dumps(meta))
        (run / "commit.json").write_text(json.dumps(commit))
    except (TypeError, ValueError):
        pass


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10 ** 6), st.integers(0, 7)),
    st.tuples(st.just("overwrite"), st.integers(0, 10 ** 6), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("truncate"), st.integers(0, 10 ** 6), st.none()),
    st.tuples(st.just("json"), st.integers(0, 10 ** 6), st.sampled_from(range(len(HOSTILE_VALUES)))),
    st.tuples(st.just("special"), st.sampled_from(["symlink-out", "symlink-zero", "fifo"]), st.none()),
)


def mutate(run: Path, file_index: int, op) -> str:
    files = sorted(p for p in run.rglob("*") if p.is_file() and p.name != "writer.lock")
    file = files[file_index % len(files)]
    rel = file.relative_to(run).as_posix()
    kind, where, arg = op
    if kind == "special":
        file.unlink()
        if arg is None and where == "fifo":
            os.mkfifo(file)
        else:
            os.symlink("/dev/zero" if where == "symlink-zero" else "/etc/hostname", file)
        return f"{rel}: {where}"
    data = bytearray(file.read_bytes())
    if kind == "json":
        if not file.name.endswith(".json"):
            kind = "overwrite"
            arg = b"\xff\x00{}"
        else:
            try:
                obj = json.loads(data)
            except ValueError:  # already damaged by an earlier mutation
                obj = {}
            paths = list(_paths(obj))
            path = paths[where % len(paths)]
            obj = _set(obj, path, HOSTILE_VALUES[arg])
            file.write_text(json.dumps(obj))
            return f"{rel}: {list(path)} = {HOSTILE_VALUES[arg]!r}"
    pos = where % max(1, len(data))
    if kind == "flip" and data:
        data[pos] ^= 1 << arg
    elif kind == "overwrite":
        data[pos:pos + len(arg)] = arg
    elif kind == "truncate":
        del data[pos:]
    file.write_bytes(bytes(data))
    return f"{rel}: {kind} at {pos}"


def exercise(run_dir: Path) -> None:
    """What a user (or the command line) does with a run directory."""
    run = amnesiac.open_run(run_dir)
    _ = run.num_steps, run.complete, run.spec, run.store.info()
    if run.has_labels:
        run.steps_for(classes=[2])
    steps = run.steps_for(sample_ids=[1])
    run.unlearn(steps=steps)
    run.unlearn(steps=list(range(run.num_steps)))
    run.final_state()
    verify_store(DeltaStore.open(run_dir))


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(kind=st.sampled_from([("fp32", "zarr"), ("fp16", "safetensors"), ("topk:0.3", "zarr"),
                             ("fp32", "incomplete")]),
       ops=st.lists(st.tuples(st.integers(0, 1000), mutation), min_size=1, max_size=3), seal=st.booleans())
def test_readers_raise_only_our_errors_and_never_hang(pristine_runs, tmp_path_factory, kind, ops, seal):
    case = tmp_path_factory.mktemp("case") / "run"
    shutil.copytree(pristine_runs[kind], case)
    labels = [mutate(case, i, op) for i, op in ops]
    if seal:
        reseal(case)
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(TIME_LIMIT_S)
    try:
        exercise(case)
    except (DeltaStoreError, AmnesiacError):
        pass
    except Hang:
        pytest.fail(f"hang: {labels}")
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"{type(e).__name__}: {e} after {labels} (sealed={seal})")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        shutil.rmtree(case.parent, ignore_errors=True)


def test_no_pickle_anywhere():
    """Nothing in the packages can unpickle: no pickle, torch.load or numpy allow_pickle."""
    root = Path(__file__).resolve().parents[1]
    offenders = []
    for pkg in ("deltastore", "amnesiac"):
        for f in (root / pkg).rglob("*.py"):
            text = f.read_text()
            for needle in (r"import pickle", r"pickle\.loads?\(", r"(?<![\w.])torch\.load\(", r"allow_pickle=True",
                           r"import dill", r"import cloudpickle", r"joblib\.load"):
                if re.search(needle, text):
                    offenders.append(f"{f.relative_to(root)}: {needle}")
    assert not offenders, offenders


def test_unknown_versions_and_escaping_paths_are_refused(tmp_path):
    build(tmp_path / "run", "fp32", "zarr")
    meta = json.loads((tmp_path / "run" / "store.json").read_text())
    meta["version"] = 99
    meta["crc32c"] = json_crc32c(meta)
    case = tmp_path / "v99"
    shutil.copytree(tmp_path / "run", case)
    (case / "store.json").write_text(json.dumps(meta))
    with pytest.raises(DeltaStoreError, match="version 99.*Upgrade"):
        amnesiac.open_run(case)
    for target in ["/dev/zero", "../run/steps.log"]:
        case = tmp_path / f"link{len(target)}"
        shutil.copytree(tmp_path / "run", case)
        (case / "steps.log").unlink()
        os.symlink(target, case / "steps.log")
        with pytest.raises(DeltaStoreError, match="symbolic link"):
            amnesiac.open_run(case)
    case = tmp_path / "fifo"
    shutil.copytree(tmp_path / "run", case)
    (case / "deltas" / "data" / "c" / "0" / "0").unlink()
    os.mkfifo(case / "deltas" / "data" / "c" / "0" / "0")
    with pytest.raises(DeltaStoreError, match="not a regular file"):
        amnesiac.open_run(case)
