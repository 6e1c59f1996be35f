"""Transport: interpolant paths, time sampling and the joint loss (samplers live beside them)."""

from reglue.transport.loss import JointLoss, LossTerms, LossWeights, mean_flat, repa_loss, select_aligned_tokens
from reglue.transport.path import CosinePath, LinearPath, Path, get_path
from reglue.transport.timesteps import TIME_SAMPLERS, sample_time

__all__ = [
    "CosinePath", "JointLoss", "LinearPath", "LossTerms", "LossWeights", "Path", "TIME_SAMPLERS",
    "get_path", "mean_flat", "repa_loss", "sample_time", "select_aligned_tokens",
]
