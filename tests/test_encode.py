"""`reglue encode`: the ADM crop, sources, moments, skipping, resume after SIGKILL, torchrun, bad input."""

import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import h5py
import numpy as np
import pytest
import torch
from helpers import MODES, REPO, make_folder, make_image
from PIL import Image

from reglue.constants import LATENT_SCALE
from reglue.data.crop import adm_center_crop, decode_image
from reglue.data.dataset import DatasetError, EncodedDataset
from reglue.data.encode import EncodeOptions, encode_dataset
from reglue.data.sources import SourceError, open_source
from reglue.encoders.loading import ModelLoadError
from reglue.encoders.vae import build_tiny_vae, load_vae, posterior_moments, sample_latents
from reglue_cli.main import main


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("images") / "train")


@pytest.fixture(scope="module")
def tiny_vae():
    return load_vae("tiny")


def encode(folder, out, vae_info, **options):
    vae, info = vae_info
    opts = EncodeOptions(**{"resolution": 64, "batch_size": 4, "workers": 0, **options})
    return encode_dataset(open_source(folder), out, vae, info, opts, progress=False, log=lambda m: None)


def reference_adm_crop(image: Image.Image, size: int) -> np.ndarray:
    """Independent reading of docs/method.md section 1, written with PIL's own crop box."""
    w, h = image.size
    while min(w, h) >= 2 * size:
        w, h = w // 2, h // 2
        image = image.resize((w, h), Image.Resampling.BOX)
    s = size / min(w, h)
    w, h = round(w * s), round(h * s)
    image = image.resize((w, h), Image.Resampling.BICUBIC)
    left, top = (w - size) // 2, (h - size) // 2
    return np.array(image.crop((left, top, left + size, top + size)))


@pytest.mark.parametrize("size, wh", [(64, (300, 200)), (64, (64, 64)), (64, (65, 513)), (256, (1024, 600)),
                                      (256, (200, 180)), (512, (1100, 700))])
def test_adm_crop_matches_independent_reference_pixel_for_pixel(size, wh):
    rng = np.random.default_rng(sum(wh))
    image = Image.fromarray(rng.integers(0, 255, (wh[1], wh[0], 3), dtype=np.uint8))
    ours = adm_center_crop(image, size)
    assert ours.shape == (size, size, 3) and ours.dtype == np.uint8
    assert np.array_equal(ours, reference_adm_crop(image, size))


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_decodes_to_rgb(tmp_path, mode):
    ext = "png" if mode not in ("CMYK",) else "jpg"
    make_image(np.random.default_rng(0), mode, ext, tmp_path / f"x.{ext}", size=(30, 20))
    image = decode_image((tmp_path / f"x.{ext}").read_bytes())
    assert image.mode == "RGB" and image.size == (30, 20)


def test_labels_follow_sorted_class_folders(folder):
    source = open_source(folder)
    assert source.class_names == ("n01", "n02", "n03")
    assert all(source.class_names[label] == key.split("/")[0] for key, label in zip(source.keys, source.labels))


def test_encoded_file_content_moments_and_skipped_file(folder, tiny_vae, tmp_path):
    summary = encode(folder, tmp_path / "data.h5", tiny_vae)
    source = open_source(folder)
    assert summary.written == len(source) - 1 and summary.skipped_total == 1
    assert summary.skipped[0][0] == "n01/broken.jpg"
    with h5py.File(tmp_path / "data.h5") as f:
        assert f["images"].shape == (15, 64, 64, 3) and f["images"].dtype == np.uint8
        assert f["moments"].shape == (15, 8, 8, 8) and f["moments"].dtype == np.float32
        assert f.attrs["complete"] and f.attrs["skipped"] == 1 and f.attrs["vae"] == "tiny"
        assert not f.attrs["comparable"] and f.attrs["crop"] == "adm-center" and f.attrs["resolution"] == 64
        keys = [k.decode() for k in f["keys"][...]]
        assert "n01/broken.jpg" not in keys
        row = keys.index("n02/img000.jpg")
        expected = reference_adm_crop(decode_image((folder / "n02/img000.jpg").read_bytes()), 64)
        assert np.array_equal(f["images"][row], expected)
        assert f["labels"][row] == 1
        vae = build_tiny_vae()
        want = posterior_moments(vae, torch.from_numpy(expected[None])).numpy()[0]
        np.testing.assert_allclose(f["moments"][row], want, rtol=1e-4, atol=1e-5)
        assert (f["moments"][:, 4:] > 0).all()  # std channels


