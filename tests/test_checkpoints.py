"""Checkpoints: bit-exact round trip, atomic writes, truncated files, and the official file formats."""

import argparse
import dataclasses
import random
import warnings

import numpy as np
import pytest
import torch
from conftest import randomize_, tiny_config
from official_layout import OfficialEncoderDecoder, OfficialSiT, numpy_stats, randomize, rename_pickle_global

from reglue import checkpoints, presets
from reglue.checkpoints import CheckpointError
from reglue.config import DiffusionRun, to_dict
from reglue.models import SemanticCompressor, SiT, build


def _trained(seed=0):
    """A tiny REGLUE model after two AdamW steps, its EMA, and the optimiser."""
    config = presets.load("tiny-reglue")
    torch.manual_seed(seed)
    model, ema = build(config), build(config)
    randomize_(ema, seed=seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(2):
        out = model(torch.randn(2, 8, 8, 8), torch.rand(2), torch.tensor([1, 2]), cls=torch.randn(2, 32))
        (out.velocity.square().mean() + out.cls_velocity.square().mean() + out.projections.mean()).backward()
        opt.step()
        opt.zero_grad()
    return config, model, ema, opt


def _assert_same_state(a: dict, b: dict):
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_round_trip_is_bit_exact(tmp_path):
    config, model, ema, opt = _trained()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, enabled=True)
    data_state = {"step": 2, "epoch": 0, "offset": 64}
    path = checkpoints.save_checkpoint(tmp_path / "0000002.pt", config=config, step=2, model=model, ema=ema,
                                       optimizer=opt, scaler=scaler, data_state=data_state,
                                       rng=checkpoints.capture_rng_state())
    assert [p.name for p in tmp_path.iterdir()] == ["0000002.pt"]  # no temp file left behind
    state = torch.load(path, weights_only=True)  # plain weights-only loading works
    assert state["format"] == "reglue-checkpoint" and state["version"] == 1
    assert state["step"] == 2 and state["config"] == to_dict(config) and state["data_state"] == data_state
    _assert_same_state(state["model"], model.state_dict())
    _assert_same_state(state["ema"], ema.state_dict())
    opt2 = torch.optim.AdamW(build(state["config"]).parameters(), lr=1e-3)
    opt2.load_state_dict(state["optimizer"])
    assert len(opt2.state) == len(opt.state) > 0
    for s1, s2 in zip(opt.state.values(), opt2.state.values()):
        assert all(torch.equal(s1[k], s2[k]) for k in ("exp_avg", "exp_avg_sq", "step"))
    assert state["scaler"]["scale"] == 1024.0
    for ema_flag, reference in ((False, model), (True, ema)):
        loaded, loaded_config = checkpoints.load_model(path, ema=ema_flag)
        _assert_same_state(loaded.state_dict(), reference.state_dict())
        assert not loaded.training and loaded_config.preset == "tiny-reglue"
        assert isinstance(loaded_config, DiffusionRun) and dataclasses.replace(loaded_config, origin=None) == config
        assert loaded_config.origin == {"format": "reglue", "path": str(path), "step": 2,
                                        "weights": "ema" if ema_flag else "model",
                                        "ema": {"kind": "classic", "decay": config.ema.decay} if ema_flag else
                                        {"kind": "none"}}


def test_rng_state_restores_every_generator(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1), np.random.randn()  # leave cached gaussians in Python's and NumPy's states

    def draws():
        return random.random(), random.gauss(0, 1), np.random.rand(3), np.random.randn(), torch.randn(3)

    state = checkpoints.capture_rng_state()
    first = draws()
    checkpoints.save_checkpoint(tmp_path / "0000001.pt", config={}, step=1, model=None, rng=state)
    draws()  # move every generator on
    checkpoints.restore_rng_state(torch.load(tmp_path / "0000001.pt", weights_only=True)["rng"])
    second = draws()
    assert first[:2] == second[:2] and first[3] == second[3]
    assert np.array_equal(first[2], second[2]) and torch.equal(first[4], second[4])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_rng_state_is_captured_and_restored(tmp_path):
    torch.cuda.manual_seed(7)
    torch.randn(1, device="cuda")  # CUDA is in use
    state = checkpoints.capture_rng_state()
    first = torch.randn(4, device="cuda")
    checkpoints.save_checkpoint(tmp_path / "0000001.pt", config={}, step=1, model=None, rng=state)
    torch.randn(4, device="cuda")
    checkpoints.restore_rng_state(checkpoints.load_checkpoint(tmp_path / "0000001.pt")["rng"])
    assert torch.equal(first, torch.randn(4, device="cuda"))


