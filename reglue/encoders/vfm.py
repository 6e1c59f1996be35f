"""The frozen vision foundation model (any entry of reglue.encoders.registry, or the tiny stand-in) and its features.

From uint8 images it returns what REGLUE trains on (docs/method.md 2): the normed patch maps of chosen
blocks concatenated on channels (local semantics), the normed [CLS] token of one block (global semantics),
and the normed [CLS] + patch tokens of one block (the REPA target); registers are dropped. Every family runs
through timm's ``forward_intermediates`` (DINOv2: VisionTransformer; DINOv3: Eva with rotary embeddings).

Weights come from timm's file or the family's own release (reglue.encoders.weights): the position table is
resized once at load exactly as the family's code resizes it at run time (tests/test_vfm_layouts.py,
tests/test_dinov2_files.py). The tiny stand-in (``tiny-dinov2``) is a seeded random ViT, or with ``weights`` the
file of one trained on the demo's images (reglue.encoders.toy_vfm, scripts/toy_vfm.py); either is not comparable.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import NamedTuple, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from reglue.encoders.loading import ModelLoadError, hub_cache_dir, hub_reachable
from reglue.encoders.registry import DINOV2_B_REG, IMAGENET_MEAN, IMAGENET_STD, TINY_VFM, VFM_REGISTRY, vfm_entry
from reglue.encoders.weights import download_state, read_weights, vit_from_state

__all__ = ["DINOV2_B_REG", "TINY_VFM", "VFMFeatures", "VisionFoundationModel", "block_outputs", "build_tiny_vfm",
           "global_token", "load_vfm"]

VFM_ENV = "REGLUE_VFM"  # a local weights file (the family's own release or timm's) of the VFM a run names
TINY_VFM_SEED = 4321


class VFMFeatures(NamedTuple):
    """What the VFM gives the diffusion model."""

    local: torch.Tensor  # (N, D * len(layers), g, g) normed patch maps of the chosen blocks
    cls: torch.Tensor  # (N, D) [CLS] after the norm (vfm.cls_layer; the last block by default)
    tokens: torch.Tensor  # (N, 1 + g * g, D) [CLS] then patch tokens (vfm.repa_layer): the REPA target


class VisionFoundationModel(nn.Module):
    """A frozen timm ViT with its preprocessing; ``forward(images uint8 (N, 3, H, W), layers)``."""

    def __init__(self, vit: nn.Module, name: str, image_size: int, comparable: bool,
                 mean: tuple = IMAGENET_MEAN, std: tuple = IMAGENET_STD):
        super().__init__()
        self.vit = vit.eval().requires_grad_(False)
        self.name, self.image_size, self.comparable = name, image_size, comparable
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @property
    def embed_dim(self) -> int:
        """Token width D."""
        return self.vit.embed_dim

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H, W) -> /255, ImageNet mean/std, then bicubic resize (no antialias) to image_size."""
        x = (images.float() / 255.0 - self.mean) / self.std
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bicubic", align_corners=False, antialias=False)
        return x

    def train(self, mode: bool = True) -> "VisionFoundationModel":
        return super().train(False)  # always frozen, always in eval mode

    @torch.no_grad()
    def forward(self, images: torch.Tensor, layers: Sequence[int], cls_layer: int = -1,
                repa_layer: int = -1) -> VFMFeatures:
        """Features of uint8 images: the normed patch maps of blocks ``layers``, the normed [CLS] after block
        ``cls_layer`` and the normed [CLS] + patch tokens after block ``repa_layer`` (0-based; -1: the last)."""
        depth = len(self.vit.blocks)
        cls_at, repa_at = cls_layer % depth, repa_layer % depth
        by_block = block_outputs(self.vit, self.preprocess(images), {*layers, cls_at, repa_at})
        maps = torch.cat([by_block[i][0] for i in layers], dim=1)
        cls = global_token(*by_block[cls_at])
        grid, prefix = by_block[repa_at]
        tokens = torch.cat([global_token(grid, prefix)[:, None], grid.flatten(2).transpose(1, 2)], dim=1)
        return VFMFeatures(maps, cls, tokens)  # [CLS] + patches, registers dropped


def block_outputs(vit: nn.Module, x: torch.Tensor, blocks) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """block -> (normed patch maps (N, D, g, g), normed prefix tokens (N, P, D)) of preprocessed images ``x``, for
    the 0-based ``blocks``, through timm's ``forward_intermediates`` with the final norm (P is 0 for a model without
    [CLS] or registers; timm then gives the maps alone)."""
    wanted = sorted(set(blocks))
    outputs = vit.forward_intermediates(x, indices=wanted, norm=True, output_fmt="NCHW", intermediates_only=True,
                                        return_prefix_tokens=True)
    return {i: out if isinstance(out, tuple) else (out, out.new_zeros(out.shape[0], 0, out.shape[1]))
            for i, out in zip(wanted, outputs)}


