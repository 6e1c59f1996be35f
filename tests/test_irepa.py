"""iREPA's two options (arXiv 2512.10794; docs/models.md "The REPA projector"): the conv projector against a float64
NumPy convolution and its grid properties, the spatial normalisation against a float64 NumPy statement and its
invariances, the defaults leaving sit-b2-reglue as it was, a tiny run with both options that trains and resumes
bit-exactly, and the refusals of keys nothing would read."""

import shutil

import numpy as np
import pytest
import torch

from reglue import checkpoints, presets
from reglue.config import ConfigError
from reglue.encoders.vfm import load_vfm
from reglue.models import ModelConfig, ProjectorConfig, build
from reglue.models.projector import ConvProjector, ReprProjector, build_projector
from reglue.presets import PresetError
from reglue.training.diffusion import TrainOptions, train_diffusion
from reglue.training.rundir import RunError
from reglue.training.semantics import SemanticEncoder, build_semantic_encoder, spatial_normalise


def _conv(d=6, out=5, grid=4, cls_token=True, seed=0) -> ConvProjector:
    torch.manual_seed(seed)
    return ConvProjector(d, out, grid, cls_token).double()


def _numpy_conv3x3(grid: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """(g, g, D) tokens, (out, D, 3, 3) kernel -> (g, g, out): cross-correlation with zero padding 1, float64."""
    g = grid.shape[0]
    padded = np.zeros((g + 2, g + 2, grid.shape[2]))
    padded[1:-1, 1:-1] = grid
    out = np.tile(bias, (g, g, 1))
    for i in range(g):
        for j in range(g):
            for di in range(3):
                for dj in range(3):
                    out[i, j] += weight[:, :, di, dj] @ padded[i + di, j + dj]
    return out


def test_conv_projector_is_a_3x3_convolution_on_the_row_major_grid_and_cls_gets_the_centre_tap():
    proj = _conv()
    tokens = torch.randn(2, 1 + 16, 6, dtype=torch.float64)
    out = proj(tokens)
    assert out.shape == (2, 17, 5)
    assert sum(p.numel() for p in proj.parameters()) == 5 * 6 * 9 + 5  # one conv, no hidden layer
    w, b = proj.conv.weight.detach().numpy(), proj.conv.bias.detach().numpy()
    for n in range(2):
        grid = tokens[n, 1:].numpy().reshape(4, 4, 6)  # token 1 + 4 r + c is row r, column c
        np.testing.assert_allclose(out[n, 1:].detach().numpy().reshape(4, 4, 5), _numpy_conv3x3(grid, w, b),
                                   rtol=0, atol=1e-12)
        np.testing.assert_allclose(out[n, 0].detach().numpy(), w[:, :, 1, 1] @ tokens[n, 0].numpy() + b,
                                   rtol=0, atol=1e-12)  # the [CLS]: the same conv on a 1x1 grid
    no_cls = _conv(cls_token=False)
    assert no_cls(tokens[:, 1:]).shape == (2, 16, 5)
    torch.testing.assert_close(no_cls(tokens[:, 1:]), out[:, 1:], rtol=0, atol=0)
    with pytest.raises(ValueError, match="1 \\+ 4x4 tokens, got 16"):
        proj(tokens[:, 1:])


def test_conv_projector_is_translation_equivariant_and_local_on_the_grid():
    proj = _conv(grid=7, cls_token=False)
    x = torch.zeros(1, 7, 7, 6, dtype=torch.float64)  # (N, g, g, D)
    # content on rows and columns 1..3: its outputs (0..4) shifted by (1, 2) stay on the grid (zero padding
    # makes the convolution equivariant to shifts that keep the content and its 3x3 ring away from the border)
    x[:, 1:4, 1:4] = torch.randn(1, 3, 3, 6, dtype=torch.float64)
    shifted = torch.roll(x, shifts=(1, 2), dims=(1, 2))
    y = proj(x.reshape(1, 49, 6)).reshape(1, 7, 7, 5)
    y_shifted = proj(shifted.reshape(1, 49, 6)).reshape(1, 7, 7, 5)
    torch.testing.assert_close(y_shifted, torch.roll(y, shifts=(1, 2), dims=(1, 2)), rtol=0, atol=1e-12)
    # one token changed: only its 3x3 neighbourhood moves (an MLP would move the token alone)
    tokens = torch.randn(1, 49, 6, dtype=torch.float64)
    poked = tokens.clone()
    poked[0, 2 * 7 + 6] += 1.0  # row 2, column 6 (the right border)
    moved = (proj(poked) - proj(tokens)).abs().sum(-1).reshape(7, 7) > 0
    expected = torch.zeros(7, 7, dtype=torch.bool)
    expected[1:4, 5:7] = True
    assert torch.equal(moved, expected)


def test_cls_and_patches_do_not_mix_in_the_conv_projector():
    proj = _conv()
    tokens = torch.randn(1, 17, 6, dtype=torch.float64)
    other_cls = tokens.clone()
    other_cls[:, 0] = torch.randn(6, dtype=torch.float64)
    a, b = proj(tokens), proj(other_cls)
    assert torch.equal(a[:, 1:], b[:, 1:]) and not torch.equal(a[:, 0], b[:, 0])


def _numpy_spatial(target: np.ndarray, gamma: float) -> np.ndarray:
    """The official ldm/utils.py spatial_zscore, restated: per image and channel over the patch tokens,
    (x - gamma mean) / (sample std + 1e-6); [CLS] (token 0) unchanged."""
    patches = target[:, 1:].astype(np.float64)
    mean = patches.mean(axis=1, keepdims=True)
    std = patches.std(axis=1, ddof=1, keepdims=True)
    return np.concatenate([target[:, :1], (patches - gamma * mean) / (std + 1e-6)], axis=1)


@pytest.mark.parametrize("gamma", [0.6, 1.0, 0.0])
def test_spatial_normalisation_matches_a_float64_numpy_statement(gamma):
    rng = np.random.default_rng(3)
    target = rng.normal(2.0, 3.0, (3, 1 + 16, 8)) * rng.uniform(0.1, 5, (1, 1, 8))  # channels of different scales
    got = spatial_normalise(torch.from_numpy(target).float(), gamma).double().numpy()
    np.testing.assert_allclose(got, _numpy_spatial(target, gamma), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got[:, 0], target[:, 0].astype(np.float32))  # the [CLS] target passes unchanged
    alone = spatial_normalise(torch.from_numpy(target[1:2]).float(), gamma)
    torch.testing.assert_close(alone, torch.from_numpy(got[1:2]).float(), rtol=0, atol=0)  # per image


def test_spatial_normalisation_invariances():
    torch.manual_seed(0)
    x = torch.randn(2, 1 + 16, 8, dtype=torch.float64) * 3 + 1
    shift = torch.randn(2, 1, 8, dtype=torch.float64) * 5  # one constant per image and channel, all patches
    scale = torch.rand(2, 1, 8, dtype=torch.float64) * 4 + 0.5  # one positive factor per image and channel
    moved, scaled = x.clone(), x.clone()
    moved[:, 1:] += shift
    scaled[:, 1:] *= scale
    full = spatial_normalise(x, 1.0)
    torch.testing.assert_close(spatial_normalise(moved, 1.0), full, rtol=0, atol=1e-9)  # gamma 1: centred
    torch.testing.assert_close(spatial_normalise(scaled, 1.0), full, rtol=0, atol=1e-6)  # up to eps / std
    torch.testing.assert_close(full[:, 1:].mean(dim=1), torch.zeros(2, 8, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(full[:, 1:].std(dim=1), torch.ones(2, 8, dtype=torch.float64), rtol=0, atol=1e-5)
    # gamma 0.6 keeps 0.4 of the mean: a shift c moves every token by 0.4 c / (std + eps), std unchanged
    std = x[:, 1:].std(dim=1, keepdim=True)
    partial = spatial_normalise(moved, 0.6)[:, 1:] - spatial_normalise(x, 0.6)[:, 1:]
    torch.testing.assert_close(partial, (0.4 * shift / (std + 1e-6)).expand_as(partial), rtol=1e-9, atol=1e-9)


def test_semantic_encoder_normalises_the_repa_target_as_the_config_says():
    vfm = load_vfm("tiny-dinov2", 56)
    blocks = dict(layers=[2, 3], cls_layer=-1, repa_layer=-1)
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    plain = SemanticEncoder(vfm, blocks, 8)(images)
    spatial = SemanticEncoder(vfm, blocks, 8, target_norm="spatial", target_gamma=0.6)(images)
    torch.testing.assert_close(spatial.repa_target, spatial_normalise(plain.repa_target, 0.6), rtol=0, atol=0)
    torch.testing.assert_close(spatial.cls, plain.cls, rtol=0, atol=0)  # the denoised [CLS] is not the target
    # what train_diffusion builds (reglue/training/diffusion.py) from a config: the keys reach the encoder
    config = _tiny_irepa()
    encoder = build_semantic_encoder(config, None, None, torch.device("cpu"))
    assert (encoder.target_norm, encoder.target_gamma) == ("spatial", 0.6)
    assert build_semantic_encoder(_tiny_irepa(irepa=False), None, None, torch.device("cpu")).target_norm == "none"


def test_default_options_build_sit_b2_reglue_as_before():
    default = presets.load("sit-b2-reglue")
    spelled = presets.load("sit-b2-reglue", model__projector__kind="mlp", model__projector__target_norm="none")
    assert spelled.model == default.model
    stored = default.model.to_dict()
    for key in ("kind", "target_norm", "target_gamma"):  # a config written before these keys existed
        del stored["projector"][key]
    assert type(default.model).from_dict(stored) == default.model
    torch.manual_seed(0)
    model = build(default).eval()
    assert type(model.projector) is ReprProjector
    seen = {}
    model.projector.register_forward_hook(lambda mod, args, out: seen.update(hidden=args[0], out=out))
    g = torch.Generator().manual_seed(1)
    m = default.model
    with torch.no_grad():
        out = model(torch.randn(1, m.in_channels, 32, 32, generator=g), torch.rand(1, generator=g),
                    torch.tensor([5]), cls=torch.randn(1, m.cls_dim, generator=g), return_projections=True)
        reference = ReprProjector(768, 2048, 768)
        reference.load_state_dict(model.projector.state_dict())
        torch.testing.assert_close(out.projections, reference(seen["hidden"]), rtol=0, atol=0)
    assert out.projections.shape == (1, 257, 768)


def test_irepa_presets_switch_both_options_on_their_bases():
    for name, base in (("sit-b2-irepa", "sit-b2-repa"), ("sit-b2-reglue-irepa", "sit-b2-reglue")):
        config, reference = presets.load(name), presets.load(base)
        p = config.model.projector
        assert (p.kind, p.target_norm, p.target_gamma) == ("conv", "spatial", 0.6)
        assert config.model == reference.model.__class__.from_dict(
            {**reference.model.to_dict(), "projector": {**reference.model.to_dict()["projector"], "kind": "conv",
                                                        "target_norm": "spatial"}})
        assert "2512.10794" in config.sources["irepa"] and config.loss == reference.loss
        assert isinstance(build_projector(config.model), ConvProjector)


def _tiny_irepa(irepa: bool = True, **overrides):
    """tiny-reglue without the compressor (a tiny REG: [CLS] + REPA on all tokens), with iREPA's options."""
    keys = dict(model__semantic_channels=0, model__semantic_source="none", compressor__channels=None,
                train__global_batch=8, train__sample_every=0, train__log_every=1, train__ckpt_every=1000)
    if irepa:
        keys.update(model__projector__kind="conv", model__projector__hidden_dim=2048,
                    model__projector__target_norm="spatial")
    return presets.load("tiny-reglue", **{**keys, **overrides})


def _options(data, outdir):
    return TrainOptions(data=str(data), outdir=str(outdir), workers=0, progress=False, echo=lambda s: None)


def test_tiny_run_with_both_options_trains_and_resumes_bit_exactly(toy_encoded, tmp_path):
    straight = train_diffusion(_tiny_irepa(train__max_steps=4), _options(toy_encoded, tmp_path / "a"))
    assert straight.step == 4
    train_diffusion(_tiny_irepa(train__max_steps=2), _options(toy_encoded, tmp_path / "b"))
    shutil.copytree(tmp_path / "b", tmp_path / "c")
    resumed = train_diffusion(_tiny_irepa(train__max_steps=4), _options(toy_encoded, tmp_path / "b"))
    assert resumed.step == 4
    a = checkpoints.load_checkpoint(tmp_path / "a/checkpoints/0000004.pt")
    b = checkpoints.load_checkpoint(tmp_path / "b/checkpoints/0000004.pt")
    assert a["model"]["projector.conv.weight"].shape == (32, 64, 3, 3)  # the conv projector was trained
    start = checkpoints.load_checkpoint(tmp_path / "c/checkpoints/0000002.pt")
    assert not torch.equal(start["model"]["projector.conv.weight"], a["model"]["projector.conv.weight"])
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)
    # training reads target_norm: the same 2 steps against the un-normalised target train other weights
    train_diffusion(_tiny_irepa(train__max_steps=2, model__projector__target_norm="none"),
                    _options(toy_encoded, tmp_path / "d"))
    plain = checkpoints.load_checkpoint(tmp_path / "d/checkpoints/0000002.pt")
    assert not torch.equal(plain["model"]["projector.conv.weight"], start["model"]["projector.conv.weight"])
    # the target's form is part of what was trained: another one on resume is refused like any config change
    with pytest.raises(RunError, match="another config: model.projector.target_norm"):
        train_diffusion(_tiny_irepa(train__max_steps=4, model__projector__target_norm="none"),
                        _options(toy_encoded, tmp_path / "c"))


@pytest.mark.parametrize("preset, overrides, message", [
    ("tiny-reglue", dict(model__projector__kind="conv"), "model.projector.hidden_dim=64: kind is conv"),
    ("sit-b2-repa", dict(model__projector__target_gamma=1.0), "model.projector.target_gamma=1.0: target_norm is none"),
    ("sit-b2-reg", dict(model__projector__kind="conv", model__projector__align_patch=False),
     "kind conv convolves the patch grid, but align_patch is off"),
    ("sit-b2-reg", dict(model__projector__target_norm="spatial", model__projector__align_patch=False),
     "target_norm spatial normalises the patch tokens, but align_patch is off"),
    ("sit-b2", dict(model__projector__kind="conv"), "'projector' is not a section of this preset"),
    ("sit-b2-repa", dict(model__projector__kind="attention"), "model.projector.kind='attention': expected one of"),
    ("sit-b2-repa", dict(model__projector__target_norm="layer"), "target_norm='layer': expected one of"),
    ("sit-b2-irepa", dict(model__projector__target_gamma=1.5), "model.projector.target_gamma"),
])
def test_keys_nothing_would_read_and_bad_values_are_refused(preset, overrides, message):
    with pytest.raises((ConfigError, PresetError), match=message):
        presets.load(preset, **overrides)


def test_a_model_config_built_directly_is_checked_as_well():
    small = dict(depth=1, hidden_size=8, num_heads=1, input_size=4, patch_size=2)
    ModelConfig(**small, projector=ProjectorConfig(depth=1, align_cls=False, kind="conv", target_norm="spatial"))
    with pytest.raises(ConfigError, match="choose kind from mlp, conv"):
        ModelConfig(**small, projector=ProjectorConfig(depth=1, align_cls=False, kind="linear"))
    with pytest.raises(ConfigError, match="needs at least 2 patch tokens, the model has 1"):
        ModelConfig(**{**small, "input_size": 2},
                    projector=ProjectorConfig(depth=1, align_cls=False, target_norm="spatial"))
