"""Alignment schedules (loss.repa_schedule, loss.repa_ramp): the REPA weight over steps as a step function or
straight lines; where it is 0 the term is exactly 0, the VFM pass is skipped when nothing else reads it, the
projector stays in the graph, and a run resumes bit-exactly across the switch (HASTE's early stop)."""

import json

import numpy as np
import pytest
import torch

from reglue import checkpoints, presets
from reglue.config.sections import LossWeights, scheduled
from reglue.errors import ConfigError
from reglue.training.diffusion import TrainOptions, train_diffusion
from reglue.training.semantics import SemanticEncoder

TINY_PROJECTOR = {"depth": 1, "hidden_dim": 64, "out_dim": 32, "align_patch": True, "align_cls": False}


def _repa_config(**overrides):
    """A tiny SiT + REPA (tiny-dinov2 targets, no semantic channels, no [CLS]): the VFM serves REPA alone."""
    return presets.load("tiny-sit", model__projector=TINY_PROJECTOR, vfm__name="tiny-dinov2", vfm__image_size=56,
                        train__global_batch=8, train__sample_every=0, train__log_every=1, train__ckpt_every=1000,
                        **overrides)


def _train(data, outdir, steps, **overrides):
    options = TrainOptions(data=str(data), outdir=str(outdir), workers=0, progress=False, echo=lambda s: None)
    return train_diffusion(_repa_config(train__max_steps=steps, **overrides), options)


def test_step_and_ramp_schedules_against_their_definition():
    points = ((10, 0.2), (20, 0.0), (40, 0.3))
    steps = np.arange(0, 60)
    expected_step = np.select([steps < 10, steps < 20, steps < 40], [0.5, 0.2, 0.0], 0.3)
    expected_ramp = np.where(steps < 10, 0.5, np.interp(steps, [10, 20, 40], [0.2, 0.0, 0.3]))
    assert [scheduled(0.5, points, int(s)) for s in steps] == pytest.approx(expected_step, abs=0)
    assert [scheduled(0.5, points, int(s), ramp=True) for s in steps] == pytest.approx(expected_ramp, rel=1e-12)
    weights = LossWeights(repa=0.5, repa_schedule=((40, 0.3), (10, 0.2), (20, 0.0)), repa_ramp=True)  # sorted
    assert weights.repa_at(15) == pytest.approx(0.1, rel=1e-12) and weights.repa_at(5) == 0.5
    assert LossWeights(semantic=2.0, semantic_schedule=((3, 1.0),)).semantic_at(2) == 2.0  # the lam schedule too


def test_alignment_ending_at_step_4_is_exactly_0_after_and_resumes_bit_exactly(toy_encoded, tmp_path, monkeypatch):
    passes = []
    real = SemanticEncoder.forward
    monkeypatch.setattr(SemanticEncoder, "forward", lambda self, images: passes.append(1) or real(self, images))
    straight = _train(toy_encoded, tmp_path / "a", 8, loss__repa_schedule=[[4, 0]])
    records = [json.loads(line) for line in (tmp_path / "a/metrics.jsonl").read_text().splitlines()]
    assert [r["repa_weight"] for r in records] == [0.5] * 4 + [0.0] * 4
    assert all(r["repa"] != 0 for r in records[:4])  # -cos(projection, target): near 0 at random init, never 0
    assert [r["repa"] for r in records[4:]] == [0.0] * 4  # exactly 0 from step 4 on (counted from 0)
    assert len(passes) == 4  # the VFM ran only while its targets were needed
    projector = {k: v for k, v in straight.model.state_dict().items() if k.startswith("projector")}
    assert projector and all(torch.isfinite(v).all() for v in projector.values())

    _train(toy_encoded, tmp_path / "b", 3, loss__repa_schedule=[[4, 0]])  # stops before the switch
    _train(toy_encoded, tmp_path / "b", 8, loss__repa_schedule=[[4, 0]])  # resumes across it
    a, b = (checkpoints.load_checkpoint(tmp_path / f"{r}/checkpoints/0000008.pt") for r in "ab")
    for part in ("model", "ema"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part


def test_a_ramp_lowers_the_weight_step_by_step(toy_encoded, tmp_path):
    _train(toy_encoded, tmp_path / "run", 4, loss__repa_schedule=[[0, 0.4], [4, 0.0]], loss__repa_ramp=True)
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["repa_weight"] for r in records] == pytest.approx([0.4, 0.3, 0.2, 0.1], rel=1e-12)


@pytest.mark.parametrize("changes, message", [
    ({"loss__repa_schedule": [[4, 0]]}, "loss.repa_schedule=((4, 0.0),): the model has no REPA projector"),
    ({"loss__repa_ramp": True}, "loss.repa_ramp=True: the model has no REPA projector"),
    ({"loss__repa_schedule": [[4, -1]]}, "loss.repa_schedule"),
])
def test_schedule_keys_nothing_reads_or_out_of_range_are_refused(changes, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        presets.load("tiny-sit", **changes)
