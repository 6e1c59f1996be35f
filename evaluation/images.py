"""Image inputs for evaluation, streamed in batches and validated: ADM .npz, reglue samples.h5, PNG folders."""

from __future__ import annotations

import hashlib
import warnings
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np

from evaluation.errors import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


class ImageInputError(InputError, ValueError):
    """An input that cannot be evaluated; the one-line message names the file and the problem."""


def _check_layout(path, shape: tuple, dtype) -> None:
    if np.dtype(dtype) != np.uint8:
        raise ImageInputError(f"{path}: images are {np.dtype(dtype)}, expected uint8 in 0..255")
    if len(shape) != 4:
        raise ImageInputError(f"{path}: images have shape {shape}, expected (N, H, W, 3)")
    if shape[-1] != 3:
        layout = "NCHW" if shape[1] == 3 else f"{shape[-1]} channels"
        raise ImageInputError(f"{path}: images are {layout} {shape}, expected NHWC with 3 channels")


class NpzImages:
    """``arr_0`` of an ADM batch, read image by image from inside the zip (never loaded whole)."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            self.zip = zipfile.ZipFile(self.path)
            names = self.zip.namelist()
        except (zipfile.BadZipFile, OSError) as exc:
            raise ImageInputError(f"{self.path}: not a readable .npz ({exc})") from None
        if "arr_0.npy" not in names:
            raise ImageInputError(f"{self.path}: no arr_0 in the .npz (keys: {', '.join(n[:-4] for n in names)})")
        self.keys = [n[:-4] for n in names]
        with self.zip.open("arr_0.npy") as f:
            version = np.lib.format.read_magic(f)
            readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            if version not in readers:
                raise ImageInputError(f"{self.path}: arr_0 has npy format {version}, expected 1.0 or 2.0")
            shape, fortran, dtype = readers[version](f)
            self.offset = f.tell()
        _check_layout(self.path, shape, dtype)
        if fortran:
            raise ImageInputError(f"{self.path}: arr_0 is Fortran-ordered; save it C-ordered")
        self.shape = shape
        self.bytes_per_image = int(np.prod(shape[1:]))
        info = self.zip.getinfo("arr_0.npy")
        if info.file_size < self.offset + self.bytes_per_image * shape[0]:
            raise ImageInputError(f"{self.path}: arr_0 is truncated ({info.file_size} bytes for shape {shape})")

    def __len__(self) -> int:
        return self.shape[0]

    def batches(self, batch: int, start: int = 0, stop: int | None = None) -> Iterator[np.ndarray]:
        """uint8 (b, H, W, 3) arrays for images [start, stop)."""
        stop = len(self) if stop is None else stop
        with self.zip.open("arr_0.npy") as f:
            f.seek(self.offset + start * self.bytes_per_image)
            for i in range(start, stop, batch):
                n = min(batch, stop - i)
                data = f.read(n * self.bytes_per_image)
                yield np.frombuffer(bytearray(data), np.uint8).reshape(n, *self.shape[1:])  # writable for torch

    def statistics(self) -> dict | None:
        """Stored ``mu, sigma, mu_s, sigma_s`` as float64, or None when the file has none."""
        if "mu" not in self.keys:
            return None
        shapes = {"mu": (POOL_DIMS,), "sigma": (POOL_DIMS, POOL_DIMS), "mu_s": (SPATIAL_DIMS,),
                  "sigma_s": (SPATIAL_DIMS, SPATIAL_DIMS)}
        out = {}
        with np.load(self.path, allow_pickle=False) as npz:
            for key in (k for k in shapes if k in npz.files):
                try:
                    value = npz[key]
                except ValueError:  # an object array: np.load refuses to unpickle it
                    raise ImageInputError(f"{self.path}: '{key}' is an object array, expected float numbers") from None
                if value.shape != shapes[key] or value.dtype.kind not in "fiu":
                    raise ImageInputError(f"{self.path}: '{key}' is {value.dtype} {value.shape}, expected float "
                                          f"{shapes[key]} (ADM's Inception statistics)")
                out[key] = np.asarray(value, np.float64)
        return out


POOL_DIMS, SPATIAL_DIMS = 2048, 2023  # ADM's pool_3 and the sFID spatial features (mixed_6/conv, first 7 channels)


class H5Images:
    """``images`` of a reglue samples.h5."""

    def __init__(self, path):
        import h5py

        self.path = Path(path)
        try:
            with h5py.File(self.path, "r") as f:
                if "images" not in f:
                    raise ImageInputError(f"{self.path}: no 'images' dataset")
                self.shape, dtype = f["images"].shape, f["images"].dtype
        except OSError as exc:
            raise ImageInputError(f"{self.path}: not a readable HDF5 file ({exc})") from None
        _check_layout(self.path, self.shape, dtype)
        self.keys = []

    def __len__(self) -> int:
        return self.shape[0]

    def batches(self, batch: int, start: int = 0, stop: int | None = None) -> Iterator[np.ndarray]:
        import h5py

        stop = len(self) if stop is None else stop
        with h5py.File(self.path, "r") as f:
            for i in range(start, stop, batch):
                yield f["images"][i : min(i + batch, stop)]

    def statistics(self) -> None:
        return None


class FolderImages:
    """Image files of a folder (sorted by name), all of one size."""

    def __init__(self, path):
        from PIL import Image

        self.path = Path(path)
        self.files = sorted(p for p in self.path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise ImageInputError(f"{self.path}: no images ({', '.join(IMAGE_SUFFIXES)})")
        with Image.open(self.files[0]) as first:
            self.shape = (len(self.files), first.height, first.width, 3)
        self.keys = []

    def __len__(self) -> int:
        return len(self.files)

    def batches(self, batch: int, start: int = 0, stop: int | None = None) -> Iterator[np.ndarray]:
        from PIL import Image

        stop = len(self) if stop is None else stop
        for i in range(start, stop, batch):
            arrays = []
            for p in self.files[i : min(i + batch, stop)]:
                with Image.open(p) as im:
                    arr = np.asarray(im.convert("RGB"))
                if arr.shape != self.shape[1:]:
                    raise ImageInputError(f"{p}: size {arr.shape[:2]} differs from {self.shape[1:3]}")
                arrays.append(arr)
            yield np.stack(arrays)

    def statistics(self) -> None:
        return None


def open_images(path, role: str = "samples"):
    """The reader for ``path`` (.npz, .h5 or a folder); warns about what would make ADM's numbers misleading."""
    path = Path(path)
    if not path.exists():
        raise ImageInputError(f"{path}: no such file or folder")
    if path.is_dir():
        images = FolderImages(path)
    elif path.suffix == ".npz":
        images = NpzImages(path)
    elif path.suffix in (".h5", ".hdf5"):
        images = H5Images(path)
    else:
        raise ImageInputError(f"{path}: expected an ADM .npz, a samples.h5 or a folder of images")
    if role == "samples" and "mu" in images.keys:
        warnings.warn(f"{path}: carries its own 'mu'/'sigma'; ADM's evaluator would silently use them, "
                      "reglue computes the statistics from the images")
    return images


def file_sha256(path) -> str:
    """sha256 of a file (or of the sorted file list and bytes of a folder)."""
    path, digest = Path(path), hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for p in files:
        with open(p, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()
