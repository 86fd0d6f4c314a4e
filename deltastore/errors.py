"""Errors raised by :mod:`deltastore`.

Every error derives from :class:`DeltaStoreError` and from the built-in exception a caller would naturally catch
(``ValueError``, ``FileNotFoundError``...), so ``except ValueError`` keeps working for code that knows nothing of us.
Messages name the remedy.

Errors carry data, not only text: a :class:`CorruptionError` has fields (``step``, ``stream``, ``chunk``,
``tensors``, ``path``...) that the layer which knows each one fills in, once (:meth:`CorruptionError.add_context`
never overwrites a field), and its message is composed from them. Nothing parses a message to find them again.

Example:
    >>> e = CorruptionError("fails its crc32c checksum", step=2, stream="data", chunk=0)
    >>> _ = e.add_context(tensors=("fc.weight",), step=99)  # step was known already: it stays 2
    >>> e.step, e.tensors, str(e)
    (2, ('fc.weight',), "step 2, tensor 'fc.weight' (data chunk 0, stream 'data'): fails its crc32c checksum")
"""

from __future__ import annotations

from pathlib import Path

# Exceptions that mean "the code is wrong", never "the data is damaged": readers let them through unchanged, so a bug
# is never reported to a user as a damaged run.
PROGRAMMING_ERRORS: tuple[type[BaseException], ...] = (AttributeError, TypeError, NameError, AssertionError,
                                                       NotImplementedError, ImportError)


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
    """Stored bytes fail their checksum, are missing or decode to the wrong size.

    Attributes (``None`` where the raising layer did not know them; see :meth:`add_context`):
        detail: what is wrong, without the location (``"fails its crc32c checksum"``).
        path: the file concerned.
        step: the step whose data is damaged.
        stream: the codec stream (``"data"``, ``"values"``, ``"indices"``).
        chunk: the one data chunk found damaged, when the reader could tell.
        chunks: the half-open range ``(first, end)`` of data chunks that was being read.
        tensors: names of the tensors the damaged elements belong to.
        store_path: the store, when known: the message then names the command that lists all damage.
    """

    _FIELDS = ("path", "step", "stream", "chunk", "chunks", "tensors", "store_path")

    def __init__(self, detail: str, *, path: str | Path | None = None, step: int | None = None,
                 stream: str | None = None, chunk: int | None = None, chunks: tuple[int, int] | None = None,
                 tensors: tuple[str, ...] | list[str] | None = None, store_path: str | Path | None = None):
        super().__init__(detail)
        self.detail = detail
        self.path = path
        self.step = step
        self.stream = stream
        self.chunk = chunk
        self.chunks = chunks
        self.tensors = tuple(tensors) if tensors is not None else None
        self.store_path = store_path

    def add_context(self, **fields) -> CorruptionError:
        """Fill in the fields still unknown; a field already set keeps its value. Returns ``self``.

        A layer adds what only it knows (the store knows which tensors a chunk holds, the reduce which step it
        was reading) and re-raises the same exception.
        """
        for name, value in fields.items():
            if name not in self._FIELDS:
                raise TypeError(f"CorruptionError has no field {name!r}")
            if value is not None and getattr(self, name) is None:
                setattr(self, name, tuple(value) if name == "tensors" else value)
        return self

    def location(self) -> str:
        """``step S, tensors 'a', 'b' (data chunk C, stream 'x')`` from the fields known ('' when none are)."""
        parts = []
        if self.step is not None:
            parts.append(f"step {self.step}")
        if self.tensors is not None:
            names = self.tensors
            shown = ", ".join(repr(n) for n in names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
            parts.append(f"tensor{'s' if len(names) != 1 else ''} {shown or '(none)'}")
        where = []
        if self.chunk is not None:
            where.append(f"data chunk {self.chunk}")
        elif self.chunks is not None:
            c0, c1 = self.chunks
            where.append(f"data chunk {c0}" if c1 == c0 + 1 else f"data chunks {c0}..{c1 - 1}")
        if self.stream is not None:
            where.append(f"stream {self.stream!r}")
        text = ", ".join(parts)
        if where:
            text = f"{text} ({', '.join(where)})" if text else ", ".join(where)
        return text

    def describe(self) -> str:
        """The message without the remedy: location, what is wrong, and the file."""
        where = self.location()
        text = f"{where}: {self.detail}" if where else self.detail
        return f"{text} ({self.path})" if self.path is not None and str(self.path) not in self.detail else text

    def __str__(self) -> str:
        text = self.describe()
        if self.store_path is not None:
            text += f". Run `deltastore verify {self.store_path}` for the full list."
        return text

    def __reduce__(self):  # keep the fields across pickling (multiprocessing, pytest-xdist)
        return _rebuild_corruption, (self.detail, {name: getattr(self, name) for name in self._FIELDS})


def _rebuild_corruption(detail: str, fields: dict) -> CorruptionError:
    return CorruptionError(detail, **fields)


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


class DeviceUnavailableError(InvalidArgumentError):
    """The device asked for does not exist on this machine (``cuda`` without CUDA, a GPU index too high).

    A problem with the caller's machine, never with the stored data.
    """
