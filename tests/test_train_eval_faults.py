"""`train --eval-every` and `--wandb` held to the standard: every setting checked at launch (one line, exit 2,
nothing written to the run directory, the corrected command then runs), an evaluation series continued only with
the settings it was started with, an evaluation that fails mid-run reported without ending the run (or, with
--eval-failure stop, after a checkpoint of that step), W&B failures one line with the fix."""

import json

import numpy as np
import pytest
from helpers import assert_one_line, reglue

WRITTEN = ("config.yaml", "data.yaml", "wandb_id.txt")  # what a failed launch must not leave behind


@pytest.fixture(scope="module")
def data(toy_encoded):
    return toy_encoded


def _reference(path, seed):
    np.savez(path, arr_0=np.random.default_rng(seed).integers(0, 256, (6, 64, 64, 3), dtype=np.uint8))
    return path


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    root = tmp_path_factory.mktemp("refs")
    bad = root / "objects.npz"
    np.savez(bad, arr_0=np.array([np.zeros(3), np.zeros(4)], dtype=object))
    return {"a": _reference(root / "a.npz", 0), "b": _reference(root / "b.npz", 1), "objects": bad}


def train(data, run, steps, *extra):
    return reglue("train", "--preset", "tiny-sit", "--data", data, "--outdir", run, "--max-steps", steps,
                  "--global-batch", "4", "--workers", "0", "--quiet", "--set", "sampling.steps=2", *extra)


def evaluating(ref, every=2, *extra):
    return ("--eval-every", every, "--eval-n", 4, "--eval-ref", ref, "--inception-weights", "random",
            "--feature-chunk", 4, *extra)


def written(run):
    return [name for name in WRITTEN if (run / name).exists()]


