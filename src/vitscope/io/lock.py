"""The one run lock: an exclusive advisory lock (``fcntl.flock``) on a lock file, held while a run is written.

The lock dies with its process (no stale lock after a kill, no pid file to take over); the holder's pid is
written into the file so that a second writer is told who holds it. ``vitscope train`` locks ``RUN/.lock``
and refuses a second writer (``RunLockedError``); the studies' pipeline locks ``RUN.lock`` beside the run and
waits for the holder (studies run side by side share runs).
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

_logger = logging.getLogger(__name__)

__all__ = ["RunLockedError", "run_lock"]


class RunLockedError(ValueError):
    """Another process is writing this run directory."""


@contextlib.contextmanager
def run_lock(path: str | os.PathLike, run_dir: str | os.PathLike | None = None, wait: bool = False,
             poll_s: float = 1.0, remove: bool = False) -> Iterator[None]:
    """Hold an exclusive ``flock`` on the file ``path`` (created, with its folder) for the block.

    Args:
        path: the lock file.
        run_dir: what the lock protects, named in messages (default: the lock file's folder).
        wait: wait (polling every ``poll_s`` seconds, one log line) until the holder is done, instead of
            raising :class:`RunLockedError` naming the holder's pid.
        remove: remove the lock file when the block ends (a locker that opened the removed file sees that the
            path names another file once it holds the lock, and locks that one instead).

    Without ``fcntl`` (Windows) nothing is locked (said once on stderr).
    """
    path = Path(path)
    run_dir = Path(run_dir) if run_dir is not None else path.parent
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        _logger.warning("no fcntl on this platform: %s is not locked against a second writer", run_dir)
        yield
        return
    waited = False
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise ValueError(f"cannot create the run directory's lock {path} ({type(err).__name__}: "
                             f"{err.strerror}); choose a writable --out that is not under a file") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = ""
            with contextlib.suppress(OSError, ValueError):
                holder = os.pread(fd, 32, 0).decode().strip()
            os.close(fd)
            who = f"process {holder}" if holder else "another process"
            if not wait:
                raise RunLockedError(
                    f"{run_dir} is being trained by {who} (it holds {path}); wait for it to finish or stop it "
                    f"(kill {holder or 'PID'}), or train into another --out"
                ) from None
            if not waited:
                _logger.info("waiting for %s, which is training %s", who, run_dir)
                waited = True
            time.sleep(poll_s)
            continue
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder removed this file on release: lock the one the path names now
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        if remove:  # while still held: a waiting locker then finds another file under the path and retries
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        os.close(fd)  # releases the lock
