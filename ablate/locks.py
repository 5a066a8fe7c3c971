"""Exclusive locks between processes, and the temporary files a killed lock holder left behind.

A lock is ``flock`` on a lock file: the kernel releases it when the holding process ends in any way,
SIGKILL and a lost shell included, so a lock never outlives its holder and never needs breaking by
hand. ``ablate`` takes one around a run (``<run dir>/.lock``), around a recipe in a sweep directory,
around building a data cache, around a GPU and around a sweep invocation's outcomes.

While a lock is held nobody else writes where it guards, so a temporary file found there (``*.tmp``,
``ablate.records.atomic_file``'s naming) that is older than the holder's lock is left by a process
killed mid-write: ``remove_stale_temps`` deletes it.
"""
from __future__ import annotations

import contextlib
import os
import socket
import time
from pathlib import Path
from typing import IO, Optional

try:
    import fcntl
except ImportError:  # not POSIX: locks are not available, callers carry on unlocked
    fcntl = None  # type: ignore[assignment]

TMP_SUFFIX = ".tmp"
LOCK_MODE = 0o644  # as records.FILE_MODE (records imports this module, not the other way round)


class Busy(RuntimeError):
    """What a lock guards is held by another live process."""


class Lock:
    """A held lock; ``release`` (or leaving a ``with`` block, or the process ending) frees it."""

    def __init__(self, path: Path, handle: Optional[IO[str]]) -> None:
        self.path = path
        self.handle = handle
        self.since = time.time()  # temporary files older than this are stale (remove_stale_temps)

    def release(self) -> None:
        if self.handle is not None:
            self.handle.close()  # closing the last descriptor drops the flock
            self.handle = None

    def __enter__(self) -> "Lock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def try_lock(path: Path) -> Optional[Lock]:
    """Take the exclusive lock on ``path`` (created if need be) at once, or return None when another
    process holds it. The lock file then names its holder (pid, host, time) for messages.
    Without flock (not POSIX) the returned lock guards nothing. OSError when the file cannot be made."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, LOCK_MODE), "a+")
    with contextlib.suppress(OSError):  # another user's lock file: readable as it is
        os.fchmod(handle.fileno(), LOCK_MODE)  # whatever the umask, so colleagues can read who holds it
    if fcntl is None:
        return Lock(path, handle)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        return None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
    handle.flush()
    return Lock(path, handle)


def wait_lock(path: Path, timeout: float, poll: float = 0.2) -> Optional[Lock]:
    """The lock on ``path``, waiting up to ``timeout`` seconds for its holder to finish (polled, so
    that a stopped holder cannot hang the waiter forever); None when it is still held then."""
    deadline = time.monotonic() + timeout
    while True:
        lock = try_lock(path)
        if lock is not None or time.monotonic() >= deadline:
            return lock
        time.sleep(poll)


def is_held(path: Path) -> bool:
    """Whether a live process holds the lock on ``path`` (False when there is no such file)."""
    if fcntl is None or not Path(path).is_file():
        return False
    try:
        lock = try_lock(path)
    except OSError:
        return False
    if lock is None:
        return True
    lock.release()
    return False


def holder(path: Path) -> str:
    """Who holds the lock on ``path``, as its lock file says ('another process' when it says nothing)."""
    try:
        text = Path(path).read_text().strip()
    except OSError:
        text = ""
    return text or "another process"


def remove_stale_temps(directory: Path, pattern: str = f"*{TMP_SUFFIX}", before: float | None = None) -> list[Path]:
    """Delete the temporary files matching ``pattern`` in ``directory`` last written before ``before``
    (a lock's ``since``; default now). Call it only while holding the lock that guards the directory,
    so that no live writer's file can match. Returns what was removed."""
    cutoff = time.time() if before is None else before
    removed = []
    for path in Path(directory).glob(pattern):
        try:
            if path.is_file() and path.stat().st_mtime < cutoff:
                path.unlink()
                removed.append(path)
        except OSError:  # gone already, or not ours to remove: the next holder tries again
            continue
    return removed
