"""`reglue sample`: sampler formulas against float64 NumPy (the official loop replayed step by step), CFG and
interval, the path and null class of the checkpoint, per-sample seeds and fixed chunks (batch size and process
count cannot change a pixel, even with kernels that depend on the batch), balanced labels, resume, the ADM .npz,
and bad input."""

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch
from conftest import randomize_

from reglue import checkpoints, presets
from reglue.distributed import DistInfo
from reglue.models import ModelOutput, build
from reglue.sampling import run as sampling_run
from reglue.sampling.run import SampleSettings, sample_to_dir
from reglue.sampling.seeds import SampleError, SampleNoise, make_labels
from reglue.transport.path import get_path
from reglue.transport.samplers import Guidance, guided_velocity, sample_ode, sample_sde, time_grid
from reglue_cli.main import main

REPO = Path(__file__).resolve().parents[1]


class LinearField(torch.nn.Module):
    """Closed-form stand-in: v = a x + t b[y], cls_v = a cls + t c[y] (label ``null_class`` is the null class)."""

    def __init__(self, channels=5, cls_dim=3, num_classes=1000):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.null_class = num_classes
        self.a = torch.nn.Parameter(torch.tensor(-0.7, dtype=torch.float64))  # float64: the sampler math is compared
        self.b = torch.nn.Parameter(torch.randn(num_classes + 1, channels, generator=gen, dtype=torch.float64))
        self.c = torch.nn.Parameter(torch.randn(num_classes + 1, cls_dim, generator=gen, dtype=torch.float64))

    def forward(self, x, t, y, cls=None, return_projections=None):
        v = self.a * x + t[:, None, None, None] * self.b[y][:, :, None, None]
        return ModelOutput(v, self.a * cls + t[:, None] * self.c[y], None)


def _np_field(field):
    a, b, c = float(field.a.detach()), field.b.detach().double().numpy(), field.c.detach().double().numpy()
    return lambda x, cls, t, y: (a * x + t * b[y][:, :, None, None], a * cls + t * c[y])


def _np_model(model):
    """A float64 velocity oracle over a torch model (the sampler arithmetic around it is what is re-stated)."""

    def velocity(x, cls, t, y):
        with torch.no_grad():
            out = model(torch.tensor(x), torch.full((len(y),), t, dtype=torch.float64), torch.tensor(y),
                        cls=None if cls is None else torch.tensor(cls))
        return out.velocity.numpy(), None if out.cls_velocity is None else out.cls_velocity.numpy()

    return velocity


def _np_score(v, x, t, path):
    """Solve [x; v] = [[alpha, sigma], [alpha', sigma']] [x0; eps] for eps; the score is -eps / sigma."""
    if path == "linear":
        alpha, sigma, d_alpha, d_sigma = 1 - t, t, -1.0, 1.0
    else:
        h = np.pi / 2
        alpha, sigma, d_alpha, d_sigma = np.cos(h * t), np.sin(h * t), -h * np.sin(h * t), h * np.cos(h * t)
    eps = (alpha * v - d_alpha * x) / (alpha * d_sigma - sigma * d_alpha)
    return -eps / sigma