def test_float16_moments_and_flip(folder, tiny_vae, tmp_path):
    encode(folder, tmp_path / "d.h5", tiny_vae, moments_dtype="float16", flip=True)
    with h5py.File(tmp_path / "d.h5") as f:
        assert f["moments"].dtype == np.float16 and f["moments_flip"].shape == f["moments"].shape
        flipped = posterior_moments(build_tiny_vae(), torch.from_numpy(f["images"][:2][:, :, ::-1].copy()))
        np.testing.assert_allclose(f["moments_flip"][:2].astype(np.float32), flipped.numpy(), rtol=2e-3, atol=2e-3)


def test_tar_and_labels_file_sources_give_the_same_content(folder, tiny_vae, tmp_path):
    with tarfile.open(tmp_path / "train.tar", "w") as tar:
        tar.add(folder, arcname="train")
    encode(folder, tmp_path / "a.h5", tiny_vae)
    encode(tmp_path / "train.tar", tmp_path / "b.h5", tiny_vae)
    source = open_source(folder)
    labels = {k: int(v) for k, v in zip(source.keys, source.labels)}
    (tmp_path / "labels.json").write_text(json.dumps({"labels": [[k, v] for k, v in labels.items()]}))
    encode_dataset(open_source(folder, tmp_path / "labels.json"), tmp_path / "c.h5", *tiny_vae,
                   EncodeOptions(resolution=64, workers=0), progress=False, log=lambda m: None)
    with h5py.File(tmp_path / "a.h5") as a, h5py.File(tmp_path / "b.h5") as b, h5py.File(tmp_path / "c.h5") as c:
        for other in (b, c):
            assert np.array_equal(a["images"][...], other["images"][...])
            assert np.array_equal(a["labels"][...], other["labels"][...])
        assert a.attrs["content_sha256"] == b.attrs["content_sha256"] == c.attrs["content_sha256"]


def test_shards_cover_the_source_in_order(folder, tiny_vae, tmp_path):
    encode(folder, tmp_path / "whole.h5", tiny_vae)
    summary = encode(folder, tmp_path / "data.h5", tiny_vae, shard_size=6)
    assert [p.name for p in summary.outputs] == ["data-00000.h5", "data-00001.h5", "data-00002.h5"]
    whole, sharded = EncodedDataset(tmp_path / "whole.h5"), EncodedDataset(tmp_path / "data.h5")
    assert len(whole) == len(sharded) == 15
    for i in range(15):
        assert torch.equal(whole[i][0], sharded[i][0]) and whole[i][2] == sharded[i][2]


def test_rerun_reuses_a_complete_file(folder, tiny_vae, tmp_path):
    encode(folder, tmp_path / "d.h5", tiny_vae)
    mtime = (tmp_path / "d.h5").stat().st_mtime_ns
    assert encode(folder, tmp_path / "d.h5", tiny_vae).reused
    assert (tmp_path / "d.h5").stat().st_mtime_ns == mtime


