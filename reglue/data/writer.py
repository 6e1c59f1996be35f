"""Append-only, resumable HDF5 writer for one output file (a shard or a rank's part)."""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import h5py
import numpy as np

from reglue.data import h5format as fmt


def partial_path(path: str | os.PathLike) -> Path:
    """Where ``path`` is written until it is complete."""
    return Path(str(path) + fmt.PARTIAL_SUFFIX)


class EncodedWriter:
    """Writes rows (image, moments, label, key) to ``<path>.partial`` and renames it to ``path`` when finished.

    An existing partial file with the same run id is resumed; one with another run id (or unreadable) is
    discarded with a warning. Progress is flushed after every ``append``.
    """

    def __init__(self, path, run_id: str, resolution: int, moments_shape: tuple, moments_dtype: str,
                 flip: bool, class_names, attrs: dict):
        self.path, self.partial = Path(path), partial_path(path)
        self.file = self._open_or_resume(run_id)
        if fmt.IMAGES not in self.file:
            self._create(run_id, resolution, moments_shape, moments_dtype, flip, class_names, attrs)

    def _open_or_resume(self, run_id: str) -> h5py.File:
        if self.partial.exists():
            try:
                file = h5py.File(self.partial, "a")
                if file.attrs.get(fmt.ATTR_RUN_ID) == run_id and fmt.IMAGES in file:
                    self._truncate(file, int(file.attrs[fmt.ATTR_WRITTEN]))
                    return file
                file.close()
                warnings.warn(f"{self.partial}: left by a different run; starting it again")
            except (OSError, KeyError):
                warnings.warn(f"{self.partial}: unreadable after an interruption; starting it again")
            self.partial.unlink()
        return h5py.File(self.partial, "w")

    @staticmethod
    def _truncate(file: h5py.File, rows: int) -> None:
        """Drop rows past the last recorded flush (written by a process killed mid-append)."""
        for name in (fmt.IMAGES, fmt.MOMENTS, fmt.MOMENTS_FLIP, fmt.LABELS, fmt.KEYS):
            if name in file and file[name].shape[0] != rows:
                file[name].resize(rows, axis=0)

    def _create(self, run_id, resolution, moments_shape, moments_dtype, flip, class_names, attrs) -> None:
        f = self.file
        f.create_dataset(fmt.IMAGES, (0, resolution, resolution, 3), np.uint8,
                         maxshape=(None, resolution, resolution, 3), chunks=(1, resolution, resolution, 3))
        for name in (fmt.MOMENTS, fmt.MOMENTS_FLIP) if flip else (fmt.MOMENTS,):
            f.create_dataset(name, (0, *moments_shape), moments_dtype, maxshape=(None, *moments_shape),
                             chunks=(1, *moments_shape))
        f.create_dataset(fmt.LABELS, (0,), np.int64, maxshape=(None,), chunks=(4096,))
        f.create_dataset(fmt.KEYS, (0,), h5py.string_dtype(), maxshape=(None,), chunks=(4096,))
        f.create_dataset(fmt.CLASS_NAMES, data=np.array(list(class_names), dtype=object), dtype=h5py.string_dtype())
        f.attrs.update({k: v for k, v in attrs.items() if v is not None})
        f.attrs.update({fmt.ATTR_RUN_ID: run_id, fmt.ATTR_WRITTEN: 0, fmt.ATTR_POSITION: 0,
                        fmt.ATTR_COMPLETE: False, "format": fmt.FORMAT, "version": fmt.FORMAT_VERSION})
        f.flush()

    @property
    def written(self) -> int:
        """Rows durably written."""
        return int(self.file.attrs[fmt.ATTR_WRITTEN])

    @property
    def position(self) -> int:
        """Next source index to process (skipped images count as processed)."""
        return int(self.file.attrs[fmt.ATTR_POSITION])

    def append(self, images, moments, labels, keys, position: int, moments_flip=None) -> None:
        """Append rows, then record ``position`` and flush: the unit of resumption."""
        n, start = len(labels), self.written
        rows = {fmt.IMAGES: images, fmt.MOMENTS: moments, fmt.LABELS: labels, fmt.KEYS: keys}
        if moments_flip is not None:
            rows[fmt.MOMENTS_FLIP] = moments_flip
        for name, values in rows.items():
            ds = self.file[name]
            ds.resize(start + n, axis=0)
            if n:
                ds[start:] = values
        self.file.attrs[fmt.ATTR_WRITTEN] = start + n
        self.file.attrs[fmt.ATTR_POSITION] = position
        self.file.flush()

    def finish(self, extra_attrs: dict | None = None) -> Path:
        """Record the content hashes, mark complete, close and rename to the final path."""
        self.file.attrs.update(content_hashes(self.file))
        self.file.attrs.update(extra_attrs or {})
        self.file.attrs[fmt.ATTR_COMPLETE] = True
        self.file.close()
        os.replace(self.partial, self.path)
        return self.path

    def close(self) -> None:
        """Close without finishing (the partial file stays for a later resume)."""
        if self.file.id.valid:
            self.file.close()


def content_hashes(file: h5py.File, block: int = 1024) -> dict[str, str]:
    """sha256 of images + labels (bit-exact content) and of the moments (float tolerance across devices)."""
    content, moments = hashlib.sha256(), hashlib.sha256()
    n = file[fmt.LABELS].shape[0]
    for start in range(0, n, block):
        content.update(np.ascontiguousarray(file[fmt.IMAGES][start : start + block]).tobytes())
        content.update(np.ascontiguousarray(file[fmt.LABELS][start : start + block]).tobytes())
        moments.update(np.ascontiguousarray(file[fmt.MOMENTS][start : start + block]).tobytes())
    return {"content_sha256": content.hexdigest(), "moments_sha256": moments.hexdigest()}
