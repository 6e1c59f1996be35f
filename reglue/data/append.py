"""An append-only HDF5 file that survives being killed: rows are flushed batch by batch with a row counter, and a
rerun with the same run id resumes after the last flushed batch. Used by the encoder and the sampler."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import h5py
import numpy as np

ATTR_RUN_ID = "run_id"  # hash of what decides the content; a file resumes only under the same id
ATTR_WRITTEN = "written"  # rows durably written


class AppendFile:
    """Row-appendable datasets ``{name: (row shape, dtype, chunk rows)}`` in one HDF5 file."""

    def __init__(self, path, run_id: str, columns: dict, attrs: dict | None = None):
        self.path = Path(path)
        self.file = self._open_or_resume(run_id, columns)
        if ATTR_RUN_ID not in self.file.attrs:
            for name, (shape, dtype, chunk_rows) in columns.items():
                self.file.create_dataset(name, (0, *shape), dtype, maxshape=(None, *shape), chunks=(chunk_rows, *shape))
            self.file.attrs.update({k: v for k, v in (attrs or {}).items() if v is not None})
            self.file.attrs.update({ATTR_RUN_ID: run_id, ATTR_WRITTEN: 0})
            self.file.flush()

    def _open_or_resume(self, run_id: str, columns: dict) -> h5py.File:
        if self.path.exists():
            try:
                file = h5py.File(self.path, "a")
                if file.attrs.get(ATTR_RUN_ID) == run_id and all(name in file for name in columns):
                    rows = int(file.attrs[ATTR_WRITTEN])
                    for name in columns:  # drop rows past the last flush (a process killed mid-append)
                        if file[name].shape[0] != rows:
                            file[name].resize(rows, axis=0)
                    return file
                file.close()
                warnings.warn(f"{self.path}: left by a different run; starting it again", stacklevel=3)
            except (OSError, KeyError):
                warnings.warn(f"{self.path}: unreadable after an interruption; starting it again", stacklevel=3)
            self.path.unlink()
        return h5py.File(self.path, "w")

    @property
    def written(self) -> int:
        """Rows durably written."""
        return int(self.file.attrs[ATTR_WRITTEN])

    def append(self, rows: dict, progress: dict | None = None) -> None:
        """Append equally long arrays ``{name: values}``, record ``progress`` attributes, then flush."""
        start = self.written
        n = len(next(iter(rows.values())))
        for name, values in rows.items():
            ds = self.file[name]
            ds.resize(start + n, axis=0)
            if n:
                ds[start:] = values
        self.file.attrs.update(progress or {})
        self.file.attrs[ATTR_WRITTEN] = start + n
        self.file.flush()

    def column(self, name: str) -> np.ndarray:
        """Every written value of one (small) column."""
        return self.file[name][: self.written]

    def close(self) -> None:
        """Close (idempotent); the file stays for a later resume."""
        if self.file.id.valid:
            self.file.close()

    def finish(self, final_path, attrs: dict | None = None) -> Path:
        """Record ``attrs``, close, and rename to ``final_path`` (atomic on one file system)."""
        self.file.attrs.update(attrs or {})
        self.close()
        os.replace(self.path, final_path)
        return Path(final_path)
