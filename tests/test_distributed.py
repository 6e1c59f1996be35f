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
    assert (tmp_path / "result-0").read_text() == (tmp_path / "result-1").read_text() == "{'keys': ('a', 'b'), 'from': 0}"


def test_an_error_on_rank_zero_is_raised_on_every_rank(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path), True), nprocs=2, join=True)
    assert (tmp_path / "result-0").read_text() == (tmp_path / "result-1").read_text() == "raised bad source"


def test_a_single_process_just_calls_it():
    assert from_main(lambda: 7, DistInfo()) == 7
