"""Pretraining the semantic compressor (docs/method.md 3): norm statistics, then an autoencoder on VFM maps. One step
is ``compressor_step`` here; the loop around it, shared with the diffusion loop, is reglue/training/loop.py."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from reglue import checkpoints
from reglue.checkpoints.compressor import COMPRESSOR_FILE
from reglue.config.sections import CompressorOptim
from reglue.config.sections import CompressorRun as CompressorRunConfig
from reglue.data.dataset import EncodedDataset
from reglue.distributed import DistInfo, all_sum, barrier
from reglue.encoders.vfm import load_vfm
from reglue.models import SemanticCompressor
from reglue.training.checkpointing import Checkpointer
from reglue.training.loop import Loop, TrainOptions, progress_bar, run_steps
from reglue.training.order import Split, StepSampler, make_split
from reglue.training.rundir import RunDir, RunError, open_run
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


@dataclass
class CompressorTrainer:
    """Everything one compressor process holds."""

    config: CompressorRunConfig
    options: TrainOptions
    dist: DistInfo
    run: RunDir
    dataset: EncodedDataset
    vfm: torch.nn.Module  # frozen
    compressor: SemanticCompressor
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    step: int = 0
    guard: NonFiniteGuard = field(default_factory=NonFiniteGuard)
    stats: tuple[torch.Tensor, torch.Tensor] | None = None  # per-channel (mean, std) of the VFM maps, on the CPU

    @property
    def epoch(self) -> int:
        """The epoch the next step trains in (of steps_for's length): the learning rate's."""
        return self.step // steps_for(self.config, len(self.dataset))[0]

    @property
    def checkpointer(self) -> Checkpointer:
        """Saves and resumes compressor, optimiser, scaler, step, RNG and data position, the norm statistics beside."""
        parts = {"model": self.compressor, "optimizer": self.optimizer, "scaler": self.scaler}
        return Checkpointer(self.run, self.config, parts, self.dist.is_main, self.options.echo, self.options.keep_last,
                            self.options.keep_every)

    def checkpoint(self) -> None:
        """Save this step and the norm statistics (rank 0), then prune old checkpoints."""
        self.checkpointer.save(self.step, len(self.dataset), self.config.train.global_batch,
                               extra={"mean": self.stats[0], "std": self.stats[1]})

    def resume(self) -> None:
        """Load the newest valid checkpoint of the run directory, if any, and the norm statistics it holds."""
        self.step, extra = self.checkpointer.resume()
        self.stats = (extra["mean"], extra["std"]) if extra else None


def _build(config: CompressorRunConfig, options: TrainOptions, dist, run, dataset) -> CompressorTrainer:
    """The CompressorTrainer of a checked run directory and dataset (frozen VFM, compressor, optimiser, loss scaler),
    resumed; then the run directory is written."""
    vfm = _load_vfm(config, options, dist, dataset)
    torch.manual_seed(config.train.seed)
    compressor = SemanticCompressor(list(config.compressor.channels)).to(dist.device)
    optimizer, scaler = make_optimizer(compressor, config.optim), make_scaler(dist.device, config.train.precision)
    trainer = CompressorTrainer(config, options, dist, run, dataset, vfm, compressor, optimizer, scaler,
                                guard=NonFiniteGuard(options.max_nonfinite))
    trainer.resume()
    run.begin(config, dataset.identity(), trainer.step, dist.is_main)
    barrier()
    return trainer


def _load_vfm(config: CompressorRunConfig, options: TrainOptions, dist, dataset) -> torch.nn.Module:
    """The frozen VFM, once the dataset's resolution and the compressor's input width are checked against the run."""
    v = config.vfm
    if dataset.resolution != config.data.resolution:
        raise RunError(f"{options.data}: {dataset.resolution}px images, the run's data.resolution is "
                       f"{config.data.resolution}")
    vfm = load_vfm(v.name, v.image_size, options.vfm_weights).to(dist.device)
    channels = list(config.compressor.channels)
    if channels[0] != vfm.embed_dim * len(v.layers):
        raise RunError(f"compressor.channels starts at {channels[0]} but {len(v.layers)} layers of {v.name} "
                       f"give {vfm.embed_dim * len(v.layers)} channels")
    return vfm


def train_compressor(config: CompressorRunConfig, options: TrainOptions) -> CompressorRun:
    """Train the compressor; saves run checkpoints and, at the end, ``outdir/compressor.pt``."""
    trainer = open_run(config, options, _build)
    try:
        return _train(trainer)
    finally:
        trainer.run.release()


@dataclass
class StepResult:
    """One step as the loop shows and logs it."""

    epoch: int  # the epoch it trained in
    lr: float  # its learning rate (cosine_lr of the epoch)
    mse: float  # the reconstruction loss, averaged over ranks
    skipped: bool  # non-finite: the weights were left alone

    def postfix(self) -> dict[str, str]:
        """The loss for the progress bar."""
        return {"loss": f"{self.mse:.4f}"}


def _train(trainer: CompressorTrainer) -> CompressorRun:
    """Norm statistics (or the resumed ones), the shared loop (training/loop.py) around compressor_step, then
    compressor.pt."""
    config, dist = trainer.config, trainer.dist
    if trainer.stats is None:
        trainer.stats = norm_statistics(trainer.vfm, list(config.vfm.layers), trainer.dataset,
                                        config.compressor.norm_stats_samples, config.train.seed, dist,
                                        progress=trainer.options.progress)
    mean, std = (s.to(dist.device) for s in trainer.stats)
    max_steps = steps_for(config, len(trainer.dataset))[1]
    split = make_split(config.train.global_batch, dist.world, trainer.options.batch_gpu)
    net = DistributedDataParallel(trainer.compressor) if dist.world > 1 else trainer.compressor
    batches, images_per_s = iter(_loader(trainer, split, max_steps)), _images_per_s(trainer)
    bar = progress_bar(trainer, "compressor", max_steps)
    loop = Loop(max_steps, config.train.log_every, config.train.ckpt_every,
                step=partial(compressor_step, trainer, net, batches, split, mean, std),
                log=partial(_log, trainer, images_per_s))
    run_steps(trainer, loop, bar)
    return _write_compressor(trainer)


def compressor_step(trainer: CompressorTrainer, net, batches, split: Split, mean: torch.Tensor,
                    std: torch.Tensor) -> StepResult:
    """One optimiser step over this rank's micro-batches: the epoch's learning rate, the MSE of reconstructing the
    standardised VFM maps, then the update both loops share (state.optimiser_step)."""
    config, device, layers = trainer.config, trainer.dist.device, list(trainer.config.vfm.layers)
    epoch = trainer.epoch
    for group in trainer.optimizer.param_groups:
        group["lr"] = cosine_lr(config.optim, epoch)
    total = 0.0
    for _ in range(split.accum):
        images = next(batches)[0].to(device)
        with autocast(device, config.train.precision):
            target = standardise(trainer.vfm(images, layers).local.float(), mean, std)
            recon, _ = net(target)
        loss = F.mse_loss(recon.float(), target) * images.shape[0] / split.per_rank
        trainer.scaler.scale(loss).backward()
        total += float(loss.detach())
    summed = all_sum([total, float(not math.isfinite(total))])
    skipped, _ = optimiser_step(trainer.compressor, trainer.optimizer, trainer.scaler, config.optim.grad_clip,
                                summed[1] == 0)
    return StepResult(epoch, trainer.optimizer.param_groups[0]["lr"], summed[0] / trainer.dist.world, skipped)


def _log(trainer: CompressorTrainer, images_per_s: Callable[[], float], result: StepResult) -> None:
    """Rank 0, every log_every steps and on a skipped step: the status line (log.txt, the console) and the
    metrics.jsonl record."""
    rate = images_per_s()
    trainer.run.log(f"step {trainer.step} (epoch {result.epoch}): mse {result.mse:.5f} lr {result.lr:.2e}",
                    trainer.options.echo)
    trainer.run.metrics({"step": trainer.step, "epoch": result.epoch, "mse": result.mse, "lr": result.lr,
                         "images_per_s": rate, "skipped": result.skipped})


def _images_per_s(trainer: CompressorTrainer) -> Callable[[], float]:
    """Images trained per second since now (wall time), read when a step is logged."""
    started, first_step = time.time(), trainer.step
    return lambda: (trainer.step - first_step) * trainer.config.train.global_batch / max(time.time() - started, 1e-9)


def _loader(trainer: CompressorTrainer, split: Split, max_steps: int) -> DataLoader:
    """This rank's micro-batches from the resumed step to ``max_steps`` (order.StepSampler)."""
    sampler = StepSampler(len(trainer.dataset), split, trainer.dist.rank, trainer.config.train.seed, trainer.step,
                          max_steps)
    return DataLoader(trainer.dataset, sampler=sampler, batch_size=None, num_workers=trainer.options.workers)


def _write_compressor(trainer: CompressorTrainer) -> CompressorRun:
    """Rank 0 writes compressor.pt (weights, norm statistics, VFM name and layers); every rank waits for it."""
    product = trainer.run.root / COMPRESSOR_FILE
    if trainer.dist.is_main:
        mean, std = trainer.stats
        checkpoints.save_compressor(product, trainer.compressor.eval(), mean, std, trainer.config.vfm.name,
                                    list(trainer.config.vfm.layers))
        trainer.run.log(f"compressor written to {product}", trainer.options.echo)
    barrier()
    return CompressorRun(trainer.dist, trainer.step, str(product))
