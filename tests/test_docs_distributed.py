"""The examples of docs/distributed.md run as written and print what the page says they print."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
PAGE = (ROOT / "docs" / "distributed.md").read_text()
EXAMPLES = {m.group(1): m.group(0) for m in re.finditer(r"# example: (\w+).*?(?=```)", PAGE, re.S)}


def expected(code: str) -> str:
    """The comment after the example's last print: what it prints."""
    return re.findall(r"print\(.*\)\s+# (.*)", code)[-1].split(" -- ")[0].strip()


def torchrun(tmp_path, names: list[str], ranks: int = 2) -> str:
    """Run each example in its own torchrun job and return their joined output.

    One job per example: a second ``init_process_group`` in the same processes, on the same rendezvous store, was
    seen to hang in gloo's set-up. On a time-out the whole process group is killed, so no rank is left behind.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    outputs = []
    for name in names:
        script = tmp_path / f"{name}_example.py"
        script.write_text(EXAMPLES[name])
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", f"--nproc-per-node={ranks}",
               "--master-addr", "127.0.0.1", "--master-port", str(port), str(script), str(tmp_path / f"run-{name}")]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                cwd=tmp_path, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            pytest.fail(f"torchrun {name} example timed out after 300 s:\n{out[-2000:]}{err[-3000:]}")
        assert proc.returncode == 0, out[-2000:] + err[-3000:]
        outputs.append(out)
    return "".join(outputs)


def test_every_example_is_found():
    assert sorted(EXAMPLES) == ["amp", "ddp", "fsdp", "hf", "lightning"]


@pytest.mark.parametrize("name", ["amp", "lightning", "hf"])
def test_one_process_examples(tmp_path, name, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(EXAMPLES[name], f"docs/distributed.md ({name})", "exec"), {"__name__": "__main__"})
    assert expected(EXAMPLES[name]) in capsys.readouterr().out


@pytest.mark.slow  # tests/test_distributed.py covers the same paths in the default run
def test_torchrun_examples(tmp_path):
    out = torchrun(tmp_path, ["ddp", "fsdp"])
    for name in ("ddp", "fsdp"):
        assert expected(EXAMPLES[name]) in out
