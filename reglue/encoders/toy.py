"""A VAE stand-in that carries information: a small AutoencoderKL trained on a toy dataset in about a minute.

The random ``tiny`` VAE (reglue.encoders.vae) decodes any latent to noise, so no model trained on it can show a
shape. This one is trained to reconstruct the images it is given (the demo's coloured shapes), with the SD-VAE's
layout (8x downsampling, 4 latent channels, posterior mean and std), and saved as a diffusers folder: the file format
of the real VAE, loaded by the same code (``--vae DIR``). Its ``config.json`` marks it as a stand-in
(STAND_IN_KEY), so every dataset encoded with it says it is not comparable to papers, and its ``scaling_factor``
holds 1 / (std of its latents), the role 0.18215 plays for SD-VAE (data.latent_scale).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from reglue.constants import LATENT_CHANNELS
from reglue.encoders.vae import STAND_IN_KEY, images_to_vae_input

KL_WEIGHT = 1e-4  # per latent element: enough to keep the posterior std small and the latents smooth


@dataclass(frozen=True)
class ToyVAESettings:
    """How the stand-in is trained (the defaults reconstruct the demo's 64 px shapes recognisably)."""

    steps: int = 300
    batch: int = 16
    lr: float = 2e-3
    seed: int = 0
    widths: tuple[int, ...] = (8, 16, 32, 32)  # four blocks: three 2x downsamplings, as SD-VAE's 8x


def build_toy_vae(widths: tuple[int, ...] = ToyVAESettings.widths) -> torch.nn.Module:
    """An untrained AutoencoderKL with the SD-VAE layout, small enough to train on a CPU in a minute."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * len(widths),
                         up_block_types=("UpDecoderBlock2D",) * len(widths), block_out_channels=widths,
                         layers_per_block=1, latent_channels=LATENT_CHANNELS, norm_num_groups=8,
                         mid_block_add_attention=False)


def _step_loss(vae: torch.nn.Module, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Reconstruction MSE of a posterior sample plus KL_WEIGHT x the KL per latent element."""
    posterior = vae.encode(batch).latent_dist
    z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
    reconstruction = vae.decode(z).sample
    kl = posterior.kl().mean() / posterior.mean[0].numel()
    return torch.nn.functional.mse_loss(reconstruction, batch) + KL_WEIGHT * kl


def train_toy_vae(images: np.ndarray, settings: ToyVAESettings = ToyVAESettings(), progress=None) -> torch.nn.Module:
    """A stand-in trained on uint8 ``images`` (N, H, W, 3), H and W multiples of 8; deterministic for a seed on one
    machine. ``progress(step, loss)`` is called after each step."""
    x = images_to_vae_input(torch.from_numpy(np.ascontiguousarray(images)))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        vae = build_toy_vae(settings.widths).train()
    optimizer = torch.optim.Adam(vae.parameters(), lr=settings.lr)
    generator = torch.Generator().manual_seed(settings.seed)
    for step in range(settings.steps):
        rows = torch.randint(0, len(x), (settings.batch,), generator=generator)
        loss = _step_loss(vae, x[rows], generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if progress:
            progress(step + 1, loss.item())
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def latent_std(vae: torch.nn.Module, images: np.ndarray, chunk: int = 64) -> float:
    """The standard deviation of the posterior means over ``images`` (what latent_scale divides by)."""
    batches = (torch.from_numpy(np.ascontiguousarray(images[i:i + chunk])) for i in range(0, len(images), chunk))
    means = [vae.encode(images_to_vae_input(batch)).latent_dist.mean for batch in batches]
    return float(torch.cat(means).double().std())


def save_toy_vae(vae: torch.nn.Module, folder: Path, scale: float, note: str) -> Path:
    """Write ``vae`` as a diffusers folder marked as a stand-in, with ``scaling_factor`` = ``scale``; the folder
    appears complete or not at all (written beside it, then renamed)."""
    folder = Path(folder)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    vae.register_to_config(scaling_factor=float(scale))
    vae.save_pretrained(partial, safe_serialization=True)
    config_path = partial / "config.json"
    config = json.loads(config_path.read_text())
    config[STAND_IN_KEY] = note
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
    if folder.exists():
        shutil.rmtree(folder)
    partial.rename(folder)
    return folder
