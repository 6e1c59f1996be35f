"""The `reglue` command line: help texts, dry runs, and one-line errors with exit code 2."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from reglue_cli.main import main

COMMANDS = ("encode", "train", "sample", "eval", "sweep", "compare")


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_top_level_help_lists_every_command_in_pipeline_order(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    listed = re.findall(r"^  (\w+) ", out.split("Commands:")[1], flags=re.MULTILINE)
    assert listed == list(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_has_help(capsys, command):
    code, out, _ = run(capsys, command, "--help")
    assert code == 0 and f"Usage: reglue {command}" in out


def test_train_help_teaches(capsys):
    _, out, _ = run(capsys, "train", "--help")
    for text in ("--preset", "--dry-run", "--set", "To resume, run the same command again", "sit-b2-reglue"):
        assert text in out


@pytest.mark.parametrize("preset, without, total", [
    ("sit-b2-reglue", 131_781_968, 139_126_864),
    ("sit-xl2-reglue", 677_033_552, 685_164_880),
    ("sit-b2", 130_500_112, 130_500_112),
    ("sit-xl2", 675_111_184, 675_111_184),
])
def test_dry_run_json_reports_the_paper_parameter_counts(capsys, preset, without, total):
    code, out, err = run(capsys, "train", "--preset", preset, "--dry-run", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["parameters"]["without_projector"] == without and report["parameters"]["total"] == total
    assert report["config"]["preset"] == preset
    assert report["parameters"]["trainable"] < total  # the frozen sin-cos table is not trained


def test_dry_run_text_and_overrides(capsys):
    code, out, _ = run(capsys, "train", "--preset", "tiny-reglue", "--set", "model.depth=3", "--max-steps", "7",
                       "--dry-run")
    assert code == 0
    assert "depth: 3" in out and "max_steps: 7" in out and "without_projector" in out


def test_dry_run_of_a_compressor_preset(capsys):
    code, out, _ = run(capsys, "train", "--preset", "compressor-dinov2-b", "--dry-run", "--json")
    assert code == 0 and json.loads(out)["parameters"]["encoder"] == 8_296_208


@pytest.mark.parametrize("argv, message", [
    (["train", "--preset", "sit-b3", "--dry-run"], "unknown preset 'sit-b3'; valid presets: "),
    (["train", "--preset", "tiny-sit", "--max-steps", "0", "--dry-run"], "--max-steps"),
    (["train", "--preset", "tiny-sit", "--precision", "fp8", "--dry-run"], "--precision"),
    (["train", "--preset", "tiny-sit", "--set", "model.depth=deep", "--dry-run"], "model.depth"),
    (["train", "--preset", "tiny-sit", "--set", "model.depth", "--dry-run"], "KEY=VALUE"),
    (["train", "--preset", "tiny-sit", "--json"], "--json only applies to --dry-run"),
    (["train", "--preset", "tiny-sit", "--bogus"], "No such option"),
    (["train"], "--preset"),
    (["frobnicate"], "No such command"),
    (["encode", "images/"], "Missing option '--out'"),
    (["sample"], "Missing option '--ckpt'"),
    (["eval"], "Missing argument"),
    (["compare", "no-such-run"], "no such file or directory"),
])
def test_bad_input_is_one_line_and_exit_code_2(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


def test_installed_console_script_runs():
    exe = shutil.which("reglue", path=os.path.dirname(sys.executable))
    assert exe, "the console script `reglue` is not installed beside this Python"
    done = subprocess.run([exe, "train", "--preset", "tiny-sit", "--dry-run", "--json"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["preset"] == "tiny-sit"
    bad = subprocess.run([exe, "train", "--preset", "nope", "--dry-run"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1


def test_an_unwritable_output_path_is_one_line_naming_it(tmp_path, capsys):
    run_dir = tmp_path / "run" / "eval"
    run_dir.mkdir(parents=True)
    (run_dir / "m.json").write_text(json.dumps({"fid": 1.0, "n": 10, "sample_info": {}}))
    (tmp_path / "blocker").write_text("a file where a directory is expected")
    code, out, err = run(capsys, "compare", str(tmp_path / "run"), "--plot", str(tmp_path / "blocker" / "fid.png"))
    assert code == 2 and err.count("\n") == 1 and "blocker" in err and "Not a directory" in err
    assert "Traceback" not in err


def test_output_directories_are_created_with_their_parents(tmp_path):
    from reglue.sampling.store import check_out_dir
    from reglue.training.rundir import RunDir

    run = RunDir(tmp_path / "runs" / "b2")
    data = {"path": "d.h5", "rows": 1, "content_sha256": "0" * 64}
    assert run.check({"a": 1}, data) is False  # a new run: nothing to resume, nothing written yet
    assert not (tmp_path / "runs").exists()
    run.begin({"a": 1}, data, step=0, is_main=True)
    assert (tmp_path / "runs/b2/config.yaml").exists() and (tmp_path / "runs/b2/checkpoints").is_dir()
    assert run.check({"a": 1}, data) is True
    assert check_out_dir(tmp_path / "runs" / "b2" / "samples-400k", "run-id", overwrite=False) is False


@pytest.mark.parametrize("command", [["encode", "images", "--out", "x.h5"], ["train", "--preset", "tiny-sit"],
                                     ["sample", "--ckpt", "x.pt", "--out", "s"], ["eval", "a.npz"]])
@pytest.mark.parametrize("device", ["bogus", "cuda:7"] + ([] if torch.cuda.is_available() else ["cuda"]))
def test_an_unusable_device_is_one_line_in_every_command(command, device, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main([*command, "--device", device])
    err = capsys.readouterr().err
    assert code == 2 and "--device" in err and repr(device) in err and err.count("\n") == 1, err
    assert not list(tmp_path.iterdir())  # refused before anything is written
