"""Snapshots of the power-function EMAs: RUN/ema/NNNNNNN.pt, one file per snapshot step holding every tracked
profile, written atomically and pruned by the run's ``ema.snapshot_keep_*`` rule (docs/ema.md).

A snapshot is plain data and tensors (``torch.load(weights_only=True)``): format, version, step, the profiles
(sigma_rel and gamma each), the precision, the run configuration, the names of the model's parameters (the
tensors a reconstruction combines; buffers are copied) and one state dict per profile.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch

from reglue.checkpoints.reading import CheckpointError, read
from reglue.config.schema import plain
from reglue.fileio import atomic_path, save_torch

FORMAT = "reglue-ema-snapshot"
VERSION = 1
DIRECTORY = "ema"  # inside the run directory
NAME = re.compile(r"^(\d{7})\.pt$")
DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


class SnapshotError(CheckpointError):
    """A snapshot that cannot be used; the one-line message names the file and the problem."""


def snapshot_dir(run_root) -> Path:
    """RUN/ema."""
    return Path(run_root) / DIRECTORY


def snapshot_path(run_root, step: int) -> Path:
    """RUN/ema/NNNNNNN.pt."""
    return snapshot_dir(run_root) / f"{step:07d}.pt"


def save_snapshot(run_root, step: int, power_ema, precision: str, config) -> Path:
    """Write the power EMAs of ``step`` atomically in ``precision`` (fp16 or fp32)."""
    dtype = DTYPES[precision]
    names = [name for name, _ in power_ema.copies[0].named_parameters()]
    payload = {"format": FORMAT, "version": VERSION, "step": int(step),
               "profiles": [{"sigma_rel": s, "gamma": g} for s, g in zip(power_ema.sigma_rels, power_ema.gammas)],
               "precision": precision, "parameters": names,
               "config": plain(config) if dataclasses.is_dataclass(config) else config,
               "weights": [{k: v.detach().to("cpu", dtype) if v.is_floating_point() else v.detach().cpu()
                            for k, v in ema.state_dict().items()} for ema in power_ema.copies]}
    path = snapshot_path(run_root, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_torch(payload, tmp, path)
    return path


def snapshot_steps(run_root) -> list[int]:
    """Steps of the snapshot files present, ascending (not read)."""
    directory = snapshot_dir(run_root)
    if not directory.is_dir():
        return []
    return sorted(int(m.group(1)) for p in directory.iterdir() if (m := NAME.match(p.name)))


def load_snapshot(path, mmap: bool = True) -> dict:
    """A snapshot's contents; SnapshotError naming the file when it is missing, damaged or of another kind."""
    state = read(path, mmap=mmap)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise SnapshotError(f"{path}: not a reglue EMA snapshot")
    if state.get("version", 0) > VERSION:
        raise SnapshotError(f"{path}: written by a newer reglue (snapshot version {state['version']})")
    return state


def prune_snapshots(run_root, keep_last: int, keep_every: int | None) -> list[int]:
    """Delete snapshots beyond the newest ``keep_last`` that are not multiples of ``keep_every`` (None: keep every
    snapshot); the steps deleted."""
    if keep_every is None:
        return []
    steps = snapshot_steps(run_root)
    gone = [s for s in steps[:-keep_last] if s % keep_every]
    for step in gone:
        snapshot_path(run_root, step).unlink(missing_ok=True)
    return gone
