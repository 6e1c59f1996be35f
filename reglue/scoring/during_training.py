"""The training evaluator: `train --eval-every`'s scores of the EMA weights during training, each stored with its
identity in ``run/eval/STEP.json``; a resume that would mix settings is refused at launch.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from evaluation.evaluate import EvalOptions
from evaluation.fileio import JSONFileError, read_json_object
from evaluation.inception import InceptionError
from reglue.constants import VAE_DOWNSAMPLE
from reglue.distributed import all_sum
from reglue.encoders.vae import load_vae
from reglue.errors import UserError
from reglue.fileio import atomic_write_text
from reglue.sampling.run import SampleRequest, check_settings, prepare
from reglue.sampling.seeds import MAX_SAMPLES
from reglue.scoring import generate_and_score
from reglue.scoring.generate_and_score import METRICS
from reglue.scoring.identity import describe_differences, differences, evaluator_identity, identity_key
from reglue.training.loop import due

EVAL_DIR = "eval"  # run/eval/STEP.json: one `reglue eval --json` result per evaluated step
# The evaluator keys of a `reglue eval --json` result, for series written before results carried their identity.
EVALUATOR_KEYS = ("reference", "reference_sha256", "inception_weights_sha256", "feature_chunk", "fid_backend",
                  "pr_precision")


class EvaluationError(UserError, RuntimeError):
    """An evaluation during training cannot run (at launch), or failed with --eval-failure stop."""


def _with_flag(flag: str, exc: Exception) -> EvaluationError:
    return EvaluationError(f"{flag}: {exc}")


def describe_failure(exc: Exception) -> str:
    """One line for an exception raised by an evaluation: the message of a user error, else type and message."""
    if isinstance(exc, OSError) and exc.filename:
        return f"{exc.filename}: {exc.strerror or exc}"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return text if isinstance(exc, UserError) else f"{type(exc).__name__}: {text}"


def recorded_identity(directory: Path) -> dict | None:
    """The identity a series of evaluations was computed with: the newest STEP.json's (for a result written before
    results carried one: its evaluator keys, n and sampling settings); None when there is none."""
    steps = sorted(directory.glob("[0-9]*.json")) if directory.is_dir() else []
    if not steps:
        return None
    newest = _read_json(steps[-1])
    if "identity" in newest:
        return newest["identity"]
    return {"evaluator": {k: newest.get(k) for k in EVALUATOR_KEYS}, "n": newest.get("n"),
            "sampling": {"settings": newest.get("sampling")}}


def _read_json(path: Path) -> dict:
    """The result in ``path``, read defensively (evaluation.fileio.read_json_object); EvaluationError otherwise."""
    try:
        return read_json_object(path, what="`reglue eval --json` result")
    except JSONFileError as exc:
        raise EvaluationError(f"{path}: {exc.problem}; move it out of the eval directory") from None


def _comparable(old: dict, new: dict) -> dict:
    """``new`` restricted to the dotted keys ``old`` has when ``old`` is a legacy record (no decoder recorded)."""
    if "decoder" in old.get("sampling", {}):
        return new
    return {**new, "sampling": {"settings": new["sampling"]["settings"]}}


@dataclasses.dataclass
class TrainingEvaluator:
    """A training callback: every ``every`` steps and at the last, the EMA weights scored in process on every rank
    with the run's sampling settings; run/eval/STEP.json, metrics.jsonl and TensorBoard get the numbers. A step
    whose JSON exists is never scored again (resume). Every setting is checked at launch (``launch_identity``), a
    series is continued only with the identity it was started with (``launch``), and a failed evaluation is
    reported and training goes on (``failure`` "continue") or stops after a checkpoint ("stop")."""

    every: int
    n: int = 10_000
    ref: str | None = None
    inception_weights: str | None = None
    options: EvalOptions = dataclasses.field(default_factory=EvalOptions)
    seed: int = 0
    failure: str = "continue"
    identity: dict | None = None  # set by launch_identity: what every STEP.json of this launch is computed with
    _vae: object = None

    def launch_identity(self, config) -> dict:
        """Check every evaluation setting against the run ``config`` (EvaluationError/InputError, one line) and
        return the identity of its results; nothing is written and no model is built."""
        if not 2 <= self.n <= MAX_SAMPLES:
            raise EvaluationError(f"--eval-n {self.n:,}: the metrics need between 2 and {MAX_SAMPLES:,} samples "
                                  "(one seed's noise streams, reglue.sampling.seeds)")
        try:
            settings = SampleRequest(n=self.n, seed=self.seed).resolve(config.sampling)[0]
            check_settings(settings, config.model.num_classes)
        except UserError as exc:
            raise EvaluationError(f"--eval-every: the run's sampling section cannot sample this model ({exc}); "
                                  "change it with --set sampling.KEY=VALUE") from None
        try:  # the reference resolved and opened, the weights resolved, both hashed: once
            evaluator = evaluator_identity(self.ref, self.inception_weights, self.options,
                                           config.model.input_size * VAE_DOWNSAMPLE)
        except InceptionError as exc:
            raise _with_flag("--inception-weights", exc) from None
        except UserError as exc:
            raise _with_flag("--eval-ref", exc) from None
        self.identity = {"evaluator": evaluator, "n": self.n,
                         "sampling": {"decoder": settings.vae or config.data.vae_decoder,
                                      "settings": settings.describe()}}
        return self.identity

    def launch(self, config, run) -> None:
        """Once the run directory is locked, before anything is built or written: refuse to continue run/eval with
        another identity (one line naming the differences and the way out)."""
        if self.identity is None:
            self.launch_identity(config)
        directory = run.root / EVAL_DIR
        old = recorded_identity(directory)
        if old is None:
            return
        new = _comparable(old, self.identity)
        if differences(old, new):
            raise EvaluationError(
                f"{directory} holds evaluations computed with other settings: {describe_differences(old, new)}; "
                f"launch with the old settings, or move {directory} aside (e.g. to {directory}-{identity_key(old)}) "
                "to start a new series")

    def __call__(self, trainer) -> None:
        if not due(trainer.step, self.every, trainer.train_cfg.max_steps):
            return
        out = trainer.run.root / EVAL_DIR / f"{trainer.step:07d}.json"
        if all_sum([float(out.exists() and trainer.dist.is_main)])[0]:  # rank 0 decides for all
            return
        error = None
        try:
            self._evaluate(trainer, out)
        except Exception as exc:  # noqa: BLE001 - reported below; KeyboardInterrupt and SystemExit go through
            error = describe_failure(exc)
            if not trainer.dist.is_main:
                trainer.options.echo(f"rank {trainer.dist.rank}: step {trainer.step}: evaluation failed: {error}")
        if all_sum([float(error is not None)])[0]:  # every rank takes the same decision
            self._failed(trainer, error or "failed on another rank (see its output)")

    def _evaluate(self, trainer, out: Path) -> None:
        """Score the EMA weights of this step; rank 0 writes STEP.json (with the identity) and reports."""

        if self.identity is None:
            self.launch_identity(trainer.config)
        device = trainer.dist.device
        checkpoint = trainer.run.checkpoint_path(trainer.step)
        request = SampleRequest(n=self.n, seed=self.seed)
        prepared = prepare(checkpoint, request, device, model=trainer.ema, config=trainer.config)
        prepared.attrs.update(step=trainer.step, checkpoint=str(checkpoint) if checkpoint.is_file() else
                              f"{trainer.run.root} step {trainer.step} (EMA in memory)")
        if self._vae is None:
            self._vae = load_vae(prepared.vae_id)[0].to(device)
        options = dataclasses.replace(self.options, device=str(device), progress=False)
        result = generate_and_score.score(prepared, self.ref, self.inception_weights, options, self._vae)
        if not trainer.dist.is_main:
            return
        self._check_unchanged(result)
        out.parent.mkdir(parents=True, exist_ok=True)
        record = {"identity": self.identity, "identity_key": identity_key(self.identity)}
        atomic_write_text(out, json.dumps({**result, **record}, indent=2))
        numbers = {k: result[k] for k in METRICS}
        trainer.report(numbers, "eval", line={"step": trainer.step, "eval": numbers, "eval_n": self.n})
        trainer.run.log(f"step {trainer.step}: FID {result['fid']:.4f} on {self.n:,} EMA samples ({out})",
                        trainer.options.echo)

    def _check_unchanged(self, result: dict) -> None:
        """EvaluationError when the reference or the weights changed on disk since launch (the curve would mix)."""
        launched = self.identity["evaluator"]
        for key in ("reference_sha256", "inception_weights_sha256"):
            if result[key] != launched[key]:
                raise EvaluationError(f"{key.rsplit('_', 1)[0].replace('_', ' ')} changed on disk since launch "
                                      f"({launched[key][:12]} -> {result[key][:12]}); result not written")

    def _failed(self, trainer, error: str) -> None:
        """Report a failed evaluation (log.txt, stderr, a metrics.jsonl line); with ``failure`` "stop", save this
        step's checkpoint (unless there is one) and raise EvaluationError."""

        step = trainer.step
        if trainer.dist.is_main:
            going_on = ("training goes on (--eval-failure stop to stop)" if self.failure != "stop" else "stopping")
            line = f"step {step}: evaluation failed: {error}; {going_on}"
            try:
                trainer.run.log(line, trainer.options.echo)
                trainer.run.metrics({"step": step, "eval_error": error})
            except OSError as exc:  # the log's disk may be the full one: say it on the console at least
                trainer.options.echo(f"{line} (not logged: {describe_failure(exc)})")
        if self.failure != "stop":
            return
        checkpoint = trainer.run.checkpoint_path(step)
        if not all_sum([float(checkpoint.is_file() and trainer.dist.is_main)])[0]:
            trainer.checkpoint()
        raise EvaluationError(f"step {step}: evaluation failed: {error}; checkpoint {checkpoint} saved, run the "
                              "same command to resume (the step is scored again)")
