"""The encoded-dataset writer for one output file (a shard or a rank's part), on top of AppendFile."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import h5py
import numpy as np

from reglue.data import h5format as fmt
from reglue.data.append import AppendFile


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
        self.path = Path(path)
        image = (resolution, resolution, 3)
        columns = {fmt.IMAGES: (image, np.uint8, 1), fmt.MOMENTS: (tuple(moments_shape), moments_dtype, 1),
                   fmt.LABELS: ((), np.int64, 4096), fmt.KEYS: ((), h5py.string_dtype(), 4096)}
        if flip:
            columns[fmt.MOMENTS_FLIP] = (tuple(moments_shape), moments_dtype, 1)
        self.out = AppendFile(partial_path(path), run_id, columns, {
            **attrs, fmt.ATTR_POSITION: 0, fmt.ATTR_COMPLETE: False, "format": fmt.FORMAT,
            "version": fmt.FORMAT_VERSION}, display=self.path)
        if fmt.CLASS_NAMES not in self.out.file:
            self.out.file.create_dataset(fmt.CLASS_NAMES, data=np.array(list(class_names), dtype=object),
                                         dtype=h5py.string_dtype())

    @property
    def file(self) -> h5py.File:
        """The open partial file."""
        return self.out.file

    @property
    def written(self) -> int:
        """Rows durably written."""
        return self.out.written

    @property
    def position(self) -> int:
        """Next source index to process (skipped images count as processed)."""
        return int(self.out.file.attrs[fmt.ATTR_POSITION])

    def append(self, images, moments, labels, keys, position: int, moments_flip=None) -> None:
        """Append rows, then record ``position`` and flush: the unit of resumption."""
        rows = {fmt.IMAGES: images, fmt.MOMENTS: moments, fmt.LABELS: labels, fmt.KEYS: keys}
        if moments_flip is not None:
            rows[fmt.MOMENTS_FLIP] = moments_flip
        self.out.append(rows, {fmt.ATTR_POSITION: position})

    def finish(self, extra_attrs: dict | None = None) -> Path:
        """Record the content hashes, mark complete, close and rename to the final path."""
        attrs = {**content_hashes(self.out.file), **(extra_attrs or {}), fmt.ATTR_COMPLETE: True}
        return self.out.finish(self.path, attrs)

    def close(self) -> None:
        """Close without finishing (the partial file stays for a later resume)."""
        self.out.close()


def content_hashes(file: h5py.File, block: int = 1024) -> dict[str, str]:
    """sha256 of images + labels (bit-exact content) and of the moments (float tolerance across devices)."""
    content, moments = hashlib.sha256(), hashlib.sha256()
    n = file[fmt.LABELS].shape[0]
    for start in range(0, n, block):
        content.update(np.ascontiguousarray(file[fmt.IMAGES][start : start + block]).tobytes())
        content.update(np.ascontiguousarray(file[fmt.LABELS][start : start + block]).tobytes())
        moments.update(np.ascontiguousarray(file[fmt.MOMENTS][start : start + block]).tobytes())
    return {"content_sha256": content.hexdigest(), "moments_sha256": moments.hexdigest()}

