"""The mathematics of post-hoc EMA (Karras et al., "Analyzing and Improving the Training Dynamics of Diffusion
Models", EDM2, arXiv 2312.02696, section 3 and appendix C), in float64 NumPy; written from the equations below.

Conventions:

- Optimiser steps are counted t = 1, 2, ...; theta_t is the weights after t optimiser steps (theta_0 the initial
  weights).
- A power-function EMA with exponent gamma (>= 0) is updated after step t as
  ema_t = beta_t * ema_{t-1} + (1 - beta_t) * theta_t with beta_t = (1 - 1/t)^(gamma + 1). At t = 1, beta = 0, so
  theta_0 never contributes.
- Unrolled, ema_t = sum_{tau=1..t} w_t(tau) * theta_tau with w_t(tau) = (tau/t)^(gamma+1) - ((tau-1)/t)^(gamma+1)
  exactly (the continuous profile (gamma+1) x^gamma / t^(gamma+1) integrated over (tau-1, tau]); the weights sum to
  1. A ``Profile(step, gamma)`` names this weight vector, taken as zero beyond ``step``.
- sigma_rel is the continuous profile's standard deviation relative to its length (EDM2 eq. 3):
  sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3)). It decreases strictly in gamma, so each sigma_rel in
  (0, SIGMA_REL_MAX), SIGMA_REL_MAX = sigma_rel(gamma=0) = 1/sqrt(12), has exactly one gamma > 0; EDM2's 0.05 and
  0.10 are gamma ~ 16.97 and ~ 6.94.
- A classic EMA with decay beta (what the trainer's ``ema`` does): ema_0 = theta_0,
  ema_t = beta * ema_{t-1} + (1 - beta) * theta_t; its weights over the iterates tau = 0..t are
  (1 - beta) * beta^(t - tau) for tau >= 1 and beta^t for tau = 0.
- Reconstruction (``solve``): least squares over the discrete weight vectors, min_x || sum_i x_i w_i - w_target ||_2,
  through the Gram matrix of the profiles (``gram``), which is computed without building the weight vectors.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers

import numpy as np

SIGMA_REL_MAX: float = 1.0 / math.sqrt(12.0)  # sigma_rel of gamma = 0 (the uniform average); the open upper bound

# gram's prefix sums run in chunks inside which the log-terms span at most this many nats: the terms, scaled by the
# chunk's last one, lie in [exp(-_CHUNK_NATS), 1] (no underflow) and the logs that cancel stay small (accuracy)
_CHUNK_NATS = 32.0


def _check_gamma(gamma) -> float:
    if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real) or not math.isfinite(gamma) or gamma < 0:
        raise ValueError(f"gamma={gamma!r}: a power-function EMA needs a finite exponent gamma >= 0")
    return float(gamma)


def _check_step(step, name: str = "step", smallest: int = 1) -> int:
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < smallest:
        raise ValueError(f"{name}={step!r}: must be an integer >= {smallest} (optimiser steps count from 1)")
    return int(step)


def sigma_rel_of(gamma: float) -> float:
    """sigma_rel of the power profile with exponent ``gamma`` (>= 0): sqrt((g+1) / ((g+2)^2 (g+3)))."""
    g = _check_gamma(gamma)
    return math.sqrt((g + 1.0) / ((g + 2.0) ** 2 * (g + 3.0)))


def gamma_of(sigma_rel: float) -> float:
    """The unique exponent gamma > 0 whose power profile has this sigma_rel (0 < sigma_rel < SIGMA_REL_MAX)."""
    if (isinstance(sigma_rel, bool) or not isinstance(sigma_rel, numbers.Real) or not math.isfinite(sigma_rel)
            or not 0.0 < sigma_rel < SIGMA_REL_MAX):
        raise ValueError(f"sigma_rel={sigma_rel!r} is outside the range of power-function EMAs, "
                         f"(0, {SIGMA_REL_MAX:.6f}) = (0, 1/sqrt(12))")
    s = float(sigma_rel)
    # sigma_rel_of decreases strictly on [0, inf) and sigma_rel_of(g) < 1/(g+2), so the root lies in [0, 1/s]
    lo, hi = 0.0, 1.0 / s
    for _ in range(400):  # bisection to adjacent floats (~60-70 halvings)
        mid = 0.5 * (lo + hi)
        if mid <= lo or mid >= hi:
            break
        if sigma_rel_of(mid) > s:
            lo = mid
        else:
            hi = mid
    return lo if abs(sigma_rel_of(lo) - s) <= abs(sigma_rel_of(hi) - s) else hi


def power_beta(step: int, gamma: float) -> float:
    """beta_t = (1 - 1/t)^(gamma+1) of the power-function EMA update after optimiser step t = ``step`` (>= 1)."""
    t, p = _check_step(step), _check_gamma(gamma) + 1.0
    return 0.0 if t == 1 else math.exp(p * math.log1p(-1.0 / t))


def _log_tail(p: float, tau: np.ndarray) -> np.ndarray:
    """log(1 - (1 - 1/tau)^p) for tau >= 1 (float64 array): 0 at tau = 1; log(-expm1(p log1p(-1/tau))) beyond."""
    if tau.size and tau.min() >= 2:
        return np.log(-np.expm1(p * np.log1p(-1.0 / tau)))
    out = np.zeros(tau.shape, dtype=np.float64)
    later = tau >= 2
    out[later] = np.log(-np.expm1(p * np.log1p(-1.0 / tau[later])))
    return out


def power_weights(step: int, gamma: float) -> np.ndarray:
    """w_step(tau) = (tau/step)^(gamma+1) - ((tau-1)/step)^(gamma+1) for tau = 1..step: float64, shape (step,)."""
    t, p = _check_step(step), _check_gamma(gamma) + 1.0
    tau = np.arange(1, t + 1, dtype=np.float64)  # (t,) iterate index
    # (tau/t)^p * (1 - (1 - 1/tau)^p): no cancellation, no overflow; tiny early weights underflow to 0
    return np.exp(p * np.log(tau / t) + _log_tail(p, tau))


def classic_weights(decay: float, step: int) -> np.ndarray:
    """Weights of a classic EMA (decay, ema_0 = theta_0) after ``step`` steps over tau = 0..step: shape (step+1,)."""
    if isinstance(decay, bool) or not isinstance(decay, numbers.Real) or not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay={decay!r}: a classic EMA's decay must lie in [0, 1]")
    t = _check_step(step, smallest=0)
    age = np.arange(t, -1, -1, dtype=np.float64)  # (t+1,) t - tau for tau = 0..t
    w = (1.0 - decay) * np.power(float(decay), age)
    w[0] = float(decay) ** t  # theta_0 keeps beta^t
    return w


def classic_sigma_rel(decay: float, step: int) -> float:
    """Standard deviation (in steps) of the classic EMA's weight distribution over tau = 0..step, divided by step.

    Closed form, O(1) for any step: the age t - tau is min(G, t) for G geometric with P(G = k) = (1 - q) q^k, and
    E[min(G, t)] = sum_{k<t} q^(k+1), E[min(G, t)^2] = sum_{k<t} (2k + 1) q^(k+1)."""
    t = _check_step(step)
    classic_weights(decay, 0)  # the decay's check
    q = float(decay)
    if q in (0.0, 1.0):
        return 0.0  # every weight on one iterate (the newest, or the initial one)
    qt = math.exp(t * math.log(q))
    first = q * (1.0 - qt) / (1.0 - q)  # sum_{k<t} q^(k+1)
    k_sum = q * q * (1.0 - t * qt / q + (t - 1) * qt) / (1.0 - q) ** 2  # sum_{k<t} k q^(k+1)
    var = 2.0 * k_sum + first - first * first
    return math.sqrt(max(var, 0.0)) / t


@dataclasses.dataclass(frozen=True)
class Profile:
    """The power-function EMA of exponent ``gamma`` as it stands after optimiser step ``step`` (its weight vector)."""

    step: int
    gamma: float

    def __post_init__(self):
        object.__setattr__(self, "step", _check_step(self.step))
        object.__setattr__(self, "gamma", _check_gamma(self.gamma))

    @property
    def sigma_rel(self) -> float:
        """The profile's sigma_rel (relative standard deviation)."""
        return sigma_rel_of(self.gamma)

    @classmethod
    def from_sigma_rel(cls, step: int, sigma_rel: float) -> Profile:
        """The profile at ``step`` whose sigma_rel is ``sigma_rel``."""
        return cls(step, gamma_of(sigma_rel))


