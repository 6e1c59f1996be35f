"""Reading torch files safely: ``weights_only=True`` with only the globals a file kind needs, one-line errors,
and strict loading of weights into a module built on the meta device."""

from __future__ import annotations

import codecs
import re
from pathlib import Path

import numpy as np
import torch

from reglue.errors import UserError


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be read; the one-line message names the file and the problem."""


def numpy_globals() -> list:
    """What numpy arrays (the official norm statistics) need to unpickle, under both module names."""
    reconstruct = np._core.multiarray._reconstruct if hasattr(np, "_core") else np.core.multiarray._reconstruct
    names = ["numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct"]
    dtypes = [type(np.dtype(t)) for t in ("float32", "float64")]
    return [(reconstruct, n) for n in names] + [np.ndarray, np.dtype, codecs.encode, *dtypes]


def _why(exc: Exception) -> str:
    """One line saying why torch.load failed: a refused global, a file that is not plain data, or a broken zip."""
    text = str(exc)
    if refused := re.search(r"GLOBAL ([\w.]+)", text):
        return f"cannot be read safely: it would import {refused.group(1)} (only plain data and tensors are read)"
    if "WeightsUnpickler error" in text:
        detail = next((ln.strip() for ln in text.split("WeightsUnpickler error:", 1)[1].splitlines() if ln.strip()), "")
        return f"cannot be read safely: not a torch file of plain data and tensors ({detail[:120]})"
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)
    return f"truncated or corrupt ({first.split('. ')[0][:160]})"


def read(path, allow: tuple = (), mmap: bool = False) -> object:
    """``torch.load(weights_only=True)`` with only ``allow`` added to the safe globals; CheckpointError otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        with torch.serialization.safe_globals(list(allow)):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # noqa: BLE001 - truncated zips, foreign pickles, refused globals all land here
        raise CheckpointError(f"{path}: {_why(exc)}") from None


def strip_module(state: dict) -> dict:
    """Drop the ``module.`` prefix that (Distributed)DataParallel adds."""
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def load_strict(module: torch.nn.Module, state: dict, path) -> None:
    """load_state_dict(assign=True) that turns any missing, unexpected or mis-shaped weight into a CheckpointError."""
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}  # fp16 releases -> fp32
    try:
        result = module.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as exc:
        first = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), str(exc)[:200])
        raise CheckpointError(f"{path}: weights do not fit the model ({first})") from None
    missing, unexpected = result.missing_keys, result.unexpected_keys
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not fit the model ({len(missing)} missing, e.g. {missing[:3]}; "
                              f"{len(unexpected)} unexpected, e.g. {unexpected[:3]})")


def built_and_loaded(make, state: dict, path) -> torch.nn.Module:
    """make() on the meta device (no initialisation cost), then the checkpoint's tensors assigned strictly."""
    with torch.device("meta"):
        module = make()
    load_strict(module, state, path)
    if any(t.is_meta for t in [*module.parameters(), *module.buffers()]):  # a buffer no state dict holds
        module = make()
        load_strict(module, state, path)
    return module