def _official_sde(vel, x, cls, y, steps, xis, cls_xis, cfg_scale=1.0, cls_cfg_scale=1.5, low=0.0, high=1.0,
                  vae_cfg=False, path="linear", null=1000, vae_cfg_on_last_step=False):
    """Float64 NumPy re-statement of the official euler_maruyama_sampler (REGLUE samplers.py), step by step:
    guidance only when cfg_scale > 1 and low <= t <= high, drift-level CFG, [CLS] conditional when
    cls_cfg_scale <= 0, --vae_cfg on the loop steps only (the last, deterministic step uses standard CFG on
    every channel; ``vae_cfg_on_last_step`` restates the former mistake, to show the test sees the last step)."""
    grid = np.concatenate([np.linspace(1.0, 0.04, steps), [0.0]])
    for i in range(steps):
        t, dt, final = grid[i], grid[i + 1] - grid[i], i == steps - 1

        def drift(v, state):
            return v - 0.5 * (2 * t) * _np_score(v, state, t, path)

        v_c, cv_c = vel(x, cls, t, y)
        d, cd = drift(v_c, x), drift(cv_c, cls)
        if cfg_scale > 1.0 and low <= t <= high:
            v_u, cv_u = vel(x, cls, t, np.full_like(y, null))
            du, cdu = drift(v_u, x), drift(cv_u, cls)
            if vae_cfg and (not final or vae_cfg_on_last_step):
                d = np.concatenate([d[:, :4] + cfg_scale * (d[:, :4] - du[:, :4]), d[:, 4:]], axis=1)
            else:
                d = du + cfg_scale * (d - du)
            cd = cdu + cls_cfg_scale * (cd - cdu) if cls_cfg_scale > 0 else cd
        x, cls = x + d * dt, cls + cd * dt
        if not final:
            x = x + np.sqrt(2 * t) * xis[i] * np.sqrt(abs(dt))
            cls = cls + np.sqrt(2 * t) * cls_xis[i] * np.sqrt(abs(dt))
    return x, cls


def ported_guidance(cfg_scale, cls_cfg_scale=1.5, low=0.0, high=1.0, vae_cfg=False) -> Guidance:
    """docs/sample.md's table: the reglue flags for an official generate.py command (restated here)."""
    if cfg_scale <= 1.0:
        return Guidance(scale=1.0, cls_scale=1.0, interval=(low, high))  # the official code guides nothing
    cls = cls_cfg_scale if cls_cfg_scale > 0 else 1.0  # <= 0: the conditional [CLS] drift, i.e. scale 1
    if vae_cfg:
        return Guidance(scale=cfg_scale, cls_scale=cls, interval=(low, high), channels="latents",
                        reference_vae_cfg=True)
    return Guidance(scale=cfg_scale, cls_scale=cls, interval=(low, high))


def _states(seed=0, n=3, steps=6, channels=5, cls_dim=3, size=2):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, channels, size, size)), rng.standard_normal((n, cls_dim)), np.array([3, 7, 1][:n]),
            rng.standard_normal((steps, n, channels, size, size)), rng.standard_normal((steps, n, cls_dim)))


def _ours_sde(model, guidance, x, cls, y, steps, xis, cls_xis, path="linear"):
    got_x, got_cls = sample_sde(guided_velocity(model, guidance), torch.tensor(x), torch.tensor(cls), torch.tensor(y),
                                time_grid(steps), lambda i: (torch.tensor(xis[i]), torch.tensor(cls_xis[i])),
                                get_path(path))
    return got_x.numpy(), got_cls.numpy()


def _relative(got, want):
    return float(np.abs(got - want).max() / np.abs(want).max())


OFFICIAL_COMMANDS = [  # (cfg_scale, cls_cfg_scale, guidance_low, guidance_high, vae_cfg) of generate.py
    (1.0, 1.5, 0.0, 1.0, False),  # its defaults: no guidance at all, [CLS] included
    (0.5, 1.5, 0.0, 1.0, False),  # cfg_scale <= 1 guides nothing
    (2.3, 2.3, 0.0, 0.9, False),  # eval.sh
    (1.8, 1.5, 0.0, 1.0, False),  # the default --cls-cfg-scale 1.5 beside another --cfg-scale
    (2.0, 0.0, 0.0, 0.9, False),  # cls_cfg_scale <= 0: the conditional [CLS] drift
    (2.0, -1.0, 0.3, 0.7, False),
    (2.0, 1.5, 0.0, 0.9, True),  # --vae_cfg true: scale + 1 on the latents, standard CFG at the last step
    (2.0, 2.0, 0.1, 0.9, True),  # the last step (t = 0.04) outside the interval: unguided
]


