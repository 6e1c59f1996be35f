"""The run directory: config.yaml, checkpoints/, metrics.jsonl, log.txt, samples/. Run the same command to resume."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import yaml

from reglue import config as run_config
from reglue.checkpoints import CHECKPOINT_NAME
from reglue.config.checks import unread_sections
from reglue.config.schema import flatten
from reglue.config.yamlfile import load_yaml
from reglue.data.dataset import EncodedDataset
from reglue.distributed import init_distributed
from reglue.errors import UserError
from reglue.fileio import atomic_write_text
from reglue.locks import directory_lock

# Keys that may change between the first launch and a resume (how long and how often, not what is trained).
RESUMABLE_KEYS = {"train.max_steps", "train.ckpt_every", "train.log_every", "train.sample_every", "train.epochs",
                  "ema.snapshot_keep_every", "ema.snapshot_keep_last"}
IGNORED_PREFIXES = ("sources.", "description", "sampling.")  # provenance and sampling defaults: not the training


class RunError(UserError, ValueError):
    """The run directory cannot be used for this command."""


def _normalised(config) -> dict:
    """What must not change on a resume: the plain form of a typed run configuration, or of a stored one (an older
    version's, RETIRED keys dropped), without the sections the run never reads."""
    if isinstance(config, dict):
        try:
            config = run_config.from_dict(config, stored=True)
        except run_config.ConfigError:
            return config  # compared as it is: it differs somewhere, and the difference is what the user sees
    return {k: v for k, v in run_config.to_dict(config).items() if k not in unread_sections(config)}


def _changes(old, new) -> list[tuple[str, object, object]]:
    """(dotted key, old value, new value) of every difference that matters on a resume (not RESUMABLE_KEYS,
    provenance or the sampling defaults)."""
    a, b = flatten(_normalised(old)), flatten(_normalised(new))
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and k not in RESUMABLE_KEYS and not k.startswith(IGNORED_PREFIXES)]


def config_difference(old, new) -> list[str]:
    """Keys (dotted) whose values differ, ignoring RESUMABLE_KEYS, provenance and the sampling defaults."""
    return [key for key, _, _ in _changes(old, new)]


