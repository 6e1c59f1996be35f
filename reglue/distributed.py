"""torch.distributed set-up shared by every command: torchrun sets the environment, nothing else is needed."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

from evaluation.collectives import (
    DEFAULT_TIMEOUT_S,
    DistributedSetupError,
    collective_timeout,
    main_decides,
    main_phase,
    patient_barrier,
)

__all__ = ["DEFAULT_TIMEOUT_S", "DistInfo", "DistributedSetupError", "all_sum", "all_sum_tensor", "barrier",
           "collective_timeout", "device_problem", "from_main", "init_distributed", "main_decides", "main_phase",
           "patient_barrier", "pick_device", "shutdown"]

T = TypeVar("T")


def pick_device(spec: str | None, world: int, local_rank: int, cuda_available: bool) -> torch.device:
    """This process's device: ``spec`` as given in one process (cuda:1 is GPU 1), cuda:LOCAL_RANK under torchrun."""
    use_cuda = cuda_available if spec is None else spec.startswith("cuda")
    if not use_cuda:
        return torch.device(spec or "cpu")
    given = torch.device(spec or "cuda")
    if world > 1:
        if given.index is not None:
            raise DistributedSetupError(f"--device {spec}: under torchrun each process uses cuda:LOCAL_RANK; pass "
                                        "--device cuda (or CUDA_VISIBLE_DEVICES to choose the GPUs)")
        return torch.device(f"cuda:{local_rank}")
    return torch.device("cuda", given.index or 0)


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the process that prints and merges)."""
        return self.rank == 0


def init_distributed(device: str | None = None) -> DistInfo:
    """Join the torchrun job if there is one (NCCL on GPU, gloo on CPU); a single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, world, local_rank, torch.cuda.is_available())
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=collective_timeout())
    rank = dist.get_rank() if dist.is_initialized() else 0
    return DistInfo(rank=rank, world=world, local_rank=local_rank, device=dev)


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if dist.is_initialized():
        dist.barrier()


def all_sum(values: list[float]) -> list[float]:
    """Element-wise sum of small lists of numbers over ranks."""
    if not dist.is_initialized():
        return list(values)
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def all_sum_tensor(values: torch.Tensor) -> torch.Tensor:
    """Element-wise sum of a small tensor over ranks, on its own device (no host synchronisation)."""
    if dist.is_initialized():
        dist.all_reduce(values)
    return values


def from_main(make: Callable[[], T], info: DistInfo) -> T:
    """``make()`` run on rank 0 only, its result sent to every rank; an exception there is raised on every rank."""
    if info.world == 1 or not dist.is_initialized():
        return make()
    payload: list = [None]
    with main_phase("from-main"):  # e.g. indexing a million files: the others wait through gloo
        if info.is_main:
            try:
                payload = [(True, make())]
            except Exception as exc:  # noqa: BLE001 - re-raised on every rank below
                payload = [(False, exc)]
    dist.broadcast_object_list(payload, src=0)  # NCCL sends it through the current CUDA device
    ok, value = payload[0]
    if not ok:
        raise value
    return value


def shutdown() -> None:
    """Leave the process group if one was joined."""
    if dist.is_initialized():
        dist.destroy_process_group()


def device_problem(spec: str | None) -> str | None:
    """Why ``spec`` (cpu, cuda, cuda:1 ...) cannot be used on this machine, or None when it can."""
    if spec is None:
        return None
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        return f"{spec!r} is not a device; use cpu, cuda or cuda:N"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return f"{spec!r}: no CUDA GPU is visible here (torch.cuda.is_available() is False)"
        if device.index is not None and device.index >= torch.cuda.device_count():
            return f"{spec!r}: only {torch.cuda.device_count()} CUDA device(s) are visible"
    elif device.type != "cpu":
        return f"{spec!r}: this build of reglue runs on cpu or cuda"
    return None
