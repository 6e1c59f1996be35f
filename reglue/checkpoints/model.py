"""A diffusion model and its run configuration from any checkpoint: ours or an official one."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from reglue import config as run_config
from reglue.checkpoints.official import load_official
from reglue.checkpoints.ours import FORMAT, check_ours
from reglue.checkpoints.reading import CheckpointError, built_and_loaded, read, strip_module
from reglue.config.sections import DiffusionRun
from reglue.errors import ConfigError
from reglue.models import SiT, build


def load_model(path, ema: bool = True) -> tuple[SiT, DiffusionRun]:
    """(model in eval mode, its run configuration with ``origin`` set) from one of our checkpoints or an official
    REGLUE/REG/REPA ``.pt`` file."""
    path = Path(path)
    raw = read(path, allow=(argparse.Namespace,))
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: not a checkpoint (a {type(raw).__name__})")
    if raw.get("format") == FORMAT:
        check_ours(path, raw)
        stored = raw.get("config")
        if not isinstance(stored, dict) or stored.get("kind", "diffusion") != "diffusion":
            kind = stored.get("kind") if isinstance(stored, dict) else "unknown"
            raise CheckpointError(f"{path}: a {kind} run checkpoint, not a diffusion model")
        try:
            config = run_config.from_dict({"kind": "diffusion", **stored}, stored=True)
        except ConfigError as exc:
            raise CheckpointError(f"{path}: its configuration does not load: {exc}") from None
        use_ema = raw.get("ema") is not None and (ema or raw.get("model") is None)
        if not ema and use_ema:
            raise CheckpointError(f"{path}: holds only EMA weights (a post-hoc EMA reconstruction); sample it with "
                                  "--weights ema")
        model = built_and_loaded(lambda: build(config), raw["ema"] if use_ema else raw["model"], path)
        origin = {"format": "reglue", "path": str(path), "step": int(raw["step"]),
                  "weights": "ema" if use_ema else "model", "ema": ema_used(config, raw, use_ema)}
        return model.eval(), dataclasses.replace(config, origin=origin)
    if ("model" in raw and "args" in raw) or "x_embedder.proj.weight" in strip_module(raw):
        model, config = load_official(path, raw, ema)
        return model.eval(), config
    raise CheckpointError(f"{path}: neither a reglue checkpoint nor an official REGLUE/REG/REPA one")


def ema_used(config: DiffusionRun, raw: dict, use_ema: bool) -> dict:
    """Which average of the weights a checkpoint's loaded weights are: {"kind": "post-hoc", "sigma_rel", "step",
    "residual"} for a `reglue ema` reconstruction, {"kind": "classic", "decay"} for the trained EMA, {"kind":
    "none"} for the raw weights."""
    if not use_ema:
        return {"kind": "none"}
    post_hoc = (raw.get("extra") or {}).get("post_hoc_ema")
    if isinstance(post_hoc, dict):
        return {"kind": "post-hoc", **{k: post_hoc.get(k) for k in ("sigma_rel", "step", "residual")}}
    return {"kind": "classic", "decay": config.ema.decay}
