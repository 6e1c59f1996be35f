"""`reglue probe` as a library call (docs/probe.md): a fixed, seeded subset of the encoded data, noised at each
level t with seeded noise (the same for every block, checkpoint and run), every block's hidden states against
the VFM's features of the same images:

- ``cknna``, ``cka``: the block's mean-pooled patch tokens against the VFM's [CLS] (evaluation.alignment;
  CKNNA as REPA measures alignment, topk 10);
- ``spatial_cka``: CKA of the block's patch tokens against the VFM's patch tokens within each image (the token
  grids matched), averaged over the images: the spatial structure iREPA finds predictive;
- ``knn_accuracy``: k-NN classification of the mean-pooled tokens against the labels (leave-one-out).

Every value is indexed [layer][t]; the record also holds the VFM's own [CLS] k-NN accuracy for reference. The model
runs in strict fp32 (TF32 off whatever the process set) on the posterior means of the latents.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from evaluation.alignment import cka, cknna, knn_accuracy
from evaluation.determinism import float32_matmuls
from evaluation.environment import environment
from reglue.checkpoints import load_model
from reglue.data.dataset import EncodedDataset
from reglue.encoders.vae import sample_latents
from reglue.encoders.vfm import load_vfm
from reglue.errors import UserError
from reglue.fileio import atomic_path, atomic_write_text
from reglue.probe.states import block_states, split_tokens, vfm_tokens
from reglue.training.semantics import build_semantic_encoder
from reglue.transport.path import get_path

FORMAT = "reglue-probe"
VERSION = 1
METRICS = ("cknna", "cka", "spatial_cka", "knn_accuracy")  # the record's metrics, each [layer][t]
DEFAULT_T = (0.25, 0.5, 0.75)  # noise levels (t = 1 is noise)


class ProbeError(UserError, ValueError):
    """A probe that cannot be made (blocks the model lacks, too few images, a metric undefined on these features)."""


@dataclasses.dataclass(frozen=True)
class ProbeSettings:
    """What decides a probe's numbers."""

    n: int = 1024  # images of the seeded subset
    t: tuple[float, ...] = DEFAULT_T
    layers: tuple[int, ...] | None = None  # blocks counted from 1; None: every block
    seed: int = 0  # the subset and the noise
    topk: int = 10  # CKNNA's mutual neighbours (REPA's value)
    knn_k: int = 20  # k-NN classification's neighbours
    batch_size: int = 64  # images per model call: never changes a number (each image is probed on its own)


def subset_indices(rows: int, n: int, seed: int) -> list[int]:
    """The first ``n`` rows of a seeded permutation of ``rows``, ascending (the same subset for every checkpoint)."""
    order = torch.randperm(rows, generator=torch.Generator().manual_seed(seed))
    return sorted(order[: min(n, rows)].tolist())


def _noise(settings: ProbeSettings, n: int, shape: tuple, cls_dim: int | None) -> list[tuple]:
    """Per noise level: (noise (n, *shape), [CLS] noise (n, cls_dim) or None), from the probe's seed."""
    gen = torch.Generator().manual_seed(settings.seed + 1)
    return [(torch.randn((n, *shape), generator=gen),
             torch.randn((n, cls_dim), generator=gen) if cls_dim else None) for _ in settings.t]