@pytest.mark.parametrize("command", OFFICIAL_COMMANDS)
def test_ported_official_commands_replay_the_official_loop_on_a_closed_form_field(command):
    field = LinearField()
    x, cls, y, xis, cls_xis = _states()
    cfg, cls_cfg, low, high, vae_cfg = command
    got = _ours_sde(field, ported_guidance(*command), x, cls, y, 6, xis, cls_xis)
    want = _official_sde(_np_field(field), x, cls, y, 6, xis, cls_xis, cfg, cls_cfg, low, high, vae_cfg)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-6, atol=1e-9)


def _random_reglue_model(seed=3, **overrides):
    torch.manual_seed(0)
    return randomize_(build(presets.load("tiny-reglue", **overrides)), seed=seed, scale=0.05).double().eval()


@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_reference_vae_cfg_equals_the_official_loop_on_a_random_model(path):
    model = _random_reglue_model(transport__path=path)
    x, cls, y, xis, cls_xis = _states(seed=1, steps=8, channels=8, cls_dim=32, size=8)
    command = (2.0, 1.5, 0.0, 0.9, True)
    got = _ours_sde(model, ported_guidance(*command), x, cls, y, 8, xis, cls_xis, path)
    want = _official_sde(_np_model(model), x, cls, y, 8, xis, cls_xis, *command, path=path)
    assert _relative(got[0], want[0]) < 1e-6 and _relative(got[1], want[1]) < 1e-6
    former = _official_sde(_np_model(model), x, cls, y, 8, xis, cls_xis, *command, path=path,
                           vae_cfg_on_last_step=True)
    assert _relative(former[0], want[0]) > 1e-4  # the last step is visible: VAE-only there would fail this test


def test_cosine_model_samples_with_the_cosine_score():
    model = _random_reglue_model(transport__path="cosine")
    x, cls, y, xis, cls_xis = _states(seed=2, steps=6, channels=8, cls_dim=32, size=8)
    guidance = Guidance(scale=2.3, interval=(0.0, 0.9))
    got = _ours_sde(model, guidance, x, cls, y, 6, xis, cls_xis, "cosine")
    want = _official_sde(_np_model(model), x, cls, y, 6, xis, cls_xis, 2.3, 2.3, 0.0, 0.9, path="cosine")
    linear = _official_sde(_np_model(model), x, cls, y, 6, xis, cls_xis, 2.3, 2.3, 0.0, 0.9, path="linear")
    assert _relative(got[0], want[0]) < 1e-6 and _relative(got[1], want[1]) < 1e-6
    assert _relative(linear[0], want[0]) > 1e-2  # the linear score would be a different sampler


