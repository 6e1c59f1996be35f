"""Reading an encoded dataset for training: (image uint8, moments, label) by index, safe with DataLoader workers."""

from __future__ import annotations

import bisect
import hashlib
import os
import re
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, SequentialSampler

from reglue.data import h5format as fmt
from reglue.encoders.vae import vae_id
from reglue.errors import UserError


class DatasetError(UserError, ValueError):
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
            return {"rows": f[fmt.LABELS].shape[0], "attrs": dict(f.attrs), "flipped": fmt.MOMENTS_FLIP in f,
                    "class_names": [s.decode() if isinstance(s, bytes) else s for s in f[fmt.CLASS_NAMES][...]]}
    except OSError as exc:
        raise DatasetError(f"{path}: cannot open as HDF5 ({exc})") from None


def _empty(shape: tuple, dtype: torch.dtype, shared: bool) -> torch.Tensor:
    """An uninitialised tensor, in shared memory when ``shared`` (no copy, unlike share_memory_())."""
    if not shared:
        return torch.empty(shape, dtype=dtype)
    nbytes = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
    storage = torch.UntypedStorage._new_shared(nbytes)
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


def _read_labels(path: Path) -> np.ndarray:
    with h5py.File(path, "r") as f:
        return f[fmt.LABELS][...]


class EncodedDataset(Dataset):
    """Rows of one or more encoded files: ``(image uint8 (3, H, W), moments (8, h, w) float32, label)``.

    Files are opened lazily in the process that reads (each DataLoader worker opens its own handle).
    """

    def __init__(self, path: str | os.PathLike, flip: bool = False):
        self.paths = resolve_shards(path)
        self.flip = flip  # also read the mirrored image's moments, after the plain ones: (16, h, w)
        infos = [_inspect(p) for p in self.paths]
        self.content_ids = [str(i["attrs"].get("content_sha256", "")) for i in infos]  # encode's content hashes
        self.offsets = np.cumsum([0] + [i["rows"] for i in infos]).tolist()
        self.attrs = infos[0]["attrs"]
        self.class_names = infos[0]["class_names"]
        self.resolution = int(self.attrs["resolution"])
        self._handles: dict[int, tuple] = {}
        self._pid: int | None = None
        self._labels = np.concatenate([_read_labels(p) for p in self.paths])
        if len(self._labels) == 0:
            raise DatasetError(f"{path}: holds no images (every source image was skipped when it was encoded)")
        unflipped = [p for p, i in zip(self.paths, infos) if flip and not i["flipped"]]
        if unflipped:
            raise DatasetError(f"{unflipped[0]}: no flipped moments, and data.flip is true; encode it again with "
                               "`reglue encode --flip`, or --set data.flip=false")

    def identity(self) -> dict:
        """What a run directory records of its data: the path, the row count and encode's content hash."""
        digest = hashlib.sha256("".join(self.content_ids).encode()).hexdigest()
        return {"path": str(self.paths[0] if len(self.paths) == 1 else self.paths[0].parent), "rows": len(self),
                "content_sha256": digest}

    def check_for(self, data, num_classes: int) -> None:
        """DatasetError unless this dataset is what the run's ``data`` section and label table expect."""
        for key, ours in (("resolution", data.resolution), ("vae", vae_id(data.vae))):
            theirs = self.attrs.get(key)
            theirs = theirs.item() if hasattr(theirs, "item") else theirs
            if theirs != ours:
                raise DatasetError(f"{self.paths[0]}: encoded with {key} {theirs!r}, the run's data.{key} is "
                                   f"{ours!r}; encode it again or --set data.{key}={theirs}")
        if num_classes:
            self.check_labels(num_classes)

    def check_labels(self, num_classes: int) -> None:
        """DatasetError unless every label is in 0..num_classes-1 (the model's label table)."""
        low, high = int(self._labels.min()), int(self._labels.max())
        if low < 0 or high >= num_classes:
            bad = low if low < 0 else high
            raise DatasetError(f"{self.paths[0]}: label {bad} is outside 0..{num_classes - 1} "
                               f"(model.num_classes = {num_classes}); set model.num_classes or fix the labels")

    def __len__(self) -> int:
        return self.offsets[-1]

    def _datasets(self, k: int) -> tuple:
        """(images, moments) dataset handles of file k, opened once per process."""
        if self._pid != os.getpid():  # a fresh process (worker after fork): never reuse the parent's handles
            self._handles, self._pid = {}, os.getpid()
        if k not in self._handles:
            f = h5py.File(self.paths[k], "r")
            self._handles[k] = (f[fmt.IMAGES], f[fmt.MOMENTS], f[fmt.MOMENTS_FLIP] if self.flip else None)
        return self._handles[k]

    def __getitem__(self, index):
        """One row ``(image (3, H, W) uint8, moments float32, label)``, or a whole batch for a list of indices."""
        if not isinstance(index, (int, np.integer)):
            return self.read_batch(list(index))
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} rows")
        k = bisect.bisect_right(self.offsets, index) - 1
        images, moments, flipped = self._datasets(k)
        row = index - self.offsets[k]
        image = torch.from_numpy(images[row]).permute(2, 0, 1)  # (3, H, W) uint8
        m = moments[row] if flipped is None else np.concatenate([moments[row], flipped[row]])
        return image, torch.from_numpy(m.astype(np.float32, copy=False)), int(self._labels[index])

    def read_batch(self, indices: list[int]):
        """A whole batch at once: (images (B, 3, H, W) uint8, moments (B, 8, h, w) float32 (16 channels with the
        flipped image's after the plain ones), labels (B,)).

        Rows are read straight into one shared-memory tensor per field, so a DataLoader worker hands the batch
        over without the per-sample stacking copy (see ``batch_loader``).
        """
        first_images, first_moments, _ = self._datasets(0)
        n = len(indices)
        res = first_images.shape[1]
        shared = torch.utils.data.get_worker_info() is not None  # in a worker: allocate where the parent can map it
        images = _empty((n, res, res, 3), torch.uint8, shared)
        m_shape = first_moments.shape[1:]
        moments = _empty((n, m_shape[0] * (2 if self.flip else 1), *m_shape[1:]), torch.float32, shared)
        img_np, mom_np = images.numpy(), moments.numpy()
        for j, index in enumerate(indices):
            if not 0 <= index < len(self):
                raise IndexError(f"index {index} out of range for {len(self)} rows")
            k = bisect.bisect_right(self.offsets, index) - 1
            ds_images, ds_moments, ds_flipped = self._datasets(k)
            row = index - self.offsets[k]
            img_np[j] = ds_images[row]
            mom_np[j, : m_shape[0]] = ds_moments[row]
            if ds_flipped is not None:
                mom_np[j, m_shape[0] :] = ds_flipped[row]
        labels = torch.from_numpy(self._labels[np.asarray(indices, dtype=np.int64)])
        return images.permute(0, 3, 1, 2), moments, labels

    def labels(self) -> np.ndarray:
        """Every label, in row order."""
        return self._labels.copy()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handles"], state["_pid"] = {}, None  # handles never cross a process boundary
        return state


def batch_loader(dataset: EncodedDataset, batch_size: int, sampler=None, workers: int = 4, **kwargs) -> DataLoader:
    """A DataLoader whose workers read whole batches (``sampler`` yields row indices; default: in order)."""
    sampler = sampler if sampler is not None else SequentialSampler(dataset)
    return DataLoader(dataset, sampler=BatchSampler(sampler, batch_size, drop_last=False), batch_size=None,
                      num_workers=workers, **kwargs)