def test_failed_save_keeps_the_previous_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "0000001.pt"
    checkpoints.save_checkpoint(path, config={"a": 1}, step=1, model=None)
    before = path.read_bytes()

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="cannot write: No space left on device") as caught:
        checkpoints.save_checkpoint(path, config={"a": 2}, step=1, model=None)
    assert caught.value.filename == str(path)  # the checkpoint, not its temporary
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["0000001.pt"]
    assert checkpoints.load_checkpoint(path)["config"] == {"a": 1}


def test_truncated_corrupt_and_foreign_checkpoints_are_refused_and_skipped(tmp_path):
    config, model, _, _ = _trained()
    good = checkpoints.save_checkpoint(tmp_path / "0000010.pt", config=config, step=10, model=model)
    (tmp_path / "0000020.pt").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (tmp_path / "0000030.pt").write_bytes(b"not a zip at all")
    torch.save({"model": {}, "steps": 40}, tmp_path / "0000040.pt")  # someone else's format
    (tmp_path / "notes.pt").write_bytes(b"ignored: not a step number")
    with pytest.raises(CheckpointError, match=r"0000020.pt: truncated or corrupt"):
        checkpoints.load_checkpoint(tmp_path / "0000020.pt")
    with pytest.raises(CheckpointError, match=r"0000030.pt: cannot be read safely: not a torch file"):
        checkpoints.load_checkpoint(tmp_path / "0000030.pt")
    with pytest.raises(CheckpointError, match=r"0000040.pt: not a reglue training checkpoint"):
        checkpoints.load_checkpoint(tmp_path / "0000040.pt")
    with pytest.raises(CheckpointError, match="missing.pt: no such file"):
        checkpoints.load_checkpoint(tmp_path / "missing.pt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert checkpoints.find_latest_checkpoint(tmp_path) == good
    skipped = " ".join(str(w.message) for w in caught)
    assert all(name in skipped for name in ("0000020.pt", "0000030.pt", "0000040.pt"))
    assert checkpoints.find_latest_checkpoint(tmp_path / "absent") is None


# ---------------------------------------------------------------------------------------------- official files

# The official fixtures use a 32x32 latent grid (256 px, 16x16 = DINOv2's tokens at 224) and the DINOv2-B token
# width 768 for [CLS] and the projector output, so the loaded run configuration passes its cross-section checks
# (reglue/config/checks.py); hidden width and depth stay tiny.
GRID, VFM_WIDTH = 32, 768


def _args(**kw):
    base = dict(model="SiT-B/2", encoder_depth=1, qk_norm=False, num_classes=1000, cfg_prob=0.1, proj_coeff=0.5,
                resolution=256)
    return argparse.Namespace(**{**base, **kw})


def _official_file(tmp_path, name, args, **layout):
    """An official-layout model and its EMA with random weights, saved as the official train.py does."""
    layout = dict(input_size=GRID, cls_dim=VFM_WIDTH, **layout)
    official = randomize(OfficialSiT(**layout), seed=1).eval()
    ema = randomize(OfficialSiT(**layout), seed=2).eval()
    path = tmp_path / name
    torch.save({"model": official.state_dict(), "ema": ema.state_dict(), "opt": {}, "args": args, "steps": 123}, path)
    return official, ema, path


def _compare(official, ours, with_cls, in_channels, cls_dim=VFM_WIDTH):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, in_channels, GRID, GRID, generator=gen)
    t, y = torch.rand(3, generator=gen), torch.tensor([0, 5, 1000])
    cls = torch.randn(3, cls_dim, generator=gen) if with_cls else None
    with torch.no_grad():
        v_ref, zs_ref, cls_ref = official(x, t, y, cls_token=cls)
        out = ours(x, t, y, cls=cls, return_projections=True)
    assert v_ref.abs().mean() > 1e-2 and zs_ref.abs().mean() > 1e-2  # the comparison is not between zeros
    torch.testing.assert_close(out.velocity, v_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.projections, zs_ref, atol=1e-5, rtol=1e-5)
    if with_cls:
        assert cls_ref.abs().mean() > 1e-2
        torch.testing.assert_close(out.cls_velocity, cls_ref, atol=1e-5, rtol=1e-5)
    else:
        assert out.cls_velocity is None


