"""The Inception extractor through torch-fidelity's real loading path (random weights with its exact keys), the
TF1 resize, ADM's NHWC spatial layout, input validation, and `reglue eval` end to end (evaluation.md 7.2)."""

import json
import warnings
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from helpers import write_npz

from evaluation.images import ImageInputError, open_images
from evaluation.inception import InceptionError, InceptionFeatures, resolve_weights
from reglue_cli.main import main


def test_random_stand_in_is_seeded_and_loads(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    path = resolve_weights("random")
    assert Path(path).is_file() and resolve_weights("random") == path
    assert len(torch.load(path, weights_only=True)) == 472
    assert InceptionFeatures("random").weights_sha256 == InceptionFeatures(path).weights_sha256


@pytest.fixture(scope="session")
def extractor(weights):
    return InceptionFeatures(weights)


def _images(n, size=64, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, 3, size, size), dtype=np.uint8))


def test_shapes_and_contract(extractor):
    feats = extractor(_images(3))
    assert feats.pool.shape == (3, 2048) and (feats.pool >= 0).all()
    assert feats.spatial.shape == (3, 2023) and (feats.spatial >= 0).all()
    assert feats.logits.shape == (3, 1008)
    unbiased = feats.pool @ extractor.net.fc.weight.T
    torch.testing.assert_close(feats.logits, unbiased, rtol=1e-5, atol=1e-4)  # no bias
    assert not extractor.training and extractor.weights_sha256
    assert extractor(_images(2, size=128)).pool.shape == (2, 2048)  # any size is resized to 299


def test_spatial_features_are_mixed_6d_branch1x1_in_nhwc_order(extractor):
    seen = []
    handle = extractor.net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, out: seen.append(out.clone()))
    feats = extractor(_images(2))
    handle.remove()
    act = seen[0]
    assert act.shape == (2, 192, 17, 17)
    for c, h, w in [(0, 0, 0), (6, 16, 16), (3, 5, 11), (1, 16, 0)]:
        assert feats.spatial[1, (h * 17 + w) * 7 + c] == act[1, c, h, w]


def _tf1_bilinear(img: np.ndarray, size: int) -> np.ndarray:
    """Independent TF1 legacy bilinear (align_corners=False, no half-pixel centres): src = dst * in / out."""
    c, h, w = img.shape
    out = np.zeros((c, size, size))
    for y in range(size):
        sy = y * h / size
        y0 = int(np.floor(sy))
        y1, fy = min(y0 + 1, h - 1), sy - y0
        for x in range(size):
            sx = x * w / size
            x0 = int(np.floor(sx))
            x1, fx = min(x0 + 1, w - 1), sx - x0
            top = img[:, y0, x0] * (1 - fx) + img[:, y0, x1] * fx
            bottom = img[:, y1, x0] * (1 - fx) + img[:, y1, x1] * fx
            out[:, y, x] = top * (1 - fy) + bottom * fy
    return out


def test_preprocessing_is_tf1_resize_then_scale(extractor):
    seen = []
    handle = extractor.net.Conv2d_1a_3x3.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    images = _images(1, size=40)
    extractor(images)
    handle.remove()
    x = seen[0][0].double().numpy()
    assert x.shape == (3, 299, 299) and x.min() >= -1 and x.max() <= 0.9921875 + 1e-6
    want = (_tf1_bilinear(images[0].double().numpy(), 299) - 128) / 128
    assert np.abs(x - want).max() <= 1e-4
    other = torch.nn.functional.interpolate(images.double(), size=299, mode="bilinear", align_corners=False)
    assert np.abs(x - ((other[0].numpy() - 128) / 128)).max() > 1e-2  # not the PyTorch resize


def test_batch_size_independence_and_determinism(extractor):
    images = _images(7)
    all7 = extractor(images)
    one = extractor(images[3:4])
    torch.testing.assert_close(one.pool[0], all7.pool[3], rtol=0, atol=1e-5)
    assert torch.equal(extractor(images).pool, all7.pool)


