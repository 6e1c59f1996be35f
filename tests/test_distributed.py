"""`from_main`: work done once on rank 0 and shared, errors raised on every rank (two gloo processes)."""

import os

import torch.distributed as dist
import torch.multiprocessing as mp

from reglue.distributed import DistInfo, from_main


def _worker(rank: int, root: str, fail: bool) -> None:
    dist.init_process_group("gloo", init_method=f"file://{root}/store", rank=rank, world_size=2)
    info = DistInfo(rank=rank, world=2)

    def make():
        open(os.path.join(root, f"made-by-{rank}"), "w").close()
        if fail:
            raise ValueError("bad source")
        return {"keys": ("a", "b"), "from": rank}

    try:
        result = repr(from_main(make, info))
    except ValueError as exc:
        result = f"raised {exc}"
    with open(os.path.join(root, f"result-{rank}"), "w") as f:
        f.write(result)
    dist.destroy_process_group()


def test_rank_zero_makes_it_once_and_every_rank_gets_it(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path), False), nprocs=2, join=True)
    assert sorted(p.name for p in tmp_path.glob("made-by-*")) == ["made-by-0"]
    expected = "{'keys': ('a', 'b'), 'from': 0}"
    assert (tmp_path / "result-0").read_text() == (tmp_path / "result-1").read_text() == expected


def test_an_error_on_rank_zero_is_raised_on_every_rank(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path), True), nprocs=2, join=True)
    assert (tmp_path / "result-0").read_text() == (tmp_path / "result-1").read_text() == "raised bad source"


def test_a_single_process_just_calls_it():
    assert from_main(lambda: 7, DistInfo()) == 7


# --- long rank-0 phases and the process-group timeout ---------------------------------------------------------

def _phase_worker(rank: int, root: str, through_phase: bool) -> None:
    import datetime
    import time

    from reglue.distributed import all_sum, main_phase

    os.environ["REGLUE_SLOW_MAIN_PHASE"] = "merge:4"  # rank 0 works 4 s alone, twice the 2 s collective timeout
    dist.init_process_group("gloo", init_method=f"file://{root}/store", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=2))
    try:
        if through_phase:
            with main_phase("merge") as is_main:
                if is_main:
                    open(os.path.join(root, "merged"), "w").close()
        else:  # what a rank-0 phase between two plain barriers does
            if rank == 0:
                time.sleep(4)
            dist.barrier()
        result = f"ok {all_sum([1.0])[0]:g}"
    except RuntimeError as exc:
        result = f"failed {type(exc).__name__}"
    with open(os.path.join(root, f"result-{rank}"), "w") as f:
        f.write(result)
    if through_phase:
        dist.destroy_process_group()
    else:
        os._exit(0)  # a timed-out gloo group cannot be torn down cleanly


def test_a_rank_zero_phase_longer_than_the_collective_timeout_does_not_fail_the_job(tmp_path):
    mp.spawn(_phase_worker, args=(str(tmp_path), True), nprocs=2, join=True)
    assert (tmp_path / "merged").exists()
    assert (tmp_path / "result-0").read_text() == (tmp_path / "result-1").read_text() == "ok 2"


def test_the_same_wait_on_a_plain_barrier_times_out(tmp_path):
    """The control: without the phase group the waiting rank hits the 2 s timeout (the failure the phase avoids)."""
    mp.spawn(_phase_worker, args=(str(tmp_path), False), nprocs=2, join=False).join(timeout=60)
    assert (tmp_path / "result-1").read_text().startswith("failed")


def test_the_device_is_the_one_asked_for_in_one_process_and_the_local_rank_under_torchrun():
    import pytest
    import torch

    from reglue.distributed import DistributedSetupError, pick_device

    assert pick_device("cuda:1", 1, 0, True) == torch.device("cuda:1")
    assert pick_device(None, 1, 0, True) == torch.device("cuda:0")
    assert pick_device("cuda", 8, 5, True) == torch.device("cuda:5")
    assert pick_device(None, 1, 0, False) == torch.device("cpu")
    with pytest.raises(DistributedSetupError, match="LOCAL_RANK"):
        pick_device("cuda:1", 8, 5, True)


def test_the_collective_timeout_is_a_setting(monkeypatch):
    import pytest

    from reglue.distributed import DEFAULT_TIMEOUT_S, DistributedSetupError, collective_timeout

    assert collective_timeout().total_seconds() == DEFAULT_TIMEOUT_S
    monkeypatch.setenv("REGLUE_DIST_TIMEOUT", "7200")
    assert collective_timeout().total_seconds() == 7200
    monkeypatch.setenv("REGLUE_DIST_TIMEOUT", "ten")
    with pytest.raises(DistributedSetupError, match="REGLUE_DIST_TIMEOUT"):
        collective_timeout()


def test_dist_timeout_is_a_flag_of_every_command(monkeypatch, capsys):
    from evaluation.collectives import collective_timeout
    from reglue_cli.main import main

    monkeypatch.setenv("REGLUE_DIST_TIMEOUT", "1800")  # restored (to unset) after the test
    assert main(["--dist-timeout", "5400", "train", "--preset", "tiny-sit", "--dry-run"]) == 0
    assert collective_timeout().total_seconds() == 5400
    assert main(["--dist-timeout", "0", "train", "--preset", "tiny-sit", "--dry-run"]) == 2
    assert "--dist-timeout" in capsys.readouterr().err


def _cache_worker(rank: int, root: str, ref: str, weights: str) -> None:
    import datetime
    from pathlib import Path

    from evaluation.evaluate import EvalOptions, reference_features
    from evaluation.images import file_sha256
    from evaluation.inception import InceptionFeatures

    dist.init_process_group("gloo", init_method=f"file://{root}/store", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=20))
    options = EvalOptions(progress=False, cache_dir=f"{root}/cache{rank}", feature_chunk=4)  # rank 1: no cache
    try:
        pool, _, origin = reference_features(Path(ref), file_sha256(ref), InceptionFeatures(weights), options)
        result = f"{'features' if pool is not None else 'none'} {origin}"
    except RuntimeError as exc:
        result = f"failed {type(exc).__name__}"
    with open(os.path.join(root, f"result-{rank}"), "w") as f:
        f.write(result)
    dist.destroy_process_group()


def test_rank_zero_decides_whether_the_reference_cache_exists(tmp_path):
    """Nodes without a shared home: rank 0 has the reference-feature cache, rank 1 has none. Rank 1 follows rank 0
    (only rank 0 reads it) instead of starting an extraction whose collectives rank 0 never joins."""
    from pathlib import Path

    import numpy as np
    from conftest import random_reference

    from evaluation.evaluate import EvalOptions, reference_features
    from evaluation.images import file_sha256
    from evaluation.inception import InceptionFeatures, random_weights_file

    ref, weights = str(random_reference(tmp_path / "ref.npz", 6, side=32)), random_weights_file()
    options = EvalOptions(progress=False, cache_dir=str(tmp_path / "cache0"), feature_chunk=4)
    first = reference_features(Path(ref), file_sha256(ref), InceptionFeatures(weights), options)[0]  # fills cache0
    assert np.asarray(first).shape == (6, 2048)
    mp.spawn(_cache_worker, args=(str(tmp_path), ref, weights), nprocs=2, join=True)
    assert (tmp_path / "result-0").read_text().startswith("features")
    assert (tmp_path / "result-1").read_text() == "none cached on rank 0"
    assert not (tmp_path / "cache1").exists()