def global_token(grid: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
    """(N, D): the [CLS] token, or the mean of the patch tokens (N, D, g, g) for a model without one."""
    return prefix[:, 0] if prefix.shape[1] else grid.mean(dim=(2, 3))


TINY_VFM_SIZE = 56  # the stand-in's native input: 4x4 tokens
TINY_VFM_PATCH = 14


def build_tiny_vfm(image_size: int = TINY_VFM_SIZE, state: dict[str, torch.Tensor] | None = None
                   ) -> VisionFoundationModel:
    """A deterministic random ViT with DINOv2's layout (patch 14, 4 registers, no class pos-embed): 4 blocks, D=32;
    at another ``image_size`` the same weights with the position table resampled (as timm does for DINOv2).
    ``state``: that ViT's state dict (reglue.encoders.toy_vfm's file; its position table at any square grid) in
    place of the random weights, loaded strictly at its own grid, then resampled to ``image_size`` the same way."""
    from timm.models.vision_transformer import VisionTransformer

    native = TINY_VFM_SIZE if state is None else _tiny_state_size(state)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_VFM_SEED)
        vit = VisionTransformer(img_size=native, patch_size=TINY_VFM_PATCH, embed_dim=32, depth=4, num_heads=2,
                                reg_tokens=4, no_embed_class=True, num_classes=0, init_values=1e-5)
    if state is not None:
        _check_tiny_state(vit, state)
        vit.load_state_dict(state, strict=True)
    if image_size != native:
        vit.set_input_size(img_size=image_size)
    return VisionFoundationModel(vit, TINY_VFM, image_size, comparable=False)


def _tiny_state_size(state: dict[str, torch.Tensor]) -> int:
    """The input size whose token grid the state's position table holds (no class row: patches only)."""
    table = state.get("pos_embed")
    if table is None or table.dim() != 3:
        raise ValueError("no position table (pos_embed) of shape (1, tokens, width)")
    grid = math.isqrt(table.shape[1])
    if grid * grid != table.shape[1] or not grid:
        raise ValueError(f"pos_embed holds {table.shape[1]} positions, not a square grid")
    return grid * TINY_VFM_PATCH


def _check_tiny_state(vit: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """ValueError (one line, the first offending tensors) unless ``state`` has exactly the keys and shapes of
    ``vit``."""
    want = {k: tuple(v.shape) for k, v in vit.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in state.items()}
    problems = [f"{k} is {list(have[k])}, expected {list(want[k])}" for k in want if k in have and have[k] != want[k]]
    problems += [f"missing {k}" for k in want if k not in have] + [f"unexpected {k}" for k in have if k not in want]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ValueError(f"not a {TINY_VFM} state dict: {', '.join(problems[:3])}{more}")


def _load_tiny(image_size: int, weights: str) -> VisionFoundationModel:
    """The tiny stand-in holding the weights of the file ``weights`` (scripts/toy_vfm.py writes one)."""
    if not Path(weights).is_file():
        raise ModelLoadError(f"VFM weights {weights}: no such file")
    try:
        return build_tiny_vfm(image_size, read_weights(weights))
    except Exception as exc:  # noqa: BLE001 - unreadable, foreign or truncated files: one line, never a traceback
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:200] or type(exc).__name__
        raise ModelLoadError(f"cannot load VFM {TINY_VFM} from {weights}: {reason}; train one with "
                             f"`python scripts/toy_vfm.py IMAGES_DIR FILE`") from None


def _create_timm(name: str, image_size: int, weights: str | None) -> nn.Module:
    """The timm model of ``name`` at ``image_size`` from a local file (either layout) or timm's hub cache."""
    entry = VFM_REGISTRY[name]
    state = read_weights(weights) if weights else download_state(entry)
    return vit_from_state(entry, image_size, state)


def _how_to_fetch(name: str) -> str:
    """Which file to download elsewhere for ``name``, and how to point reglue at it."""
    entry = VFM_REGISTRY[name]
    files = f"timm's {entry.timm_id} (model.safetensors on the Hugging Face hub, timm/{entry.timm_id})"
    if entry.hub_file:
        files = f"the family's release {entry.hub_file}, or {files}"
    licence = f" ({entry.licence})" if entry.licence else ""
    return (f"download the {name} weights{licence} elsewhere: {files}; copy the file here and pass "
            f"--vfm-weights FILE or set {VFM_ENV}=FILE")


def load_vfm(name: str, image_size: int = 224, weights: str | None = None) -> VisionFoundationModel:
    """The VFM called ``name`` (an entry of VFM_REGISTRY); ``weights`` (or $REGLUE_VFM) is a local file. For the
    tiny stand-in only ``weights`` counts (a trained stand-in, reglue.encoders.toy_vfm; without it the random one):
    $REGLUE_VFM names the real VFM's file of a machine, which never fits the stand-in."""
    if name == TINY_VFM:
        return _load_tiny(image_size, weights) if weights else build_tiny_vfm(image_size)
    entry = vfm_entry(name)
    weights = weights or os.environ.get(VFM_ENV)
    if weights and not Path(weights).is_file():
        raise ModelLoadError(f"VFM weights {weights}: no such file")
    if not weights:
        try:
            return VisionFoundationModel(_with_offline(lambda: _create_timm(name, image_size, None)), name,
                                         image_size, True, entry.mean, entry.std)
        except (OSError, RuntimeError, ValueError):
            if not hub_reachable():
                raise ModelLoadError(f"cannot load VFM {name}: not in the cache ({hub_cache_dir()}) and the hub is "
                                     f"unreachable; {_how_to_fetch(name)}") from None
    try:
        return VisionFoundationModel(_create_timm(name, image_size, weights), name, image_size, True, entry.mean,
                                     entry.std)
    except Exception as exc:  # noqa: BLE001 - unreadable, foreign or truncated files: one line, never a traceback
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise ModelLoadError(f"cannot load VFM {name} from {weights}: {reason}; {_how_to_fetch(name)}") from None


def _with_offline(make):
    """Run ``make`` with the hub in offline mode, so a cached model loads without touching the network."""
    saved = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import huggingface_hub.constants as hc

        old, hc.HF_HUB_OFFLINE = hc.HF_HUB_OFFLINE, True
        try:
            return make()
        finally:
            hc.HF_HUB_OFFLINE = old
    finally:
        if saved is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved
