"""The frozen vision foundation model (DINOv2-B/14 with registers, or a tiny stand-in) and its features.

From uint8 images it returns what REGLUE trains on (docs/method.md 2): the normed patch maps of chosen
blocks concatenated on channels (local semantics), the final [CLS] token (global semantics), and the final
[CLS] + patch tokens (the REPA target).

At 224 px timm resizes the 37 x 37 position grid once at load time; for the register models this is exactly
what torch.hub's DINOv2 (which REGLUE uses) does at run time, bicubic to size 16 with antialiasing
(tests/test_dinov2_files.py checks both file layouts).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from reglue.encoders.loading import ModelLoadError, hub_cache_dir, hub_reachable

from reglue.encoders.specs import DINOV2_B_REG, TINY_VFM  # noqa: E402  (names shared with the config checks)
TIMM_NAMES = {DINOV2_B_REG: "vit_base_patch14_reg4_dinov2.lvd142m"}
VFM_ENV = "REGLUE_VFM"  # a local weights file (torch.hub or timm format) for DINOV2_B_REG
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TINY_VFM_SEED = 4321


class VFMFeatures(NamedTuple):
    """What the VFM gives the diffusion model."""

    local: torch.Tensor  # (N, D * len(layers), g, g) normed patch maps of the chosen blocks
    cls: torch.Tensor  # (N, D) [CLS] after the norm (vfm.cls_layer; the last block by default)
    tokens: torch.Tensor  # (N, 1 + g * g, D) [CLS] then patch tokens (vfm.repa_layer): the REPA target


class VisionFoundationModel(nn.Module):
    """A frozen timm ViT with its preprocessing; ``forward(images uint8 (N, 3, H, W), layers)``."""

    def __init__(self, vit: nn.Module, name: str, image_size: int, comparable: bool):
        super().__init__()
        self.vit = vit.eval().requires_grad_(False)
        self.name, self.image_size, self.comparable = name, image_size, comparable
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

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
        vit = self.vit
        depth = len(vit.blocks)
        cls_at, repa_at = cls_layer % depth, repa_layer % depth
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(self.preprocess(images)))))
        prefix, grid = vit.num_prefix_tokens, self.image_size // vit.patch_embed.patch_size[0]
        maps, cls, tokens = [], None, None
        for i, block in enumerate(vit.blocks[: max([*layers, cls_at, repa_at]) + 1]):
            x = block(x)
            if i not in (*layers, cls_at, repa_at):
                continue
            normed = vit.norm(x)  # (N, prefix + g*g, D)
            if i in layers:
                maps.append(normed[:, prefix:].transpose(1, 2).reshape(x.shape[0], -1, grid, grid))
            if i == cls_at:
                cls = normed[:, 0]
            if i == repa_at:
                tokens = torch.cat([normed[:, :1], normed[:, prefix:]], dim=1)  # [CLS] + patches, no registers
        return VFMFeatures(torch.cat(maps, dim=1), cls, tokens)


def build_tiny_vfm() -> VisionFoundationModel:
    """A deterministic random ViT with DINOv2's layout (patch 14, 4 registers, no class pos-embed): 4 blocks, D=32."""
    from timm.models.vision_transformer import VisionTransformer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_VFM_SEED)
        vit = VisionTransformer(img_size=56, patch_size=14, embed_dim=32, depth=4, num_heads=2, reg_tokens=4,
                                no_embed_class=True, num_classes=0, init_values=1e-5)
    return VisionFoundationModel(vit, TINY_VFM, 56, comparable=False)


def _create_timm(name: str, image_size: int, weights: str | None) -> nn.Module:
    import timm

    overlay = {"file": weights} if weights else None
    return timm.create_model(TIMM_NAMES[name], pretrained=True, img_size=image_size, num_classes=0,
                             pretrained_cfg_overlay=overlay)


def load_vfm(name: str, image_size: int = 224, weights: str | None = None) -> VisionFoundationModel:
    """The VFM called ``name`` (see TIMM_NAMES, or 'tiny-dinov2'); ``weights`` (or $REGLUE_VFM) is a local file."""
    if name == TINY_VFM:
        return build_tiny_vfm()
    if name not in TIMM_NAMES:
        raise ModelLoadError(f"unknown VFM {name!r}: choose {', '.join([*TIMM_NAMES, TINY_VFM])}")
    weights = weights or os.environ.get(VFM_ENV)
    if weights and not Path(weights).is_file():
        raise ModelLoadError(f"VFM weights {weights}: no such file")
    fetch = (f"download the {name} weights (torch.hub dinov2_vitb14_reg4_pretrain.pth, or the timm "
             f"{TIMM_NAMES[name]} safetensors) elsewhere, copy the file here and pass --vfm-weights FILE "
             f"or set {VFM_ENV}=FILE")
    if not weights:
        try:
            return VisionFoundationModel(_with_offline(lambda: _create_timm(name, image_size, None)), name,
                                         image_size, comparable=True)
        except (OSError, RuntimeError, ValueError):
            if not hub_reachable():
                raise ModelLoadError(f"cannot load VFM {name}: not in the cache ({hub_cache_dir()}) and the hub is "
                                     f"unreachable; {fetch}") from None
    try:
        return VisionFoundationModel(_create_timm(name, image_size, weights), name, image_size, comparable=True)
    except (OSError, RuntimeError, ValueError) as exc:
        raise ModelLoadError(f"cannot load VFM {name}: {str(exc).splitlines()[0]}; {fetch}") from None


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
