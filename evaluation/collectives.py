"""Waiting for other ranks without tripping the process group's timeout, shared by evaluation and reglue.

A collective (NCCL's all-reduce, a barrier) fails when one rank arrives more than the process group's timeout
after the others: NCCL's default is 10 minutes, less than rank 0 needs to merge the parts of an ImageNet
encode or write an XL checkpoint. Phases where rank 0 works alone (``main_phase``), and shares of work that may
finish far apart (``patient_barrier``), therefore wait in a gloo group of their own with a long timeout; the
process group's own timeout is a setting (``collective_timeout``).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import time
from typing import Iterator

import torch.distributed as dist

from evaluation.errors import InputError

# How long a collective may wait for the slowest rank before the job fails (NCCL's own default is 10 minutes).
TIMEOUT_ENV = "REGLUE_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800
# How long the other ranks wait while rank 0 alone does a long phase: through gloo, never through NCCL.
MAIN_PHASE_WAIT_ENV = "REGLUE_MAIN_PHASE_WAIT"
DEFAULT_MAIN_PHASE_WAIT_S = 24 * 3600
# Tests: 'NAME:SECONDS[,NAME:SECONDS]' makes rank 0 sleep inside those phases (longer than a short timeout).
SLOW_MAIN_PHASE_ENV = "REGLUE_SLOW_MAIN_PHASE"
PHASES = ("encode-merge", "sample-merge", "checkpoint", "ema-snapshot", "probe", "pca", "from-main",
          "evaluate-metrics", "reference-cache")


class DistributedSetupError(InputError, ValueError):
    """A device or timeout setting that cannot work in this job."""


def seconds_setting(env: str, default: int) -> datetime.timedelta:
    """``$env`` seconds (default ``default``) as a timedelta; DistributedSetupError when it is not a sane number."""
    text = os.environ.get(env)
    try:
        seconds = default if text in (None, "") else float(text)
    except ValueError:
        raise DistributedSetupError(f"${env}={text!r}: expected a number of seconds") from None
    if not 0 < seconds < 10**7:
        raise DistributedSetupError(f"${env}={text}: expected seconds between 0 and 10,000,000")
    return datetime.timedelta(seconds=seconds)


def collective_timeout() -> datetime.timedelta:
    """The process group's timeout: ${REGLUE_DIST_TIMEOUT} seconds, default 30 minutes."""
    return seconds_setting(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)


_PHASE_GROUPS: dict = {}  # default process group -> its gloo group for main phases


def _phase_group():
    """The gloo group (long timeout) the other ranks wait in; made on first use, in the same order on every rank."""
    key = id(dist.group.WORLD)
    if key not in _PHASE_GROUPS:
        _PHASE_GROUPS[key] = dist.new_group(backend="gloo",
                                            timeout=seconds_setting(MAIN_PHASE_WAIT_ENV, DEFAULT_MAIN_PHASE_WAIT_S))
    return _PHASE_GROUPS[key]


def patient_barrier() -> None:
    """Every rank waits here for the others through the gloo phase group (long timeout): after rank 0's long work
    alone, or after shares of work that may finish far apart. A no-op in one process."""
    if dist.is_initialized():
        dist.barrier(group=_phase_group())


@contextlib.contextmanager
def main_phase(name: str) -> Iterator[bool]:
    """``with main_phase("sample-merge") as is_main:`` the body runs on every rank and is told whether it is rank 0
    of the process group (callers with their own notion of rank 0, e.g. a DistInfo, test that instead), which does
    the work; then every rank waits in ``patient_barrier``, not on an NCCL collective (PHASES names the phases)."""
    is_main = not dist.is_initialized() or dist.get_rank() == 0
    try:
        yield is_main
        if is_main:
            _slow_down_for_tests(name)
    finally:  # an error on rank 0 still releases the others (it is then raised on rank 0 alone)
        patient_barrier()


def _slow_down_for_tests(name: str) -> None:
    for item in filter(None, os.environ.get(SLOW_MAIN_PHASE_ENV, "").split(",")):
        phase, _, seconds = item.partition(":")
        if phase == name and seconds:
            time.sleep(float(seconds))


def main_decides(value):
    """Rank 0's ``value`` on every rank (a cache present, files to delete): decisions that must agree."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    payload = [value]
    dist.broadcast_object_list(payload, src=0)
    return payload[0]
