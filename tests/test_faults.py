"""Faults that are not a kill: a full disk (simulated by a file size limit, RLIMIT_FSIZE, which fails a write
after N bytes on any Linux machine; and, where the machine lets us mount one, a small tmpfs), temporary files
of killed saves, and non-finite guidance. Each command stops at the first failed write with one line naming the
user's path and the cause (exit 2), leaves nothing that looks complete, and the rerun with room to write gives
exactly what an uninterrupted run gives."""

import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from conftest import randomize_
from reglue import checkpoints, presets
from reglue.fileio import atomic_path, sweep_temps
from reglue.models import build
from test_encode import make_folder

REPO = Path(__file__).resolve().parents[1]


def reglue(*args, limit: int | None = None, cwd=REPO):
    """Run `python -m reglue_cli ARGS` with every file it writes limited to ``limit`` bytes."""

    def set_limit():
        if limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "reglue_cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600, preexec_fn=set_limit)


def assert_one_line(result, *words):
    """Exit 2, one line on stderr naming each of ``words``, no traceback."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    for word in words:
        assert str(word) in lines[0], lines[0]


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


@pytest.mark.parametrize("limit", [60_000, 140_000])  # while writing the parts; while merging / writing the npz
def test_sample_on_a_full_disk_stops_with_one_line_and_resumes_exactly(tmp_path, limit):
    ckpt = _checkpoint(tmp_path)
    straight = reglue("sample", "--ckpt", ckpt, "--out", tmp_path / "straight", *SAMPLE)
    assert straight.returncode == 0, straight.stderr
    out = tmp_path / "full"
    full = reglue("sample", "--ckpt", ckpt, "--out", out, *SAMPLE, limit=limit)
    assert_one_line(full, out, "File too large")
    assert not (out / "samples.npz").exists()
    if (out / "samples.h5").exists():
        with h5py.File(out / "samples.h5") as f:
            assert not f.attrs.get("complete")
    again = reglue("sample", "--ckpt", ckpt, "--out", out, *SAMPLE)
    assert again.returncode == 0, again.stderr
    assert (out / "samples.npz").read_bytes() == (tmp_path / "straight/samples.npz").read_bytes()
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
    args = ["eval", "--make-ref", tmp_path / "imgs", "--resolution", "32", "--inception-weights", weights, "--quiet"]
    assert reglue(*args, "--out", tmp_path / "straight.npz").returncode == 0
    out = tmp_path / "ref.npz"
    full = reglue(*args, "--out", out, limit=1_000_000)  # sigma alone is 32 MB
    assert_one_line(full, out, "File too large")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs", "straight.npz"]  # no ref.npz, no partial
    assert reglue(*args, "--out", out).returncode == 0
    assert out.read_bytes() == (tmp_path / "straight.npz").read_bytes()