def _cli(*args, env=None, **kw):
    return subprocess.Popen([sys.executable, "-m", "reglue_cli", "encode", *args], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def test_resume_after_sigkill_gives_the_same_content(tmp_path):
    images = make_folder(tmp_path / "imgs", per_class=16, seed=3, corrupt=False)
    args = [str(images), "--vae", "tiny", "--workers", "0", "--batch-size", "2", "--quiet"]
    straight = _cli(*args, "--out", str(tmp_path / "straight.h5"), env=_env())
    assert straight.wait(timeout=300) == 0, straight.stdout.read()

    out, partial = tmp_path / "killed.h5", tmp_path / "killed.h5.partial"
    proc = _cli(*args, "--out", str(out), env=_env())
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if partial.exists() and partial.stat().st_size > 3_000_000:  # about 15 of 48 images at 256x256
            break
        time.sleep(0.005)
    assert proc.poll() is None, "encoding finished before it could be interrupted"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert partial.exists() and not out.exists()  # nothing that looks complete

    resumed = _cli(*args, "--out", str(out), env=_env())
    log = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, log
    assert "resuming killed.h5 at source index" in log
    assert not partial.exists()
    with h5py.File(tmp_path / "straight.h5") as a, h5py.File(out) as b:
        assert np.array_equal(a["images"][...], b["images"][...]) and np.array_equal(a["labels"][...], b["labels"][...])
        np.testing.assert_allclose(a["moments"][...], b["moments"][...], rtol=1e-4, atol=1e-5)
        assert a.attrs["content_sha256"] == b.attrs["content_sha256"]


def test_torchrun_two_processes_match_one(folder, tmp_path):
    single = _cli(str(folder), "--out", str(tmp_path / "one.h5"), "--vae", "tiny", "--resolution", "256",
                  "--workers", "0", "--batch-size", "3", "--quiet", env=_env())
    assert single.wait(timeout=300) == 0, single.stdout.read()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "-m", "reglue_cli", "encode", str(folder), "--out", str(tmp_path / "two.h5"), "--vae", "tiny",
           "--resolution", "256", "--workers", "0", "--batch-size", "3", "--quiet"]
    # the merge made slower (5 s on rank 0) than the collective timeout (3 s): rank 1 waits through gloo, no failure
    slow = {**_env(), "REGLUE_DIST_TIMEOUT": "3", "REGLUE_SLOW_MAIN_PHASE": "encode-merge:5"}
    done = subprocess.run(cmd, env=slow, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.h5", "two.h5"]  # parts merged and removed
    with h5py.File(tmp_path / "one.h5") as a, h5py.File(tmp_path / "two.h5") as b:
        assert np.array_equal(a["images"][...], b["images"][...]) and np.array_equal(a["labels"][...], b["labels"][...])
        np.testing.assert_allclose(a["moments"][...], b["moments"][...], rtol=1e-4, atol=1e-4)
        assert a.attrs["content_sha256"] == b.attrs["content_sha256"] and b.attrs["skipped"] == 1


def test_torchrun_source_error_reaches_every_rank_as_one_line(tmp_path):
    # rank 0 alone indexes the source; its error must stop every rank (not leave rank 1 waiting) with one line
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29534",
           "-m", "reglue_cli", "encode", str(tmp_path / "missing"), "--out", str(tmp_path / "d.h5"), "--vae", "tiny",
           "--quiet"]
    done = subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.startswith("reglue encode: error:")]
    assert len(lines) == 2 and all("missing: no such file or folder" in line for line in lines), done.stderr[-2000:]