@pytest.mark.parametrize("guidance, latents_only", [
    (Guidance(), False),
    (Guidance(scale=2.3, interval=(0.0, 0.9)), False),
    (Guidance(scale=2.8, cls_scale=1.5, interval=(0.3, 0.7)), False),
    (Guidance(scale=2.0, channels="latents"), True),
])
def test_sde_matches_independent_float64_reference(guidance, latents_only):
    """Our own conventions (docs/sample.md): guidance wherever a scale differs from 1, standard VAE-only CFG."""
    field = LinearField()
    x, cls, y, xis, cls_xis = _states()
    vel = _np_field(field)
    grid = np.concatenate([np.linspace(1.0, 0.04, 6), [0.0]])
    want_x, want_cls = x, cls
    for i in range(6):
        t, dt = grid[i], grid[i + 1] - grid[i]
        v, cv = vel(want_x, want_cls, t, y)
        if guidance.active(t):
            vu, cvu = vel(want_x, want_cls, t, np.full_like(y, 1000))
            lat = vu[:, :4] + guidance.scale * (v[:, :4] - vu[:, :4])
            v = np.concatenate([lat, v[:, 4:]], axis=1) if latents_only else vu + guidance.scale * (v - vu)
            cv = cvu + guidance.effective_cls_scale * (cv - cvu)
        d = v - t * _np_score(v, want_x, t, "linear")  # w / 2 = t
        cd = cv - t * _np_score(cv, want_cls, t, "linear")
        want_x, want_cls = want_x + d * dt, want_cls + cd * dt
        if i < 5:
            want_x = want_x + np.sqrt(2 * t * abs(dt)) * xis[i]
            want_cls = want_cls + np.sqrt(2 * t * abs(dt)) * cls_xis[i]
    got_x, got_cls = _ours_sde(field, guidance, x, cls, y, 6, xis, cls_xis)
    np.testing.assert_allclose(got_x, want_x, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(got_cls, want_cls, rtol=1e-6, atol=1e-9)


def test_guidance_conventions_differ_from_the_official_where_documented():
    """docs/sample.md: --cfg 1 --cls-cfg 1.8 guides the [CLS] (the official code guides nothing unless its
    cfg_scale > 1); --cls-cfg 0 (and --cfg 0) give the unconditional velocity (the official <= 0: conditional)."""
    field = LinearField()
    x, cls, y, xis, cls_xis = _states()
    cond = Guidance(scale=1.0, cls_scale=1.0, interval=(0.0, 1.0))
    cls_only = _ours_sde(field, Guidance(scale=1.0, cls_scale=1.8, interval=(0.0, 1.0)), x, cls, y, 6, xis, cls_xis)
    plain = _ours_sde(field, cond, x, cls, y, 6, xis, cls_xis)
    assert np.allclose(cls_only[0], plain[0]) and not np.allclose(cls_only[1], plain[1])
    vel = guided_velocity(field, Guidance(scale=0.0, cls_scale=0.0, interval=(0.0, 1.0)))
    xt, ct = torch.tensor(x), torch.tensor(cls)
    v, cv = vel(xt, ct, 0.5, torch.tensor(y))
    vu, cvu = field(xt, torch.full((3,), 0.5, dtype=torch.float64), torch.full((3,), 1000), cls=ct)[:2]
    assert torch.allclose(v, vu) and torch.allclose(cv, cvu)


def test_reference_vae_cfg_is_scale_plus_one_and_standard_at_the_last_step():
    cond, uncond = torch.randn(2, 6, 2, 2, dtype=torch.float64), torch.randn(2, 6, 2, 2, dtype=torch.float64)
    compat = Guidance(scale=2.0, channels="latents", reference_vae_cfg=True)
    standard = Guidance(scale=3.0, channels="latents").combine(cond, uncond)
    torch.testing.assert_close(compat.combine(cond, uncond), standard)
    assert torch.equal(compat.combine(cond, uncond)[:, 4:], cond[:, 4:])
    torch.testing.assert_close(compat.final_step().combine(cond, uncond), uncond + 2.0 * (cond - uncond))


@pytest.mark.parametrize("heun", [False, True])
def test_ode_matches_independent_float64_reference(heun):
    field = LinearField()
    x, cls, y, _, _ = _states()
    g = Guidance(scale=2.0, interval=(0.0, 0.5))
    got_x, got_cls = sample_ode(guided_velocity(field, g), torch.tensor(x), torch.tensor(cls), torch.tensor(y),
                                time_grid(5), heun=heun)
    grid = np.concatenate([np.linspace(1.0, 0.04, 5), [0.0]])
    np_vel = _np_field(field)

    def vel(xs, cs, t):
        vc, cc = np_vel(xs, cs, t, y)
        if 0.0 <= t <= 0.5:
            vu, cu = np_vel(xs, cs, t, np.full_like(y, 1000))
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


def test_guidance_uses_the_models_null_class():
    field = LinearField(num_classes=10)
    x, cls, y, xis, cls_xis = _states()
    got = _ours_sde(field, Guidance(scale=2.0, interval=(0.0, 1.0)), x, cls, y, 6, xis, cls_xis)
    want = _official_sde(_np_field(field), x, cls, y, 6, xis, cls_xis, 2.0, 2.0, null=10)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6, atol=1e-9)


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
def ckpt(random_reglue_checkpoint):
    return random_reglue_checkpoint


