"""Optional Weights & Biases logging (``--wandb PROJECT``) beside metrics.jsonl and TensorBoard.

Nothing requires it: the package is an extra (``pip install 'reglue[wandb]'``) imported only when asked for.
Its own environment variables are honoured (``WANDB_MODE=offline`` writes an offline run to sync later). A
resumed training run or sweep continues the same W&B run: its id is kept in the run (or sweep) directory.
"""

from __future__ import annotations

import uuid
from pathlib import Path

from reglue.errors import UserError

ID_FILE = "wandb_id.txt"


class TrackingError(UserError, RuntimeError):
    """W&B was asked for and cannot be used."""


class WandbTracker:
    """One W&B run, created or resumed in ``directory``."""

    def __init__(self, project: str, name: str, config: dict, directory: Path):
        try:
            import wandb
        except ImportError:
            raise TrackingError("--wandb needs the wandb package: pip install 'reglue[wandb]'") from None
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        id_file = directory / ID_FILE
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id + "\n")
        self.run = wandb.init(project=project, name=name, id=run_id, resume="allow", config=config,
                              dir=str(directory))

    def log(self, record: dict, step: int) -> None:
        """Numbers at a training step (non-numbers are left out)."""
        self.run.log({k: float(v) for k, v in record.items() if isinstance(v, (int, float))}, step=step)

    def log_point(self, point, result: dict) -> None:
        """A sweep point: its guidance and its metrics, and a row of the run's sweep table."""
        from reglue.scoring import METRICS

        self.run.log({"cfg": point.cfg, "cls_cfg": point.cfg if point.cls_cfg is None else point.cls_cfg,
                      "interval_low": point.interval[0], "interval_high": point.interval[1],
                      **{k: result[k] for k in METRICS}})

    def log_table(self, rows: list[dict], best: dict) -> None:
        """A whole sweep (resumed points included) as a W&B table, and its best point in the summary."""
        import wandb

        columns = list(rows[0])
        self.run.log({"sweep": wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows])})
        self.run.summary.update({f"best_{k}": v for k, v in best.items()})

    def finish(self) -> None:
        """Close the run (offline: the files stay for `wandb sync`)."""
        self.run.finish()
