"""The probe table: bad input to every command surface is refused with ONE line on stderr and the right exit code.

Every new command's bad-input cases get a row here (and every new command surface gets rows the day it lands).
A row is ``(argv, exit code, words)``: the command line as one string, split like a shell would; the exit code
(2 for bad input or environment, docs/failures.md); and the words the single stderr line must contain. Rows run
in process through ``reglue_cli.main.main``, one test id each. Placeholders in argv and words are filled in:

  {tmp}      a fresh empty directory for the row
  {ckpt}     a random tiny-reglue checkpoint (64 px samples; tests/conftest.py random_reglue_checkpoint)
  {ref}      a tiny reference batch .npz (8 random 64 px images)
  {weights}  the seeded random Inception weights file (evaluation.inception.random_weights_file)
  {foreign}  a sample directory holding another run's finished samples.h5
  {file:NAME} the path of FILES[NAME] written into {tmp} (inputs that are themselves the bad part)

Rows must stay cheap: each is refused before any expensive work (no model run, no feature pass), so the whole
table runs in seconds. Faults the table cannot express (a full disk, Ctrl-C, a plot) are tested below it.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import shlex
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
TOO_MANY = str(10**20)

# Bad input files, by name: {file:NAME} in a row writes one into the row's {tmp} and stands for its path.
FILES = {
    "huge_int.json": '{"fid": 1' + "0" * 400 + "}",  # json parses 10**400; formatting it would overflow
    "nested.json": "[" * 100_000 + "]" * 100_000,  # the parser's recursion limit
    "digits.json": '{"fid": ' + "9" * 5000 + "}",  # more digits than Python converts
    "nan.json": '{"fid": NaN}',
    "step.json": json.dumps({"fid": 3.0, "sample_info": {"step": 10**400}}),
    "list.json": "[1, 2]",
    "text.json": "not json at all",
    "text.h5": "not an HDF5 file",
}

SET_TINY = "train --preset tiny-reglue --dry-run --set"
TABLE = [
    # compare: its JSON inputs are read defensively (size, depth, numbers)
    ("compare {file:huge_int.json}", 2, ("huge_int.json", "'fid'", "a finite one")),
    ("compare {file:nested.json}", 2, ("nested.json", "nested too deeply")),
    ("compare {file:digits.json}", 2, ("digits.json", "not a JSON file")),
    ("compare {file:nan.json}", 2, ("nan.json", "'fid' is nan")),
    ("compare {file:step.json}", 2, ("step.json", "'step' is not a count")),
    ("compare {file:list.json}", 2, ("list.json", "no 'fid'")),
    ("compare {file:text.json}", 2, ("text.json", "not a JSON file")),
    ("compare {tmp}/missing.json", 2, ("missing.json", "no such file")),
    ("compare --baselines nope", 2, ("--baselines", "nope")),
    # train --set / --vfm: checked at load, --dry-run included, before anything is built
    (SET_TINY + " compressor.channels=[]", 2, ("compressor.channels=[]", "at least two")),
    (SET_TINY + " model.depth=1e20", 2, ("model.depth", "expected int")),
    (SET_TINY + " model.depth=" + TOO_MANY, 2, ("model.depth=" + TOO_MANY, "<= 1024")),
    (SET_TINY + " model.hidden_size=1048576", 2, ("model.hidden_size", "<= 65536")),
    (SET_TINY + " model.hidden_size=32768 --set model.num_heads=8", 2, ("parameters", "1e+10")),
    (SET_TINY + " train.global_batch=" + TOO_MANY, 2, ("train.global_batch",)),
    (SET_TINY + " train.max_steps=" + TOO_MANY, 2, ("train.max_steps",)),
    (SET_TINY + " sampling.steps=" + TOO_MANY, 2, ("sampling.steps",)),
    (SET_TINY + " model.depth=3 --set model.depth=4", 2, ("model.depth", "twice")),
    (SET_TINY + " model.depth=3 --set model__depth=4", 2, ("model.depth", "twice")),
    ("train --preset tiny-sit --dry-run --vfm tiny-dinov2", 2, ("tiny-sit", "reads no VFM")),
    ("train --preset sit-b2 --dry-run --set vfm.name=dinov2-vitl14-reg", 2, ("sit-b2", "reads no VFM")),
    ("train --preset tiny-sit --dry-run --eval-every 0", 2, ("--eval-every",)),
    # eval --ckpt: the seed range of --repeats, before anything is loaded or sampled
    ("eval --ckpt {tmp}/missing.pt --repeats " + TOO_MANY, 2, ("--repeats " + TOO_MANY, "use --repeats 1..")),
    ("eval --ckpt {ckpt} --seed 4000 --repeats 100", 2, ("--repeats 100 from --seed 4000", "1..96")),
    ("eval --ckpt {ckpt} --n 2 --steps 2 --vae tiny --ref {ref} --inception-weights {weights} "
     "--save-samples {foreign} --quiet", 2, ("--save-samples", "another run", "another directory")),
    ("eval {tmp}/missing.npz", 2, ("missing.npz", "no such file")),
    ("eval --save-samples {tmp}/s {ref}", 2, ("--save-samples", "--ckpt")),
    # make-ref (and its deprecated spelling `eval --make-ref`, tested in tests/test_cli.py): the source is read
    # before the Inception network
    ("make-ref {tmp}/nope --out {tmp}/ref.npz", 2, ("reglue make-ref: error: ", "nope", "no such file or folder")),
    ("make-ref {tmp} --out {tmp}/ref.npz", 2, ("no images found",)),
    ("make-ref {file:list.json} --out {tmp}/ref.npz", 2, ("list.json", "expected an image folder or a .tar")),
    ("make-ref {file:text.h5} --out {tmp}/ref.npz", 2, ("text.h5", "not a readable HDF5 file")),
    ("make-ref {tmp} --out {tmp}/ref.npz --resolution 4", 2, ("--resolution",)),
    ("make-ref {tmp} --out {tmp}/ref.npz --batch-size 0", 2, ("--batch-size",)),
    ("make-ref {tmp}", 2, ("Missing option '--out'",)),
    # sample
    ("sample --ckpt {ckpt} --out {tmp}/s --n 2 --vae tiny --cfg nan", 2, ("--cfg",)),
    ("sample --ckpt {tmp}/missing.pt --out {tmp}/s", 2, ("missing.pt", "no such file")),
    ("sample --ckpt {ckpt} --out {foreign} --n 2 --steps 2 --vae tiny --quiet", 2, ("another run", "--overwrite")),
    # encode
    ("encode {tmp}/nope --out {tmp}/data.h5", 2, ("nope", "no such file")),
    # ema (post-hoc EMA, docs/ema.md) and its keys
    ("ema", 2, ("RUN_DIR is missing",)),
    ("ema {tmp}/missing --list", 2, ("missing", "no such run directory")),
    ("ema {tmp} --list", 2, ("no EMA snapshots", "ema.snapshot_every")),
    ("ema {tmp} --sigma-rel 0.1 --out {tmp}/x.pt", 2, ("no EMA snapshots",)),
    ("ema {ckpt} --list", 2, ("is a file",)),
    ("ema --decay 0.9999", 2, ("--decay and --at-step",)),
    ("ema --decay 1 --at-step 10", 2, ("--decay",)),
    ("ema {tmp} --sigma-rel 0.1 --max-residual -1 --out {tmp}/x.pt", 2, ("--max-residual",)),
    (SET_TINY + " ema.sigma_rels=[0.5]", 2, ("ema.sigma_rels=[0.5]", "(0, 0.2887)")),
    (SET_TINY + " ema.snapshot_every=5", 2, ("ema.snapshot_every=5", "ema.sigma_rels is empty")),
    (SET_TINY + " ema.sigma_rels=[0.1]", 2, ("ema.sigma_rels [0.1]", "never written")),
    (SET_TINY + " optim.ema_decay=0.99", 2, ("optim.ema_decay", "now ema.decay")),
    ("sweep --ckpt {ckpt} --out {tmp}/o --cfg 2 --ema 0.05", 2, ("run directory goes with --ema",)),
    ("sweep --ckpt {tmp} --out {tmp}/o --cfg 2", 2, ("run directory goes with --ema",)),
    ("sweep --ckpt {ckpt} --out {tmp}/o --cfg 2 --ema-step 5", 2, ("--ema-step goes with --ema",)),
    ("sweep --ckpt {tmp} --out {tmp}/o --cfg 2 --ema -0.1", 2, ("--ema -0.1", "sigma_rel values are >= 0")),
    ("sweep --ckpt {tmp} --out {tmp}/o --cfg 2 --ema 0.05", 2, ("no EMA snapshots",)),
    # probe (docs/probe.md)
    ("probe {tmp}/missing.pt --data {ref}", 2, ("missing.pt", "no such file")),
    ("probe {ckpt} --data {tmp}/nope.h5", 2, ("--data", "does not exist")),
    ("probe {ckpt} --data {ref}", 2, ("ref.npz", "HDF5")),
    ("probe {ckpt} --data {ref} --t 2", 2, ("--t 2", "[0, 1]")),
    ("probe {ckpt} --data {ref} --t x", 2, ("--t 'x'", "noise levels")),
    ("probe {ckpt} --data {ref} --layers 1,x", 2, ("--layers '1,x'", "counted from 1")),
    ("probe {ckpt} --data {ref} --n 1", 2, ("--n",)),
    ("probe {ckpt} --data {ref} --n 8 --knn-k 7", 2, ("--knn-k 7", "at most --n - 2 = 6")),
    ("train --preset tiny-sit --dry-run --probe-every 0", 2, ("--probe-every",)),
    ("train --preset compressor-tiny --data {ref} --outdir {tmp}/o --probe-every 5", 2, ("--probe-every",
                                                                                         "diffusion runs")),
    # sweep
    ("sweep --ckpt {tmp}/missing.pt --out {tmp}/o --cfg nan", 2, ("--cfg nan", "finite")),
    ("sweep --ckpt {tmp}/missing.pt --out {tmp}/o --cfg 2 --repeats " + TOO_MANY, 2, ("--repeats " + TOO_MANY,)),
    ("sweep --ckpt {tmp}/missing.pt --out {tmp}/o --cfg inf", 2, ("--cfg inf", "finite")),
    ("sweep --ckpt {tmp}/missing.pt --out {tmp}/o --cfg 1:inf:1", 2, ("--cfg 1:inf:1", "finite")),
    ("sweep --ckpt {tmp}/missing.pt --out {tmp}/o --cfg 3:1:0.5", 2, ("--cfg 3:1:0.5", "START <= STOP")),
    ("sweep --ckpt {tmp}/missing.pt --out {tmp}/o --cfg 0:1e12:1", 2, ("--cfg 0:1e12:1", "at most 10,000")),
    ("sweep --ckpt {tmp}/missing.pt --out {tmp}/o --cfg 0:1000:0.001", 2, ("--cfg 0:1000:0.001", "at most 10,000")),
    ("sweep --ckpt {tmp}/missing.pt --out {tmp}/o --cfg 0:3:0.01", 2, ("301 points", "--many-points")),
    ("sweep --ckpt {ckpt} --out {tmp}/o --cfg 2 --wandb team/project", 2, ("team/project", "not a W&B project")),
    ("sweep --ckpt {ckpt} --out {tmp}/o --cfg 2 --seed 4095 --repeats 2", 2, ("--repeats 2 from --seed 4095",)),
    # train: evaluation and tracking settings checked at launch, shortcuts against --set
    ("train --preset tiny-sit --dry-run --max-steps 3 --set train.max_steps=5", 2,
     ("--max-steps", "train.max_steps", "one of them")),
    ("train --preset tiny-sit --data {tmp}/d.h5 --outdir {tmp}/r --wandb team/project", 2, ("not a W&B project",)),
]


def _row_id(row) -> str:
    return re.sub(r"\s+", " ", row[0])[:90]


@pytest.fixture(scope="module")
def ref(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ref") / "ref.npz"
    np.savez(path, arr_0=np.random.default_rng(0).integers(0, 256, (8, 64, 64, 3), dtype=np.uint8))
    return path


@pytest.fixture(scope="module")
def weights() -> str:
    from evaluation.inception import random_weights_file

    return str(random_weights_file())


@pytest.fixture
def foreign(tmp_path) -> Path:
    """A sample directory whose finished samples.h5 belongs to another run."""
    out = tmp_path / "foreign"
    out.mkdir()
    with h5py.File(out / "samples.h5", "w") as f:
        f.attrs.update({"run_id": "another run's", "complete": True})
    return out


def fill(text: str, tmp: Path, request) -> str:
    """``text`` with its placeholders filled (fixtures are made only when a row names them)."""
    def one(match: re.Match) -> str:
        name = match.group(1)
        if name == "tmp":
            return str(tmp)
        if name.startswith("file:"):
            path = tmp / name[len("file:"):]
            path.write_text(FILES[name[len("file:"):]])
            return str(path)
        fixture = {"ckpt": "random_reglue_checkpoint"}.get(name, name)
        return str(request.getfixturevalue(fixture))

    return re.sub(r"\{([a-z_]+(?::[\w.]+)?)\}", one, text)


def run_in_process(argv: list[str]) -> SimpleNamespace:
    """`reglue ARGV` through reglue_cli.main.main, stdout and stderr captured."""
    from reglue_cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main(argv)
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def assert_one_line(result, code: int, *words) -> None:
    """Exit ``code``, one line on stderr holding every one of ``words``, no traceback."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == code, result.stderr[-3000:]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    for word in words:
        assert word in lines[0], (word, lines[0])