def run_cli(capsys, *argv):
    code = main(["encode", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_bad_input_is_one_line_and_exit_2(capsys, folder, tmp_path):
    (tmp_path / "empty").mkdir()
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (8, 8)).save(flat / "a.png")
    (tmp_path / "other.h5").write_bytes(b"not hdf5")
    cases = [
        ([tmp_path / "empty", "--out", tmp_path / "o.h5"], "no images found"),
        ([flat, "--out", tmp_path / "o.h5"], "no class folders"),
        ([folder, "--out", tmp_path / "missing" / "o.h5"], "does not exist"),
        ([folder, "--out", tmp_path / "other.h5", "--vae", "tiny"], "pass --overwrite"),
        ([folder, "--out", tmp_path / "o.h5", "--vae", "not-a-vae"], "unknown VAE 'not-a-vae'"),
        ([tmp_path / "nope", "--out", tmp_path / "o.h5"], "no such file or folder"),
        ([folder, "--out", tmp_path / "o.h5", "--resolution", "300"], "multiple of 8"),
        ([folder, "--out", tmp_path / "o.h5", "--resolution", "0"], "--resolution"),
    ]
    for argv, message in cases:
        code, out, err = run_cli(capsys, *argv)
        assert code == 2 and err.count("\n") == 1 and message in err, (argv, err)
    assert (tmp_path / "other.h5").read_bytes() == b"not hdf5"  # nothing already written is lost


def test_existing_output_from_another_source_is_refused_then_overwritten(folder, tiny_vae, tmp_path, capsys):
    other = make_folder(tmp_path / "other", per_class=2, seed=9, corrupt=False)
    encode(other, tmp_path / "d.h5", tiny_vae)
    code, _, err = run_cli(capsys, folder, "--out", tmp_path / "d.h5", "--vae", "tiny", "--resolution", "256",
                           "--workers", "0", "--quiet")
    assert code == 2 and "another source" in err
    code, out, _ = run_cli(capsys, folder, "--out", tmp_path / "d.h5", "--vae", "tiny", "--resolution", "256",
                           "--workers", "0", "--quiet", "--overwrite")
    assert code == 0 and "wrote 15 images, skipped 1" in out


def test_offline_vae_fails_fast_with_instructions(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("REGLUE_VAE", raising=False)
    with pytest.raises(ModelLoadError) as err:
        load_vae(None)
    message = str(err.value)
    assert "stabilityai/sd-vae-ft-mse" in message and "cache" in message and "--vae DIR" in message


def test_local_diffusers_folder_loads_through_the_real_code(tmp_path):
    tiny = build_tiny_vae()
    tiny.save_pretrained(tmp_path / "vae")
    loaded, info = load_vae(str(tmp_path / "vae"))
    x = torch.randint(0, 255, (2, 64, 64, 3), dtype=torch.uint8)
    assert torch.equal(posterior_moments(loaded, x), posterior_moments(tiny, x)) and info["comparable"]


def test_reader_with_workers_matches_direct_reads(folder, tiny_vae, tmp_path):
    encode(folder, tmp_path / "d.h5", tiny_vae)
    dataset = EncodedDataset(tmp_path / "d.h5")
    direct = [dataset[i] for i in range(len(dataset))]  # opens a handle in this process before the fork
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=2)
    images, moments, labels = (torch.cat(parts) for parts in zip(*loader))
    assert torch.equal(images, torch.stack([d[0] for d in direct]))
    assert torch.equal(moments, torch.stack([d[1] for d in direct]))
    assert labels.tolist() == [d[2] for d in direct] and images.shape[1:] == (3, 64, 64)


def test_reader_refuses_partial_and_foreign_files(tmp_path):
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f.attrs["format"] = "reglue-encoded"
        f.attrs["complete"] = False
    with pytest.raises(DatasetError, match="incomplete"):
        EncodedDataset(tmp_path / "x.h5")
    with pytest.raises(DatasetError, match="no such dataset"):
        EncodedDataset(tmp_path / "missing.h5")


def test_posterior_sample_is_mean_plus_std_times_eps_scaled():
    moments = torch.randn(3, 8, 4, 4)
    moments[:, 4:] = moments[:, 4:].abs()
    z = sample_latents(moments, LATENT_SCALE, torch.Generator().manual_seed(5))
    eps = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(5)).double().numpy()
    m = moments.double().numpy()
    np.testing.assert_allclose(z.numpy(), (m[:, :4] + m[:, 4:] * eps) * LATENT_SCALE, rtol=1e-6, atol=1e-7)


