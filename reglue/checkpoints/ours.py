"""Our training checkpoint: one dict of plain data and tensors, written atomically (docs/checkpoints.md)."""

from __future__ import annotations

import dataclasses
import re
import warnings
from pathlib import Path

from evaluation.environment import environment
from reglue.checkpoints.reading import CheckpointError, read
from reglue.config.schema import plain
from reglue.fileio import atomic_path, save_torch

FORMAT = "reglue-checkpoint"
VERSION = 1
CHECKPOINT_NAME = re.compile(r"^(\d{7})\.pt$")


def save_checkpoint(path, *, config, step: int, model, ema=None, optimizer=None, scaler=None, power_ema=None,
                    data_state: dict | None = None, rng: dict | None = None, extra: dict | None = None) -> Path:
    """Write a training checkpoint atomically (temp file in the same directory, fsync, rename); ``config`` (a run
    configuration) is stored in its plain form; ``power_ema`` (reglue.ema.tracking.PowerEMA) only when tracked."""
    config = plain(config) if dataclasses.is_dataclass(config) else config
    parts = {"model": model, "ema": ema, "optimizer": optimizer, "scaler": scaler,
             **({"power_ema": power_ema} if power_ema is not None else {})}
    device = next((p.device for p in model.parameters()), None) if model is not None else None
    payload = {"format": FORMAT, "version": VERSION, "step": int(step), "config": config,
               "environment": environment(device),  # what decided the weights' last bits
               **{k: None if v is None else v.state_dict() for k, v in parts.items()},
               "data_state": data_state, "rng": rng, "extra": extra or {}}
    with atomic_path(path) as tmp:
        save_torch(payload, tmp, path)
    return Path(path)


def check_ours(path, state) -> dict:
    """state if it is one of our training checkpoints, else CheckpointError."""
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a reglue training checkpoint")
    if state.get("version", 0) > VERSION:
        raise CheckpointError(f"{path}: written by a newer reglue (format version {state['version']})")
    return state


def load_checkpoint(path, mmap: bool = False) -> dict:
    """Read one of our checkpoints (weights only); CheckpointError when missing, truncated or foreign. ``mmap``: the
    tensors stay in the page cache, shared by the processes of a node, instead of a copy per rank in host RAM."""
    return check_ours(path, read(path, mmap=mmap))


def find_latest_checkpoint(directory) -> Path | None:
    """The highest-numbered NNNNNNN.pt in ``directory`` that loads; unreadable ones are skipped with a warning."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    for path in sorted((p for p in directory.iterdir() if CHECKPOINT_NAME.match(p.name)), reverse=True):
        try:
            check_ours(path, read(path, mmap=True))  # mmap: the check reads the index, not every tensor
            return path
        except CheckpointError as exc:
            warnings.warn(f"skipping checkpoint {exc}", stacklevel=2)
    return None
