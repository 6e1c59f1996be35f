"""The registry of vision foundation models: a name maps to a record of how to build it and the shapes it has.

Records, not string-built classes (torch-fidelity's registry of feature extractors is the model): the
configuration checks read patch, width and depth without loading anything, and ``reglue.encoders.vfm.load_vfm``
builds the timm architecture the record names. Every entry takes its family's mean/std on [0, 1] pixels and a
bicubic resize without antialiasing to ``vfm.image_size``; the learned position table is resized to the token grid
once at load by the family's own run-time rule (``positions``; reglue.encoders.weights does it).
A model without a [CLS] token (SigLIP 2, I-JEPA) gives the mean of its normed patch tokens as the global token.
"""

from __future__ import annotations

from typing import NamedTuple

from reglue.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's pixel statistics
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)  # SigLIP: pixels to [-1, 1]
# How a family's own code resizes its learned position table for another token grid (at run time; we do it once)
POSITIONS_ANTIALIAS = "bicubic-antialias"  # torch.hub DINOv2 with registers: bicubic to the grid, antialiased
POSITIONS_OFFSET = "bicubic-offset"  # DINO, torch.hub DINOv2 without registers: scale (grid + 0.1) / M, no antialias
POSITIONS_BICUBIC = "bicubic"  # MAE, I-JEPA, open_clip, transformers' SigLIP: bicubic to the grid, no antialias
POSITIONS_ROPE = "rope"  # DINOv3: rotary embeddings, no table
PIXELS_PER_TOKEN = 16  # one VFM token per 2x2 patch of the 8x-downsampled latents: 256 px -> 16x16 tokens


class VFMEntry(NamedTuple):
    """One vision foundation model."""

    patch: int  # pixels per token side
    width: int  # token width D
    depth: int  # transformer blocks
    prefix_tokens: int = 1  # [CLS] and registers before the patch tokens (0: no [CLS])
    timm_id: str | None = None  # None: built in code (the tiny stand-in)
    hub_file: str | None = None  # the family's own release file, also loadable with --vfm-weights
    licence: str = ""  # where a family restricts use
    mean: tuple[float, float, float] = IMAGENET_MEAN  # per-channel normalisation of [0, 1] pixels
    std: tuple[float, float, float] = IMAGENET_STD
    positions: str = POSITIONS_BICUBIC  # how the family resizes its position table (POSITIONS_*)

    @property
    def has_cls(self) -> bool:
        """Whether the model has a [CLS] token (else the global token is the mean of the patch tokens)."""
        return self.prefix_tokens > 0

    def image_size(self, resolution: int) -> int:
        """The VFM input side whose token grid matches a ``resolution`` px model's patch grid (224 at 256 px)."""
        return resolution // PIXELS_PER_TOKEN * self.patch

    @property
    def last_layers(self) -> tuple[int, ...]:
        """The last four blocks (counted from 0): REGLUE's compressor input."""
        return tuple(range(self.depth - 4, self.depth))


def _dinov2(size: str, width: int, depth: int, registers: bool) -> VFMEntry:
    reg = "_reg4" if registers else ""
    # torch.hub resizes the 37x37 position table at run time: with registers antialiased to the grid; without,
    # with a scale of (grid + 0.1) / 37 and no antialiasing (evaluation/dinov2.py)
    return VFMEntry(patch=14, width=width, depth=depth, prefix_tokens=5 if registers else 1,
                    timm_id=f"vit_{size}_patch14{reg}_dinov2.lvd142m",
                    hub_file=f"dinov2_vit{size[0]}14{'_reg4' if registers else ''}_pretrain.pth",
                    positions=POSITIONS_ANTIALIAS if registers else POSITIONS_OFFSET)


def _dinov3(size: str, width: int, depth: int, release_hash: str) -> VFMEntry:
    return VFMEntry(patch=16, width=width, depth=depth, prefix_tokens=5, timm_id=f"vit_{size}_patch16_dinov3.lvd1689m",
                    hub_file=f"dinov3_vit{size[0]}16_pretrain_lvd1689m-{release_hash}.pth", positions=POSITIONS_ROPE,
                    licence="DINOv3 License (Meta): gated download; read its terms before use")


DINOV2_B_REG = "dinov2-vitb14-reg"
DINOV3_B = "dinov3-vitb16"
TINY_VFM = "tiny-dinov2"

VFM_REGISTRY: dict[str, VFMEntry] = {
    "dinov2-vits14": _dinov2("small", 384, 12, False),
    "dinov2-vits14-reg": _dinov2("small", 384, 12, True),
    "dinov2-vitb14": _dinov2("base", 768, 12, False),
    DINOV2_B_REG: _dinov2("base", 768, 12, True),  # REPA, REG and REGLUE's encoder
    "dinov2-vitl14": _dinov2("large", 1024, 24, False),
    "dinov2-vitl14-reg": _dinov2("large", 1024, 24, True),
    "dinov2-vitg14": _dinov2("giant", 1536, 40, False),
    "dinov2-vitg14-reg": _dinov2("giant", 1536, 40, True),
    "dinov3-vits16": _dinov3("small", 384, 12, "08c60483"),
    DINOV3_B: _dinov3("base", 768, 12, "73cec8be"),  # REGLUE Table 1 row (n)
    "dinov3-vitl16": _dinov3("large", 1024, 24, "8aa4cbdd"),
    "dino-vitb16": VFMEntry(patch=16, width=768, depth=12, timm_id="vit_base_patch16_224.dino",
                            hub_file="dino_vitbase16_pretrain.pth", positions=POSITIONS_OFFSET),  # DINO (v1)
    "mae-vitb16": VFMEntry(patch=16, width=768, depth=12, timm_id="vit_base_patch16_224.mae",
                           hub_file="mae_pretrain_vit_base.pth", licence="MAE weights: CC BY-NC 4.0 (non-commercial)"),
    "mae-vitl16": VFMEntry(patch=16, width=1024, depth=24, timm_id="vit_large_patch16_224.mae",
                           hub_file="mae_pretrain_vit_large.pth", licence="MAE weights: CC BY-NC 4.0 (non-commercial)"),
    "clip-vitb16": VFMEntry(patch=16, width=768, depth=12, timm_id="vit_base_patch16_clip_224.openai",
                            hub_file="ViT-B-16.pt", mean=CLIP_MEAN, std=CLIP_STD),
    "clip-vitl14": VFMEntry(patch=14, width=1024, depth=24, timm_id="vit_large_patch14_clip_224.openai",
                            hub_file="ViT-L-14.pt", mean=CLIP_MEAN, std=CLIP_STD),
    "siglip2-vitb16": VFMEntry(patch=16, width=768, depth=12, prefix_tokens=0,
                               timm_id="vit_base_patch16_siglip_224.v2_webli", mean=HALF, std=HALF),
    "ijepa-vith14": VFMEntry(patch=14, width=1280, depth=32, prefix_tokens=0,
                             timm_id="vit_huge_patch14_gap_224.in1k_ijepa", hub_file="IN1K-vit.h.14-300e.pth.tar",
                             licence="I-JEPA weights: CC BY-NC 4.0 (non-commercial)"),
    TINY_VFM: VFMEntry(patch=14, width=32, depth=4, prefix_tokens=5),  # random-weight stand-in: tests, demo
}


def vfm_entry(name: str) -> VFMEntry:
    """The record of ``name``; ConfigError listing the registry otherwise."""
    if name not in VFM_REGISTRY:
        raise ConfigError(f"vfm.name {name!r}: unknown VFM; choose one of {', '.join(VFM_REGISTRY)}")
    return VFM_REGISTRY[name]
