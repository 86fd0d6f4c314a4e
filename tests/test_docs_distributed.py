"""The examples of docs/distributed.md run as written and print what the page says they print."""

from __future__ import annotations

import os
import re
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
    """Run the examples one after the other in the same torchrun job (one start-up for all)."""
    scripts = []
    for name in names:
        scripts.append(tmp_path / f"{name}_example.py")
        scripts[-1].write_text(EXAMPLES[name])
    driver = tmp_path / "driver.py"
    driver.write_text("import runpy, sys\n"
                      "for script, run_dir in zip(sys.argv[1::2], sys.argv[2::2]):\n"
                      "    sys.argv = [script, run_dir]\n"
                      "    runpy.run_path(script, run_name='__main__')\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", f"--nproc-per-node={ranks}",
           "--master-addr", "127.0.0.1", "--master-port", str(port), str(driver)]
    for name, script in zip(names, scripts):
        cmd += [str(script), str(tmp_path / f"run-{name}")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


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
