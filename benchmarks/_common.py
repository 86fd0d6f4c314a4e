"""Helpers shared by the benchmark scripts (each script puts this folder on sys.path to import it)."""

from __future__ import annotations

from pathlib import Path


def cpu_model() -> str:
    """The processor's model name as /proc/cpuinfo gives it ("unknown" where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def one_line_parser(**kwargs):
    """An argument parser whose errors are one line naming the remedy (exit status 2), as the project's CLIs."""
    from amnesiac.cli_args import OneLineParser
    return OneLineParser(**kwargs)


def check_names(parser, option: str, text: str, known) -> None:
    """Refuse (through ``parser.error``) a comma-separated list holding a name that is not in ``known``."""
    for name in text.split(","):
        if name not in known:
            parser.error(f"argument {option}: unknown name {name!r}; choose from {', '.join(known)}")


def check_codecs(parser, option: str, text: str) -> None:
    """Refuse (through ``parser.error``) a comma-separated list of codecs holding one that does not exist."""
    from deltastore import UnknownCodecError
    from deltastore.codecs import parse_codec
    for name in text.split(","):
        try:
            parse_codec(name, numel=1, chunk_elems=1)
        except UnknownCodecError as e:
            parser.error(f"argument {option}: {e}")
