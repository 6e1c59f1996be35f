"""evaluation.determinism.side_by_side: threads on a CPU only. On a GPU two threads loading a lazily loaded CUDA
library at once fail ("lazy wrapper should be called at most once", seen on an H200 with FID and sFID's eigh)."""

import threading

import torch

from evaluation.determinism import side_by_side


def _recording(log):
    return [lambda i=i: log.append(threading.get_ident()) or i * i for i in range(3)]


def test_on_a_gpu_every_call_runs_in_the_callers_thread_in_order():
    log = []
    assert side_by_side(*_recording(log), device=torch.device("cuda")) == [0, 1, 4]
    assert log == [threading.get_ident()] * 3
    log.clear()
    assert side_by_side(*_recording(log), device="cuda:1", workers=3) == [0, 1, 4]  # workers ignored on a GPU
    assert log == [threading.get_ident()] * 3


def test_on_a_cpu_calls_run_in_pool_threads_each_on_one_thread_and_the_callers_count_is_kept():
    log, threads = [], []
    calls = [lambda i=i: threads.append(torch.get_num_threads()) or log.append(threading.get_ident()) or i
             for i in range(2)]
    saved = torch.get_num_threads()
    assert side_by_side(*calls, device="cpu") == [0, 1]
    assert threading.get_ident() not in log and threads == [1, 1]
    assert torch.get_num_threads() == saved
