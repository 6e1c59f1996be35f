"""Generate and score in one process: a checkpoint's samples (or a training run's EMA weights) straight into the
ADM metrics of the evaluation suite, with the sampler settings recorded beside them; repeats over disjoint seeds.

The numbers equal `reglue sample` then `reglue eval` for the same settings (reglue.sampling.generate).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np

from evaluation.evaluate import EvalOptions, evaluate
from reglue.distributed import DistInfo
from reglue.encoders.vae import load_vae
from reglue.sampling.generate import GeneratedImages
from reglue.sampling.run import Prepared, SampleRequest, SampleSettings, prepare, sample_to_dir

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
