"""reglue.ema.profiles (post-hoc EMA, EDM2) against the test's own float64 NumPy statement of the same equations:
EMAs simulated update by update, weight vectors built from the definition, dot products taken explicitly."""

import math

import numpy as np
import pytest

from reglue.ema.profiles import (
    SIGMA_REL_MAX,
    Fit,
    Profile,
    classic_sigma_rel,
    classic_weights,
    gamma_of,
    gram,
    power_beta,
    power_weights,
    sigma_rel_of,
    solve,
)

# ---- the test's own statement of the equations (none of it calls the module) ----


def own_sigma_rel(gamma: float) -> float:
    """EDM2 eq. 3: sigma_rel^2 = (g + 1) / ((g + 2)^2 (g + 3))."""
    return math.sqrt((gamma + 1.0) / ((gamma + 2.0) ** 2 * (gamma + 3.0)))


def own_gamma(sigma_rel: float) -> float:
    """The positive real root of s^2 (g + 2)^2 (g + 3) - (g + 1) = s^2 (g^3 + 7 g^2 + 16 g + 12) - g - 1."""
    s2 = sigma_rel**2
    roots = np.roots([s2, 7.0 * s2, 16.0 * s2 - 1.0, 12.0 * s2 - 1.0])
    real = [r.real for r in roots if abs(r.imag) < 1e-9 and r.real > 0]
    assert len(real) == 1, roots
    return real[0]


def own_beta(t: int, gamma: float) -> float:
    return (1.0 - 1.0 / t) ** (gamma + 1.0)


def own_weights(t: int, gamma: float, length: int) -> np.ndarray:
    """w_t(tau) for tau = 1..length from the definition, zero beyond t."""
    p = gamma + 1.0
    tau = np.arange(1, t + 1, dtype=np.float64)
    w = np.zeros(length)
    w[:t] = (tau / t) ** p - ((tau - 1.0) / t) ** p
    return w


# ---- 1. sigma_rel <-> gamma ----


def test_sigma_rel_and_gamma_round_trip():
    for gamma in (0.0, 0.01, 0.5, 1.0, 6.94, 16.97, 100.0, 1000.0):
        assert sigma_rel_of(gamma) == pytest.approx(own_sigma_rel(gamma), rel=1e-15, abs=0)
    for gamma in (0.01, 0.5, 1.0, 6.94, 16.97, 100.0, 1000.0):
        assert gamma_of(sigma_rel_of(gamma)) == pytest.approx(gamma, rel=1e-9)
    for s in np.linspace(0.002, 0.285, 60):
        gamma = gamma_of(float(s))
        assert gamma > 0
        assert own_sigma_rel(gamma) == pytest.approx(s, rel=1e-12)
        assert gamma == pytest.approx(own_gamma(float(s)), rel=1e-9)
    assert SIGMA_REL_MAX == pytest.approx(1.0 / math.sqrt(12.0), rel=1e-15) == own_sigma_rel(0.0)
    # EDM2's defaults
    for s, expected in ((0.05, 16.97), (0.10, 6.94)):
        gamma = gamma_of(s)
        assert gamma == pytest.approx(expected, abs=0.005)
        assert gamma == pytest.approx(own_gamma(s), rel=1e-10)
        assert own_sigma_rel(gamma) == pytest.approx(s, rel=1e-13)
        assert Profile.from_sigma_rel(100, s) == Profile(100, gamma)
        assert Profile(100, gamma).sigma_rel == pytest.approx(s, rel=1e-13)


@pytest.mark.parametrize("bad", [0.0, -0.01, SIGMA_REL_MAX, 0.29, 1.0, float("nan"), float("inf")])
def test_sigma_rel_out_of_range_is_refused(bad):
    for call in (gamma_of, lambda s: Profile.from_sigma_rel(10, s)):
        with pytest.raises(ValueError) as error:
            call(bad)
        assert repr(bad) in str(error.value) and "0.288675" in str(error.value)


