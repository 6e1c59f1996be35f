"""FD_DINOv2: the Frechet distance in DINOv2 ViT-L/14 [CLS] features, as EDM2 and dgm-eval report it.

Images are resized to 224 with antialiased bicubic interpolation, scaled to [0, 1], normalised with the
ImageNet mean and std, and passed through DINOv2-L/14 (timm ``vit_large_patch14_dinov2.lvd142m``); the feature
is the final-normed [CLS] token (1024-d). The position grid (37 x 37, trained at 518 px) is resized to 16 x 16 as
torch.hub's ``dinov2_vitl14`` does at run time (bicubic, scale (16 + 0.1) / 37, no antialiasing), not as timm
resizes it at load time (antialiased, to size 16): the features match the hub model that EDM2 and dgm-eval use.
Weights: ``--dinov2-weights FILE`` or $REGLUE_DINOV2_WEIGHTS (the
timm safetensors or torch.hub's ``dinov2_vitl14_pretrain.pth``), else timm's hub download; offline without a
file it fails at once.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
import torch.nn.functional as F

from evaluation.errors import InputError

DINOV2_WEIGHTS_ENV = "REGLUE_DINOV2_WEIGHTS"
TIMM_NAME = "vit_large_patch14_dinov2.lvd142m"
INPUT_SIZE = 224
HUB_POSITION_OFFSET = 0.1  # torch.hub DINOv2 (no registers) interpolate_pos_encoding: scale (grid + 0.1) / M,
HUB_POSITION_ANTIALIAS = False  # bicubic without antialiasing
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DinoV2Error(InputError, RuntimeError):
    """The DINOv2 weights cannot be loaded."""


def load_dinov2(weights: str | None = None, name: str = TIMM_NAME) -> torch.nn.Module:
    """DINOv2-L/14 (or another timm DINOv2 without registers) at 224 px with no head, in eval mode."""
    import timm

    weights = weights or os.environ.get(DINOV2_WEIGHTS_ENV)
    overlay = {"file": weights} if weights else None
    try:  # at the native 518 px first, so that the file's position grid arrives unresized
        model = timm.create_model(name, pretrained=True, num_classes=0, pretrained_cfg_overlay=overlay)
    except Exception as exc:  # noqa: BLE001 - offline hub errors, missing or foreign files
        raise DinoV2Error(f"cannot load DINOv2-L/14 ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); "
                          f"download {TIMM_NAME} (or torch.hub's dinov2_vitl14_pretrain.pth) elsewhere and pass "
                          f"--dinov2-weights FILE or set {DINOV2_WEIGHTS_ENV}") from None
    state = model.state_dict()
    state["pos_embed"] = hub_position_embedding(state["pos_embed"], INPUT_SIZE // model.patch_embed.patch_size[0])
    with torch.device("meta"):  # the 224 px structure only: its weights are the ones just loaded
        at_224 = timm.create_model(name, pretrained=False, img_size=INPUT_SIZE, num_classes=0)
    at_224.load_state_dict(state, assign=True)
    return at_224.eval().requires_grad_(False)


def hub_position_embedding(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """(1, 1 + M*M, D) -> (1, 1 + grid*grid, D), resized as torch.hub's DINOv2 does for a grid x grid input."""
    cls, patches = pos_embed[:, :1], pos_embed[:, 1:].float()
    m, dim = math.isqrt(patches.shape[1]), patches.shape[2]
    scale = (grid + HUB_POSITION_OFFSET) / m
    resized = F.interpolate(patches.reshape(1, m, m, dim).permute(0, 3, 1, 2), scale_factor=(scale, scale),
                            mode="bicubic", antialias=HUB_POSITION_ANTIALIAS)
    return torch.cat([cls, resized.permute(0, 2, 3, 1).reshape(1, grid * grid, dim).to(pos_embed.dtype)], dim=1)


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
def dinov2_batch(batch: np.ndarray, model: torch.nn.Module) -> np.ndarray:
    """[CLS] features (b, D) of uint8 images (b, H, W, 3) (the model's pooled, final-normed token)."""
    x = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).to(next(model.parameters()).device)
    return model(preprocess(x)).float().cpu().numpy()


def dinov2_features(images, model: torch.nn.Module, batch_size: int = 32) -> np.ndarray:
    """[CLS] features (N, D) of every image of a reader."""
    return np.concatenate([dinov2_batch(batch, model) for batch in images.batches(batch_size)])