@pytest.mark.parametrize("ema", [True, False])
def test_official_reglue_checkpoint_loads_and_matches(tmp_path, ema):
    args = _args(cls=0.03, feat_channels=16, encoder_channel_list="3072,256,16", interm_layers=[8, 9, 10, 11],
                 compression_model_path="/x/compression_model.pth", norm_stats="/x/dino_mean_std.pth")
    official, official_ema, path = _official_file(tmp_path, "reglue.pt", args, in_channels=20)
    ours, config = checkpoints.load_model(path, ema=ema)
    assert config.preset == "sit-b2-reglue" and not ours.training
    assert config.origin == {"format": "official-reglue", "path": str(path), "step": 123,
                             "weights": "ema" if ema else "model", "compressor": "/x/compression_model.pth",
                             "norm_stats": "/x/dino_mean_std.pth",
                             "ema": {"kind": "classic", "decay": 0.9999} if ema else {"kind": "none"}}
    m = config.model
    assert (m.semantic_channels, m.cls_token, m.cls_dim, m.input_size) == (16, True, VFM_WIDTH, GRID)
    assert (m.hidden_size, m.depth, m.projector.hidden_dim) == (128, 2, 24)  # read off the weights, not B/2's
    assert m.projector.depth == 1 and m.projector.align_cls and not m.qk_norm
    _compare(official_ema if ema else official, ours, True, 20)


def test_official_reg_checkpoint_with_qk_norm_loads_and_matches(tmp_path):
    _, official_ema, path = _official_file(tmp_path, "reg.pt", _args(model="SiT-XL/2", cls=0.03, qk_norm=True),
                                           in_channels=4, d=144, qk_norm=True)  # XL's head width is 72
    ours, config = checkpoints.load_model(path)
    assert config.preset == "sit-xl2-reg" and config.origin["format"] == "official-reg"
    assert config.model.qk_norm and config.model.semantic_channels == 0
    assert (config.model.hidden_size, config.model.num_heads) == (144, 2)
    _compare(official_ema, ours, True, 4)


def test_official_repa_checkpoint_loads_and_matches(tmp_path):
    _, official_ema, path = _official_file(tmp_path, "repa.pt", _args(model="SiT-L/2", encoder_depth=2),
                                           in_channels=4, with_cls=False, encoder_depth=2)
    assert official_ema.pos_embed.shape[1] == 256  # 16x16 patches, no [CLS] slot
    ours, config = checkpoints.load_model(path)
    assert config.preset == "sit-l2-repa" and config.origin["format"] == "official-repa"
    assert not config.model.cls_token and config.model.projector.depth == 2
    _compare(official_ema, ours, False, 4)