def test_tf32_is_off_inside_and_restored():
    from evaluation.inception import no_tf32

    torch.backends.cudnn.allow_tf32 = True
    with no_tf32():
        assert not torch.backends.cudnn.allow_tf32
    assert torch.backends.cudnn.allow_tf32


def test_bad_images_and_weights_are_refused(extractor, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="uint8"):
        extractor(_images(1).float())
    with pytest.raises(ValueError, match="uint8 images"):
        extractor(_images(1).permute(0, 2, 3, 1))
    with pytest.raises(InceptionError, match="no such file"):
        resolve_weights(str(tmp_path / "missing.pth"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", mock.Mock(side_effect=OSError("offline")))
    monkeypatch.delenv("REGLUE_INCEPTION_WEIGHTS", raising=False)
    with pytest.raises(InceptionError, match="fetch https://.*--inception-weights FILE"):
        resolve_weights(None)
    torch.save({"fc.weight": torch.zeros(3)}, tmp_path / "wrong.pth")
    with pytest.raises(InceptionError, match="not torch-fidelity's InceptionV3"):
        InceptionFeatures(str(tmp_path / "wrong.pth"))


def test_npz_reader_streams_and_validates(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (10, 16, 16, 3), dtype=np.uint8)
    for save in (np.savez, np.savez_compressed):
        save(tmp_path / "a.npz", arr_0=images, extra=np.zeros(2))
        reader = open_images(tmp_path / "a.npz", role="reference")
        assert np.array_equal(np.concatenate(list(reader.batches(3))), images)
        assert np.array_equal(np.concatenate(list(reader.batches(4, start=2, stop=9))), images[2:9])
    cases = [
        (images.astype(np.float32), "float32, expected uint8"),
        (images.transpose(0, 3, 1, 2), "NCHW"),
        (images[..., :1], "1 channels"),
        (images[0], r"expected \(N, H, W, 3\)"),
    ]
    for bad, message in cases:
        with pytest.raises(ImageInputError, match=message):
            open_images(write_npz(tmp_path / "bad.npz", bad))
    (tmp_path / "trunc.npz").write_bytes((tmp_path / "a.npz").read_bytes()[:300])
    with pytest.raises(ImageInputError, match="trunc.npz"):
        open_images(tmp_path / "trunc.npz")
    (tmp_path / "x.npz").write_bytes(b"not a zip")
    with pytest.raises(ImageInputError, match="not a readable .npz"):
        open_images(tmp_path / "x.npz")
    with pytest.warns(UserWarning, match="carries its own 'mu'"):
        open_images(write_npz(tmp_path / "mu.npz", images, mu=np.zeros(2048)))


def test_reglue_eval_end_to_end(weights, tmp_path, capsys):
    rng = np.random.default_rng(1)
    ref_images = rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
    write_npz(tmp_path / "ref.npz", ref_images)
    write_npz(tmp_path / "samples.npz", rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8))
    argv = ["eval", str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "ref.npz"), "--inception-weights", weights,
            "--json", str(tmp_path / "eval" / "metrics.json"), "--features", str(tmp_path / "features.h5"), "--quiet",
            "--batch-size", "4"]
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "FID" in out and "sFID" in out and "Precision" in out and "fewer than the 2048" in err
    assert "not torch-fidelity's published Inception weights" in out  # the random stand-in says so
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())  # the directory is created
    for key in ("fid", "sfid", "inception_score", "precision", "recall"):
        assert np.isfinite(metrics[key])
    assert metrics["n"] == 10 and metrics["reference_statistics"] == "computed from arr_0"
    assert len(metrics["inception_weights_sha256"]) == 64 and metrics["pr_precision"] == "fp16"
    import h5py

    with h5py.File(tmp_path / "features.h5") as f:
        assert f["pool"].shape == (10, 2048) and f["spatial"].shape == (10, 2023) and f["logits"].shape == (10, 1008)


