"""Checkpoints: our atomic, weights-only format, and safe reading of the official REGLUE/REG/REPA files.

Our training checkpoint is one dict of plain data and tensors (see docs/checkpoints.md), written to a temp file
and renamed, and readable with ``torch.load(path, weights_only=True)``. Official files are read with
``weights_only=True`` too; only ``argparse.Namespace`` (their ``args``) and numpy's array reconstruction (their
norm statistics) are allowed, each only where that file kind needs it, so no pickled code runs.
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

from reglue.constants import LATENT_CHANNELS
from reglue.fileio import atomic_path, save_torch
from reglue.models import ConfigError, SemanticCompressor, SiT, build

FORMAT = "reglue-checkpoint"
COMPRESSOR_FORMAT = "reglue-compressor"
VERSION = 1
CHECKPOINT_NAME = re.compile(r"^(\d{7})\.pt$")

# Official parameter names -> ours (prefix renames; everything else is already identical).
OFFICIAL_RENAMES = (("cls_projectors2.", "cls_embedder.proj."), ("wg_norm.", "cls_embedder.norm."),
                    ("projectors.0.", "projector.mlp."))
OFFICIAL_SIZES = {"S": "sit-s2", "B": "sit-b2", "L": "sit-l2", "XL": "sit-xl2"}
STANDARD_SIZES = {(384, 12): "S", (768, 12): "B", (1024, 24): "L", (1152, 28): "XL"}  # (hidden, depth)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read; the one-line message names the file and the problem."""


def _numpy_globals() -> list:
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


def _read(path, allow: tuple = (), mmap: bool = False) -> object:
    """``torch.load(weights_only=True)`` with only ``allow`` added to the safe globals; CheckpointError otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        with torch.serialization.safe_globals(list(allow)):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # noqa: BLE001 - truncated zips, foreign pickles, refused globals all land here
        raise CheckpointError(f"{path}: {_why(exc)}") from None


# ---------------------------------------------------------------------------------------------------- RNG state

def capture_rng_state() -> dict:
    """Python, NumPy and torch (CPU, and the current CUDA device once CUDA is in use) RNG states as plain data."""
    version, internal, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict) -> None:
    """Inverse of capture_rng_state (the CUDA state goes to the current device)."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ------------------------------------------------------------------------------------------------- our format

def save_checkpoint(path, *, config: dict, step: int, model, ema=None, optimizer=None, scaler=None,
                    data_state: dict | None = None, rng: dict | None = None, extra: dict | None = None) -> Path:
    """Write a training checkpoint atomically (temp file in the same directory, fsync, rename)."""
    parts = {"model": model, "ema": ema, "optimizer": optimizer, "scaler": scaler}
    payload = {"format": FORMAT, "version": VERSION, "step": int(step), "config": config,
               **{k: None if v is None else v.state_dict() for k, v in parts.items()},
               "data_state": data_state, "rng": rng, "extra": extra or {}}
    with atomic_path(path) as tmp:
        save_torch(payload, tmp, path)
    return Path(path)


def _check_ours(path, state) -> dict:
    """state if it is one of our training checkpoints, else CheckpointError."""
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a reglue training checkpoint")
    if state.get("version", 0) > VERSION:
        raise CheckpointError(f"{path}: written by a newer reglue (format version {state['version']})")
    return state


def load_checkpoint(path) -> dict:
    """Read one of our checkpoints (weights only); CheckpointError when missing, truncated or foreign."""
    return _check_ours(path, _read(path))


def find_latest_checkpoint(directory) -> Path | None:
    """The highest-numbered NNNNNNN.pt in ``directory`` that loads; unreadable ones are skipped with a warning."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    for path in sorted((p for p in directory.iterdir() if CHECKPOINT_NAME.match(p.name)), reverse=True):
        try:
            _check_ours(path, _read(path, mmap=True))  # mmap: the check reads the index, not every tensor
            return path
        except CheckpointError as exc:
            warnings.warn(f"skipping checkpoint {exc}", stacklevel=2)
    return None


def _load_strict(module: torch.nn.Module, state: dict, path) -> None:
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


def _built_and_loaded(make, state: dict, path) -> torch.nn.Module:
    """make() on the meta device (no initialisation cost), then the checkpoint's tensors assigned strictly."""
    with torch.device("meta"):
        module = make()
    _load_strict(module, state, path)
    if any(t.is_meta for t in [*module.parameters(), *module.buffers()]):  # a buffer no state dict holds
        module = make()
        _load_strict(module, state, path)
    return module


# --------------------------------------------------------------------------------------------- official files

def _strip_module(state: dict) -> dict:
    """Drop the ``module.`` prefix that (Distributed)DataParallel adds."""
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


