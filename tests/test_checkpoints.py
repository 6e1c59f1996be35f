"""Checkpoints: bit-exact round trip, atomic writes, truncated files, and the official file formats."""

import argparse
import random
import warnings

import numpy as np
import pytest
import torch

from conftest import randomize_, tiny_config
from official_layout import OfficialEncoderDecoder, OfficialSiT, numpy_stats, randomize
from reglue import checkpoints, presets
from reglue.checkpoints import CheckpointError
from reglue.models import SemanticCompressor, SiT, build


def _trained(seed=0):
    config = presets.load("tiny-reglue")
    torch.manual_seed(seed)
    model = build(config)
    ema = build(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(2):
        x = torch.randn(2, 8, 8, 8)
        out = model(x, torch.rand(2), torch.tensor([1, 2]), cls=torch.randn(2, 32))
        (out.velocity.square().mean() + out.cls_velocity.square().mean() + out.projections.mean()).backward()
        opt.step()
        opt.zero_grad()
    return config, model, ema, opt


def test_round_trip_is_bit_exact(tmp_path):
    config, model, ema, opt = _trained()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, enabled=True)
    path = checkpoints.save_checkpoint(tmp_path / "0000002.pt", config=config, step=2, model=model, ema=ema,
                                       optimizer=opt, scaler=scaler, data_state={"step": 2, "epoch": 0, "offset": 64},
                                       rng=checkpoints.capture_rng_state())
    state = torch.load(path, weights_only=True)  # plain weights-only loading works
    assert state["step"] == 2 and state["config"] == config and state["data_state"]["offset"] == 64
    model2, ema2 = build(state["config"]), build(state["config"])
    model2.load_state_dict(state["model"])
    ema2.load_state_dict(state["ema"])
    for a, b in zip(list(model.state_dict().values()) + list(ema.state_dict().values()),
                    list(model2.state_dict().values()) + list(ema2.state_dict().values())):
        assert torch.equal(a, b)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-3)
    opt2.load_state_dict(state["optimizer"])
    for s1, s2 in zip(opt.state.values(), opt2.state.values()):
        assert all(torch.equal(s1[k], s2[k]) for k in ("exp_avg", "exp_avg_sq", "step"))
    assert state["scaler"]["scale"] == 1024.0
    loaded, loaded_config = checkpoints.load_model(path, ema=False)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    assert not loaded.training and loaded_config["preset"] == "tiny-reglue"


