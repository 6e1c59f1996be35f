"""Guidance sweeps: every (interval, CFG scale, [CLS] scale) point of a checkpoint generated and scored in process
with the same seeds (common random numbers: differences between points are not seed noise), resumable point by
point, summarised as a table and a plot of FID and IS against the scale, the best point named.

Every point carries its complete identity (reglue.scoring.identity: checkpoint, decoder, every sampling setting, the
reference's and the Inception weights' content, N, repeats) and its file is named by it, so points computed with
other settings are never taken for this sweep's. ``OUT/sweep.json`` records what the sweep's points share (the
identity without the guidance point); a rerun with other settings is refused unless it asks for a new set. Every
input is checked, and the identity computed, before the first point is scored; OUT is changed only once a point
is ready to be written, so a failed launch leaves nothing that blocks the corrected command. See docs/scoring.md.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import math
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Callable

from evaluation.evaluate import EvalOptions
from evaluation.fileio import JSONFileError, read_json_object
from reglue.constants import VAE_DOWNSAMPLE
from reglue.distributed import DistInfo, all_sum
from reglue.ema.source import PostHocSource
from reglue.encoders.vae import load_vae
from reglue.errors import UserError
from reglue.fileio import atomic_path, atomic_write_text
from reglue.sampling.run import Prepared, SampleRequest, check_settings, file_sha256, guide_path, load_guide, prepare
from reglue.sampling.seeds import check_repeats
from reglue.scoring.generate_and_score import METRICS, score_repeats
from reglue.scoring.identity import (
    describe_differences,
    differences,
    evaluator_identity,
    identity_key,
    sampling_identity,
)

MANIFEST = "sweep.json"  # the identity every point of the current set shares: a rerun must match it
POINTS = "points"  # one `reglue eval --json` result per point, named by its identity
MAX_POINTS = 200  # points in one sweep (--cfg x --cls-cfg x --interval) without --many-points
HARD_MAX_POINTS = 10_000  # points in one sweep, whatever the flags: split a larger grid over several sweeps
MAX_SWEEP_STEPS = 100_000  # integration steps of a steps sweep's point (SamplingConfig's own bound)
GUIDANCE_KEYS = ("scale", "cls_scale", "interval")  # the settings that differ between points of one sweep
EMA_SHARED_KEYS = ("run", "step", "snapshots")  # of an EMA point's identity, what every point of an EMA sweep shares
EMA_CACHE = "ema"  # OUT/ema/: the post-hoc EMA checkpoints of an EMA sweep, each computed once


class SweepError(UserError, ValueError):
    """A sweep that cannot run: a bad range, or a directory holding another sweep's points."""


def exact(value: float) -> str:
    """A scale as given: the shortest text that reads back as the same float ('1.5000001', '2', '1e-05')."""
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


def _number(text: str, flag: str, spec: str) -> Decimal:
    """One finite number of a --cfg/--cls-cfg value, kept exact (a range's values are computed in decimal)."""
    try:
        value = Decimal(text.strip())
    except InvalidOperation:
        raise SweepError(f"{flag} {spec!r}: {text.strip()!r} is not a number; expected START:STOP:STEP "
                         "(STEP > 0), a comma list or one number") from None
    if not value.is_finite() or not math.isfinite(float(value)):
        raise SweepError(f"{flag} {spec}: {text.strip()} is not a finite number")
    return value


def _range(text: str, flag: str) -> list[float]:
    """'START:STOP:STEP', inclusive; the count is checked before any value is made."""
    parts = text.split(":")
    if len(parts) != 3:
        raise SweepError(f"{flag} {text!r}: expected START:STOP:STEP (STEP > 0), a comma list or one number")
    start, stop, step = (_number(p, flag, text) for p in parts)
    if float(step) <= 0 or stop < start:  # a step too small for a float is no step
        raise SweepError(f"{flag} {text}: START:STOP:STEP needs START <= STOP and STEP > 0")
    count = int((stop - start) / step) + 1  # Decimal: exact for any typed values, no list built yet
    if count > HARD_MAX_POINTS:
        shown = f"{count:,}" if count < 10**15 else "more than 10^15"
        raise SweepError(f"{flag} {text}: {shown} values; one sweep has at most {HARD_MAX_POINTS:,} points")
    return [float(v) for v in (start + i * step for i in range(count)) if v <= stop]


