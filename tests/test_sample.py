"""`reglue sample`: sampler formulas against float64 NumPy, CFG and interval, per-sample seeds (batch size and
process count do not matter), balanced labels, resume, the ADM .npz, and bad input."""

import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from conftest import randomize_
from reglue import checkpoints, presets
from reglue.models import ModelOutput, build
from reglue.sampling import run as sampling_run
from reglue.sampling.run import SampleSettings, sample_to_dir
from reglue.sampling.seeds import make_labels
from reglue.transport.samplers import Guidance, guided_velocity, sample_ode, sample_sde, time_grid
from reglue_cli.main import main

REPO = Path(__file__).resolve().parents[1]


class LinearField(torch.nn.Module):
    """Closed-form stand-in: v = a x + t b[y], cls_v = a cls + t c[y] (label 1000 is the null class)."""

    def __init__(self, channels=5, cls_dim=3):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.a = torch.nn.Parameter(torch.tensor(-0.7))
        self.b = torch.nn.Parameter(torch.randn(1001, channels, generator=gen))
        self.c = torch.nn.Parameter(torch.randn(1001, cls_dim, generator=gen))

    def forward(self, x, t, y, cls=None, return_projections=None):
        v = self.a * x + t[:, None, None, None] * self.b[y][:, :, None, None]
        return ModelOutput(v, self.a * cls + t[:, None] * self.c[y], None)


def _np_velocity(field, x, cls, t, y):
    a, b, c = float(field.a.detach()), field.b.detach().double().numpy(), field.c.detach().double().numpy()
    return a * x + t * b[y][:, :, None, None], a * cls + t * c[y]


def _reference_sde(field, x, cls, y, steps, g: Guidance, xis, cls_xis, latents_only=False, plus_one=False):
    """Float64 NumPy re-statement of method.md section 6: drift-level CFG, w = 2t, last step deterministic."""
    grid = np.concatenate([np.linspace(1.0, 0.04, steps), [0.0]])
    for i in range(steps):
        t, t_next = grid[i], grid[i + 1]
        dt = t_next - t

        def drift(v, state):
            score = (-(1 - t) * v - state) / t
            return v - 0.5 * (2 * t) * score

        v_c, cv_c = _np_velocity(field, x, cls, t, y)
        d, cd = drift(v_c, x), drift(cv_c, cls)
        if g.active(t):
            v_u, cv_u = _np_velocity(field, x, cls, t, np.full_like(y, 1000))
            du, cdu = drift(v_u, x), drift(cv_u, cls)
            if latents_only:
                lat = d[:, :4] + g.scale * (d[:, :4] - du[:, :4]) if plus_one else du[:, :4] + g.scale * (d[:, :4] - du[:, :4])
                d = np.concatenate([lat, d[:, 4:]], axis=1)
            else:
                d = du + g.scale * (d - du)
            cd = cdu + g.effective_cls_scale * (cd - cdu)
        x, cls = x + d * dt, cls + cd * dt
        if i < steps - 1:
            x = x + np.sqrt(2 * t * abs(dt)) * xis[i]
            cls = cls + np.sqrt(2 * t * abs(dt)) * cls_xis[i]
    return x, cls


def _states(seed=0, n=3, steps=6):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, 5, 2, 2)), rng.standard_normal((n, 3)), np.array([3, 7, 1]),
            rng.standard_normal((steps, n, 5, 2, 2)), rng.standard_normal((steps, n, 3)))


@pytest.mark.parametrize("guidance, latents_only, plus_one", [
    (Guidance(), False, False),
    (Guidance(scale=2.3, interval=(0.0, 0.9)), False, False),
    (Guidance(scale=2.8, cls_scale=1.5, interval=(0.3, 0.7)), False, False),
    (Guidance(scale=2.0, channels="latents"), True, False),
    (Guidance(scale=2.0, channels="latents", reference_vae_cfg=True), True, True),
])
def test_sde_matches_independent_float64_reference(guidance, latents_only, plus_one):
    field = LinearField()
    x, cls, y, xis, cls_xis = _states()
    got_x, got_cls = sample_sde(guided_velocity(field, guidance), torch.tensor(x), torch.tensor(cls), torch.tensor(y),
                                time_grid(6), lambda i: (torch.tensor(xis[i]), torch.tensor(cls_xis[i])))
    want_x, want_cls = _reference_sde(field, x, cls, y, 6, guidance, xis, cls_xis, latents_only, plus_one)
    np.testing.assert_allclose(got_x.numpy(), want_x, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got_cls.numpy(), want_cls, rtol=1e-6, atol=1e-6)