def test_rng_state_restores_every_generator(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached gaussian in Python's state
    state = checkpoints.capture_rng_state()
    first = (random.random(), random.gauss(0, 1), np.random.rand(3), np.random.randn(), torch.rand(3))
    checkpoints.save_checkpoint(tmp_path / "0000001.pt", config={}, step=1, model=None, rng=state)
    checkpoints.restore_rng_state(checkpoints.load_checkpoint(tmp_path / "0000001.pt")["rng"])
    second = (random.random(), random.gauss(0, 1), np.random.rand(3), np.random.randn(), torch.rand(3))
    assert first[0] == second[0] and first[1] == second[1] and first[3] == second[3]
    assert np.array_equal(first[2], second[2]) and torch.equal(first[4], second[4])


def test_failed_save_keeps_the_previous_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "0000001.pt"
    checkpoints.save_checkpoint(path, config={"a": 1}, step=1, model=None)
    before = path.read_bytes()

    def broken_save(obj, f, *args, **kwargs):
        with open(f, "wb") as handle:
            handle.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        checkpoints.save_checkpoint(path, config={"a": 2}, step=1, model=None)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["0000001.pt"]


def test_truncated_checkpoint_is_refused_and_skipped(tmp_path):
    config, model, ema, opt = _trained()
    good = checkpoints.save_checkpoint(tmp_path / "0000010.pt", config=config, step=10, model=model)
    (tmp_path / "0000020.pt").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="0000020.pt"):
        checkpoints.load_checkpoint(tmp_path / "0000020.pt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert checkpoints.find_latest_checkpoint(tmp_path) == good
    assert any("0000020.pt" in str(w.message) for w in caught)
    with pytest.raises(CheckpointError, match="no such file"):
        checkpoints.load_checkpoint(tmp_path / "missing.pt")


def _official_file(tmp_path, with_cls, in_channels, name, args):
    torch.manual_seed(0)
    official = randomize(OfficialSiT(in_channels=in_channels, with_cls=with_cls), seed=1).eval()
    ema = randomize(OfficialSiT(in_channels=in_channels, with_cls=with_cls), seed=2).eval()
    path = tmp_path / name
    torch.save({"model": official.state_dict(), "ema": ema.state_dict(), "opt": {}, "args": args, "steps": 123}, path)
    return official, ema, path


def _args(**kw):
    base = dict(model="SiT-B/2", encoder_depth=1, qk_norm=False, num_classes=1000, cfg_prob=0.1, proj_coeff=0.5)
    return argparse.Namespace(**{**base, **kw})


def _compare(official, ours, with_cls, in_channels):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, in_channels, 8, 8, generator=gen)
    t, y = torch.rand(3, generator=gen), torch.tensor([0, 5, 1000])
    cls = torch.randn(3, 16, generator=gen) if with_cls else None
    v_ref, zs_ref, cls_ref = official(x, t, y, cls_token=cls)
    out = ours(x, t, y, cls=cls, return_projections=True)
    torch.testing.assert_close(out.velocity, v_ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.projections, zs_ref, atol=1e-5, rtol=1e-4)
    if with_cls:
        torch.testing.assert_close(out.cls_velocity, cls_ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("ema", [True, False])
def test_official_reglue_checkpoint_loads_and_matches(tmp_path, ema):
    args = _args(cls=0.03, feat_channels=16, encoder_channel_list="3072,256,16", interm_layers="8,9,10,11")
    official, official_ema, path = _official_file(tmp_path, True, 20, "reglue.pt", args)
    ours, config = checkpoints.load_model(path, ema=ema)
    assert config["preset"] == "sit-b2-reglue" and config["origin"]["step"] == 123
    assert config["model"]["semantic_channels"] == 16 and config["model"]["projector"]["depth"] == 1
    _compare(official_ema if ema else official, ours, True, 20)


def test_official_reg_and_repa_checkpoints_load_and_match(tmp_path):
    reg, reg_ema, reg_path = _official_file(tmp_path, True, 4, "reg.pt", _args(cls=0.03))
    ours, config = checkpoints.load_model(reg_path)
    assert config["preset"] == "sit-b2-reg"
    _compare(reg_ema, ours, True, 4)
    repa, repa_ema, repa_path = _official_file(tmp_path, False, 4, "repa.pt", _args(model="SiT-XL/2"))
    ours, config = checkpoints.load_model(repa_path)
    assert config["preset"] == "sit-xl2-repa" and not config["model"]["cls_token"]
    _compare(repa_ema, ours, False, 4)


class Payload:
    """Something an attacker might pickle into args."""

    def __reduce__(self):
        return (print, ("this must never run",))


def test_unsafe_pickles_are_refused(tmp_path, capsys):
    official = OfficialSiT()
    path = tmp_path / "evil.pt"
    torch.save({"model": official.state_dict(), "args": argparse.Namespace(model="SiT-B/2", x=Payload())}, path)
    with pytest.raises(CheckpointError, match="evil.pt: cannot be read safely"):
        checkpoints.load_model(path)
    assert "must never run" not in capsys.readouterr().out


def test_official_compressor_and_norm_stats_load(tmp_path):
    channels = [24, 12, 4]
    official = randomize(OfficialEncoderDecoder(channels), seed=3).eval()
    state = {f"module.{k}": v for k, v in official.state_dict().items()}  # saved from DataParallel
    torch.save(state, tmp_path / "compressor.pth")
    torch.save(numpy_stats(24), tmp_path / "stats.pth")
    compressor, stats = checkpoints.load_compressor(tmp_path / "compressor.pth", norm_stats=tmp_path / "stats.pth")
    assert compressor.channels == channels and not compressor.training
    feats = torch.randn(2, 24, 4, 4)
    torch.testing.assert_close(compressor.encode(feats), official.encoder(feats), rtol=0, atol=0)
    np.testing.assert_array_equal(stats[0].numpy(), numpy_stats(24)["mean"])
    np.testing.assert_array_equal(stats[1].numpy(), numpy_stats(24)["std"])


def test_our_compressor_file_round_trips(tmp_path):
    comp = randomize_(SemanticCompressor([24, 12, 4])).eval()
    mean, std = torch.randn(24), torch.rand(24) + 0.5
    checkpoints.save_compressor(tmp_path / "c.pt", comp, mean, std, vfm="tiny-dinov2", layers=[2, 3])
    loaded, (m, s) = checkpoints.load_compressor(tmp_path / "c.pt")
    assert torch.equal(m, mean) and torch.equal(s, std)
    assert all(torch.equal(a, b) for a, b in zip(comp.state_dict().values(), loaded.state_dict().values()))
    raw = torch.load(tmp_path / "c.pt", weights_only=True)
    assert raw["vfm"] == "tiny-dinov2" and raw["layers"] == [2, 3]


def test_foreign_files_are_named(tmp_path):
    torch.save({"something": torch.zeros(1)}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="x.pt: neither a reglue checkpoint nor an official"):
        checkpoints.load_model(tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="neither a reglue compressor"):
        checkpoints.load_compressor(tmp_path / "x.pt")
    torch.save({"model": SiT(tiny_config()).state_dict(), "args": argparse.Namespace(model="DiT-XL/2")}, tmp_path / "d.pt")
    with pytest.raises(CheckpointError, match="DiT-XL/2"):
        checkpoints.load_model(tmp_path / "d.pt")
