"""`reglue sample` as a library call: checkpoint -> guided SDE/ODE -> VAE decoder -> samples.h5 + samples.npz."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from reglue.checkpoints import load_model
from reglue.constants import SAMPLE_QUANTISATION, VAE_DOWNSAMPLE
from reglue.distributed import DistInfo, barrier
from reglue.encoders.vae import decode_latents, load_vae
from reglue.sampling.seeds import SampleNoise, make_labels, sample_seed
from reglue.sampling.store import SAMPLES_H5, check_out_dir, done_indices, merge, open_part
from reglue.transport.samplers import Guidance, guided_velocity, sample_ode, sample_sde, time_grid


@dataclass(frozen=True)
class SampleSettings:
    """Everything that decides which images come out (not how fast)."""

    n: int
    sampler: str = "sde"
    steps: int = 250
    guidance: Guidance = field(default_factory=Guidance)
    seed: int = 0
    balanced: bool = False
    classes: tuple[int, ...] | None = None
    weights: str = "ema"
    vae: str | None = None  # default: the config's data.vae_decoder (sd-vae-ft-ema)
    eval_chunk: int = 16  # rows per model call (padded): keeps every sample independent of the batch size

    def describe(self) -> dict:
        """Plain-data form for attributes and the run id."""
        data = asdict(self)
        data["guidance"] = {**asdict(self.guidance), "cls_scale": self.guidance.effective_cls_scale}
        return data


@dataclass
class SampleSummary:
    """What a run did."""

    out: Path
    n: int
    written: int = 0
    seconds: float = 0.0
    reused: bool = False


def file_sha256(path, block: int = 1 << 22) -> str:
    """sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def integrate(model, settings: SampleSettings, seeds: list[int], labels: torch.Tensor, device) -> torch.Tensor:
    """Final joint state x (B, C, H, W) float64 for one batch of samples."""
    cfg = model.config
    noise = SampleNoise(seeds, (cfg.in_channels, cfg.input_size, cfg.input_size),
                        cfg.cls_dim if cfg.cls_token else None, device)
    x, cls = noise.initial()
    velocity = guided_velocity(model, settings.guidance, settings.eval_chunk)
    grid = time_grid(settings.steps)
    if settings.sampler == "sde":
        x, _ = sample_sde(velocity, x, cls, labels.to(device), grid, noise.step)
    else:
        x, _ = sample_ode(velocity, x, cls, labels.to(device), grid, heun=settings.sampler == "ode-heun")
    return x


def sample_to_dir(ckpt, out, settings: SampleSettings, batch_size: int = 32, dist: DistInfo = DistInfo(),
                  overwrite: bool = False, progress: bool = True,
                  log: Callable[[str], None] = tqdm.write) -> SampleSummary:
    """Write ``settings.n`` samples of ``ckpt`` to ``out``; run again to resume, any process count gives the same."""
    out, started = Path(out), time.time()
    model, config = load_model(ckpt, ema=settings.weights == "ema")
    model = model.to(dist.device).eval()
    cfg = model.config
    vae_id = settings.vae or config["data"]["vae_decoder"]
    attrs = {"checkpoint": str(ckpt), "checkpoint_sha256": file_sha256(ckpt), "preset": config.get("preset", ""),
             "step": int(config.get("origin", {}).get("step", 0)), "decoder": vae_id,
             "quantisation": SAMPLE_QUANTISATION, "settings": json.dumps(settings.describe())}
    run_id = hashlib.sha256(json.dumps([attrs["checkpoint_sha256"], vae_id, settings.describe()]).encode()).hexdigest()
    if check_out_dir(out, run_id, overwrite):
        return SampleSummary(out, settings.n, settings.n, time.time() - started, reused=True)
    out.mkdir(parents=True, exist_ok=True)
    for c in settings.classes or ():
        if not 0 <= c < cfg.num_classes:
            raise ValueError(f"class {c} out of range 0..{cfg.num_classes - 1}")
    labels = make_labels(settings.n, cfg.num_classes, settings.seed, settings.balanced, list(settings.classes or []))
    done = done_indices(out, run_id)
    barrier()
    todo = [i for i in range(dist.rank, settings.n, dist.world) if i not in done]
    if done and dist.is_main:
        log(f"resuming: {len(done)} of {settings.n} samples already written")
    vae = load_vae(vae_id)[0].to(dist.device)
    resolution = cfg.input_size * VAE_DOWNSAMPLE
    part = open_part(out, dist.rank, dist.world, run_id, resolution)
    bar = tqdm(total=settings.n, initial=len(done), unit="img", desc="sample", dynamic_ncols=True,
               disable=not (progress and dist.is_main))
    try:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            seeds = [sample_seed(settings.seed, i) for i in batch]
            x = integrate(model, settings, seeds, labels[batch], dist.device)
            images = decode_latents(vae, x[:, : cfg.latent_channels].float()).numpy()
            part.append({"index": np.array(batch), "images": images, "labels": labels[batch].numpy(),
                         "seeds": np.array(seeds)})
            bar.update(len(batch) * dist.world)
    finally:
        part.close()
        bar.close()
    barrier()
    if dist.is_main:
        merge(out, settings.n, resolution, run_id, attrs)
    barrier()
    return SampleSummary(out, settings.n, len(todo), time.time() - started)


def write_grid(out: Path, png: Path, count: int = 64, columns: int = 8) -> Path:
    """A PNG of the first ``count`` samples of ``out/samples.h5``."""
    import h5py
    from PIL import Image

    from reglue.fileio import atomic_path
    from reglue.training.grid import tile

    with h5py.File(out / SAMPLES_H5, "r") as f:
        images = f["images"][: min(count, f["images"].shape[0])]
    with atomic_path(png) as tmp:
        Image.fromarray(tile(images, columns)).save(tmp, format="PNG")
    return png