def _clean_state(model, config, semantics, images, moments) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x0 (latent posterior means, then the semantic channels) and cls0 of a batch, as training builds them."""
    cfg = model.config
    z = sample_latents(moments, config.data.latent_scale, eps=torch.zeros_like(moments[:, : moments.shape[1] // 2]))
    if semantics is None or not (cfg.semantic_channels or cfg.cls_token):
        return z, None
    sem = semantics(images)
    x0 = torch.cat([z, sem.channels.float()], dim=1) if cfg.semantic_channels else z
    return x0, (sem.cls.float() if cfg.cls_token else None)


def _spatial_cka(patches: torch.Tensor, v_patches: torch.Tensor, layer: int, t: float) -> list[float]:
    """CKA of each image's patch tokens (B, P, D) against the VFM's (B, P, D'), image by image."""
    try:
        return [cka(mine, theirs) for mine, theirs in zip(patches, v_patches)]
    except ValueError as exc:
        raise ProbeError(f"block {layer}, t {t:g}, spatial CKA: {exc}") from None


@torch.no_grad()
def probe(model, config, dataset, semantics, vfm, settings: ProbeSettings, device, progress: bool = False) -> dict:
    """The probe of ``model`` (eval mode) on ``dataset`` against ``vfm`` (``semantics``: the run's semantic encoder
    when the model reads VFM inputs); the record's metrics part."""
    cfg, path = model.config, get_path(config.transport.path)
    layers = list(settings.layers or range(1, cfg.depth + 1))
    if not all(1 <= layer <= cfg.depth for layer in layers):
        raise ProbeError(f"layers {layers}: the model has blocks 1..{cfg.depth}")
    indices = subset_indices(len(dataset), settings.n, settings.seed)
    n, grid = len(indices), cfg.input_size // cfg.patch_size
    if n < 3:
        raise ProbeError(f"{n} images: the probe needs at least 3")
    # a dataset smaller than settings.n: the neighbour counts shrink with it (the record says which were used)
    settings = dataclasses.replace(settings, topk=min(settings.topk, n - 2), knn_k=min(settings.knn_k, n - 2))
    shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
    noise = _noise(settings, n, shape, cfg.cls_dim if cfg.cls_token else None)
    pooled = {(layer, k): [] for layer in layers for k in range(len(settings.t))}
    spatial = {key: [] for key in pooled}
    vfm_cls, labels = [], []
    bar = tqdm(total=n, unit="img", desc="probe", disable=not progress, dynamic_ncols=True)
    with float32_matmuls(False):
        for start in range(0, n, settings.batch_size):
            rows = indices[start : start + settings.batch_size]
            images, moments, batch_labels = dataset.read_batch(rows)
            images, moments, y = images.to(device), moments.to(device), batch_labels.to(device)
            x0, cls0 = _clean_state(model, config, semantics, images, moments)
            v_cls, v_patches = vfm_tokens(vfm, images, config.vfm.repa_layer, grid)
            vfm_cls.append(v_cls.cpu())
            labels.append(batch_labels)
            for k, t_value in enumerate(settings.t):
                t = torch.full((len(rows),), float(t_value), device=device)
                eps, cls_eps = noise[k]
                x_t = path.interpolate(x0, eps[start : start + len(rows)].to(device), t)
                cls_t = None if cls0 is None else path.interpolate(cls0, cls_eps[start : start + len(rows)].to(device),
                                                                   t)
                states = block_states(model, x_t, t, y, cls_t)
                for layer in layers:
                    mean, patches = split_tokens(states[layer - 1], cfg.cls_token)
                    pooled[(layer, k)].append(mean.cpu())
                    spatial[(layer, k)] += _spatial_cka(patches, v_patches, layer, t_value)
            bar.update(len(rows))
    bar.close()
    vfm_cls_all, labels_all = torch.cat(vfm_cls), torch.cat(labels).numpy()
    metrics = {name: [[0.0] * len(settings.t) for _ in layers] for name in METRICS}
    for i, layer in enumerate(layers):
        for k, t_value in enumerate(settings.t):
            features = torch.cat(pooled[(layer, k)])
            try:
                metrics["cknna"][i][k] = cknna(features, vfm_cls_all, topk=settings.topk)
                metrics["cka"][i][k] = cka(features, vfm_cls_all)
                metrics["knn_accuracy"][i][k] = knn_accuracy(features, labels_all, k=settings.knn_k)
            except ValueError as exc:
                raise ProbeError(f"block {layer}, t {t_value:g}: {exc}") from None
            metrics["spatial_cka"][i][k] = float(np.mean(spatial[(layer, k)]))
    return {"n": n, "seed": settings.seed, "t": list(settings.t), "layers": layers, "topk": settings.topk,
            "knn_k": settings.knn_k, "metrics": metrics,
            "vfm": {"name": config.vfm.name, "image_size": config.vfm.image_size, "block": config.vfm.repa_layer},
            "vfm_knn_accuracy": knn_accuracy(vfm_cls_all, labels_all, k=settings.knn_k),
            "environment": environment(device)}


def record(metrics: dict, checkpoint: str, step: int, config, weights: str, data: dict) -> dict:
    """The probe's JSON record: format, what was probed, the data, then the metrics part."""
    return {"format": FORMAT, "version": VERSION, "checkpoint": checkpoint, "step": int(step),
            "preset": config.preset, "weights": weights, "data": data, **metrics}


def write(record_: dict, json_path, plot: bool = True) -> list[Path]:
    """The record as JSON (atomically) and, when matplotlib is installed and ``plot``, its heatmap beside it (.png);
    the paths written."""
    json_path = Path(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json_path, json.dumps(record_, indent=2) + "\n")
    written = [json_path]
    if plot:
        try:
            written.append(heatmap(record_, json_path.with_suffix(".png")))
        except ImportError:
            pass
    return written


def heatmap(record_: dict, path) -> Path:
    """One panel per metric: blocks down, noise levels across, each cell annotated (REPA's alignment-by-layer
    figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers, ts = record_["layers"], record_["t"]
    fig, axes = plt.subplots(1, len(METRICS), figsize=(3.2 * len(METRICS), 0.32 * len(layers) + 2.2), dpi=110)
    for ax, name in zip(axes, METRICS):
        values = np.array(record_["metrics"][name])  # (layers, t)
        image = ax.imshow(values, aspect="auto", cmap="viridis", vmin=min(0.0, values.min()), vmax=max(1.0,
                                                                                                      values.max()))
        ax.set_xticks(range(len(ts)), [f"{t:g}" for t in ts])
        ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
        ax.set_xlabel("t (1 = noise)")
        ax.set_ylabel("block")
        ax.set_title(name.replace("_", " "))
        for (i, k), value in np.ndenumerate(values):
            ax.text(k, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if value < 0.6 else "black")
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.suptitle(f"{record_['preset']} step {record_['step']}: alignment with {record_['vfm']['name']} "
                 f"(N = {record_['n']})", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(path)


def default_path(ckpt) -> Path:
    """Where a checkpoint's probe goes: RUN/probe/NNNNNNN.json for RUN/checkpoints/NNNNNNN.pt, else CKPT.probe.json
    beside it."""
    ckpt = Path(ckpt)
    if ckpt.parent.name == "checkpoints":
        return ckpt.parent.parent / "probe" / f"{ckpt.stem}.json"
    return ckpt.with_suffix(".probe.json")


def probe_checkpoint(ckpt, data, settings: ProbeSettings, device, weights: str = "ema", vfm_weights: str | None = None,
                     compressor: str | None = None, progress: bool = False) -> dict:
    """Load ``ckpt`` (any preset, ours or official), its dataset check, its semantic encoder and VFM, then
    ``probe``; the JSON record."""
    model, config = load_model(ckpt, ema=weights == "ema")
    if compressor is not None and config.model.semantic_source != "compressor":
        raise ProbeError(f"--compressor {compressor}: {ckpt} has no compressed semantic channels, nothing would read "
                         "it")
    if compressor is not None:
        config = dataclasses.replace(config, compressor=dataclasses.replace(config.compressor, path=compressor))
    dataset = EncodedDataset(data)
    dataset.check_for(config.data, config.model.num_classes)
    run_dir = Path(ckpt).parent.parent if Path(ckpt).parent.name == "checkpoints" else None
    semantics = build_semantic_encoder(config, dataset, vfm_weights, device, run_dir)
    vfm = semantics.vfm if semantics is not None else load_vfm(config.vfm.name, config.vfm.image_size,
                                                               vfm_weights).to(device)
    metrics = probe(model.to(device).float().eval(), config, dataset, semantics, vfm, settings, device, progress)
    step = int((config.origin or {}).get("step", 0))
    return record(metrics, str(ckpt), step, config, (config.origin or {}).get("weights", weights), dataset.identity())
