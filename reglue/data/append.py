"""An append-only HDF5 file that survives being killed and a full disk: rows are written, flushed, and only then
counted (the row counter never runs ahead of the data on disk); a rerun with the same run id checks the last
counted batch against its stored hash and resumes after it. Used by the encoder and the sampler."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import warnings
from pathlib import Path

import h5py
import numpy as np

from reglue.fileio import OutputError, abandon_h5, output_error

ATTR_RUN_ID = "run_id"  # hash of what decides the content; a file resumes only under the same id
ATTR_WRITTEN = "written"  # rows durably written
ATTR_LAST_ROWS = "last_batch_rows"  # rows of the last counted batch ...
ATTR_LAST_SHA = "last_batch_sha256"  # ... and the sha256 of their bytes, checked on resume


def batch_sha256(columns: dict, start: int, stop: int) -> str:
    """sha256 over rows [start, stop) of every column (arrays in their stored dtype, or h5py datasets)."""
    digest = hashlib.sha256()
    for name in sorted(columns):
        values = np.asarray(columns[name][start:stop])
        if values.dtype.kind in "OSU":  # strings: h5py reads them back as bytes
            text = "\x00".join(v.decode() if isinstance(v, bytes) else str(v) for v in values.tolist())
            digest.update(text.encode())
        else:
            digest.update(np.ascontiguousarray(values).tobytes())
    return digest.hexdigest()


class AppendFile:
    """Row-appendable datasets ``{name: (row shape, dtype, chunk rows)}`` in one HDF5 file.

    ``display`` is the path named in errors (the user's output, not a partial or part file).
    """

    def __init__(self, path, run_id: str, columns: dict, attrs: dict | None = None, display=None):
        self.path = Path(path)
        self.display = Path(display) if display is not None else self.path
        self.file = None
        with self._writing():
            self.file = self._open_or_resume(run_id, columns)
            if ATTR_RUN_ID not in self.file.attrs:
                for name, (shape, dtype, chunk_rows) in columns.items():
                    self.file.create_dataset(name, (0, *shape), dtype, maxshape=(None, *shape),
                                             chunks=(chunk_rows, *shape))
                self.file.attrs.update({k: v for k, v in (attrs or {}).items() if v is not None})
                self.file.attrs.update({ATTR_RUN_ID: run_id, ATTR_WRITTEN: 0})
                self.file.flush()
        # Kept open: a dataset handle closed mid-run flushes its chunks there, where a write error is only printed.
        self.datasets = {name: self.file[name] for name in columns}

    @contextlib.contextmanager
    def _writing(self):
        """A failed write (full disk) closes the file as the last flush left it and raises OutputError."""
        try:
            yield
        except OutputError:
            raise
        except (OSError, RuntimeError) as exc:
            if self.file is not None:
                abandon_h5(self.file)
            raise output_error(self.display, exc) from None

    def _open_or_resume(self, run_id: str, columns: dict) -> h5py.File:
        if self.path.exists():
            try:
                file = h5py.File(self.path, "a")
            except OSError as exc:
                if "unable to lock file" in str(exc).lower():  # in use by a live process: never deleted
                    raise OutputError(errno.EBUSY, "in use by another process (HDF5 file lock)",
                                      str(self.display)) from None
                file = None
            if file is not None:
                why = self._resumable(file, run_id, columns)
                if why is None:
                    return file
                file.close()
                warnings.warn(f"{self.path}: {why}; starting it again", stacklevel=3)
            else:
                warnings.warn(f"{self.path}: unreadable after an interruption; starting it again", stacklevel=3)
            self.path.unlink()
        return h5py.File(self.path, "w")

    @staticmethod
    def _resumable(file: h5py.File, run_id: str, columns: dict) -> str | None:
        """None when ``file`` can be resumed (same run, last counted batch intact), else why not."""
        try:
            if file.attrs.get(ATTR_RUN_ID) != run_id or not all(name in file for name in columns):
                return "left by a different run"
            rows = int(file.attrs[ATTR_WRITTEN])
            if any(file[name].shape[0] < rows for name in columns):
                return f"counts {rows} rows but holds fewer (a failed write)"
            last = int(file.attrs.get(ATTR_LAST_ROWS, 0))
            if last and batch_sha256({n: file[n] for n in columns}, rows - last, rows) != file.attrs[ATTR_LAST_SHA]:
                return "its last counted rows do not match their hash (a failed write)"
            for name in columns:  # drop rows past the last flush (a process killed mid-append)
                if file[name].shape[0] != rows:
                    file[name].resize(rows, axis=0)
            return None
        except (OSError, RuntimeError, KeyError, ValueError):
            return "unreadable after an interruption"

    @property
    def written(self) -> int:
        """Rows durably written."""
        return int(self.file.attrs[ATTR_WRITTEN])

    def append(self, rows: dict, progress: dict | None = None) -> None:
        """Append equally long arrays ``{name: values}``; flush them, then record the count and ``progress``.

        A write error (full disk) closes the file as the last flush left it and raises OutputError.
        """
        start = self.written
        n = len(next(iter(rows.values())))
        rows = {name: values if self.datasets[name].dtype.kind == "O" else
                np.asarray(values, dtype=self.datasets[name].dtype) for name, values in rows.items()}
        with self._writing():
            for name, values in rows.items():
                ds = self.datasets[name]
                ds.resize(start + n, axis=0)
                if n:
                    ds[start:] = values
            self.file.flush()  # the rows reach the file before the counter says they did
            self.file.attrs.update(progress or {})
            self.file.attrs.update({ATTR_WRITTEN: start + n, ATTR_LAST_ROWS: n,
                                    ATTR_LAST_SHA: batch_sha256(rows, 0, n)})
            self.file.flush()

    def column(self, name: str) -> np.ndarray:
        """Every written value of one (small) column."""
        return self.file[name][: self.written]

    def close(self) -> None:
        """Close (idempotent); the file stays for a later resume."""
        if self.file.id.valid:
            with self._writing():
                self.datasets.clear()
                self.file.close()

    def finish(self, final_path, attrs: dict | None = None) -> Path:
        """Record ``attrs``, close, and rename to ``final_path`` (atomic on one file system)."""
        with self._writing():
            self.file.attrs.update(attrs or {})
            self.file.flush()
        self.close()
        os.replace(self.path, final_path)
        return Path(final_path)