def _depth(state: dict) -> int:
    """Number of transformer blocks in a SiT state dict."""
    return len({k.split(".")[1] for k in state if k.startswith("blocks.")})


def _official_size(state: dict, args: dict) -> str:
    """S, B, L or XL: from ``args.model`` when present, else from the hidden width and depth of the weights."""
    if args.get("model") is not None:
        match = re.fullmatch(r"SiT-(S|B|L|XL)/2", str(args["model"]))
        if not match:
            raise CheckpointError(f"official args.model {args['model']!r}: expected SiT-S/2, -B/2, -L/2 or -XL/2")
        return match.group(1)
    shape = (state["x_embedder.proj.weight"].shape[0], _depth(state))
    if shape not in STANDARD_SIZES:
        raise CheckpointError(f"no args.model, and hidden {shape[0]} / depth {shape[1]} match no SiT size")
    return STANDARD_SIZES[shape]


def _official_family(state: dict) -> str:
    """reglue, reg, repa or sit, read off which parts the weights have."""
    in_channels = state["x_embedder.proj.weight"].shape[1]
    has_cls = "cls_projectors2.weight" in state
    if in_channels > LATENT_CHANNELS:
        if not has_cls:
            raise CheckpointError(f"{in_channels} input channels without a [CLS] token: not a REGLUE layout")
        return "reglue"
    return "reg" if has_cls else "repa" if "projectors.0.0.weight" in state else "sit"


def _official_shapes(state: dict, args: dict) -> dict:
    """Overrides read off the weights: grid, classes, qk-norm, semantic channels, [CLS] width."""
    _, in_channels, patch = state["x_embedder.proj.weight"].shape[:3]
    has_cls = "cls_projectors2.weight" in state
    tokens = state["pos_embed"].shape[1] - int(has_cls)
    grid = round(tokens**0.5)
    if patch != 2 or grid * grid != tokens:
        raise CheckpointError(f"patch {patch}, pos_embed {tuple(state['pos_embed'].shape)}: not a square /2 SiT")
    rows = state["y_embedder.embedding_table.weight"].shape[0]
    if args.get("num_classes") not in (None, rows - 1):
        raise CheckpointError(f"{rows} label rows for {args['num_classes']} classes: trained without a null class")
    overrides = {"model__input_size": grid * patch, "model__num_classes": rows - 1,
                 "model__qk_norm": "blocks.0.attn.q_norm.weight" in state,
                 "model__semantic_channels": in_channels - LATENT_CHANNELS}
    if has_cls:
        overrides["model__cls_dim"] = state["cls_projectors2.weight"].shape[1]
    return overrides