def _log_prefix(p: float, q: float, ms: np.ndarray, ta: np.ndarray, tb: np.ndarray) -> np.ndarray:
    """log(sum_{tau<=m} w_ta(tau) w_tb(tau)) for exponents p (profile a, step ta), q (profile b, step tb), m = ms.

    With g_p(tau) = tau^p - (tau-1)^p the sum is S(m) / (ta^p tb^q), S(m) = sum_{tau<=m} g_p(tau) g_q(tau). The
    log-terms L(tau) = log g_p + log g_q increase with tau; S is a prefix sum taken in chunks over which L spans at
    most _CHUNK_NATS, each in units of its last term exp(L(anchor)), so plain cumulative sums of positive terms in
    [exp(-_CHUNK_NATS), 1] (relative error ~ eps sqrt(n), independent of p and q) replace sums of huge or tiny
    numbers, and the big logs cancel analytically. ms, ta, tb, the result: float64/int64 of shape (k,); memory
    O(max(ms)) at most (one chunk).
    """
    m_max = int(ms.max())
    s = p + q
    # L(tau) grows like (s - 2) log tau: a chunk from t0 spans _CHUNK_NATS up to about t0 * exp(_CHUNK_NATS / (s - 2))
    growth = math.exp(min(_CHUNK_NATS / (s - 2.0), 40.0)) if s > 2.0 else math.inf
    order = np.argsort(ms, kind="stable")
    sorted_ms = ms[order]
    out = np.empty(len(ms), dtype=np.float64)
    k = 0  # next entry of `order` to fill
    t0 = 1  # the chunk's first tau
    carry = 0.0  # S(t0 - 1) in units of exp(L(previous anchor))
    prev_anchor, prev_tail = 1.0, 0.0
    while k < len(order):
        last = m_max if growth == math.inf else min(m_max, max(t0 + 1, int(t0 * growth)))
        tau = np.arange(t0, last + 1, dtype=np.float64)  # (n,) candidate iterates
        tails = 2.0 * _log_tail(p, tau) if p == q else _log_tail(p, tau) + _log_tail(q, tau)  # L - s log tau
        # trim to L(tau) - L(t0) <= _CHUNK_NATS (the estimate above is rough for small tau)
        n = max(1, int(np.searchsorted(s * np.log(tau / t0) + (tails - tails[0]), _CHUNK_NATS, side="right")))
        tau, tails = tau[:n], tails[:n]
        anchor, a_tail = float(tau[-1]), float(tails[-1])
        rel = s * np.log(tau / anchor) + (tails - a_tail)  # L(tau) - L(anchor), in [-_CHUNK_NATS, 0]
        if t0 > 1:
            carry *= math.exp(s * math.log(prev_anchor / anchor) + (prev_tail - a_tail))
        csum = carry + np.cumsum(np.exp(rel))  # S(tau) / exp(L(anchor)) for the chunk's tau
        stop = int(np.searchsorted(sorted_ms, anchor, side="right"))  # the requested m inside this chunk
        if stop > k:  # log S(m) - p log ta - q log tb
            idx = order[k:stop]
            out[idx] = (np.log(csum[ms[idx] - t0]) + p * np.log(anchor / ta[idx]) + q * np.log(anchor / tb[idx])
                        + a_tail)
            k = stop
        carry, prev_anchor, prev_tail, t0 = float(csum[-1]), anchor, a_tail, int(anchor) + 1
    return out