@pytest.mark.parametrize("row", TABLE, ids=_row_id)
def test_bad_input_is_one_line(row, tmp_path, request):
    argv, code, words = row
    result = run_in_process(shlex.split(fill(argv, tmp_path, request)))
    assert_one_line(result, code, *(fill(w, tmp_path, request) for w in words))


# ---------------------------------------------------------------------------------- beyond the table

def test_every_preset_is_inside_the_bounds_of_its_keys():
    """The bounds on counts (reglue.config.schema MAX_*) refuse no shipped preset."""
    from reglue import presets

    for name in presets.available():
        presets.load(name)  # a ConfigError would name the key


def _reglue_process(*args, limit: int | None = None):
    """`python -m reglue_cli ARGS` in its own process, every file it writes limited to ``limit`` bytes."""
    import resource

    def set_limit():
        if limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run([sys.executable, "-m", "reglue_cli", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}, preexec_fn=set_limit)


SAMPLE = ["--n", "12", "--steps", "3", "--vae", "tiny", "--cfg", "2", "--chunk", "4", "--batch-size", "4", "--quiet"]
MERGE_LIMIT = 150_000  # above this part file (8 of 12 samples, ~140 kB), below the merged samples.h5 (~161 kB)


def test_a_full_disk_while_merging_the_samples_exits_2_and_the_rerun_merges(random_reglue_checkpoint, tmp_path):
    """The merge's HDF5 file once crashed the process at exit (139) after the right message: now exit 2, and the
    parts stay for the rerun, which gives the bytes an uninterrupted run gives."""
    from reglue.distributed import DistInfo
    from reglue.sampling.run import SampleRequest, sample_to_dir

    ckpt = random_reglue_checkpoint
    straight = tmp_path / "straight"
    assert run_in_process(["sample", "--ckpt", str(ckpt), "--out", str(straight), *SAMPLE]).returncode == 0
    out = tmp_path / "full"  # rank 1 of 2 wrote its chunk: the single process below writes a smaller part
    sample_to_dir(ckpt, out, SampleRequest(n=12, steps=3, vae="tiny", cfg=2.0, chunk=4), batch_size=4,
                  dist=DistInfo(rank=1, world=2), progress=False)
    full = _reglue_process("sample", "--ckpt", ckpt, "--out", out, *SAMPLE, limit=MERGE_LIMIT)
    assert_one_line(full, 2, str(out / "samples.h5"), "File too large")
    assert sorted(p.name for p in (out / "parts").iterdir()) == ["rank0of1.h5", "rank1of2.h5"]
    assert not (out / "samples.h5").exists() and not (out / "samples.npz").exists()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    again = run_in_process(["sample", "--ckpt", str(ckpt), "--out", str(out), *SAMPLE])
    assert again.returncode == 0, again.stderr
    assert (out / "samples.npz").read_bytes() == (straight / "samples.npz").read_bytes()