def _official_width(state: dict, standard: dict, size: str) -> dict:
    """Overrides for weights narrower or shallower than the named size (tests): that size's head width is kept."""
    hidden, depth = state["x_embedder.proj.weight"].shape[0], _depth(state)
    if (hidden, depth) == (standard["hidden_size"], standard["depth"]):
        return {}
    width = standard["hidden_size"] // standard["num_heads"]
    if hidden % width:
        raise CheckpointError(f"hidden size {hidden} is not a multiple of SiT-{size}/2's head width {width}")
    return {"model__hidden_size": hidden, "model__depth": depth, "model__num_heads": hidden // width}


def _official_projector(state: dict, args: dict, standard: dict) -> dict:
    """Projector overrides: depth from ``args.encoder_depth``, widths from the weights; none if it has none."""
    if "projectors.0.0.weight" not in state:
        return {} if standard["projector"] is None else {"model__projector": None}
    return {"model__projector__depth": int(args.get("encoder_depth") or standard["projector"]["depth"]),
            "model__projector__hidden_dim": state["projectors.0.0.weight"].shape[0],
            "model__projector__out_dim": state["projectors.0.4.weight"].shape[0]}


def infer_official_config(state: dict, args) -> tuple[str, dict]:
    """(preset name, overrides) of an official model (names already stripped of ``module.``)."""
    from reglue import presets

    args = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    size, family = _official_size(state, args), _official_family(state)
    name = OFFICIAL_SIZES[size] + ("" if family == "sit" else f"-{family}")
    if name not in presets.available():
        raise CheckpointError(f"looks like an official {family.upper()} SiT-{size}/2, which has no preset")
    standard = presets.load(name)["model"]
    return name, {**_official_shapes(state, args), **_official_width(state, standard, size),
                  **_official_projector(state, args, standard), **_official_transport(args)}


def _official_transport(args: dict) -> dict:
    """The interpolant path the official run trained with (its --path-type), which the SDE's score depends on."""
    path = args.get("path_type")
    return {"transport__path": path} if path in ("linear", "cosine") else {}


def _load_official(path: Path, raw: dict, ema: bool) -> tuple[SiT, dict]:
    """Build the preset an official file matches and load its (EMA) weights strictly."""
    from reglue import presets

    bare = "x_embedder.proj.weight" in _strip_module(raw)  # a released state dict on its own (REPA's last.pt)
    key = "ema" if ema and raw.get("ema") is not None else "model"
    weights = raw if bare else raw.get(key)
    if not isinstance(weights, dict):
        raise CheckpointError(f"{path}: official checkpoint without a '{key}' state dict")
    weights, args = _strip_module(weights), None if bare else raw.get("args")
    try:
        name, overrides = infer_official_config(weights, args)
        config = presets.load(name, **overrides)
    except KeyError as exc:
        raise CheckpointError(f"{path}: no {exc.args[0]} in the weights: not an official SiT") from None
    except (CheckpointError, ConfigError) as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    files = {ours: getattr(args, theirs) for ours, theirs in (("compressor", "compression_model_path"),
                                                              ("norm_stats", "norm_stats"))
             if isinstance(getattr(args, theirs, None), str)}  # the semantic pipeline it was trained with
    config["origin"] = {"format": f"official-{_official_family(weights)}", "path": str(path),
                        "step": 0 if bare else int(raw.get("steps") or 0),
                        "weights": "state dict" if bare else key, **files}
    return _built_and_loaded(lambda: build(config), map_official_keys(weights), path), config


def load_model(path, ema: bool = True) -> tuple[SiT, dict]:
    """(model in eval mode, config) from one of our checkpoints or an official REGLUE/REG/REPA ``.pt`` file."""
    path = Path(path)
    raw = _read(path, allow=(argparse.Namespace,))
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: not a checkpoint (a {type(raw).__name__})")
    if raw.get("format") == FORMAT:
        _check_ours(path, raw)
        config = dict(raw["config"])
        if config.get("kind") not in (None, "diffusion"):
            raise CheckpointError(f"{path}: a {config.get('kind')} run checkpoint, not a diffusion model")
        use_ema = ema and raw.get("ema") is not None
        model = _built_and_loaded(lambda: build(config), raw["ema"] if use_ema else raw["model"], path)
        config["origin"] = {"format": "reglue", "path": str(path), "step": int(raw["step"]),
                            "weights": "ema" if use_ema else "model"}
        return model.eval(), config
    if ("model" in raw and "args" in raw) or "x_embedder.proj.weight" in _strip_module(raw):
        model, config = _load_official(path, raw, ema)
        return model.eval(), config
    raise CheckpointError(f"{path}: neither a reglue checkpoint nor an official REGLUE/REG/REPA one")


# ------------------------------------------------------------------------------------------------ compressor

def _official_compressor_channels(state: dict) -> list[int]:
    """Channel list of an official EncoderDecoder from its encoder conv shapes."""
    convs = sorted((int(m.group(1)), v) for k, v in state.items()
                   if (m := re.fullmatch(r"encoder\.model\.(\d+)\.weight", k)) and v.dim() == 4)
    return [convs[0][1].shape[1]] + [w.shape[0] for _, w in convs]


def load_norm_stats(path) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) float32 tensors from the official numpy file or our compressor file (any {'mean', 'std'} dict)."""
    raw = _read(path, allow=tuple(_numpy_globals()))
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
    """(channels, state dict in our names, stats or None) of our compressor file or the official one."""
    if isinstance(raw, dict) and raw.get("format") == COMPRESSOR_FORMAT:
        return raw["channels"], raw["state_dict"], (raw["mean"], raw["std"])
    state = _strip_module(raw) if isinstance(raw, dict) else {}
    if "encoder.model.0.weight" not in state:
        raise CheckpointError(f"{path}: neither a reglue compressor nor an official EncoderDecoder state dict")
    renamed = {re.sub(r"^(encoder|decoder)\.model\.", r"\1.layers.", k): v for k, v in state.items()}
    return _official_compressor_channels(state), renamed, None


def load_compressor(path, norm_stats=None) -> tuple[SemanticCompressor, tuple | None]:
    """(compressor in eval mode, (mean, std) or None) from our file or the official EncoderDecoder state dict."""
    channels, state, stats = _compressor_parts(path, _read(path))
    compressor = _built_and_loaded(lambda: SemanticCompressor(channels), state, path)
    if norm_stats is not None:
        stats = load_norm_stats(norm_stats)
    if stats is not None and not (stats[0].numel() == stats[1].numel() == channels[0]):
        raise CheckpointError(f"{norm_stats or path}: norm statistics of {stats[0].numel()} channels for a "
                              f"compressor reading {channels[0]}")
    return compressor.eval(), stats
