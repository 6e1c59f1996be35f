"""Throughput a user can act on: images/s, the model's TFLOP/s and, on a GPU whose peak is known, MFU.

FLOPs here are hardware FLOPs (a multiply-add is 2), the unit of GPU datasheets; the GFLOPs that `train --dry-run`
prints follow the DiT paper (a multiply-add is 1). A training step costs about three forward passes (the backward
pass two). Only the diffusion transformer is counted: the frozen VAE posterior sample and the VFM/compressor
forward that REGLUE adds are not, so the MFU shown is a lower bound of what the GPU does.
"""

from __future__ import annotations

import time

from reglue.models.flops import forward_gflops

FORWARDS_PER_TRAINING_STEP = 3  # forward + backward (about twice the forward)
FLOPS_PER_MAC = 2

# Dense tensor-core peaks per GPU in TFLOP/s (vendor datasheets, no sparsity): (bf16/fp16, tf32). The first name
# contained in torch.cuda.get_device_name() wins, so the PCIe variants come before their SXM names.
PEAK_TFLOPS = (
    ("H100 PCIe", (756.0, 378.0)),
    ("H100", (989.4, 494.7)),
    ("H200", (989.4, 494.7)),
    ("GH200", (989.4, 494.7)),
    ("A100", (312.0, 156.0)),
    ("L40S", (362.1, 183.0)),
    ("A10G", (70.0, 35.0)),
    ("RTX 4090", (165.2, 82.6)),
    ("V100", (125.0, None)),  # no TF32 (Volta)
)


def peak_tflops(device_name: str, precision: str, tf32: bool) -> float | None:
    """The datasheet peak for training in ``precision`` (bf16/fp16, or fp32 with TF32 on), None when unknown."""
    for name, (half, tf32_peak) in PEAK_TFLOPS:
        if name in device_name:
            if precision in ("bf16", "fp16"):
                return half
            return tf32_peak if tf32 else None
    return None


def training_figures(images_per_s: float, forward_gflops: float, peak: float | None) -> dict:
    """images/s, the transformer's TFLOP/s and, with a known ``peak``, its model FLOPs utilisation."""
    tflops = images_per_s * forward_gflops * FLOPS_PER_MAC * FORWARDS_PER_TRAINING_STEP / 1e3
    figures = {"images_per_s": images_per_s, "tflops_per_s": tflops}
    if peak:
        figures["mfu"] = tflops / peak
    return figures


class Speedometer:
    """Images trained since this launch began, as ``training_figures`` (wall time: data, checkpoints and
    evaluations included)."""

    def __init__(self, forward_gflops: float, peak: float | None):
        self.forward_gflops, self.peak = forward_gflops, peak
        self.started, self.images = time.time(), 0

    def add(self, images: int) -> dict:
        """Count ``images`` more; the figures so far."""
        self.images += images
        rate = self.images / max(time.time() - self.started, 1e-9)
        return training_figures(rate, self.forward_gflops, self.peak)


def speedometer(config, device) -> Speedometer:
    """A Speedometer for a diffusion run on ``device`` (the peak looked up by the GPU's name)."""
    import torch


    peak = None
    if device.type == "cuda":
        peak = peak_tflops(torch.cuda.get_device_name(device), config.train.precision, config.train.tf32)
    return Speedometer(forward_gflops(config), peak)