def test_a_bare_official_state_dict_is_read_by_its_shapes(tmp_path, monkeypatch):
    official = randomize(OfficialSiT(in_channels=4, d=128, depth=2, input_size=GRID, with_cls=False,
                                     with_projector=False)).eval()
    torch.save(official.state_dict(), tmp_path / "last.pt")  # a released state dict: no args, no step
    with pytest.raises(CheckpointError, match="last.pt: no args.model, and hidden 128 / depth 2 match no SiT size"):
        checkpoints.load_model(tmp_path / "last.pt")
    monkeypatch.setitem(checkpoints.STANDARD_SIZES, (128, 2), "S")  # pretend: a real S/2 is 33M parameters
    ours, config = checkpoints.load_model(tmp_path / "last.pt")
    assert config.preset == "sit-s2" and config.origin["weights"] == "state dict"
    assert config.model.projector is None and config.model.num_heads == 2  # S/2's head width, 64
    gen = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(2, 4, GRID, GRID, generator=gen), torch.rand(2, generator=gen), torch.tensor([3, 1000])
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t, y).velocity, official(x, t, y)[0], atol=1e-5, rtol=1e-5)
    torch.save({k: v.half() for k, v in official.state_dict().items()}, tmp_path / "half.pt")  # an fp16 release
    half, _ = checkpoints.load_model(tmp_path / "half.pt")
    assert all(p.dtype == torch.float32 for p in half.parameters())
    assert torch.equal(half.pos_embed, official.pos_embed.half().float())


def test_official_loading_is_strict(tmp_path):
    official = randomize(OfficialSiT(input_size=GRID, cls_dim=VFM_WIDTH))
    for name, edit, expected in (("missing.pt", lambda sd: sd.pop("blocks.1.mlp.fc2.bias"), "blocks.1.mlp.fc2.bias"),
                                 ("extra.pt", lambda sd: sd.update({"projectors.1.0.weight": torch.zeros(1)}),
                                  "projectors.1.0.weight"),
                                 ("shape.pt", lambda sd: sd.update({"final_layer.linear.bias": torch.zeros(3)}),
                                  "final_layer.linear.bias")):
        state = official.state_dict()
        edit(state)
        torch.save({"model": state, "ema": state, "args": _args(), "steps": 1}, tmp_path / name)
        with pytest.raises(CheckpointError, match=rf"{name}: weights do not fit the model .*{expected}"):
            checkpoints.load_model(tmp_path / name)


class Payload:
    """Something an attacker might pickle into args: unpickling it would call print."""

    def __reduce__(self):
        return (print, ("this must never run",))


class CustomThing:
    """An ordinary user class: weights-only loading must not import and build it either."""

    def __init__(self):
        self.value = 1


@pytest.mark.parametrize("bad, refused", [(Payload(), "print"), (CustomThing(), "CustomThing")])
def test_unexpected_classes_in_args_are_refused(tmp_path, capsys, bad, refused):
    path = tmp_path / "evil.pt"
    torch.save({"model": OfficialSiT().state_dict(), "args": argparse.Namespace(model="SiT-B/2", x=bad)}, path)
    with pytest.raises(CheckpointError, match=rf"evil.pt: cannot be read safely: it would import \S*{refused}"):
        checkpoints.load_model(path)
    assert "must never run" not in capsys.readouterr().out


