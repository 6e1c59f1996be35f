"""Pretraining the semantic compressor (docs/method.md 3): norm statistics, then an autoencoder on VFM maps."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from reglue import checkpoints
from reglue.checkpoints.compressor import COMPRESSOR_FILE
from reglue.config.sections import CompressorOptim
from reglue.config.sections import CompressorRun as CompressorRunConfig
from reglue.distributed import DistInfo, all_sum, barrier
from reglue.encoders.vfm import load_vfm
from reglue.models import SemanticCompressor
from reglue.training.checkpointing import Checkpointer
from reglue.training.diffusion import TrainingStopped, TrainOptions
from reglue.training.order import StepSampler, make_split
from reglue.training.rundir import RunError, open_run
from reglue.training.semantics import RunningMoments, standardise
from reglue.training.state import NonFiniteGuard, autocast, make_optimizer, make_scaler, optimiser_step


@dataclass
class CompressorRun:
    """What a finished (or resumed) compressor run reports."""

    dist: DistInfo
    step: int
    path: str


def steps_for(config: CompressorRunConfig, n: int) -> tuple[int, int]:
    """(steps per epoch, total steps): ``train.max_steps`` when set, else epochs * steps per epoch."""
    per_epoch = max(1, math.ceil(n / config.train.global_batch))
    return per_epoch, config.train.max_steps or config.train.epochs * per_epoch


def cosine_lr(optim: CompressorOptim, epoch: int) -> float:
    """The learning rate of ``epoch``: constant, or cosine annealing from lr to eta_min over t_max_epochs
    (PyTorch's CosineAnnealingLR, closed form)."""
    if optim.schedule == "constant":
        return optim.lr
    t = min(epoch, optim.t_max_epochs) / optim.t_max_epochs
    return optim.eta_min + (optim.lr - optim.eta_min) * (1 + math.cos(math.pi * t)) / 2


@torch.no_grad()
def norm_statistics(vfm, layers, dataset, samples: int, seed: int, dist: DistInfo, batch: int = 64,
                    progress: bool = True):
    """Per-channel mean/std of the stacked VFM maps over a shuffled sample of ``samples`` images (all ranks)."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed + 17))[:samples]
    mine = order[dist.rank :: dist.world].tolist()
    moments = RunningMoments(vfm.embed_dim * len(layers))
    quiet = not (progress and dist.is_main)
    for start in tqdm(range(0, len(mine), batch), desc="norm stats", disable=quiet, leave=False):
        images = dataset.read_batch(mine[start : start + batch])[0].to(dist.device)
        moments.update(vfm(images, layers).local.float())
    c = moments.sum.numel()
    summed = all_sum([float(moments.count), *moments.sum.tolist(), *moments.sum_sq.tolist()])
    moments.count = int(summed[0])
    moments.sum = torch.tensor(summed[1 : 1 + c], dtype=torch.float64)
    moments.sum_sq = torch.tensor(summed[1 + c :], dtype=torch.float64)
    return moments.result()


def _build(config: CompressorRunConfig, options: TrainOptions, dist, run, dataset):
    """Frozen VFM, compressor, optimiser and loss scaler of a checked run directory."""
    v = config.vfm
    if dataset.resolution != config.data.resolution:
        raise RunError(f"{options.data}: {dataset.resolution}px images, the run's data.resolution is "
                       f"{config.data.resolution}")
    vfm = load_vfm(v.name, v.image_size, options.vfm_weights).to(dist.device)
    channels = list(config.compressor.channels)
    if channels[0] != vfm.embed_dim * len(v.layers):
        raise RunError(f"compressor.channels starts at {channels[0]} but {len(v.layers)} layers of {v.name} "
                       f"give {vfm.embed_dim * len(v.layers)} channels")
    torch.manual_seed(config.train.seed)
    compressor = SemanticCompressor(channels).to(dist.device)
    return (dist, run, dataset, vfm, compressor, make_optimizer(compressor, config.optim),
            make_scaler(dist.device, config.train.precision))


def train_compressor(config: CompressorRunConfig, options: TrainOptions) -> CompressorRun:
    """Train the compressor; saves run checkpoints and, at the end, ``outdir/compressor.pt``."""
    setup = open_run(config, options, _build)
    try:
        return _train(config, options, *setup)
    finally:
        setup[1].release()


def _train(config: CompressorRunConfig, options: TrainOptions, dist, run, dataset, vfm, compressor, optimizer,
           scaler) -> CompressorRun:
    """Norm statistics (or the resumed ones), then the training loop; ``run`` is locked and checked."""
    tc, layers = config.train, list(config.vfm.layers)
    saver = Checkpointer(run, config, {"model": compressor, "optimizer": optimizer, "scaler": scaler}, dist.is_main,
                         options.echo, options.keep_last, options.keep_every)
    step, extra = saver.resume()
    stats = (extra["mean"], extra["std"]) if extra else None
    run.begin(config, dataset.identity(), step, dist.is_main)
    barrier()
    if stats is None:
        stats = norm_statistics(vfm, layers, dataset, config.compressor.norm_stats_samples, tc.seed, dist,
                                progress=options.progress)
    mean, std = (s.to(dist.device) for s in stats)
    per_epoch, max_steps = steps_for(config, len(dataset))
    split = make_split(tc.global_batch, dist.world, options.batch_gpu)
    net = DistributedDataParallel(compressor) if dist.world > 1 else compressor
    loader = DataLoader(dataset, sampler=StepSampler(len(dataset), split, dist.rank, tc.seed, step, max_steps),
                        batch_size=None, num_workers=options.workers)
    batches, started, first_step = iter(loader), time.time(), step
    guard = NonFiniteGuard(options.max_nonfinite)

    bar = tqdm(total=max_steps, initial=step, desc="compressor", unit="step",
               disable=not (options.progress and dist.is_main))
    with bar:
        while step < max_steps:
            epoch = step // per_epoch
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(config.optim, epoch)
            total = 0.0
            for k in range(split.accum):
                images = next(batches)[0].to(dist.device)
                with autocast(dist.device, tc.precision):
                    target = standardise(vfm(images, layers).local.float(), mean, std)
                    recon, _ = net(target)
                loss = F.mse_loss(recon.float(), target) * images.shape[0] / split.per_rank
                scaler.scale(loss).backward()
                total += float(loss.detach())
            summed = all_sum([total, float(not math.isfinite(total))])
            skipped, _ = optimiser_step(compressor, optimizer, scaler, config.optim.grad_clip, summed[1] == 0)
            step += 1
            loss_avg = summed[0] / dist.world
            if guard.record(not skipped):
                raise TrainingStopped(f"{guard.in_a_row} non-finite steps in a row at step {step}; last good "
                                      f"checkpoint: {checkpoints.find_latest_checkpoint(run.checkpoints)}")
            bar.set_postfix(loss=f"{loss_avg:.4f}", refresh=False)  # shown by the update below
            bar.update(1)
            if dist.is_main and (step % tc.log_every == 0 or skipped):
                rate = ((step - first_step) * tc.global_batch) / max(time.time() - started, 1e-9)
                run.log(f"step {step} (epoch {epoch}): mse {loss_avg:.5f} lr {optimizer.param_groups[0]['lr']:.2e}",
                        options.echo)
                run.metrics({"step": step, "epoch": epoch, "mse": loss_avg, "lr": optimizer.param_groups[0]["lr"],
                             "images_per_s": rate, "skipped": skipped})
            if step % tc.ckpt_every == 0 or step == max_steps:
                saver.save(step, len(dataset), tc.global_batch, extra={"mean": stats[0], "std": stats[1]})
    product = run.root / COMPRESSOR_FILE
    if dist.is_main:
        checkpoints.save_compressor(product, compressor.eval(), stats[0], stats[1], config.vfm.name, layers)
        run.log(f"compressor written to {product}", options.echo)
    barrier()
    return CompressorRun(dist, step, str(product))
