"""One process at a time per run directory or output: an advisory lock (fcntl.flock) in a small file beside it.

The kernel releases the lock when its process dies, however it dies, so a lock left by a killed run is simply
taken over. The file holds the holder's pid, named in the refusal. Under torchrun, rank 0 takes it.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path


class LockedError(OSError):
    """Another live process holds the lock; the message names it and its pid."""


class LockFileError(OSError):
    """The lock file could not be made or written (a full disk, a read-only directory): ``filename`` is the
    directory or output the lock guards, the message names the lock file and the cause."""


class OutputLock:
    """Hold ``lock_path`` for as long as this object lives (or until ``release``); ``what`` is named in refusals."""

    def __init__(self, lock_path: str | os.PathLike, what: str | os.PathLike):
        self.path, self.what, self.fd = Path(lock_path), str(what), None

    def acquire(self) -> "OutputLock":
        """Take the lock, or raise LockedError naming the holder's pid (LockFileError when the lock file cannot
        be made or written, e.g. on a full disk: nothing is left behind)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = self._open_locked()
        except OSError as exc:
            if isinstance(exc, LockedError):
                raise
            raise self._error(exc) from None
        try:
            os.ftruncate(fd, 0)
            pid = f"{os.getpid()}\n".encode()
            if os.write(fd, pid) != len(pid):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as exc:
            self.path.unlink(missing_ok=True)  # ours (we hold it): as release() does
            os.close(fd)
            raise self._error(exc) from None
        self.fd = fd
        return self

    def _open_locked(self) -> int:
        """A descriptor of the lock file with the lock held; LockedError when another process holds it."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise LockedError(errno.EAGAIN, f"in use by another reglue process (pid {holder}); wait for it to "
                                                "finish or stop it", self.what) from None
            except OSError:
                os.close(fd)
                raise
            if self._still_linked(fd):  # not a file its last holder removed while we were opening it
                return fd
            os.close(fd)

    def _error(self, exc: OSError) -> LockFileError:
        """LockFileError naming what the lock guards, the lock file and the operating system's cause."""
        code = exc.errno or errno.EIO
        return LockFileError(code, f"cannot write the lock file {self.path.name}: {os.strerror(code)}", self.what)

    def _still_linked(self, fd: int) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def release(self) -> None:
        """Remove the lock file, then let go (a process that opened the removed file retries on the new one)."""
        if self.fd is not None:
            self.path.unlink(missing_ok=True)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def directory_lock(directory: str | os.PathLike) -> OutputLock:
    """The lock of a run or output directory: ``DIR/.lock``."""
    return OutputLock(Path(directory) / ".lock", directory)


def file_lock(path: str | os.PathLike) -> OutputLock:
    """The lock of an output file: ``.NAME.lock`` beside it."""
    path = Path(path)
    return OutputLock(path.parent / f".{path.name}.lock", path)
