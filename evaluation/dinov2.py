"""FD_DINOv2: the Frechet distance in DINOv2 ViT-L/14 [CLS] features, as EDM2 and dgm-eval report it.

Images are resized to 224 with antialiased bicubic interpolation, scaled to [0, 1], normalised with the
ImageNet mean and std, and passed through DINOv2-L/14 (timm ``vit_large_patch14_dinov2.lvd142m``); the feature
is the final-normed [CLS] token (1024-d). Weights: ``--dinov2-weights FILE`` or $REGLUE_DINOV2_WEIGHTS (the
timm safetensors or torch.hub's ``dinov2_vitl14_pretrain.pth``), else timm's hub download; offline without a
file it fails at once.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

DINOV2_WEIGHTS_ENV = "REGLUE_DINOV2_WEIGHTS"
TIMM_NAME = "vit_large_patch14_dinov2.lvd142m"
INPUT_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DinoV2Error(RuntimeError):
    """The DINOv2 weights cannot be loaded."""


def load_dinov2(weights: str | None = None) -> torch.nn.Module:
    """DINOv2-L/14 at 224 px with no head, in eval mode."""
    import timm

    weights = weights or os.environ.get(DINOV2_WEIGHTS_ENV)
    overlay = {"file": weights} if weights else None
    try:
        model = timm.create_model(TIMM_NAME, pretrained=True, img_size=INPUT_SIZE, num_classes=0,
                                  pretrained_cfg_overlay=overlay)
    except Exception as exc:  # noqa: BLE001 - offline hub errors, missing or foreign files
        raise DinoV2Error(f"cannot load DINOv2-L/14 ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); "
                          f"download {TIMM_NAME} (or torch.hub's dinov2_vitl14_pretrain.pth) elsewhere and pass "
                          f"--dinov2-weights FILE or set {DINOV2_WEIGHTS_ENV}") from None
    return model.eval().requires_grad_(False)


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> normalised float (B, 3, 224, 224): antialiased bicubic, /255, ImageNet mean/std."""
    x = images.float()
    if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bicubic", align_corners=False, antialias=True)
    x = x.clamp(0, 255) / 255
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.inference_mode()
def dinov2_features(images, model: torch.nn.Module, batch_size: int = 32) -> np.ndarray:
    """[CLS] features (N, D) of every image of a reader (the model's pooled, final-normed token)."""
    device = next(model.parameters()).device
    parts = []
    for batch in images.batches(batch_size):
        x = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).to(device)
        parts.append(model(preprocess(x)).float().cpu().numpy())
    return np.concatenate(parts)
