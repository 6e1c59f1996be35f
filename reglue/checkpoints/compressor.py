"""Semantic compressor files: ours (weights, channels, norm statistics, VFM) and the official EncoderDecoder."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from reglue.checkpoints.ours import FORMAT, VERSION, find_latest_checkpoint
from reglue.checkpoints.reading import CheckpointError, built_and_loaded, numpy_globals, read, strip_module
from reglue.fileio import atomic_path, save_torch
from reglue.models import SemanticCompressor

COMPRESSOR_FORMAT = "reglue-compressor"
COMPRESSOR_FILE = "compressor.pt"  # a compressor run's product, in its run directory


def _official_compressor_channels(state: dict) -> list[int]:
    """Channel list of an official EncoderDecoder from its encoder conv shapes."""
    convs = sorted((int(m.group(1)), v) for k, v in state.items()
                   if (m := re.fullmatch(r"encoder\.model\.(\d+)\.weight", k)) and v.dim() == 4)
    return [convs[0][1].shape[1]] + [w.shape[0] for _, w in convs]


def load_norm_stats(path) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) float32 tensors from the official numpy file or our compressor file (any {'mean', 'std'} dict)."""
    raw = read(path, allow=tuple(numpy_globals()))
    if not (isinstance(raw, dict) and "mean" in raw and "std" in raw):
        raise CheckpointError(f"{path}: expected a dict with 'mean' and 'std'")
    mean, std = (torch.as_tensor(np.asarray(raw[k]), dtype=torch.float32).reshape(-1) for k in ("mean", "std"))
    if mean.shape != std.shape:
        raise CheckpointError(f"{path}: mean {tuple(mean.shape)} and std {tuple(std.shape)} differ in shape")
    return mean, std


def save_compressor(path, compressor: SemanticCompressor, mean, std, vfm: str, layers) -> Path:
    """Our compressor file: weights, channel list, norm statistics, VFM id and layers, written atomically."""
    payload = {"format": COMPRESSOR_FORMAT, "version": VERSION, "channels": list(compressor.channels),
               "state_dict": compressor.state_dict(), "mean": mean.detach().float().cpu(),
               "std": std.detach().float().cpu(), "vfm": vfm, "layers": [int(v) for v in layers]}
    with atomic_path(path) as tmp:
        save_torch(payload, tmp, path)
    return Path(path)


def _compressor_parts(path, raw) -> tuple[list[int], dict, tuple | None]:
    """(channels, state dict in our names, stats or None) of our compressor file, a compressor run's training
    checkpoint, or the official file."""
    if isinstance(raw, dict) and raw.get("format") == COMPRESSOR_FORMAT:
        return raw["channels"], raw["state_dict"], (raw["mean"], raw["std"])
    if isinstance(raw, dict) and raw.get("format") == FORMAT:
        config = raw.get("config") or {}
        if config.get("kind") != "compressor":
            raise CheckpointError(f"{path}: a {config.get('kind')} run checkpoint, not a compressor's")
        return list(config["compressor"]["channels"]), raw["model"], (raw["extra"]["mean"], raw["extra"]["std"])
    state = strip_module(raw) if isinstance(raw, dict) else {}
    if "encoder.model.0.weight" not in state:
        raise CheckpointError(f"{path}: neither a reglue compressor nor an official EncoderDecoder state dict")
    renamed = {re.sub(r"^(encoder|decoder)\.model\.", r"\1.layers.", k): v for k, v in state.items()}
    return _official_compressor_channels(state), renamed, None


def compressor_file(path) -> Path:
    """The file a --compressor PATH names: a compressor run's directory means its compressor.pt (when the run has
    finished) or else its newest checkpoint (so does its checkpoints/ directory); a file is itself."""
    path = Path(path)
    if not path.is_dir():
        return path
    if (path / COMPRESSOR_FILE).is_file():
        return path / COMPRESSOR_FILE
    # the run directory, or its checkpoints/ directory
    latest = find_latest_checkpoint(path / "checkpoints") or find_latest_checkpoint(path)
    if latest is None:
        raise CheckpointError(f"{path}: a directory without {COMPRESSOR_FILE} or checkpoints: not a compressor run")
    return latest


def load_compressor(path, norm_stats=None) -> tuple[SemanticCompressor, tuple | None]:
    """(compressor in eval mode, (mean, std) or None) from our compressor file, a compressor run (its directory or
    one of its checkpoints) or the official EncoderDecoder state dict."""
    path = compressor_file(path)
    channels, state, stats = _compressor_parts(path, read(path))
    compressor = built_and_loaded(lambda: SemanticCompressor(channels), state, path)
    if norm_stats is not None:
        stats = load_norm_stats(norm_stats)
    if stats is not None and not (stats[0].numel() == stats[1].numel() == channels[0]):
        raise CheckpointError(f"{norm_stats or path}: norm statistics of {stats[0].numel()} channels for a "
                              f"compressor reading {channels[0]}")
    return compressor.eval(), stats
