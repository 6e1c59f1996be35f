"""The typed run configuration: every preset key is declared and documented, every key is honoured or refused,
sections that do not fit are one line at --dry-run, and unconditional models train and sample."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from helpers import make_folder

from reglue import config as run_config
from reglue import presets
from reglue.config.schema import describe
from reglue.config.yamlfile import load_yaml
from reglue.data.encode import EncodeOptions, encode_dataset
from reglue.data.sources import open_source
from reglue.encoders.vae import load_vae
from reglue.encoders.vfm import build_tiny_vfm
from reglue.training.diffusion import TrainOptions, build_trainer
from reglue.training.order import flip_rows
from reglue_cli.main import main

DOCS = Path(__file__).resolve().parents[1] / "docs" / "presets.md"


def _declared() -> set[str]:
    keys = set()
    for name, kind in run_config.KINDS.items():
        keys |= {key for key, _, _ in describe(kind, run_config.defaults(name))}
    return keys


def _leaves(data: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and key not in ("sources", "origin"):
            out += _leaves(value, path + ".")
        out.append(path)
    return out


def test_every_key_of_every_preset_file_is_declared_by_a_typed_section():
    files = presets._preset_files()
    declared = _declared() | {"base"}
    for name, path in files.items():
        import yaml

        raw = yaml.safe_load(path.read_text()) or {}
        undeclared = [k for k in _leaves(raw) if k not in declared]
        assert not undeclared, f"{name}.yaml: {undeclared} are declared by no section of reglue/config/sections.py"


def test_docs_list_every_key_with_its_default():
    text = DOCS.read_text()
    missing = [key for key in sorted(_declared() - {"origin"}) if f"| `{key}` |" not in text]
    assert not missing, f"docs/presets.md does not list {missing}"
    spec = importlib.util.spec_from_file_location("preset_keys", DOCS.parents[1] / "scripts" / "preset_keys.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for kind in run_config.KINDS:  # defaults and meanings as the code declares them today
        assert module.key_table(kind) in text, f"docs/presets.md: run scripts/preset_keys.py ({kind} table)"


def test_every_preset_loads_and_round_trips_through_its_plain_form():
    for name in presets.available():
        config = presets.load(name)
        assert run_config.from_dict(run_config.to_dict(config)) == config


@pytest.mark.parametrize("override, message", [
    ("transport.prediction=eps", "transport.prediction: no such key"),
    ("train.steps_per_epoch=10", "train.steps_per_epoch: no such key"),
    ("data.resolution=512", "data.resolution 512 gives 64x64 latents but model.input_size is 32"),
    ("vfm.image_size=448", "REPA aligns the model's 256 patch tokens"),
    ("vfm.cls_layer=12", "vfm.cls_layer 12: dinov2-vitb14-reg has blocks 0..11"),
    ("vfm.layers=[7]", "compressor.channels [3072, 256, 16] must map 1 layers x 768"),
    ("compressor.channels=[768,256,16]", "compressor.channels [768, 256, 16] must map 4 layers"),
    ("model.cls_dim=1024", "model.cls_dim 1024 differs from dinov2-vitb14-reg's token width 768"),
    ("sampling.guidance_interval=[0.9,0.1]", "sampling.guidance_interval=[0.9, 0.1]: expected [low, high]"),
    ("sampling.sampler=ddim", "sampling.sampler='ddim': expected one of sde, ode-euler, ode-heun"),
])
def test_refused_at_dry_run_in_one_line(override, message, capsys):
    code = main(["train", "--preset", "sit-b2-reglue", "--set", override, "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err


@pytest.mark.parametrize("override, message", [
    ("loss.cls=0.1", "loss.cls=0.1: the model has no [CLS] token"),
    ("loss.semantic=0.5", "loss.semantic=0.5: the model has no semantic channels"),
    ("loss.repa=1.0", "loss.repa=1.0: the model has no REPA projector"),
    ("vfm.repa_layer=8", "vfm.repa_layer=8: the model has no REPA projector"),
    ("compressor.path=c.pt", "compressor.path='c.pt': model.semantic_source is none"),
])
def test_a_key_no_code_would_read_is_refused(override, message, capsys):
    code = main(["train", "--preset", "sit-b2", "--set", override, "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err


def test_exponent_numbers_are_floats_in_set_presets_and_run_files(tmp_path, capsys):
    """`1e-3` is a float (YAML 1.2) wherever configuration YAML is read: --set, a preset file, a stored config.yaml."""
    overrides = presets.parse_assignments(["optim.lr=1e-3", "optim.eps=-2E-8", "description=1e3x"])
    assert overrides == {"optim.lr": float("1e-3"), "optim.eps": -2e-8, "description": "1e3x"}
    config = presets.load("tiny-sit", optim__lr=overrides["optim.lr"])
    assert config.optim.lr == 0.001
    assert main(["train", "--preset", "tiny-sit", "--dry-run", "--set", "optim.lr=5e-4"]) == 0
    assert "lr: 0.0005" in capsys.readouterr().out
    assert load_yaml("optim: {lr: 1e-4, betas: [9e-1, 0.95]}") == {"optim": {"lr": 1e-4, "betas": [0.9, 0.95]}}


def test_unconditional_presets_show_their_table_2b_source(capsys):
    expected = {"sit-b2-uncond": "59.8", "sit-b2-redi-uncond": "43.6", "sit-b2-reg-uncond": "29.7",
                "sit-b2-reglue-uncond": "28.7"}
    for name, fid in expected.items():
        assert main(["train", "--preset", name, "--dry-run", "--json"]) == 0
        shown = json.loads(capsys.readouterr().out)
        assert shown["config"]["model"]["num_classes"] == 0 and shown["config"]["model"]["class_dropout"] == 0.0
        assert "Table 2(b)" in shown["config"]["sources"]["table"] and fid in shown["config"]["sources"]["table"]
    uncond, cond = (presets.load(n) for n in ("sit-b2-reglue-uncond", "sit-b2-reglue"))
    from reglue.models import count_parameters

    # the only difference is the label table: 1001 rows of width 768
    assert count_parameters(cond)["total"] - count_parameters(uncond)["total"] == 1001 * 768


# ------------------------------------------------------------------------------------------- honoured keys

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("config")
    images = make_folder(root / "images", per_class=4, seed=5, corrupt=False)
    encode_dataset(open_source(images), root / "data.h5", *load_vae("tiny"),
                   EncodeOptions(resolution=64, workers=0, flip=True), progress=False, log=lambda m: None)
    encode_dataset(open_source(images), root / "plain.h5", *load_vae("tiny"),
                   EncodeOptions(resolution=64, workers=0), progress=False, log=lambda m: None)
    return root


def _options(data, outdir, **kw):
    return TrainOptions(data=str(data), outdir=str(outdir), workers=0, progress=False, echo=lambda s: None, **kw)


def _tiny(**overrides):
    base = dict(train__global_batch=8, train__sample_every=0, train__log_every=1, train__ckpt_every=1000,
                train__max_steps=2)
    return presets.load("tiny-sit", **{**base, **overrides})


def _first_batch(trainer):
    from reglue.training.order import make_split, step_noise
    from reglue.transport import sample_time

    cfg = trainer.model.config
    split = make_split(8, 1, None)
    noise = step_noise(0, 0, split.global_batch, cfg.in_channels, cfg.latent_channels, cfg.input_size, None,
                       cfg.class_dropout, lambda n, g: sample_time(n, "uniform", "linear", generator=g),
                       flip=trainer.config.data.flip)
    images, moments, labels = trainer.dataset.read_batch(list(range(8)))
    return images, moments, noise


def test_latent_scale_is_the_scale_training_uses(data, tmp_path):
    from reglue.training.diffusion import _joint_state

    for scale in (0.18215, 0.5):
        trainer = build_trainer(_tiny(data__latent_scale=scale), _options(data / "plain.h5", tmp_path / str(scale)))
        trainer.run.release()
        images, moments, noise = _first_batch(trainer)
        z, _, _ = _joint_state(trainer, images, moments, noise)
        m = moments.double().numpy()
        expected = (m[:, :4] + m[:, 4:] * noise.posterior.double().numpy()) * scale  # float64 reference
        np.testing.assert_allclose(z.double().numpy(), expected, rtol=1e-5, atol=1e-6)


def test_flip_reads_the_mirrored_image_and_its_moments(data, tmp_path):
    with h5py.File(data / "data.h5", "r") as f:
        stored_flip = torch.from_numpy(f["moments_flip"][:8].astype(np.float32))
    trainer = build_trainer(_tiny(data__flip=True), _options(data / "data.h5", tmp_path / "flip"))
    trainer.run.release()
    images, moments, noise = _first_batch(trainer)
    assert moments.shape[1] == 16 and noise.flip is not None and 0 < int(noise.flip.sum()) < 8
    flipped_images, chosen = flip_rows(images, moments, noise.flip)
    for i in range(8):
        want = stored_flip[i] if noise.flip[i] else moments[i, :8]
        assert torch.equal(chosen[i], want)
        assert torch.equal(flipped_images[i], images[i].flip(-1) if noise.flip[i] else images[i])
    # the draws before the flips are those of a run without flip: switching it on changes nothing else
    plain = build_trainer(_tiny(), _options(data / "data.h5", tmp_path / "noflip"))
    plain.run.release()
    assert torch.equal(_first_batch(plain)[2].noise, noise.noise)


def test_flip_without_flipped_moments_is_one_line(data, tmp_path, capsys):
    code = main(["train", "--preset", "tiny-sit", "--set", "data.flip=true", "--data", str(data / "plain.h5"),
                 "--outdir", str(tmp_path / "r"), "--quiet", "--workers", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "no flipped moments" in err and "encode --flip" in err and err.count("\n") == 1


def test_a_dataset_of_another_vae_is_refused(data, tmp_path, capsys):
    code = main(["train", "--preset", "tiny-sit", "--set", "data.vae=stabilityai/sd-vae-ft-mse", "--data",
                 str(data / "plain.h5"), "--outdir", str(tmp_path / "r"), "--quiet", "--workers", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "encoded with vae 'tiny'" in err, err


def test_cls_and_repa_layers_select_the_blocks_they_name():
    vfm = build_tiny_vfm()
    images = torch.randint(0, 256, (2, 3, 56, 56), dtype=torch.uint8)
    vit = vfm.vit
    x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(vfm.preprocess(images)))))
    outputs = []
    for block in vit.blocks:  # an independent walk through the blocks
        x = block(x)
        outputs.append(vit.norm(x))
    default = vfm(images, [3])
    assert torch.equal(default.cls, outputs[-1][:, 0])
    chosen = vfm(images, [3], cls_layer=1, repa_layer=2)
    assert torch.equal(chosen.cls, outputs[1][:, 0])
    assert torch.equal(chosen.tokens, torch.cat([outputs[2][:, :1], outputs[2][:, 5:]], dim=1))  # 4 registers
    assert not torch.equal(chosen.cls, default.cls)


# ------------------------------------------------------------------------------- sampling section, uncond

def _train_and_sample(data, tmp_path, train_args, sample_args):
    run = tmp_path / "run"
    code = main(["train", "--preset", "tiny-sit", "--data", str(data / "plain.h5"), "--outdir", str(run),
                 "--max-steps", "2", "--global-batch", "8", "--sample-every", "0", "--quiet", "--workers", "0",
                 *train_args])
    assert code == 0
    out = tmp_path / "samples"
    code = main(["sample", "--ckpt", str(run / "checkpoints/0000002.pt"), "--out", str(out), "--n", "4",
                 "--vae", "tiny", "--quiet", "--device", "cpu", *sample_args])
    return code, out


def test_the_sampling_section_is_what_sample_uses_without_flags(data, tmp_path):
    code, out = _train_and_sample(data, tmp_path, ["--set", "sampling.steps=5", "--set", "sampling.cfg_scale=3.0"],
                                  [])
    assert code == 0
    with h5py.File(out / "samples.h5", "r") as f:
        settings = json.loads(f.attrs["settings"])
        taken = json.loads(f.attrs["settings_from_checkpoint"])
    assert settings["steps"] == 5 and settings["guidance"]["scale"] == 3.0
    assert settings["guidance"]["cls_scale"] == 3.0 and settings["guidance"]["interval"] == [0.0, 0.9]
    assert {"steps", "cfg", "sampler"} <= set(taken)


def test_flags_override_the_sampling_section(data, tmp_path):
    code, out = _train_and_sample(data, tmp_path, ["--set", "sampling.steps=5", "--set", "sampling.cfg_scale=3.0"],
                                  ["--steps", "3", "--cfg", "1.5"])
    assert code == 0
    with h5py.File(out / "samples.h5", "r") as f:
        settings = json.loads(f.attrs["settings"])
    assert settings["steps"] == 3 and settings["guidance"]["scale"] == 1.5 and settings["guidance"]["cls_scale"] == 1.5


def test_an_unconditional_model_trains_samples_and_refuses_guidance(data, tmp_path, capsys):
    code, out = _train_and_sample(data, tmp_path, ["--set", "model.num_classes=0"], [])
    assert code == 0
    with h5py.File(out / "samples.h5", "r") as f:
        assert f["images"].shape == (4, 64, 64, 3) and f.attrs["null_class"] == -1
    ckpt = torch.load(tmp_path / "run/checkpoints/0000002.pt", weights_only=True)
    assert not any(k.startswith("y_embedder") for k in ckpt["model"])  # no label table at all
    capsys.readouterr()
    code = main(["sample", "--ckpt", str(tmp_path / "run/checkpoints/0000002.pt"), "--out", str(tmp_path / "g"),
                 "--n", "4", "--vae", "tiny", "--quiet", "--device", "cpu", "--cfg", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "unconditional model has no classifier-free guidance" in err and err.count("\n") == 1
    assert re.search(r"model\.num_classes 0", presets_error("sampling__cfg_scale", 2.0))


def presets_error(key, value) -> str:
    with pytest.raises(run_config.ConfigError) as info:
        presets.load("sit-b2-uncond", **{key: value})
    return str(info.value)


def test_runs_and_checkpoints_of_the_untyped_version_still_resume():
    from reglue.training.rundir import config_difference

    new = presets.load("tiny-reglue")
    old = run_config.to_dict(new)
    old["transport"]["prediction"] = "v"  # retired keys, holding the only value they ever had
    old["train"]["steps_per_epoch"] = 5005
    old["vfm"]["cls_layer"] = old["vfm"]["repa_layer"] = 3  # the last block, written out
    assert config_difference(old, new) == []
    old["transport"]["prediction"] = "eps"  # never honoured: not the same run
    assert config_difference(old, new) != []
    with pytest.raises(run_config.ConfigError, match="transport.prediction='eps': this version only trains"):
        run_config.from_dict(old, stored=True)
    plain_sit = run_config.to_dict(presets.load("tiny-sit"))
    plain_sit["vfm"] = {"name": "tiny-dinov2", "image_size": 56, "layers": [3], "cls_layer": 3, "repa_layer": 3}
    assert config_difference(plain_sit, presets.load("tiny-sit")) == []  # a SiT reads no VFM


# ------------------------------------------------------------------------------ the compressor's own keys

def test_compressor_schedule_precision_and_clipping_are_honoured(data, tmp_path, monkeypatch):
    from reglue.training import compressor as loop

    config = presets.load("compressor-tiny", train__max_steps=2, train__global_batch=8)
    o = config.optim
    assert loop.cosine_lr(o, 0) == o.lr and loop.cosine_lr(o, o.t_max_epochs) == pytest.approx(o.eta_min)
    half = o.eta_min + (o.lr - o.eta_min) * 0.5  # cos(pi / 2) = 0, computed by hand
    assert loop.cosine_lr(o, o.t_max_epochs / 2) == pytest.approx(half)
    constant = presets.load("compressor-tiny", optim__schedule="constant").optim
    assert {loop.cosine_lr(constant, e) for e in (0, 3, 50)} == {constant.lr}

    clips = []  # the max_norm of every clipping call (none without optim.grad_clip)
    real = torch.nn.utils.clip_grads_with_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grads_with_norm_",
                        lambda p, max_norm, total: clips.append(max_norm) or real(p, max_norm, total))
    casts = []
    real_autocast = loop.autocast
    monkeypatch.setattr(loop, "autocast",
                        lambda device, precision: casts.append(precision) or real_autocast(device, precision))
    weights = {}
    for precision, clip in (("fp32", None), ("bf16", 0.5)):
        clips.clear()
        cfg = presets.load("compressor-tiny", train__max_steps=2, train__global_batch=8, train__precision=precision,
                           optim__grad_clip=clip)
        result = loop.train_compressor(cfg, _options(data / "plain.h5", tmp_path / precision))
        weights[precision] = torch.load(result.path, weights_only=True)["state_dict"]
        assert clips == ([clip] * 2 if clip is not None else []) and casts[-1] == precision
    assert any(not torch.equal(weights["fp32"][k], weights["bf16"][k]) for k in weights["fp32"])
