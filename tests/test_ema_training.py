"""Post-hoc EMA in a real run: the power-function EMAs follow the float64 update, tracking them changes nothing of
the training, a profile rebuilt from snapshots equals one tracked directly, the rebuilt checkpoint samples and
scores, an EMA x guidance sweep resumes after SIGKILL, and the configuration refuses keys nothing would read."""

import csv
import io
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
import torch
from conftest import random_reference
from helpers import assert_one_line, reglue

from reglue import checkpoints, presets
from reglue import config as run_config
from reglue.errors import ConfigError
from reglue.training.diffusion import TrainOptions, train_diffusion
from reglue_cli.main import main

REPO = Path(__file__).resolve().parents[1]
STEPS = 8


def _train(data, outdir, **ema):
    """A tiny-sit run of STEPS steps with a checkpoint every step (the raw weights of each step are kept)."""
    config = presets.load("tiny-sit", train__global_batch=8, train__sample_every=0, train__log_every=100,
                          train__ckpt_every=1, train__max_steps=STEPS, **ema)
    options = TrainOptions(data=str(data), outdir=str(outdir), workers=0, progress=False, echo=lambda s: None,
                           keep_last=STEPS)
    return train_diffusion(config, options)


@pytest.fixture(scope="module")
def runs(toy_encoded, tmp_path_factory):
    """Three runs of the same seed: snapshots of sigma_rel 0.05 and 0.10 at every step (fp32); 0.07 alone,
    snapshotted at the end; no power-function EMA at all."""
    root = tmp_path_factory.mktemp("ema_runs")
    _train(toy_encoded, root / "pair", ema__sigma_rels=[0.05, 0.10], ema__snapshot_every=1,
           ema__snapshot_precision="fp32")
    _train(toy_encoded, root / "single", ema__sigma_rels=[0.07], ema__snapshot_every=STEPS,
           ema__snapshot_precision="fp32")
    _train(toy_encoded, root / "plain")
    return root


def _flat(state: dict) -> np.ndarray:
    return np.concatenate([v.double().numpy().ravel() for k, v in sorted(state.items())])


def _sigma_to_gamma(sigma: float) -> float:
    """The test's own inverse of sigma_rel^2 = (g+1) / ((g+2)^2 (g+3)): the largest real root of the cubic."""
    roots = np.roots([sigma**2, 7 * sigma**2, 16 * sigma**2 - 1, 12 * sigma**2 - 1])
    return max(r.real for r in roots if abs(r.imag) < 1e-9)


def test_tracked_profiles_follow_the_float64_update_and_change_nothing_else(runs):
    raw = [_flat(checkpoints.load_checkpoint(runs / f"pair/checkpoints/{t:07d}.pt")["model"])
           for t in range(1, STEPS + 1)]
    for k, sigma in enumerate((0.05, 0.10)):
        exponent, ema = _sigma_to_gamma(sigma) + 1, np.zeros_like(raw[0])
        for t in range(1, STEPS + 1):
            beta = (1 - 1 / t) ** exponent
            ema = beta * ema + (1 - beta) * raw[t - 1]
            snapshot = torch.load(runs / f"pair/ema/{t:07d}.pt", weights_only=True)
            assert snapshot["step"] == t and snapshot["profiles"][k]["sigma_rel"] == sigma
            tracked = _flat(snapshot["weights"][k])
            assert np.max(np.abs(tracked - ema)) < 1e-6 * np.max(np.abs(ema)), (sigma, t)
    pair = checkpoints.load_checkpoint(runs / f"pair/checkpoints/{STEPS:07d}.pt")
    plain = checkpoints.load_checkpoint(runs / f"plain/checkpoints/{STEPS:07d}.pt")
    assert "power_ema" not in plain and pair["power_ema"]["sigma_rels"] == [0.05, 0.10]
    for part in ("model", "ema"):  # the classic EMA and the training itself: the same bits with or without
        assert all(torch.equal(pair[part][k], plain[part][k]) for k in plain[part]), part
    assert plain["config"]["ema"]["decay"] == 0.9999 and "ema_decay" not in plain["config"]["optim"]