def _list(text: str, flag: str) -> list[float]:
    """'1.5,2,2.5' or '2'."""
    if text.count(",") >= HARD_MAX_POINTS:
        raise SweepError(f"{flag}: {text.count(',') + 1:,} values; one sweep has at most {HARD_MAX_POINTS:,} points")
    return [float(_number(v, flag, text)) for v in text.split(",")]


def parse_values(text: str, flag: str) -> list[float]:
    """'1.5:3.0:0.25' (inclusive range), '1.5,2,2.5' (a list) or '2' -> the values (scales, or sigma_rel for
    --ema), each once, in order."""
    values = _range(text, flag) if ":" in text else _list(text, flag)
    if any(v < 0 for v in values):
        raise SweepError(f"{flag} {text}: {'sigma_rel values' if flag == '--ema' else 'guidance scales'} are >= 0")
    return list(dict.fromkeys(v + 0.0 for v in values))  # 1.5,1.5 is one point (1.5,1.5000001 two); -0 is 0


@dataclasses.dataclass(frozen=True)
class Point:
    """One sweep point: the guidance it samples with and, in an EMA sweep, the post-hoc EMA length."""

    cfg: float
    cls_cfg: float | None  # None: follows cfg
    interval: tuple[float, float] | None  # None: the checkpoint's sampling.guidance_interval
    ema: float | None = None  # sigma_rel of the post-hoc EMA (reglue.ema.reconstruct); None: the checkpoint's weights
    steps: int | None = None  # integration steps in a steps sweep (FID against NFE); None: the request's
    guide: str | None = None  # autoguidance: the guide as given (a path or a step of the run); None: the request's

    @property
    def label(self) -> str:
        """The point in words, its scales exact."""
        ema = "" if self.ema is None else f"ema {exact(self.ema)}, "
        steps = ("" if self.steps is None else f"{self.steps} steps, ") + (
            "" if self.guide is None else f"guide {self.guide}, ")
        cls = "" if self.cls_cfg is None else f", [CLS] {exact(self.cls_cfg)}"
        interval = "" if self.interval is None else f", interval {exact(self.interval[0])},{exact(self.interval[1])}"
        return f"{ema}{steps}cfg {exact(self.cfg)}{cls}{interval}"

    def file_prefix(self) -> str:
        """The readable start of its file name (the identity key that follows is what names it)."""
        ema = "" if self.ema is None else f"ema{exact(self.ema)}_"
        steps = ("" if self.steps is None else f"steps{self.steps}_") + (
            "" if self.guide is None else f"guide{Path(self.guide).stem}_")
        cls = "same" if self.cls_cfg is None else exact(self.cls_cfg)
        return f"{ema}{steps}cfg{exact(self.cfg)}_cls{cls}_t{exact(self.interval[0])}-{exact(self.interval[1])}"


