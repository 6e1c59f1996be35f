"""`reglue sweep` never mixes settings: every point carries its complete identity (reglue.scoring.identity), named by
it; a rerun with another class, Inception weights or reference content is refused on one line (old points kept,
byte for byte) unless --new-set starts a new set; close scales are distinct points. Every input is checked before
the first point is scored: bad ranges, a guided unconditional model, seeds past MAX_SEED, damaged sweep files."""

import json
import shutil
import time

import pytest
import torch
from conftest import random_reference

import reglue.scoring.sweep as sweep
from reglue.scoring.identity import differences
from reglue.scoring.sweep import HARD_MAX_POINTS, MAX_POINTS, SweepError, grid, parse_values
from reglue_cli.main import main


@pytest.fixture(scope="module")
def ckpt(random_reglue_checkpoint):
    return str(random_reglue_checkpoint)


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    return random_reference(tmp_path_factory.mktemp("ref") / "ref.npz", 8)


def _argv(ckpt, ref, out, *extra, cfg="1.5", weights="random"):
    return ["sweep", "--ckpt", str(ckpt), "--cfg", cfg, "--n", "4", "--steps", "2", "--chunk", "2", "--vae", "tiny",
            "--ref", str(ref), "--inception-weights", str(weights), "--feature-chunk", "4", "--device", "cpu",
            "--out", str(out), "--quiet", *extra]


@pytest.fixture(scope="module")
def base(ckpt, ref, tmp_path_factory):
    """A finished one-point sweep (--cfg 1.5), copied by each test that reruns it."""
    out = tmp_path_factory.mktemp("base") / "sweep"
    assert main(_argv(ckpt, ref, out)) == 0
    return out


@pytest.fixture
def scored(monkeypatch):
    """score_repeats replaced by a stand-in (FID = the scale): for tests of the directory logic, not the numbers;
    the guidance scale of every point scored, in order."""
    return _scored(monkeypatch)


def _scored(monkeypatch) -> list:
    calls = []

    def fake(prepared, *args, **kwargs):
        scale = prepared.settings.guidance.scale
        calls.append(scale)
        return {**{key: scale for key in sweep.METRICS}, "sampling": prepared.settings.describe()}
    monkeypatch.setattr(sweep, "score_repeats", fake)
    return calls


def _points(out) -> dict:
    return {p.name: p.read_bytes() for p in (out / "points").glob("*.json")}


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def _table_cfgs(out) -> list[str]:
    return [line.split()[1] for line in (out / "sweep.txt").read_text().splitlines()[1:]]


def _changed_weights(tmp_path) -> str:
    """A copy of the random Inception weights with one tensor changed."""
    from evaluation.inception import random_weights_file

    state = torch.load(random_weights_file(), weights_only=True)
    key = next(k for k in state if k.endswith(".weight"))
    state[key] = state[key] * 1.01
    path = tmp_path / "inception-changed.pth"
    torch.save(state, path)
    return str(path)


def _replaced_reference(ref, tmp_path):
    """(a copy of ``ref`` at another path, a function that replaces its content in place)."""
    copy = tmp_path / "ref-copy.npz"
    shutil.copy(ref, copy)

    def replace():
        random_reference(copy, 8, seed=1)
    return copy, replace


