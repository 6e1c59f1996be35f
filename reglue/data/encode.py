"""The encoding pipeline: source images -> ADM crop -> VAE moments -> HDF5 file(s), resumable and multi-process."""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from reglue import __version__
from reglue.constants import LATENT_CHANNELS, VAE_DOWNSAMPLE
from reglue.data import h5format as fmt
from reglue.data.append import ATTR_WRITTEN
from reglue.data.crop import crop_or_reason
from reglue.data.sources import ImageSource
from reglue.data.writer import EncodedWriter, content_hashes, partial_path
from reglue.distributed import DistInfo, main_phase, patient_barrier
from reglue.encoders.vae import posterior_moments
from reglue.errors import UserError
from reglue.fileio import new_h5
from reglue.locks import file_lock

MOMENTS_DTYPES = ("float32", "float16")


class EncodeError(UserError, ValueError):
    """The output cannot be written as asked (exists from another source, missing directory...)."""


@dataclass(frozen=True)
class EncodeOptions:
    """What determines the content of an encoded dataset, plus how to compute it."""

    resolution: int = 256
    flip: bool = False
    moments_dtype: str = "float32"
    batch_size: int = 64
    workers: int = 4
    shard_size: int | None = None
    overwrite: bool = False


@dataclass
class EncodeSummary:
    """What a run did."""

    outputs: list[Path] = field(default_factory=list)
    written: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (key, reason) seen by this process
    skipped_total: int = 0  # over every process, from the files
    seconds: float = 0.0
    reused: bool = False

    @property
    def bytes(self) -> int:
        """Size of the outputs on disk."""
        return sum(p.stat().st_size for p in self.outputs if p.exists())


@dataclass(frozen=True)
class Unit:
    """One output file and the source indices [start, end) it covers."""

    path: Path
    start: int
    end: int


class CroppedImages(Dataset):
    """Decodes and crops source images by index in DataLoader workers; a bad file yields ok=False."""

    def __init__(self, source: ImageSource, indices: range, resolution: int):
        self.source, self.indices, self.resolution = source, indices, resolution
        self._reader = None

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        index = self.indices[i]
        self._reader = self._reader or self.source.reader()  # opened in the worker, after the fork
        image, reason = crop_or_reason(lambda: self._reader.read(index), self.resolution)
        return index, self._blank() if image is None else image, reason

    def _blank(self) -> np.ndarray:
        return np.zeros((self.resolution, self.resolution, 3), np.uint8)


def _collate(batch):
    indices, images, errors = zip(*batch)
    return list(indices), torch.from_numpy(np.stack(images)), list(errors)