def parse_steps(text: str) -> list[int]:
    """'8,16,32,64,250' or '250' -> integration step counts, each once, in order."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise SweepError(f"--steps {text!r}: expected step counts, e.g. 8,16,32,64,250") from None
    if not all(1 <= v <= MAX_SWEEP_STEPS for v in values):
        raise SweepError(f"--steps {text}: step counts lie in 1..{MAX_SWEEP_STEPS:,}")
    return list(dict.fromkeys(values))


def grid(cfgs: list[float], cls_cfgs: list[float] | None, intervals: list[tuple[float, float] | None],
         many_points: bool = False, emas: list[float] | None = None, steps: list[int] | None = None,
         guides: list[str] | None = None) -> list[Point]:
    """Every combination, EMA-major, then steps, then guides, then interval-major, each once; its size checked
    against MAX_POINTS before it is built."""
    intervals = list(dict.fromkeys(intervals))
    count = (len(emas or [None]) * len(steps or [None]) * len(guides or [None]) * len(cfgs) * len(cls_cfgs or [None])
             * len(intervals))
    axes = " x ".join([*(["--ema"] if emas else []), *(["--steps"] if steps else []),
                       *(["--guide-ckpt"] if guides else []), "--cfg", "--cls-cfg", "--interval"])
    if count > HARD_MAX_POINTS:
        raise SweepError(f"{count:,} points ({axes}): one sweep has at most {HARD_MAX_POINTS:,}; split the grid over "
                         "several sweeps")
    if count > MAX_POINTS and not many_points:
        raise SweepError(f"{count:,} points ({axes}), more than {MAX_POINTS}: each is N samples generated and scored; "
                         "pass --many-points if you mean it")
    combinations = itertools.product(emas or [None], steps or [None], list(dict.fromkeys(guides or [None])), intervals,
                                     cfgs, cls_cfgs or [None])
    return [Point(c, k, i, e, s, g) for e, s, g, i, c, k in combinations]


def _plain(data: dict) -> dict:
    """``data`` as JSON reads it back (tuples as lists): a stored identity compares equal to a computed one."""
    return json.loads(json.dumps(data))


def shared_identity(identity: dict, steps_axis: bool = False, guide_axis: bool = False) -> dict:
    """A point's identity without its guidance point, its EMA length, (``steps_axis``) its step count and
    (``guide_axis``) its guide: what every point of its sweep shares (OUT/sweep.json)."""
    shared = _plain(identity)
    guidance = shared["sampling"]["settings"]["guidance"]
    for key in GUIDANCE_KEYS:
        guidance.pop(key, None)
    if steps_axis:
        shared["sampling"]["settings"].pop("steps", None)
    if guide_axis:
        shared["sampling"]["settings"].pop("guide", None)
        shared["sampling"].pop("guide_sha256", None)
    if "ema" in shared:
        shared["ema"] = {k: v for k, v in shared["ema"].items() if k in EMA_SHARED_KEYS}
    return shared


@dataclasses.dataclass
class Plan:
    """A checked sweep, nothing scored or written yet: its points, their settings and identities."""

    out: Path
    prepared: Prepared  # the checkpoint with the request's settings (the default guidance)
    points: list[Point]  # intervals resolved, one point per identity
    guided: list[Prepared]  # each point's settings
    identities: list[dict]  # each point's identity
    identity: dict  # what every point shares
    ref: str | None
    inception_weights: str | None
    options: EvalOptions
    repeats: int
    overwrite: bool
    ema: PostHocSource | None = None  # an EMA sweep's weights by sigma_rel

    def path(self, index: int) -> Path:
        """The result file of point ``index``: a readable prefix, then its identity key."""
        key = identity_key(self.identities[index])
        return self.out / POINTS / f"{self.points[index].file_prefix()}_{key}.json"


def plan_sweep(ckpt, base: SampleRequest, points: list[Point], out, ref, inception_weights, options: EvalOptions,
               repeats: int = 1, overwrite: bool = False, new_set: bool = False,
               ema: PostHocSource | None = None) -> Plan:
    """Check all a sweep needs before anything is scored or written: the seed range, every point's guidance against
    the model, the reference (opened) and the Inception weights (both hashed once, here), and what ``out`` holds.
    ``ema``: the post-hoc EMA weights of the points' ``ema`` values (``ckpt`` is then the run directory)."""
    check_repeats(base.seed, repeats)
    if ema is not None:
        model, config = ema.template()
        prepared = prepare(ckpt, base, options.device or "cpu", model=model, config=config)
    else:
        prepared = prepare(ckpt, base, options.device or "cpu")
    default_interval = tuple(prepared.settings.guidance.interval)  # the checkpoint's, when no --interval is given
    resolved = [dataclasses.replace(p, interval=p.interval or default_interval) for p in points]
    guides = _guides(ckpt, prepared, {p.guide for p in resolved if p.guide is not None})
    guided = [_guided(prepared, p, guides) for p in resolved]  # every point checked before the first is scored
    side = prepared.model.config.input_size * VAE_DOWNSAMPLE
    evaluator = evaluator_identity(ref, inception_weights, options, side)  # opens the reference: fails before sampling
    unique: dict[str, tuple] = {}
    for point, settings in zip(resolved, guided):
        identity = _plain({"sampling": sampling_identity(settings), "evaluator": evaluator, "n": base.n,
                           "repeats": repeats, **({"ema": ema.identity(point.ema)} if point.ema is not None else {})})
        unique.setdefault(identity_key(identity), (point, settings, identity))  # --interval given twice: once
    kept_points, kept_guided, identities = (list(column) for column in zip(*unique.values()))
    shared = shared_identity(identities[0], steps_axis=any(p.steps is not None for p in kept_points),
                             guide_axis=any(p.guide is not None for p in kept_points))
    check_directory(Path(out), shared, overwrite or new_set)
    return Plan(Path(out), prepared, kept_points, kept_guided, identities, shared, ref, inception_weights, options,
                repeats, overwrite, ema)


