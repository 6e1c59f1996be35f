"""The skeleton both training loops share (docs/train.md): a progress bar from the resumed step, then optimiser steps
until ``max_steps``, each one counted by the non-finite guard, shown on the bar, logged every ``log_every`` steps
(and whenever skipped) and checkpointed every ``ckpt_every`` steps and at the end. A loop brings its state (the
diffusion Trainer, the CompressorTrainer) and a Loop: its step and how it logs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from tqdm import tqdm

from reglue import checkpoints
from reglue.distributed import DistInfo
from reglue.training.rundir import RunDir
from reglue.training.state import NonFiniteGuard


class TrainingStopped(RuntimeError):
    """Training cannot continue (too many non-finite steps); the message names the last good checkpoint."""


@dataclass
class TrainOptions:
    """How to run (not what to train: that is the config)."""

    data: str
    outdir: str
    batch_gpu: int | None = None
    workers: int = 4
    compile: bool = False
    keep_last: int = 3
    keep_every: int | None = None
    tensorboard: bool = False
    wandb_project: str | None = None  # also log to Weights & Biases (reglue.tracking)
    vfm_weights: str | None = None
    max_nonfinite: int = 10
    allow_other_data: bool = False  # resume onto a dataset other than the one run/data.yaml records
    progress: bool = True
    device: str | None = None
    echo: Callable[[str], None] = field(default=tqdm.write)
    # diffusion runs: called with the Trainer (reglue.training.diffusion) on every rank after each step and once
    # before the first (the CLI wires evaluation in this way); a callback with a ``launch(config, run)`` method is
    # first asked, once the run directory is locked and before anything is built or written, whether the run may
    # start (it raises a UserError when not)
    callbacks: tuple[Callable[[Any], None], ...] = ()


class TrainingState(Protocol):
    """What the skeleton reads and counts of a loop's state."""

    options: TrainOptions
    dist: DistInfo
    run: RunDir
    step: int  # optimiser steps done
    guard: NonFiniteGuard

    def checkpoint(self) -> None:
        """Save this step (rank 0), then prune old checkpoints."""


class StepResult(Protocol):
    """What the skeleton reads of one step's result (each loop has its own StepResult dataclass)."""

    skipped: bool  # non-finite (or an fp16 overflow): the weights were left alone

    def postfix(self) -> dict[str, str]:
        """The figures the progress bar shows."""


def due(step: int, every: int, max_steps: int) -> bool:
    """Whether a callback that runs every ``every`` steps and at the last one (--eval-every, --probe-every) runs after
    optimiser step ``step``."""
    return step > 0 and (step % every == 0 or step == max_steps)


def _nothing() -> None:
    """No work after the step."""


@dataclass
class Loop:
    """One training loop as the skeleton runs it: how far and how often, and its own parts."""

    max_steps: int
    log_every: int
    ckpt_every: int
    step: Callable[[], StepResult]  # one optimiser step of ``state.step`` (the skeleton then counts it)
    log: Callable[[StepResult], None]  # rank 0, when due: the log.txt line and the metrics.jsonl record
    after_step: Callable[[], None] = _nothing  # after the checkpoint: the diffusion loop's grids and callbacks


def progress_bar(state: TrainingState, name: str, total: int) -> tqdm:
    """The loop's progress bar, from the resumed step; shown on rank 0 unless --quiet."""
    return tqdm(total=total, initial=state.step, disable=not (state.options.progress and state.dist.is_main),
                unit="step", dynamic_ncols=True, desc=name)


def run_steps(state: TrainingState, loop: Loop, bar: tqdm) -> None:
    """Step until ``loop.max_steps``: count, show and log each step, checkpoint when due, then ``loop.after_step``;
    ``bar`` (progress_bar) is closed when the loop ends, normally or not."""
    with bar:
        while state.step < loop.max_steps:
            result = loop.step()
            state.step += 1
            _record(state, loop, result, bar)
            if state.step % loop.ckpt_every == 0 or state.step == loop.max_steps:
                state.checkpoint()
            loop.after_step()


def _record(state: TrainingState, loop: Loop, result: StepResult, bar: tqdm) -> None:
    """Count the step (the non-finite guard), show it on the bar and, every log_every steps or when skipped, log it
    (rank 0); stop the run after too many non-finite steps in a row."""
    stop = state.guard.record(not result.skipped)
    bar.set_postfix(**result.postfix(), refresh=False)  # shown by update
    bar.update(1)
    if state.dist.is_main and (state.step % loop.log_every == 0 or result.skipped):
        loop.log(result)
    if stop:
        raise _stopped(state)


def _stopped(state: TrainingState) -> TrainingStopped:
    """The error that ends a run after too many non-finite steps in a row, naming the last good checkpoint."""
    return TrainingStopped(f"{state.guard.in_a_row} non-finite steps in a row at step {state.step}; "
                           f"last good checkpoint: {checkpoints.find_latest_checkpoint(state.run.checkpoints)}")
