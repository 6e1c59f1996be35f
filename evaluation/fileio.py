"""Write errors of the evaluation suite: one OSError naming the user's path and the operating system's cause."""

from __future__ import annotations

import errno
import os
import re

_HDF5_CAUSE = re.compile(r"errno = (\d+), error message = '([^']+)'")


def write_error(path, exc: BaseException) -> OSError:
    """One OSError naming ``path`` and the cause of a failed write (h5py hides the errno in its message)."""
    code = getattr(exc, "errno", None)
    match = _HDF5_CAUSE.search(str(exc))
    code = int(match.group(1)) if match else code
    reason = os.strerror(code) if code else (str(exc).splitlines() or [type(exc).__name__])[0]
    return OSError(code or errno.EIO, f"cannot write: {reason}", str(path))
