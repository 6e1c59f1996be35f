"""`reglue train`: loss goes down, resume is bit-exact (also after SIGKILL), torchrun matches one process,
non-finite steps are skipped, and a trained compressor feeds a REGLUE run."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from helpers import make_folder

from reglue import checkpoints, presets
from reglue.data.encode import EncodeOptions, encode_dataset
from reglue.data.sources import open_source
from reglue.encoders.vae import load_vae
from reglue.models.flops import forward_gflops
from reglue.training.compressor import train_compressor
from reglue.training.diffusion import TrainingStopped, TrainOptions, train_diffusion
from reglue_cli.main import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    images = make_folder(root / "images", per_class=8, seed=11, corrupt=False)
    encode_dataset(open_source(images), root / "data.h5", *load_vae("tiny"),
                   EncodeOptions(resolution=64, workers=0), progress=False, log=lambda m: None)
    return root / "data.h5"


@pytest.fixture(scope="module")
def compressor(data, tmp_path_factory):
    outdir = tmp_path_factory.mktemp("comp") / "run"
    config = presets.load("compressor-tiny", train__max_steps=6, train__global_batch=8)
    result = train_compressor(config, _options(data, outdir))
    return Path(result.path)


def _options(data, outdir, **kw):
    return TrainOptions(data=str(data), outdir=str(outdir), workers=0, progress=False, echo=lambda s: None, **kw)


def _config(name="tiny-reglue", compressor=None, **overrides):
    base = dict(train__global_batch=8, train__sample_every=0, train__log_every=1, train__ckpt_every=1000)
    if compressor is not None:
        base["compressor__path"] = str(compressor)
    return presets.load(name, **{**base, **overrides})


def _states(path):
    state = checkpoints.load_checkpoint(path)
    return state["model"], state["ema"], state["optimizer"]["state"]


def _assert_bit_identical(a, b):
    for sa, sb in zip(_states(a), _states(b)):
        flat_a = sa if all(torch.is_tensor(v) for v in sa.values()) else {
            f"{k}.{n}": t for k, d in sa.items() for n, t in d.items()}
        flat_b = sb if all(torch.is_tensor(v) for v in sb.values()) else {
            f"{k}.{n}": t for k, d in sb.items() for n, t in d.items()}
        assert flat_a.keys() == flat_b.keys()
        for key in flat_a:
            assert torch.equal(flat_a[key], flat_b[key]), key


def test_loss_decreases_over_50_steps(data, tmp_path):
    config = _config("tiny-sit", train__max_steps=50, train__global_batch=16, optim__lr=1e-3)
    train_diffusion(config, _options(data, tmp_path / "run"))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records]
    assert len(losses) == 50
    assert np.mean(losses[-10:]) < 0.9 * np.mean(losses[:10])
    # throughput: the transformer's hardware FLOPs (2 per multiply-add, 3 forwards a step) at the logged rate
    gflops = forward_gflops(config)
    for r in records:
        assert r["tflops_per_s"] == pytest.approx(r["images_per_s"] * gflops * 2 * 3 / 1e3, rel=1e-9)
        assert "mfu" not in r and "max_mem_gib" not in r  # a CPU: no known peak, no CUDA memory
    assert records[0]["environment"]["torch"] == str(torch.__version__) and records[0]["environment"]["world"] == 1
    assert not any("environment" in r for r in records[1:])  # once per launch


def test_resume_is_bit_exact(data, compressor, tmp_path):
    straight = train_diffusion(_config(compressor=compressor, train__max_steps=6), _options(data, tmp_path / "a"))
    assert straight.step == 6
    train_diffusion(_config(compressor=compressor, train__max_steps=3), _options(data, tmp_path / "b"))
    resumed = train_diffusion(_config(compressor=compressor, train__max_steps=6), _options(data, tmp_path / "b"))
    assert resumed.step == 6
    _assert_bit_identical(tmp_path / "a/checkpoints/0000006.pt", tmp_path / "b/checkpoints/0000006.pt")
    state = checkpoints.load_checkpoint(tmp_path / "b/checkpoints/0000006.pt")
    assert state["data_state"] == {"step": 6, "epoch": 2, "offset": 0}  # 48 rows seen of 24 images


def test_truncated_latest_checkpoint_is_skipped(data, compressor, tmp_path):
    train_diffusion(_config(compressor=compressor, train__max_steps=4, train__ckpt_every=2),
                    _options(data, tmp_path / "run", keep_last=5))
    latest = tmp_path / "run/checkpoints/0000004.pt"
    latest.write_bytes(latest.read_bytes()[:5000])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = train_diffusion(_config(compressor=compressor, train__max_steps=4, train__ckpt_every=2),
                                  _options(data, tmp_path / "run", keep_last=5))
    assert any("0000004.pt" in str(w.message) for w in caught)
    assert "resumed from" in (tmp_path / "run/log.txt").read_text() and "0000002.pt" in (
        tmp_path / "run/log.txt").read_text()
    assert trainer.step == 4


def test_changed_config_in_an_existing_run_is_refused(data, tmp_path):
    train_diffusion(_config("tiny-sit", train__max_steps=1), _options(data, tmp_path / "run"))
    with pytest.raises(Exception, match="another config: model.depth"):
        train_diffusion(_config("tiny-sit", train__max_steps=1, model__depth=3), _options(data, tmp_path / "run"))


def _cli_train(outdir, data, compressor, *extra, env=None):
    args = [sys.executable, "-m", "reglue_cli", "train", "--preset", "tiny-reglue", "--data", str(data), "--outdir",
            str(outdir), "--compressor", str(compressor), "--workers", "0", "--quiet", "--sample-every", "0",
            "--set", "train.global_batch=8", *extra]
    return subprocess.Popen(args, cwd=REPO, env=env or {**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


POST_HOC = ("--set", "ema.sigma_rels=[0.05,0.1]", "--set", "ema.snapshot_every=2", "--set",
            "ema.snapshot_keep_every=4", "--set", "ema.snapshot_keep_last=2")  # post-hoc EMA snapshots (docs/ema.md)


def test_resume_after_sigkill_is_bit_exact(data, compressor, tmp_path):
    straight = _cli_train(tmp_path / "a", data, compressor, "--max-steps", "12", "--ckpt-every", "2", *POST_HOC)
    assert straight.wait(timeout=300) == 0, straight.stdout.read()
    killed = _cli_train(tmp_path / "b", data, compressor, "--max-steps", "12", "--ckpt-every", "2", *POST_HOC)
    deadline = time.time() + 120
    while time.time() < deadline and not (tmp_path / "b/checkpoints/0000004.pt").exists():
        time.sleep(0.01)
    assert killed.poll() is None, "training finished before it could be killed"
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "b/checkpoints/0000012.pt").exists()
    again = _cli_train(tmp_path / "b", data, compressor, "--max-steps", "12", "--ckpt-every", "2", *POST_HOC)
    log = again.communicate(timeout=300)[0]
    assert again.returncode == 0, log
    assert "resumed from" in log
    _assert_bit_identical(tmp_path / "a/checkpoints/0000012.pt", tmp_path / "b/checkpoints/0000012.pt")
    # the power-function EMAs' snapshots: the same files (pruned alike: multiples of 4 and the newest 2), same bits
    snapshots = sorted(p.name for p in (tmp_path / "a/ema").glob("[0-9]*.pt"))
    assert snapshots == ["0000004.pt", "0000008.pt", "0000010.pt", "0000012.pt"]
    assert sorted(p.name for p in (tmp_path / "b/ema").glob("[0-9]*.pt")) == snapshots
    for name in snapshots:
        a, b = (torch.load(tmp_path / run / "ema" / name, weights_only=True) for run in "ab")
        assert a["profiles"] == b["profiles"] and a["precision"] == b["precision"] == "fp16"
        for wa, wb in zip(a["weights"], b["weights"]):
            assert all(torch.equal(wa[k], wb[k]) for k in wa), name


def test_torchrun_two_processes_match_one(data, compressor, tmp_path):
    snapshot = ("--set", "ema.sigma_rels=[0.1]", "--set", "ema.snapshot_every=3")  # one, at the end
    one = _cli_train(tmp_path / "one", data, compressor, "--max-steps", "3", *snapshot)
    assert one.wait(timeout=300) == 0, one.stdout.read()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541", "-m",
           "reglue_cli", "train", "--preset", "tiny-reglue", "--data", str(data), "--outdir", str(tmp_path / "two"),
           "--compressor", str(compressor), "--workers", "0", "--quiet", "--sample-every", "0", "--set",
           "train.global_batch=8", "--max-steps", "3", "--batch-gpu", "2", "--ckpt-every", "2", *snapshot]
    # the checkpoint saves (steps 2 and 3) and the EMA snapshot (step 3) made slower (5 and 4 s on rank 0) than the
    # collective timeout (3 s): step 3's all-reduce would time out on rank 1 if it had waited for the save on a
    # collective, and the end of the run if it had waited for the snapshot so
    env = {**os.environ, "OMP_NUM_THREADS": "1", "REGLUE_DIST_TIMEOUT": "3",
           "REGLUE_SLOW_MAIN_PHASE": "checkpoint:5,ema-snapshot:4"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = (checkpoints.load_checkpoint(tmp_path / f"{r}/checkpoints/0000003.pt") for r in ("one", "two"))
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=1e-4, atol=1e-5, msg=key)
        torch.testing.assert_close(a["ema"][key], b["ema"][key], rtol=1e-4, atol=1e-5, msg=key)
    a, b = (torch.load(tmp_path / f"{r}/ema/0000003.pt", weights_only=True)["weights"][0] for r in ("one", "two"))
    for key in a:  # written once, by rank 0
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-4, msg=key)  # fp16 snapshots


def test_fp16_overflow_skips_the_step_and_keeps_weights_finite(data, tmp_path, monkeypatch):
    import reglue.training.diffusion as diffusion

    monkeypatch.setattr(diffusion, "make_scaler",
                        lambda device, precision: torch.amp.GradScaler(device.type, init_scale=2.0**126))
    config = _config("tiny-sit", train__max_steps=2, train__precision="fp16")
    trainer = train_diffusion(config, _options(data, tmp_path / "run"))
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert records[0]["skipped"] and trainer.guard.total >= 1
    assert trainer.scaler.get_scale() < 2.0**126  # the scaler backed off
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_nonfinite_loss_is_skipped_counted_and_stops_the_run(data, tmp_path):
    bad = tmp_path / "bad.h5"
    bad.write_bytes(Path(data).read_bytes())
    with h5py.File(bad, "a") as f:
        f["moments"][0:24] = np.nan
    config = _config("tiny-sit", train__max_steps=20)
    with pytest.raises(TrainingStopped, match="3 non-finite steps in a row at step 3"):
        train_diffusion(config, _options(bad, tmp_path / "run", max_nonfinite=3))
    log = (tmp_path / "run/log.txt").read_text()
    assert log.count("skipped") >= 3
    state = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert all(r["skipped"] for r in state)


def test_compressor_checkpoint_loads_into_a_diffusion_run(data, compressor, tmp_path):
    comp, (mean, std) = checkpoints.load_compressor(compressor)
    assert comp.channels == [64, 32, 4] and mean.shape == (64,) and (std > 0).all()
    raw = torch.load(compressor, weights_only=True)
    assert raw["vfm"] == "tiny-dinov2" and raw["layers"] == [2, 3]
    trainer = train_diffusion(_config(compressor=compressor, train__max_steps=1), _options(data, tmp_path / "run"))
    assert trainer.semantics.compressor is not None and not trainer.semantics.compressor.training


def test_compressor_is_found_from_its_run_directory_or_any_checkpoint(compressor, tmp_path):
    product, stats = checkpoints.load_compressor(compressor)
    run = compressor.parent
    last = sorted((run / "checkpoints").glob("*.pt"))[-1]
    for path in (run, run / "checkpoints", last):  # the run (-> compressor.pt), its checkpoints, one checkpoint
        comp, (mean, std) = checkpoints.load_compressor(path)
        assert all(torch.equal(a, b) for a, b in zip(comp.state_dict().values(), product.state_dict().values()))
        assert torch.equal(mean, stats[0]) and torch.equal(std, stats[1])
    unfinished = tmp_path / "unfinished"
    (unfinished / "checkpoints").mkdir(parents=True)
    shutil.copy(last, unfinished / "checkpoints" / last.name)  # a run that has not written compressor.pt yet
    assert checkpoints.load_compressor(unfinished)[0].channels == [64, 32, 4]
    (tmp_path / "empty").mkdir()
    with pytest.raises(checkpoints.CheckpointError, match="not a compressor run"):
        checkpoints.load_compressor(tmp_path / "empty")


def test_cli_errors_are_one_line(data, tmp_path, capsys):
    cases = [
        (["--preset", "tiny-sit", "--outdir", str(tmp_path / "r")], "--data and --outdir are required"),
        (["--preset", "tiny-reglue", "--data", str(data), "--outdir", str(tmp_path / "r2")],
         "needs a trained compressor"),
        (["--preset", "tiny-sit", "--data", str(tmp_path / "none.h5"), "--outdir", str(tmp_path / "r3")],
         "no such dataset"),
        (["--preset", "sit-b2", "--data", str(data), "--outdir", str(tmp_path / "r4")],
         "encoded with resolution 64, the run's data.resolution is 256"),
        (["--preset", "tiny-reglue", "--data", str(data), "--outdir", str(tmp_path / "r5"), "--compressor",
          str(data)], "cannot be read safely"),
    ]
    for argv, message in cases:
        code = main(["train", *argv, "--quiet", "--workers", "0"])
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1, (argv, err)


def test_redi_style_pca_semantics_train(data, tmp_path):
    config = _config("tiny-sit", train__max_steps=2, model__semantic_channels=4, model__semantic_source="pca",
                     vfm__name="tiny-dinov2", vfm__image_size=56, vfm__layers=[2, 3])
    trainer = train_diffusion(config, _options(data, tmp_path / "run"))
    basis = trainer.semantics.pca
    assert basis.shape == (64, 4)
    torch.testing.assert_close(basis.T @ basis, torch.eye(4), atol=1e-4, rtol=0)  # orthonormal directions
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert all(r["semantic"] > 0 for r in records)
    stored = torch.load(tmp_path / "run/pca_basis.pt", weights_only=True)["basis"]
    assert torch.equal(stored, basis)  # written once to the run directory
    changed = -stored  # a resume reads the stored basis instead of refitting (a refit could differ by device)
    torch.save({"basis": changed, "fit_images": 1024}, tmp_path / "run/pca_basis.pt")
    longer = dataclasses.replace(config, train=dataclasses.replace(config.train, max_steps=3))
    resumed = train_diffusion(longer, _options(data, tmp_path / "run"))
    assert torch.equal(resumed.semantics.pca.cpu(), changed)


def test_pca_basis_equals_a_float64_eigendecomposition_with_fixed_signs():
    from reglue.training.semantics import fit_pca

    gen = torch.Generator().manual_seed(3)
    mix = torch.randn(12, 12, generator=gen, dtype=torch.float64) * torch.linspace(3, 0.1, 12, dtype=torch.float64)
    local = torch.einsum("ncxy,dc->ndxy", torch.randn(20, 12, 4, 4, generator=gen, dtype=torch.float64), mix)
    flat = local.permute(0, 2, 3, 1).reshape(-1, 12).numpy()
    cov = np.cov(flat, rowvar=False)
    values, vectors = np.linalg.eigh(cov)
    top = vectors[:, np.argsort(values)[::-1][:5]]
    top = top * np.sign(top[np.abs(top).argmax(axis=0), np.arange(5)])  # largest entry of each direction positive
    np.testing.assert_allclose(fit_pca(local.float(), 5).numpy(), top, atol=1e-4)
    assert torch.equal(fit_pca(local.float(), 5), fit_pca(-local.float(), 5))  # same directions, same signs


def test_a_training_step_reads_the_host_once(data, tmp_path, monkeypatch):
    """The step's own code (train_step, the update, the optimiser step, the EMA) reads device values once: the loss
    terms, the non-finite flag and the gradient norm in one transfer (on a GPU, every other read would stall it)."""
    import traceback

    import reglue.training.diffusion as diffusion

    ours = {"train_step", "_apply_update", "optimiser_step", "update_ema", "_joint_state"}
    reads = []

    def counting(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            stack = traceback.extract_stack(limit=16)[:-1]
            callers = {frame.name for frame in stack}
            in_optimizer = any("torch/optim" in frame.filename for frame in stack)  # AdamW's step counters live on
            if callers & ours and not in_optimizer:  # the host (no device read); on a GPU the fused kernel's don't
                reads.append((name, sorted(callers & ours)))
            return original(self, *args, **kwargs)
        return read

    step = diffusion.train_step
    per_step = []

    def counted_step(*args, **kwargs):
        reads.clear()
        result = step(*args, **kwargs)
        per_step.append(list(reads))
        return result

    for name in ("tolist", "item", "__float__", "__bool__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    monkeypatch.setattr(diffusion, "train_step", counted_step)
    config = _config("tiny-sit", train__max_steps=2, train__global_batch=8, optim__grad_clip=1.0)
    train_diffusion(config, _options(data, tmp_path / "run", batch_gpu=4))  # 2 micro-batches a step
    assert per_step == [[("tolist", ["_apply_update", "train_step"])]] * 2
