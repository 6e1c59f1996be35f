"""The shapes of the known vision foundation models, known without loading them (configuration checks use them)."""

from __future__ import annotations

from typing import NamedTuple


class VFMSpec(NamedTuple):
    """Patch side, token width and number of blocks of a ViT."""

    patch: int
    width: int
    depth: int


DINOV2_B_REG = "dinov2-vitb14-reg"
TINY_VFM = "tiny-dinov2"
DINOV3_B = "dinov3-vitb16"

VFM_SPECS = {
    DINOV2_B_REG: VFMSpec(patch=14, width=768, depth=12),  # DINOv2 ViT-B/14 with 4 registers
    DINOV3_B: VFMSpec(patch=16, width=768, depth=12),  # DINOv3 ViT-B/16 (Table 1 (n); no loader yet)
    TINY_VFM: VFMSpec(patch=14, width=32, depth=4),  # the random-weight stand-in of tests and the demo
}