def _failing_lock_write(real_write):
    """os.write that fails with ENOSPC on a lock file (named *.lock), as on a full disk."""
    def write(fd, data):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".lock"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)
    return write


@pytest.mark.parametrize("command", ["train", "sweep"])
def test_a_lock_file_that_cannot_be_written_is_one_line_and_left_nowhere(command, tmp_path, monkeypatch):
    run = tmp_path / "run"
    argv = {"train": ["train", "--preset", "tiny-sit", "--data", str(tmp_path / "data.h5"), "--outdir", str(run)],
            "sweep": ["sweep", "--ckpt", str(tmp_path / "c.pt"), "--cfg", "2", "--out", str(run)]}[command]
    monkeypatch.setattr(os, "write", _failing_lock_write(os.write))
    result = run_in_process(argv)
    monkeypatch.undo()
    assert_one_line(result, 2, f"{run}: cannot write the lock file .lock: No space left on device")
    assert not (run / ".lock").exists()


def test_a_lock_on_a_real_full_disk(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root); the simulated write above covers the same path")
    try:
        fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
        with contextlib.suppress(OSError):  # fill the disk to its last byte
            while os.write(fd, b"\0" * 4096):
                pass
        os.close(fd)
        result = run_in_process(["train", "--preset", "tiny-sit", "--data", str(tmp_path / "d.h5"), "--outdir",
                                 str(disk / "run")])
        assert_one_line(result, 2, str(disk / "run"), "No space left on device")
        assert not (disk / "run/.lock").exists()
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_ctrl_c_exits_130(monkeypatch):
    import reglue_cli.compare

    def interrupted(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(reglue_cli.compare, "load_baselines", interrupted)  # as if Ctrl-C came while it ran
    assert_one_line(run_in_process(["compare"]), 130, "interrupted")


def _metrics(path: Path, step: int, fid: float, ref_sha: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"fid": fid, "n": 1000, "reference_sha256": ref_sha,
                                "inception_weights_sha256": "f" * 64,
                                "sample_info": {"preset": "sit-b2", "step": step}}))
    return path


