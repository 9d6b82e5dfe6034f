"""One training at a time in a run folder: an exclusive lock on ``output_dir`` for the whole life of the run.

A second training started on the folder of a running one would take over its checkpoint and both would overwrite
the same files. :func:`lock_run_folder` (the training config's ``initialize``, before any data is read) takes an
exclusive ``flock`` on ``RUN/.lock`` and writes the holder's process id, host and start time into it; a second
training stops at once naming that process. The operating system releases the lock when the process ends, however
it ends, so a killed run leaves no stale lock (the file itself stays, with its last holder's line); forked
data-loading workers drop their copy of the descriptor, so they never keep it after their parent.

A run that stops before it wrote anything (bad settings or data found after the lock was taken) leaves the folder
as it found it: when the process exits, a lock whose folder holds nothing new removes its lock file and the folders
it created. A folder that holds anything else is never removed.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import fcntl
import itertools
import json
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any

LOCK_FILE = ".lock"  # in the run folder

logger = logging.getLogger(__name__)


class RunLockError(RuntimeError):
    """The run folder is locked by another process (or the lock file cannot be created)."""


def not_a_folder(output_dir: str | Path) -> str | None:
    """The message for an ``output_dir`` that names an existing file (None otherwise), where creating the folder
    would only say "File exists"."""
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        return f"output_dir {path} is a file, but output_dir must be a folder: pass --output_dir with a folder"
    return None


def _entries(folder: Path) -> dict[str, int]:
    """What ``folder`` holds besides the lock file: each entry's name and modification time."""
    with os.scandir(folder) as entries:
        return {e.name: e.stat(follow_symlinks=False).st_mtime_ns for e in entries if e.name != LOCK_FILE}


class RunLock:
    """An exclusive, non-blocking ``flock`` on ``folder/.lock``, held until :meth:`release` or the process ends."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder).resolve()
        self.path = self.folder / LOCK_FILE
        self._fd: int | None = None
        self._created: list[Path] = []  # the folders acquire made, deepest first
        self._found: dict[str, int] = {}  # what the folder held when it was locked

    @property
    def held(self) -> bool:
        return self._fd is not None

    def holder(self) -> dict[str, Any]:
        """What the holder wrote into the lock file ({} when unreadable or not written yet)."""
        try:
            return dict(json.loads(self.path.read_text()))
        except (OSError, ValueError, TypeError):
            return {}

    def _open(self) -> int:
        """A descriptor of the lock file, its folder (and the missing ones above it) created and remembered."""
        if problem := not_a_folder(self.folder):
            raise RunLockError(problem)
        missing = list(itertools.takewhile(lambda path: not path.exists(), (self.folder, *self.folder.parents)))
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as err:
            raise RunLockError(
                f"{self.path} cannot be created ({err.strerror}): pass an --output_dir you can write to"
            ) from err
        self._created = [path for path in missing if path.is_dir()]
        return fd

    def _names_file(self, fd: int) -> bool:
        """Whether the lock file's path still names the file of ``fd``: a run that ended before training removes it,
        and a lock taken on the removed file would lock nothing."""
        try:
            now = os.stat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino)

    def acquire(self) -> RunLock:
        if self.held:
            return self
        while True:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                holder = self.holder()
                who = f"process {holder.get('pid', '?')} ({holder.get('host', '?')}, since {holder.get('since', '?')})"
                raise RunLockError(
                    f"{self.folder} is in use by {who}: wait for it or pass another --output_dir"
                ) from None
            if self._names_file(fd):
                break
            os.close(fd)  # its holder removed it while ending: lock the file that path names now
        self._found = _entries(self.folder)
        line = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(line) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def discard_if_unused(self) -> None:
        """When nothing was written into the folder since it was locked (a run that stopped before training):
        remove the lock file, release the lock and remove the folders :meth:`acquire` created, empty by then. A
        folder that holds anything else is left as it is."""
        if not self.held:
            return
        with contextlib.suppress(OSError):
            if _entries(self.folder) == self._found:
                self.path.unlink()
                self.release()
                for folder in self._created:
                    folder.rmdir()  # raises on a folder that is not empty: it and those above it are kept

    def forget(self) -> None:
        """Drop this process's descriptor without unlocking: in a forked child (a data-loading worker), so that the
        lock is its parent's alone and goes the moment the parent dies, whatever the children still do."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None


_HELD: dict[Path, RunLock] = {}  # the locks of this process, referenced until it ends


def _forget_in_child() -> None:
    for lock in _HELD.values():
        lock.forget()
    _HELD.clear()


def _discard_unused() -> None:
    for lock in _HELD.values():
        lock.discard_if_unused()
    _HELD.clear()


os.register_at_fork(after_in_child=_forget_in_child)
atexit.register(_discard_unused)  # also runs on sys.exit and on an exception, which end a bundle run early


def lock_run_folder(output_dir: str | Path, enabled: bool = True) -> RunLock | None:
    """Lock ``output_dir`` for this process's life (``enabled`` false: nothing, as in all but rank 0 of a
    distributed run). Taking it again in the same process is a no-op. A folder in use stops the run with the
    process holding it, without a traceback."""
    if not enabled:
        return None
    folder = Path(output_dir).resolve()
    if folder in _HELD:
        return _HELD[folder]
    try:
        lock = RunLock(folder).acquire()
    except RunLockError as err:
        logger.error("%s", err)
        sys.exit(f"error: {err}")
    _HELD[folder] = lock
    return lock
