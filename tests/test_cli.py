"""The `reglue` command line: help texts (grouped in sections), dry runs, `make-ref` and its deprecated
`eval --make-ref` spelling, and one-line errors with exit code 2."""

import json
import os
import re
import shutil
import subprocess
import sys

import click
import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from reglue_cli.help_sections import OptionGroup, SectionedCommand, option, with_options
from reglue_cli.main import cli, main

COMMANDS = ("encode", "train", "ema", "sample", "make-ref", "eval", "sweep", "probe", "compare")
SECTIONS = {  # the --help sections of the commands with many options, in order
    "encode": ["Inputs", "Encoder", "Output", "Run"],
    "train": ["Preset", "Inputs", "Output", "Evaluator", "Alignment probe", "Run"],
    "sample": ["Inputs", "Sampler", "Guidance", "Output", "Run"],
    "make-ref": ["Inputs", "Evaluator", "Output", "Run"],
    "eval": ["Inputs", "Sampler", "Guidance", "Evaluator", "Output", "Run"],
    "sweep": ["Inputs", "Guidance", "Sampler", "Post-hoc EMA", "Evaluator", "Output", "Run"],
    "ema": ["Target", "Output", "Inspect", "Run"],
    "probe": ["Inputs", "Probe", "Output", "Run"],
}
DEPRECATED_EVAL_OPTIONS = [("--make-ref",), ("--out",), ("--resolution",)]  # `eval --make-ref`: hidden


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_top_level_help_lists_every_command_in_pipeline_order(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    listed = re.findall(r"^  ([\w-]+) ", out.split("Commands:")[1], flags=re.MULTILINE)
    assert listed == list(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_has_help(capsys, command):
    code, out, _ = run(capsys, command, "--help")
    assert code == 0 and f"Usage: reglue {command}" in out


def help_sections(text: str) -> list[tuple[str, list[tuple[str, ...]]]]:
    """(section title, the option names of each entry listed under it) for every section of a --help text."""
    sections = []
    for line in text.splitlines():
        if re.fullmatch(r"\S[^:]*:", line):  # a title: unindented, ending in a colon ("Usage: ..." goes on)
            sections.append((line[:-1], []))
        elif sections and line.startswith("  -"):  # an entry: its term, then two spaces or more and its help
            term = re.split(r"\s{2,}", line.strip())[0]
            sections[-1][1].append(tuple(word.rstrip(",") for word in term.split() if word.startswith("-")))
    return sections


def declared_options(command: str) -> list[tuple[str, ...]]:
    """The option names of every visible option the command declares, --help included."""
    params = cli.commands[command].params
    return [tuple(p.opts) for p in params if isinstance(p, click.Option) and not p.hidden] + [("-h", "--help")]


@pytest.mark.parametrize("command", SECTIONS)
def test_help_lists_every_option_once_in_named_sections(capsys, command):
    code, out, _ = run(capsys, command, "--help")
    assert code == 0
    sections = help_sections(out)
    assert [title for title, _ in sections] == SECTIONS[command]  # no flat "Options:" list, no title twice
    listed = [names for _, entries in sections for names in entries]
    assert sorted(listed) == sorted(declared_options(command))
    assert all(entries for _, entries in sections)


def test_help_sections_come_from_the_option_groups():
    group = OptionGroup("Knobs", [option("--a", help="a"), option("--b", is_flag=True, help="b")])

    @click.command(cls=SectionedCommand)
    @with_options(group, OptionGroup("Run", [option("--c", help="c")]), OptionGroup("Knobs", [option("--d")]))
    def command(a, b, c, d):
        """A command."""

    text = command.get_help(click.Context(command, info_name="x"))
    assert help_sections(text) == [("Knobs", [("--a",), ("--b",), ("--d",)]), ("Run", [("--c",), ("--help",)])]
    with pytest.raises(TypeError, match="'loose'.*OptionGroup"):  # every visible option has a section
        click.command(cls=SectionedCommand)(click.option("--loose")(lambda loose: None))


def test_eval_help_hides_the_deprecated_make_ref_and_points_to_the_command(capsys):
    _, out, _ = run(capsys, "eval", "--help")
    listed = [names for _, entries in help_sections(out) for names in entries]
    assert not set(DEPRECATED_EVAL_OPTIONS) & set(listed)
    assert "reglue make-ref" in out and "--make-ref" not in out


def test_make_ref_help_teaches(capsys):
    _, out, _ = run(capsys, "make-ref", "--help")
    assert "Usage: reglue make-ref [OPTIONS] IMAGES_OR_H5" in out
    for text in ("reglue eval --ref", "mu, sigma", "10,000", "The ADM crop", "centre-cropped", "reglue make-ref /data",
                 "reglue make-ref data.h5 --out ref.npz"):
        assert text in out, text


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
    (["eval"], "Missing argument 'SAMPLES' (or --ckpt CKPT to generate and score; `reglue make-ref` builds a "),
    (["make-ref", "images/"], "Missing option '--out'"),
    (["make-ref", "--out", "ref.npz"], "Missing argument 'IMAGES_OR_H5'"),
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
                                     ["sample", "--ckpt", "x.pt", "--out", "s"], ["eval", "a.npz"],
                                     ["make-ref", "images", "--out", "ref.npz"]])
