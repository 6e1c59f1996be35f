"""Reading an encoded dataset for training: (image uint8, moments, label) by index, safe with DataLoader workers."""

from __future__ import annotations

import bisect
import os
import re
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from reglue.data import h5format as fmt


class DatasetError(ValueError):
    """An encoded dataset that cannot be read; the message names the file."""


def resolve_shards(path: str | os.PathLike) -> list[Path]:
    """``data.h5`` itself, or its shards ``data-00000.h5`` ... when only those exist."""
    path = Path(path)
    if path.is_file():
        return [path]
    pattern = re.compile(re.escape(path.stem) + r"-\d{5}" + re.escape(path.suffix) + "$")
    shards = sorted(p for p in path.parent.glob(f"{path.stem}-*{path.suffix}") if pattern.match(p.name))
    if not shards:
        raise DatasetError(f"{path}: no such dataset (nor shards {path.stem}-00000{path.suffix} ...)")
    return shards


def _inspect(path: Path) -> dict:
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != fmt.FORMAT:
                raise DatasetError(f"{path}: not a reglue encoded dataset (run `reglue encode`)")
            if not f.attrs.get(fmt.ATTR_COMPLETE):
                raise DatasetError(f"{path}: incomplete (an interrupted encode); run the same encode command again")
            return {"rows": f[fmt.LABELS].shape[0], "attrs": dict(f.attrs),
                    "class_names": [s.decode() if isinstance(s, bytes) else s for s in f[fmt.CLASS_NAMES][...]]}
    except OSError as exc:
        raise DatasetError(f"{path}: cannot open as HDF5 ({exc})") from None


class EncodedDataset(Dataset):
    """Rows of one or more encoded files: ``(image uint8 (3, H, W), moments (8, h, w) float32, label)``.

    Files are opened lazily in the process that reads (each DataLoader worker opens its own handle).
    """

    def __init__(self, path: str | os.PathLike):
        self.paths = resolve_shards(path)
        infos = [_inspect(p) for p in self.paths]
        self.offsets = np.cumsum([0] + [i["rows"] for i in infos]).tolist()
        self.attrs = infos[0]["attrs"]
        self.class_names = infos[0]["class_names"]
        self.resolution = int(self.attrs["resolution"])
        self._files: dict[int, h5py.File] = {}
        self._pid: int | None = None

    def __len__(self) -> int:
        return self.offsets[-1]

    def _file(self, k: int) -> h5py.File:
        if self._pid != os.getpid():  # a fresh process (worker after fork): never reuse the parent's handles
            self._files, self._pid = {}, os.getpid()
        if k not in self._files:
            self._files[k] = h5py.File(self.paths[k], "r")
        return self._files[k]

    def __getitem__(self, index: int):
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} rows")
        k = bisect.bisect_right(self.offsets, index) - 1
        f, row = self._file(k), index - self.offsets[k]
        image = torch.from_numpy(f[fmt.IMAGES][row]).permute(2, 0, 1)  # (3, H, W) uint8
        moments = torch.from_numpy(f[fmt.MOMENTS][row].astype(np.float32))
        return image, moments, int(f[fmt.LABELS][row])

    def labels(self) -> np.ndarray:
        """Every label, in row order."""
        out = []
        for k in range(len(self.paths)):
            out.append(self._file(k)[fmt.LABELS][...])
        return np.concatenate(out)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_files"], state["_pid"] = {}, None  # handles never cross a process boundary
        return state
