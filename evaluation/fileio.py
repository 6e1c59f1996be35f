"""File errors: one OSError naming the user's path and the operating system's cause of a failed write, an HDF5
file closed safely after a failed write, and the one defensive reader of the project's JSON records (size, encoding,
syntax, depth, type). Shared with reglue (which may import evaluation; never the other way)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import sys
from pathlib import Path

from evaluation.errors import InputError

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


MAX_JSON_BYTES = 64 << 20  # a record of ours (metrics, sweep point, manifest) is kilobytes: a larger file is not one
_JSON_TYPES = {list: "a JSON list", str: "a JSON string", int: "a JSON number", float: "a JSON number",
               bool: "a JSON boolean", type(None): "JSON null"}


class JSONFileError(InputError, ValueError):
    """A JSON file that cannot be what it should be: one line naming the file and the problem; ``problem`` alone
    for callers that word the file into a message of their own."""

    def __init__(self, path, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path, self.problem = path, problem


def read_json_value(path, max_bytes: int = MAX_JSON_BYTES, what: str = "JSON record"):
    """The JSON value in ``path``, read defensively: JSONFileError when it is no regular file, larger than
    ``max_bytes`` (then not read), unreadable, empty, not UTF-8 JSON, nested deeper than the parser goes, or holds
    an integer Python will not convert. ``what`` names the kind of file in the problem."""
    path = Path(path)
    if not path.is_file():
        raise JSONFileError(path, "not a file")
    try:
        size = path.stat().st_size
        data = path.read_bytes() if size <= max_bytes else b""
    except OSError as exc:
        raise JSONFileError(path, f"unreadable ({type(exc).__name__})") from None
    if size > max_bytes:
        raise JSONFileError(path, f"{size:,} bytes, more than any {what} ({max_bytes:,})")
    if not data.strip():
        raise JSONFileError(path, "empty")
    try:
        return json.loads(data.decode("utf-8"))
    except RecursionError:
        raise JSONFileError(path, f"nested too deeply to be a {what}") from None
    except ValueError as exc:  # not UTF-8, a JSONDecodeError, or an integer of over 4300 digits
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise JSONFileError(path, f"not a JSON file ({reason})") from None


def read_json_object(path, max_bytes: int = MAX_JSON_BYTES, what: str = "JSON record") -> dict:
    """The JSON object in ``path``, read as ``read_json_value`` reads; JSONFileError when the value is not an object."""
    data = read_json_value(path, max_bytes, what)
    if not isinstance(data, dict):
        raise JSONFileError(path, f"{_JSON_TYPES.get(type(data), 'JSON')}, not an object")
    return data