def _guides(ckpt, prepared: Prepared, given: set[str]) -> dict[str, tuple[str, object, str]]:
    """Each guide of a guide axis, loaded once: given -> (its path, the model, its content hash)."""
    out = {}
    for text in sorted(given):
        settings = dataclasses.replace(prepared.settings, guide=str(guide_path(text, ckpt)))
        out[text] = (settings.guide, load_guide(settings, prepared.model, next(prepared.model.parameters()).device),
                     file_sha256(settings.guide))
    return out


def _guided(prepared: Prepared, point: Point, guides: dict | None = None) -> Prepared:
    """``prepared`` with the point's guidance (and guide, steps), checked against the model (no guidance without
    labels or a guide)."""
    guidance = dataclasses.replace(prepared.settings.guidance, scale=point.cfg, cls_scale=point.cls_cfg,
                                   interval=point.interval)
    settings = dataclasses.replace(prepared.settings, guidance=guidance,
                                   steps=prepared.settings.steps if point.steps is None else point.steps)
    attrs, guide = prepared.attrs, prepared.guide
    if point.guide is not None:
        path, guide, sha = guides[point.guide]
        settings = dataclasses.replace(settings, guide=path)
        attrs = {**attrs, "guide_sha256": sha}
    check_settings(settings, prepared.model.config.num_classes)
    return dataclasses.replace(prepared, settings=settings, guide=guide,
                               attrs={**attrs, "settings": json.dumps(settings.describe()),
                                      "nfe": settings.function_evaluations()})


class _Damaged(ValueError):
    """A sweep file that cannot be what it should be; the message says why (the caller names the file)."""


def _read_object(path: Path) -> dict:
    """A JSON object written by a sweep, read defensively (evaluation.fileio.read_json_object); _Damaged saying why
    otherwise."""
    try:
        return read_json_object(path, what="sweep record")
    except JSONFileError as exc:
        raise _Damaged(exc.problem) from None


def check_directory(out: Path, identity: dict, replace: bool = False) -> None:
    """SweepError unless ``out`` holds no sweep or one with the same shared identity; ``replace`` (--new-set,
    --overwrite): a new set is wanted. Only reads: see ``take_directory``."""
    path = out / MANIFEST
    if replace or not (path.exists() or path.is_symlink()):
        return
    try:
        stored = _read_object(path).get("identity")
    except _Damaged as exc:
        raise SweepError(f"{path}: not a sweep manifest ({exc}); --new-set replaces it and keeps the points, "
                         "--overwrite discards them") from None
    if not isinstance(stored, dict):
        raise SweepError(f"{path}: records no sweep identity (an older reglue's sweep); --new-set starts a new set "
                         "beside its points, --overwrite discards them")
    if differences(stored, identity):
        raise SweepError(f"{out}: holds a sweep with other settings: {describe_differences(stored, identity)}; run "
                         "with the same settings to resume, --new-set to start a new set beside its points, or "
                         "--overwrite to discard them")


def take_directory(out: Path, identity: dict, overwrite: bool) -> None:
    """Make ``out`` the sweep of ``identity``: with ``overwrite`` its points discarded, the manifest (re)written."""
    out.mkdir(parents=True, exist_ok=True)
    for old in (out / POINTS).glob("*.json") if overwrite else ():
        old.unlink()
    text = json.dumps({"identity": identity, "identity_key": identity_key(identity)}, indent=2)
    path = out / MANIFEST
    if not (path.is_file() and path.read_bytes() == text.encode()):
        atomic_write_text(path, text)