@pytest.mark.parametrize("device", ["bogus", "cuda:7"] + ([] if torch.cuda.is_available() else ["cuda"]))
def test_an_unusable_device_is_one_line_in_every_command(command, device, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main([*command, "--device", device])
    err = capsys.readouterr().err
    assert code == 2 and "--device" in err and repr(device) in err and err.count("\n") == 1, err
    assert not list(tmp_path.iterdir())  # refused before anything is written


@pytest.fixture(scope="module")
def weights() -> str:
    from evaluation.inception import random_weights_file

    return str(random_weights_file())


def image_folder(root, n: int = 3, side: int = 16) -> np.ndarray:
    """``n`` random ``side`` px PNGs in root/a/0.png ...; returns them, in file order."""
    images = np.random.default_rng(5).integers(0, 256, (n, side, side, 3), dtype=np.uint8)
    (root / "a").mkdir(parents=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(root / "a" / f"{i}.png")
    return images


MAKE_REF_OPTIONS = ("--resolution", "16", "--feature-chunk", "4", "--quiet")


def test_make_ref_writes_an_adm_reference_of_a_folder(tmp_path, capsys, weights):
    images = image_folder(tmp_path / "imgs")
    out_path = tmp_path / "ref.npz"
    code, out, err = run(capsys, "make-ref", str(tmp_path / "imgs"), "--out", str(out_path), "--inception-weights",
                         weights, *MAKE_REF_OPTIONS)
    assert code == 0 and err == "", err
    assert out == f"reference batch {out_path}: statistics over 3 images, 3 kept as arr_0\n"
    with np.load(out_path) as ref:
        assert sorted(ref.files) == ["arr_0", "mu", "mu_s", "sigma", "sigma_s"]
        np.testing.assert_array_equal(ref["arr_0"], images)  # 16 px already: the 16 px ADM crop leaves them as they are
        assert ref["mu"].shape == (2048,) and ref["sigma"].shape == (2048, 2048)
        assert ref["mu_s"].shape == (2023,) and ref["sigma_s"].shape == (2023, 2023)


def test_the_deprecated_eval_make_ref_notes_it_and_writes_the_same_file(tmp_path, capsys, weights):
    image_folder(tmp_path / "imgs")
    argv = [str(tmp_path / "imgs"), "--inception-weights", weights, *MAKE_REF_OPTIONS]
    code, new_out, new_err = run(capsys, "make-ref", *argv, "--out", str(tmp_path / "new.npz"))
    assert code == 0 and new_err == ""
    code, old_out, old_err = run(capsys, "eval", "--make-ref", *argv, "--out", str(tmp_path / "old.npz"))
    assert code == 0
    assert old_err.count("\n") == 1 and old_err.startswith("note: `reglue eval --make-ref` is deprecated")
    assert "use `reglue make-ref SOURCE --out REF.npz`" in old_err
    assert old_out == new_out.replace("new.npz", "old.npz")
    assert (tmp_path / "old.npz").read_bytes() == (tmp_path / "new.npz").read_bytes()


def test_the_deprecated_eval_make_ref_still_needs_out(tmp_path, capsys):
    code, out, err = run(capsys, "eval", "--make-ref", str(tmp_path))
    lines = err.splitlines()
    assert code == 2 and out == "" and len(lines) == 2, err
    assert lines[0].startswith("note: `reglue eval --make-ref` is deprecated")
    assert lines[1] == "reglue eval: error: --make-ref needs --out REF.npz"


def test_make_ref_keeps_an_encoded_datasets_images_as_stored(toy_encoded, tmp_path, capsys, weights):
    code, out, err = run(capsys, "make-ref", str(toy_encoded), "--out", str(tmp_path / "ref.npz"),
                         "--inception-weights", weights, "--feature-chunk", "8", "--quiet")
    assert code == 0, err
    with h5py.File(toy_encoded, "r") as f, np.load(tmp_path / "ref.npz") as ref:
        stored = f["images"][:]
        np.testing.assert_array_equal(ref["arr_0"], stored)  # fewer than 10,000: every image kept, in order
    assert f"statistics over {len(stored)} images, {len(stored)} kept as arr_0" in out
