"""Generate and score in one process: a checkpoint's samples (or a training run's EMA weights) straight into the
ADM metrics of the evaluation suite, with the sampler settings recorded beside them; repeats over disjoint seeds.

The numbers equal `reglue sample` then `reglue eval` for the same settings (reglue.sampling.generate).
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np

from evaluation.evaluate import EvalOptions, evaluate
from reglue.encoders.vae import load_vae
from reglue.sampling.generate import GeneratedImages
from reglue.sampling.run import Prepared, SampleRequest, SampleSettings, prepare

METRICS = ("fid", "sfid", "inception_score", "precision", "recall")


def with_seed(prepared: Prepared, seed: int) -> Prepared:
    """The same model and settings with another global seed (a disjoint set of per-sample seeds)."""
    settings = dataclasses.replace(prepared.settings, seed=seed)
    return dataclasses.replace(prepared, settings=settings,
                               attrs={**prepared.attrs, "settings": json.dumps(settings.describe())})


def score(prepared: Prepared, ref: str | None, inception_weights: str | None, options: EvalOptions,
          vae=None) -> dict:
    """The `reglue eval --json` result for ``prepared``'s samples, generated in process, plus the sampling
    settings; {} on ranks other than 0 under torchrun."""
    images = GeneratedImages(prepared, options.device or "cpu", vae)
    result = evaluate(images, ref, inception_weights, options)
    if result:
        result["sampling"] = prepared.settings.describe()
        result["settings_from_checkpoint"] = prepared.taken
    return result


def spread(results: list[dict]) -> dict:
    """Mean and sample standard deviation (ddof 1) of every metric over repeats."""
    out = {}
    for key in METRICS:
        values = np.array([r[key] for r in results], dtype=np.float64)
        out[key] = {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else math.nan,
                    "values": values.tolist()}
    return out


def with_spread(results: list[dict]) -> dict:
    """One result, or with several repeats the first one with ``repeats`` (each result) and ``spread`` added;
    {} on ranks other than 0."""
    if not results[0] or len(results) == 1:
        return results[0]
    return {**results[0], "repeats": results, "spread": spread(results)}


def score_repeats(prepared: Prepared, ref: str | None, inception_weights: str | None, options: EvalOptions,
                  repeats: int = 1, vae=None) -> dict:
    """``score`` over K disjoint seed sets (seed, seed + 1, ...: every (seed, sample) pair draws its own generator,
    reglue.sampling.seeds), combined by ``with_spread``."""
    seed = prepared.settings.seed
    return with_spread([score(with_seed(prepared, seed + k), ref, inception_weights, options, vae)
                        for k in range(repeats)])


def score_checkpoint(ckpt, request: SampleRequest | SampleSettings, ref: str | None, inception_weights: str | None,
                     options: EvalOptions, repeats: int = 1) -> dict:
    """Generate and score ``ckpt`` (``score_repeats`` with the model and decoder loaded once)."""
    prepared = prepare(ckpt, request, options.device or "cpu")
    vae = load_vae(prepared.vae_id)[0].to(options.device or "cpu")
    return score_repeats(prepared, ref, inception_weights, options, repeats, vae)


def score_saved(ckpt, request: SampleRequest, out, ref: str | None, inception_weights: str | None,
                options: EvalOptions, repeats: int = 1, dist=None) -> dict:
    """`eval --ckpt --save-samples OUT`: `reglue sample` into OUT (OUT/seedS per repeat), then score the file;
    the same numbers as in process, with the images kept and resumable."""
    from pathlib import Path

    from reglue.distributed import DistInfo
    from reglue.sampling.run import sample_to_dir

    dist = dist or DistInfo()
    results = []
    for k in range(repeats):
        seeded = dataclasses.replace(request, seed=request.seed + k)
        where = Path(out) if repeats == 1 else Path(out) / f"seed{seeded.seed}"
        sample_to_dir(ckpt, where, seeded, options.batch_size, dist, progress=options.progress)
        result = evaluate(str(where / "samples.h5"), ref, inception_weights, options)
        if result:
            result["sampling"] = result["sample_info"].get("settings")
        results.append(result)
    return with_spread(results)


EVAL_DIR = "eval"  # run/eval/STEP.json: one `reglue eval --json` result per evaluated step


@dataclasses.dataclass
class TrainingEvaluator:
    """A training callback: every ``every`` steps and at the last, the EMA weights scored in process on every rank
    with the run's sampling settings; run/eval/STEP.json, metrics.jsonl and TensorBoard get the numbers. A step
    whose JSON exists is never scored again (resume)."""

    every: int
    n: int = 10_000
    ref: str | None = None
    inception_weights: str | None = None
    options: EvalOptions = dataclasses.field(default_factory=EvalOptions)
    seed: int = 0
    _vae: object = None

    def due(self, trainer) -> bool:
        """Whether this step is one to score (a multiple of ``every``, or the last step)."""
        step = trainer.step
        return step > 0 and (step % self.every == 0 or step == trainer.train_cfg.max_steps)

    def __call__(self, trainer) -> None:
        from reglue.distributed import all_sum
        from reglue.fileio import atomic_write_text

        if not self.due(trainer):
            return
        out = trainer.run.root / EVAL_DIR / f"{trainer.step:07d}.json"
        if all_sum([float(out.exists() and trainer.dist.is_main)])[0]:  # rank 0 decides for all
            return
        device = trainer.dist.device
        checkpoint = trainer.run.checkpoint_path(trainer.step)
        request = SampleRequest(n=self.n, seed=self.seed)
        prepared = prepare(checkpoint, request, device, model=trainer.ema, config=trainer.config)
        prepared.attrs.update(step=trainer.step, checkpoint=str(checkpoint) if checkpoint.is_file() else
                              f"{trainer.run.root} step {trainer.step} (EMA in memory)")
        if self._vae is None:
            self._vae = load_vae(prepared.vae_id)[0].to(device)
        options = dataclasses.replace(self.options, device=str(device), progress=False)
        result = score(prepared, self.ref, self.inception_weights, options, self._vae)
        if trainer.dist.is_main:
            out.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(out, json.dumps(result, indent=2))
            numbers = {k: result[k] for k in METRICS}
            trainer.report(numbers, "eval", line={"step": trainer.step, "eval": numbers, "eval_n": self.n})
            trainer.run.log(f"step {trainer.step}: FID {result['fid']:.4f} on {self.n:,} EMA samples ({out})",
                            trainer.options.echo)
