"""Time grids and solvers: the shifted grid against its formula, the integrators' orders of convergence on a Gaussian
target whose velocity is known in closed form, the count of model evaluations, and the shift recorded in samples
while the reference's grid keeps its old identity."""

import json

import h5py
import numpy as np
import pytest
import torch

from reglue.sampling.run import SampleRequest, SampleSettings
from reglue.transport.samplers import Guidance, function_evaluations, sample_ode, shift_time, time_grid
from reglue_cli.main import main

MU, SIGMA = 0.7, 0.5  # the data: N(MU, SIGMA^2) in every coordinate; x_t = (1 - t) x0 + t eps (t = 1 is noise)


def gaussian_velocity(x, cls, t, y, final=False):
    """The exact velocity E[eps - x0 | x_t = x] of the linear path for Gaussian data (float64)."""
    var = (1 - t) ** 2 * SIGMA**2 + t**2
    centred = x - (1 - t) * MU
    return (t - (1 - t) * SIGMA**2) / var * centred - MU, None


def endpoint_error(steps: int, heun: bool, shift: float = 1.0) -> float:
    """Max error at t = 0 of the ODE from fixed noise, on a uniform (shifted) grid of ``steps`` intervals: the exact
    flow keeps each sample's quantile, x_0 = MU + SIGMA z for x_1 = z."""
    z = torch.linspace(-2.5, 2.5, 11, dtype=torch.float64)[:, None]
    grid = shift_time(torch.linspace(1, 0, steps + 1, dtype=torch.float64), shift)
    x, _ = sample_ode(gaussian_velocity, z, None, None, grid, heun=heun)
    return float((x - (MU + SIGMA * z)).abs().max())


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_euler_converges_at_order_1_and_heun_at_order_2(shift):
    for heun, order in ((False, 1), (True, 2)):
        errors = [endpoint_error(n, heun, shift) for n in (64, 128, 256, 512)]
        rates = [np.log2(a / b) for a, b in zip(errors, errors[1:])]  # halving the step divides the error by 2^order
        assert all(abs(rate - order) < 0.3 for rate in rates), (heun, shift, errors, rates)
        assert abs(rates[-1] - order) < 0.15, (heun, shift, rates)  # the asymptotic rate


def test_the_shifted_grid_follows_its_formula_and_shift_1_is_the_reference_grid():
    for steps, s in ((250, 3.0), (10, 0.5), (1, 2.0)):
        base = np.append(np.linspace(1.0, 0.04, steps) if steps > 1 else [1.0], 0.0)
        expected = s * base / (1 + (s - 1) * base)
        assert np.allclose(time_grid(steps, s).numpy(), expected, rtol=1e-14, atol=0)
        reference = torch.cat([torch.linspace(1.0, 0.04, steps, dtype=torch.float64) if steps > 1 else
                               torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
        assert torch.equal(time_grid(steps, 1.0), reference)  # bit for bit the grid before shifts existed
    with pytest.raises(ValueError, match="time shift"):
        time_grid(4, 0.0)


def test_function_evaluations_count_each_pass():
    def expected(sampler, steps, low, high, scale):
        times = np.append(np.linspace(1.0, 0.04, steps), 0.0)
        per_call = lambda t: 2 if scale != 1 and low <= t <= high else 1  # noqa: E731
        calls = [per_call(t) for t in times[:-1]]
        if sampler == "ode-heun":
            calls += [per_call(t) for t in times[1:]]
        return sum(calls)

    for sampler in ("sde", "ode-euler", "ode-heun"):
        for low, high, scale in ((0.0, 0.9, 2.3), (0.0, 1.0, 1.0), (0.1, 0.7, 4.0)):
            guidance = Guidance(scale=scale, interval=(low, high))
            assert function_evaluations(sampler, time_grid(50), guidance) == expected(sampler, 50, low, high, scale)
    assert SampleSettings(n=1, steps=250).function_evaluations() == 250  # the reference sampler, unguided


def test_the_shift_is_a_sampling_setting_recorded_in_the_samples(random_reglue_checkpoint, tmp_path):
    default, _ = SampleRequest(n=4).resolve(_sampling())
    assert "time_shift" not in default.describe()  # the reference grid: identities made before stay the same
    args = ["sample", "--ckpt", str(random_reglue_checkpoint), "--n", "3", "--steps", "3", "--vae", "tiny", "--quiet",
            "--sampler", "ode-heun", "--cfg", "2"]
    assert main([*args, "--out", str(tmp_path / "shifted"), "--time-shift", "3"]) == 0
    assert main([*args, "--out", str(tmp_path / "plain")]) == 0
    with h5py.File(tmp_path / "shifted/samples.h5") as f, h5py.File(tmp_path / "plain/samples.h5") as g:
        assert json.loads(f.attrs["settings"])["time_shift"] == 3.0 and "time_shift" not in json.loads(
            g.attrs["settings"])
        guided = Guidance(scale=2.0, interval=(0.0, 0.9))
        assert f.attrs["nfe"] == function_evaluations("ode-heun", time_grid(3, 3.0), guided)
        assert not np.array_equal(f["images"][...], g["images"][...])  # another grid, other images


def _sampling():
    from reglue import presets

    return presets.load("tiny-reglue").sampling


def test_a_steps_sweep_tabulates_and_plots_fid_against_the_model_evaluations(random_reglue_checkpoint, tmp_path):
    from conftest import random_reference

    ref, out = random_reference(tmp_path / "ref.npz", 6), tmp_path / "sweep"
    assert main(["sweep", "--ckpt", str(random_reglue_checkpoint), "--steps", "2,5", "--cfg", "2", "--n", "4",
                 "--chunk", "2", "--vae", "tiny", "--sampler", "ode-heun", "--ref", str(ref), "--inception-weights",
                 "random", "--feature-chunk", "4", "--out", str(out), "--quiet", "--format", "json"]) == 0
    table = json.loads((out / "sweep.table.json").read_text())
    guided = Guidance(scale=2.0, interval=(0.0, 0.9))  # tiny-reglue's sampling interval
    assert [(r["steps"], r["nfe"]) for r in table["points"]] == [
        (s, function_evaluations("ode-heun", time_grid(s), guided)) for s in (2, 5)]
    assert (out / "sweep.png").stat().st_size > 1000
    identity = json.loads(next((out / "points").glob("steps2_*.json")).read_text())["identity"]
    assert identity["sampling"]["settings"]["steps"] == 2
    manifest = json.loads((out / "sweep.json").read_text())["identity"]  # what the points share: not the steps
    assert "steps" not in manifest["sampling"]["settings"] and manifest["sampling"]["checkpoint_sha256"]


def test_dopri5_meets_its_tolerance_and_counts_its_evaluations():
    from reglue.transport.samplers import sample_dopri5

    z = torch.linspace(-2.5, 2.5, 11, dtype=torch.float64)[:, None]
    results = []
    for tol in (1e-5, 1e-7, 1e-9):  # the error control is per step: the global error stays within a few tol here
        x, cls, nfe = sample_dopri5(gaussian_velocity, z, None, None, rtol=tol, atol=tol)
        error = float((x - (MU + SIGMA * z)).abs().max())
        assert cls is None and error < 10 * tol, (tol, error)
        results.append((error, nfe))
    assert results[0][1] < results[1][1] < results[2][1]  # tighter tolerances cost more evaluations
    assert results[0][0] > results[2][0]
    with pytest.raises(AssertionError, match="max_num_steps"):
        sample_dopri5(gaussian_velocity, z, None, None, rtol=1e-12, atol=1e-12, max_steps=3)