def _settings(**kw):
    base = dict(n=10, steps=4, vae="tiny", chunk=3, guidance=Guidance(scale=2.0, interval=(0.0, 0.9)))
    return SampleSettings(**{**base, **kw})


def _images(out):
    return np.load(Path(out) / "samples.npz")["arr_0"]


class BatchSensitive(torch.nn.Module):
    """Wraps the model or the decoder so that a row's output moves with the batch it is computed in (its size and
    the other rows' values), as a kernel that picks its algorithm by batch size would, only far more: any pipeline
    that lets --batch-size or the process count change what a call sees changes the pixels on every machine."""

    def __init__(self, inner, shift=0.05):
        super().__init__()
        self.inner, self.shift, self.calls = inner, shift, []

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)  # config, null_class ...

    def _bump(self, x):
        self.calls.append(x.shape[0])
        return self.shift * ((x.shape[0] % 7) + x.float().mean())

    def forward(self, x, t, y, **kw):
        out = self.inner(x, t, y, **kw)
        return ModelOutput(out.velocity + self._bump(x), out.cls_velocity, out.projections)

    def decode(self, z):
        return SimpleNamespace(sample=self.inner.decode(z).sample + self._bump(z))


@pytest.fixture
def batch_sensitive(monkeypatch):
    """load_model / load_vae of the sample path replaced by BatchSensitive wrappers; yields their call logs."""
    calls = {}
    real_model, real_vae = sampling_run.load_model, sampling_run.load_vae

    def model(*args, **kw):
        m, config = real_model(*args, **kw)
        wrapped = BatchSensitive(m)
        calls["model"] = wrapped.calls
        return wrapped, config

    def vae(*args, **kw):
        v, info = real_vae(*args, **kw)
        wrapped = BatchSensitive(v)
        calls["decoder"] = wrapped.calls
        return wrapped, info

    monkeypatch.setattr(sampling_run, "load_model", model)
    monkeypatch.setattr(sampling_run, "load_vae", vae)
    return calls


def test_the_stand_ins_would_expose_a_batch_dependent_pipeline(ckpt):
    from reglue.constants import LATENT_SCALE
    from reglue.encoders.vae import decode_latents, load_vae

    decoder = BatchSensitive(load_vae("tiny")[0])
    z = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(decode_latents(decoder, z, LATENT_SCALE)[:1], decode_latents(decoder, z[:1], LATENT_SCALE))
    model = BatchSensitive(checkpoints.load_model(ckpt)[0])
    x, cls = torch.randn(4, 8, 8, 8), torch.randn(4, 32)
    t, y = torch.full((4,), 0.5), torch.arange(4)
    assert not torch.equal(model(x, t, y, cls=cls).velocity[:1], model(x[:1], t[:1], y[:1], cls=cls[:1]).velocity)


def test_batch_size_and_process_count_cannot_change_a_pixel(ckpt, tmp_path, batch_sensitive):
    """Every model and decoder call sees one fixed chunk, so even batch-sensitive kernels give the same bytes."""
    logs = {}
    for name, batch in (("b5", 5), ("b12", 12), ("b1", 1)):
        sample_to_dir(ckpt, tmp_path / name, _settings(n=13, chunk=4), batch_size=batch, progress=False)
        logs[name] = (sorted(batch_sensitive["model"]), sorted(batch_sensitive["decoder"]))
    for rank in (1, 0):  # two processes, one after the other (rank 0 merges every part)
        sample_to_dir(ckpt, tmp_path / "w2", _settings(n=13, chunk=4), batch_size=5, progress=False,
                      dist=DistInfo(rank=rank, world=2))
    reference = _images(tmp_path / "b5")
    assert reference.shape == (13, 64, 64, 3) and len(np.unique(reference)) > 10
    for name in ("b12", "b1", "w2"):
        assert np.array_equal(_images(tmp_path / name), reference), name
    assert logs["b5"] == logs["b12"] == logs["b1"]
    assert logs["b5"][1] == [1, 4, 4, 4]  # the decoder: one call per chunk (13 = 4 + 4 + 4 + 1)
    assert set(logs["b5"][0]) == {1, 2, 4, 8}  # the model: a chunk, doubled while guided