def _stored(path: Path, identity: dict, log: Callable[[str], None] | None) -> dict | None:
    """The result stored for a point, or None (missing; damaged or of another identity: said, then rescored)."""
    if not (path.exists() or path.is_symlink()):
        return None
    try:
        result = _read_object(path)
        stored = result.get("identity")
        if not isinstance(stored, dict) or differences(stored, identity):
            raise _Damaged("computed with other settings")
        _metrics(result)
        return result
    except _Damaged as exc:
        if log is not None:
            log(f"{path}: {exc}; scoring the point again")
        return None


def _check_inputs_unchanged(result: dict, plan: Plan) -> None:
    """SweepError when the reference or the Inception weights changed on disk since the sweep hashed them."""
    for key, what in (("reference_sha256", "the reference"), ("inception_weights_sha256", "the Inception weights")):
        if key in result and result[key] != plan.identity["evaluator"][key]:
            raise SweepError(f"{what} changed on disk while the sweep ran ({plan.identity['evaluator'][key][:12]} -> "
                             f"{str(result[key])[:12]}); nothing of this point was kept: run the sweep again")


def run_plan(plan: Plan, dist=None, on_point=None, log: Callable[[str], None] | None = None) -> list[dict]:
    """Score every point of ``plan`` without a stored result of its identity; one row per point (rank 0).

    ``out`` is changed (manifest, --overwrite's discards) only when the first point is ready to be written, or
    when every point was already there."""

    dist = dist or DistInfo()
    device = plan.options.device or "cpu"
    vae, taken, rows = None, False, []
    for index, (point, guided) in enumerate(zip(plan.points, plan.guided)):
        path, identity = plan.path(index), plan.identities[index]
        result = _stored(path, identity, log) if dist.is_main and not plan.overwrite else None
        if not all_sum([float(result is not None)])[0]:  # rank 0 decides for all
            if vae is None:
                vae = load_vae(plan.prepared.vae_id)[0].to(device)
            result = score_repeats(_weighted(plan, point, guided), plan.ref, plan.inception_weights, plan.options,
                                   plan.repeats, vae)
            if dist.is_main:
                _check_inputs_unchanged(result, plan)
                result = {**result, "identity": identity, "identity_key": identity_key(identity)}
                if not taken:
                    take_directory(plan.out, plan.identity, plan.overwrite)
                    taken = True
                if point.ema is not None:
                    plan.ema.keep(point.ema)
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(path, json.dumps(result, indent=2))
                if on_point is not None:
                    on_point(point, result)
        if dist.is_main:
            rows.append(row_of(point, result))
    if dist.is_main and not taken:
        take_directory(plan.out, plan.identity, plan.overwrite)
    return rows


def _weighted(plan: Plan, point: Point, guided: Prepared) -> Prepared:
    """``guided`` with the point's post-hoc EMA weights and their record, in an EMA sweep."""
    if point.ema is None:
        return guided
    model = plan.ema.model(point.ema).to(plan.options.device or "cpu")
    return dataclasses.replace(guided, model=model, attrs={**guided.attrs, "ema": json.dumps(
        {"kind": "post-hoc", **{k: plan.ema.record(point.ema)[k] for k in ("sigma_rel", "step", "residual")}})})


def run_sweep(ckpt, base: SampleRequest, points: list[Point], out, ref, inception_weights, options: EvalOptions,
              repeats: int = 1, dist=None, overwrite: bool = False, on_point=None, new_set: bool = False,
              log: Callable[[str], None] | None = None) -> list[dict]:
    """``plan_sweep`` then ``run_plan``: every point of ``points`` scored or reused; one row per point."""
    plan = plan_sweep(ckpt, base, points, out, ref, inception_weights, options, repeats, overwrite, new_set)
    return run_plan(plan, dist, on_point, log)


def _metrics(result: dict) -> dict:
    """A result's metrics (the mean and std over repeats when it has repeats); _Damaged when one is no number."""
    spread = result.get("spread")
    out = {}
    for key in METRICS:
        entry = spread.get(key) if isinstance(spread, dict) else None
        if spread is None:
            values = {key: result.get(key)}
        elif isinstance(entry, dict):
            values = {key: entry.get("mean"), f"{key}_std": entry.get("std")}
        else:
            values = {key: entry}
        for name, value in values.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise _Damaged(f"{name} is {repr(value)[:24]}, not a number")
            out[name] = float(value)
    return out


