"""One writer per store: a lock file naming the writer's host and process id, held with an OS file lock.

The writer holds ``flock(LOCK_EX)`` on ``writer.lock`` for as long as it writes. The kernel drops that lock when the
process dies however it dies (SIGKILL included), so a crashed writer never leaves the store locked: the next writer's
``flock`` succeeds and it takes over. The file's content (pid, host, process start time) only serves the message
that names the live writer. Where ``flock`` is unavailable, or for a lock file written by another host (a shared
file system, whose locks we do not trust), staleness is judged by process id and host: a lock naming a process that
no longer exists on this host (or whose pid now belongs to a younger process) is stale and is taken over; one from
another host cannot be checked and is refused with the remedy.

Release unlinks the file while still holding the lock; an acquirer checks that the file it locked is still the one
at the path (same inode), so two writers can never both believe they hold it.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from .errors import StoreLockedError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

LOCK_NAME = "writer.lock"
MAX_LOCK_BYTES = 4096


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, ValueError):
        return False
    return True


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid from the writer."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode("ascii", "replace")
        return int(stat[stat.rindex(")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _owner(raw: bytes) -> tuple[int, str, int | None]:
    try:
        owner = json.loads(raw[:MAX_LOCK_BYTES])
        start = owner.get("start")
        return int(owner["pid"]), str(owner["host"]), (int(start) if start is not None else None)
    except (ValueError, KeyError, TypeError, AttributeError):
        return -1, socket.gethostname(), None  # unreadable: a writer died while writing it


class WriterLock:
    def __init__(self, root: Path):
        self.path = Path(root) / LOCK_NAME
        self.held = False
        self._fd: int | None = None

    def acquire(self) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
              "start": _start_time(os.getpid())}
        for _ in range(20):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
            try:
                if fcntl is not None:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        raise StoreLockedError(self._busy_message(os.pread(fd, MAX_LOCK_BYTES, 0))) from None
                    if not self._same_file(fd):
                        os.close(fd)  # the previous holder unlinked it meanwhile: lock the new file instead
                        fd = None
                        continue
                    pid, host, _ = _owner(os.pread(fd, MAX_LOCK_BYTES, 0))
                    if pid > 0 and host != socket.gethostname():
                        raise StoreLockedError(self._busy_message(os.pread(fd, MAX_LOCK_BYTES, 0)))
                else:  # pragma: no cover - no flock: judge by pid and host
                    self._refuse_if_live(os.pread(fd, MAX_LOCK_BYTES, 0))
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(me).encode(), 0)
            except BaseException:
                if fd is not None:
                    os.close(fd)
                raise
            self._fd, self.held = fd, True
            return
        raise StoreLockedError(f"could not take the writer lock {self.path}: it keeps changing")

    def _same_file(self, fd: int) -> bool:
        try:
            st = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)

    def _busy_message(self, raw: bytes) -> str:
        pid, host, _ = _owner(raw)
        if host != socket.gethostname():
            return (f"the store is being written by process {pid} on host {host!r}. If that process is gone, "
                    f"delete {self.path} and try again.")
        return (f"the store is already being written by process {pid} on this host; one writer at a time. Close "
                "that Recorder first (or wait for it to finish).")

    def _refuse_if_live(self, raw: bytes) -> None:  # pragma: no cover - platforms without flock
        if not raw:
            return
        pid, host, start = _owner(raw)
        if host != socket.gethostname() or (pid > 0 and pid != os.getpid() and _alive(pid)
                                            and (start is None or _start_time(pid) in (None, start))):
            raise StoreLockedError(self._busy_message(raw))

    def release(self) -> None:
        if self.held:
            try:
                self.path.unlink(missing_ok=True)  # still holding the lock: nobody can have taken it meanwhile
            finally:
                if self._fd is not None:
                    os.close(self._fd)  # drops the flock
                self._fd, self.held = None, False
