"""The probe's two sides for one batch: every block's hidden states of the model on noised inputs, and the VFM's
[CLS] and patch tokens of the same images."""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def block_states(model: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                 cls_t: torch.Tensor | None) -> list[torch.Tensor]:
    """The tokens after each transformer block, (N, T, D) each, in order ([CLS] first when the model has one)."""
    states: list[torch.Tensor] = []
    hooks = [block.register_forward_hook(lambda module, inputs, output: states.append(output.detach()))
             for block in model.blocks]
    try:
        model(x_t, t, y, cls=cls_t, return_projections=False)
    finally:
        for hook in hooks:
            hook.remove()
    return states


def split_tokens(state: torch.Tensor, has_cls: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean-pooled patch tokens (N, D), patch tokens (N, P, D)) of one block's state."""
    patches = state[:, 1:] if has_cls else state
    return patches.float().mean(dim=1), patches.float()


@torch.no_grad()
def vfm_tokens(vfm, images: torch.Tensor, block: int, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The VFM's normed [CLS] (N, D) and patch tokens (N, grid * grid, D) after ``block`` (-1: the last), its patch
    grid resampled bilinearly to the model's ``grid`` when they differ."""
    last = len(vfm.vit.blocks) - 1
    tokens = vfm(images, layers=[last], cls_layer=block, repa_layer=block).tokens.float()  # (N, 1 + g*g, D)
    cls, patches = tokens[:, 0], tokens[:, 1:]
    side = round(patches.shape[1] ** 0.5)
    if side != grid:
        maps = patches.transpose(1, 2).reshape(patches.shape[0], -1, side, side)
        maps = F.interpolate(maps, size=grid, mode="bilinear", align_corners=False)
        patches = maps.flatten(2).transpose(1, 2)
    return cls, patches
