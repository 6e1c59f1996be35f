"""The registry of vision foundation models: a name maps to a record of how to build it and the shapes it has.

Records, not string-built classes (torch-fidelity's registry of feature extractors is the model): the
configuration checks read patch, width and depth without loading anything, and ``reglue.encoders.vfm.load_vfm``
builds the timm architecture the record names. Every entry takes its family's mean/std on [0, 1] pixels and a
bicubic resize without antialiasing to ``vfm.image_size``; timm resizes the position embeddings (DINOv2:
bicubic, once at load, as torch.hub's DINOv2 does at run time; DINOv3: rotary embeddings, no table to resize).
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
PIXELS_PER_TOKEN = 16  # one VFM token per 2x2 patch of the 8x-downsampled latents: 256 px -> 16x16 tokens


class VFMEntry(NamedTuple):
    """One vision foundation model."""

    patch: int  # pixels per token side
    width: int  # token width D
    depth: int  # transformer blocks
    prefix_tokens: int = 1  # [CLS] and registers before the patch tokens (0: no [CLS])
    timm_id: str | None = None  # None: built in code (the tiny stand-in)
    hub_file: str | None = None  # the family's own release file (torch.hub), also loadable with --vfm-weights
    licence: str = ""  # where a family restricts use
    mean: tuple[float, float, float] = IMAGENET_MEAN  # per-channel normalisation of [0, 1] pixels
    std: tuple[float, float, float] = IMAGENET_STD
    hub_positions: bool = False  # resize the position table as torch.hub's DINOv2 (no registers) does at run time

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
    # torch.hub resizes the 37x37 position table at run time: for the register models exactly as timm does at
    # load time; without registers with a scale of (grid + 0.1) / 37 and no antialiasing (evaluation/dinov2.py)
    return VFMEntry(patch=14, width=width, depth=depth, prefix_tokens=5 if registers else 1,
                    timm_id=f"vit_{size}_patch14{reg}_dinov2.lvd142m",
                    hub_file=f"dinov2_vit{size[0]}14{'_reg4' if registers else ''}_pretrain.pth",
                    hub_positions=not registers)


def _dinov3(size: str, width: int, depth: int) -> VFMEntry:
    return VFMEntry(patch=16, width=width, depth=depth, prefix_tokens=5, timm_id=f"vit_{size}_patch16_dinov3.lvd1689m",
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
    "dinov3-vits16": _dinov3("small", 384, 12),
    DINOV3_B: _dinov3("base", 768, 12),  # REGLUE Table 1 row (n)
    "dinov3-vitl16": _dinov3("large", 1024, 24),
    "mae-vitb16": VFMEntry(patch=16, width=768, depth=12, timm_id="vit_base_patch16_224.mae"),
    "mae-vitl16": VFMEntry(patch=16, width=1024, depth=24, timm_id="vit_large_patch16_224.mae"),
    "clip-vitb16": VFMEntry(patch=16, width=768, depth=12, timm_id="vit_base_patch16_clip_224.openai",
                            mean=CLIP_MEAN, std=CLIP_STD),
    "clip-vitl14": VFMEntry(patch=14, width=1024, depth=24, timm_id="vit_large_patch14_clip_224.openai",
                            mean=CLIP_MEAN, std=CLIP_STD),
    "siglip2-vitb16": VFMEntry(patch=16, width=768, depth=12, prefix_tokens=0,
                               timm_id="vit_base_patch16_siglip_224.v2_webli", mean=HALF, std=HALF),
    "ijepa-vith14": VFMEntry(patch=14, width=1280, depth=32, prefix_tokens=0,
                             timm_id="vit_huge_patch14_gap_224.in1k_ijepa",
                             licence="I-JEPA weights: CC BY-NC 4.0 (non-commercial)"),
    TINY_VFM: VFMEntry(patch=14, width=32, depth=4, prefix_tokens=5),  # random-weight stand-in: tests, demo
}


def vfm_entry(name: str) -> VFMEntry:
    """The record of ``name``; ConfigError listing the registry otherwise."""
    if name not in VFM_REGISTRY:
        raise ConfigError(f"vfm.name {name!r}: unknown VFM; choose one of {', '.join(VFM_REGISTRY)}")
    return VFM_REGISTRY[name]
