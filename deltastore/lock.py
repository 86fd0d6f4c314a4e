"""One writer per store: a lock file naming the writer's host and process id.

A crashed writer must not leave the store locked forever: a lock held by a process that no longer exists on this
host is stale and is taken over. A lock from another host cannot be checked and is refused with the remedy.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from .errors import StoreLockedError

LOCK_NAME = "writer.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class WriterLock:
    def __init__(self, root: Path):
        self.path = Path(root) / LOCK_NAME
        self.held = False

    def acquire(self) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return
        raise StoreLockedError(f"could not take the writer lock {self.path}")

    def _take_over_if_stale(self) -> None:
        try:
            owner = json.loads(self.path.read_text()[:4096])
            pid, host = int(owner["pid"]), str(owner["host"])
        except FileNotFoundError:
            return  # released meanwhile: try again
        except (ValueError, KeyError, TypeError):
            pid, host = -1, socket.gethostname()  # unreadable: a writer died while writing it
        if host != socket.gethostname():
            raise StoreLockedError(f"the store is being written by process {pid} on host {host!r}. If that "
                                   f"process is gone, delete {self.path} and try again.")
        if pid > 0 and _alive(pid):
            raise StoreLockedError(f"the store is already being written by process {pid} on this host; one "
                                   "writer at a time. Close that Recorder first (or wait for it to finish).")
        self.path.unlink(missing_ok=True)  # stale: its writer died

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
