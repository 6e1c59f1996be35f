"""Autoguidance (--guide-ckpt): a guide equal to the model gives exactly the unguided samples, another guide follows
an independent float64 replay of v_g + w (v - v_g), the images do not depend on the batch size or the process
count, the guide is recorded, and a guide of another shape is refused in one line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import randomize_
from helpers import assert_one_line, reglue

from reglue import checkpoints, presets
from reglue.models import build
from reglue.sampling.run import SampleSettings, integrate
from reglue.sampling.seeds import SampleNoise, sample_seed
from reglue.transport.path import get_path
from reglue.transport.samplers import Guidance
from reglue_cli.main import main

REPO = Path(__file__).resolve().parents[1]
ARGS = ["--num-samples", "5", "--steps", "3", "--vae", "tiny", "--quiet", "--chunk", "2", "--interval", "0,1"]


def _save(path, preset, seed, **overrides):
    config = presets.load(preset, **overrides)
    torch.manual_seed(0)
    model = randomize_(build(config), seed=seed, scale=0.05)
    checkpoints.save_checkpoint(path, config=config, step=int(path.stem), model=model, ema=model)
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run directory with two checkpoints of tiny-reglue (steps 2 and 5, other weights) and a smaller guide."""
    root = tmp_path_factory.mktemp("ag") / "run" / "checkpoints"
    root.mkdir(parents=True)
    _save(root / "0000002.pt", "tiny-reglue", seed=7)
    _save(root / "0000005.pt", "tiny-reglue", seed=3)
    _save(root.parent / "0000009.pt", "tiny-reglue", seed=5, model__depth=1, model__projector=None)  # smaller guide
    _save(root.parent / "0000001.pt", "tiny-sit", seed=1)  # another state: 4 channels, no [CLS]
    return root


def _images(out):
    with h5py.File(Path(out) / "samples.h5") as f:
        return f["images"][...], dict(f.attrs)


def test_a_guide_equal_to_the_model_gives_exactly_the_unguided_samples(run, tmp_path):
    ckpt = str(run / "0000005.pt")
    assert main(["sample", "--ckpt", ckpt, *ARGS, "--cfg", "1", "--out", str(tmp_path / "plain")]) == 0
    assert main(["sample", "--ckpt", ckpt, *ARGS, "--cfg", "3", "--guide-ckpt", "5", "--out",
                 str(tmp_path / "self")]) == 0
    (plain, _), (self_guided, attrs) = _images(tmp_path / "plain"), _images(tmp_path / "self")
    assert np.array_equal(plain, self_guided)
    settings = json.loads(attrs["settings"])
    assert settings["guide"] == ckpt and settings["guide_weights"] == "ema" and attrs["guide_sha256"]
    assert attrs["nfe"] == 2 * 3  # two models at every step inside the interval


def test_another_guide_follows_a_float64_replay_of_the_guided_update(run):
    (model, _), (guide, _) = checkpoints.load_model(run / "0000005.pt"), checkpoints.load_model(
        run / "0000002.pt")
    settings = SampleSettings(n=2, sampler="ode-euler", steps=3, guidance=Guidance(scale=2.5, interval=(0.0, 1.0)),
                              guide=str(run / "0000002.pt"))
    seeds, labels = [sample_seed(0, i) for i in range(2)], torch.tensor([1, 7])
    x_ours, cls_ours = integrate(model, settings, seeds, labels, "cpu", get_path("linear"), guide)

    cfg = model.config
    x, cls = SampleNoise(seeds, (cfg.in_channels, cfg.input_size, cfg.input_size), cfg.cls_dim, "cpu").initial()
    x, cls = x.double(), cls.double()
    grid = settings.grid().tolist()
    for t, t_next in zip(grid, grid[1:]):  # the update written out: v_g + w (v - v_g), an Euler step
        time = torch.full((2,), t)
        with torch.no_grad():
            out, out_g = (m(x.float(), time, labels, cls=cls.float()) for m in (model, guide))
        v = out_g.velocity.double() + 2.5 * (out.velocity.double() - out_g.velocity.double())
        v_cls = out_g.cls_velocity.double() + 2.5 * (out.cls_velocity.double() - out_g.cls_velocity.double())
        x, cls = x + (t_next - t) * v, cls + (t_next - t) * v_cls
    torch.testing.assert_close(x_ours, x, rtol=0, atol=1e-12)
    torch.testing.assert_close(cls_ours, cls, rtol=0, atol=1e-12)


def test_images_do_not_depend_on_the_batch_size_or_the_process_count_and_a_smaller_guide_works(run, tmp_path):
    ckpt, guide = str(run / "0000005.pt"), str(run.parent / "0000009.pt")
    guided = [*ARGS, "--cfg", "2", "--guide-ckpt", guide, "--sampler", "ode-heun"]
    assert main(["sample", "--ckpt", ckpt, *guided, "--batch-size", "1", "--out", str(tmp_path / "b1")]) == 0
    assert main(["sample", "--ckpt", ckpt, *guided, "--batch-size", "4", "--out", str(tmp_path / "b4")]) == 0
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29563", "-m", "reglue_cli", "sample", "--ckpt", ckpt, *guided, "--out",
                          str(tmp_path / "two")], cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    (b1, _), (b4, _), (b2p, _) = (_images(tmp_path / d) for d in ("b1", "b4", "two"))
    assert np.array_equal(b1, b4) and np.array_equal(b1, b2p)
    assert main(["sample", "--ckpt", ckpt, *ARGS, "--cfg", "2", "--sampler", "ode-heun", "--out",
                 str(tmp_path / "cfg")]) == 0
    assert not np.array_equal(b1, _images(tmp_path / "cfg")[0])  # guided by the guide, not the null class


def test_a_guide_of_another_shape_or_missing_is_one_line(run, tmp_path):
    ckpt = run / "0000005.pt"
    base = ["sample", "--ckpt", ckpt, *ARGS, "--cfg", "2", "--out", tmp_path / "o"]
    assert_one_line(reglue(*base, "--guide-ckpt", run.parent / "0000001.pt"), "--guide-ckpt", "in_channels is 4",
                    "must denoise the same state")
    assert_one_line(reglue(*base, "--guide-ckpt", "77"), "0000077.pt", "no such file")
    assert_one_line(reglue(*base, "--guide-weights", "model"), "--guide-weights goes with --guide-ckpt")
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").glob("*.npz"))


def test_a_sweep_crosses_guides_with_the_scales(run, tmp_path):
    from conftest import random_reference

    ref, out = random_reference(tmp_path / "ref.npz", 6), tmp_path / "sweep"
    assert main(["sweep", "--ckpt", str(run / "0000005.pt"), "--guide-ckpt", f"2,{run.parent / '0000009.pt'}",
                 "--cfg", "2", "--n", "4", "--steps", "2", "--chunk", "2", "--vae", "tiny", "--ref", str(ref),
                 "--inception-weights", "random", "--feature-chunk", "4", "--out", str(out), "--quiet"]) == 0
    table = (out / "sweep.txt").read_text().splitlines()
    assert table[0].split()[0] == "guide" and [line.split()[0] for line in table[1:]] == [
        "2", str(run.parent / "0000009.pt")]
    points = sorted((out / "points").glob("guide*.json"))
    guides = {json.loads(p.read_text())["identity"]["sampling"]["settings"]["guide"] for p in points}
    assert guides == {str(run / "0000002.pt"), str(run.parent / "0000009.pt")}
    assert "guide" not in json.loads((out / "sweep.json").read_text())["identity"]["sampling"]["settings"]
