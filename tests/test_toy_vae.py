"""The demo's VAE stand-in (reglue.encoders.toy): it learns to reconstruct the toy shapes, is saved in the real
VAE's file format, loads through the real loading code, and marks everything encoded with it as a stand-in."""

import importlib.util
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from reglue import presets
from reglue.encoders.toy import ToyVAESettings, latent_std, save_toy_vae, train_toy_vae
from reglue.encoders.vae import build_tiny_vae, decode_latents, load_vae, posterior_moments, vae_id
from reglue.sampling.run import stand_ins
from reglue_cli.main import main

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32


def _toy_images(per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (N, SIZE, SIZE, 3) toy images drawn by the demo's own script, and their class ids."""
    spec = importlib.util.spec_from_file_location("toy_dataset", ROOT / "scripts" / "toy_dataset.py")
    toy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(toy)
    rng = np.random.default_rng(0)
    classes = [(shape, colour) for shape in toy.SHAPES for colour in toy.COLOURS.values()]
    images = [np.asarray(toy.draw(s, c, SIZE, rng)) for s, c in classes for _ in range(per_class)]
    return np.stack(images), np.repeat(np.arange(len(classes)), per_class)


def _reconstruction_mse(vae, images: np.ndarray) -> float:
    """Mean squared error in [0, 1] pixel units of decode(posterior mean), computed in float64 NumPy."""
    moments = posterior_moments(vae, torch.from_numpy(images))
    decoded = decode_latents(vae, moments[:, :4], 1.0).numpy().astype(np.float64) / 255
    return float(np.mean((decoded - images.astype(np.float64) / 255) ** 2))


@pytest.fixture(scope="module")
def trained():
    images, _ = _toy_images(per_class=4)
    vae = train_toy_vae(images, ToyVAESettings(steps=100, batch=8, lr=5e-3))  # the demo: 300 x 16 at 64 px
    return images, vae


def test_the_stand_in_reconstructs_what_the_random_one_cannot(trained):
    images, vae = trained
    # the baseline a reconstruction must beat to carry shape: every pixel replaced by its image's mean colour (after
    # these 100 small steps, about 0.74 of it)
    flat = images.astype(np.float64) / 255
    mean_colour = float(np.mean((flat - flat.mean(axis=(1, 2), keepdims=True)) ** 2))
    ours, random = _reconstruction_mse(vae, images), _reconstruction_mse(build_tiny_vae(), images)
    assert ours < 0.85 * mean_colour < random, (ours, mean_colour, random)


def test_it_is_saved_in_the_real_format_and_marked_as_a_stand_in(trained, tmp_path):
    images, vae = trained
    scale = 1 / latent_std(vae, images)
    (tmp_path / "vae.partial").mkdir()  # a previous run killed while saving: replaced, never read
    folder = save_toy_vae(vae, tmp_path / "vae", scale, "toy stand-in for a test")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert not (tmp_path / "vae.partial").exists()
    loaded, info = load_vae(str(folder))
    assert info == {"id": str(folder.resolve()), "comparable": False}
    assert json.loads((folder / "config.json").read_text())["_reglue_stand_in"] == "toy stand-in for a test"
    assert loaded.config.scaling_factor == pytest.approx(scale)
    batch = torch.from_numpy(images[:4])
    assert torch.equal(posterior_moments(loaded, batch), posterior_moments(vae, batch))
    # the scale standardises the latents: independent float64 std of the stored means
    means = posterior_moments(loaded, torch.from_numpy(images))[:, :4].double().numpy()
    assert np.std(means * scale, ddof=1) == pytest.approx(1.0, rel=1e-6)


def test_a_dataset_encoded_with_it_says_it_is_a_stand_in(trained, tmp_path, capsys):
    images, vae = trained
    folder = save_toy_vae(vae, tmp_path / "vae", 1.0, "toy stand-in for a test")
    for i, image in enumerate(images[:6]):
        (tmp_path / "imgs" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(tmp_path / "imgs" / f"c{i % 2}" / f"{i}.png")
    code = main(["encode", str(tmp_path / "imgs"), "--out", str(tmp_path / "d.h5"), "--resolution", str(SIZE),
                 "--vae", str(folder), "--workers", "0", "--quiet"])
    assert code == 0 and "is a stand-in; this dataset is not comparable to papers" in capsys.readouterr().out
    with h5py.File(tmp_path / "d.h5") as f:
        assert f.attrs["vae"] == str(folder.resolve()) and not f.attrs["comparable"]


def test_a_local_vae_is_named_by_its_absolute_path_however_it_is_written(tmp_path, monkeypatch):
    (tmp_path / "vae").mkdir()
    monkeypatch.chdir(tmp_path)
    assert vae_id("vae") == vae_id("./vae") == vae_id(str(tmp_path / "vae")) == str((tmp_path / "vae").resolve())
    assert vae_id("tiny") == "tiny" and vae_id("stabilityai/sd-vae-ft-mse") == "stabilityai/sd-vae-ft-mse"


def test_samples_name_every_stand_in_behind_them(trained, tmp_path):
    images, vae = trained
    toy = str(save_toy_vae(vae, tmp_path / "vae", 1.0, "toy"))
    real = tmp_path / "real"
    real.mkdir()
    (real / "config.json").write_text("{}")  # a folder without the stand-in mark counts as a real VAE
    assert stand_ins(presets.load("sit-b2-reglue"), "stabilityai/sd-vae-ft-ema") == []
    assert stand_ins(presets.load("tiny-reglue"), "tiny") == ["decoder", "vae", "vfm"]
    assert stand_ins(presets.load("tiny-sit", data__vae=str(real)), str(real)) == []  # no VFM in plain SiT
    assert stand_ins(presets.load("demo-sit", data__vae=toy), toy) == ["decoder", "vae"]
    assert stand_ins(presets.load("demo-reglue", data__vae=str(real)), str(real)) == ["vfm"]
