"""clean_fid and kid: the clean resize against an independent PIL version, the float forward against torch-fidelity's,
KID against an independent restatement, and `reglue eval --metrics` reporting them apart."""

import json

import numpy as np
import pytest
import torch
from helpers import write_npz
from PIL import Image

from evaluation.families import clean_resize, kernel_inception_distance, pool_from_float
from evaluation.inception import InceptionFeatures
from reglue_cli.main import main


def test_clean_resize_is_pil_bicubic_per_float_channel():
    img = np.random.default_rng(0).integers(0, 256, (1, 40, 50, 3), dtype=np.uint8)
    got = clean_resize(img)
    for c in range(3):
        want = np.asarray(Image.fromarray(img[0, :, :, c].astype(np.float32), mode="F").resize(
            (299, 299), Image.Resampling.BICUBIC)).clip(0, 255)
        np.testing.assert_array_equal(got[0, c], want)
    assert got.dtype == np.float32 and got.shape == (1, 3, 299, 299)


def test_float_forward_equals_torch_fidelity_when_no_resize_is_needed(weights):
    extractor = InceptionFeatures(weights)
    images = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (2, 3, 299, 299), dtype=np.uint8))
    theirs = extractor(images).pool  # TF1 resize 299 -> 299 is the identity
    ours = pool_from_float(extractor, images.float())
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def _oracle_kid(x, y, num_subsets, m, seed):
    rng = np.random.default_rng(seed)
    n = x.shape[1]
    t = 0.0
    for _ in range(num_subsets):
        a = x[rng.choice(len(x), m, replace=False)]
        b = y[rng.choice(len(y), m, replace=False)]
        kxx, kyy, kxy = ((a @ a.T / n + 1) ** 3), ((b @ b.T / n + 1) ** 3), ((a @ b.T / n + 1) ** 3)
        t += (kxx.sum() - np.diag(kxx).sum() + kyy.sum() - np.diag(kyy).sum()) / (m - 1) - 2 * kxy.sum() / m
    return t / num_subsets / m


def test_kid_matches_restatement_and_is_near_zero_for_one_distribution():
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((300, 16)), rng.standard_normal((250, 16)) + 0.5
    assert kernel_inception_distance(x, y, 10, 100, seed=3) == pytest.approx(_oracle_kid(x, y, 10, 100, 3), rel=1e-12)
    same = kernel_inception_distance(x[:150], x[150:], 20, 100)
    assert abs(same) < 0.1 * kernel_inception_distance(x, y, 20, 100)


def test_eval_reports_families_apart(weights, tmp_path, capsys):
    rng = np.random.default_rng(4)
    write_npz(tmp_path / "ref.npz", rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8))
    write_npz(tmp_path / "s.npz", rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8))
    code = main(["eval", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "ref.npz"), "--inception-weights", weights,
                 "--metrics", "clean_fid,kid", "--json", str(tmp_path / "m.json"), "--quiet"])
    out = capsys.readouterr().out
    assert code == 0 and "clean-fid:" in out and "not comparable with the ADM columns" in out
    metrics = json.loads((tmp_path / "m.json").read_text())
    family = metrics["families"]["clean-fid"]
    assert np.isfinite(family["clean_fid"]) and np.isfinite(family["kid"]) and family["clean_fid"] != metrics["fid"]
    code = main(["eval", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "ref.npz"), "--inception-weights", weights,
                 "--metrics", "fd_dinov3", "--quiet"])
    assert code == 2 and "unknown family fd_dinov3" in capsys.readouterr().err


def _tiny_vit():
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(img_size=224, patch_size=14, embed_dim=32, depth=2, num_heads=2, reg_tokens=0,
                             num_classes=0, init_values=1e-5).eval()


