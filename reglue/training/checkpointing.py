"""Resume and save, shared by both training loops: the newest loadable checkpoint of a run directory is resumed
exactly (weights, optimiser, loss scaler, RNG, step); rank 0 writes atomically and prunes; every rank waits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from reglue import checkpoints
from reglue.distributed import main_decides, main_phase
from reglue.training.order import data_position
from reglue.training.rundir import RunDir, check_same_model


@dataclass
class Checkpointer:
    """What a training loop saves and resumes: ``parts`` names its modules and optimiser (state_dict holders)."""

    run: RunDir
    config: object  # the typed run configuration stored in every checkpoint
    parts: dict[str, object]  # "model", "optimizer", "scaler" and, for the diffusion loop, "ema"
    is_main: bool
    echo: Callable[[str], None]
    keep_last: int = 3
    keep_every: int | None = None

    def resume(self) -> tuple[int, dict]:
        """(step, extra) of the newest loadable checkpoint, its state loaded into ``parts``; (0, {}) when none."""
        path = main_decides(checkpoints.find_latest_checkpoint(self.run.checkpoints))  # rank 0's: every rank agrees
        if path is None:
            return 0, {}
        state = checkpoints.load_checkpoint(path, mmap=True)  # copied into the parts as they load
        check_same_model(path, state.get("config", {}), self.config)
        for name, part in self.parts.items():
            if state.get(name) is not None:  # a scaler that was never enabled stores an empty state
                part.load_state_dict(state[name])
        if state.get("rng"):
            checkpoints.restore_rng_state(state["rng"])
        step = int(state["step"])
        if self.is_main:
            self.run.log(f"resumed from {path} at step {step}", self.echo)
        return step, state.get("extra") or {}

    def save(self, step: int, rows: int, global_batch: int, extra: dict | None = None) -> None:
        """Checkpoint ``step`` (rank 0: atomic write, then prune old ones); every rank waits for it."""
        with main_phase("checkpoint"):  # an XL checkpoint takes a while: the others wait through gloo
            self._save(step, rows, global_batch, extra)

    def _save(self, step: int, rows: int, global_batch: int, extra: dict | None) -> None:
        if self.is_main:
            path = checkpoints.save_checkpoint(
                self.run.checkpoint_path(step), config=self.config, step=step,
                **{name: part for name, part in self.parts.items()},
                data_state=data_position(step, rows, global_batch), rng=checkpoints.capture_rng_state(),
                extra={k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in (extra or {}).items()})
            self.run.prune(self.keep_last, self.keep_every)
            self.run.log(f"step {step}: saved {path}", self.echo)
