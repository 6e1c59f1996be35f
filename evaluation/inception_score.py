"""The Inception Score as ADM computes it: softmax over the 1008 bias-free logits, consecutive splits, mean."""

from __future__ import annotations

import numpy as np
import torch

IS_SPLIT = 5000


def inception_score(logits: np.ndarray | torch.Tensor, split_size: int = IS_SPLIT) -> tuple[float, int]:
    """(mean IS over consecutive splits of ``split_size``, number of splits); the last split may be shorter."""
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    scores = []
    for start in range(0, logits.shape[0], split_size):
        p = torch.softmax(logits[start : start + split_size], dim=1)
        marginal = p.mean(dim=0, keepdim=True)
        # p log p - p log marginal, with 0 log 0 = 0 (equal to ADM's formula whenever no probability underflows)
        kl = (torch.special.xlogy(p, p) - torch.special.xlogy(p, marginal)).sum(dim=1).mean()
        scores.append(float(torch.exp(kl)))
    return float(np.mean(scores)), len(scores)
