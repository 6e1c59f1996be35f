"""One float32 precision policy: sampling (reglue sample, the in-process evaluator, the training grids) runs in the
precision its settings name, strict fp32 by default, whatever a training process switched on for its own steps
(train.tf32). On a CPU the switches change no arithmetic, so these tests read the switches the model sees."""

import json

import pytest
import torch

from evaluation.determinism import float32_matmuls
from reglue import presets
from reglue.encoders.vae import load_vae
from reglue.models import build
from reglue.sampling.grid import save_sample_grid
from reglue.sampling.run import SampleRequest, sample_chunk
from reglue.transport.path import get_path


@pytest.fixture
def training_tf32():
    """What `reglue train` does on a GPU when train.tf32 is true: the process-wide legacy switches on."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def spying_model():
    """A tiny model that records the TF32 switches in force at every forward call."""
    model = build(presets.load("tiny-sit")).eval()
    seen = []
    forward = model.forward

    def spy(*args, **kwargs):
        seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
        return forward(*args, **kwargs)

    model.forward = spy
    return model, seen


@pytest.mark.parametrize("tf32", [False, True])
def test_a_sample_chunk_runs_in_the_precision_of_its_settings_whatever_training_set(tf32, training_tf32):
    model, seen = spying_model()
    settings = SampleRequest(n=2, steps=2, tf32=tf32).resolve(presets.load("tiny-sit").sampling)[0]
    with torch.no_grad():
        sample_chunk(model, load_vae("tiny")[0], settings, range(2), torch.zeros(2, dtype=torch.long), "cpu",
                     get_path("linear"), 0.18215)
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32  # restored after
    assert seen and set(seen) == {(tf32, tf32)}


def test_the_training_grid_samples_in_strict_fp32_under_training_tf32(tmp_path, training_tf32):
    model, seen = spying_model()
    config = presets.load("tiny-sit")
    save_sample_grid(model, load_vae("tiny")[0], tmp_path / "grid.png", config.sampling, 0.18215, count=2)
    assert seen and set(seen) == {(False, False)}


def test_tf32_is_recorded_only_when_asked_for_so_earlier_runs_keep_their_ids():
    sampling = presets.load("tiny-sit").sampling
    strict = SampleRequest(n=4).resolve(sampling)[0].describe()
    fast = SampleRequest(n=4, tf32=True).resolve(sampling)[0].describe()
    assert "tf32" not in strict and fast["tf32"] is True
    assert {k: v for k, v in fast.items() if k != "tf32"} == strict


def test_the_switches_are_restored_after_an_error(training_tf32):
    with pytest.raises(RuntimeError):
        with float32_matmuls(False):
            assert not torch.backends.cuda.matmul.allow_tf32
            raise RuntimeError("boom")
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32  # as training left them


def test_samples_record_the_switches_in_force_while_they_are_made(random_reglue_checkpoint, training_tf32):
    from reglue.sampling.run import prepare

    attrs = prepare(random_reglue_checkpoint, SampleRequest(n=2), "cpu").attrs
    env = json.loads(attrs["environment"])
    assert env["torch"] == str(torch.__version__) and env["device_type"] == "cpu"
    assert env["matmul_allow_tf32"] is False and env["cudnn_allow_tf32"] is False  # strict, as sampled


def test_the_eval_json_records_its_environment_and_the_samples_one(tmp_path):
    import h5py
    import numpy as np

    from evaluation.evaluate import EvalOptions, evaluate

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "samples.npz", arr_0=rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8))
    np.savez(tmp_path / "ref.npz", arr_0=rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8))
    recorded = {"torch": "9.9", "device_name": "NVIDIA H200", "matmul_allow_tf32": False}
    with h5py.File(tmp_path / "samples.h5", "w") as f:  # what `reglue sample` writes beside samples.npz
        f.attrs["environment"] = json.dumps(recorded)
    result = evaluate(str(tmp_path / "samples.npz"), str(tmp_path / "ref.npz"), "random",
                      EvalOptions(progress=False, cache_dir=str(tmp_path / "cache")))
    assert result["environment"]["torch"] == str(torch.__version__)
    assert result["sample_info"]["environment"] == recorded