def test_reglue_eval_bad_input(weights, tmp_path, capsys):
    images = np.zeros((4, 8, 8, 3), np.uint8)
    write_npz(tmp_path / "ok.npz", images)
    write_npz(tmp_path / "nchw.npz", images.transpose(0, 3, 1, 2))
    cases = [
        ([str(tmp_path / "nchw.npz"), "--ref", str(tmp_path / "ok.npz")], "NCHW"),
        ([str(tmp_path / "missing.npz"), "--ref", str(tmp_path / "ok.npz")], "no such file"),
        ([str(tmp_path / "ok.npz"), "--ref", "imagenet999"], "not one of imagenet256"),
    ]
    for argv, message in cases:
        code = main(["eval", *argv, "--inception-weights", weights, "--quiet"])
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.strip().count("\n") == 0, (argv, err)


class _UInt8Images(torch.utils.data.Dataset):
    """torch-fidelity's input format: uint8 CHW tensors."""

    def __init__(self, images: np.ndarray):
        self.images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


def test_fid_agrees_with_torch_fidelity_on_the_same_weights(weights, tmp_path):
    import torch_fidelity

    from evaluation.evaluate import EvalOptions, evaluate

    rng = np.random.default_rng(7)
    a = rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-60, 60, a.shape), 0, 255).astype(np.uint8)
    write_npz(tmp_path / "a.npz", a)
    write_npz(tmp_path / "b.npz", b)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = evaluate(tmp_path / "a.npz", str(tmp_path / "b.npz"), weights,
                        EvalOptions(batch_size=20, cache_dir=str(tmp_path / "cache"), progress=False))
        theirs = torch_fidelity.calculate_metrics(
            input1=_UInt8Images(a), input2=_UInt8Images(b), fid=True, feature_extractor="inception-v3-compat",
            feature_extractor_weights_path=weights, cuda=False, cache=False, verbose=False, batch_size=20)
    fid = theirs["frechet_inception_distance"]
    assert ours["fid"] == pytest.approx(fid, rel=1e-4)


