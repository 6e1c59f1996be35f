"""Presets: every one resolves and builds; overrides are checked; docs/method.md values are where they belong."""

import pytest

from reglue import presets
from reglue.config import CompressorRun, DiffusionRun, TransportConfig, from_dict, to_dict
from reglue.config.model import ProjectorConfig
from reglue.models import ConfigError, ModelConfig, count_parameters
from reglue.presets import PresetError
from reglue.transport import LossWeights

REQUIRED = {
    "sit-s2", "sit-b2", "sit-l2", "sit-xl2", "sit-b2-repa", "sit-l2-repa", "sit-xl2-repa", "sit-b2-redi",
    "sit-xl2-redi", "sit-b2-reg", "sit-xl2-reg", "sit-b2-reglue", "sit-l2-reglue", "sit-xl2-reglue",
    "compressor-dinov2-b", "tiny-sit", "tiny-reglue", "compressor-tiny",
} | {f"table1-{row}" for row in "abcdefghijklmn"}


def test_every_required_preset_exists():
    assert REQUIRED <= set(presets.available())
    assert not any(name.startswith("_") for name in presets.available())


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_preset_resolves_validates_and_cites_sources(name):
    config = presets.load(name)
    assert config.preset == name and config.sources and config.description
    assert isinstance(config, {"diffusion": DiffusionRun, "compressor": CompressorRun}[config.kind])
    assert from_dict(to_dict(config)) == config  # the plain form reads back to the same run
    if config.kind == "diffusion":
        assert ModelConfig.from_dict(to_dict(config)["model"]) == config.model


def test_reglue_b2_carries_every_hyperparameter_of_method_md():
    c = presets.load("sit-b2-reglue")
    m = c.model
    assert (m.depth, m.hidden_size, m.num_heads, m.patch_size, m.input_size) == (12, 768, 12, 2, 32)
    assert (m.latent_channels, m.semantic_channels, m.cls_token, m.cls_dim) == (4, 16, True, 768)
    assert m.projector == ProjectorConfig(depth=4, hidden_dim=2048, out_dim=768, align_patch=True, align_cls=True)
    assert (m.mlp_ratio, m.qk_norm, m.class_dropout, m.num_classes) == (4.0, False, 0.1, 1000)
    assert c.vfm.layers == (8, 9, 10, 11) and c.compressor.channels == (3072, 256, 16)
    assert c.loss == LossWeights(latent=1.0, semantic=1.0, semantic_schedule=(), cls=0.03, repa=0.5)
    # v-prediction is no longer a key: the model always predicts the velocity (transport.prediction is retired)
    assert c.transport == TransportConfig(path="linear", time_sampler="uniform")
    assert to_dict(c)["transport"] == dict(path="linear", time_sampler="uniform")
    o = c.optim
    assert (o.name, o.lr, o.betas, o.weight_decay, o.eps) == ("adamw", 1e-4, (0.9, 0.999), 0.0, 1e-8)
    assert o.grad_clip == 1.0 and c.ema.decay == 0.9999 and c.ema.sigma_rels == () and c.ema.snapshot_every == 0
    assert (c.train.global_batch, c.train.max_steps, c.data.latent_scale) == (256, 400_000, 0.18215)


def test_xl_presets_align_at_block_8_and_b_at_block_4():
    for name, depth in [("sit-xl2-reglue", 8), ("sit-l2-reglue", 8), ("sit-xl2-repa", 8), ("sit-b2-repa", 4)]:
        assert presets.load(name).model.projector.depth == depth


@pytest.mark.parametrize("row, semantics, cls, align", [
    ("a", (0, "none"), False, None), ("b", (0, "none"), False, (True, False)), ("c", (0, "none"), True, None),
    ("d", (8, "pca"), False, None), ("e", (8, "pca"), False, (True, False)), ("f", (0, "none"), True, (False, True)),
    ("g", (0, "none"), True, (True, False)), ("h", (0, "none"), True, (True, True)),
    ("i", (8, "compressor"), False, None), ("j", (8, "compressor"), False, (True, False)),
    ("k", (8, "compressor"), True, (True, True)), ("l", (16, "compressor"), False, None),
    ("m", (16, "compressor"), True, (True, True)),
])
def test_table1_rows_switch_the_right_parts(row, semantics, cls, align):
    m = presets.load(f"table1-{row}").model
    assert (m.semantic_channels, m.semantic_source) == semantics and m.cls_token == cls
    got = None if m.projector is None else (m.projector.align_patch, m.projector.align_cls)
    assert got == align