def test_dinov2_preprocessing_and_cls_features(tmp_path):
    from evaluation.dinov2 import dinov2_features, preprocess
    from evaluation.images import open_images

    img = np.random.default_rng(5).integers(0, 256, (1, 3, 64, 80), dtype=np.uint8)
    got = preprocess(torch.from_numpy(img))[0].numpy()
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    for c in range(3):  # PIL's antialiased bicubic, independently
        pil = np.asarray(Image.fromarray(img[0, c]).resize((224, 224), Image.Resampling.BICUBIC), np.float64)
        want = (pil / 255 - mean[c]) / std[c]
        diff = np.abs(got[c] - want)  # torch's antialiased bicubic tracks PIL's closely, not exactly (edges)
        assert diff.mean() < 0.01 and np.percentile(diff, 99) < 0.1
    model = _tiny_vit()
    images = np.random.default_rng(6).integers(0, 256, (3, 50, 50, 3), dtype=np.uint8)
    np.savez(tmp_path / "imgs.npz", arr_0=images)
    feats = dinov2_features(open_images(tmp_path / "imgs.npz", role="reference"), model, batch_size=2)
    x = preprocess(torch.from_numpy(images).permute(0, 3, 1, 2))
    with torch.inference_mode():
        want = model.forward_features(x)[:, 0]  # the final-normed [CLS] token
    np.testing.assert_allclose(feats, want.numpy(), rtol=1e-5, atol=1e-5)


def test_dinov2_offline_fails_fast(monkeypatch):
    from evaluation.dinov2 import DinoV2Error, load_dinov2

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("REGLUE_DINOV2_WEIGHTS", raising=False)
    with pytest.raises(DinoV2Error, match="--dinov2-weights FILE"):
        load_dinov2(None)


def test_eval_reports_fd_dinov2(weights, tmp_path, capsys, monkeypatch):
    import evaluation.dinov2 as dinov2

    monkeypatch.setattr(dinov2, "load_dinov2", lambda weights=None: _tiny_vit())
    rng = np.random.default_rng(7)
    write_npz(tmp_path / "ref.npz", rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8))
    write_npz(tmp_path / "s.npz", rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8))
    code = main(["eval", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "ref.npz"), "--inception-weights", weights,
                 "--metrics", "fd_dinov2", "--json", str(tmp_path / "m.json"), "--quiet"])
    assert code == 0, capsys.readouterr().err
    family = json.loads((tmp_path / "m.json").read_text())["families"]["dinov2"]
    assert np.isfinite(family["fd_dinov2"]) and family["fd_dinov2"] > 0


def test_the_registry_is_what_eval_accepts_and_computes():
    from evaluation.families import FAMILIES, FEATURE_SPACES

    assert list(FAMILIES) == ["clean_fid", "kid", "fd_dinov2"]
    assert {family.space for family in FAMILIES.values()} == set(FEATURE_SPACES)
    sections = {space.section for space in FEATURE_SPACES.values()}
    assert sections == {"clean-fid", "dinov2"}


def test_a_family_is_one_registry_entry(weights, tmp_path, monkeypatch):
    """A new family registered on the clean features is accepted by --metrics and reported in its section; the
    networks of families not asked for are never loaded."""
    import evaluation.dinov2 as dinov2
    from evaluation import families

    def mean_gap(ours, theirs, fid_backend):
        return float(np.abs(ours.mean(0) - theirs.mean(0)).sum())

    def no_dinov2(weights=None):
        raise AssertionError("DINOv2 loaded without fd_dinov2")

    monkeypatch.setitem(families.FAMILIES, "mean_gap", families.Family("clean", mean_gap))
    monkeypatch.setattr(dinov2, "load_dinov2", no_dinov2)
    rng = np.random.default_rng(8)
    write_npz(tmp_path / "ref.npz", rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8))
    write_npz(tmp_path / "s.npz", rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8))
    code = main(["eval", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "ref.npz"), "--inception-weights", weights,
                 "--metrics", "mean_gap", "--json", str(tmp_path / "m.json"), "--quiet"])
    assert code == 0
    section = json.loads((tmp_path / "m.json").read_text())["families"]["clean-fid"]
    assert set(section) == {"reference", "resize", "mean_gap"} and np.isfinite(section["mean_gap"])
    assert section["mean_gap"] > 0  # random samples against another random batch
