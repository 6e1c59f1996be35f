"""Generate and score in one process: `eval --ckpt` equals `sample` + `eval` exactly, whatever the batch size or
process count; FID during training (written, plotted, never recomputed on resume); guidance sweeps that resume
after SIGKILL; repeats over disjoint seeds; W&B offline runs."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import random_reference

from reglue_cli.main import main

REPO = Path(__file__).resolve().parents[1]
SAMPLING = ["--steps", "3", "--chunk", "3", "--vae", "tiny", "--cfg", "2"]


@pytest.fixture(scope="module")
def ckpt(random_reglue_checkpoint):
    return str(random_reglue_checkpoint)


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    return str(random_reference(tmp_path_factory.mktemp("ref") / "ref.npz", 10))


def _scoring(ref, *extra):
    return ["--ref", ref, "--inception-weights", "random", "--feature-chunk", "4", "--quiet", *extra]


def _features(path):
    with h5py.File(path, "r") as f:
        return {k: f[k][...] for k in ("pool", "spatial", "logits")}


@pytest.fixture(scope="module")
def in_process(ckpt, ref, tmp_path_factory):
    """`eval --ckpt` of 8 samples read 3 at a time, with its features: (JSON result, features)."""
    root = tmp_path_factory.mktemp("in_process")
    assert main(["eval", "--ckpt", ckpt, "--n", "8", *SAMPLING, *_scoring(ref, "--batch-size", "3"), "--features",
                 str(root / "b.h5"), "--json", str(root / "b.json")]) == 0
    return json.loads((root / "b.json").read_text()), _features(root / "b.h5")


def test_eval_ckpt_equals_sample_then_eval_exactly_for_any_batch_size(ckpt, ref, in_process, tmp_path):
    assert main(["sample", "--ckpt", ckpt, "--out", str(tmp_path / "s"), "--n", "8", "--batch-size", "4", *SAMPLING,
                 "--quiet"]) == 0
    assert main(["eval", str(tmp_path / "s" / "samples.npz"), *_scoring(ref, "--batch-size", "7"), "--features",
                 str(tmp_path / "a.h5"), "--json", str(tmp_path / "a.json")]) == 0
    a, (b, features) = json.loads((tmp_path / "a.json").read_text()), in_process
    for name, values in _features(tmp_path / "a.h5").items():  # read 7 at a time vs generated and read 3 at a time
        assert np.array_equal(values, features[name]), name
    assert abs(a["fid"] - b["fid"]) <= 1e-9 and a["sfid"] == b["sfid"] and a["precision"] == b["precision"]
    assert b["sampling"]["guidance"]["scale"] == 2.0 and b["sampling"]["steps"] == 3
    assert b["sample_info"]["generated_in_process"] and b["sample_info"]["step"] == 5
    assert b["samples_sha256"] is None and "generated in process" in b["samples"]
    assert main(["eval", "--ckpt", ckpt, "--n", "8", *SAMPLING, *_scoring(ref), "--save-samples",
                 str(tmp_path / "kept"), "--json", str(tmp_path / "c.json")]) == 0  # kept: `reglue sample`'s files
    c = json.loads((tmp_path / "c.json").read_text())
    assert np.array_equal(np.load(tmp_path / "kept" / "samples.npz")["arr_0"], np.load(tmp_path / "s" / "samples.npz")[
        "arr_0"]) and c["fid"] == a["fid"] and c["sampling"]["guidance"]["scale"] == 2.0


def test_eval_ckpt_under_torchrun_equals_one_process(ckpt, ref, in_process, tmp_path):
    # --num-samples, not --n: torchrun's own parser takes --n
    common = ["reglue_cli", "eval", "--ckpt", ckpt, "--num-samples", "8", *SAMPLING, *_scoring(ref)]
    # rank 0's reference-cache write made slower (5 s) than the collective timeout (3 s): the sample features'
    # all-gather that follows would time out on rank 1 if it had waited on a collective
    env = {**os.environ, "REGLUE_FEATURE_CACHE": str(tmp_path / "cache"), "REGLUE_DIST_TIMEOUT": "3",
           "REGLUE_SLOW_MAIN_PHASE": "reference-cache:5"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29571", "-m", *common, "--batch-size", "5", "--json", str(tmp_path / "two.json")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-2000:]
    one, two = in_process[0], json.loads((tmp_path / "two.json").read_text())
    for key in ("fid", "sfid", "inception_score", "precision", "recall"):
        assert one[key] == two[key], key


def test_repeats_report_mean_and_std_over_disjoint_seeds(ckpt, ref, tmp_path):
    assert main(["eval", "--ckpt", ckpt, "--n", "4", *SAMPLING, *_scoring(ref), "--repeats", "2", "--json",
                 str(tmp_path / "r.json")]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    seeds = [r["sampling"]["seed"] for r in result["repeats"]]
    assert seeds == [0, 1] and result["fid"] == result["repeats"][0]["fid"]
    for key in ("fid", "inception_score", "precision"):
        values = np.array([r[key] for r in result["repeats"]], dtype=np.float64)
        assert result["spread"][key]["mean"] == pytest.approx(float(np.mean(values)), rel=1e-12)
        assert result["spread"][key]["std"] == pytest.approx(float(np.std(values, ddof=1)), rel=1e-12)
    assert result["repeats"][0]["fid"] != result["repeats"][1]["fid"]  # other seeds, other images


@pytest.mark.parametrize("argv, message", [
    (["eval", "x.npz", "--ckpt", "c.pt"], "not both"),
    (["eval", "x.npz", "--repeats", "2"], "go with --ckpt"),
    (["sweep", "--ckpt", "c.pt", "--cfg", "3:1:0.5", "--out", "o"], "START:STOP:STEP"),
])
def test_bad_requests_are_one_line_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def data(toy_encoded):
    return str(toy_encoded)


def _train(data, run, ref, steps, *extra):
    return main(["train", "--preset", "tiny-sit", "--data", data, "--outdir", str(run), "--max-steps", str(steps),
                 "--global-batch", "4", "--ckpt-every", "4", "--workers", "0", "--quiet", "--eval-every", "4",
                 "--eval-n", "4", "--eval-ref", ref, "--inception-weights", "random", "--feature-chunk", "4", *extra])


def test_eval_every_writes_each_step_once_and_compare_plots_them(data, ref, tmp_path, monkeypatch):
    import reglue.scoring.generate_and_score as scoring

    run = tmp_path / "run"
    assert _train(data, run, ref, 8) == 0
    files = sorted(p.name for p in (run / "eval").glob("*.json"))
    assert files == ["0000004.json", "0000008.json"]
    first = json.loads((run / "eval" / "0000004.json").read_text())
    assert first["sample_info"]["step"] == 4 and first["sampling"]["steps"] == 20  # the preset's sampling section
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "eval" in r] == [4, 8]
    assert [r["eval"]["fid"] for r in lines if "eval" in r] == [first["fid"], json.loads(
        (run / "eval" / "0000008.json").read_text())["fid"]]

    calls = []
    real = scoring.score
    monkeypatch.setattr(scoring, "score", lambda *a, **k: calls.append(a[0].attrs["step"]) or real(*a, **k))
    stamp = (run / "eval" / "0000004.json").stat().st_mtime_ns
    assert _train(data, run, ref, 8) == 0 and calls == []  # resumed: nothing recomputed
    (run / "eval" / "0000008.json").unlink()  # as if killed while scoring step 8, after its checkpoint
    assert _train(data, run, ref, 8) == 0 and calls == [8]
    assert (run / "eval" / "0000004.json").stat().st_mtime_ns == stamp

    assert main(["compare", str(run), "--baselines", "none", "--format", "json", "--plot",
                 str(tmp_path / "f.png")]) == 0
    assert (tmp_path / "f.png").stat().st_size > 1000


def test_wandb_offline_run_of_training(data, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    assert main(["train", "--preset", "tiny-sit", "--data", data, "--outdir", str(run), "--max-steps", "2",
                 "--global-batch", "4", "--log-every", "1", "--workers", "0", "--quiet", "--wandb", "reglue-test"]) == 0
    offline = list((run / "wandb").glob("offline-run-*/*.wandb"))
    assert len(offline) == 1 and offline[0].stat().st_size > 0
    assert (run / "wandb_id.txt").read_text().strip() in offline[0].parent.name


def _sweep_argv(ckpt, ref, out, *extra):
    return ["sweep", "--ckpt", ckpt, "--cfg", "1:2:0.5", "--n", "4", "--steps", "3", "--chunk", "3", "--vae", "tiny",
            "--ref", ref, "--inception-weights", "random", "--feature-chunk", "4", "--out", str(out), "--quiet", *extra]


def test_sweep_writes_table_and_plot_and_resumes_after_sigkill_point_by_point(ckpt, ref, tmp_path, monkeypatch,
                                                                           capsys):
    import reglue.scoring.generate_and_score as scoring

    out = tmp_path / "sweep"
    env = {**os.environ, "REGLUE_FEATURE_CACHE": os.environ["REGLUE_FEATURE_CACHE"]}
    proc = subprocess.Popen([sys.executable, "-m", "reglue_cli", *_sweep_argv(ckpt, ref, out)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and not list((out / "points").glob("*.json")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {p.name: p.stat().st_mtime_ns for p in (out / "points").glob("*.json")}
    assert 1 <= len(finished) < 3, "the kill should land between points"

    scored = []
    real = scoring.score  # every point is scored through it
    monkeypatch.setattr(scoring, "score", lambda p, *a, **k: scored.append(p.settings.guidance.scale) or
                        real(p, *a, **k))
    assert main(_sweep_argv(ckpt, ref, out)) == 0
    assert len(scored) == 3 - len(finished)  # only the unfinished points
    assert {p.name: p.stat().st_mtime_ns for p in (out / "points").glob("*.json") if p.name in finished} == finished
    text = capsys.readouterr().out
    assert "<- best FID" in text and "best: FID" in text
    table = (out / "sweep.txt").read_text()
    assert [line.split()[1] for line in table.splitlines()[1:]] == ["1", "1.5", "2"]
    assert (out / "sweep.png").stat().st_size > 1000

    [point] = (out / "points").glob("cfg1.5_clssame_t0-0.9_*.json")  # a readable prefix, then the identity key
    rows = json.loads(point.read_text())
    assert rows["sampling"]["guidance"]["scale"] == 1.5 and rows["sampling"]["seed"] == 0  # common random numbers
    assert point.stem.endswith(rows["identity_key"]) and rows["identity"]["sampling"]["settings"]["seed"] == 0
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    assert main(_sweep_argv(ckpt, ref, out, "--format", "csv", "--wandb", "reglue-test")) == 0
    assert len(scored) == 3 - len(finished)  # nothing recomputed
    assert (out / "sweep.csv").read_text().splitlines()[0].startswith("interval,cfg,cls_cfg,fid")
    if importlib.util.find_spec("wandb"):
        assert len(list((out / "wandb").glob("offline-run-*/*.wandb"))) == 1
    assert main(_sweep_argv(ckpt, ref, out, "--seed", "1")) == 2  # another sweep's points: refused
    assert "sampling.settings.seed (0 -> 1)" in capsys.readouterr().err


def test_eval_ckpt_with_two_extra_families_generates_every_image_once(ckpt, ref, tmp_path, monkeypatch):
    """clean_fid and kid take their features in the ADM pass: each chunk of samples is generated once, not once per
    family; the families' numbers equal those of the same images scored from a file."""
    import reglue.sampling.generate as generate

    made = []
    real = generate.sample_chunk
    monkeypatch.setattr(generate, "sample_chunk", lambda *a, **k: made.append(list(a[3])) or real(*a, **k))
    families = ["--metrics", "clean_fid,kid", "--batch-size", "3"]
    assert main(["eval", "--ckpt", ckpt, "--n", "8", *SAMPLING, *_scoring(ref, *families), "--json",
                 str(tmp_path / "b.json")]) == 0
    assert sorted(i for chunk in made for i in chunk) == list(range(8))  # 3 chunks of 3, 3, 2: each made once
    assert main(["sample", "--ckpt", ckpt, "--out", str(tmp_path / "s"), "--n", "8", *SAMPLING, "--quiet"]) == 0
    assert main(["eval", str(tmp_path / "s" / "samples.npz"), *_scoring(ref, *families), "--json",
                 str(tmp_path / "a.json")]) == 0
    a, b = (json.loads((tmp_path / f"{x}.json").read_text())["families"]["clean-fid"] for x in "ab")
    assert a["clean_fid"] == b["clean_fid"] and a["kid"] == b["kid"]
