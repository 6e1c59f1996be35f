"""Post-hoc EMA: a power-function EMA of any length (sigma_rel) at any step, rebuilt from a run's snapshots by
least squares (EDM2, arXiv 2312.02696, section 3; docs/ema.md) and written as a checkpoint that `sample`,
`eval --ckpt` and `sweep` load like any other.

The fit (reglue.ema.profiles.solve) chooses coefficients x so that sum_i x_i * profile_i is as close as possible
(L2 over the iterates) to the target's profile; the weights are then sum_i x_i * snapshot_i, accumulated in
float64 over one pass through the snapshot files. Buffers are copied from the newest snapshot used.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from reglue import config as run_config
from reglue.checkpoints.ours import save_checkpoint
from reglue.checkpoints.reading import built_and_loaded
from reglue.ema.profiles import SIGMA_REL_MAX, Fit, Profile, solve
from reglue.ema.snapshots import load_snapshot, snapshot_dir, snapshot_path, snapshot_steps
from reglue.errors import ConfigError, UserError
from reglue.models import build

MAX_RESIDUAL = 0.05  # the relative L2 error of a target's profile above which a reconstruction is refused
RANGE_GRID = np.round(np.arange(0.01, 0.285, 0.005), 3)  # the sigma_rel values --list tries


class EMAError(UserError, ValueError):
    """A reconstruction that cannot be made; the one-line message says why."""


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """One snapshot file: its step and the profiles it holds (the weights stay on disk until reconstruct)."""

    step: int
    path: Path
    sigma_rels: tuple[float, ...]
    gammas: tuple[float, ...]
    precision: str
    size: int  # bytes on disk


def read_snapshots(run_root) -> list[Snapshot]:
    """Every snapshot of a run directory, ascending; EMAError when there are none."""
    run_root = Path(run_root)
    if not run_root.is_dir():
        raise EMAError(f"{run_root}: no such run directory")
    steps = snapshot_steps(run_root)
    if not steps:
        raise EMAError(f"{run_root}: no EMA snapshots in {snapshot_dir(run_root)} (train with ema.sigma_rels and "
                       "ema.snapshot_every set; docs/ema.md)")
    snapshots = []
    for step in steps:
        path = snapshot_path(run_root, step)
        state = load_snapshot(path)
        profiles = state["profiles"]
        snapshots.append(Snapshot(step, path, tuple(float(p["sigma_rel"]) for p in profiles),
                                  tuple(float(p["gamma"]) for p in profiles), state["precision"],
                                  path.stat().st_size))
    return snapshots


@dataclasses.dataclass(frozen=True)
class Target:
    """A requested reconstruction, fitted: which (snapshot, profile) pairs it combines and with what weights."""

    sigma_rel: float
    step: int
    fit: Fit
    members: tuple[tuple[int, int], ...]  # (index into the snapshots, index of the profile in that snapshot)


def _members(snapshots: list[Snapshot], step: int) -> list[tuple[int, int]]:
    return [(i, k) for i, s in enumerate(snapshots) if s.step <= step for k in range(len(s.gammas))]


def _fit(snapshots: list[Snapshot], sigma_rel: float, step: int) -> tuple[Fit, list[tuple[int, int]]]:
    members = _members(snapshots, step)
    basis = [Profile(snapshots[i].step, snapshots[i].gammas[k]) for i, k in members]
    return solve(basis, Profile.from_sigma_rel(step, sigma_rel)), members


def supported_range(snapshots: list[Snapshot], step: int, max_residual: float = MAX_RESIDUAL
                    ) -> tuple[float, float] | None:
    """The smallest and largest sigma_rel of RANGE_GRID whose profile at ``step`` the snapshots reproduce within
    ``max_residual`` (None: none of them)."""
    good = [float(s) for s in RANGE_GRID if _fit(snapshots, float(s), step)[0].residual <= max_residual]
    return (good[0], good[-1]) if good else None


def _shown_range(snapshots, step, max_residual) -> str:
    found = supported_range(snapshots, step, max_residual)
    return "none of 0.01..0.28" if found is None else f"sigma_rel {found[0]:g} to {found[1]:g}"


def fit_target(snapshots: list[Snapshot], sigma_rel: float, step: int | None = None,
               max_residual: float = MAX_RESIDUAL) -> Target:
    """Fit the profile (sigma_rel, step; default the last snapshot's step) from the snapshots up to ``step``;
    EMAError with the reason when the snapshots cannot represent it."""
    first, last = snapshots[0].step, snapshots[-1].step
    step = last if step is None else int(step)
    if not 0 < sigma_rel < SIGMA_REL_MAX:
        raise EMAError(f"sigma_rel {sigma_rel:g}: a power-function EMA has 0 < sigma_rel < {SIGMA_REL_MAX:.4f}")
    if step > last:
        raise EMAError(f"step {step}: the snapshots end at step {last}; the weights after it were never seen")
    if step < first:
        raise EMAError(f"step {step}: the first snapshot is at step {first}")
    fit, members = _fit(snapshots, sigma_rel, step)
    if not fit.residual <= max_residual:
        raise EMAError(f"sigma_rel {sigma_rel:g} at step {step}: the snapshots reproduce its profile only to a "
                       f"relative error of {fit.residual:.3g} (limit {max_residual:g}); they support "
                       f"{_shown_range(snapshots, step, max_residual)} at this step")
    return Target(float(sigma_rel), step, fit, tuple(members))


@torch.no_grad()
def reconstruct(snapshots: list[Snapshot], targets: list[Target]) -> list[dict[str, torch.Tensor]]:
    """The weights of every target (float32 state dicts), reading each snapshot file once; parameters are summed
    in float64, buffers copied from the newest snapshot a target uses."""
    sums: list[dict[str, torch.Tensor]] = [{} for _ in targets]
    newest: list[dict[str, torch.Tensor]] = [{} for _ in targets]
    for index in sorted({i for t in targets for i, _ in t.members}):
        state = load_snapshot(snapshots[index].path)
        parameters = set(state["parameters"])
        for out, last, target in zip(sums, newest, targets):
            for (i, k), x in zip(target.members, target.fit.coefficients):
                if i != index:
                    continue
                for name, tensor in state["weights"][k].items():
                    if name in parameters:
                        term = tensor.double() * float(x)
                        out[name] = term if name not in out else out[name].add_(term)
                    else:
                        last[name] = tensor.clone()
    return [{**{k: v.float() for k, v in out.items()}, **last} for out, last in zip(sums, newest)]


def _snapshot_config(snapshot: Snapshot):
    """The typed run configuration a snapshot records."""
    try:
        return run_config.from_dict(load_snapshot(snapshot.path)["config"], stored=True)
    except ConfigError as exc:
        raise EMAError(f"{snapshot.path}: its configuration does not load: {exc}") from None


def record(target: Target, snapshots: list[Snapshot], run_root) -> dict:
    """What a reconstructed checkpoint says of itself (its ``extra.post_hoc_ema``)."""
    used = sorted({i for i, _ in target.members})
    return {"sigma_rel": target.sigma_rel, "step": target.step, "residual": target.fit.residual,
            "run": str(Path(run_root).resolve()), "snapshot_steps": [snapshots[i].step for i in used],
            "profiles": [[snapshots[i].sigma_rels[k], x] for (i, k), x in zip(target.members,
                                                                               target.fit.coefficients.tolist())],
            "precision": sorted({snapshots[i].precision for i in used})}


def write_checkpoint(target: Target, weights: dict, snapshots: list[Snapshot], run_root, out) -> Path:
    """A checkpoint holding the reconstruction as its EMA weights (no raw model, no optimiser), its step the target's,
    its configuration the newest snapshot's."""
    newest = snapshots[max(i for i, _ in target.members)]
    config = _snapshot_config(newest)
    model = built_and_loaded(lambda: build(config), weights, newest.path)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    return save_checkpoint(out, config=config, step=target.step, model=None, ema=model,
                           extra={"post_hoc_ema": record(target, snapshots, run_root)})

