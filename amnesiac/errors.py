"""Errors raised by :mod:`amnesiac`; each also subclasses the built-in a caller would catch."""

from __future__ import annotations


class AmnesiacError(Exception):
    """Base class of every error raised by amnesiac."""


class SelectionError(AmnesiacError, ValueError):
    """An unlearning request selects nothing valid: no selection, two selections, unknown ids or classes."""


class RunNotFoundError(AmnesiacError, FileNotFoundError):
    """The path is not a recorded run."""


class RunExistsError(AmnesiacError, FileExistsError):
    """The run directory already holds a run."""


class ModelMismatchError(AmnesiacError, ValueError):
    """A model's tensors do not match the recorded run."""


class RecorderError(AmnesiacError, RuntimeError):
    """The Recorder was used out of order (closed, or a batch of malformed ids)."""


class DataError(AmnesiacError, ValueError):
    """A data set cannot be loaded as asked (missing files, no download allowed, bad arrays)."""


class ResumeError(AmnesiacError, ValueError):
    """A run cannot be resumed from the given model, optimizer or checkpoint (it is not the state at a committed
    step of this run)."""


class RunDamagedError(AmnesiacError, ValueError):
    """A run directory is damaged or malformed in a way the storage layer did not name (its message says what)."""


class RunBusyError(AmnesiacError, RuntimeError):
    """Another process (a live Recorder, a purge) holds the run's writer lock; the message names it."""
