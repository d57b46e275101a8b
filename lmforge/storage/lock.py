"""One writer per run directory: an exclusive `flock` on `<run>/lmforge.lock`, held for the job's life.

Why flock: the kernel releases it when the holder dies (SIGKILL, OOM, a crashed node's NFS
lease), so a stale lock never needs manual cleanup: the next job simply gets it and rewrites the
holder line. The file itself is never deleted (deleting a lock file others may have open makes two
holders possible); its content names the last holder (host, pid, start time) for the message a
second job prints.

Who holds it: `lmforge train` in one process; the `--nproc` launcher for its torchrun job (the
open file is passed on to torchrun, so the lock lives as long as torchrun does, and its workers,
restarts included, are told by LMFORGE_RUN_LOCK that it is held for them); global rank 0 when
torchrun is started directly.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

__all__ = ["LOCK_ENV", "LOCK_NAME", "RunDirBusy", "RunLock", "holder_if_locked"]

log = logging.getLogger(__name__)

LOCK_NAME = "lmforge.lock"
LOCK_ENV = "LMFORGE_RUN_LOCK"  # set for workers: the resolved run dir whose lock their launcher holds


class RunDirBusy(Exception):
    """Another job holds the run directory's lock; the message is one line naming it."""


def _describe(text: str) -> str:
    try:
        d = json.loads(text)
        return f"host {d['host']}, pid {d['pid']}, since {d['since']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"


def holder_if_locked(run_dir: Path) -> str:
    """'' when nobody holds `run_dir`'s lock (or there is none); else who does."""
    path = Path(run_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return ""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _describe(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
    finally:
        os.close(fd)  # also drops the shared lock taken just now
    return ""


class RunLock:
    """`with RunLock(run_dir):` holds the lock (creating the directory) or raises RunDirBusy."""

    def __init__(self, run_dir: Path | str) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
            os.close(fd)
            raise RunDirBusy(f"run directory {self.run_dir} is in use by another lmforge job ({holder}); wait "
                             "for it to end or stop it, or choose another --train.output_dir") from None
        except BaseException:
            os.close(fd)
            raise
        previous = os.pread(fd, 4096, 0).decode("utf-8", "replace")
        if previous.strip():
            log.info("took over the lock of %s (last holder: %s, no longer running)", self.run_dir, _describe(previous))
        line = json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                           "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv[:12]}) + "\n"
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, line.encode(), 0)
        except OSError:
            os.close(fd)
            raise
        self.fd = fd
        return self

    def inheritable_fd(self) -> int:
        """The lock's descriptor, made inheritable: a child given it (pass_fds) keeps the lock held
        until it exits too."""
        assert self.fd is not None
        os.set_inheritable(self.fd, True)
        return self.fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # releases the flock (unless a child still holds the same open file)
            self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *_exc: object) -> None:
        self.release()