@pytest.mark.parametrize("change", ["class", "inception_weights", "reference"])
def test_a_changed_setting_is_refused_and_new_set_starts_a_set_beside_the_old_points(change, ckpt, ref, base,
                                                                                    tmp_path, scored, capsys):
    out = tmp_path / "sweep"
    shutil.copytree(base, out)
    old = _points(out)
    extra, weights, reference = [], "random", ref
    if change == "class":
        extra, setting = ["--class", "3"], "sampling.settings.classes (absent -> [3])"
    elif change == "inception_weights":
        weights, setting = _changed_weights(tmp_path), "evaluator.inception_weights_sha256"
    else:
        reference, replace = _replaced_reference(ref, tmp_path)
        assert main(_argv(ckpt, reference, out)) == 0 and scored == []  # moved, same content: the same sweep
        replace()
        setting = "evaluator.reference_sha256"
    capsys.readouterr()

    assert main(_argv(ckpt, reference, out, *extra, weights=weights)) == 2
    err = _one_line_error(capsys)
    assert setting in err and "--new-set" in err
    assert scored == [] and _points(out) == old  # nothing scored, the old points byte for byte

    assert main(_argv(ckpt, reference, out, "--new-set", *extra, weights=weights)) == 0
    assert scored == [1.5]
    points = _points(out)
    assert len(points) == 2 and {k: points[k] for k in old} == old  # a new point file beside the old one
    manifest = json.loads((out / "sweep.json").read_text())
    new_point = json.loads(next(v for k, v in points.items() if k not in old))
    assert differences(manifest["identity"], sweep.shared_identity(new_point["identity"])) == []
    assert _table_cfgs(out) == ["1.5"]  # only the current set's point

    assert main(_argv(ckpt, reference, out, *extra, weights=weights)) == 0 and scored == [1.5]  # resumes the new set
    assert main(_argv(ckpt, ref, out)) == 2 and _points(out) == points  # the old set is now the other one


def test_close_scales_are_two_points_and_equal_ones_one(ckpt, ref, base, tmp_path, scored, capsys):
    out = tmp_path / "sweep"
    shutil.copytree(base, out)
    assert main(_argv(ckpt, ref, out, cfg="1.5,1.5000001")) == 0
    assert scored == [1.5000001]  # 1.5 was already there
    assert len(_points(out)) == 2
    assert _table_cfgs(out) == ["1.5", "1.5000001"]
    assert "cfg 1.5" in capsys.readouterr().out
    assert main(_argv(ckpt, ref, out, cfg="1.5,1.5")) == 0 and len(scored) == 1
    assert _table_cfgs(out) == ["1.5"]
    assert parse_values("1.5,1.5", "--cfg") == [1.5] and parse_values("0:0.3:0.1", "--cfg") == [0, 0.1, 0.2, 0.3]


@pytest.mark.parametrize("extra, message", [
    (["--cfg", "nan"], "--cfg nan: nan is not a finite number"),
    (["--cfg", "inf"], "--cfg inf: inf is not a finite number"),
    (["--cfg", "1:inf:1"], "--cfg 1:inf:1: inf is not a finite number"),
    (["--cfg", "2:1:0.5"], "START <= STOP and STEP > 0"),
    (["--cfg", "0:1e12:1"], f"1,000,000,000,001 values; one sweep has at most {HARD_MAX_POINTS:,}"),
    (["--cfg", "0:1000:0.001", "--many-points"], f"at most {HARD_MAX_POINTS:,}"),
    (["--cfg", "0:10:0.01"], f"1,001 points (--cfg x --cls-cfg x --interval), more than {MAX_POINTS}"),
    (["--cfg", "0:1:0.1", "--cls-cfg", "0:1:0.1", "--interval", "0,1", "--interval", "0,0.9"], "242 points"),
    (["--cfg", "2", "--repeats", str(10**20)], "--repeats 100000000000000000000 from --seed 0"),
    (["--cfg", "2", "--repeats", "4095", "--seed", "2"], "use --repeats 1..4094"),
])
def test_bad_grids_and_seed_ranges_are_one_line_before_anything_is_loaded(extra, message, tmp_path, capsys):
    started = time.monotonic()
    assert main(["sweep", "--ckpt", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "o"), *extra]) == 2
    assert message in _one_line_error(capsys)
    assert time.monotonic() - started < 5 and not (tmp_path / "o").exists()


def test_the_grid_limits():
    assert len(grid(parse_values("0:10:0.01", "--cfg"), None, [None], many_points=True)) == 1001
    assert len(grid([1.0, 2.0], None, [(0, 0.9), (0, 0.9)])) == 2  # an interval given twice is one
    with pytest.raises(SweepError, match="at most"):
        grid(parse_values("0:99.99:0.01", "--cfg"), [1.0, 2.0], [None], many_points=True)  # 20,000 points


