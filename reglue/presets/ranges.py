"""Value checks of the sections outside ``model`` (the model section is checked by ModelConfig): every value in
range before any work starts, so `--set optim.lr=-1` is one line at `--dry-run`, not a traceback at step 1."""

from __future__ import annotations

import math
from typing import Any, Callable

from reglue.transport.path import PATHS
from reglue.transport.timesteps import TIME_SAMPLERS

Check = tuple[Callable[[Any], bool], str]


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


POSITIVE: Check = (lambda v: _number(v) and v > 0, "a finite number > 0")
NON_NEGATIVE: Check = (lambda v: _number(v) and v >= 0, "a finite number >= 0")
COUNT: Check = (lambda v: _int(v) and v >= 1, "an integer >= 1")
COUNT_OR_ZERO: Check = (lambda v: _int(v) and v >= 0, "an integer >= 0 (0: never)")
FRACTION: Check = (lambda v: _number(v) and 0 <= v <= 1, "a number in [0, 1]")
BETAS: Check = (lambda v: isinstance(v, list) and len(v) == 2 and all(_number(b) and 0 <= b < 1 for b in v),
                "two numbers in [0, 1)")
SCHEDULE: Check = (lambda v: isinstance(v, list) and all(isinstance(p, list) and len(p) == 2 and _int(p[0])
                                                        and p[0] >= 0 and _number(p[1]) and p[1] >= 0 for p in v),
                   "a list of [step, lam] pairs (step an integer >= 0, lam >= 0)")


def one_of(*choices) -> Check:
    """The value is one of ``choices``."""
    return (lambda v: v in choices, "one of " + ", ".join(map(str, choices)))


COMMON = {
    "optim.lr": POSITIVE, "optim.betas": BETAS, "optim.eps": POSITIVE, "optim.weight_decay": NON_NEGATIVE,
    "train.global_batch": COUNT, "train.ckpt_every": COUNT, "train.log_every": COUNT,
    "train.precision": one_of("fp32", "bf16", "fp16"), "train.seed": COUNT_OR_ZERO,
}
DIFFUSION = {
    **COMMON, "optim.name": one_of("adamw", "adam"), "optim.grad_clip": POSITIVE, "optim.ema_decay": FRACTION,
    "train.max_steps": COUNT, "train.sample_every": COUNT_OR_ZERO, "train.steps_per_epoch": COUNT,
    "loss.latent": NON_NEGATIVE, "loss.semantic": NON_NEGATIVE, "loss.cls": NON_NEGATIVE, "loss.repa": NON_NEGATIVE,
    "loss.semantic_schedule": SCHEDULE, "transport.path": one_of(*PATHS),
    "transport.time_sampler": one_of(*TIME_SAMPLERS), "transport.prediction": one_of("v"),
    "model.class_dropout": FRACTION, "sampling.steps": COUNT,
}
COMPRESSOR = {
    **COMMON, "optim.name": one_of("adam", "adamw"), "optim.t_max_epochs": POSITIVE, "optim.eta_min": NON_NEGATIVE,
    "train.epochs": COUNT, "compressor.norm_stats_samples": COUNT,
}

def check_ranges(config: dict) -> list[str]:
    """'key=value: expected ...' for every value out of range (empty when all fit)."""
    compressor = config.get("kind") == "compressor"
    rules = dict(COMPRESSOR if compressor else DIFFUSION)
    if compressor:
        max_steps = config.get("train", {}).get("max_steps")
        if max_steps is not None and not COUNT[0](max_steps):
            return [f"train.max_steps={max_steps!r}: expected null (epochs decide) or {COUNT[1]}"]
    problems = []
    for key, (ok, expected) in rules.items():
        section, name = key.split(".")
        if name in config.get(section, {}) and not ok(config[section][name]):
            problems.append(f"{key}={config[section][name]!r}: expected {expected}")
    return problems
