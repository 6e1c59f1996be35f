"""512 px end to end, swapping the VFM of a preset, and the reference batch that follows the resolution."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import make_folder

from evaluation.reference import ReferenceStatsError, reference_for
from reglue import presets
from reglue.encoders.registry import VFM_REGISTRY
from reglue_cli.main import main


def test_the_512_presets_have_64x64_latents_and_a_448_px_vfm(capsys):
    for name in ("sit-b2-reglue-512", "sit-xl2-reglue-512"):
        assert main(["train", "--preset", name, "--dry-run"]) == 0
        out = capsys.readouterr().out
        assert "input_size: 64" in out and "image_size: 448" in out and "# tokens: 1024 latent" in out
    compressor = presets.load("compressor-dinov2-b-512")
    assert (compressor.data.resolution, compressor.vfm.image_size) == (512, 448)


def test_swapping_the_vfm_makes_its_widths_and_blocks_follow(capsys):
    config = presets.load("sit-b2-reglue", vfm__name="dinov2-vitl14-reg")
    large = VFM_REGISTRY["dinov2-vitl14-reg"]
    assert config.vfm.layers == (20, 21, 22, 23) and config.vfm.image_size == 224
    assert config.model.cls_dim == config.model.projector.out_dim == large.width
    assert config.compressor.channels == (4 * large.width, 256, 16)
    redi = presets.load("sit-b2-redi", vfm__name="dinov3-vitl16")
    assert redi.vfm.layers == (23,) and redi.vfm.image_size == 256  # patch 16: 16x16 tokens at 256 px
    assert main(["train", "--preset", "sit-b2-reglue-512", "--vfm", "dinov3-vitb16", "--dry-run", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)["config"]
    assert shown["vfm"]["image_size"] == 512 and shown["vfm"]["name"] == "dinov3-vitb16"
    assert main(["train", "--preset", "sit-b2-reglue", "--vfm", "dinov9", "--dry-run"]) == 2
    assert "unknown VFM; choose one of" in capsys.readouterr().err


def test_the_default_reference_follows_the_sample_resolution(tmp_path, capsys):
    assert reference_for(256) == "imagenet256" and reference_for(512) == "imagenet512"
    with pytest.raises(ReferenceStatsError, match="no ImageNet reference batch for 48 px"):
        reference_for(48)
    np.savez(tmp_path / "s.npz", arr_0=np.zeros((4, 48, 48, 3), np.uint8))
    assert main(["eval", str(tmp_path / "s.npz"), "--quiet"]) == 2
    assert "pass --ref" in capsys.readouterr().err


def test_a_512_px_run_trains_samples_and_scores(tmp_path):
    images = make_folder(tmp_path / "images", per_class=2, seed=3, corrupt=False)  # upscaled by the ADM crop
    common = ["--workers", "0", "--quiet"]
    at_512 = ["--set", "data.resolution=512", "--set", "vfm.image_size=448"]
    assert main(["encode", str(images), "--out", str(tmp_path / "data.h5"), "--resolution", "512", "--vae", "tiny",
                 *common]) == 0
    assert main(["train", "--preset", "compressor-tiny", "--data", str(tmp_path / "data.h5"), "--outdir",
                 str(tmp_path / "comp"), "--max-steps", "2", "--global-batch", "4", *at_512, *common]) == 0
    assert main(["train", "--preset", "tiny-reglue", "--data", str(tmp_path / "data.h5"), "--outdir",
                 str(tmp_path / "run"), "--compressor", str(tmp_path / "comp"), "--max-steps", "2", "--global-batch",
                 "4", "--sample-every", "0", *at_512, "--set", "model.input_size=64", *common]) == 0
    assert main(["sample", "--ckpt", str(tmp_path / "run/checkpoints/0000002.pt"), "--out", str(tmp_path / "s"),
                 "--n", "2", "--steps", "3", "--vae", "tiny", "--device", "cpu", "--quiet"]) == 0
    samples = np.load(tmp_path / "s/samples.npz")["arr_0"]
    assert samples.shape == (2, 512, 512, 3) and samples.dtype == np.uint8
    assert main(["make-ref", str(tmp_path / "data.h5"), "--out", str(tmp_path / "ref.npz"),
                 "--inception-weights", "random", "--quiet"]) == 0
    assert main(["eval", str(tmp_path / "s/samples.npz"), "--ref", str(tmp_path / "ref.npz"), "--inception-weights",
                 "random", "--json", str(tmp_path / "m.json"), "--quiet"]) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["n"] == 2 and np.isfinite(metrics["fid"])
