"""Shared fixtures: tiny model configs, the random-weights Inception stand-in; no network (hub libraries fail fast
offline). Plain helper functions the test files share are in helpers.py."""

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("REGLUE_FEATURE_CACHE", tempfile.mkdtemp(prefix="reglue-features-"))  # not the user's cache
os.environ.setdefault("TORCH_HOME", tempfile.mkdtemp(prefix="reglue-torch-home-"))  # stand-in weights go here

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import make_folder  # noqa: E402

from evaluation.inception import random_weights_file  # noqa: E402
from reglue.models import ModelConfig, ProjectorConfig  # noqa: E402


def tiny_config(**changes) -> ModelConfig:
    """A 2-block, 32-wide SiT with every optional part switched on (override with keywords)."""
    base = dict(
        depth=2, hidden_size=32, num_heads=2, input_size=8, semantic_channels=4, semantic_source="compressor",
        cls_token=True, cls_dim=16, projector=ProjectorConfig(depth=1, hidden_dim=24, out_dim=16),
    )
    base.update(changes)
    return ModelConfig(**base)


@pytest.fixture
def tiny():
    return tiny_config


def randomize_(module: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> torch.nn.Module:
    """Fill every parameter (zero-initialised heads included) with random values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return module


@pytest.fixture(scope="session")
def weights():
    """The seeded random-weights stand-in: torch-fidelity's exact 472 keys and shapes (no download), in the
    session's TORCH_HOME (set above); InceptionFeatures loads it through torch-fidelity's strict path."""
    path = random_weights_file()
    assert len(torch.load(path, weights_only=True)) == 472
    return path


@pytest.fixture(scope="session")
def random_reglue_checkpoint(tmp_path_factory):
    """A random tiny-reglue model (64 px samples) saved as a reglue checkpoint at step 5."""
    from reglue import checkpoints, presets
    from reglue.models import build

    config = presets.load("tiny-reglue")
    torch.manual_seed(0)
    model = randomize_(build(config), seed=3, scale=0.05)
    path = tmp_path_factory.mktemp("ckpt") / "0000005.pt"
    checkpoints.save_checkpoint(path, config=config, step=5, model=model, ema=model)
    return path


def random_reference(path, n: int, side: int = 64, seed: int = 0):
    """A reference batch of ``n`` random ``side`` px images (arr_0 only) at ``path``; returns ``path``."""
    import numpy as np

    np.savez(path, arr_0=np.random.default_rng(seed).integers(0, 256, (n, side, side, 3), dtype=np.uint8))
    return path


@pytest.fixture(scope="session")
def toy_encoded(tmp_path_factory):
    """A toy folder (4 images a class) encoded at 64 px with the tiny VAE: data.h5 for tiny training runs."""
    from reglue.data.encode import EncodeOptions, encode_dataset
    from reglue.data.sources import open_source
    from reglue.encoders.vae import load_vae

    root = tmp_path_factory.mktemp("toy_encoded")
    images = make_folder(root / "images", per_class=4, seed=11, corrupt=False)
    encode_dataset(open_source(images), root / "data.h5", *load_vae("tiny"), EncodeOptions(resolution=64, workers=0),
                   progress=False, log=lambda m: None)
    return root / "data.h5"
