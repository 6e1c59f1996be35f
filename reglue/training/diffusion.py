"""The diffusion training loop for every preset (docs/method.md 5), on one CPU or many GPUs, resumable exactly: one
step is ``train_step`` here and JointLoss (reglue/transport/loss.py); the loop around it, shared with the compressor,
is reglue/training/loop.py."""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from functools import partial

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from evaluation.environment import environment
from reglue import config as run_config
from reglue.config.sections import DiffusionRun, DiffusionTrain
from reglue.data.dataset import EncodedDataset
from reglue.distributed import DistInfo, all_sum_tensor, barrier, main_phase
from reglue.ema.snapshots import prune_snapshots, save_snapshot
from reglue.ema.tracking import PowerEMA
from reglue.encoders.vae import load_vae, sample_latents
from reglue.models import build
from reglue.sampling.grid import save_sample_grid
from reglue.tracking import WandbTracker
from reglue.training.checkpointing import Checkpointer
from reglue.training.loop import Loop, TrainingStopped, TrainOptions, progress_bar, run_steps
from reglue.training.order import NoiseAhead, StepSampler, flip_rows, make_split, step_noise
from reglue.training.rundir import RunDir, RunError, open_run
from reglue.training.semantics import build_semantic_encoder
from reglue.training.state import (
    NonFiniteGuard,
    autocast,
    grad_norm,
    make_optimizer,
    make_scaler,
    optimiser_step,
    update_ema,
)
from reglue.training.throughput import speedometer
from reglue.transport import JointLoss, sample_time

__all__ = ["TERMS", "StepResult", "Trainer", "TrainingStopped", "TrainOptions", "build_trainer", "noise_source",
           "open_tensorboard", "train_diffusion", "train_step"]  # TrainingStopped, TrainOptions: from training/loop.py

TERMS = ("loss", "latent", "semantic", "cls", "repa")


@dataclass
class Trainer:
    """Everything one training process holds."""

    config: DiffusionRun
    options: TrainOptions
    dist: DistInfo
    run: RunDir
    model: torch.nn.Module
    ema: torch.nn.Module
    power_ema: PowerEMA | None  # the ema.sigma_rels profiles, when tracked
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    dataset: EncodedDataset
    semantics: torch.nn.Module | None
    step: int = 0
    guard: NonFiniteGuard = field(default_factory=NonFiniteGuard)
    board: object = None  # the TensorBoard SummaryWriter on rank 0 with --tensorboard
    tracker: object = None  # the W&B run on rank 0 with --wandb (reglue.tracking.WandbTracker)
    environment_logged: bool = False  # the launch's first metrics.jsonl line carries the environment

    def report(self, record: dict, prefix: str, line: dict | None = None) -> None:
        """Rank 0: one line of metrics.jsonl (``line``, default {"step", **record}), TensorBoard scalars and W&B
        values ``prefix/key``."""
        self.run.metrics(line or {"step": self.step, **record})
        for key, value in record.items() if self.board is not None else ():
            self.board.add_scalar(f"{prefix}/{key}", float(value), self.step)
        if self.tracker is not None:
            self.tracker.log({f"{prefix}/{k}": v for k, v in record.items()}, self.step)

    @property
    def train_cfg(self) -> DiffusionTrain:
        return self.config.train

    @property
    def epoch(self) -> float:
        """Passes over the dataset so far (images seen / rows)."""
        return self.step * self.train_cfg.global_batch / len(self.dataset)

    @property
    def checkpointer(self) -> Checkpointer:
        """Saves and resumes model, EMAs, optimiser, scaler, step, RNG and data position."""
        parts = {"model": self.model, "ema": self.ema, "optimizer": self.optimizer, "scaler": self.scaler,
                 **({"power_ema": self.power_ema} if self.power_ema is not None else {})}
        return Checkpointer(self.run, self.config, parts, self.dist.is_main, self.options.echo, self.options.keep_last,
                            self.options.keep_every)

    def checkpoint(self) -> None:
        """Save this step (rank 0), then prune old checkpoints."""
        self.checkpointer.save(self.step, len(self.dataset), self.train_cfg.global_batch)

    def resume(self) -> None:
        """Load the newest valid checkpoint of the run directory, if any."""
        self.step = self.checkpointer.resume()[0]