def _lines(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_bad_reference_is_refused_at_launch_then_a_changed_one_on_resume(data, refs, tmp_path):
    run = tmp_path / "run"
    assert_one_line(train(data, run, 2, *evaluating(refs["objects"])), "--eval-ref", refs["objects"], "object")
    assert written(run) == []
    assert train(data, run, 2, *evaluating(refs["a"])).returncode == 0  # the corrected command
    step2 = json.loads((run / "eval" / "0000002.json").read_text())
    assert step2["identity"]["evaluator"]["reference_sha256"] == step2["reference_sha256"]  # compare splits by it
    assert step2["identity"]["n"] == 4 and step2["identity"]["sampling"]["settings"]["steps"] == 2

    before = (run / "metrics.jsonl").read_text(), sorted(p.name for p in (run / "checkpoints").iterdir())
    refused = train(data, run, 4, *evaluating(refs["b"]))
    assert_one_line(refused, "reference_sha256", run / "eval", "aside")
    refused = train(data, run, 4, *evaluating(refs["a"]), "--eval-n", 6)
    assert_one_line(refused, "n (4 -> 6)")
    assert ((run / "metrics.jsonl").read_text(), sorted(p.name for p in (run / "checkpoints").iterdir())) == before

    legacy = {k: v for k, v in step2.items() if k not in ("identity", "identity_key")}  # written before identities
    (run / "eval" / "0000002.json").write_text(json.dumps(legacy))
    assert_one_line(train(data, run, 4, *evaluating(refs["b"])), "reference_sha256")
    assert train(data, run, 2, *evaluating(refs["a"])).returncode == 0  # same settings: the series goes on


@pytest.mark.parametrize("change, words", [
    (("--eval-n", "2000000"), ("--eval-n", "1,048,576")),
    (("--inception-weights", "missing.pth"), ("--inception-weights", "missing.pth")),
    (("--eval-ref", "nowhere.npz"), ("--eval-ref", "nowhere.npz")),
    (("--set", "model.num_classes=0", "--set", "sampling.cfg_scale=2"), ("sampling", "unconditional")),
    (("--wandb", "team/project"), ("--wandb", "project name", "/")),
])
def test_bad_settings_are_one_line_before_anything_is_written(data, refs, tmp_path, change, words):
    run = tmp_path / "run"
    assert_one_line(train(data, run, 2, *evaluating(refs["a"]), *change), *words)
    assert not run.exists() or written(run) == []


@pytest.mark.parametrize("stored", ["", "../other", "a b"])
def test_a_bad_stored_wandb_id_is_one_line(data, tmp_path, stored):
    pytest.importorskip("wandb")
    run = tmp_path / "run"
    run.mkdir()
    (run / "wandb_id.txt").write_text(stored + "\n")
    assert_one_line(train(data, run, 2, "--wandb", "reglue-test"), run / "wandb_id.txt", "delete it")
    assert not (run / "config.yaml").exists()


class FakeRun:
    """What WandbTracker uses of a wandb run, recorded."""

    def __init__(self, **kwargs):
        self.kwargs, self.logged, self.finished = kwargs, [], False

    def log(self, record, step=None):
        self.logged.append((step, record))

    def finish(self):
        self.finished = True


def test_wandb_init_failures_are_one_line_with_the_fix_and_leave_nothing(data, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    run = tmp_path / "run"
    cases = [(wandb.errors.UsageError("No API key configured. Use `wandb login` to log in."), "wandb login"),
             (wandb.errors.AuthenticationError("API key is invalid"), "WANDB_API_KEY"),
             (wandb.errors.CommError("Network error (ConnectionError), entering retry loop."), "network")]
    for error, fix in cases:
        def fail(**kwargs):
            raise error
        monkeypatch.setattr(wandb, "init", fail)
        assert_one_line(train(data, run, 2, "--wandb", "reglue-test"), fix, "WANDB_MODE=offline")
        assert written(run) == []

    runs = []
    monkeypatch.setattr(wandb, "init", lambda **kwargs: runs.append(FakeRun(**kwargs)) or runs[-1])
    assert train(data, run, 2, "--wandb", "reglue-test", "--log-every", "1").returncode == 0  # the corrected one
    assert (run / "wandb_id.txt").read_text().strip() == runs[0].kwargs["id"] and runs[0].finished
    assert [step for step, _ in runs[0].logged] == [1, 2]


@pytest.mark.parametrize("text", ["- a\n- b\n", "just words\n"])
def test_a_config_yaml_that_is_not_a_mapping_is_one_line(data, tmp_path, text):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(text)
    assert_one_line(train(data, run, 2), run / "config.yaml", "mapping")


def _failing_once(monkeypatch):
    import reglue.scoring.generate_and_score as scoring

    real, calls = scoring.score, []

    def score(prepared, *args, **kwargs):
        calls.append(prepared.attrs["step"])
        if len(calls) == 1:
            raise OSError(28, "No space left on device", "/scratch/ref.npz")
        return real(prepared, *args, **kwargs)

    monkeypatch.setattr(scoring, "score", score)
    return calls


def test_a_failed_evaluation_is_reported_and_training_goes_on(data, refs, tmp_path, monkeypatch):
    run = tmp_path / "run"
    calls = _failing_once(monkeypatch)
    result = train(data, run, 4, *evaluating(refs["a"]), "--ckpt-every", "4")
    assert result.returncode == 0, result.stderr
    assert calls == [2, 4]
    errors = [r for r in _lines(run) if "eval_error" in r]
    assert errors == [{"step": 2, "eval_error": "/scratch/ref.npz: No space left on device"}]
    assert [r["step"] for r in _lines(run) if "eval" in r] == [4]
    assert sorted(p.name for p in (run / "eval").glob("*.json")) == ["0000004.json"]
    assert "step 2: evaluation failed: /scratch/ref.npz: No space left on device" in (run / "log.txt").read_text()


def test_eval_failure_stop_saves_the_step_then_exits_2(data, refs, tmp_path, monkeypatch):
    run = tmp_path / "run"
    calls = _failing_once(monkeypatch)
    result = train(data, run, 4, *evaluating(refs["a"], 2, "--eval-failure", "stop"), "--ckpt-every", "4")
    assert result.returncode == 2 and calls == [2]
    assert "No space left on device" in result.stderr.strip().splitlines()[-1] and "Traceback" not in result.stderr
    assert sorted(p.name for p in (run / "checkpoints").glob("*.pt")) == ["0000002.pt"]  # not a ckpt-every step
    assert [r for r in _lines(run) if "eval_error" in r][0]["step"] == 2
