"""From images to the clean joint state: semantic channels, [CLS] token and REPA target (docs/method.md 2-3)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from reglue import checkpoints
from reglue.distributed import main_phase
from reglue.encoders.vfm import VisionFoundationModel, load_vfm
from reglue.errors import UserError
from reglue.fileio import atomic_path, save_torch
from reglue.models.compressor import SemanticCompressor


class Semantics(NamedTuple):
    """The VFM-derived parts of one batch."""

    channels: torch.Tensor | None  # (N, S, h, w) semantic channels on the latent grid, or None
    cls: torch.Tensor  # (N, D) global [CLS]
    repa_target: torch.Tensor  # (N, 1 + P, D) [CLS] + patch tokens


def standardise(local: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Per-channel (x - mean) / std of (N, C, g, g) features."""
    return (local - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


SPATIAL_NORM_EPS = 1e-6  # iREPA's epsilon, added to the standard deviation (ldm/utils.py spatial_zscore)


def spatial_normalise(target: torch.Tensor, gamma: float) -> torch.Tensor:
    """iREPA's spatial normalisation of a REPA target (N, 1 + P, D), [CLS] first: every channel of every image's P
    patch tokens becomes (x - gamma * mean) / (std + eps) over those P tokens (std with P - 1, as torch.std);
    the [CLS] token passes unchanged."""
    patches = target[:, 1:]  # (N, P, D)
    mean = patches.mean(dim=1, keepdim=True)  # (N, 1, D)
    std = patches.std(dim=1, keepdim=True)  # (N, 1, D)
    return torch.cat([target[:, :1], (patches - gamma * mean) / (std + SPATIAL_NORM_EPS)], dim=1)


class SemanticEncoder(nn.Module):
    """Frozen VFM (+ frozen compressor or PCA basis) producing the semantic inputs of one training batch."""

    def __init__(self, vfm: VisionFoundationModel, blocks, latent_size: int,
                 compressor: SemanticCompressor | None = None,
                 mean: torch.Tensor | None = None, std: torch.Tensor | None = None, pca: torch.Tensor | None = None,
                 target_norm: str = "none", target_gamma: float = 0.6):
        """``blocks``: the local-semantics layers (a list), or a dict of VisionFoundationModel.forward's block
        arguments (layers, cls_layer, repa_layer); ``target_norm`` "spatial" normalises the REPA target's patch
        tokens (spatial_normalise with ``target_gamma``), "none" leaves them as the VFM gives them."""
        super().__init__()
        if target_norm not in ("none", "spatial"):
            raise ValueError(f"target_norm {target_norm!r}: expected none or spatial")
        self.target_norm, self.target_gamma = target_norm, target_gamma
        if compressor is not None and (mean is None or std is None):
            raise ValueError("a compressor needs the per-channel norm statistics it was trained with")
        self.blocks = dict(blocks) if isinstance(blocks, dict) else {"layers": list(blocks)}
        self.vfm, self.layers, self.latent_size = vfm, self.blocks["layers"], latent_size
        self.compressor = compressor.eval().requires_grad_(False) if compressor is not None else None
        self.register_buffer("mean", mean.float() if mean is not None else None)
        self.register_buffer("std", std.float() if std is not None else None)
        self.register_buffer("pca", pca.float() if pca is not None else None)  # (C, S) projection basis

    def train(self, mode: bool = True) -> "SemanticEncoder":
        return super().train(False)  # frozen: BatchNorm running statistics, never batch statistics

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> Semantics:
        """uint8 images (N, 3, H, W) -> Semantics."""
        features = self.vfm(images, **self.blocks)
        channels = None
        if self.compressor is not None:
            channels = self.compressor.encode(standardise(features.local.float(), self.mean, self.std))
        elif self.pca is not None:
            channels = project_pca(features.local.float(), self.pca)
        if channels is not None and channels.shape[-1] != self.latent_size:
            channels = F.interpolate(channels, size=self.latent_size, mode="bilinear", align_corners=False)
        target = features.tokens.float()  # (N, 1 + P, D)
        if self.target_norm == "spatial":
            target = spatial_normalise(target, self.target_gamma)
        return Semantics(channels, features.cls.float(), target)


def project_pca(local: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """(N, C, g, g) features onto a (C, S) basis -> (N, S, g, g) (ReDi's linear semantics)."""
    return torch.einsum("ncxy,cs->nsxy", local, basis)


def fit_pca(local: torch.Tensor, components: int) -> torch.Tensor:
    """Principal directions (C, S) of (N, C, g, g) features, every spatial position a sample (centred, unit norm)."""
    flat = local.permute(0, 2, 3, 1).reshape(-1, local.shape[1]).double()
    flat = flat - flat.mean(dim=0)
    _, _, v = torch.linalg.svd(flat, full_matrices=False)
    basis = v[:components].T  # (C, S); an SVD's signs are arbitrary: make each direction's largest entry positive
    signs = torch.sign(basis.gather(0, basis.abs().argmax(dim=0, keepdim=True)))
    return (basis * signs).float()


class RunningMoments:
    """Per-channel mean and std of (N, C, g, g) features, every spatial position one sample (float64 sums)."""

    def __init__(self, channels: int):
        self.count = 0
        self.sum = torch.zeros(channels, dtype=torch.float64)
        self.sum_sq = torch.zeros(channels, dtype=torch.float64)

    def update(self, local: torch.Tensor) -> None:
        """Add a batch of features."""
        flat = local.detach().permute(0, 2, 3, 1).reshape(-1, local.shape[1]).double().cpu()
        self.count += flat.shape[0]
        self.sum += flat.sum(dim=0)
        self.sum_sq += (flat * flat).sum(dim=0)

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) float32; std uses the population formula."""
        mean = self.sum / self.count
        var = (self.sum_sq / self.count - mean * mean).clamp_min(0)
        return mean.float(), var.sqrt().clamp_min(1e-6).float()


class SemanticsError(UserError, ValueError):
    """The frozen encoders do not fit the model (widths, channels) or cannot be found."""


PCA_FIT_IMAGES = 1024  # images whose VFM features fit ReDi's PCA basis (a fixed, seeded sample of the dataset)
PCA_BASIS_FILE = "pca_basis.pt"  # in the run directory: fitted once, read by every process and every resume


def _fit_pca_from_dataset(vfm, layers, dataset, components: int, device, seed: int) -> torch.Tensor:
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:PCA_FIT_IMAGES]
    feats = []
    for start in range(0, len(order), 64):
        images = dataset.read_batch(order[start : start + 64].tolist())[0]
        feats.append(vfm(images.to(device), layers).local.float().cpu())
    return fit_pca(torch.cat(feats), components)


def pca_basis(path: Path, fit: Callable[[], torch.Tensor], is_main: bool) -> torch.Tensor:
    """ReDi's basis from the run's ``path``; the main process fits and writes it first, so all ranks share one."""
    with main_phase("pca"):  # the fit reads thousands of images on rank 0 alone
        if is_main and not path.exists():
            with atomic_path(path) as tmp:
                save_torch({"basis": fit().cpu(), "fit_images": PCA_FIT_IMAGES}, tmp, path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)["basis"]
    except (OSError, RuntimeError, KeyError) as exc:
        raise SemanticsError(f"{path}: unreadable PCA basis ({type(exc).__name__}); delete it to refit") from None


def build_semantic_encoder(config, dataset, vfm_weights: str | None, device, run_dir: Path | None = None,
                           is_main: bool = True) -> SemanticEncoder | None:
    """The frozen VFM (+ compressor or PCA) a run (DiffusionRun) needs, or None for a plain SiT; a PCA basis lives
    in run_dir. Widths were checked against the VFM's known shape when the configuration was built."""

    m, v = config.model, config.vfm
    if not m.uses_vfm:
        return None
    vfm = load_vfm(v.name, v.image_size, vfm_weights).to(device)
    blocks = dict(layers=list(v.layers), cls_layer=v.cls_layer, repa_layer=v.repa_layer)
    p = m.projector  # the REPA target's form: model.projector.target_norm (docs/models.md)
    target = dict(target_norm=p.target_norm, target_gamma=p.target_gamma) if p is not None else {}
    if m.semantic_source == "compressor":
        path = config.compressor.path
        if not path:
            raise SemanticsError("this preset needs a trained compressor: pass --compressor PATH "
                                 "(train one with `reglue train --preset compressor-...`)")
        compressor, stats = checkpoints.load_compressor(path, norm_stats=config.compressor.norm_stats)
        if stats is None:
            raise SemanticsError(f"{path}: no norm statistics; pass them with --set compressor.norm_stats=FILE")
        expected = [vfm.embed_dim * len(v.layers), m.semantic_channels]
        if [compressor.channels[0], compressor.channels[-1]] != expected:
            raise SemanticsError(f"{path}: compressor maps {compressor.channels[0]} -> {compressor.channels[-1]} "
                                 f"channels, the preset needs {expected[0]} -> {expected[1]}")
        return SemanticEncoder(vfm, blocks, m.input_size, compressor.to(device), stats[0].to(device),
                               stats[1].to(device), **target).to(device)
    if m.semantic_source == "pca":
        def fit():
            return _fit_pca_from_dataset(vfm, list(v.layers), dataset, m.semantic_channels, device, config.train.seed)

        basis = pca_basis(Path(run_dir) / PCA_BASIS_FILE, fit, is_main) if run_dir is not None else fit()
        return SemanticEncoder(vfm, blocks, m.input_size, pca=basis.to(device), **target).to(device)
    return SemanticEncoder(vfm, blocks, m.input_size, **target).to(device)
