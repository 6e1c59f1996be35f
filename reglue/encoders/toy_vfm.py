"""A VFM stand-in that carries information: the tiny-dinov2 ViT trained to tell the demo's toy classes apart.

The random ``tiny-dinov2`` (reglue.encoders.vfm.build_tiny_vfm) gives features that are noise, so REGLUE's semantic
channels and [CLS] token carry nothing. This one starts from exactly that architecture and initialisation (LayerScale
aside: LAYER_SCALE) and is trained as a classifier of the images' labels through two linear heads, discarded
afterwards: one on the normed
[CLS] token of the last block (the global token, vfm.cls_layer -1), one on the mean of the normed patch maps of
the blocks the tiny presets read as local semantics (LOCAL_LAYERS, vfm.layers), so both carry class information.
Features are computed as VisionFoundationModel.forward computes them (its own ``preprocess``, timm's
``forward_intermediates`` with the final norm). It is saved as a ``.safetensors`` file of the timm ViT's state dict,
marked as a stand-in in the file's metadata (STAND_IN_METADATA), and loaded by the real path:
``load_vfm("tiny-dinov2", size, weights=FILE)`` (``--vfm-weights FILE``), which keeps it ``comparable=False``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from evaluation.determinism import deterministic_kernels
from reglue.encoders.vfm import (
    TINY_VFM,
    TINY_VFM_SIZE,
    VisionFoundationModel,
    block_outputs,
    build_tiny_vfm,
    global_token,
)
from reglue.fileio import atomic_path

LOCAL_LAYERS = (2, 3)  # the blocks tiny-reglue and compressor-tiny read as local semantics (vfm.layers)
STAND_IN_METADATA = "reglue_stand_in"  # the safetensors metadata key that marks the file as a stand-in
LAYER_SCALE = 1.0  # every block's LayerScale at the start of training (the random stand-in's: 1e-5)
STAND_IN_NOTE = "toy ViT trained on the demo's images (scripts/toy_vfm.py): a stand-in, not DINOv2"


@dataclass(frozen=True)
class ToyVFMSettings:
    """How the stand-in is trained (the defaults separate the demo's 10 classes in well under a minute on a CPU)."""

    steps: int = 1000  # about 20 s on one CPU thread
    batch: int = 32
    lr: float = 5e-3
    weight_decay: float = 0.05
    seed: int = 0
    image_size: int = TINY_VFM_SIZE  # the ViT's input: 56 px, 4x4 tokens
    layers: tuple[int, ...] = LOCAL_LAYERS


def _features(vit: nn.Module, x: torch.Tensor, layers: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(normed [CLS] of the last block (N, D), mean of the normed patch maps of ``layers`` (N, D * len(layers))),
    from preprocessed images, by the code VisionFoundationModel.forward runs (block_outputs, global_token)."""
    last = len(vit.blocks) - 1
    by_block = block_outputs(vit, x, {*layers, last})
    local = torch.cat([by_block[i][0].mean(dim=(2, 3)) for i in layers], dim=1)
    return global_token(*by_block[last]), local


def train_toy_vfm(images: np.ndarray, labels: np.ndarray, settings: ToyVFMSettings = ToyVFMSettings(),
                  progress: Callable[[int, float, float], None] | None = None) -> VisionFoundationModel:
    """The tiny-dinov2 stand-in trained to classify uint8 ``images`` (N, H, W, 3) by integer ``labels`` (N,) in
    0..K-1; deterministic for a seed on one machine (one CPU thread, whatever the machine has). ``progress(step,
    loss, batch accuracy of the [CLS] head)`` is called after each step. Returns the frozen model (eval mode)."""
    labels = np.asarray(labels)
    if len(images) != len(labels) or not len(images):
        raise ValueError(f"{len(images)} images and {len(labels)} labels: expected as many, at least one")
    with deterministic_kernels(torch.device("cpu")):  # one intra-op thread: the same bits on any core count
        vit = _train(images, labels.astype(np.int64), settings, progress)
    return VisionFoundationModel(vit, TINY_VFM, settings.image_size, comparable=False)  # frozen, eval mode


def _train(images: np.ndarray, labels: np.ndarray, settings: ToyVFMSettings, progress) -> nn.Module:
    vfm = build_tiny_vfm(settings.image_size)  # the random stand-in's architecture and initialisation
    vit = vfm.vit.train().requires_grad_(True)
    with torch.no_grad():
        for block in vit.blocks:  # LayerScale from 1, not DINOv2's 1e-5: else the blocks stay near identity in a
            block.ls1.gamma.fill_(LAYER_SCALE)  # short run and the patch maps of blocks 2-3 learn almost nothing
            block.ls2.gamma.fill_(LAYER_SCALE)
        # preprocessed once, as VisionFoundationModel.forward does: ImageNet mean/std, bicubic resize to image_size
        x = vfm.preprocess(torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2))
    y = torch.from_numpy(labels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        heads = nn.ModuleList([nn.Linear(vit.embed_dim, int(y.max()) + 1),
                               nn.Linear(vit.embed_dim * len(settings.layers), int(y.max()) + 1)])
    optimizer = torch.optim.AdamW([*vit.parameters(), *heads.parameters()], lr=settings.lr,
                                  weight_decay=settings.weight_decay)
    generator = torch.Generator().manual_seed(settings.seed)
    for step in range(settings.steps):
        rows = torch.randint(0, len(x), (settings.batch,), generator=generator)
        cls, local = _features(vit, x[rows], settings.layers)
        logits = heads[0](cls)
        loss = F.cross_entropy(logits, y[rows]) + F.cross_entropy(heads[1](local), y[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if progress:
            progress(step + 1, loss.item(), float((logits.argmax(1) == y[rows]).float().mean()))
    return vit


def save_toy_vfm(vfm: VisionFoundationModel, path: str | Path, note: str = STAND_IN_NOTE) -> Path:
    """Write the timm ViT's state dict of ``vfm`` as a ``.safetensors`` file whose metadata marks it as a stand-in
    (STAND_IN_METADATA: ``note``); the file appears complete or not at all (written beside it, then renamed)."""
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in vfm.vit.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={STAND_IN_METADATA: note, "image_size": str(vfm.image_size)})
    return path