def test_samples_h5_records_the_settings(ckpt, tmp_path):
    sample_to_dir(ckpt, tmp_path / "s", _settings(), batch_size=3, progress=False)
    with h5py.File(tmp_path / "s/samples.h5") as f:
        assert np.array_equal(f["images"][...], _images(tmp_path / "s"))
        assert f.attrs["n"] == 10 and f.attrs["preset"] == "tiny-reglue" and f.attrs["path"] == "linear"
        assert f.attrs["null_class"] == 1000 and '"chunk": 3' in f.attrs["settings"]
        assert "checkpoint_sha256" in f.attrs and "clamp" in f.attrs["quantisation"]
    assert not (tmp_path / "s/parts").exists()


def test_the_thread_count_cannot_change_a_pixel(ckpt, tmp_path):
    """torchrun gives each CPU worker one thread, a single process takes every core; oneDNN splits its sums by
    thread count (on this machine 2 threads and 1 give other bytes for these settings), so CPU sampling runs on
    one thread whatever the caller set."""
    threads = torch.get_num_threads()
    try:
        for name, n in (("many", 4), ("one", 1)):
            torch.set_num_threads(n)
            sample_to_dir(ckpt, tmp_path / name, _settings(n=12, chunk=4), batch_size=5, progress=False)
            assert torch.get_num_threads() == n  # restored
    finally:
        torch.set_num_threads(threads)
    assert (tmp_path / "many/samples.npz").read_bytes() == (tmp_path / "one/samples.npz").read_bytes()


def test_sampling_switches_off_cudnn_autotuning(ckpt, tmp_path, monkeypatch):
    seen = []
    real = sampling_run.integrate

    def spy(*args, **kw):
        seen.append((torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic, torch.get_num_threads()))
        return real(*args, **kw)

    monkeypatch.setattr(sampling_run, "integrate", spy)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    sample_to_dir(ckpt, tmp_path / "s", _settings(n=2), progress=False)
    assert seen and set(seen) == {(False, True, 1)}  # and one CPU thread
    assert (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic) == (True, False)  # restored


def _trained_like(tmp_path, name, **overrides):
    """A checkpoint as `reglue train --preset tiny-sit --set ...` writes it (its config carries the overrides)."""
    config = presets.load("tiny-sit", **overrides)
    torch.manual_seed(0)
    model = randomize_(build(config), seed=4, scale=0.05)
    return checkpoints.save_checkpoint(tmp_path / name, config=config, step=1, model=model, ema=model)


def test_the_sampler_takes_the_path_of_the_checkpoint(tmp_path, monkeypatch):
    seen = []
    real = sampling_run.sample_sde
    monkeypatch.setattr(sampling_run, "sample_sde", lambda *a: seen.append(a[-1].name) or real(*a))
    for path in ("cosine", "linear"):
        ckpt = _trained_like(tmp_path, f"{path}.pt", transport__path=path)
        sample_to_dir(ckpt, tmp_path / path, _settings(n=2, guidance=Guidance()), progress=False)
    assert seen == ["cosine", "linear"]
    assert not np.array_equal(_images(tmp_path / "cosine"), _images(tmp_path / "linear"))


