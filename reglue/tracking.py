"""Optional Weights & Biases logging (``--wandb PROJECT``) beside metrics.jsonl and TensorBoard.

Nothing requires it: the package is an extra (``pip install 'reglue[wandb]'``) imported only when asked for.
Its own environment variables are honoured (``WANDB_MODE=offline`` writes an offline run to sync later). A
resumed training run or sweep continues the same W&B run: its id is kept in the run (or sweep) directory.
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path

from reglue.errors import UserError
from reglue.fileio import atomic_write_text
from reglue.scoring.generate_and_score import METRICS

ID_FILE = "wandb_id.txt"
PROJECT_FORBIDDEN = "/\\#?%:"  # characters W&B refuses in a project name
PROJECT_MAX = 128  # characters of a W&B project name
RUN_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # what we accept as a stored W&B run id
OFFLINE_HINT = "or set WANDB_MODE=offline to log offline and `wandb sync` later"


class TrackingError(UserError, RuntimeError):
    """W&B was asked for and cannot be used."""


def _import_wandb():
    try:
        import wandb
    except ImportError:
        raise TrackingError("--wandb needs the wandb package: pip install 'reglue[wandb]'") from None
    return wandb


def check_project(project: str) -> None:
    """TrackingError unless W&B accepts ``project``: non-empty, at most 128 characters, none of / \\ # ? % :."""
    bad = sorted({c for c in project if c in PROJECT_FORBIDDEN})
    if not project.strip() or len(project) > PROJECT_MAX or bad:
        problem = (f"contains {' '.join(bad)}" if bad else "is empty" if not project.strip()
                   else f"has {len(project)} characters")
        raise TrackingError(f"--wandb {project[:40]!r}: not a W&B project name ({problem}); W&B allows at most "
                            f"{PROJECT_MAX} characters and none of {' '.join(PROJECT_FORBIDDEN)}")


def stored_run_id(directory: Path) -> str | None:
    """The W&B run id kept in ``directory`` (None when there is none); TrackingError when it is not a valid id."""
    id_file = Path(directory) / ID_FILE
    if not id_file.exists():
        return None
    try:
        run_id = id_file.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise TrackingError(f"{id_file}: unreadable ({exc}); delete it to start a new W&B run") from None
    if not RUN_ID.fullmatch(run_id):
        raise TrackingError(f"{id_file}: {run_id[:40]!r} is not a W&B run id (1-64 letters, digits, _ or -); write "
                            "the run's id into it, or delete it to start a new W&B run")
    return run_id


def check_wandb(project: str, directory: Path) -> None:
    """Everything about --wandb that can be checked without opening a run: the package, the project name and the
    stored run id (one-line TrackingError)."""
    _import_wandb()
    check_project(project)
    stored_run_id(directory)


def _init_error(exc: Exception) -> TrackingError:
    """One line with the fix for an exception of wandb.init."""
    import wandb

    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    errors = wandb.errors
    if isinstance(exc, getattr(errors, "AuthenticationError", ())) or "api key" in text.lower():
        return TrackingError(f"W&B login failed ({text}): run `wandb login` or set WANDB_API_KEY, {OFFLINE_HINT}")
    if isinstance(exc, getattr(errors, "CommError", ())):
        return TrackingError(f"cannot reach W&B ({text}): check the network and WANDB_BASE_URL, {OFFLINE_HINT}")
    if isinstance(exc, getattr(errors, "UsageError", ())):
        return TrackingError(f"W&B refused the run ({text}); check --wandb and WANDB_* variables, {OFFLINE_HINT}")
    return TrackingError(f"W&B could not start ({type(exc).__name__}: {text}); {OFFLINE_HINT}")


class WandbTracker:
    """One W&B run, created or resumed in ``directory``; every failure to open it is one-line TrackingError."""

    def __init__(self, project: str, name: str, config: dict, directory: Path):
        wandb = _import_wandb()
        directory = Path(directory)
        check_project(project)
        run_id = stored_run_id(directory)
        new_id = run_id or uuid.uuid4().hex[:12]
        directory.mkdir(parents=True, exist_ok=True)
        try:
            self.run = wandb.init(project=project, name=name, id=new_id, resume="allow", config=config,
                                  dir=str(directory))
        except Exception as exc:  # noqa: BLE001 - whatever wandb raises becomes one line with the fix
            raise _init_error(exc) from None
        if run_id is None:  # kept only once the run exists: a failed start leaves no id behind

            atomic_write_text(directory / ID_FILE, new_id + "\n")

    def log(self, record: dict, step: int) -> None:
        """Numbers at a training step (non-numbers are left out)."""
        self.run.log({k: float(v) for k, v in record.items() if isinstance(v, (int, float))}, step=step)

    def log_point(self, point, result: dict) -> None:
        """A sweep point: its guidance and its metrics, and a row of the run's sweep table."""

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
