"""Where samples go: per-rank part files while sampling (resumable), then samples.h5 and the ADM samples.npz.

``DIR/parts/rankRofW.h5`` receive (index, image, label, seed) rows as batches finish. Any later launch, with
any number of processes, reads every part of the same run to skip finished indices. When all N exist,
rank 0 writes ``samples.h5`` (by index) and streams ``samples.npz`` (``arr_0`` uint8 (N, H, W, 3)) from it,
never holding the images in memory, each through a temporary file and a rename; the parts are then removed.
A full disk while merging is one OutputError (reglue.fileio.new_h5): the parts stay, and the rerun merges them.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import h5py
import numpy as np

from reglue.data.append import ATTR_RUN_ID, AppendFile
from reglue.errors import UserError
from reglue.fileio import atomic_path, new_h5

SAMPLES_H5 = "samples.h5"
SAMPLES_NPZ = "samples.npz"
PARTS = "parts"
FORMAT = "reglue-samples"


class SampleStoreError(UserError, ValueError):
    """The output directory holds something else."""


class OtherRunError(SampleStoreError):
    """The output directory holds samples of another run; ``out`` names it (a command words its own remedy)."""

    def __init__(self, out: Path):
        super().__init__(f"{out}: holds samples of another run (checkpoint or settings differ); use another --out or "
                         "pass --overwrite")
        self.out = out


def part_columns(resolution: int) -> dict:
    """The columns of a part file."""
    return {"index": ((), np.int64, 1024), "images": ((resolution, resolution, 3), np.uint8, 1),
            "labels": ((), np.int64, 1024), "seeds": ((), np.int64, 1024)}


def finished_run_id(out: Path) -> str | None:
    """The run id of a complete samples.h5 in ``out``, if any."""
    path = out / SAMPLES_H5
    if not path.exists():
        return None
    try:
        with h5py.File(path, "r") as f:
            return f.attrs.get(ATTR_RUN_ID) if f.attrs.get("complete") else None
    except OSError:
        return None


def check_out_dir(out: Path, run_id: str, overwrite: bool) -> bool:
    """True when ``out`` already holds this run's finished samples; refuse other runs' outputs unless overwriting."""
    if out.exists() and not out.is_dir():
        raise SampleStoreError(f"{out}: exists and is not a directory")
    finished = finished_run_id(out)
    if finished == run_id and (out / SAMPLES_NPZ).exists():
        return True
    others = [p for p in (out / PARTS).glob("*.h5") if _part_run_id(p) not in (run_id, None)] if out.is_dir() else []
    if (finished not in (None, run_id) or others) and not overwrite:
        raise OtherRunError(out)
    for part in others:
        part.unlink()
    return False


def _part_run_id(path: Path) -> str | None:
    try:
        with h5py.File(path, "r") as f:
            return f.attrs.get(ATTR_RUN_ID)
    except OSError:
        return None


def done_indices(out: Path, run_id: str) -> set[int]:
    """Indices already written by any process of this run."""
    done: set[int] = set()
    for part in sorted((out / PARTS).glob("*.h5")) if (out / PARTS).is_dir() else []:
        try:
            with h5py.File(part, "r") as f:
                if f.attrs.get(ATTR_RUN_ID) == run_id:
                    done.update(f["index"][: int(f.attrs["written"])].tolist())
        except (OSError, KeyError):
            continue
    return done


def open_part(out: Path, rank: int, world: int, run_id: str, resolution: int) -> AppendFile:
    """This process's part file (resumed when it exists for the same run)."""
    (out / PARTS).mkdir(parents=True, exist_ok=True)
    return AppendFile(out / PARTS / f"rank{rank}of{world}.h5", run_id, part_columns(resolution), display=out)


def merge(out: Path, n: int, resolution: int, run_id: str, attrs: dict) -> Path:
    """Gather every part into samples.h5 (rows by index), then stream samples.npz; remove the parts."""
    parts = sorted((out / PARTS).glob("*.h5"))
    with atomic_path(out / SAMPLES_H5) as tmp:
        with new_h5(tmp, out / SAMPLES_H5) as dst:
            images = dst.create_dataset("images", (n, resolution, resolution, 3), np.uint8,
                                        chunks=(1, resolution, resolution, 3))
            labels = dst.create_dataset("labels", (n,), np.int64)
            seeds = dst.create_dataset("seeds", (n,), np.int64)
            seen = np.zeros(n, bool)
            for part in parts:
                with h5py.File(part, "r") as src:
                    if src.attrs.get(ATTR_RUN_ID) != run_id:
                        continue
                    rows = int(src.attrs["written"])
                    index = src["index"][:rows]
                    for j, i in enumerate(index):  # part rows are few per chunk; write in index order
                        images[i] = src["images"][j]
                    labels[index], seeds[index] = src["labels"][:rows], src["seeds"][:rows]
                    seen[index] = True
                dst.check()  # a full disk stops the merge here, not after reading every part
            if not seen.all():
                raise SampleStoreError(f"{out}: {int((~seen).sum())} samples missing from the parts")
            dst.attrs.update({**attrs, ATTR_RUN_ID: run_id, "format": FORMAT, "n": n, "complete": True})
    write_npz(out / SAMPLES_H5, out / SAMPLES_NPZ)
    for part in parts:
        part.unlink()
    (out / PARTS).rmdir()
    return out / SAMPLES_H5


def write_npz(h5_path: Path, npz_path: Path, block: int = 256) -> None:
    """samples.npz with ``arr_0`` uint8 (N, H, W, 3), streamed block by block into the zip member."""
    with h5py.File(h5_path, "r") as f, atomic_path(npz_path) as tmp:
        images = f["images"]
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                  "shape": tuple(images.shape)}
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array_header_2_0(member, header)
                for start in range(0, images.shape[0], block):
                    member.write(np.ascontiguousarray(images[start : start + block]).tobytes())