def test_reference_vae_cfg_is_scale_plus_one():
    cond, uncond = torch.randn(2, 6, 2, 2, dtype=torch.float64), torch.randn(2, 6, 2, 2, dtype=torch.float64)
    compat = Guidance(scale=2.0, channels="latents", reference_vae_cfg=True).combine(cond, uncond)
    standard = Guidance(scale=3.0, channels="latents").combine(cond, uncond)
    torch.testing.assert_close(compat, standard)
    assert torch.equal(compat[:, 4:], cond[:, 4:])


@pytest.mark.parametrize("heun", [False, True])
def test_ode_matches_independent_float64_reference(heun):
    field = LinearField()
    x, cls, y, _, _ = _states()
    g = Guidance(scale=2.0, interval=(0.0, 0.5))
    got_x, got_cls = sample_ode(guided_velocity(field, g), torch.tensor(x), torch.tensor(cls), torch.tensor(y),
                                time_grid(5), heun=heun)
    grid = np.concatenate([np.linspace(1.0, 0.04, 5), [0.0]])

    def vel(xs, cs, t):
        vc, cc = _np_velocity(field, xs, cs, t, y)
        if 0.0 <= t <= 0.5:
            vu, cu = _np_velocity(field, xs, cs, t, np.full_like(y, 1000))
            return vu + 2.0 * (vc - vu), cu + 2.0 * (cc - cu)
        return vc, cc

    for t, t_next in zip(grid[:-1], grid[1:]):
        dt = t_next - t
        v, cv = vel(x, cls, t)
        if heun:
            v2, cv2 = vel(x + v * dt, cls + cv * dt, t_next)
            x, cls = x + 0.5 * (v + v2) * dt, cls + 0.5 * (cv + cv2) * dt
        else:
            x, cls = x + v * dt, cls + cv * dt
    np.testing.assert_allclose(got_x.numpy(), x, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got_cls.numpy(), cls, rtol=1e-6, atol=1e-6)


def test_time_grid_is_the_reference_grid():
    grid = time_grid(250)
    assert len(grid) == 251 and grid[0] == 1.0 and grid[-2] == pytest.approx(0.04) and grid[-1] == 0.0


def test_balanced_labels_are_exact_and_shuffled():
    labels = make_labels(3000, 1000, seed=4, balanced=True).numpy()
    assert (np.bincount(labels, minlength=1000) == 3).all()
    assert not (np.diff(labels) >= 0).all()
    with pytest.raises(ValueError, match="divisible"):
        make_labels(1001, 1000, seed=4, balanced=True)
    uniform = make_labels(500, 1000, seed=4, balanced=False)
    assert torch.equal(uniform[:100], make_labels(100, 1000, seed=4, balanced=False))  # per-sample, prefix-stable


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    config = presets.load("tiny-reglue")
    torch.manual_seed(0)
    model = randomize_(build(config), seed=3, scale=0.05)
    path = tmp_path_factory.mktemp("ckpt") / "0000005.pt"
    checkpoints.save_checkpoint(path, config=config, step=5, model=model, ema=model)
    return path


def _settings(**kw):
    base = dict(n=10, steps=4, vae="tiny", guidance=Guidance(scale=2.0, interval=(0.0, 0.9)))
    return SampleSettings(**{**base, **kw})


def _images(out):
    return np.load(Path(out) / "samples.npz")["arr_0"]