def build_trainer(config: DiffusionRun, options: TrainOptions) -> Trainer:
    """Set up (or resume) a run: process group, run directory, model, EMA, optimiser, data, frozen encoders."""
    return open_run(config, options, _build)


def _build(config: DiffusionRun, options: TrainOptions, dist, run, dataset) -> Trainer:
    """The Trainer of a checked run directory and dataset, resumed, its loggers open; then the run directory is
    written (a launch that fails before leaves nothing that blocks the corrected command)."""
    dataset.check_for(config.data, config.model.num_classes)
    for callback in options.callbacks:
        if hasattr(callback, "launch"):
            callback.launch(config, run)
    torch.manual_seed(config.train.seed)
    model = build(config).to(dist.device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    power_ema = PowerEMA(model, config.ema.sigma_rels) if config.ema.sigma_rels else None
    trainer = Trainer(
        config, options, dist, run, model, ema, power_ema, make_optimizer(model, config.optim),
        make_scaler(dist.device, config.train.precision), dataset,
        build_semantic_encoder(config, dataset, options.vfm_weights, dist.device, run.root, dist.is_main),
        guard=NonFiniteGuard(options.max_nonfinite),
    )
    trainer.resume()
    _open_loggers(trainer)
    try:
        run.begin(config, dataset.identity(), trainer.step, dist.is_main)
    except BaseException:
        _close_loggers(trainer)
        raise
    barrier()
    if config.train.tf32 and dist.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return trainer


def _joint_state(trainer: Trainer, images, moments, noise) -> tuple:
    """Clean joint state of a micro-batch: x0 (latents + semantics), cls0, REPA target (None at a step whose REPA
    weight is 0: then a model that reads nothing else of the VFM skips its pass)."""
    if noise.flip is not None:  # data.flip: the mirrored image and its stored moments, per sample
        images, moments = flip_rows(images, moments, noise.flip)
    z = sample_latents(moments, trainer.config.data.latent_scale, eps=noise.posterior)
    cfg = trainer.model.config
    aligning = cfg.projector is not None and trainer.config.loss.repa_at(trainer.step) != 0
    if trainer.semantics is None or not (cfg.semantic_channels or cfg.cls_token or aligning):
        return z, None, None
    with autocast(trainer.dist.device, trainer.train_cfg.precision):
        sem = trainer.semantics(images)
    x0 = torch.cat([z, sem.channels], dim=1) if cfg.semantic_channels else z
    cls0 = sem.cls if cfg.cls_token else None
    return x0, cls0, (sem.repa_target if aligning else None)


def noise_source(trainer: Trainer, split) -> NoiseAhead:
    """Every random draw of a step (order.step_noise), made one step ahead in a background thread."""
    cfg, tc, transport = trainer.model.config, trainer.train_cfg, trainer.config.transport
    sampler = lambda n, g: sample_time(n, transport.time_sampler, transport.path, generator=g)  # noqa: E731
    draw = lambda step: step_noise(step, tc.seed, split.global_batch, cfg.in_channels,  # noqa: E731
                                   cfg.latent_channels, cfg.input_size, cfg.cls_dim if cfg.cls_token else None,
                                   cfg.class_dropout, sampler, flip=trainer.config.data.flip)
    return NoiseAhead(draw, pin=trainer.dist.device.type == "cuda")


def train_step(trainer: Trainer, net, loss_fn: JointLoss, batches, split, noise_all) -> dict:
    """One optimiser step over this rank's micro-batches (``noise_all``: the step's draws for the whole global
    batch); returns the logged numbers (averaged over ranks). The loss terms stay on the device: the step reads the
    host once (_apply_update)."""
    tc, device = trainer.train_cfg, trainer.dist.device
    ddp = getattr(net, "_orig_mod", net)  # torch.compile wraps the DDP module: no_sync is the wrapped one's
    totals = torch.zeros(len(TERMS), dtype=torch.float64, device=device)
    parts = split.micro_slices(trainer.dist.rank)
    for k, ((images, moments, labels), part) in enumerate(zip(batches, parts)):
        noise = noise_all.take(part, device)
        images, moments, labels = (x.to(device, non_blocking=True) for x in (images, moments, labels))
        x0, cls0, repa = _joint_state(trainer, images, moments, noise)
        sync = k == len(parts) - 1 or not isinstance(ddp, DistributedDataParallel)
        with (contextlib.nullcontext() if sync else ddp.no_sync()):
            with autocast(device, tc.precision):
                terms = loss_fn(net, x0, labels, cls0=cls0, repa_target=repa, step=trainer.step, t=noise.t,
                                noise=noise.noise, cls_noise=noise.cls_noise, drop_mask=noise.drop)
            weight = labels.shape[0] / split.per_rank
            trainer.scaler.scale(terms.total * weight).backward()
        totals += torch.stack([v.detach().double() for v in terms]) * weight
    return _apply_update(trainer, totals)


def _apply_update(trainer: Trainer, totals: torch.Tensor) -> dict:
    """Skip on a non-finite loss (any rank), else unscale, clip, step, update the scaler and the EMA. The loss
    terms (summed over ranks on the device), the non-finite flag and the gradient norm reach the host in one read."""
    world, model, scaler = trainer.dist.world, trainer.model, trainer.scaler
    nonfinite = (~torch.isfinite(totals)).any().to(totals.dtype).reshape(1)
    summed = all_sum_tensor(torch.cat([totals, nonfinite]))
    norm = None if scaler.is_enabled() else grad_norm(model)  # fp16: the scaler unscales (and reads) first
    host = torch.cat([summed, norm.reshape(1).to(summed)]).tolist() if norm is not None else summed.tolist()
    logged = dict(zip(TERMS, (v / world for v in host[: len(TERMS)])))
    skipped, norm_value = optimiser_step(model, trainer.optimizer, scaler, trainer.config.optim.grad_clip,
                                         loss_finite=host[len(TERMS)] == 0,
                                         norm=None if norm is None else (norm, host[-1]))
    if not skipped:
        update_ema(trainer.ema, model, trainer.config.ema.decay)
        logged["grad_norm"] = norm_value
    if trainer.power_ema is not None:  # every step, skipped ones too: the snapshot of step t is the profile at t
        trainer.power_ema.update(model, trainer.step + 1)
    logged["skipped"] = bool(skipped)
    return logged


def train_diffusion(config: DiffusionRun, options: TrainOptions) -> Trainer:
    """Train until ``train.max_steps``; run again with the same arguments to resume."""
    trainer = build_trainer(config, options)
    try:
        return _train(trainer)
    finally:
        _close_loggers(trainer)
        trainer.run.release()


@dataclass
class StepResult:
    """One step as the loop shows and logs it: train_step's numbers and the throughput since the launch."""

    logged: dict  # TERMS, grad_norm (when the step was taken) and skipped
    figures: dict  # images_per_s, tflops_per_s and, on a GPU of known peak, mfu (throughput.training_figures)

    @property
    def skipped(self) -> bool:
        """Whether the step was skipped as non-finite."""
        return self.logged["skipped"]

    def postfix(self) -> dict[str, str]:
        """Loss, images/s and TFLOP/s for the progress bar."""
        return {"loss": f"{self.logged['loss']:.4f}", "img_s": f"{self.figures['images_per_s']:.1f}",
                "tflops": f"{self.figures['tflops_per_s']:.2f}"}


def _train(trainer: Trainer) -> Trainer:
    """The training loop proper (see train_diffusion): the shared loop (training/loop.py) around train_step."""
    tc = trainer.train_cfg
    split = make_split(tc.global_batch, trainer.dist.world, trainer.options.batch_gpu)
    loss_fn, net, vae = _loss(trainer), _make_net(trainer), _grid_vae(trainer)
    bar = progress_bar(trainer, "train", tc.max_steps)
    batches = iter(_loader(trainer, split))
    speed = speedometer(trainer.config, trainer.dist.device)
    for callback in trainer.options.callbacks:  # e.g. an evaluation of the resumed step that a kill interrupted
        callback(trainer)
    with contextlib.closing(noise_source(trainer, split)) as noise:
        def step() -> StepResult:
            """train_step on this step's micro-batches and noise; the throughput since the launch."""
            logged = train_step(trainer, net, loss_fn, [next(batches) for _ in range(split.accum)], split,
                                noise(trainer.step))
            _snapshot_when_due(trainer, trainer.step + 1)  # before the step's checkpoint: a resume never skips it
            return StepResult(logged, speed.add(split.global_batch))

        loop = Loop(tc.max_steps, tc.log_every, tc.ckpt_every, step=step, log=partial(_log, trainer, loss_fn),
                    after_step=partial(_after_step, trainer, vae))
        run_steps(trainer, loop, bar)
    return trainer


def _snapshot_when_due(trainer: Trainer, step: int) -> None:
    """Rank 0 writes the power EMAs of ``step`` to RUN/ema/ every ema.snapshot_every steps and at the end, then
    prunes by ema.snapshot_keep_*; every rank waits."""
    ema = trainer.config.ema
    if trainer.power_ema is None or not (step % ema.snapshot_every == 0 or step == trainer.train_cfg.max_steps):
        return
    with main_phase("ema-snapshot"):
        if trainer.dist.is_main:
            path = save_snapshot(trainer.run.root, step, trainer.power_ema, ema.snapshot_precision, trainer.config)
            prune_snapshots(trainer.run.root, ema.snapshot_keep_last, ema.snapshot_keep_every)
            trainer.run.log(f"step {step}: saved EMA snapshot {path}", trainer.options.echo)


def _log(trainer: Trainer, loss_fn: JointLoss, result: StepResult) -> None:
    """Rank 0, every log_every steps and on a skipped step: the status line (log.txt, the console) and the record
    (metrics.jsonl, TensorBoard, W&B)."""
    result.figures.update(_peak_memory(trainer))
    trainer.run.log(_status(trainer, result.logged, result.figures), trainer.options.echo)
    record = {**result.logged, "epoch": trainer.epoch, **result.figures,
              "lam": loss_fn.weights.semantic_at(trainer.step - 1),
              **({"repa_weight": loss_fn.weights.repa_at(trainer.step - 1)} if trainer.model.config.projector
                 else {})}
    trainer.report(record, "train", line=_line(trainer, record))


def _status(trainer: Trainer, logged: dict, figures: dict) -> str:
    """The status line of a step: a skipped one names the counts, a taken one its terms, norm and throughput."""
    if logged["skipped"]:
        return (f"step {trainer.step}: non-finite loss or gradients, step skipped "
                f"({trainer.guard.in_a_row} in a row, {trainer.guard.total} in total)")
    terms = " ".join(f"{k} {logged[k]:.4f}" for k in TERMS)
    speed = f"{figures['images_per_s']:.1f} img/s {figures['tflops_per_s']:.2f} TFLOP/s" + (
        f" MFU {figures['mfu']:.1%}" if "mfu" in figures else "")
    memory = f" mem {figures['max_mem_gib']:.1f} GiB" if "max_mem_gib" in figures else ""
    return (f"step {trainer.step} (epoch {trainer.epoch:.2f}): {terms} "
            f"grad_norm {logged.get('grad_norm', float('nan')):.3f} {speed}{memory} skipped {trainer.guard.total}")


def _line(trainer: Trainer, record: dict) -> dict | None:
    """The first metrics.jsonl line of a launch also records the environment that decides the run's bits (torch,
    CUDA, cuDNN, device, TF32 switches) and the process count; None (the default line) after it."""
    if trainer.environment_logged:
        return None
    trainer.environment_logged = True
    return {"step": trainer.step, **record,
            "environment": {**environment(trainer.dist.device), "world": trainer.dist.world}}


def _peak_memory(trainer: Trainer) -> dict:
    """{"max_mem_gib": peak allocated GPU memory} on CUDA, {} elsewhere."""
    if trainer.dist.device.type != "cuda":
        return {}
    return {"max_mem_gib": torch.cuda.max_memory_allocated(trainer.dist.device) / 2**30}


def _after_step(trainer: Trainer, vae) -> None:
    """After the step's checkpoint: the sample grid when due, then the callbacks (the evaluator)."""
    if vae is not None and trainer.step % trainer.train_cfg.sample_every == 0:
        _sample_grid(trainer, vae)
    for callback in trainer.options.callbacks:
        callback(trainer)


def _sample_grid(trainer: Trainer, vae) -> None:
    """Rank 0: an 8x2 grid of EMA samples in samples/STEP.png (the run's sampling settings)."""
    path = trainer.run.samples / f"{trainer.step:07d}.png"
    save_sample_grid(trainer.ema, vae, path, trainer.config.sampling, trainer.config.data.latent_scale,
                     trainer.config.transport.path)
    trainer.run.log(f"step {trainer.step}: sample grid {path}", trainer.options.echo)


def _loss(trainer: Trainer) -> JointLoss:
    """The run's joint loss (the projector's alignment of patches and [CLS] as the model's config says)."""
    config, model_cfg = trainer.config, trainer.model.config
    return JointLoss(config.loss, config.transport.path, config.transport.time_sampler, model_cfg.latent_channels,
                     *(model_cfg.projector.align_patch, model_cfg.projector.align_cls)
                     if model_cfg.projector else (True, True), projector=model_cfg.projector is not None)


def _make_net(trainer: Trainer):
    """The model as the step calls it: wrapped in DDP over several processes, compiled with --compile."""
    net = trainer.model
    if trainer.dist.world > 1:
        ids = [trainer.dist.device.index] if trainer.dist.device.type == "cuda" else None
        net = DistributedDataParallel(net, device_ids=ids)
    return torch.compile(net) if trainer.options.compile else net


def _grid_vae(trainer: Trainer):
    """The VAE decoder of the sample grids on rank 0 when train.sample_every is set, else None."""
    if not (trainer.dist.is_main and trainer.train_cfg.sample_every):
        return None
    return load_vae(trainer.config.data.vae_decoder)[0].to(trainer.dist.device)


def _loader(trainer: Trainer, split) -> DataLoader:
    """This rank's micro-batches from the resumed step to train.max_steps (order.StepSampler)."""
    sampler = StepSampler(len(trainer.dataset), split, trainer.dist.rank, trainer.train_cfg.seed, trainer.step,
                          trainer.train_cfg.max_steps)
    return DataLoader(trainer.dataset, sampler=sampler, batch_size=None, num_workers=trainer.options.workers,
                      persistent_workers=False, pin_memory=trainer.dist.device.type == "cuda")


def open_tensorboard(run: RunDir):
    """A SummaryWriter in run/tensorboard; RunError naming the missing package when it is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise RunError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter(str(run.root / "tensorboard"))


def _open_wandb(trainer: Trainer):
    """The W&B run of --wandb (reglue.tracking), the run's config attached."""

    return WandbTracker(trainer.options.wandb_project, trainer.run.root.name, run_config.to_dict(trainer.config),
                        trainer.run.root)


def _open_loggers(trainer: Trainer) -> None:
    """Rank 0: TensorBoard and W&B as asked for, before the run directory is written (their failures leave it as
    it was)."""
    options, main = trainer.options, trainer.dist.is_main
    trainer.board = open_tensorboard(trainer.run) if options.tensorboard and main else None
    trainer.tracker = _open_wandb(trainer) if options.wandb_project and main else None


def _close_loggers(trainer: Trainer) -> None:
    """Close TensorBoard and finish the W&B run, if open."""
    if trainer.board is not None:
        trainer.board.close()
    if trainer.tracker is not None:
        trainer.tracker.finish()
