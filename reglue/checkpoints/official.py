"""The official REGLUE / REG / REPA / SiT checkpoints: which preset they match, and their weights in our names."""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

from reglue import presets
from reglue.checkpoints.reading import CheckpointError, built_and_loaded, strip_module
from reglue.config.sections import DiffusionRun
from reglue.constants import LATENT_CHANNELS, VAE_DOWNSAMPLE
from reglue.encoders.registry import DINOV2_B_REG, VFM_REGISTRY
from reglue.models import ConfigError, SiT, build

# Official parameter names -> ours (prefix renames; everything else is already identical).
OFFICIAL_RENAMES = (("cls_projectors2.", "cls_embedder.proj."), ("wg_norm.", "cls_embedder.norm."),
                    ("projectors.0.", "projector.mlp."))
OFFICIAL_SIZES = {"S": "sit-s2", "B": "sit-b2", "L": "sit-l2", "XL": "sit-xl2"}
STANDARD_SIZES = {(384, 12): "S", (768, 12): "B", (1024, 24): "L", (1152, 28): "XL"}  # (hidden, depth)


def map_official_keys(state: dict) -> dict:
    """Rename official SiT parameter names onto ours."""
    out = {}
    for key, value in strip_module(state).items():
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
    resolution = grid * patch * VAE_DOWNSAMPLE
    overrides = {"model__input_size": grid * patch, "data__resolution": resolution,
                 "vfm__image_size": VFM_REGISTRY[DINOV2_B_REG].image_size(resolution),  # the official VFM
                 "model__num_classes": rows - 1,
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

    args = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    size, family = _official_size(state, args), _official_family(state)
    name = OFFICIAL_SIZES[size] + ("" if family == "sit" else f"-{family}")
    if name not in presets.available():
        raise CheckpointError(f"looks like an official {family.upper()} SiT-{size}/2, which has no preset")
    standard = presets.load(name).model.to_dict()
    return name, {**_official_shapes(state, args), **_official_width(state, standard, size),
                  **_official_projector(state, args, standard), **_official_transport(args)}


def _official_transport(args: dict) -> dict:
    """The interpolant path the official run trained with (its --path-type), which the SDE's score depends on."""
    path = args.get("path_type")
    return {"transport__path": path} if path in ("linear", "cosine") else {}


def load_official(path: Path, raw: dict, ema: bool) -> tuple[SiT, DiffusionRun]:
    """Build the preset an official file matches and load its (EMA) weights strictly."""

    bare = "x_embedder.proj.weight" in strip_module(raw)  # a released state dict on its own (REPA's last.pt)
    key = "ema" if ema and raw.get("ema") is not None else "model"
    weights = raw if bare else raw.get(key)
    if not isinstance(weights, dict):
        raise CheckpointError(f"{path}: official checkpoint without a '{key}' state dict")
    weights, args = strip_module(weights), None if bare else raw.get("args")
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
    origin = {"format": f"official-{_official_family(weights)}", "path": str(path),
              "step": 0 if bare else int(raw.get("steps") or 0), "weights": "state dict" if bare else key,
              "ema": {"kind": "classic", "decay": config.ema.decay} if key == "ema" and not bare else
              {"kind": "unknown" if bare else "none"}, **files}
    config = dataclasses.replace(config, origin=origin)
    return built_and_loaded(lambda: build(config), map_official_keys(weights), path), config
