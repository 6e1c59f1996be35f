"""Checkpoints: our atomic, weights-only format, and safe reading of the official REGLUE/REG/REPA files.

Our training checkpoint is one dict of plain data and tensors (see docs/checkpoints.md), written to a temp file
and renamed, and readable with ``torch.load(path, weights_only=True)``. Official files are read with
``weights_only=True`` too; only ``argparse.Namespace`` (their ``args``) and numpy's array reconstruction (their
norm statistics) are allowed, so no pickled code runs.
"""

from __future__ import annotations

import argparse
import codecs
import random
import re
import warnings
from pathlib import Path

import numpy as np
import torch

from reglue.fileio import atomic_path
from reglue.models import SemanticCompressor, SiT, build

FORMAT = "reglue-checkpoint"
COMPRESSOR_FORMAT = "reglue-compressor"
VERSION = 1
CHECKPOINT_NAME = re.compile(r"^(\d{7})\.pt$")

# Official parameter names -> ours (prefix renames; everything else is already identical).
OFFICIAL_RENAMES = (("cls_projectors2.", "cls_embedder.proj."), ("wg_norm.", "cls_embedder.norm."),
                    ("projectors.0.", "projector.mlp."))
OFFICIAL_SIZES = {"S": "sit-s2", "B": "sit-b2", "L": "sit-l2", "XL": "sit-xl2"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read; the one-line message names the file and the problem."""


def _numpy_globals() -> list:
    """What numpy arrays (the official norm statistics) need to unpickle, under both module names."""
    reconstruct = np._core.multiarray._reconstruct if hasattr(np, "_core") else np.core.multiarray._reconstruct
    names = ["numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct"]
    dtypes = [type(np.dtype(t)) for t in ("float32", "float64", "int64")]
    return [(reconstruct, n) for n in names] + [np.ndarray, np.dtype, codecs.encode, *dtypes]


def safe_load(path: str | Path) -> object:
    """``torch.load(weights_only=True)`` allowing only Namespace and numpy arrays; CheckpointError otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        with torch.serialization.safe_globals([argparse.Namespace, *_numpy_globals()]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated zips, foreign pickles, refused globals all land here
        reason = str(exc).strip().splitlines()
        hint = next((line for line in reason if "GLOBAL" in line or "Unsupported" in line), reason[0] if reason else "")
        raise CheckpointError(f"{path}: cannot be read safely ({type(exc).__name__}: {hint[:200]})") from None


# ---------------------------------------------------------------------------------------------------- RNG state

def capture_rng_state() -> dict:
    """Python, NumPy and torch (CPU and CUDA) RNG states as tensors and plain data."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": list(random.getstate()[1]) + [random.getstate()[2] is not None],
        "python_gauss": random.getstate()[2] or 0.0,
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Inverse of capture_rng_state."""
    *internal, has_gauss = state["python"]
    random.setstate((3, tuple(int(v) for v in internal), state["python_gauss"] if has_gauss else None))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------------- our format

def _state(obj) -> dict | None:
    return None if obj is None else obj.state_dict()


def save_checkpoint(path, *, config: dict, step: int, model, ema=None, optimizer=None, scaler=None,
                    data_state: dict | None = None, rng: dict | None = None, extra: dict | None = None) -> Path:
    """Write a training checkpoint atomically (temp file in the same directory, fsync, rename)."""
    payload = {
        "format": FORMAT, "version": VERSION, "step": int(step), "config": config,
        "model": _state(model), "ema": _state(ema), "optimizer": _state(optimizer), "scaler": _state(scaler),
        "data_state": data_state, "rng": rng, "extra": extra or {},
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_checkpoint(path) -> dict:
    """Read one of our checkpoints (weights only); CheckpointError when missing, truncated or foreign."""
    state = safe_load(path)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a reglue training checkpoint")
    if state.get("version", 0) > VERSION:
        raise CheckpointError(f"{path}: written by a newer reglue (format version {state['version']})")
    return state


def find_latest_checkpoint(directory) -> Path | None:
    """The highest-numbered NNNNNNN.pt in ``directory`` that loads; unreadable ones are skipped with a warning."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    candidates = sorted((p for p in directory.iterdir() if CHECKPOINT_NAME.match(p.name)), reverse=True)
    for path in candidates:
        try:
            load_checkpoint(path)
            return path
        except CheckpointError as exc:
            warnings.warn(f"skipping checkpoint {exc}", stacklevel=2)
    return None


# --------------------------------------------------------------------------------------------- official files

def _strip_module(state: dict) -> dict:
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def map_official_keys(state: dict) -> dict:
    """Rename official SiT parameter names onto ours."""
    out = {}
    for key, value in _strip_module(state).items():
        for old, new in OFFICIAL_RENAMES:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        out[key] = value
    return out


def infer_official_config(state: dict, args: argparse.Namespace | None) -> tuple[str, dict]:
    """(preset name, overrides) of an official model from its weights and training arguments."""
    from reglue import presets

    arch = str(getattr(args, "model", "") or "")
    match = re.fullmatch(r"SiT-(S|B|L|XL)/2", arch)
    if not match:
        raise CheckpointError(f"official args.model {arch!r}: expected SiT-S/2, SiT-B/2, SiT-L/2 or SiT-XL/2")
    base = OFFICIAL_SIZES[match.group(1)]
    in_channels = state["x_embedder.proj.weight"].shape[1]
    has_cls = "cls_projectors2.weight" in state
    has_projector = any(k.startswith("projectors.0.") for k in state)
    name = base + ("-reglue" if in_channels > 4 else "-reg" if has_cls else "-repa" if has_projector else "")
    if name not in presets.available():
        raise CheckpointError(f"official checkpoint looks like {name}, which has no preset")
    grid = int(state["pos_embed"].shape[1] - int(has_cls)) ** 0.5
    hidden = state["x_embedder.proj.weight"].shape[0]
    standard = presets.load(base)["model"]
    overrides = {
        "model__input_size": int(round(grid)) * 2, "model__qk_norm": "blocks.0.attn.q_norm.weight" in state,
        "model__num_classes": state["y_embedder.embedding_table.weight"].shape[0] - 1,
        "model__hidden_size": hidden, "model__depth": len({k.split(".")[1] for k in state if k.startswith("blocks.")}),
        "model__num_heads": standard["num_heads"] if hidden == standard["hidden_size"] else max(1, hidden // 64),
    }
    if has_cls:
        overrides["model__cls_dim"] = state["cls_projectors2.weight"].shape[1]
    if in_channels > 4:
        overrides["model__semantic_channels"] = in_channels - 4
    if has_projector:
        overrides["model__projector__depth"] = int(getattr(args, "encoder_depth", 8))
        overrides["model__projector__hidden_dim"] = state["projectors.0.0.weight"].shape[0]
        overrides["model__projector__out_dim"] = state["projectors.0.4.weight"].shape[0]
    return name, overrides


def _load_official(path: Path, raw: dict, ema: bool) -> tuple[SiT, dict]:
    from reglue import presets

    weights = raw.get("ema" if ema and raw.get("ema") is not None else "model")
    if not isinstance(weights, dict):
        raise CheckpointError(f"{path}: official checkpoint without a 'model' state dict")
    weights = _strip_module(weights)
    args = raw.get("args")
    name, overrides = infer_official_config(weights, args)
    config = presets.load(name, **overrides)
    family = "reglue" if name.endswith("-reglue") else "reg" if name.endswith("-reg") else "repa"
    config["origin"] = {"format": f"official-{family}", "path": str(path), "step": int(raw.get("steps", 0) or 0),
                        "weights": "ema" if ema else "model"}
    model = build(config)
    _load_strict(model, map_official_keys(weights), path)
    return model, config


def _load_strict(module: torch.nn.Module, state: dict, path) -> None:
    try:
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        first = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), str(exc)[:200])
        raise CheckpointError(f"{path}: weights do not fit the model ({first})") from None
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(f"{path}: weights do not fit the model (missing {result.missing_keys[:3]}, "
                              f"unexpected {result.unexpected_keys[:3]})")


def load_model(path, ema: bool = True) -> tuple[SiT, dict]:
    """(model in eval mode, config) from one of our checkpoints or an official REGLUE/REG/REPA ``.pt`` file."""
    path = Path(path)
    raw = safe_load(path)
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: not a checkpoint (a {type(raw).__name__})")
    if raw.get("format") == FORMAT:
        config = dict(raw["config"])
        model = build(config)
        use_ema = ema and raw.get("ema") is not None
        _load_strict(model, raw["ema"] if use_ema else raw["model"], path)
        config["origin"] = {"format": "reglue", "path": str(path), "step": int(raw["step"]),
                            "weights": "ema" if use_ema else "model"}
        return model.eval(), config
    if "model" in raw and "args" in raw:
        model, config = _load_official(path, raw, ema)
        return model.eval(), config
    raise CheckpointError(f"{path}: neither a reglue checkpoint nor an official REGLUE/REG/REPA one")


# ------------------------------------------------------------------------------------------------ compressor

def _official_compressor_channels(state: dict) -> list[int]:
    """Channel list of an official EncoderDecoder from its encoder conv shapes."""
    convs = sorted((int(m.group(1)), v) for k, v in state.items()
                   if (m := re.fullmatch(r"encoder\.model\.(\d+)\.weight", k)) and v.dim() == 4)
    if not convs:
        raise CheckpointError("no encoder convolutions found")
    return [convs[0][1].shape[1]] + [w.shape[0] for _, w in convs]


def load_norm_stats(path) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) float32 tensors from the official numpy file or one of ours."""
    raw = safe_load(path)
    if isinstance(raw, dict) and raw.get("format") == COMPRESSOR_FORMAT:
        raw = {"mean": raw["mean"], "std": raw["std"]}
    if not (isinstance(raw, dict) and "mean" in raw and "std" in raw):
        raise CheckpointError(f"{path}: expected a dict with 'mean' and 'std'")
    return tuple(torch.as_tensor(np.asarray(raw[k]), dtype=torch.float32) for k in ("mean", "std"))


def save_compressor(path, compressor: SemanticCompressor, mean, std, vfm: str, layers) -> Path:
    """Our compressor file: weights, channel list, norm statistics, VFM id and layers, written atomically."""
    payload = {"format": COMPRESSOR_FORMAT, "version": VERSION, "channels": list(compressor.channels),
               "state_dict": compressor.state_dict(), "mean": mean.float().cpu(), "std": std.float().cpu(),
               "vfm": vfm, "layers": list(layers)}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def load_compressor(path, norm_stats=None) -> tuple[SemanticCompressor, tuple | None]:
    """(compressor in eval mode, (mean, std) or None) from our file or the official EncoderDecoder state dict."""
    raw = safe_load(path)
    if isinstance(raw, dict) and raw.get("format") == COMPRESSOR_FORMAT:
        compressor = SemanticCompressor(raw["channels"])
        _load_strict(compressor, raw["state_dict"], path)
        stats = (raw["mean"], raw["std"])
    elif isinstance(raw, dict) and any(k.endswith("encoder.model.0.weight") for k in raw):
        state = _strip_module(raw)
        try:
            channels = _official_compressor_channels(state)
        except CheckpointError as exc:
            raise CheckpointError(f"{path}: {exc}") from None
        compressor = SemanticCompressor(channels)
        _load_strict(compressor, {k.replace(".model.", ".layers.", 1): v for k, v in state.items()}, path)
        stats = None
    else:
        raise CheckpointError(f"{path}: neither a reglue compressor nor an official EncoderDecoder state dict")
    if norm_stats is not None:
        stats = load_norm_stats(norm_stats)
    return compressor.eval(), stats
