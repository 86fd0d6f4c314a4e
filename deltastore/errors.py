"""Errors raised by :mod:`deltastore`.

Every error derives from :class:`DeltaStoreError` and from the built-in exception a caller would naturally catch
(``ValueError``, ``FileNotFoundError``...), so ``except ValueError`` keeps working for code that knows nothing of us.
Messages name the remedy.
"""

from __future__ import annotations


class DeltaStoreError(Exception):
    """Base class of every error raised by deltastore."""


class StoreNotFoundError(DeltaStoreError, FileNotFoundError):
    """The path holds no delta store."""


class StoreExistsError(DeltaStoreError, FileExistsError):
    """A store already exists where a new one was to be created."""


class UnknownCodecError(DeltaStoreError, ValueError):
    """The codec name is not one we know."""


class FormatError(DeltaStoreError, ValueError):
    """A file of the store is malformed, of an unknown version, or outside its bounds."""


class CorruptionError(DeltaStoreError, ValueError):
    """Stored bytes fail their checksum or are missing. The message names the step and the tensor."""


class LayoutMismatchError(DeltaStoreError, ValueError):
    """Tensors given do not match the store's layout."""


class StepSelectionError(DeltaStoreError, IndexError):
    """A requested step does not exist (or is not committed yet)."""


class StoreLockedError(DeltaStoreError, RuntimeError):
    """Another live writer holds the store."""


class WriterError(DeltaStoreError, RuntimeError):
    """The background writer failed; raised once on the training thread, naming the step."""


class ReadOnlyError(DeltaStoreError, PermissionError):
    """A write was attempted on a store opened for reading."""


class InvalidArgumentError(DeltaStoreError, ValueError):
    """An argument is out of its range (the message gives the range)."""