def row_of(point: Point, result: dict) -> dict:
    """A table row: the point (its EMA length first in an EMA sweep) and its metrics (the mean over repeats, with
    the std, when there were repeats)."""
    steps = {"steps": point.steps, "nfe": result.get("sample_info", {}).get("nfe")} if point.steps is not None else {}
    return {**({"ema": point.ema} if point.ema is not None else {}), **steps,
            **({"guide": point.guide} if point.guide is not None else {}),
            "interval": f"{exact(point.interval[0])},{exact(point.interval[1])}", "cfg": point.cfg,
            "cls_cfg": point.cfg if point.cls_cfg is None else point.cls_cfg, **_metrics(result)}


def best(rows: list[dict]) -> dict:
    """The row with the lowest FID."""
    return min(rows, key=lambda r: r["fid"])


def format_table(rows: list[dict], fmt: str = "table") -> str:
    """The rows as aligned text, Markdown, CSV or JSON; the best point marked."""
    if fmt == "json":
        return json.dumps({"points": rows, "best": best(rows)}, indent=2)
    columns = list(rows[0])
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return buffer.getvalue().rstrip("\n")
    top = best(rows)
    cells = [[_cell(c, r[c]) for c in columns] + ["<- best FID" if r is top else ""] for r in rows]
    if fmt == "markdown":
        lines = ["| " + " | ".join(columns) + " | |", "|" + "---|" * (len(columns) + 1)]
        return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in cells])
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) + "  " + row[-1] for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def _cell(column: str, value) -> str:
    if column in ("cfg", "cls_cfg", "ema"):
        return exact(value)
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _series_label(row: dict, across: str) -> str:
    """The curve a row belongs to: its interval and [CLS] scale; its CFG scale too when the x axis is not the scale
    (``across`` "ema" or "nfe"), and its EMA length in a steps sweep of several."""
    label = f"interval {row['interval']}" + ("" if row["cls_cfg"] == row["cfg"] else f", [CLS] {exact(row['cls_cfg'])}")
    label = (f"guide {row['guide']}, " if "guide" in row else "") + label
    if across == "cfg":
        return label
    ema = f"ema {exact(row['ema'])}, " if across == "nfe" and "ema" in row else ""
    return f"{ema}cfg {exact(row['cfg'])}, {label}"


AXES = {"nfe": "model evaluations per sample (NFE)", "ema": "EMA length (sigma_rel)", "cfg": "CFG scale"}


def plot(rows: list[dict], path) -> Path:
    """FID and IS against the CFG scale, one line per interval (and [CLS] scale); in an EMA sweep against the EMA
    length (sigma_rel), in a steps sweep against the model evaluations (log axis), one line per guidance setting;
    the best point ringed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    across = next(key for key in AXES if key in rows[0])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), dpi=120)
    series: dict[str, list[dict]] = {}
    for r in rows:
        series.setdefault(_series_label(r, across), []).append(r)
    for ax, key, name in ((axes[0], "fid", "FID"), (axes[1], "inception_score", "Inception Score")):
        for label, points in series.items():
            points = sorted(points, key=lambda r: r[across])
            xs, ys = [r[across] for r in points], [r[key] for r in points]
            errors = [r.get(f"{key}_std", 0.0) for r in points]
            ax.errorbar(xs, ys, yerr=errors if any(errors) else None, marker="o", capsize=3, label=label)
        ax.set_xlabel(AXES[across])
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        if across == "nfe":
            ax.set_xscale("log")
    top = best(rows)
    where = (f"ema {exact(top['ema'])}, " if "ema" in top else "") + (f"{top['steps']} steps, " if "steps" in top
                                                                     else "")
    axes[0].scatter([top[across]], [top["fid"]], s=160, facecolors="none", edgecolors="crimson", linewidths=2,
                    label=f"best: {where}cfg {exact(top['cfg'])}, {top['interval']}", zorder=5)
    axes[0].legend(fontsize=8)
    fig.tight_layout()

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(path)