class RunDir:
    """Paths and append-only logs of one training run."""

    def __init__(self, outdir: str | Path):
        self.root = Path(outdir)
        self.checkpoints = self.root / "checkpoints"
        self.samples = self.root / "samples"
        self.config_path = self.root / "config.yaml"
        self.data_path = self.root / "data.yaml"  # the dataset it trains on: path, rows, encode's content hash
        self.metrics_path = self.root / "metrics.jsonl"
        self.log_path = self.root / "log.txt"

    def check(self, config, data: dict, allow_other_data: bool = False) -> bool:
        """Refuse a directory of another run (config or data differ); reads only. True when resuming."""
        resuming = self.config_path.exists()
        if resuming:
            old = self._read_yaml(self.config_path)
            changes = _changes(old, config)
            if changes:
                shown = ", ".join(f"{k} ({was!r} -> {now!r})" for k, was, now in changes[:3])
                raise RunError(f"{self.root} holds a run with another config: {shown}; use a new --outdir")
        if self.data_path.exists() and not allow_other_data:
            old = self._read_yaml(self.data_path)
            if (old.get("rows"), old.get("content_sha256")) != (data["rows"], data["content_sha256"]):
                raise RunError(f"{self.root} trains on {old.get('path')} ({old.get('rows')} rows, content "
                               f"{str(old.get('content_sha256'))[:12]}), --data is {data['path']} "
                               f"({data['rows']} rows, "
                               f"content {data['content_sha256'][:12]}); pass --allow-other-data to go on with it")
        return resuming

    def _read_yaml(self, path: Path) -> dict:
        """The mapping a run file holds; RunError (one line naming the file) when it is unreadable or not a mapping."""
        try:
            data = load_yaml(path.read_text())
        except yaml.YAMLError as exc:
            raise RunError(f"{path}: unreadable ({getattr(exc, 'problem', None) or exc})") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise RunError(f"{path}: unreadable ({getattr(exc, 'strerror', None) or exc})") from None
        if data is None:
            return {}
        if not isinstance(data, dict):
            raise RunError(f"{path}: holds a YAML {type(data).__name__}, not the mapping reglue writes; restore it, or "
                           "use a new --outdir")
        return data

    def begin(self, config, data: dict, step: int, is_main: bool) -> None:
        """Once every input has been checked and the state resumed: write config.yaml and data.yaml, and cut
        metrics.jsonl back to ``step`` (steps after the last checkpoint are run again, not logged twice)."""
        if not is_main:
            return
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        self.samples.mkdir(exist_ok=True)
        atomic_write_text(self.config_path, yaml.safe_dump(run_config.to_dict(config), sort_keys=False))
        atomic_write_text(self.data_path, yaml.safe_dump(data, sort_keys=False))
        if self.metrics_path.exists():
            lines = self.metrics_path.read_text().splitlines()
            kept = [line for line in lines if _step_of(line) <= step]
            if len(kept) != len(lines):
                atomic_write_text(self.metrics_path, "".join(line + "\n" for line in kept))

    def release(self) -> None:
        """Let go of the directory's lock (taken by start_run on rank 0)."""
        if getattr(self, "lock", None) is not None:
            self.lock.release()
            self.lock = None

    def checkpoint_path(self, step: int) -> Path:
        """checkpoints/NNNNNNN.pt."""
        return self.checkpoints / f"{step:07d}.pt"

    def checkpoint_steps(self) -> list[int]:
        """Steps of the checkpoint files present, ascending."""
        if not self.checkpoints.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.checkpoints.iterdir() if (m := CHECKPOINT_NAME.match(p.name)))

    def prune(self, keep_last: int, keep_every: int | None) -> None:
        """Delete checkpoints beyond the newest ``keep_last``, except multiples of ``keep_every``."""
        steps = self.checkpoint_steps()
        for step in steps[:-keep_last] if keep_last > 0 else []:
            if not (keep_every and step % keep_every == 0):
                self.checkpoint_path(step).unlink(missing_ok=True)

    def log(self, line: str, echo=None) -> None:
        """Append a timestamped line to log.txt and print it (through ``echo``, default stderr)."""
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with open(self.log_path, "a") as f:
            f.write(f"{stamp} {line}\n")
        (echo or (lambda s: print(s, file=sys.stderr)))(line)

    def metrics(self, record: dict) -> None:
        """Append one JSON line to metrics.jsonl."""
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")


def check_same_model(path, saved: dict, config) -> None:
    """RunError when the checkpoint at ``path`` (its stored plain config ``saved``) holds another model than the run
    configuration ``config`` builds."""
    ours, theirs = _normalised(config), _normalised(saved)
    section = "model" if config.kind == "diffusion" else "compressor"
    if theirs.get(section) != ours[section] or theirs.get("kind", config.kind) != config.kind:
        raise RunError(f"{path}: a checkpoint of another model ({saved.get('preset', 'another preset')}, not "
                       f"{config.preset}); move it out of the run directory or use another --outdir")


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return 0


def start_run(config, outdir, data, device: str | None, allow_other_data: bool = False):
    """Join the process group, take the run directory's lock (rank 0), open the dataset and check that the
    directory holds this run or none. Nothing is written: RunDir.begin does that once the run has started."""

    dist = init_distributed(device)
    run = RunDir(outdir)
    if run.root.exists() and not run.root.is_dir():
        raise RunError(f"{run.root}: exists and is not a directory")
    run.lock = directory_lock(run.root).acquire() if dist.is_main else None  # released by the trainers
    try:
        dataset = EncodedDataset(data, flip=config.kind == "diffusion" and config.data.flip)
        run.check(config, dataset.identity(), allow_other_data)
    except BaseException:
        run.release()
        raise
    return dist, run, dataset


def open_run(config, options, build):
    """start_run with ``options`` (TrainOptions), then ``build(config, options, dist, run, dataset)``; the run
    directory's lock is released if building fails."""
    dist, run, dataset = start_run(config, options.outdir, options.data, options.device, options.allow_other_data)
    try:
        return build(config, options, dist, run, dataset)
    except BaseException:
        run.release()
        raise
