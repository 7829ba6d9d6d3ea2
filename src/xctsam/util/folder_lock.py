"""An advisory lock on an output folder: one writer at a time.

Two trainings into one folder would both write best.pt and training.json and both exit 0, one
model silently lost. The first to start holds `<folder>/.xctsam.lock` (fcntl.flock: the kernel
releases it however the process ends, a crash or kill -9 included) and writes into it who it
is; a second one is refused at once with a one-line `FolderBusy` naming that holder.

The file is removed on release, so a finished folder holds only its outputs (DVC caches model
folders whole); a killed holder leaves it behind unlocked, and the next run takes it over.
Nested use by one thread (a stage around the training loop it calls) holds the lock once.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from xctsam.util.atomic import ensure_folder, remove_created_dirs_on_failure
from xctsam.util.errors import InputError

log = logging.getLogger(__name__)

LOCK_NAME = ".xctsam.lock"
_UNSUPPORTED = frozenset({errno.ENOLCK, errno.EOPNOTSUPP})  # file systems without flock

# (lock file, thread) -> nesting depth: a second thread of this process is refused like any other
_held: dict[tuple[Path, int], int] = {}


class FolderBusy(InputError):
    """Another process (or thread) is writing into this folder."""

    def __init__(self, folder: Path, holder: str) -> None:
        super().__init__(folder, f"in use by another run ({holder})", "wait for it to end, or choose another --out")


def holder_text() -> str:
    """Who holds the lock, as the refused run shows it: pid, host, start time, command."""
    command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv and sys.argv[0] else "python"
    started = datetime.now().astimezone().isoformat(timespec="seconds")
    return f"pid {os.getpid()} on {socket.gethostname()} since {started}: {command}"


@contextmanager
def folder_lock(folder: Path, name: str = LOCK_NAME, *, enabled: bool = True) -> Iterator[None]:
    """Hold `folder/name` within the block, creating `folder` (removed again on failure while
    it is empty); FolderBusy when another holds it, InputError when a file is in the way.
    enabled=False (a DDP rank other than 0): nothing at all, rank 0 holds it for the run."""
    if not enabled:
        yield
        return
    folder = Path(folder)
    with remove_created_dirs_on_failure([folder]):
        ensure_folder(folder)
        key = (folder.resolve() / name, threading.get_ident())
        if key in _held:
            _held[key] += 1
            try:
                yield
            finally:
                _held[key] -= 1
            return
        fd = _acquire(key[0], folder)
        _held[key] = 1
        try:
            yield
        finally:
            del _held[key]
            _release(key[0], fd)


def _acquire(path: Path, folder: Path) -> int:
    """The open, locked lock file, with this process's holder text in it; errors name `folder` as the user gave it."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise InputError(folder, f"cannot create the lock file {path.name} ({exc.strerror})", "choose another --out") from None
        try:
            locked = _try_lock(fd, folder)
        except BaseException:
            os.close(fd)
            raise
        if locked and not _same_file(fd, path):
            os.close(fd)  # the holder removed it on release after we opened it: lock the new one
            continue
        _write_holder(fd)
        return fd


def _try_lock(fd: int, folder: Path) -> bool:
    """True once locked; False where the file system has no flock (the run goes on unguarded)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise FolderBusy(folder, _read_holder(fd)) from None
    except OSError as exc:
        if exc.errno not in _UNSUPPORTED:
            raise
        log.warning("%s: no file locking on this file system; make sure no other run writes here", folder)
        return False
    return True


def _same_file(fd: int, path: Path) -> bool:
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)


def _read_holder(fd: int) -> str:
    text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
    return text or "a process that has not written its name yet"


def _write_holder(fd: int) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, (holder_text() + "\n").encode(), 0)


def _release(path: Path, fd: int) -> None:
    # removed while still locked: a run that opened this file meanwhile sees it gone and retries
    try:
        path.unlink(missing_ok=True)
    finally:
        os.close(fd)
