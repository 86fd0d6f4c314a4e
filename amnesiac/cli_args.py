"""Reading and checking the command line's arguments: careless input is answered with one line naming the remedy.

Everything here raises :class:`UsageError` (exit status 2 in the command line) before any work is done or anything
is written, and never allocates in proportion to a number the user typed before checking it.

Example:
    >>> parse_ids("1,2,5-7").tolist()
    [1, 2, 5, 6, 7]
    >>> parse_ids("5-1", option="--samples")
    Traceback (most recent call last):
    ...
    amnesiac.cli_args.UsageError: --samples: the range 5-1 is empty (its end is below its start); write it as 1-5
    >>> parse_ids("0-99999999999", option="--samples", limit=1796, what="sample id")
    Traceback (most recent call last):
    ...
    amnesiac.cli_args.UsageError: --samples: the range 0-99999999999 goes beyond the largest sample id of this run, \
1796; give values from 0 to 1796
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from .errors import AmnesiacError

MAX_IDS = 100_000_000  # without a run to bound them, no selection of more ids than this (800 MB as int64)
ID_HELP = "ids like 1,2,5-9 or @FILE (ids separated by commas, spaces or newlines)"


class UsageError(AmnesiacError, ValueError):
    """A command line argument cannot be used as given; the message names the remedy."""


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line on stderr (the usage block is what ``--help`` is for)."""

    def error(self, message: str):  # noqa: D102 - argparse's hook
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_at_least(minimum: int, wording: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {wording}, got {text}")
        return value
    return parse


positive_int = _int_at_least(1, "a positive integer")
positive_int.__doc__ = """An argparse type: an integer of at least 1 (``positive_int("3") == 3``)."""
non_negative_int = _int_at_least(0, "0 or more")
non_negative_int.__doc__ = """An argparse type: an integer of at least 0 (``non_negative_int("0") == 0``)."""


def positive_float(text: str) -> float:
    """An argparse type: a finite number above 0.

    >>> positive_float("1e-3")
    0.001
    """
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def parse_ids(text: str, *, option: str = "ids", limit: int | None = None, what: str = "id") -> np.ndarray:
    """Read ``"1,2,5-9"`` or ``@FILE`` into an int64 array, refusing what cannot be meant.

    Args:
        text: the argument as typed.
        option: the option's name, for the messages (``"--samples"``).
        limit: the largest value that can mean anything (the run's largest sample id, class or step); a range
            reaching beyond it is refused before anything is allocated.
        what: what one value is, for the messages (``"sample id"``).

    Raises:
        UsageError: an empty argument, a missing or unreadable file, a reversed range, a range beyond ``limit``,
            or text that is not an integer.
    """
    source = text
    if text.startswith("@"):
        path = Path(text[1:])
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise UsageError(f"{option} {source}: no such file; give {ID_HELP}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"{option} {source}: cannot read the file ({e}); give {ID_HELP}") from None
    parts = [p for p in text.replace("\n", ",").replace(" ", ",").replace("\t", ",").split(",") if p]
    if not parts:
        where = f"the file {source[1:]} holds no ids" if source.startswith("@") else "is empty"
        raise UsageError(f"{option} {where}; give {ID_HELP}")
    out: list[np.ndarray] = []
    total = 0
    for part in parts:
        lo, hi = _range(part, option)
        if hi < lo:
            raise UsageError(f"{option}: the range {part} is empty (its end is below its start); write it as "
                             f"{hi}-{lo}")
        if limit is not None and hi > limit and lo != hi:  # (a single unknown value is named by the caller)
            raise UsageError(f"{option}: the range {part} goes beyond the largest {what} of this run, {limit}; "
                             f"give values from 0 to {limit}")
        total += hi - lo + 1
        if total > MAX_IDS:
            raise UsageError(f"{option}: more than {MAX_IDS:,} values selected; select fewer")
        out.append(np.arange(lo, hi + 1, dtype=np.int64))
    return np.concatenate(out)


def _range(part: str, option: str) -> tuple[int, int]:
    """``"5"`` -> (5, 5), ``"5-9"`` -> (5, 9), ``"-3"`` -> (-3, -3)."""
    try:
        if "-" in part[1:]:
            cut = part.index("-", 1)
            return int(part[:cut]), int(part[cut + 1:])
        return int(part), int(part)
    except ValueError:
        raise UsageError(f"{option}: cannot read {part!r} as an integer or a range like 5-9") from None


def parse_device(name: str, option: str = "--device"):
    """A ``torch.device`` that exists on this machine.

    >>> parse_device("cpu")
    device(type='cpu')
    >>> parse_device("gpu")
    Traceback (most recent call last):
    ...
    amnesiac.cli_args.UsageError: --device gpu is not a device name; use cpu, cuda or cuda:N
    """
    import torch
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"{option} {name} is not a device name; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"{option} {name} was asked for but this machine has no usable CUDA device; use "
                             f"{option} cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"{option} {name}: this machine has {torch.cuda.device_count()} CUDA device(s); use "
                             f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    elif device.type not in ("cpu", "mps"):
        raise UsageError(f"{option} {name}: only cpu and cuda devices are supported")
    return device


def check_weights_file(path: str, option: str = "--weights") -> None:
    """Refuse a ``--weights`` file that is missing or is not safetensors, before anything is loaded."""
    from safetensors import SafetensorError, safe_open
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{option} {path}: no such file; give a .safetensors file written by `amnesiac forget "
                         "--out`")
    if not p.is_file():
        raise UsageError(f"{option} {path} is not a file; give a .safetensors file written by `amnesiac forget "
                         "--out`")
    try:
        with safe_open(str(p), "pt") as f:
            f.keys()
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise UsageError(f"{option} {path} is not a safetensors file ({reason}); give a file written by "
                         "`amnesiac forget --out`") from None


def check_keep_class(labels, num_classes: int, keep_class: int, keep_count: int, dataset: str) -> None:
    """Refuse ``--keep-class`` outside the data set's classes and ``--keep-count`` above the class's size.

    >>> import torch
    >>> check_keep_class(torch.tensor([0, 1, 1]), 2, 1, 5, "toy")
    Traceback (most recent call last):
    ...
    amnesiac.cli_args.UsageError: --keep-count 5: toy has only 2 training samples of class 1; give at most 2
    """
    if not 0 <= keep_class < num_classes:
        raise UsageError(f"--keep-class {keep_class}: {dataset} has classes 0 to {num_classes - 1}; give one of "
                         "them")
    members = int((labels == keep_class).sum())
    if keep_count > members:
        raise UsageError(f"--keep-count {keep_count}: {dataset} has only {members} training samples of class "
                         f"{keep_class}; give at most {members}")


def note(message: str) -> None:
    """A line for the user on stderr (warnings, notices): stdout stays the command's result."""
    print(message, file=sys.stderr, flush=True)
