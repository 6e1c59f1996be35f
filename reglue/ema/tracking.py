"""Power-function EMAs tracked during training, one per ``ema.sigma_rels`` entry (docs/ema.md).

After optimiser step t (counted from 1) each copy becomes beta_t * copy + (1 - beta_t) * weights with
beta_t = (1 - 1/t)^(gamma + 1) (reglue.ema.profiles.power_beta), so the copy at step t is exactly the power
profile of exponent gamma over the iterates 1..t. A step skipped as non-finite counts too (its iterate is the
previous one), so a snapshot's step always names its profile.
"""

from __future__ import annotations

import copy

import torch

from reglue.ema.profiles import gamma_of, power_beta
from reglue.training.state import update_ema


class PowerEMA:
    """Copies of a model's weights averaged with power-function profiles, one per ``sigma_rels`` entry."""

    def __init__(self, model: torch.nn.Module, sigma_rels: tuple[float, ...]):
        self.sigma_rels = tuple(float(s) for s in sigma_rels)
        self.gammas = tuple(gamma_of(s) for s in self.sigma_rels)
        self.copies = [copy.deepcopy(model).requires_grad_(False).eval() for _ in self.sigma_rels]

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        """Average in ``model``'s weights after optimiser step ``step`` (>= 1)."""
        for gamma, ema in zip(self.gammas, self.copies):
            update_ema(ema, model, power_beta(step, gamma))

    def state_dict(self) -> dict:
        """The profiles and every copy's weights (full precision: a resumed run continues them exactly)."""
        return {"sigma_rels": list(self.sigma_rels), "weights": [c.state_dict() for c in self.copies]}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a checkpoint's ``state_dict``; ValueError when it tracked other profiles."""
        if [float(s) for s in state["sigma_rels"]] != list(self.sigma_rels):
            raise ValueError(f"the checkpoint tracks power EMAs {state['sigma_rels']}, the run {list(self.sigma_rels)}")
        for ema, weights in zip(self.copies, state["weights"]):
            ema.load_state_dict(weights)