def test_a_ten_class_model_samples_with_guidance(tmp_path, capsys):
    ckpt = _trained_like(tmp_path, "ten.pt", model__num_classes=10)
    code = main(["sample", "--ckpt", str(ckpt), "--out", str(tmp_path / "s"), "--n", "6", "--steps", "3",
                 "--cfg", "2", "--vae", "tiny", "--quiet"])
    assert code == 0, capsys.readouterr().err
    with h5py.File(tmp_path / "s/samples.h5") as f:
        assert f.attrs["null_class"] == 10 and set(f["labels"][...]) <= set(range(10))


def test_interrupted_run_resumes_to_the_same_samples(ckpt, tmp_path, monkeypatch):
    sample_to_dir(ckpt, tmp_path / "straight", _settings(sampler="ode-heun", chunk=2), batch_size=4, progress=False)
    calls = {"n": 0}
    real = sampling_run.integrate

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # the first chunk of the second pass (2 chunks of 2 per pass)
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(sampling_run, "integrate", flaky)
    with pytest.raises(KeyboardInterrupt):
        sample_to_dir(ckpt, tmp_path / "resumed", _settings(sampler="ode-heun", chunk=2), batch_size=4,
                      progress=False)
    assert not (tmp_path / "resumed/samples.npz").exists()
    monkeypatch.setattr(sampling_run, "integrate", real)
    messages = []
    summary = sample_to_dir(ckpt, tmp_path / "resumed", _settings(sampler="ode-heun", chunk=2), batch_size=4,
                            progress=False, log=messages.append)
    assert summary.written == 6 and "4 of 10 samples already written" in messages[0]
    assert np.array_equal(_images(tmp_path / "straight"), _images(tmp_path / "resumed"))
    assert sample_to_dir(ckpt, tmp_path / "resumed", _settings(sampler="ode-heun", chunk=2), progress=False).reused


def test_torchrun_two_processes_match_one(ckpt, tmp_path):
    args = ["--ckpt", str(ckpt), "--num-samples", "6", "--steps", "3", "--vae", "tiny", "--cfg", "1.5", "--chunk", "2",
            "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "reglue_cli", "sample", "--out", str(tmp_path / "one"), *args,
                          "--batch-size", "5"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    # the merge made slower (5 s on rank 0) than the collective timeout (3 s): rank 1 waits through gloo
    slow = {**env, "REGLUE_DIST_TIMEOUT": "3", "REGLUE_SLOW_MAIN_PHASE": "sample-merge:5"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29547", "-m", "reglue_cli", "sample", "--out", str(tmp_path / "two"), *args,
                          "--batch-size", "12"],
                         cwd=REPO, env=slow, capture_output=True, text=True, timeout=300)
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
        (["--ckpt", str(ckpt), "--cfg-channels", "latents", "--reference-vae-cfg", "--sampler", "ode-heun", *base],
         "use it with --sampler sde"),
        (["--ckpt", str(ckpt), "--chunk", "0", *base], "--chunk"),
    ]
    for argv, message in cases:
        code = main(["sample", *argv])
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1, (argv, err)


def test_each_seed_draws_its_own_noise_and_labels():
    """torch's CPU generator keeps only 32 bits of its seed: seed * 2**32 + i once made every --seed draw seed 0's
    noise and labels."""
    from reglue.sampling.seeds import MAX_SAMPLES, MAX_SEED, sample_seed

    first, other = (SampleNoise([sample_seed(s, i) for i in range(3)], (2, 2, 2), 4, "cpu").initial() for s in (0, 1))
    assert not torch.equal(first[0], other[0]) and not torch.equal(first[1], other[1])
    assert not torch.equal(make_labels(64, 1000, 0, False), make_labels(64, 1000, 1, False))
    assert sample_seed(MAX_SEED, MAX_SAMPLES - 1) == 2**32 - 1  # the last stream still fits in 32 bits
    with pytest.raises(SampleError, match="seeds go from 0 to 4095"):
        sample_seed(MAX_SEED + 1, 0)
    with pytest.raises(SampleError, match="at most 1,048,576 samples"):
        _settings(n=MAX_SAMPLES + 1)