def gram(a: list[Profile], b: list[Profile]) -> np.ndarray:
    """G[i, j] = sum_tau w_{a_i}(tau) w_{b_j}(tau) over the discrete weight vectors: float64, shape (len(a), len(b))."""
    a, b = list(a), list(b)
    out = np.zeros((len(a), len(b)), dtype=np.float64)
    if not a or not b:
        return out
    ga = np.array([x.gamma for x in a], dtype=np.float64)  # (len(a),)
    gb = np.array([x.gamma for x in b], dtype=np.float64)  # (len(b),)
    sa = np.array([x.step for x in a], dtype=np.int64)
    sb = np.array([x.step for x in b], dtype=np.int64)
    ua, inv_a = np.unique(ga, return_inverse=True)
    ub, inv_b = np.unique(gb, return_inverse=True)
    # S depends only on the two exponents and is symmetric in them: one prefix pass per unordered pair of gammas
    groups: dict[tuple[float, float], list[tuple[np.ndarray, np.ndarray]]] = {}
    for u, g_a in enumerate(ua):
        for v, g_b in enumerate(ub):
            ii, jj = np.nonzero((inv_a == u)[:, None] & (inv_b == v)[None, :])
            groups.setdefault((min(g_a, g_b), max(g_a, g_b)), []).append((ii, jj))
    for (g_lo, g_hi), parts in groups.items():
        ii = np.concatenate([part[0] for part in parts])
        jj = np.concatenate([part[1] for part in parts])
        swap = ga[ii] != g_lo  # orient every entry so that exponent p = g_lo + 1 belongs to t_p
        t_p = np.where(swap, sb[jj], sa[ii]).astype(np.float64)
        t_q = np.where(swap, sa[ii], sb[jj]).astype(np.float64)
        out[ii, jj] = np.exp(_log_prefix(g_lo + 1.0, g_hi + 1.0, np.minimum(sa[ii], sb[jj]), t_p, t_q))
    return out


