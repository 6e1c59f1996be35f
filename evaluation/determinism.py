"""The determinism rules of the project in one module (docs/architecture.md): fixed kernels and threads, calls run side
by side without changing a bit, and the float32 precision of sampling and scoring.

Every network call of sampling and scoring sees a fixed shape (chunks; reglue.sampling.run, evaluation.extract);
these helpers fix the rest: cuDNN's algorithm choice, the CPU thread count each call runs on, and TF32.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import torch


@contextlib.contextmanager
def deterministic_kernels(device: torch.device):
    """No cuDNN autotuning and deterministic cuDNN algorithms; on a CPU one intra-op thread. Restored after."""
    cudnn = torch.backends.cudnn
    saved = cudnn.benchmark, cudnn.deterministic, torch.get_num_threads()
    cudnn.benchmark, cudnn.deterministic = False, True
    if torch.device(device).type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        cudnn.benchmark, cudnn.deterministic = saved[:2]
        torch.set_num_threads(saved[2])


def side_by_side(*calls, device, workers: int | None = None):
    """The results of ``calls`` (functions of no argument). On a CPU they run in ``workers`` parallel threads
    (default: one per call), each on one intra-op thread: the same bits as one after the other on one thread, in
    less time with several cores. On a GPU always one after the other in the caller's thread: its calls stay on
    the thread that set its device, and CUDA's lazily loaded libraries (torch.linalg's cuSOLVER) must not be
    loaded by two threads at once (torch refuses: "lazy wrapper should be called at most once")."""
    def single(call):
        torch.set_num_threads(1)  # per OS thread: a pool thread starts with the process default
        return call()

    if torch.device(device).type != "cpu" or (workers or len(calls)) <= 1:
        saved = torch.get_num_threads()
        try:
            return [single(call) for call in calls]
        finally:
            torch.set_num_threads(saved)
    with ThreadPoolExecutor(workers or len(calls)) as pool:
        return list(pool.map(single, calls))


@contextlib.contextmanager
def float32_matmuls(tf32: bool) -> Iterator[None]:
    """Inside: float32 matmuls and convolutions on a GPU in TF32 (``tf32``) or strict IEEE fp32, whatever the
    process set before (a training process turns TF32 on for its steps); restored afterwards. The one place the
    project sets these flags outside training, through torch's legacy switches only (mixing them with the newer
    ``fp32_precision`` switches is an error in torch)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
