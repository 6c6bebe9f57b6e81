"""One process at a time per run directory: an exclusive ``fcntl.flock`` on a lock file beside it.

Two runs writing one folder would interleave stage outputs (``results.json`` of one, ``metrics.json`` of the other),
so a second process is refused at once, told the holder's PID, host and start time. The lock is the kernel's, not
the file's existence: a process killed with ``kill -9`` loses it with its file descriptors, so a stale lock file
is simply taken over (and the takeover is logged with the dead holder's PID). The file sits beside the run
directory (``<output_dir>/.<name>.lock``), not inside it, so that ``--force`` can delete the directory while
holding the lock; it is removed on a clean exit.

The unlink-on-release race (B opens the file, A unlinks it and unlocks, B locks an orphan) is closed by checking,
after locking, that the path still names the locked inode, and retrying otherwise.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["RunLock", "RunLockedError", "lock_path"]


class RunLockedError(RuntimeError):
    """Another live process holds the run directory's lock."""


def lock_path(run_dir: Path) -> Path:
    return run_dir.with_name(f".{run_dir.name}.lock")


def _read_holder(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def describe_holder(holder: dict[str, Any]) -> str:
    if not holder:
        return "a process that has not written its name yet"
    return f"PID {holder.get('pid')} on host {holder.get('host')} (since {holder.get('started')}: {holder.get('command', '?')})"


class RunLock:
    """Context manager: hold the lock of ``run_dir`` or raise :class:`RunLockedError` at once (never waits)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.path = lock_path(run_dir)
        self.fd: int | None = None
        self.took_over: dict[str, Any] | None = None  # the previous holder's record when a stale lock was taken

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(100):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
                holder = _read_holder(self.path)
                raise RunLockedError(
                    f"run directory {self.run_dir} is in use by {describe_holder(holder)}; wait for it to finish, "
                    f"or stop it, or write elsewhere (--output-dir / name=...). If that process is gone and this "
                    f"persists (a lock on a network file system), delete {self.path}"
                ) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the holder removed the file between our open and our lock: start again
                os.close(fd)
                continue
            self.fd = fd
            previous = _read_holder(self.path)
            self.took_over = previous or None
            record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                      "command": " ".join(sys.argv)[:300]}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
            os.fsync(fd)
            return self
        raise RunLockedError(f"could not lock {self.path}: it kept being replaced; try again")

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self.fd)  # closing releases the flock
            self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