def test_bad_steps_and_gammas_are_refused():
    for call in (lambda: power_beta(0, 1.0), lambda: power_weights(0, 1.0), lambda: Profile(0, 1.0),
                 lambda: Profile(5, -0.5), lambda: Profile(5, float("nan")), lambda: power_beta(2.5, 1.0),
                 lambda: classic_weights(1.5, 3), lambda: classic_sigma_rel(0.9, 0)):
        with pytest.raises(ValueError):
            call()


# ---- 2. the power-function update ----


@pytest.mark.parametrize("gamma", [0.0, 0.5, gamma_of(0.10), gamma_of(0.05), 60.0])
def test_power_weights_match_the_simulated_update(gamma):
    rng = np.random.default_rng(1)
    steps, dim = 50, 8
    theta = rng.standard_normal((steps + 1, dim))  # theta[0] the initial weights, theta[t] after step t
    ema = theta[0].copy()
    for t in range(1, steps + 1):
        beta = own_beta(t, gamma)
        assert power_beta(t, gamma) == pytest.approx(beta, rel=1e-13, abs=0)
        ema = beta * ema + (1.0 - beta) * theta[t]
        w = power_weights(t, gamma)
        assert w.shape == (t,) and w.dtype == np.float64 and (w >= 0).all()
        assert w.sum() == pytest.approx(1.0, abs=1e-13)
        np.testing.assert_allclose(w @ theta[1:t + 1], ema, rtol=0, atol=1e-12)  # theta_0 never contributes
    assert power_beta(1, gamma) == 0.0


def test_power_weights_stable_for_long_runs_and_large_gamma():
    t, gamma = 1_000_000, 1000.0
    w = power_weights(t, gamma)
    assert np.isfinite(w).all() and (w >= 0).all()
    assert w.sum() == pytest.approx(1.0, abs=1e-9)
    own = own_weights(t, gamma, t)  # no overflow either way; the definition's cancellation costs ~ eps tau / p
    big = own > 1e-300
    np.testing.assert_allclose(w[big], own[big], rtol=1e-9)
    assert power_beta(10**7, gamma) == pytest.approx(own_beta(10**7, gamma), rel=1e-12)


# ---- 3. the classic EMA ----


@pytest.mark.parametrize("decay", [0.9, 0.99])
def test_classic_weights_and_sigma_rel_match_brute_force(decay):
    for steps in (1, 2, 5, 37, 200):
        theta = np.eye(steps + 1)  # theta[tau] = e_tau: the simulated EMA is its own weight vector
        ema = theta[0].copy()
        for t in range(1, steps + 1):
            ema = decay * ema + (1.0 - decay) * theta[t]
        w = classic_weights(decay, steps)
        assert w.shape == (steps + 1,)
        np.testing.assert_allclose(w, ema, rtol=0, atol=1e-14)
        tau = np.arange(steps + 1, dtype=np.float64)
        mean = (ema * tau).sum() / ema.sum()
        std = math.sqrt((ema * (tau - mean) ** 2).sum() / ema.sum())
        assert classic_sigma_rel(decay, steps) == pytest.approx(std / steps, rel=1e-10)
    np.testing.assert_array_equal(classic_weights(decay, 0), [1.0])


def test_classic_sigma_rel_of_the_trainers_default():
    value = classic_sigma_rel(0.9999, 400_000)
    # a geometric distribution's std is sqrt(beta) / (1 - beta) = 9999.5 steps; the truncation at tau = 0 is e^-40
    assert 0.02 <= value <= 0.03, f"classic_sigma_rel(0.9999, 400_000) = {value}"
    assert value == pytest.approx(math.sqrt(0.9999) / 1e-4 / 400_000, rel=1e-8), f"{value}"


# ---- 4. the Gram matrix ----


