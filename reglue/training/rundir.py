"""The run directory: config.yaml, checkpoints/, metrics.jsonl, log.txt, samples/. Run the same command to resume."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import yaml

from reglue.checkpoints import CHECKPOINT_NAME
from reglue.fileio import atomic_write_text

# Keys that may change between the first launch and a resume (how long and how often, not what is trained).
RESUMABLE_KEYS = {"train.max_steps", "train.ckpt_every", "train.log_every", "train.sample_every", "train.epochs"}


class RunError(ValueError):
    """The run directory cannot be used for this command."""


def _flatten(config: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_difference(old: dict, new: dict) -> list[str]:
    """Keys (dotted) whose values differ, ignoring RESUMABLE_KEYS and sources."""
    a, b = _flatten(old), _flatten(new)
    keys = sorted(set(a) | set(b))
    return [k for k in keys if a.get(k) != b.get(k) and k not in RESUMABLE_KEYS and not k.startswith("sources.")]


class RunDir:
    """Paths and append-only logs of one training run."""

    def __init__(self, outdir: str | Path):
        self.root = Path(outdir)
        self.checkpoints = self.root / "checkpoints"
        self.samples = self.root / "samples"
        self.config_path = self.root / "config.yaml"
        self.metrics_path = self.root / "metrics.jsonl"
        self.log_path = self.root / "log.txt"

    def prepare(self, config: dict, is_main: bool) -> bool:
        """Create the directory (and its parents) and write config.yaml, or check it against ``config``; True when resuming."""
        if self.root.exists() and not self.root.is_dir():
            raise RunError(f"{self.root}: exists and is not a directory")
        resuming = self.config_path.exists()
        if resuming:
            try:
                old = yaml.safe_load(self.config_path.read_text()) or {}
            except yaml.YAMLError as exc:
                raise RunError(f"{self.config_path}: unreadable ({exc.problem})") from None
            diff = config_difference(old, config)
            if diff:
                shown = ", ".join(f"{k} ({_flatten(old).get(k)!r} -> {_flatten(config).get(k)!r})" for k in diff[:3])
                raise RunError(f"{self.root} holds a run with another config: {shown}; use a new --outdir")
        if is_main:
            self.checkpoints.mkdir(parents=True, exist_ok=True)
            self.samples.mkdir(exist_ok=True)
            atomic_write_text(self.config_path, yaml.safe_dump(config, sort_keys=False))
        return resuming

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


def start_run(config: dict, outdir, data, device: str | None):
    """Join the process group, prepare the run directory (all ranks wait for rank 0) and open the dataset."""
    from reglue.data.dataset import EncodedDataset
    from reglue.distributed import barrier, init_distributed

    dist = init_distributed(device)
    run = RunDir(outdir)
    run.prepare(config, dist.is_main)
    barrier()
    return dist, run, EncodedDataset(data)
