"""Faults that are not a kill: a full disk (simulated by a file size limit, RLIMIT_FSIZE, which fails a write
after N bytes on any Linux machine; and, where the machine lets us mount one, a small tmpfs), temporary files
of killed saves, and non-finite guidance. Each command stops at the first failed write with one line naming the
user's path and the cause (exit 2), leaves nothing that looks complete, and the rerun with room to write gives
exactly what an uninterrupted run gives."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import randomize_
from helpers import REPO, assert_one_line, make_folder, reglue

from reglue import checkpoints, presets
from reglue.fileio import atomic_path, sweep_temps
from reglue.models import build


def temps(directory: Path) -> list[Path]:
    return [p for p in directory.rglob("*") if p.name.endswith(".tmp")]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("faults") / "train", per_class=6, corrupt=False)


ENCODE = ["--vae", "tiny", "--resolution", "64", "--workers", "0", "--batch-size", "4", "--quiet"]


def _content(path):
    with h5py.File(path, "r") as f:
        return f.attrs["content_sha256"], f.attrs["moments_sha256"], f["labels"].shape[0], bool(f.attrs["complete"])


@pytest.fixture(scope="module")
def encoded(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("encoded") / "data.h5"
    result = reglue("encode", folder, "--out", out, *ENCODE)
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.parametrize("limit", [60_000, 200_000])
def test_encode_on_a_full_disk_stops_with_one_line_and_resumes_exactly(folder, encoded, tmp_path, limit):
    out = tmp_path / "data.h5"
    full = reglue("encode", folder, "--out", out, *ENCODE, limit=limit)
    assert_one_line(full, out, "File too large")
    assert not out.exists()  # only data.h5.partial: nothing looks complete
    again = reglue("encode", folder, "--out", out, *ENCODE)
    assert again.returncode == 0, again.stderr
    assert _content(out) == _content(encoded)
    assert not temps(tmp_path)


def _checkpoint(directory: Path) -> Path:
    config = presets.load("tiny-reglue")
    torch.manual_seed(0)
    model = randomize_(build(config), seed=3, scale=0.05)
    return checkpoints.save_checkpoint(directory / "0000005.pt", config=config, step=5, model=model, ema=model)


SAMPLE = ["--n", "12", "--steps", "3", "--vae", "tiny", "--cfg", "2", "--chunk", "4", "--batch-size", "4", "--quiet"]


@pytest.fixture(scope="module")
def straight_samples(tmp_path_factory):
    """(checkpoint, samples.npz of an uninterrupted run)."""
    root = tmp_path_factory.mktemp("straight")
    ckpt = _checkpoint(root)
    straight = reglue("sample", "--ckpt", ckpt, "--out", root / "straight", *SAMPLE)
    assert straight.returncode == 0, straight.stderr
    return ckpt, root / "straight/samples.npz"


@pytest.mark.parametrize("limit", [60_000, 140_000])  # while writing the parts; while merging / writing the npz
def test_sample_on_a_full_disk_stops_with_one_line_and_resumes_exactly(straight_samples, tmp_path, limit):
    ckpt, straight = straight_samples
    out = tmp_path / "full"
    full = reglue("sample", "--ckpt", ckpt, "--out", out, *SAMPLE, limit=limit)
    assert_one_line(full, out, "File too large")
    assert not (out / "samples.npz").exists()
    if (out / "samples.h5").exists():
        with h5py.File(out / "samples.h5") as f:
            assert not f.attrs.get("complete")
    again = reglue("sample", "--ckpt", ckpt, "--out", out, *SAMPLE)
    assert again.returncode == 0, again.stderr
    assert (out / "samples.npz").read_bytes() == straight.read_bytes()
    assert not temps(tmp_path)


def test_train_on_a_full_disk_names_the_checkpoint_and_resumes_exactly(encoded, tmp_path):
    args = ["train", "--preset", "tiny-sit", "--data", encoded, "--workers", "0", "--quiet", "--sample-every", "0",
            "--set", "train.global_batch=4", "--max-steps", "4", "--ckpt-every", "2"]
    straight = reglue(*args, "--outdir", tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr
    size = (tmp_path / "straight/checkpoints/0000004.pt").stat().st_size
    run = tmp_path / "full"
    full = reglue(*args, "--outdir", run, limit=size // 2)
    assert_one_line(full, run / "checkpoints/0000002.pt", "File too large")
    assert not list((run / "checkpoints").glob("*.pt")) and not temps(run)
    again = reglue(*args, "--outdir", run)
    assert again.returncode == 0, again.stderr
    a = checkpoints.load_checkpoint(run / "checkpoints/0000004.pt")
    b = checkpoints.load_checkpoint(tmp_path / "straight/checkpoints/0000004.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def _tmpfs(path: Path, megabytes: int) -> bool:
    path.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(path)],
                            capture_output=True)
    return result.returncode == 0


def test_a_real_full_disk_on_a_small_tmpfs(folder, encoded, tmp_path):
    disk = tmp_path / "disk"
    if not _tmpfs(disk, 8):
        pytest.skip("cannot mount a tmpfs here (needs root); the RLIMIT_FSIZE tests above cover the same paths")
    try:
        filler = disk / "filler"
        with open(filler, "wb") as f:
            f.write(b"\0" * (8 * 2**20 - 300_000))  # leaves about 300 kB
        out = disk / "data.h5"
        full = reglue("encode", folder, "--out", out, *ENCODE)
        assert_one_line(full, out, "No space left on device")
        filler.unlink()
        again = reglue("encode", folder, "--out", out, *ENCODE)
        assert again.returncode == 0, again.stderr
        assert _content(out) == _content(encoded)
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_temporaries_of_killed_saves_are_swept(tmp_path):
    target = tmp_path / "0000011.pt"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".0000011.pt.{dead.pid}.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    live = tmp_path / f".0000011.pt.{os.getpid()}.def456.tmp"  # a save of this very process, in progress
    live.write_bytes(b"in progress")
    other = tmp_path / f".0000012.pt.{dead.pid}.abc123.tmp"  # another target: left for its own writer
    other.write_bytes(b"x")
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new" and not stale.exists() and live.exists() and other.exists()
    assert sweep_temps(tmp_path / "0000012.pt") == [other]


def test_a_killed_checkpoint_save_leaves_no_temporary_after_the_next_run(encoded, tmp_path):
    """A save killed mid-write leaves its temporary (nothing can remove it then); the next save of the run
    directory sweeps it, so a resumed run never accumulates them."""
    run = tmp_path / "run"
    args = ["train", "--preset", "tiny-sit", "--data", encoded, "--workers", "0", "--quiet", "--sample-every", "0",
            "--set", "train.global_batch=4", "--ckpt-every", "2", "--outdir", run]
    assert reglue(*args, "--max-steps", "2").returncode == 0
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = run / "checkpoints" / f".0000004.pt.{dead.pid}.x1y2z3.tmp"
    stale.write_bytes(b"\0" * 1000)
    assert reglue(*args, "--max-steps", "4").returncode == 0
    assert not temps(run) and (run / "checkpoints/0000004.pt").exists()


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_guidance_is_refused(tmp_path, value):
    ckpt = _checkpoint(tmp_path)
    for flag in ("--cfg", "--cls-cfg"):
        result = reglue("sample", "--ckpt", ckpt, "--out", tmp_path / "s", "--n", "2", "--vae", "tiny", flag, value)
        assert_one_line(result, flag)
        assert not (tmp_path / "s").exists()


def test_make_ref_on_a_full_disk_stops_with_one_line_and_reruns_exactly(tmp_path):
    from PIL import Image

    from evaluation.inception import random_weights_file

    weights = random_weights_file()
    rng = np.random.default_rng(3)
    (tmp_path / "imgs/a").mkdir(parents=True)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(tmp_path / f"imgs/a/{i}.png")
    args = ["make-ref", tmp_path / "imgs", "--resolution", "32", "--inception-weights", weights, "--quiet"]
    assert reglue(*args, "--out", tmp_path / "straight.npz").returncode == 0
    out = tmp_path / "ref.npz"
    full = reglue(*args, "--out", out, limit=1_000_000)  # sigma alone is 32 MB
    assert_one_line(full, out, "File too large")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs", "straight.npz"]  # no ref.npz, no partial
    assert reglue(*args, "--out", out).returncode == 0
    assert out.read_bytes() == (tmp_path / "straight.npz").read_bytes()


def _train_args(data, run, *extra):
    return ["train", "--preset", "tiny-sit", "--data", str(data), "--outdir", str(run), "--workers", "0", "--quiet",
            "--sample-every", "0", "--set", "train.global_batch=4", "--set", "train.log_every=1", *map(str, extra)]


def _main(capsys, *argv):
    from reglue_cli.main import main

    code = main(list(argv))
    err = capsys.readouterr().err
    return code, err


def test_resume_on_other_data_is_refused_unless_allowed(folder, encoded, tmp_path, capsys):
    other = tmp_path / "other.h5"
    small = make_folder(tmp_path / "small", per_class=2, seed=5, corrupt=False)
    assert reglue("encode", small, "--out", other, *ENCODE).returncode == 0
    run = tmp_path / "run"
    assert _main(capsys, *_train_args(encoded, run, "--max-steps", "2"))[0] == 0
    code, err = _main(capsys, *_train_args(other, run, "--max-steps", "3"))
    assert code == 2 and "pass --allow-other-data" in err and "18 rows" in err and "6 rows" in err, err
    assert not (run / "checkpoints/0000003.pt").exists()
    code, err = _main(capsys, *_train_args(other, run, "--max-steps", "3", "--allow-other-data"))
    assert code == 0, err
    assert "rows: 6" in (run / "data.yaml").read_text()


def test_a_failed_first_launch_leaves_nothing_that_blocks_the_corrected_one(encoded, tmp_path, capsys):
    run = tmp_path / "run"
    code, err = _main(capsys, *_train_args(tmp_path / "typo.h5", run, "--max-steps", "1", "--set", "model.depth=3"))
    assert code == 2 and "typo.h5" in err
    assert not (run / "config.yaml").exists() and not (run / "data.yaml").exists()
    assert _main(capsys, *_train_args(encoded, run, "--max-steps", "1"))[0] == 0  # another config: still fine


def test_a_second_train_on_one_run_directory_is_refused_naming_the_first(encoded, tmp_path, capsys):
    from reglue.locks import directory_lock

    run = tmp_path / "run"
    with directory_lock(run):  # this process plays the first run
        second = reglue(*_train_args(encoded, run, "--max-steps", "1"), separate=True)
        assert_one_line(second, run, f"pid {os.getpid()}")
        assert not (run / "config.yaml").exists()
    assert reglue(*_train_args(encoded, run, "--max-steps", "1")).returncode == 0  # free again: runs


def test_steps_after_the_last_checkpoint_are_not_logged_twice(encoded, tmp_path, capsys):
    run = tmp_path / "run"
    assert _main(capsys, *_train_args(encoded, run, "--max-steps", "4", "--ckpt-every", "2"))[0] == 0
    (run / "checkpoints/0000004.pt").unlink()  # as if killed after step 4 was logged, before it was saved
    assert _main(capsys, *_train_args(encoded, run, "--max-steps", "4", "--ckpt-every", "2"))[0] == 0
    steps = [int(line.split('"step": ')[1].split(",")[0]) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_labels_outside_the_model_are_one_line(encoded, tmp_path, capsys):
    code, err = _main(capsys, *_train_args(encoded, tmp_path / "run", "--max-steps", "1", "--set",
                                           "model.num_classes=2"))
    assert code == 2 and "label 2 is outside 0..1" in err and err.count("\n") == 1, err


def test_a_checkpoint_of_another_model_in_the_run_directory_is_one_line(encoded, tmp_path, capsys):
    run = tmp_path / "run"
    assert _main(capsys, *_train_args(encoded, run, "--max-steps", "1"))[0] == 0
    shutil.copy(_checkpoint(tmp_path), run / "checkpoints/0000005.pt")  # a tiny-reglue checkpoint, newest
    code, err = _main(capsys, *_train_args(encoded, run, "--max-steps", "6"))
    assert code == 2 and "0000005.pt: a checkpoint of another model (tiny-reglue" in err and err.count("\n") == 1


def test_a_folder_of_undecodable_images_writes_no_dataset(tmp_path):
    (tmp_path / "bad/a").mkdir(parents=True)
    for i in range(3):
        (tmp_path / f"bad/a/{i}.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    result = reglue("encode", tmp_path / "bad", "--out", tmp_path / "data.h5", *ENCODE)
    assert result.returncode == 2 and "none of its 3 images could be decoded" in result.stderr.splitlines()[-1]
    assert not (tmp_path / "data.h5").exists()


def test_a_second_encode_or_sample_into_one_output_is_refused(folder, tmp_path, capsys):
    from reglue.locks import directory_lock, file_lock

    out = tmp_path / "data.h5"
    with file_lock(out):  # this process plays the first encode
        code, err = _main(capsys, "encode", str(folder), "--out", str(out), *ENCODE)
        assert code == 2 and f"{out}: in use by another reglue process (pid {os.getpid()})" in err, err
    assert not list(tmp_path.iterdir())  # nothing written, not even a partial file
    ckpt = _checkpoint(tmp_path)
    with directory_lock(tmp_path / "s"):
        code, err = _main(capsys, "sample", "--ckpt", str(ckpt), "--out", str(tmp_path / "s"), *SAMPLE)
        assert code == 2 and f"pid {os.getpid()}" in err, err
    assert _main(capsys, "sample", "--ckpt", str(ckpt), "--out", str(tmp_path / "s"), *SAMPLE)[0] == 0
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["samples.h5", "samples.npz"]  # lock removed


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def _one_image_folder(path):
    from PIL import Image

    (path / "a").mkdir(parents=True)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(path / "a/0.png")
    return path


def test_eval_inputs_that_cannot_give_metrics_are_one_line(tmp_path, capsys):
    from evaluation.inception import random_weights_file

    weights = random_weights_file()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    ref = _npz(tmp_path / "ref.npz", arr_0=images)
    objects = np.empty(2048, dtype=object)
    objects[:] = [0.0] * 2048
    cases = [
        ([_npz(tmp_path / "one.npz", arr_0=images[:1]), "--ref", ref], "1 image(s); the metrics need at least 2"),
        ([_npz(tmp_path / "none.npz", arr_0=images[:0]), "--ref", ref], "0 image(s)"),
        ([_npz(tmp_path / "s.npz", arr_0=images), "--ref", _npz(tmp_path / "obj.npz", arr_0=images, mu=objects)],
         "'mu' is an object array"),
        ([tmp_path / "s.npz", "--ref", _npz(tmp_path / "bad_mu.npz", arr_0=images, mu=np.zeros(100))],
         "'mu' is float64 (100,), expected float (2048,)"),
        (["make-ref", _one_image_folder(tmp_path / "folder"), "--out", tmp_path / "r.npz", "--resolution", "16"],
         "a reference needs at least 2"),
    ]
    for argv, message in cases:
        argv = argv if argv[0] == "make-ref" else ["eval", *argv]
        code, err = _main(capsys, *map(str, argv), "--inception-weights", weights, "--quiet")
        assert code == 2 and message in err and err.count("\n") == 1, (argv, err)


def test_compare_refuses_a_metrics_file_without_numbers(tmp_path, capsys):
    import json

    (tmp_path / "m.json").write_text(json.dumps({"fid": "12.9", "sample_info": {}}))
    code, err = _main(capsys, "compare", str(tmp_path / "m.json"))
    assert code == 2 and "'fid' is '12.9', expected a number" in err and err.count("\n") == 1, err


def test_eval_features_on_a_full_disk_keep_the_old_file(tmp_path):
    from evaluation.inception import random_weights_file

    rng = np.random.default_rng(1)
    ref = _npz(tmp_path / "ref.npz", arr_0=rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8))
    samples = _npz(tmp_path / "s.npz", arr_0=rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8))
    features = tmp_path / "features.h5"
    args = ["eval", samples, "--ref", ref, "--inception-weights", random_weights_file(), "--quiet", "--features",
            features]
    assert reglue(*args).returncode == 0  # also caches the reference features: only --features is written below
    good = features.read_bytes()
    full = reglue(*args, limit=50_000)  # 8 rows of pool + spatial + logits are 162 kB
    assert_one_line(full, features, "File too large")
    assert features.read_bytes() == good and not temps(tmp_path)  # the rerun is the first command again


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path):
    import signal

    from reglue.locks import LockedError, directory_lock

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from reglue.locks import directory_lock; "
                               f"directory_lock({str(tmp_path / 'run')!r}).acquire(); print('held', flush=True); "
                               "time.sleep(60)"], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(LockedError, match=f"pid {holder.pid}"):
        directory_lock(tmp_path / "run").acquire()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (tmp_path / "run/.lock").exists()  # left behind by the kill ...
    directory_lock(tmp_path / "run").acquire().release()  # ... and taken over


def test_an_output_that_hdf5_reports_locked_is_refused_not_deleted(folder, tmp_path):
    out = tmp_path / "data.h5"
    partial = tmp_path / "data.h5.partial"
    with h5py.File(partial, "w") as f:
        f.attrs["run_id"] = "someone else's"
    with h5py.File(partial, "a"):  # held open for writing by another program: HDF5 locks the file
        result = reglue("encode", folder, "--out", out, *ENCODE, separate=True)  # HDF5 locks across processes
        assert_one_line(result, out, "in use by another process (HDF5 file lock)")
    assert partial.exists()