@dataclasses.dataclass(frozen=True)
class Fit:
    """Least-squares coefficients of the snapshots' profiles and the relative L2 error of the combined profile."""

    coefficients: np.ndarray  # (len(snapshots),) float64, x_i
    residual: float  # || sum_i x_i w_i - w_target ||_2 / || w_target ||_2


@functools.lru_cache(maxsize=4)
def _decomposed(snapshots: tuple[Profile, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A = gram(snapshots, snapshots) (n, n) and its eigenvalues (n,) ascending and eigenvectors (n, n); cached,
    as one set of snapshots is usually fitted to many targets (read-only arrays)."""
    matrix = gram(snapshots, snapshots)
    matrix = 0.5 * (matrix + matrix.T)
    lam, vec = np.linalg.eigh(matrix)  # A may be singular (dependent snapshots): solve drops the small eigenvalues
    for array in (matrix, lam, vec):
        array.setflags(write=False)
    return matrix, lam, vec


def solve(snapshots: list[Profile], target: Profile, rcond: float = 1e-12) -> Fit:
    """Coefficients x minimising || sum_i x_i w_i - w_target ||_2 (normal equations, eigen-pseudo-inverse)."""
    snapshots = list(snapshots)
    if not snapshots:
        raise ValueError("solve needs at least one snapshot profile")
    late = sorted({s.step for s in snapshots if s.step > target.step})
    if late:
        raise ValueError(f"snapshot steps {late[:5]}{' ...' if len(late) > 5 else ''} lie after the target's step "
                         f"{target.step}; select the snapshots up to the target's step")
    if not 0.0 <= rcond < 1.0:
        raise ValueError(f"rcond={rcond!r}: must lie in [0, 1)")
    matrix, lam, vec = _decomposed(tuple(snapshots))
    rhs = gram(snapshots, [target])[:, 0]  # (n,) b
    norm2 = float(gram([target], [target])[0, 0])  # c = || w_target ||^2
    keep = lam > rcond * lam[-1]
    x = vec[:, keep] @ ((vec[:, keep].T @ rhs) / lam[keep])  # (n,)
    err2 = float(x @ matrix @ x - 2.0 * (x @ rhs) + norm2)
    x.setflags(write=False)
    return Fit(x, math.sqrt(max(err2, 0.0) / norm2))
