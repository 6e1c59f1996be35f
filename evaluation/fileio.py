"""Write errors: one OSError naming the user's path and the operating system's cause, and an HDF5 file closed
safely after a failed write. Shared with reglue (which may import evaluation; never the other way)."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import sys

_HDF5_CAUSE = re.compile(r"errno = (\d+), error message = '([^']+)'")


def hdf5_errno(exc: BaseException) -> int | None:
    """The errno inside an h5py error message (h5py raises RuntimeError/OSError with it only in the text)."""
    match = _HDF5_CAUSE.search(str(exc))
    return int(match.group(1)) if match else None


def write_error(path, exc: BaseException) -> OSError:
    """One OSError naming ``path`` and the cause of a failed write."""
    code = hdf5_errno(exc) or getattr(exc, "errno", None)
    reason = os.strerror(code) if code else (str(exc).splitlines() or [type(exc).__name__])[0]
    return OSError(code or errno.EIO, f"cannot write: {reason}", str(path))


def abandon_h5(file) -> None:
    """Close an h5py file after a failed write without touching the disk again.

    HDF5 retries the failed writes when the file is closed and again at interpreter exit, where it can crash
    the process (exit 139, after 'Exception ignored' noise). Pointing its file descriptor at /dev/null first lets
    it close cleanly and leaves the file on disk exactly as the last successful flush wrote it.
    """
    if not file.id.valid:
        return
    with contextlib.suppress(Exception):
        handle = file.id.get_vfd_handle()
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, handle)
        os.close(null)
    hook = sys.unraisablehook
    sys.unraisablehook = lambda *args: None
    try:
        with contextlib.suppress(Exception):
            file.close()
    finally:
        sys.unraisablehook = hook