def test_official_compressor_and_norm_stats_load(tmp_path):
    channels = [24, 12, 4]
    official = randomize(OfficialEncoderDecoder(channels), seed=3).eval()
    state = {f"module.{k}": v for k, v in official.state_dict().items()}  # saved from DistributedDataParallel
    torch.save(state, tmp_path / "compression_model.pth")
    torch.save(numpy_stats(24), tmp_path / "stats.pth")
    compressor, stats = checkpoints.load_compressor(tmp_path / "compression_model.pth",
                                                    norm_stats=tmp_path / "stats.pth")
    assert compressor.channels == channels and not compressor.training
    feats = torch.randn(2, 24, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(compressor.encode(feats), official.encoder(feats), rtol=0, atol=0)
        torch.testing.assert_close(compressor.decode(feats[:, :4]), official.decoder(feats[:, :4]), rtol=0, atol=0)
    assert stats[0].dtype == stats[1].dtype == torch.float32
    np.testing.assert_array_equal(stats[0].numpy(), numpy_stats(24)["mean"])
    np.testing.assert_array_equal(stats[1].numpy(), numpy_stats(24)["std"])
    assert checkpoints.load_compressor(tmp_path / "compression_model.pth")[1] is None
    torch.save(randomize(OfficialEncoderDecoder([12, 4])).state_dict(), tmp_path / "c12.pth")
    with pytest.raises(CheckpointError, match="norm statistics of 24 channels for a compressor reading 12"):
        checkpoints.load_compressor(tmp_path / "c12.pth", norm_stats=tmp_path / "stats.pth")


def test_norm_stats_written_by_numpy_1_load(tmp_path):
    path = tmp_path / "stats_np1.pth"
    torch.save(numpy_stats(8, seed=4), path)
    rename_pickle_global(path, b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    mean, std = checkpoints.load_norm_stats(path)
    np.testing.assert_array_equal(mean.numpy(), numpy_stats(8, seed=4)["mean"])
    np.testing.assert_array_equal(std.numpy(), numpy_stats(8, seed=4)["std"])


def test_our_compressor_file_round_trips(tmp_path):
    comp = randomize_(SemanticCompressor([24, 12, 4])).eval()
    mean, std = torch.randn(24), torch.rand(24) + 0.5
    checkpoints.save_compressor(tmp_path / "c.pt", comp, mean, std, vfm="tiny-dinov2", layers=[2, 3])
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]
    loaded, (m, s) = checkpoints.load_compressor(tmp_path / "c.pt")
    assert torch.equal(m, mean) and torch.equal(s, std) and not loaded.training
    _assert_same_state(loaded.state_dict(), comp.state_dict())
    raw = torch.load(tmp_path / "c.pt", weights_only=True)
    assert raw["format"] == "reglue-compressor" and raw["vfm"] == "tiny-dinov2" and raw["layers"] == [2, 3]
    assert raw["channels"] == [24, 12, 4]
    m2, s2 = checkpoints.load_norm_stats(tmp_path / "c.pt")
    assert torch.equal(m2, mean) and torch.equal(s2, std)


def test_foreign_files_are_named(tmp_path):
    torch.save({"something": torch.zeros(1)}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="x.pt: neither a reglue checkpoint nor an official"):
        checkpoints.load_model(tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="x.pt: neither a reglue compressor"):
        checkpoints.load_compressor(tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="x.pt: expected a dict with 'mean' and 'std'"):
        checkpoints.load_norm_stats(tmp_path / "x.pt")
    state = SiT(tiny_config()).state_dict()
    torch.save({"model": state, "args": argparse.Namespace(model="DiT-XL/2")}, tmp_path / "d.pt")
    with pytest.raises(CheckpointError, match="d.pt: official args.model 'DiT-XL/2'"):
        checkpoints.load_model(tmp_path / "d.pt")


@pytest.mark.parametrize("path_type, expected", [("cosine", "cosine"), ("linear", "linear"), (None, "linear")])
def test_official_path_type_reaches_the_config(tmp_path, path_type, expected):
    args = _args(cls=0.03, **({} if path_type is None else {"path_type": path_type}))
    _, _, path = _official_file(tmp_path, "reg.pt", args, in_channels=4)
    assert checkpoints.load_model(path)[1].transport.path == expected  # the SDE's score depends on it


@pytest.mark.parametrize("with_projector", [False, True])
def test_official_grid_other_than_256_px_reaches_the_config(tmp_path, with_projector):
    """An official model on another latent grid (here 8x8: 64 px) loads with that grid, the matching image
    resolution and, for REPA, the VFM input that gives as many tokens as it has patches (14 px per token)."""
    official = randomize(OfficialSiT(in_channels=4, d=128, depth=2, input_size=8, cls_dim=VFM_WIDTH,
                                     with_cls=False, with_projector=with_projector)).eval()
    torch.save({"model": official.state_dict(), "args": _args(resolution=64), "steps": 1}, tmp_path / "small.pt")
    ours, config = checkpoints.load_model(tmp_path / "small.pt")
    assert config.preset == ("sit-b2-repa" if with_projector else "sit-b2")
    assert (config.model.input_size, config.data.resolution) == (8, 64)
    if with_projector:
        assert config.vfm.image_size == 4 * 14  # 4x4 patches <-> 4x4 DINOv2 tokens
    gen = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(2, 4, 8, 8, generator=gen), torch.rand(2, generator=gen), torch.tensor([3, 1000])
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t, y).velocity, official(x, t, y)[0], atol=1e-5, rtol=1e-5)
