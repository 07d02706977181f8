"""One writer at a time: an exclusive lock on an output folder.

Two runs writing one store or sweep (two `--resume`s started by accident) would interleave
their commits and corrupt the resume state for good. Each writer holds an advisory `flock` on a
lock file inside the folder for as long as it writes; the file names the holder (pid, host,
command, start time) so the refusal can say who it is. The kernel drops the lock when its
process ends however it ends (kill -9 included), so a lock left by a dead run is stale by
construction: the file may remain, but nobody holds it and the next writer takes it over.

The file is removed on release. A writer that opened the file just before it was removed would
lock a deleted inode, so after locking it checks that the path still names the file it locked,
and otherwise tries again.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from shared.errors import fail

LOCK_FILE = ".lock"


@contextlib.contextmanager
def exclusive(folder: Path, command: str) -> Iterator[None]:
    """Hold the folder's lock (creating the folder) for the duration of the block, or fail with
    one line naming the current holder. A folder created here and left empty (a run refused
    before writing anything) is removed again."""
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    try:
        fd = _acquire(path, command)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                path.unlink()  # still ours: nobody can lock it while we hold it
            os.close(fd)  # releases the flock
    finally:
        if created:
            with contextlib.suppress(OSError):  # not empty, or another run just took it over
                folder.rmdir()


def _acquire(path: Path, command: str) -> int:
    for _ in range(100):  # each retry means the holder released it between our open and lock
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            fail(f"{path.parent} is being written by another run ({_holder(path)}); wait for it "
                 "to finish or stop it, then rerun (with --resume to continue its work)")
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            holder = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                      "since": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv[1:]}
            try:
                os.ftruncate(fd, 0)
                os.write(fd, json.dumps(holder).encode())
            except BaseException:  # a full disk: let go of the lock (and its empty file)
                with contextlib.suppress(OSError):
                    path.unlink()
                os.close(fd)
                raise
            return fd
        os.close(fd)
    raise RuntimeError(f"could not lock {path}")  # pragma: no cover - a livelock of 100 rounds


def _holder(path: Path, wait_s: float = 2.0) -> str:
    """Who holds the lock, from its file; a holder that has just locked it writes its record a
    moment later, so an empty or partial record is read again for up to `wait_s`."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            h = json.loads(path.read_text())
            return f"{h['command']}, pid {h['pid']} on host {h['host']}, since {h['since']}"
        except (OSError, ValueError, KeyError, TypeError):
            if time.monotonic() > deadline:
                return "a process that has not yet said who it is"
            time.sleep(0.05)
