"""The SiT family: sizes, initialisation, conditioning, attention, embeddings and the compressor."""

import math

import numpy as np
import pytest
import torch
from conftest import randomize_, tiny_config

from reglue import presets
from reglue.constants import NULL_CLASS
from reglue.models import (
    ConfigError,
    ModelConfig,
    SemanticCompressor,
    SiT,
    build,
    count_compressor_parameters,
    count_parameters,
)
from reglue.models.sit import sincos_2d_embedding, timestep_frequencies

# docs/method.md section 4: the counts the paper's models have (frozen sin-cos position embedding included).
PINNED = {
    "sit-b2-reglue": (131_781_968, 139_126_864),
    "sit-xl2-reglue": (677_033_552, 685_164_880),
    "sit-b2": (130_500_112, 130_500_112),
    "sit-xl2": (675_111_184, 675_111_184),
}


@pytest.mark.parametrize("name", sorted(PINNED))
def test_parameter_counts_match_the_paper(name):
    counts = count_parameters(presets.load(name))
    assert (counts["without_projector"], counts["total"]) == PINNED[name]


def test_meta_count_equals_a_real_build():
    config = presets.load("tiny-reglue")
    model = build(config)
    assert count_parameters(config)["total"] == sum(p.numel() for p in model.parameters())
    assert count_parameters(config)["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)


def _inputs(config: ModelConfig, n: int = 3, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, config.in_channels, config.input_size, config.input_size, generator=gen)
    t = torch.rand(n, generator=gen)
    y = torch.randint(0, config.num_classes, (n,), generator=gen)
    cls = torch.randn(n, config.cls_dim, generator=gen) if config.cls_token else None
    return x, t, y, cls


@pytest.mark.parametrize("cls_token", [True, False])
def test_zero_initialised_heads_give_zero_velocity(cls_token):
    projector = None if not cls_token else tiny_config().projector
    config = tiny_config(cls_token=cls_token, projector=projector)
    model = SiT(config).eval()
    x, t, y, cls = _inputs(config)
    out = model(x, t, y, cls=cls)
    assert out.velocity.shape == x.shape
    assert torch.count_nonzero(out.velocity) == 0
    if cls_token:
        assert out.cls_velocity.shape == cls.shape and torch.count_nonzero(out.cls_velocity) == 0
    else:
        assert out.cls_velocity is None


def test_projections_cover_every_token_and_follow_training_mode():
    config = tiny_config()
    model = randomize_(SiT(config))
    x, t, y, cls = _inputs(config)
    model.train()
    out = model(x, t, y, cls=cls)
    assert out.projections.shape == (3, 1 + config.num_patches, config.projector.out_dim)
    model.eval()
    assert model(x, t, y, cls=cls).projections is None
    assert model(x, t, y, cls=cls, return_projections=True).projections is not None


def test_projection_uses_hidden_states_after_the_configured_block():
    """Changing a block after the projector depth must not change the projections."""
    config = tiny_config(depth=3, projector=tiny_config().projector.__class__(depth=2, hidden_dim=8, out_dim=4))
    model = randomize_(SiT(config)).eval()
    x, t, y, cls = _inputs(config)
    before = model(x, t, y, cls=cls, return_projections=True)
    with torch.no_grad():
        model.blocks[2].mlp.fc2.weight.add_(1.0)
    after = model(x, t, y, cls=cls, return_projections=True)
    torch.testing.assert_close(after.projections, before.projections, rtol=0, atol=0)
    assert not torch.equal(after.velocity, before.velocity)


def test_null_class_exists_and_differs_from_real_labels():
    config = presets.load("tiny-sit")
    model = build(config).eval()
    assert model.null_class == NULL_CLASS == 1000
    assert model.y_embedder.embedding_table.num_embeddings == 1001
    x, t, _, _ = _inputs(model.config, n=1)
    emb_null = model.y_embedder(torch.tensor([NULL_CLASS]))
    emb_real = model.y_embedder(torch.tensor([0]))
    assert not torch.equal(emb_null, emb_real)
    model(x, t, torch.tensor([NULL_CLASS]))  # a valid label


@pytest.mark.parametrize("prob", [0.1, 0.3])
def test_label_dropout_follows_the_configured_probability(prob):
    model = SiT(tiny_config(class_dropout=prob)).train()
    torch.manual_seed(0)
    labels = torch.zeros(40_000, dtype=torch.long)
    dropped = (model.y_embedder.drop_labels(labels) == NULL_CLASS).float().mean().item()
    sigma = math.sqrt(prob * (1 - prob) / labels.numel())
    assert abs(dropped - prob) < 5 * sigma
    # evaluation mode never drops a label
    model.eval()
    table = model.y_embedder.embedding_table.weight
    assert torch.equal(model.y_embedder(labels[:5]), table[labels[:5]])


def test_configured_dropout_reaches_the_model_from_the_preset():
    config = presets.load("tiny-sit", model__class_dropout=0.25)
    assert build(config).y_embedder.dropout_prob == 0.25


def test_fused_attention_matches_manual_attention():
    config = tiny_config()
    fused = randomize_(SiT(config)).eval()
    manual = SiT(tiny_config(fused_attn=False)).eval()
    manual.load_state_dict(fused.state_dict())
    x, t, y, cls = _inputs(config)
    a, b = fused(x, t, y, cls=cls), manual(x, t, y, cls=cls)
    torch.testing.assert_close(a.velocity, b.velocity, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.cls_velocity, b.cls_velocity, rtol=1e-5, atol=1e-5)


def test_qk_norm_adds_affine_norms_per_head():
    model = SiT(tiny_config(qk_norm=True))
    names = {n for n, _ in model.named_parameters()}
    assert "blocks.0.attn.q_norm.weight" in names and "blocks.1.attn.k_norm.bias" in names
    assert not any("q_norm" in n for n, _ in SiT(tiny_config()).named_parameters())


def test_sit_s2_builds_and_runs():
    config = presets.load("sit-s2", model__input_size=8, data__resolution=64)  # 64 px -> 8x8 latents
    model = build(config).eval()
    x, t, y, _ = _inputs(model.config, n=2)
    assert model(x, t, y).velocity.shape == (2, 4, 8, 8)


def test_cls_token_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="needs a \\[CLS\\] state"):
        SiT(tiny_config())(*_inputs(tiny_config())[:3])
    config = tiny_config(cls_token=False, projector=None)
    x, t, y, _ = _inputs(config)
    with pytest.raises(ValueError, match="has no \\[CLS\\] token"):
        SiT(config)(x, t, y, cls=torch.zeros(3, 16))


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(hidden_size=33), "divisible by num_heads"),
        (dict(hidden_size=34, num_heads=17), "multiple of 4"),
        (dict(semantic_channels=0), "disagree"),
        (dict(cls_token=False), "align_cls needs"),
        (dict(class_dropout=1.0), "class_dropout"),
        (dict(semantic_source="clip"), "semantic_source"),
    ],
)
def test_inconsistent_configs_are_refused(changes, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(**changes).validate()


def test_unknown_model_key_is_named():
    with pytest.raises(ConfigError, match="unknown key.*hiden_size"):
        ModelConfig.from_dict({"hiden_size": 3})


def _numpy_sincos_2d(dim: int, grid: int) -> np.ndarray:
    """Independent float64 reference: MAE's 2-D sin-cos embedding (column coordinate in the first half)."""
    out = np.zeros((grid * grid, dim))
    omega = 1.0 / 10000 ** (np.arange(dim // 4) / (dim / 4))
    for r in range(grid):
        for c in range(grid):
            i = r * grid + c
            out[i, : dim // 4] = np.sin(c * omega)
            out[i, dim // 4 : dim // 2] = np.cos(c * omega)
            out[i, dim // 2 : 3 * dim // 4] = np.sin(r * omega)
            out[i, 3 * dim // 4 :] = np.cos(r * omega)
    return out


def test_position_embedding_matches_independent_reference_and_cls_slot_is_zero():
    np.testing.assert_allclose(sincos_2d_embedding(64, 4).numpy(), _numpy_sincos_2d(64, 4), atol=1e-6)
    model = SiT(tiny_config())
    assert not model.pos_embed.requires_grad
    assert torch.count_nonzero(model.pos_embed[0, 0]) == 0
    np.testing.assert_allclose(model.pos_embed[0, 1:].numpy(), _numpy_sincos_2d(32, 4), atol=1e-6)


def test_timestep_frequencies_match_independent_reference():
    t = np.array([0.0, 0.25, 0.999])
    half = 128
    freqs = np.exp(-np.log(10000) * np.arange(half) / half)
    expected = np.concatenate([np.cos(t[:, None] * freqs), np.sin(t[:, None] * freqs)], axis=1)
    np.testing.assert_allclose(timestep_frequencies(torch.tensor(t)).numpy(), expected, atol=1e-6)


def test_unpatchify_inverts_patchify_layout():
    config = tiny_config()
    model = SiT(config)
    p, c, g = config.patch_size, config.in_channels, config.input_size // config.patch_size
    img = torch.randn(2, c, config.input_size, config.input_size)
    # patch (i, j) holds img[:, :, i*p:(i+1)*p, j*p:(j+1)*p] flattened as (p, q, c)
    patches = img.reshape(2, c, g, p, g, p).permute(0, 2, 4, 3, 5, 1).reshape(2, g * g, p * p * c)
    assert torch.equal(model.unpatchify(patches), img)


def test_compressor_matches_method_md():
    counts = count_compressor_parameters(presets.load("compressor-dinov2-b"))
    assert round(counts["encoder"] / 1e6, 2) == 8.30 and round(counts["decoder"] / 1e6, 2) == 8.30
    comp = SemanticCompressor([64, 32, 4]).eval()
    feats = torch.randn(2, 64, 4, 4)
    recon, code = comp(feats)
    assert code.shape == (2, 4, 4, 4) and recon.shape == feats.shape
    kinds = [type(m).__name__ for m in comp.encoder.layers]
    assert kinds == ["Conv2d", "ResidualBlock", "Conv2d"]
    assert (code < 0).any()  # no activation on the code


def test_explicit_drop_mask_replaces_exactly_those_labels():
    model = randomize_(SiT(tiny_config(class_dropout=0.0))).eval()
    x, t, y, cls = _inputs(model.config, n=4)
    mask = torch.tensor([True, False, True, False])
    dropped = model(x, t, y, cls=cls, drop_mask=mask).velocity
    manual = model(x, t, torch.where(mask, torch.full_like(y, NULL_CLASS), y), cls=cls).velocity
    assert torch.equal(dropped, manual)
