"""Training state pieces: precision, optimiser, EMA, and the non-finite-step guard."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str):
    """The autocast context for ``precision`` (a no-op for fp32)."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_scaler(device: torch.device, precision: str, init_scale: float = 2.0**16) -> torch.amp.GradScaler:
    """A loss scaler, enabled only for fp16 (its state is checkpointed either way)."""
    return torch.amp.GradScaler(device.type, init_scale=init_scale, enabled=precision == "fp16")


def make_optimizer(model: torch.nn.Module, optim) -> torch.optim.Optimizer:
    """AdamW or Adam over the trainable parameters, from a run's ``optim`` section (OptimConfig); the fused kernel
    (one launch for every parameter) on a GPU, the default multi-tensor one elsewhere."""
    params = [p for p in model.parameters() if p.requires_grad]
    kwargs = dict(lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, weight_decay=optim.weight_decay,
                  fused=True if params and params[0].is_cuda else None)
    if optim.name == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    if optim.name == "adam":
        return torch.optim.Adam(params, **kwargs)
    raise ValueError(f"optim.name {optim.name!r}: choose adamw or adam")


def grad_norm(model: torch.nn.Module) -> torch.Tensor:
    """The total L2 norm of the trainable parameters' gradients, as a 0-d tensor on their device (no host sync)."""
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    return torch.nn.utils.get_total_norm(grads)


def optimiser_step(model: torch.nn.Module, optimizer, scaler: torch.amp.GradScaler, grad_clip: float | None,
                   loss_finite: bool, norm: tuple[torch.Tensor, float] | None = None) -> tuple[bool, float]:
    """The update both training loops share: skip on a non-finite loss; else unscale, clip to ``grad_clip`` (None:
    no clipping, the norm is still measured), step and update the scaler. Returns (skipped, grad norm).

    ``norm``: the gradients' norm already measured (``grad_norm``: the tensor and its value, read in the step's one
    host sync); only without a loss scaler, whose unscaling comes first. Clipping with it is clip_grad_norm_'s own
    arithmetic (its norm, then its scaling), so the bits are those of measuring here."""
    norm_value = float("nan")
    skipped = not loss_finite
    if not skipped:
        scale_before = scaler.get_scale()
        scaler.unscale_(optimizer)
        params = [p for p in model.parameters() if p.requires_grad]
        if norm is None or scaler.is_enabled():
            total = grad_norm(model)
            norm_value = float(total)
        else:
            total, norm_value = norm
        if grad_clip is not None:
            torch.nn.utils.clip_grads_with_norm_(params, grad_clip, total)
        if scaler.is_enabled():
            scaler.step(optimizer)
            scaler.update()
            skipped = scaler.get_scale() < scale_before  # an fp16 overflow: the scaler skipped the step
        elif math.isfinite(norm_value):
            optimizer.step()
        else:
            skipped = True
    optimizer.zero_grad(set_to_none=True)
    return skipped, norm_value


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema = decay * ema + (1 - decay) * model for parameters (one multi-tensor lerp); buffers copied."""
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


@dataclass
class NonFiniteGuard:
    """Counts skipped steps; too many in a row stops the run."""

    limit: int = 10
    in_a_row: int = 0
    total: int = 0

    def record(self, finite: bool) -> bool:
        """Register one step; returns True when the run must stop."""
        if finite:
            self.in_a_row = 0
            return False
        self.in_a_row += 1
        self.total += 1
        return self.in_a_row >= self.limit