def test_an_unconditional_model_with_guidance_is_refused_before_any_point_is_scored(ref, tmp_path, scored, capsys):
    from reglue import checkpoints, presets
    from reglue.models import build

    config = presets.load("tiny-sit", model__num_classes=0)
    path = tmp_path / "uncond.pt"
    checkpoints.save_checkpoint(path, config=config, step=1, model=build(config), ema=build(config))
    out = tmp_path / "sweep"
    assert main(_argv(path, ref, out, cfg="1,2")) == 2  # the first point (1) alone would score
    assert "unconditional model has no classifier-free guidance" in _one_line_error(capsys)
    assert scored == [] and not (out / "points").exists() and not (out / "sweep.json").exists()


@pytest.mark.parametrize("content", [b"\x00garbage", b"", b"[]", b'{"identity": "x"}'])
def test_a_damaged_manifest_is_one_line_naming_it(content, ckpt, ref, base, tmp_path, scored, capsys):
    out = tmp_path / "sweep"
    shutil.copytree(base, out)
    (out / "sweep.json").write_bytes(content)
    assert main(_argv(ckpt, ref, out)) == 2
    assert f"{out / 'sweep.json'}:" in _one_line_error(capsys) and scored == []
    assert main(_argv(ckpt, ref, out, "--new-set")) == 0 and scored == []  # its points are exact matches: reused


def test_a_damaged_point_file_is_said_and_scored_again(ckpt, ref, base, tmp_path, scored, capsys):
    out = tmp_path / "sweep"
    shutil.copytree(base, out)
    [point] = (out / "points").glob("*.json")
    result = json.loads(point.read_text())
    point.write_text(json.dumps({**result, "fid": "12.5"}))  # a string FID
    assert main(_argv(ckpt, ref, out)) == 0
    err = capsys.readouterr().err
    assert f"{point}: fid is '12.5', not a number; scoring the point again" in err and scored == [1.5]
    rescored = json.loads(point.read_text())
    assert rescored["fid"] == 1.5 and rescored["identity"] == result["identity"]  # replaced, under the same name


def test_a_refused_sweep_opens_no_wandb_run(ckpt, ref, base, tmp_path, scored, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "sweep"
    shutil.copytree(base, out)
    assert main(_argv(ckpt, ref, out, "--seed", "1", "--wandb", "reglue-test")) == 2
    assert "sampling.settings.seed (0 -> 1)" in _one_line_error(capsys)
    assert not (out / "wandb_id.txt").exists() and not (out / "wandb").exists()


def test_a_failed_launch_leaves_nothing_that_blocks_the_corrected_command(ckpt, ref, base, tmp_path, capsys,
                                                                        monkeypatch):
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not an npz")
    for out in (tmp_path / "new", tmp_path / "old"):  # a new sweep, and a new set in a sweep directory
        if out.name == "old":
            shutil.copytree(base, out)
        before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} if out.exists() else {}
        for argv, message in ((_argv(ckpt, tmp_path / "missing.npz", out, "--new-set"), "missing.npz"),
                              (_argv(ckpt, ref, out, "--new-set", weights=tmp_path / "none.pth"), "none.pth"),
                              (_argv(ckpt, garbage, out, "--new-set"), "garbage.npz")):
            assert main(argv) == 2
            assert message in _one_line_error(capsys)
            assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before

    def full_disk(*args, **kwargs):  # a failure while the first point is scored
        raise OSError(28, "No space left on device", str(tmp_path / "somewhere"))
    monkeypatch.setattr(sweep, "score_repeats", full_disk)
    assert main(_argv(ckpt, ref, out, cfg="2")) == 2
    assert "No space left" in _one_line_error(capsys)
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before

    scored = _scored(monkeypatch)  # the corrected command: the directory logic is what this test is about
    assert main(_argv(ckpt, ref, out, cfg="2")) == 0 and scored == [2.0] and len(_points(out)) == 2
