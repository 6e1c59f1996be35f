"""The weights of an EMA sweep (`reglue sweep --ema`): a run's snapshots and one fitted target per sigma_rel, each
reconstruction computed once, kept as OUT/ema/sigma<S>_step<N>.pt and reused by later launches while it still
records the same fit."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from reglue import config as run_config
from reglue.checkpoints import CheckpointError, load_checkpoint, load_model
from reglue.checkpoints.reading import built_and_loaded
from reglue.ema.reconstruct import Snapshot, Target, fit_target, read_snapshots, reconstruct, record, write_checkpoint
from reglue.ema.snapshots import load_snapshot
from reglue.models import build


def _exact(value: float) -> str:
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


@dataclass
class PostHocSource:
    """Post-hoc EMA weights by sigma_rel, for the points of one sweep; the model of the sigma_rel last asked for is
    held (the points of one EMA length are scored one after the other)."""

    run: Path
    snapshots: list[Snapshot]
    targets: dict[float, Target]
    cache: Path  # OUT/ema
    _held: tuple[float, torch.nn.Module] | None = field(default=None, repr=False)

    @classmethod
    def open(cls, run, sigma_rels: list[float], step: int | None, max_residual: float, cache) -> "PostHocSource":
        """Read the run's snapshots and fit every sigma_rel (EMAError naming the first that cannot be represented);
        nothing is reconstructed or written yet."""
        snapshots = read_snapshots(run)
        targets = {s: fit_target(snapshots, s, step, max_residual) for s in sigma_rels}
        return cls(Path(run), snapshots, targets, Path(cache))

    def template(self):
        """(model, run configuration) of the newest snapshot's first profile: what a sweep plans with."""
        newest = self.snapshots[-1]
        state = load_snapshot(newest.path)
        config = run_config.from_dict(state["config"], stored=True)
        return built_and_loaded(lambda: build(config), state["weights"][0], newest.path).eval(), config

    def record(self, sigma_rel: float) -> dict:
        """What the reconstruction of ``sigma_rel`` records of itself (reglue.ema.reconstruct.record)."""
        return json.loads(json.dumps(record(self.targets[sigma_rel], self.snapshots, self.run)))

    def identity(self, sigma_rel: float) -> dict:
        """What decides the weights of ``sigma_rel``: the run, the step, the snapshot files used (step and size)
        and the fit."""
        target = self.targets[sigma_rel]
        used = sorted({i for i, _ in target.members})
        return {"run": str(self.run.resolve()), "step": target.step,
                "snapshots": [[self.snapshots[i].step, self.snapshots[i].size] for i in used],
                "sigma_rel": sigma_rel, "coefficients": target.fit.coefficients.tolist()}

    def path(self, sigma_rel: float) -> Path:
        """OUT/ema/sigma<S>_step<N>.pt."""
        return self.cache / f"sigma{_exact(sigma_rel)}_step{self.targets[sigma_rel].step:07d}.pt"

    def _cache_valid(self, sigma_rel: float) -> bool:
        """Whether OUT/ema holds the reconstruction of ``sigma_rel`` with this sweep's fit."""
        path = self.path(sigma_rel)
        try:
            stored = (load_checkpoint(path, mmap=True).get("extra") or {}).get("post_hoc_ema")
        except CheckpointError:
            return False
        return json.loads(json.dumps(stored)) == self.record(sigma_rel)

    def model(self, sigma_rel: float) -> torch.nn.Module:
        """The weights of ``sigma_rel``: held, cached in OUT/ema, or reconstructed now."""
        if self._held is not None and self._held[0] == sigma_rel:
            return self._held[1]
        if self._cache_valid(sigma_rel):
            model = load_model(self.path(sigma_rel))[0]
        else:
            weights = reconstruct(self.snapshots, [self.targets[sigma_rel]])[0]
            model = built_and_loaded(lambda: build(self.template_config()), weights, self.path(sigma_rel)).eval()
        self._held = (sigma_rel, model)
        return model

    def template_config(self):
        """The run configuration of the newest snapshot."""
        return run_config.from_dict(load_snapshot(self.snapshots[-1].path)["config"], stored=True)

    def keep(self, sigma_rel: float) -> None:
        """Write the reconstruction of ``sigma_rel`` to OUT/ema unless a valid one is there (once the sweep has taken
        OUT)."""
        if self._cache_valid(sigma_rel):
            return
        model = self.model(sigma_rel)
        write_checkpoint(self.targets[sigma_rel], model.state_dict(), self.snapshots, self.run, self.path(sigma_rel))
