"""The demo. (1) Its stand-in pipeline (the toy VAE trained by scripts/toy_vae.py, the demo-sit preset) at the demo's
default steps learns the toy classes: an independent classifier, a small CNN trained here on freshly drawn toy
images, finds most samples of every conditioned class to be of that class, and the stand-in FID (a random-weight
Inception's features, the distance computed here in float64 SciPy) falls from the first checkpoint to the last.
(2) scripts/demo.sh end to end at a small size, twice: the rerun reuses every stage and prints the same numbers."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import toy_images

from evaluation.inception import InceptionFeatures, random_weights_file
from reglue_cli.main import main

REPO = Path(__file__).resolve().parents[1]
SIDE = 64  # the demo's image side


def _as_input(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def _toy_classifier(steps: int = 300) -> nn.Module:
    """A small CNN trained on 500 fresh toy images, blurred at random (the samples are decoded by a small
    autoencoder, so they are soft); about 99% accurate on held-out toy images."""
    torch.manual_seed(0)
    images, labels = toy_images(50, seed=100)
    x, y = _as_input(images), torch.from_numpy(labels)
    net = nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(),
                        nn.Linear(64, 10))
    optimizer = torch.optim.Adam(net.parameters(), 3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        rows = torch.randint(0, len(x), (64,), generator=gen)
        batch, radius = x[rows], int(torch.randint(0, 3, (1,), generator=gen))
        if radius:
            batch = F.avg_pool2d(batch, 2 * radius + 1, 1, radius, count_include_pad=False)
        loss = F.cross_entropy(net(batch), y[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return net.eval()


def _classify(net: nn.Module, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return net(_as_input(images)).argmax(1).numpy()


def _run(*argv) -> None:
    subprocess.run([sys.executable, *map(str, argv)], cwd=REPO, check=True, capture_output=True, text=True,
                   env={**os.environ, "HF_HUB_OFFLINE": "1"})


@pytest.fixture(scope="module")
def demo_sit(tmp_path_factory):
    """The demo's stand-in pipeline for demo-sit at its default steps: toy images (as the demo: 40 per class), the toy
    VAE at its default steps, encode, train, and 100 balanced samples of every checkpoint with the same seeds."""
    root = tmp_path_factory.mktemp("learns")
    _run("scripts/toy_dataset.py", root / "images", "--per-class", 40)
    _run("scripts/toy_vae.py", root / "images", root / "vae")
    scale = json.loads((root / "vae" / "config.json").read_text())["scaling_factor"]
    assert main(["encode", str(root / "images"), "--out", str(root / "data.h5"), "--resolution", "64", "--vae",
                 str(root / "vae"), "--workers", "0", "--quiet"]) == 0
    assert main(["train", "--preset", "demo-sit", "--data", str(root / "data.h5"), "--outdir", str(root / "run"),
                 "--workers", "0", "--quiet", "--set", f"data.vae={root / 'vae'}",
                 "--set", f"data.vae_decoder={root / 'vae'}", "--set", f"data.latent_scale={scale}"]) == 0
    samples = {}
    for ckpt in sorted((root / "run" / "checkpoints").glob("*.pt")):
        out = root / f"samples-{ckpt.stem}"
        assert main(["sample", "--ckpt", str(ckpt), "--out", str(out), "--n", "100", "--balanced", "--quiet"]) == 0
        with h5py.File(out / "samples.h5") as f:
            labels = f["labels"][:]
        samples[int(ckpt.stem)] = (out, np.load(out / "samples.npz")["arr_0"], labels)
    return root, samples


def test_the_demo_preset_samples_every_toy_class_by_an_independent_classifier(demo_sit):
    _, samples = demo_sit
    assert sorted(samples) == [500, 1000]  # the preset's defaults: 1,000 steps, a checkpoint every 500
    net = _toy_classifier()
    held_out, truth = toy_images(10, seed=7)
    assert (_classify(net, held_out) == truth).mean() >= 0.95  # the measure itself is sound
    _, images, labels = samples[1000]
    assert np.bincount(labels, minlength=10).tolist() == [10] * 10  # --balanced
    predicted = _classify(net, images)
    per_class = [float((predicted[labels == k] == k).mean()) for k in range(10)]
    assert min(per_class) > 0.5, per_class  # most samples of every conditioned class are that class
    assert (predicted == labels).mean() >= 0.8, per_class


def _frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """FID between two feature sets, in float64 SciPy as ADM's evaluator states it (real part of sqrtm)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    sigma_a, sigma_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(sigma_a @ sigma_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(sigma_a + sigma_b - 2 * root))


def test_the_stand_in_fid_falls_from_the_first_checkpoint_to_the_last(demo_sit):
    """The demo's stand-in FID (Inception with random weights, pool features) of the first 50 samples of each
    checkpoint (the same seeds and labels at both) against 50 fresh toy images."""
    _, samples = demo_sit
    extractor = InceptionFeatures(random_weights_file(), device="cpu")

    def pool(images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return np.concatenate([extractor(torch.from_numpy(images[i:i + 50]).permute(0, 3, 1, 2).contiguous())
                                   .pool.double().numpy() for i in range(0, len(images), 50)])

    reference = pool(toy_images(5, seed=11)[0])
    assert np.array_equal(samples[500][2], samples[1000][2])  # same seeds, same labels
    fids = {step: _frechet_distance(pool(images[:50]), reference) for step, (_, images, _) in samples.items()}
    assert fids[1000] < fids[500], fids


def test_demo_pipeline_runs_end_to_end_and_again(tmp_path):
    bindir = Path(sys.executable).parent
    if not (bindir / "reglue").exists():
        bindir = Path(shutil.which("reglue")).parent
    env = {**os.environ, "DEMO_OUT": str(tmp_path / "demo"), "DEMO_PER_CLASS": "3", "DEMO_STEPS": "4",
           "DEMO_SAMPLES": "10", "DEMO_STAND_IN_STEPS": "2", "PY": sys.executable, "REGLUE": str(bindir / "reglue"),
           "OMP_NUM_THREADS": "2", "REGLUE_FEATURE_CACHE": str(tmp_path / "cache")}
    first = subprocess.run(["bash", "scripts/demo.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    out = first.stdout
    for text in ("$ ", "scripts/toy_vae.py", "scripts/toy_vfm.py", "reglue encode",
                 "reglue train --preset compressor-tiny", "reglue train --preset demo-reglue",
                 "reglue train --preset demo-sit", "reglue sample", "reglue eval", "reglue compare", "FID"):
        assert text in out, text
    demo = tmp_path / "demo"
    assert (demo / "fid.png").stat().st_size > 0 and (demo / "grids.png").stat().st_size > 0
    for run in ("reglue", "sit"):
        for step in ("0000002", "0000004"):
            assert (demo / run / f"samples-{step}" / "grid.png").exists()
            assert (demo / run / "eval" / f"{step}.json").exists()
    second = subprocess.run(["bash", "scripts/demo.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "already complete" in second.stdout and "already trained" in second.stdout

    def table(text):
        return [line for line in text.splitlines() if line.startswith("*!")]  # our rows, scored with stand-ins

    assert table(second.stdout) == table(first.stdout) and len(table(first.stdout)) == 4