def test_batch_size_does_not_change_the_samples(ckpt, tmp_path):
    sample_to_dir(ckpt, tmp_path / "b3", _settings(), batch_size=3, progress=False)
    sample_to_dir(ckpt, tmp_path / "b7", _settings(), batch_size=7, progress=False)
    a, b = _images(tmp_path / "b3"), _images(tmp_path / "b7")
    assert a.shape == (10, 64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    with h5py.File(tmp_path / "b3/samples.h5") as f:
        assert np.array_equal(f["images"][...], a) and f.attrs["n"] == 10 and f.attrs["preset"] == "tiny-reglue"
        assert "checkpoint_sha256" in f.attrs and "clamp" in f.attrs["quantisation"]
    assert not (tmp_path / "b3/parts").exists()


def test_interrupted_run_resumes_to_the_same_samples(ckpt, tmp_path, monkeypatch):
    sample_to_dir(ckpt, tmp_path / "straight", _settings(sampler="ode-heun"), batch_size=4, progress=False)
    calls = {"n": 0}
    real = sampling_run.integrate

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(sampling_run, "integrate", flaky)
    with pytest.raises(KeyboardInterrupt):
        sample_to_dir(ckpt, tmp_path / "resumed", _settings(sampler="ode-heun"), batch_size=4, progress=False)
    assert not (tmp_path / "resumed/samples.npz").exists()
    monkeypatch.setattr(sampling_run, "integrate", real)
    messages = []
    summary = sample_to_dir(ckpt, tmp_path / "resumed", _settings(sampler="ode-heun"), batch_size=4, progress=False,
                            log=messages.append)
    assert summary.written == 6 and "4 of 10 samples already written" in messages[0]
    assert np.array_equal(_images(tmp_path / "straight"), _images(tmp_path / "resumed"))
    assert sample_to_dir(ckpt, tmp_path / "resumed", _settings(sampler="ode-heun"), progress=False).reused


def test_torchrun_two_processes_match_one(ckpt, tmp_path):
    args = ["--ckpt", str(ckpt), "--num-samples", "6", "--steps", "3", "--vae", "tiny", "--cfg", "1.5", "--batch-size", "2",
            "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "reglue_cli", "sample", "--out", str(tmp_path / "one"), *args],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29547", "-m", "reglue_cli", "sample", "--out", str(tmp_path / "two"), *args],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    assert np.array_equal(_images(tmp_path / "one"), _images(tmp_path / "two"))


def test_npz_is_a_plain_numpy_adm_batch(ckpt, tmp_path):
    sample_to_dir(ckpt, tmp_path / "s", _settings(n=4, balanced=False), batch_size=4, progress=False)
    with np.load(tmp_path / "s/samples.npz") as npz:
        assert npz.files == ["arr_0"]
        arr = npz["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape == (4, 64, 64, 3)


def test_bad_input_is_one_line_and_exit_2(ckpt, tmp_path, capsys):
    torch.save({"not": "a checkpoint"}, tmp_path / "foreign.pt")
    sample_to_dir(ckpt, tmp_path / "taken", _settings(n=2), progress=False)
    base = ["--out", str(tmp_path / "o"), "--vae", "tiny", "--steps", "2", "--quiet"]
    cases = [
        (["--ckpt", str(tmp_path / "missing.pt"), *base], "no such file"),
        (["--ckpt", str(tmp_path / "foreign.pt"), *base], "neither a reglue checkpoint"),
        (["--ckpt", str(ckpt), "--n", "0", *base], "--n"),
        (["--ckpt", str(ckpt), "--interval", "0.5,1.2", *base], "0 <= LOW <= HIGH <= 1"),
        (["--ckpt", str(ckpt), "--interval", "high", *base], "expected LOW,HIGH"),
        (["--ckpt", str(ckpt), "--class", "1000", "--n", "2", *base], "class 1000 out of range"),
        (["--ckpt", str(ckpt), "--n", "3", "--out", str(tmp_path / "taken"), "--vae", "tiny", "--steps", "2"],
         "holds samples of another run"),
        (["--ckpt", str(ckpt), "--balanced", "--n", "7", *base], "divisible"),
    ]
    for argv, message in cases:
        code = main(["sample", *argv])
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1, (argv, err)
