"""A VFM's weights, from timm's file or the family's own release, into the timm model at a given input size.

Three steps, each the family's own rule: read the file (safetensors, a torch pickle, an OpenAI CLIP TorchScript
archive; I-JEPA's release gives its ``target_encoder``), convert it to timm's layout at the native grid with
timm's converter for that architecture (DINOv2/DINOv3 torch.hub keys, OpenAI CLIP, I-JEPA), then resize the
learned position table to the token grid as the family's code does at run time (``registry.POSITIONS_*``).
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from evaluation.dinov2 import hub_position_embedding  # DINO's rule, shared with the FD-DINOv2 evaluator
from reglue.encoders.registry import POSITIONS_ANTIALIAS, POSITIONS_OFFSET, POSITIONS_ROPE, VFMEntry

RELEASE_WRAPPERS = ("target_encoder", "model", "state_dict")  # I-JEPA's EMA encoder; MAE, DeiT-style checkpoints


def read_weights(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, unwrapped from a training checkpoint and DDP's ``module.`` prefix."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(str(path))
    with warnings.catch_warnings():  # torch announces the TorchScript archive and jit's deprecation: both known
        warnings.filterwarnings("ignore", message=".*(TorchScript archive|deprecated).*")
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except RuntimeError as exc:
            if "TorchScript" not in str(exc):
                raise
            raw = torch.jit.load(path, map_location="cpu").state_dict()  # OpenAI CLIP ships a TorchScript archive
    return unwrap_release(raw)


def unwrap_release(raw: dict) -> dict[str, torch.Tensor]:
    """The model's tensors from a release file's dict: I-JEPA's ``target_encoder``, MAE's ``model``, a bare state."""
    for key in RELEASE_WRAPPERS:
        if isinstance(raw.get(key), dict):
            raw = raw[key]
            break
    return {k.removeprefix("module."): v for k, v in raw.items() if isinstance(v, torch.Tensor)}


def _converter(vit: nn.Module):
    """timm's own checkpoint converter for the architecture of ``vit`` (plain imports, no lookup by name)."""
    from timm.models import eva, vision_transformer

    if isinstance(vit, eva.Eva):
        return eva.checkpoint_filter_fn
    if isinstance(vit, vision_transformer.VisionTransformer):
        return vision_transformer.checkpoint_filter_fn
    raise TypeError(f"no weight converter for {type(vit).__name__}")


def resize_positions(entry: VFMEntry, pos_embed: torch.Tensor, grid: int, table_prefix: int) -> torch.Tensor:
    """(1, P + M*M, D) -> (1, P + grid*grid, D) by the family's run-time rule; ``table_prefix`` P rows are kept."""

    m = math.isqrt(pos_embed.shape[1] - table_prefix)
    if m == grid or entry.positions == POSITIONS_ROPE:
        return pos_embed
    if entry.positions == POSITIONS_OFFSET:
        assert table_prefix == 1, "DINO's rule keeps one [CLS] row"
        return hub_position_embedding(pos_embed, grid)
    prefix, table = pos_embed[:, :table_prefix], pos_embed[:, table_prefix:]
    dim = table.shape[-1]
    table = table.float().reshape(1, m, m, dim).permute(0, 3, 1, 2)
    table = F.interpolate(table, size=(grid, grid), mode="bicubic", align_corners=False,
                          antialias=entry.positions == POSITIONS_ANTIALIAS)
    table = table.permute(0, 2, 3, 1).reshape(1, grid * grid, dim).to(pos_embed.dtype)
    return torch.cat([prefix, table], dim=1)


def vit_from_state(entry: VFMEntry, image_size: int, state: dict[str, torch.Tensor]) -> nn.Module:
    """The timm model of ``entry`` at ``image_size`` holding ``state`` (timm's layout or the family's release).

    Built on the default device (``with torch.device("meta")`` checks layouts of the giant models without memory);
    every parameter must be found in the file (strict), the classifier head aside."""
    import timm

    with torch.device("meta"):  # the native structure, only to tell the converter the file's native grid
        native = timm.create_model(entry.timm_id, pretrained=False, num_classes=0)
    with contextlib.redirect_stdout(io.StringIO()):  # timm's DINOv3 converter prints each bias it drops
        state = _converter(native)(dict(state), native)
    head = native.pretrained_cfg.get("classifier") or "head"
    state = {k: v for k, v in state.items() if not k.startswith(f"{head}.")}  # OpenAI CLIP's projection
    if "pos_embed" in state and native.pos_embed is not None:
        table_prefix = 0 if getattr(native, "no_embed_class", False) else native.num_prefix_tokens
        state["pos_embed"] = resize_positions(entry, state["pos_embed"], image_size // entry.patch, table_prefix)
    vit = timm.create_model(entry.timm_id, pretrained=False, num_classes=0, img_size=image_size)
    vit.load_state_dict(state, strict=True)  # copied: a half-precision file gives the model's float32
    return vit


def download_state(entry: VFMEntry) -> dict[str, torch.Tensor]:
    """timm's pretrained weights of ``entry`` (hub cache or download) at the native grid, in timm's layout."""
    import timm

    return timm.create_model(entry.timm_id, pretrained=True, num_classes=0).state_dict()