def test_a_profile_rebuilt_from_snapshots_equals_the_one_tracked_directly(runs, tmp_path, capsys):
    out = tmp_path / "ema07.pt"
    assert main(["ema", str(runs / "pair"), "--sigma-rel", "0.07", "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert f"sigma_rel 0.07 at step {STEPS} from {STEPS} snapshot(s)" in said
    rebuilt = checkpoints.load_checkpoint(out)
    direct = torch.load(runs / f"single/ema/{STEPS:07d}.pt", weights_only=True)["weights"][0]
    a, b = _flat(rebuilt["ema"]), _flat(direct)
    assert np.max(np.abs(a - b)) < 1e-5 * np.max(np.abs(b))  # fp32 snapshots, float64 sums
    assert rebuilt["model"] is None and rebuilt["step"] == STEPS
    record = rebuilt["extra"]["post_hoc_ema"]
    assert record["residual"] < 1e-6 and record["snapshot_steps"] == list(range(1, STEPS + 1))


def test_the_rebuilt_checkpoint_samples_and_scores_and_says_which_ema(runs, tmp_path):
    out = tmp_path / "ema06.pt"
    assert main(["ema", str(runs / "pair"), "--sigma-rel", "0.06", "--step", "6", "--out", str(out)]) == 0
    args = ["--ckpt", str(out), "--n", "4", "--steps", "2", "--vae", "tiny", "--quiet"]
    assert main(["sample", *args, "--out", str(tmp_path / "s")]) == 0
    ref = random_reference(tmp_path / "ref.npz", 6)
    assert main(["eval", *args, "--ref", str(ref), "--inception-weights", "random", "--json",
                 str(tmp_path / "m.json")]) == 0
    result = json.loads((tmp_path / "m.json").read_text())
    ema = result["sample_info"]["ema"]
    assert ema["kind"] == "post-hoc" and ema["sigma_rel"] == 0.06 and ema["step"] == 6
    with h5py.File(tmp_path / "s" / "samples.h5", "r") as f:  # what `reglue eval` reads back from the file
        assert json.loads(f.attrs["ema"]) == ema
    shown = list(csv.DictReader(io.StringIO(reglue("compare", tmp_path / "m.json", "--format", "csv").stdout)))
    assert [row["EMA"] for row in shown if row["source"] == str(tmp_path / "m.json")] == ["post-hoc 0.06"]
    assert {row["EMA"] for row in shown if row["source"] != str(tmp_path / "m.json")} == {"-"}  # published: unsaid


@pytest.mark.parametrize("run, argv, words", [
    ("pair", ["--sigma-rel", "0.07", "--step", "9"], ["step 9", "snapshots end at step 8"]),
    ("pair", ["--sigma-rel", "0.3"], ["sigma_rel 0.3", "0 < sigma_rel < 0.2887"]),
    ("single", ["--sigma-rel", "0.02"],
     ["sigma_rel 0.02 at step 8", "relative error of 0.2", "support sigma_rel 0.065 to 0.075"]),
    ("pair", ["--sigma-rel", "0.07"], ["--out is missing", "sigma_rel 0.07 at step 8"]),
])
def test_targets_the_snapshots_cannot_give_are_one_line(runs, run, argv, words, tmp_path):
    assert_one_line(reglue("ema", runs / run, *argv, *(["--out", tmp_path / "x.pt"] if run == "single" else [])),
                    *words)
    assert not list(tmp_path.iterdir())


def test_list_shows_snapshots_range_and_the_classic_equivalent(runs, toy_encoded, tmp_path, capsys):
    assert main(["ema", str(runs / "pair"), "--list"]) == 0
    text = capsys.readouterr().out
    rows = [line.split() for line in text.splitlines()[1:STEPS + 1]]
    assert [(r[0], r[1], r[2], r[3]) for r in rows] == [(str(t), "0.05,", "0.1", "fp32") for t in range(1, STEPS + 1)]
    assert f"{STEPS} snapshots" in text and "support sigma_rel 0.01 to 0.28" in text
    assert "classic EMA (decay 0.9999)" in text
    assert main(["ema", "--decay", "0.9999", "--at-step", "400000"]) == 0
    assert "sigma_rel 0.0250" in capsys.readouterr().out
    assert_one_line(reglue("ema", runs / "plain", "--list"), "no EMA snapshots")


def _sweep_argv(run, ref, out):
    return ["sweep", "--ckpt", str(run), "--ema", "0.06,0.09", "--cfg", "1,2", "--n", "4", "--steps", "2",
            "--chunk", "2", "--vae", "tiny", "--ref", str(ref), "--inception-weights", "random", "--feature-chunk",
            "4", "--out", str(out), "--quiet"]


def test_an_ema_by_guidance_sweep_resumes_after_sigkill(runs, tmp_path, monkeypatch, capsys):
    import reglue.ema.reconstruct as reconstruct

    ref, out = random_reference(tmp_path / "ref.npz", 6), tmp_path / "sweep"
    proc = subprocess.Popen([sys.executable, "-m", "reglue_cli", *_sweep_argv(runs / "pair", ref, out)], cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and not list((out / "points").glob("*.json")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {p.name: p.stat().st_mtime_ns for p in (out / "points").glob("*.json")}
    assert 1 <= len(finished) < 4, "the kill should land between points"
    kept = sorted(p.name for p in (out / "ema").glob("*.pt"))  # a length's weights are kept once a point is scored
    assert kept == sorted({f"sigma{name[3:7]}_step0000008.pt" for name in finished})

    rebuilt = []
    real = reconstruct.reconstruct
    monkeypatch.setattr("reglue.ema.source.reconstruct", lambda s, t: rebuilt.append(t[0].sigma_rel) or real(s, t))
    assert main(_sweep_argv(runs / "pair", ref, out)) == 0
    assert rebuilt == [s for s in (0.06, 0.09) if f"sigma{s}_step0000008.pt" not in kept]  # each length once
    assert {p.name: p.stat().st_mtime_ns for p in (out / "points").glob("*.json") if p.name in finished} == finished
    table = (out / "sweep.txt").read_text().splitlines()
    assert table[0].split()[:3] == ["ema", "interval", "cfg"]
    assert [tuple(line.split()[i] for i in (0, 2)) for line in table[1:]] == [
        ("0.06", "1"), ("0.06", "2"), ("0.09", "1"), ("0.09", "2")]
    assert "best: FID" in capsys.readouterr().out and (out / "sweep.png").stat().st_size > 1000
    assert sorted(p.name for p in (out / "ema").glob("*.pt")) == ["sigma0.06_step0000008.pt",
                                                                  "sigma0.09_step0000008.pt"]
    point = json.loads(next((out / "points").glob("ema0.09_cfg2_*.json")).read_text())
    assert point["sample_info"]["ema"]["sigma_rel"] == 0.09 and point["identity"]["ema"]["step"] == STEPS
    assert point["sampling"]["seed"] == 0  # common random numbers across EMA lengths and scales


@pytest.mark.parametrize("changes, message", [
    ({"ema__sigma_rels": [0.05, 0.1]}, "ema.sigma_rels [0.05, 0.1]: tracked but never written"),
    ({"ema__snapshot_every": 100}, "ema.snapshot_every=100: ema.sigma_rels is empty"),
    ({"ema__snapshot_precision": "fp32"}, "ema.snapshot_precision='fp32': ema.sigma_rels is empty"),
])
def test_ema_keys_nothing_would_read_are_refused(changes, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        presets.load("tiny-sit", **changes)


def test_a_stored_config_with_the_old_ema_key_loads_in_its_new_home():
    stored = run_config.to_dict(presets.load("tiny-sit"))
    stored["optim"]["ema_decay"] = stored.pop("ema")["decay"] * 0 + 0.995
    config = run_config.from_dict(stored, stored=True)
    assert config.ema.decay == 0.995 and config.ema.sigma_rels == ()
    with pytest.raises(ConfigError, match=r"optim.ema_decay: this key is now ema.decay"):
        run_config.from_dict(stored)  # a preset with the old key is refused, naming the new one