def test_the_fid_plot_never_joins_points_of_two_references(tmp_path):
    from evaluation.compare import load_ours, plot_fid, series

    run = tmp_path / "b2"
    _metrics(run / "eval/0000100.json", 100, 40.0, "1a2b3c4d" + "0" * 56)
    _metrics(run / "eval/0000200.json", 200, 30.0, "1a2b3c4d" + "0" * 56)
    _metrics(run / "eval/0000300.json", 300, 25.0, "9f8e7d6c" + "0" * 56)  # scored against another reference
    rows = load_ours([str(run)])
    curves = series(rows)
    assert [c["label"] for c in curves] == ["b2 (ours, ref 1a2b3c4d)", "b2 (ours, ref 9f8e7d6c)"]
    assert [c["points"] for c in curves] == [[(100, 40.0), (200, 30.0)], [(300, 25.0)]]
    assert [c["label"] for c in series(rows[:2])] == ["b2 (ours)"]  # one series: no provenance in the label
    png = plot_fid(rows, tmp_path / "fid.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_samples_and_reference_of_different_sides_are_warned_about(tmp_path, weights):
    from evaluation.evaluate import EvalOptions, evaluate

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "s.npz", arr_0=rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8))
    np.savez(tmp_path / "r.npz", arr_0=rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8))
    options = EvalOptions(device="cpu", progress=False, cache_dir=str(tmp_path / "cache"), feature_chunk=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        evaluate(tmp_path / "s.npz", str(tmp_path / "r.npz"), weights, options)
    assert any("32 px samples" in str(w.message) and "16 px images" in str(w.message) for w in caught)


def test_make_ref_skips_an_undecodable_image_with_a_note(tmp_path, weights):
    from PIL import Image

    folder = tmp_path / "imgs/a"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (folder / "1.png").write_bytes((folder / "1.png").read_bytes()[:60])  # truncated
    result = run_in_process(["make-ref", str(tmp_path / "imgs"), "--out", str(tmp_path / "ref.npz"),
                             "--resolution", "16", "--inception-weights", weights, "--quiet"])
    assert result.returncode == 0, result.stderr
    notes = result.stderr.strip().splitlines()
    assert len(notes) == 1 and notes[0].startswith(f"skipped {folder / '1.png'}: "), result.stderr
    assert "statistics over 2 images, 2 kept as arr_0 (1 undecodable image(s) skipped)" in result.stdout
    with np.load(tmp_path / "ref.npz") as ref:
        assert ref["arr_0"].shape == (2, 16, 16, 3)
