"""The joint training objective: latent MSE + lam * semantic MSE + w_cls * CLS MSE + w_repa * REPA.

Each MSE is a mean over the non-batch dimensions, then over the batch. REPA is the negative cosine
similarity between projected hidden states and frozen VFM tokens, per token, averaged over tokens and batch,
always computed in float32.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from reglue.config.sections import LossWeights
from reglue.constants import LATENT_CHANNELS
from reglue.transport.path import Path, get_path
from reglue.transport.timesteps import sample_time


class LossTerms(NamedTuple):
    """Batch-mean loss terms; ``total`` is the weighted sum that is back-propagated."""

    total: torch.Tensor
    latent: torch.Tensor
    semantic: torch.Tensor
    cls: torch.Tensor
    repa: torch.Tensor


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the first: (N, ...) -> (N,)."""
    return x.mean(dim=tuple(range(1, x.dim())))


def select_aligned_tokens(
    projections: torch.Tensor, target: torch.Tensor, has_cls_token: bool, align_patch: bool, align_cls: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick the tokens REPA aligns. ``target`` is (N, 1 + P, D) with the VFM [CLS] first, then P patch tokens."""
    if not has_cls_token:
        if align_cls:
            raise ValueError("align_cls needs a model with a [CLS] token")
        return projections, target[:, 1:]  # (N, P, D) each
    if align_patch and align_cls:
        return projections, target
    if align_patch:
        return projections[:, 1:], target[:, 1:]
    return projections[:, :1], target[:, :1]


def repa_loss(projections: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample negative cosine similarity averaged over tokens, in float32 even under autocast: (N,)."""
    with torch.autocast(device_type=projections.device.type, enabled=False):
        p = F.normalize(projections.float(), dim=-1)
        z = F.normalize(target.float(), dim=-1)
        return -(p * z).sum(dim=-1).mean(dim=1)


class JointLoss:
    """Draws t and noise, runs the model on the noisy joint state and returns the weighted loss terms."""

    def __init__(
        self,
        weights: LossWeights,
        path: Path | str = "linear",
        time_sampler: str = "uniform",
        latent_channels: int = LATENT_CHANNELS,
        align_patch: bool = True,
        align_cls: bool = True,
        projector: bool = False,
    ):
        """``projector``: the model has a REPA projector, kept in the graph (with a zero term) at steps whose REPA
        weight is 0, so that data-parallel training sees the same parameters used at every step."""
        self.weights = weights
        self.path = get_path(path) if isinstance(path, str) else path
        self.time_sampler = time_sampler
        self.latent_channels = latent_channels
        self.align_patch = align_patch
        self.align_cls = align_cls
        self.projector = projector

    def __call__(
        self,
        model: torch.nn.Module,
        x0: torch.Tensor,
        y: torch.Tensor,
        cls0: torch.Tensor | None = None,
        repa_target: torch.Tensor | None = None,
        step: int = 0,
        t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        cls_noise: torch.Tensor | None = None,
        drop_mask: torch.Tensor | None = None,
    ) -> LossTerms:
        """x0 (N, C, H, W) clean latents+semantics, y (N,), cls0 (N, cls_dim), repa_target (N, 1 + P, D) or None
        (no alignment: at a step whose REPA weight is 0 the target is not needed)."""
        n = x0.shape[0]
        t = sample_time(n, self.time_sampler, self.path.name, device=x0.device) if t is None else t
        noise = torch.randn_like(x0) if noise is None else noise
        xt = self.path.interpolate(x0, noise, t)
        cls_t = None
        if cls0 is not None:
            cls_noise = torch.randn_like(cls0) if cls_noise is None else cls_noise
            cls_t = self.path.interpolate(cls0, cls_noise, t)  # the same t as the spatial state
        aligning = repa_target is not None and self.weights.repa_at(step) != 0
        out = model(xt, t, y, cls=cls_t, return_projections=aligning or self.projector, drop_mask=drop_mask)
        repa_target = repa_target if aligning else None
        return self.combine(out, x0, noise, t, cls0, cls_noise, repa_target, step)

    def combine(self, out, x0, noise, t, cls0, cls_noise, repa_target, step) -> LossTerms:
        """Weighted sum of the per-stream losses from one model output."""
        zero = x0.new_zeros(())
        target = self.path.velocity(x0, noise, t)
        err = (out.velocity.float() - target.float()) ** 2  # (N, C, H, W)
        c = self.latent_channels
        latent = mean_flat(err[:, :c]).mean()
        semantic = mean_flat(err[:, c:]).mean() if x0.shape[1] > c else zero
        cls = zero
        if cls0 is not None:
            cls_target = self.path.velocity(cls0, cls_noise, t)
            cls = mean_flat((out.cls_velocity.float() - cls_target.float()) ** 2).mean()
        repa = zero
        w = self.weights
        total = w.latent * latent + w.semantic_at(step) * semantic + w.cls * cls
        if repa_target is not None and out.projections is not None:
            has_cls = cls0 is not None
            proj, tgt = select_aligned_tokens(out.projections, repa_target, has_cls, self.align_patch, self.align_cls)
            repa = repa_loss(proj, tgt).mean()
            total = total + w.repa_at(step) * repa
        elif out.projections is not None:  # alignment off this step: the projector stays in the graph, its term 0
            total = total + 0.0 * out.projections.float().sum()
        return LossTerms(total, latent, semantic, cls, repa)
