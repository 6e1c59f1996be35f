"""The alignment probe: `train --probe-every` writes a probe per due step, `reglue probe` on the checkpoint of the
same step gives the same numbers from the file, the numbers do not depend on the batch size, and the probe's
model side is the model's own blocks."""

import json
from pathlib import Path

import pytest
import torch

from reglue import presets
from reglue.models import build
from reglue.probe.run import METRICS, ProbeSettings, subset_indices
from reglue.probe.states import block_states
from reglue.training.compressor import train_compressor
from reglue.training.diffusion import TrainOptions
from reglue_cli.main import main

PROBE = ["--probe-n", "12"]


@pytest.fixture(scope="module")
def run(toy_encoded, tmp_path_factory):
    """tiny-reglue, 8 steps, --probe-every 4 (through the CLI, in process)."""
    root = tmp_path_factory.mktemp("probe")
    compressor = train_compressor(presets.load("compressor-tiny", train__max_steps=4, train__global_batch=8),
                                  TrainOptions(data=str(toy_encoded), outdir=str(root / "comp"), workers=0,
                                               progress=False, echo=lambda s: None)).path
    assert main(["train", "--preset", "tiny-reglue", "--data", str(toy_encoded), "--outdir", str(root / "run"),
                 "--compressor", str(compressor), "--workers", "0", "--quiet", "--max-steps", "8", "--ckpt-every", "4",
                 "--sample-every", "0", "--set", "train.global_batch=8", "--probe-every", "4", *PROBE]) == 0
    return root / "run"


def test_probe_every_writes_each_due_step_with_its_heatmap_and_log_line(run):
    assert sorted(p.name for p in (run / "probe").iterdir()) == ["0000004.json", "0000004.png", "0000008.json",
                                                                  "0000008.png"]
    result = json.loads((run / "probe/0000008.json").read_text())
    assert result["format"] == "reglue-probe" and result["step"] == 8 and result["n"] == 12
    assert result["layers"] == [1, 2] and result["t"] == [0.25, 0.5, 0.75]
    for name in METRICS:
        assert len(result["metrics"][name]) == 2 and all(len(row) == 3 for row in result["metrics"][name])
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    probed = [line for line in lines if "probe" in line]
    assert [line["step"] for line in probed] == [4, 8]
    assert probed[1]["probe"]["metrics"] == result["metrics"]


def test_probe_of_the_checkpoint_equals_the_one_made_during_training(run, toy_encoded, tmp_path):
    out = tmp_path / "p.json"
    assert main(["probe", str(run / "checkpoints/0000008.pt"), "--data", str(toy_encoded), "--n", "12", "--quiet",
                 "--out", str(out), "--batch-size", "5"]) == 0  # another batch size, the same numbers
    offline, during = json.loads(out.read_text()), json.loads((run / "probe/0000008.json").read_text())
    assert offline["metrics"] == during["metrics"] and offline["vfm_knn_accuracy"] == during["vfm_knn_accuracy"]
    assert out.with_suffix(".png").stat().st_size > 1000
    assert main(["probe", str(run / "checkpoints/0000004.pt"), "--data", str(toy_encoded), "--n", "12", "--quiet",
                 "--layers", "2", "--t", "0.5"]) == 0  # default place: beside the run's own probes
    mine = json.loads((run / "checkpoints/../probe/0000004.json").read_text())
    assert mine["layers"] == [2] and mine["t"] == [0.5]


def test_the_subset_is_seeded_and_the_states_are_the_blocks_outputs():
    assert subset_indices(100, 10, 0) == subset_indices(100, 10, 0) != subset_indices(100, 10, 1)
    assert len(set(subset_indices(100, 10, 0))) == 10 and subset_indices(5, 10, 0) == [0, 1, 2, 3, 4]
    model = build(presets.load("tiny-sit")).eval()
    torch.manual_seed(0)
    x, t, y = torch.randn(3, 4, 8, 8), torch.rand(3), torch.tensor([0, 1, 2])
    states = block_states(model, x, t, y, None)
    tokens = model.x_embedder(x) + model.pos_embed  # the forward's own steps, written out
    c = model.t_embedder(t) + model.y_embedder(y, None)
    for block, state in zip(model.blocks, states):
        tokens = block(tokens, c)
        assert torch.equal(tokens, state)
    assert ProbeSettings().t == (0.25, 0.5, 0.75) and ProbeSettings().topk == 10


@pytest.mark.parametrize("argv, words", [
    (["--t", "1.5"], "noise levels lie in [0, 1]"),
    (["--layers", "0"], "counted from 1"),
    (["--layers", "9"], "the model has blocks 1..2"),
    (["--n", "5", "--topk", "4"], "--topk 4: at most --n - 2 = 3 neighbours"),
])
def test_bad_probe_requests_are_one_line(run, toy_encoded, argv, words, capsys):
    code = main(["probe", str(run / "checkpoints/0000008.pt"), "--data", str(toy_encoded), "--quiet",
                 "--out", str(Path(run) / "unused.json"), *argv])
    err = capsys.readouterr().err
    assert code == 2 and words in err and err.count("\n") == 1, err


def test_compare_draws_the_alignment_curve_beside_the_fid(run, tmp_path):
    from evaluation.compare import ALIGNMENT_TITLE, fid_figure, load_alignment, load_baselines

    [curve] = load_alignment([str(run)])
    expected = []
    for step in (4, 8):
        result = json.loads((run / f"probe/{step:07d}.json").read_text())
        k = result["t"].index(0.5)
        expected.append((step, max(row[k] for row in result["metrics"]["cknna"])))
    assert curve == {"label": "run", "points": expected}
    titles = [ax.get_title(loc="left") for ax in fid_figure(load_baselines(["sit-b2"]), [curve]).axes]
    assert ALIGNMENT_TITLE in titles
    assert main(["compare", str(run), "--baselines", "sit-b2", "--plot", str(tmp_path / "fid.png")]) == 0
    assert (tmp_path / "fid.png").stat().st_size > 1000
