"""`train --probe-every N`: the alignment probe of the EMA weights during training, on rank 0 while the other ranks
wait through gloo; run/probe/STEP.json (+ its heatmap), a metrics.jsonl line, TensorBoard and W&B scalars. A step
whose JSON exists is never probed again (a resumed run probes a step a kill interrupted first)."""

from __future__ import annotations

import dataclasses

from reglue.distributed import main_phase
from reglue.encoders.vfm import load_vfm
from reglue.probe.run import METRICS, ProbeSettings, probe, record, write
from reglue.training.loop import due

PROBE_DIR = "probe"  # run/probe/STEP.json


def scalars(result: dict) -> dict[str, float]:
    """The record's metrics as named scalars: each metric's best block per noise level ({metric}_max_t{t}) and
    every (block, t) cell ({metric}_b{block}_t{t})."""
    out = {}
    for name in METRICS:
        table = result["metrics"][name]  # [layer][t]
        for k, t in enumerate(result["t"]):
            out[f"{name}_max_t{t:g}"] = max(row[k] for row in table)
            out.update({f"{name}_b{layer}_t{t:g}": row[k] for layer, row in zip(result["layers"], table)})
    return out


@dataclasses.dataclass
class TrainingProbe:
    """A training callback: every ``every`` steps and at the last, ``probe`` of the EMA weights."""

    every: int
    settings: ProbeSettings = dataclasses.field(default_factory=ProbeSettings)
    _vfm: object = None  # the probe's VFM when the model reads none in training (loaded once)

    def __call__(self, trainer) -> None:
        if not due(trainer.step, self.every, trainer.train_cfg.max_steps):
            return
        out = trainer.run.root / PROBE_DIR / f"{trainer.step:07d}.json"
        with main_phase("probe"):  # minutes for a big model on one GPU: the others wait through gloo
            if trainer.dist.is_main and not out.exists():
                self._probe(trainer, out)

    def _vfm_of(self, trainer):
        if trainer.semantics is not None:
            return trainer.semantics.vfm
        if self._vfm is None:
            v = trainer.config.vfm
            self._vfm = load_vfm(v.name, v.image_size, trainer.options.vfm_weights).to(trainer.dist.device)
        return self._vfm

    def _probe(self, trainer, out) -> None:
        """Rank 0: probe, write, report."""
        metrics = probe(trainer.ema, trainer.config, trainer.dataset, trainer.semantics, self._vfm_of(trainer),
                        self.settings, trainer.dist.device)
        where = f"{trainer.run.root} step {trainer.step} (EMA in memory)"
        result = record(metrics, where, trainer.step, trainer.config, "ema", trainer.dataset.identity())
        write(result, out)
        line = {"step": trainer.step, "probe": {k: result[k] for k in ("layers", "t", "metrics")}}
        trainer.report(scalars(result), "probe", line=line)
        trainer.run.log(f"step {trainer.step}: probe written to {out}", trainer.options.echo)