def test_gram_matches_explicit_dot_products():
    rng = np.random.default_rng(2)
    length = 300
    gammas = [0.5, 1.0, 3.0, gamma_of(0.10), gamma_of(0.07), gamma_of(0.05), 40.0, 60.0]
    for _ in range(6):
        a = [Profile(int(rng.integers(1, length + 1)), float(rng.choice(gammas))) for _ in range(9)]
        b = [Profile(int(rng.integers(1, length + 1)), float(rng.choice(gammas))) for _ in range(5)] + [a[0]]
        wa = np.stack([own_weights(p.step, p.gamma, length) for p in a])
        wb = np.stack([own_weights(p.step, p.gamma, length) for p in b])
        g = gram(a, b)
        assert g.shape == (len(a), len(b)) and g.dtype == np.float64
        np.testing.assert_allclose(g, wa @ wb.T, rtol=1e-12, atol=0)
    edge = [Profile(1, 0.5), Profile(1, 60.0), Profile(2, 60.0), Profile(length, 0.5), Profile(length, 60.0)]
    w = np.stack([own_weights(p.step, p.gamma, length) for p in edge])
    np.testing.assert_allclose(gram(edge, edge), w @ w.T, rtol=1e-12, atol=0)
    assert gram([], edge).shape == (0, len(edge))


def test_gram_finite_for_a_million_steps_and_gamma_100():
    t = 1_000_000
    profiles = [Profile(t, 100.0), Profile(t // 2, 100.0), Profile(t, 3.0)]
    g = gram(profiles, profiles)
    assert np.isfinite(g).all() and (g > 0).all()
    w = np.stack([own_weights(p.step, p.gamma, t) for p in profiles])
    np.testing.assert_allclose(g, w @ w.T, rtol=1e-9, atol=0)
    p = 101.0  # continuous limit of sum_tau w_t(tau)^2: p^2 / ((2p - 1) t)
    assert g[0, 0] == pytest.approx(p * p / ((2 * p - 1) * t), rel=1e-3)


# ---- 5. and 6. reconstruction ----


def test_solve_refuses_empty_and_late_snapshots():
    with pytest.raises(ValueError):
        solve([], Profile(10, 5.0))
    with pytest.raises(ValueError, match="after the target's step 10"):
        solve([Profile(5, 5.0), Profile(11, 5.0)], Profile(10, 5.0))


@pytest.mark.parametrize("steps", [12, 16, 20])
def test_snapshots_at_every_step_recover_a_tracked_profile(steps):
    rng = np.random.default_rng(steps)
    dim = 64
    theta = rng.standard_normal((steps + 1, dim))
    g05, g10, g07 = own_gamma(0.05), own_gamma(0.10), own_gamma(0.07)
    ema = {g: theta[0].copy() for g in (g05, g10, g07)}
    snapshots, values = [], []
    for t in range(1, steps + 1):
        for g in ema:
            beta = own_beta(t, g)
            ema[g] = beta * ema[g] + (1.0 - beta) * theta[t]
        for g in (g05, g10):  # both profiles at every step: 2 * steps linearly dependent vectors in R^steps
            snapshots.append(Profile(t, g))
            values.append(ema[g].copy())
    fit = solve(snapshots, Profile(steps, g07))
    assert isinstance(fit, Fit) and fit.coefficients.shape == (len(snapshots),)
    rebuilt = fit.coefficients @ np.array(values)
    assert np.abs(rebuilt - ema[g07]).max() < 1e-6  # measured ~2e-15
    assert fit.residual < 1e-6  # measured ~1e-8 (the square root of the Gram route's rounding)


def test_sparse_snapshots_residual():
    steps, every = 2000, 100
    g05, g10 = own_gamma(0.05), own_gamma(0.10)
    snapshots = [Profile(t, g) for t in range(every, steps + 1, every) for g in (g05, g10)]
    basis = np.stack([own_weights(p.step, p.gamma, steps) for p in snapshots])  # (40, 2000)
    residuals = {}
    for s in (0.01, 0.07, 0.25):
        fit = solve(snapshots, Profile(steps, own_gamma(s)))
        target = own_weights(steps, own_gamma(s), steps)
        explicit = np.linalg.norm(fit.coefficients @ basis - target) / np.linalg.norm(target)
        assert fit.residual == pytest.approx(explicit, rel=1e-6), s
        residuals[s] = fit.residual
    # measured: 0.07 -> 0.00246, 0.01 -> 0.300, 0.25 -> 0.0589
    assert residuals[0.07] < 0.01, residuals
    assert residuals[0.01] > 10 * residuals[0.07] and residuals[0.25] > 10 * residuals[0.07], residuals