def test_compressor_preset_matches_method_md_section_3():
    c = presets.load("compressor-dinov2-b")
    assert c.kind == "compressor" and c.compressor.channels == (3072, 256, 16)
    o, t = c.optim, c.train
    assert (o.name, o.lr, o.t_max_epochs, o.eta_min) == ("adam", 1e-3, 100, 1e-4)
    assert (t.epochs, t.global_batch, t.precision) == (25, 4096, "fp32")


@pytest.mark.parametrize("name", ["tiny-sit", "tiny-reglue"])
def test_tiny_presets_are_well_under_a_million_parameters(name):
    assert count_parameters(presets.load(name))["total"] < 500_000


def test_overrides_nested_bare_and_dotted():
    assert presets.load("tiny-sit", model__depth=3).model.depth == 3
    assert presets.load("tiny-sit", global_batch=8).train.global_batch == 8
    assert presets.load("tiny-reglue", model__projector__depth=2).model.projector.depth == 2
    config = presets.resolve("tiny-sit")  # the plain form, before typing
    presets.apply_override(config, "loss.semantic", 2)  # int accepted where a float lives
    assert config["loss"]["semantic"] == 2.0 and isinstance(config["loss"]["semantic"], float)
    semantic = presets.load("tiny-reglue", loss__semantic=2).loss.semantic  # and through load, typed
    assert semantic == 2.0 and isinstance(semantic, float)


@pytest.mark.parametrize("overrides, message", [
    (dict(depth=3), "ambiguous"),
    (dict(model__depht=3), "no such key"),
    (dict(model__depth="deep"), "expected int"),
    (dict(nonexistent=1), "no such key"),
    (dict(model__depth=0), "model.depth=0: expected an integer >= 1"),
])
def test_bad_overrides_are_refused_with_the_key_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        presets.load("tiny-reglue", **overrides)


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(PresetError, match="unknown preset 'sit-b3'.*sit-b2-reglue"):
        presets.load("sit-b3")


def test_parse_assignment():
    assert presets.parse_assignment("model.qk_norm=true") == ("model.qk_norm", True)
    assert presets.parse_assignment("loss.semantic_schedule=[[10, 0.5]]") == ("loss.semantic_schedule", [[10, 0.5]])
    with pytest.raises(PresetError, match="KEY=VALUE"):
        presets.parse_assignment("model.depth")


@pytest.mark.parametrize("assignment, message", [
    ("optim.lr=-1", "optim.lr=-1.0: expected a finite number > 0"),
    ("optim.name=sgd", "optim.name='sgd': expected one of adamw, adam"),
    ("train.precision=fp8", "train.precision='fp8'"),
    ("train.global_batch=0", "train.global_batch=0: expected an integer >= 1"),
    ("train.ckpt_every=0", "train.ckpt_every=0"),
    ("train.max_steps=null", "train.max_steps=None"),
    ("loss.semantic_schedule=[[1]]", "loss.semantic_schedule[0]=[1]: expected a list of 2 values"),
    ("ema.decay=1.5", "ema.decay=1.5"),
    ("ema.sigma_rels=[0.05,0.05]", "ema.sigma_rels=[0.05, 0.05]: expected a list of distinct"),
    ("ema.sigma_rels=[0.3]", "ema.sigma_rels=[0.3]: expected a list of distinct relative widths in (0, 0.2887)"),
    ("optim.ema_decay=0.999", "override optim.ema_decay: this key is now ema.decay"),
    ("transport.path=spiral", "transport.path='spiral'"),
])
def test_out_of_range_values_are_one_line_at_dry_run(assignment, message, capsys):
    from reglue_cli.main import main

    code = main(["train", "--preset", "tiny-reglue", "--dry-run", "--set", assignment])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err


def test_every_preset_passes_the_range_checks():
    for name in presets.available():
        presets.load(name)  # raises on the first value out of range
    assert presets.load("compressor-tiny").train.max_steps is None  # null: the epochs decide