def test_batch_loader_reads_whole_batches_in_workers(folder, tiny_vae, tmp_path):
    from reglue.data.dataset import batch_loader

    encode(folder, tmp_path / "d.h5", tiny_vae)
    dataset = EncodedDataset(tmp_path / "d.h5")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0)).tolist()
    batches = list(batch_loader(dataset, 4, order, workers=2))
    assert [b[0].shape[0] for b in batches] == [4, 4, 4, 3]
    images, moments, labels = (torch.cat(parts) for parts in zip(*batches))
    for j, index in enumerate(order):
        image, moment, label = dataset[index]
        assert torch.equal(images[j], image) and torch.equal(moments[j], moment) and labels[j].item() == label


def test_imagenet_style_tar_of_class_tars_is_read_in_place(folder, tiny_vae, tmp_path):
    # ILSVRC2012_img_train.tar's layout: one uncompressed tar per synset, the images flat inside each
    for name in sorted(p.name for p in folder.iterdir()):
        with tarfile.open(tmp_path / f"{name}.tar", "w") as inner:
            for image in sorted((folder / name).iterdir()):
                inner.add(image, arcname=image.name)
    with tarfile.open(tmp_path / "ILSVRC2012_img_train.tar", "w") as outer:
        for name in ("n03", "n01", "n02"):  # stored unsorted: labels still follow the sorted synsets
            outer.add(tmp_path / f"{name}.tar", arcname=f"{name}.tar")
    source = open_source(tmp_path / "ILSVRC2012_img_train.tar")
    assert source.kind == "nested-tar" and source.class_names == ("n01", "n02", "n03")
    reader = source.reader()
    for i, key in enumerate(source.keys):
        synset, image = key.split("/")
        assert (folder / synset[: -len(".tar")] / image).read_bytes() == reader.read(i)
        assert source.labels[i] == source.class_names.index(synset[: -len(".tar")])
    encode(folder, tmp_path / "a.h5", tiny_vae)
    encode(tmp_path / "ILSVRC2012_img_train.tar", tmp_path / "b.h5", tiny_vae, workers=2)
    with h5py.File(tmp_path / "a.h5") as a, h5py.File(tmp_path / "b.h5") as b:
        assert np.array_equal(a["images"][...], b["images"][...]) and np.array_equal(a["labels"][...], b["labels"][...])
        np.testing.assert_array_equal(a["moments"][...], b["moments"][...])


def test_a_compressed_tar_of_tars_is_refused_in_one_line(folder, tmp_path):
    with tarfile.open(tmp_path / "n01.tar", "w") as inner:
        inner.add(next((folder / "n01").iterdir()), arcname="x.jpg")
    with tarfile.open(tmp_path / "outer.tar.gz", "w:gz") as outer:
        outer.add(tmp_path / "n01.tar", arcname="n01.tar")
    with pytest.raises(SourceError, match="uncompressed tar of per-class tars"):
        open_source(tmp_path / "outer.tar.gz")


def test_rank_parts_merge_block_by_block_into_the_one_process_dataset(folder, tiny_vae, tmp_path, monkeypatch):
    """Two ranks' parts (ranks run one after the other in this process, rank 0 last: it merges) copied 3 rows at a
    time give the dataset of one process: a part is never read whole into memory."""
    import reglue.data.encode as encode
    from reglue.distributed import DistInfo

    monkeypatch.setattr(encode, "MERGE_BLOCK", 3)
    opts = EncodeOptions(resolution=64, batch_size=4, workers=0)
    encode_dataset(open_source(folder), tmp_path / "one.h5", *tiny_vae, opts, progress=False, log=lambda m: None)
    for rank in (1, 0):
        encode_dataset(open_source(folder), tmp_path / "two.h5", *tiny_vae, opts, DistInfo(rank=rank, world=2),
                       progress=False, log=lambda m: None)
    with h5py.File(tmp_path / "one.h5") as a, h5py.File(tmp_path / "two.h5") as b:
        assert a.attrs["content_sha256"] == b.attrs["content_sha256"]
        assert np.array_equal(a["moments"][...], b["moments"][...])
        assert np.array_equal(a["labels"][...], b["labels"][...])
