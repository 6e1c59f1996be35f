"""Atomic file writes and write errors: write beside the target, fsync, then rename over it, so a reader never sees
half a file; a failed write (a full disk) becomes one OutputError naming the user's path and the cause."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import tempfile
from pathlib import Path
from typing import Iterator

import h5py

from evaluation.fileio import abandon_h5, hdf5_errno, write_error

__all__ = ["GuardedH5", "OutputError", "abandon_h5", "atomic_path", "atomic_write_text", "new_h5", "output_error",
           "save_torch", "sweep_temps"]

TEMP_SUFFIX = ".tmp"


class OutputError(OSError):
    """An output could not be written: ``filename`` is the path the user gave, ``strerror`` the cause."""


def output_error(path, exc: BaseException) -> OutputError:
    """OutputError naming ``path`` with the operating system's reason inside ``exc`` (h5py, torch.save, open ...)."""
    if isinstance(exc, OutputError):
        return OutputError(exc.errno, exc.strerror, str(path))
    return OutputError(*write_error(path, exc).args, str(path))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_temps(path: str | os.PathLike) -> list[Path]:
    """Remove temporary siblings ``.NAME.PID.*.tmp`` of ``path`` left by processes that no longer run."""
    path = Path(path)
    pattern = re.compile(re.escape(f".{path.name}.") + r"(\d+)\.[^/]*" + re.escape(TEMP_SUFFIX) + "$")
    removed = []
    if path.parent.is_dir():
        for sibling in path.parent.iterdir():
            match = pattern.match(sibling.name)
            if match and not _pid_alive(int(match.group(1))):
                with contextlib.suppress(FileNotFoundError):
                    sibling.unlink()
                    removed.append(sibling)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the target's directory; on success it replaces ``path``, on error it is removed.

    Temporaries of killed processes (same target, dead pid in the name) are swept first. A write error (full
    disk) is raised as OutputError naming ``path``, not the temporary file.
    """
    path = Path(path)
    sweep_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=TEMP_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, (OSError, RuntimeError)) and _is_write_failure(exc):
            raise output_error(path, exc) from None
        raise


def _is_write_failure(exc: BaseException) -> bool:
    """True for the errors a full disk (or a file size limit, or an unwritable device) produces."""
    if isinstance(exc, OutputError):
        return True
    if getattr(exc, "errno", None) in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EIO, errno.EROFS):
        return True
    text = str(exc)
    return hdf5_errno(exc) is not None or any(t in text for t in ("unexpected pos", "write failed",
                                                                      "failed writing"))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


class _WriteGuard:
    """The file under a new HDF5 file (h5py's fileobj driver): it records the first failed write (a full disk) and
    discards every later write, so HDF5 itself never sees an error. A failed write inside HDF5 otherwise leaves the
    file open with dirty buffers that HDF5 retries when it is closed and again at interpreter exit, where they crash
    the process (exit 139); the file is a temporary that is removed anyway."""

    def __init__(self, path):
        self.file, self.error = open(path, "w+b", buffering=0), None  # unbuffered: a seek never flushes (fails)

    def _guarded(self, call, *args):
        if self.error is None:
            try:
                return call(*args)
            except OSError as exc:
                self.error = exc
        return None

    def _write_all(self, data) -> None:
        view = memoryview(data).cast("B")
        while view:
            written = self.file.write(view)  # a short write (the disk filling up) is followed by one that fails
            if not written:
                raise OSError(errno.EIO, "write wrote nothing")
            view = view[written:]

    def write(self, data) -> int:
        self._guarded(self._write_all, data)
        return len(data)

    def truncate(self, size=None):
        self._guarded(self.file.truncate, size)
        return size

    def flush(self) -> None:
        self._guarded(self.file.flush)

    def seek(self, *args) -> int:
        return self.file.seek(*args)

    def tell(self) -> int:
        return self.file.tell()

    def read(self, *args) -> bytes:
        return self.file.read(*args)

    def readinto(self, buffer) -> int:
        return self.file.readinto(buffer)


class GuardedH5(h5py.File):
    """A new HDF5 file written through a _WriteGuard; ``check()`` raises its first failed write."""

    def __init__(self, path):
        self.guard = _WriteGuard(path)
        try:
            super().__init__(self.guard, "w")
        except BaseException:
            self.guard.file.close()
            raise

    def check(self) -> None:
        """Raise the first failed write so far (the OSError), if any."""
        if self.guard.error is not None:
            raise self.guard.error


@contextlib.contextmanager
def new_h5(path: str | os.PathLike, display: str | os.PathLike | None = None):
    """A new HDF5 file open for writing, for a temporary ``path``; a failed write (HDF5 never sees it, _WriteGuard)
    raises OutputError naming ``display`` (default ``path``) once the file is closed. A long writer calls the
    file's ``check()`` now and then to stop at the first failed write instead of at the end."""
    try:
        file = GuardedH5(path)
    except (OSError, RuntimeError) as exc:
        raise output_error(display or path, exc) from None
    try:
        yield file
        file.close()
    except BaseException as exc:
        with contextlib.suppress(Exception):
            file.close()  # every write after a failed one is discarded: nothing for HDF5 to retry
        if file.guard.error is not None:
            raise output_error(display or path, file.guard.error) from None
        if isinstance(exc, (OSError, RuntimeError)) and _is_write_failure(exc):
            raise output_error(display or path, exc) from None
        raise
    finally:
        file.guard.file.close()
    if file.guard.error is not None:
        raise output_error(display or path, file.guard.error) from None


class _RecordingWriter:
    """A file for torch.save that remembers the operating system's error (torch reports only 'unexpected pos')."""

    def __init__(self, path):
        self.file, self.error = open(path, "wb"), None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self) -> None:
        self.file.flush()


def save_torch(payload, path: str | os.PathLike, display: str | os.PathLike | None = None) -> None:
    """torch.save ``payload`` to ``path``; a failed write raises OutputError naming ``display`` and the real cause."""
    import torch

    writer = _RecordingWriter(path)
    try:
        torch.save(payload, writer)
        writer.file.close()
    except (OSError, RuntimeError) as exc:
        with contextlib.suppress(OSError):
            writer.file.close()
        if writer.error is None and not _is_write_failure(exc):
            raise
        raise output_error(display or path, writer.error or exc) from None