def plan_units(out: Path, n: int, shard_size: int | None, world: int) -> list[Unit]:
    """Split [0, n) into output files: shards of ``shard_size``, else one file (one part per rank, merged)."""
    if shard_size:
        count = math.ceil(n / shard_size)
        return [Unit(out.with_name(f"{out.stem}-{k:05d}{out.suffix}"), k * shard_size, min(n, (k + 1) * shard_size))
                for k in range(count)]
    if world == 1:
        return [Unit(out, 0, n)]
    bounds = [n * r // world for r in range(world + 1)]
    return [Unit(out.with_name(f"{out.name}.rank{r}of{world}"), bounds[r], bounds[r + 1]) for r in range(world)]


def run_id(source: ImageSource, vae_id: str, options: EncodeOptions, unit: Unit) -> str:
    """Hash of everything that decides the content of one output file."""
    text = f"{source.fingerprint()}|{vae_id}|{options.resolution}|{options.flip}|{options.moments_dtype}|" \
           f"{unit.start}:{unit.end}|{fmt.FORMAT_VERSION}"
    return hashlib.sha256(text.encode()).hexdigest()


def check_output_dir(out) -> None:
    """Raise EncodeError when the output's directory does not exist (checked before any model is loaded)."""
    out = Path(out)
    if not out.parent.is_dir():
        raise EncodeError(f"{out}: the directory {out.parent} does not exist")


def _file_attrs_or_none(path: Path) -> dict | None:
    try:
        with h5py.File(path, "r") as f:
            return dict(f.attrs)
    except OSError:
        return None


def is_complete(path: Path, identity: dict) -> bool:
    """True when ``path`` is a finished encoding with these identity attributes."""
    attrs = _file_attrs_or_none(path) if path.exists() else None
    return bool(attrs and attrs.get("complete") and all(attrs.get(k) == v for k, v in identity.items()))


def check_output(out: Path, identity: dict, overwrite: bool) -> bool:
    """True when ``out`` is already this encoding; raise if it exists as something else (unless overwriting)."""
    check_output_dir(out)
    if not out.exists() or overwrite:
        return False
    if is_complete(out, identity):
        return True
    why = "was made from another source or with other options" if _file_attrs_or_none(out) else \
        "is not a reglue dataset"
    raise EncodeError(f"{out}: exists and {why}; pass --overwrite to replace it")


def file_attrs(source: ImageSource, vae_info: dict, options: EncodeOptions, unit: Unit) -> dict:
    """Provenance attributes written into every output file."""
    return {
        "source": source.root, "source_kind": source.kind, "source_fingerprint": source.fingerprint(),
        "source_start": unit.start, "source_end": unit.end, "resolution": options.resolution,
        "crop": "adm-center", "vae": vae_info["id"], "comparable": bool(vae_info["comparable"]),
        "flip": options.flip, "moments_dtype": options.moments_dtype, "reglue_version": __version__,
        "moments_layout": "mean (channels 0-3), std (channels 4-7)",
    }


def identity_attrs(source: ImageSource, vae_info: dict, options: EncodeOptions) -> dict:
    """The attributes that must match for an existing output to count as this encoding."""
    return {"source_fingerprint": source.fingerprint(), "vae": vae_info["id"], "resolution": options.resolution,
            "flip": options.flip, "moments_dtype": options.moments_dtype}


def encode_unit(source, unit, vae, vae_info, options, dist: DistInfo, log: Callable[[str], None], bar) -> tuple:
    """Encode one unit into its file; returns (rows written, skipped list)."""
    latent = options.resolution // VAE_DOWNSAMPLE
    writer = EncodedWriter(unit.path, run_id(source, vae_info["id"], options, unit), options.resolution,
                           (2 * LATENT_CHANNELS, latent, latent), options.moments_dtype, options.flip,
                           source.class_names, file_attrs(source, vae_info, options, unit))
    if writer.position > unit.start:
        log(f"resuming {unit.path.name} at source index {writer.position} ({writer.written} images written)")
    bar.update(max(0, writer.position - unit.start))
    dataset = CroppedImages(source, range(max(unit.start, writer.position), unit.end), options.resolution)
    loader = DataLoader(dataset, batch_size=options.batch_size, num_workers=options.workers, collate_fn=_collate,
                        persistent_workers=False)
    skipped = []
    try:
        for indices, images, errors in loader:
            keep = [i for i, err in enumerate(errors) if not err]
            for i, err in enumerate(errors):
                if err:
                    skipped.append((source.keys[indices[i]], err))
                    log(f"skipped {Path(source.root) / source.keys[indices[i]]}: {err}")
            images = images[keep]
            moments = flipped = None
            if keep:
                moments = posterior_moments(vae, images.to(dist.device)).cpu().numpy()
                if options.flip:
                    flipped = posterior_moments(vae, images.flip(2).to(dist.device)).cpu().numpy()
            writer.append(images.numpy(), moments if keep else np.zeros((0,)), np.array(
                [source.labels[indices[i]] for i in keep], np.int64), [source.keys[indices[i]] for i in keep],
                position=indices[-1] + 1, moments_flip=flipped)
            bar.update(len(indices))
            bar.set_postfix(skipped=len(skipped), refresh=False)
        rows = writer.written
        writer.finish({"skipped": len(skipped)})
    finally:
        writer.close()
    return rows, skipped


def _read_attrs(path: Path) -> tuple[dict, dict]:
    """(attributes, {dataset name: (shape, dtype, chunks)}) of a finished part."""
    with h5py.File(path, "r") as f:
        return dict(f.attrs), {name: (ds.shape, ds.dtype, ds.chunks) for name, ds in f.items()}


MERGE_BLOCK = 4096  # rows copied at a time when rank parts are merged (bounded memory)


def merge_parts(parts: list[Path], out: Path) -> None:
    """Concatenate rank parts, in order, into ``out`` (through ``out.partial``), then delete the parts."""
    infos = [_read_attrs(p) for p in parts]
    attrs, layout = dict(infos[0][0]), infos[0][1]
    counts = [info[1][fmt.LABELS][0][0] for info in infos]
    tmp = partial_path(out)
    with new_h5(tmp, out) as dst:
        for name, (shape, dtype, chunks) in layout.items():
            rows = shape[0] if name == fmt.CLASS_NAMES else sum(counts)
            dst.create_dataset(name, (rows, *shape[1:]), dtype, chunks=chunks, maxshape=(None, *shape[1:]))
        row = 0
        for part, n in zip(parts, counts):
            with h5py.File(part, "r") as src:
                for name in layout:
                    if name == fmt.CLASS_NAMES:
                        dst[name][...] = src[name][...]
                    else:  # block by block: a part of an ImageNet encode is tens of GB
                        for start in range(0, n, MERGE_BLOCK):
                            stop = min(start + MERGE_BLOCK, n)
                            dst[name][row + start : row + stop] = src[name][start:stop]
                        dst.check()  # a full disk stops the merge here
            row += n
        attrs.update(source_start=infos[0][0]["source_start"], source_end=infos[-1][0]["source_end"],
                     skipped=sum(int(info[0]["skipped"]) for info in infos))
        attrs[ATTR_WRITTEN], attrs[fmt.ATTR_POSITION] = row, attrs["source_end"]
        dst.attrs.update(attrs)
        dst.attrs.update(content_hashes(dst))
    tmp.replace(out)
    for part in parts:
        part.unlink()


def encode_dataset(source: ImageSource, out, vae, vae_info: dict, options: EncodeOptions,
                   dist: DistInfo = DistInfo(), log: Callable[[str], None] = tqdm.write,
                   progress: bool = True) -> EncodeSummary:
    """Encode ``source`` into ``out`` (or its shards); run the same call again to resume an interrupted run.

    One process (rank 0 under torchrun) holds ``out``'s lock meanwhile: a second encode into it is refused."""
    lock = file_lock(out).acquire() if dist.is_main else None
    try:
        return _encode(source, Path(out), vae, vae_info, options, dist, log, progress)
    finally:
        if lock is not None:
            lock.release()


def _encode(source: ImageSource, out: Path, vae, vae_info: dict, options: EncodeOptions, dist: DistInfo,
            log: Callable[[str], None], progress: bool) -> EncodeSummary:
    """encode_dataset's work, under the lock."""
    started = time.time()
    units = plan_units(out, len(source), options.shard_size, dist.world)
    identity = identity_attrs(source, vae_info, options)
    finals = [u.path for u in units] if options.shard_size else [out]
    if all([check_output(p, identity, options.overwrite) for p in finals]):
        written, skipped = _totals(finals)
        return EncodeSummary(finals, written, [], skipped, time.time() - started, reused=True)
    mine = [u for k, u in enumerate(units) if k % dist.world == dist.rank] if options.shard_size else \
        [units[dist.rank]]
    summary = EncodeSummary(outputs=finals)
    todo = [u for u in mine if options.overwrite or not is_complete(u.path, identity)]
    bar = tqdm(total=sum(u.end - u.start for u in todo), unit="img", disable=not (progress and dist.is_main),
               desc="encode", dynamic_ncols=True)
    with bar:
        for unit in todo:
            _, skipped = encode_unit(source, unit, vae, vae_info, options, dist, log, bar)
            summary.skipped += skipped
    patient_barrier()  # uneven shares finish far apart
    with main_phase("encode-merge"):
        if not options.shard_size and dist.world > 1 and dist.is_main:
            merge_parts([u.path for u in units], out)
    if dist.is_main:
        summary.written, summary.skipped_total = _totals(finals)
        if summary.written == 0:  # an empty "complete" dataset would only fail later, in train or make-ref
            for path in finals:
                path.unlink(missing_ok=True)
            raise EncodeError(f"{source.root}: none of its {len(source)} images could be decoded "
                              f"({summary.skipped_total} skipped); nothing was written")
    summary.seconds = time.time() - started
    return summary


def _totals(paths: list[Path]) -> tuple[int, int]:
    """(rows, skipped images) over finished files."""
    rows = skipped = 0
    for path in paths:
        with h5py.File(path, "r") as f:
            rows += f[fmt.LABELS].shape[0]
            skipped += int(f.attrs.get("skipped", 0))
    return rows, skipped
