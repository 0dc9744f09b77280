"""One driver per run directory: an exclusive ``flock`` on ``RUN_DIR/.lock``.

The kernel releases a ``flock`` when its holder dies (even by SIGKILL), so a crashed driver never
leaves a stale lock behind, and no pid bookkeeping decides anything: the pid written into the file
only makes the refusal message useful. The descriptor is not inherited across ``exec``; a process
*forked* without exec shares it and keeps the lock alive, so workers must be spawned, not forked.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from evomerge.store.errors import StoreError

LOCK_NAME = ".lock"


class RunLock:
    """An exclusive lock on a run directory, held until ``release`` or process exit."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, run_dir: Path) -> RunLock:
        """Take the lock or raise a one-line ``StoreError`` naming the process that holds it."""
        path = Path(run_dir) / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StoreError(
                f"{run_dir}: run is in use by another evomerge process (pid {holder}); stop it or use another run directory"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(path, fd)

    @staticmethod
    def in_use(run_dir: Path) -> bool:
        """Whether a live process holds the lock of ``run_dir`` (probed without taking or touching it)."""
        path = Path(run_dir) / LOCK_NAME
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