def test_make_reference_from_a_folder_then_score_against_it(weights, tmp_path, capsys):
    from PIL import Image

    rng = np.random.default_rng(3)
    for c in ("a", "b"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(tmp_path / "imgs" / c / f"{i}.png")
    code = main(["make-ref", str(tmp_path / "imgs"), "--out", str(tmp_path / "ref.npz"), "--resolution",
                 "32", "--inception-weights", weights, "--quiet"])
    assert code == 0, capsys.readouterr().err
    with np.load(tmp_path / "ref.npz") as ref:
        assert ref["arr_0"].shape == (10, 32, 32, 3) and ref["arr_0"].dtype == np.uint8
        assert ref["mu"].shape == (2048,) and ref["sigma"].shape == (2048, 2048) and ref["mu_s"].shape == (2023,)
        arr = ref["arr_0"]
    write_npz(tmp_path / "same.npz", arr)
    code = main(["eval", str(tmp_path / "same.npz"), "--ref", str(tmp_path / "ref.npz"), "--inception-weights",
                 weights, "--quiet", "--json", str(tmp_path / "m.json"), "--pr-precision", "fp32"])
    assert code == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["reference_statistics"] == "stored in the reference file"
    # identical statistics, but of rank 9 in 2048 dimensions: the trace term is only good to ~1e-4 there
    assert abs(metrics["fid"]) < 1e-3 and metrics["precision"] == 1.0 and metrics["recall"] == 1.0


ADM_PUBLISHED = {"inception_score": (215.84, 0.5), "fid": (3.9426, 0.01), "sfid": (6.1404, 0.01),
                 "precision": (0.8265, 0.005), "recall": (0.5309, 0.005)}


@pytest.mark.skipif(not all(__import__("os").environ.get(v) for v in
                            ("REGLUE_INCEPTION_WEIGHTS", "ADM_REF_NPZ", "ADM_SAMPLE_NPZ")),
                    reason="needs the real Inception weights and ADM's npz files (REGLUE_INCEPTION_WEIGHTS, "
                           "ADM_REF_NPZ, ADM_SAMPLE_NPZ)")
def test_adm_published_numbers_for_admnet_guided_upsampled_imagenet256(tmp_path):
    """ADM's README: admnet_guided_upsampled_imagenet256.npz against VIRTUAL_imagenet256_labeled.npz."""
    import os

    from evaluation.evaluate import EvalOptions, evaluate

    result = evaluate(os.environ["ADM_SAMPLE_NPZ"], os.environ["ADM_REF_NPZ"], os.environ["REGLUE_INCEPTION_WEIGHTS"],
                      EvalOptions(cache_dir=str(tmp_path), progress=False))
    for key, (value, tolerance) in ADM_PUBLISHED.items():
        assert abs(result[key] - value) <= tolerance, (key, result[key])


def test_torchrun_two_processes_give_the_same_metrics_bit_for_bit(weights, tmp_path):
    """One process with every core against two one-thread torchrun workers: the same features by construction
    (fixed padded chunks, one thread per network call), so the same numbers exactly. 7 images in chunks of 3:
    rank 0 takes chunk 0, rank 1 chunks 1 and 2 (the last one padded)."""
    chunk = 3
    import os
    import subprocess
    import sys

    rng = np.random.default_rng(5)
    write_npz(tmp_path / "ref.npz", rng.integers(0, 256, (9, 32, 32, 3), dtype=np.uint8))
    write_npz(tmp_path / "s.npz", rng.integers(0, 256, (7, 32, 32, 3), dtype=np.uint8))
    repo = Path(__file__).resolve().parents[1]
    common = ["reglue_cli", "eval", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "ref.npz"), "--inception-weights",
              weights, "--quiet", "--feature-chunk", str(chunk), "--pr-precision", "fp32"]
    one = subprocess.run([sys.executable, "-m", *common, "--batch-size", "3", "--json", str(tmp_path / "one.json")],
                         cwd=repo, env={**os.environ, "REGLUE_FEATURE_CACHE": str(tmp_path / "cache1")},
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29553", "-m", *common, "--batch-size", "7", "--json", str(tmp_path / "two.json")],
                         cwd=repo, env={**os.environ, "REGLUE_FEATURE_CACHE": str(tmp_path / "cache2")},
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = (json.loads((tmp_path / f"{k}.json").read_text()) for k in ("one", "two"))
    for key in ("fid", "sfid", "inception_score", "precision", "recall"):
        assert a[key] == b[key], key



def test_make_reference_statistics_do_not_depend_on_the_batch_size_and_equal_the_evaluators(extractor, tmp_path,
                                                                                            monkeypatch):
    """make-ref feeds Inception fixed zero-padded chunks and sums float64 statistics over fixed blocks, as the
    evaluator's extract does: any --batch-size gives the same bytes, and the same as scoring those images."""
    import evaluation.extract
    from evaluation.extract import extract
    from evaluation.reference import make_reference

    monkeypatch.setattr(evaluation.extract, "STATS_BLOCK", 3)  # blocks that end inside chunks and reads
    rng = np.random.default_rng(5)
    np.savez(tmp_path / "images.npz", arr_0=rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8))
    stats = []
    for batch in (3, 7):
        out = tmp_path / f"ref{batch}.npz"
        make_reference(open_images(tmp_path / "images.npz"), extractor, out, batch_size=batch, progress=False, chunk=4)
        with np.load(out) as ref:
            stats.append({k: ref[k].copy() for k in ("mu", "sigma", "mu_s", "sigma_s")})
    for key in stats[0]:
        assert np.array_equal(stats[0][key], stats[1][key]), key
    scored = extract(open_images(tmp_path / "images.npz"), extractor, batch_size=5, progress=False, chunk=4)
    (mu, sigma), (mu_s, sigma_s) = scored.pool_stats.mean_cov(), scored.spatial_stats.mean_cov()
    for key, value in (("mu", mu), ("sigma", sigma), ("mu_s", mu_s), ("sigma_s", sigma_s)):
        assert np.array_equal(stats[0][key], value), key
