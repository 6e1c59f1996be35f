"""The identity of a scored result: everything that decides its numbers, recorded beside them.

A resumable result (a sweep point, an evaluation during training) is reused only when the identity it was
computed with equals the identity asked for now; two identities are told apart by ``differences`` (dotted
keys, shown to the user) and named by ``identity_key`` (a hash: file names never come from rounded values).

Three parts, each computed before any expensive work:
- ``sampling``: the checkpoint's content hash (empty for in-memory EMA weights: the training step names them),
  the decoder and every resolved sampling setting (sampler, steps, guidance, seed, classes, balance, chunk,
  weights); see reglue.sampling.run.SampleSettings.
- ``evaluator``: the reference batch's content hash (not its path), the Inception weights' hash, the feature
  chunk, the FID backend and the precision/recall precision.
- ``n`` and ``repeats``.
"""

from __future__ import annotations

import hashlib
import json

from evaluation.evaluate import EvalOptions
from evaluation.images import file_sha256
from evaluation.inception import resolve_weights
from evaluation.reference import check_reference, reference_for, resolve_reference
from reglue.config.schema import flatten

IDENTITY_KEY_LENGTH = 16  # hex digits of the sha256 that name a result file


def evaluator_identity(ref: str | None, inception_weights: str | None, options: EvalOptions, side: int) -> dict:
    """What decides the features and the metrics of ``side`` px samples: reference and weights by content. The
    reference is opened as the evaluator will open it (check_reference), so a bad one fails here, before sampling."""
    ref_path = resolve_reference(ref or reference_for(side))
    check_reference(ref_path)
    weights = resolve_weights(inception_weights)
    return {"reference": str(ref_path), "reference_sha256": file_sha256(ref_path),
            "inception_weights_sha256": file_sha256(weights), "feature_chunk": options.feature_chunk,
            "fid_backend": options.fid_backend, "pr_precision": options.pr_precision}


def sampling_identity(prepared) -> dict:
    """What decides the images of a prepared checkpoint (reglue.sampling.run.Prepared)."""
    return {"checkpoint_sha256": prepared.attrs["checkpoint_sha256"], "decoder": prepared.vae_id,
            "settings": prepared.settings.describe(),
            **({"guide_sha256": prepared.attrs["guide_sha256"]} if "guide_sha256" in prepared.attrs else {})}


# Shown to the user, never compared: where a file was read from may change while its content stays.
NOT_COMPARED = ("evaluator.reference",)


def identity_key(identity: dict) -> str:
    """A short stable name of an identity (sha256 of its canonical JSON, ``NOT_COMPARED`` keys left out)."""
    text = json.dumps(_compared(flatten(identity)), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:IDENTITY_KEY_LENGTH]


def _compared(flat: dict) -> dict:
    return {k: v for k, v in flat.items() if k not in NOT_COMPARED}


def differences(old: dict, new: dict) -> list[str]:
    """The dotted keys whose values differ between two identities (missing on one side counts)."""
    a, b = _compared(flatten(old)), _compared(flatten(new))
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def describe_differences(old: dict, new: dict, limit: int = 4) -> str:
    """'key (old -> new), ...' for the first ``limit`` differences, for a one-line refusal."""
    a, b = flatten(old), flatten(new)
    keys = differences(old, new)
    shown = ", ".join(f"{k} ({_short(a.get(k))} -> {_short(b.get(k))})" for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _short(value) -> str:
    text = "absent" if value is None else (value[:12] if isinstance(value, str) and len(value) == 64 else repr(value))
    return text if len(text) <= 40 else text[:37] + "..."
