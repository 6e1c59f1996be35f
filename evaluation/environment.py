"""The environment that decides a result's last bits, recorded in every output that carries numbers.

Bit-identity holds for the same settings on the same device model and software (torch, CUDA, cuDNN); another
GPU model or library version may pick other kernels and move the last bits. This record says which held.
"""

from __future__ import annotations

import platform

import numpy as np
import torch


def precision_flags() -> dict:
    """The process-wide switches that change float32 arithmetic on a GPU (TF32) and the CPU thread count."""
    return {"matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
            "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
            "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
            "cpu_threads": torch.get_num_threads()}


def environment(device=None) -> dict:
    """torch / CUDA / cuDNN / NumPy / Python versions, the device's name and count, and the precision flags."""
    device = torch.device(device or "cpu")
    cuda = device.type == "cuda" and torch.cuda.is_available()
    return {"torch": str(torch.__version__), "cuda": torch.version.cuda if cuda else None,
            "cudnn": torch.backends.cudnn.version() if cuda else None, "numpy": np.__version__,
            "python": platform.python_version(), "device_type": device.type,
            "device_name": torch.cuda.get_device_name(device) if cuda else (platform.processor() or platform.machine()),
            "device_count": torch.cuda.device_count() if cuda else 1, **precision_flags()}
