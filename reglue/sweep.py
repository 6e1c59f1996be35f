"""Guidance sweeps: every (interval, CFG scale, [CLS] scale) point of a checkpoint generated and scored in process
with the same seeds (common random numbers: differences between points are not seed noise), resumable point by
point, summarised as a table and a plot of FID and IS against the scale, the best point named.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
from pathlib import Path

from evaluation.evaluate import EvalOptions
from reglue.encoders.vae import load_vae
from reglue.errors import UserError
from reglue.fileio import atomic_write_text
from reglue.sampling.run import SampleRequest, file_sha256, prepare
from reglue.scoring import METRICS, score_repeats

MANIFEST = "sweep.json"  # what the points of a sweep directory were computed with: a resumed sweep must match
POINTS = "points"  # one `reglue eval --json` result per point


class SweepError(UserError, ValueError):
    """A sweep that cannot run: a bad range, or a directory holding another sweep's points."""


def parse_values(text: str, flag: str) -> list[float]:
    """'1.5:3.0:0.25' (inclusive range), '1.5,2,2.5' (a list) or '2' -> the scales."""
    try:
        if ":" in text:
            start, stop, step = (float(v) for v in text.split(":"))
            if step <= 0 or stop < start:
                raise ValueError
            count = int(round((stop - start) / step)) + 1
            values = [round(start + i * step, 10) for i in range(count) if start + i * step <= stop + 1e-9]
        else:
            values = [float(v) for v in text.split(",")]
    except ValueError:
        raise SweepError(f"{flag} {text!r}: expected START:STOP:STEP (STEP > 0), a comma list or one number") from None
    if any(v < 0 for v in values):
        raise SweepError(f"{flag} {text}: guidance scales are >= 0")
    return values


@dataclasses.dataclass(frozen=True)
class Point:
    """One sweep point: the guidance it samples with."""

    cfg: float
    cls_cfg: float | None  # None: follows cfg
    interval: tuple[float, float] | None  # None: the checkpoint's sampling.guidance_interval

    @property
    def key(self) -> str:
        """File name of its result."""
        cls = "same" if self.cls_cfg is None else f"{self.cls_cfg:g}"
        return f"cfg{self.cfg:g}_cls{cls}_t{self.interval[0]:g}-{self.interval[1]:g}"


def grid(cfgs: list[float], cls_cfgs: list[float] | None, intervals: list[tuple[float, float] | None]) -> list[Point]:
    """Every combination, interval-major."""
    return [Point(c, k, i) for i, c, k in itertools.product(intervals, cfgs, cls_cfgs or [None])]


def _manifest(ckpt, base: SampleRequest, ref, repeats: int, options: EvalOptions) -> dict:
    return {"checkpoint_sha256": file_sha256(ckpt), "n": base.n, "seed": base.seed, "ref": str(ref),
            "repeats": repeats, "sampler": base.sampler, "steps": base.steps, "channels": base.channels,
            "chunk": base.chunk, "weights": base.weights, "vae": base.vae, "feature_chunk": options.feature_chunk}


def check_directory(out: Path, manifest: dict, overwrite: bool, is_main: bool) -> None:
    """Write the manifest, or check that the points already in ``out`` were computed the same way."""
    path = out / MANIFEST
    if path.exists() and not overwrite:
        stored = json.loads(path.read_text())
        changed = sorted(k for k in manifest if stored.get(k) != manifest[k])
        if changed:
            raise SweepError(f"{out}: holds a sweep with other {', '.join(changed)}; use another --out or --overwrite")
        return
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        for old in (out / POINTS).glob("*.json") if overwrite else ():
            old.unlink()
        atomic_write_text(path, json.dumps(manifest, indent=2))


def run_sweep(ckpt, base: SampleRequest, points: list[Point], out, ref, inception_weights, options: EvalOptions,
              repeats: int = 1, dist=None, overwrite: bool = False, on_point=None) -> list[dict]:
    """Score every point not yet in ``out/points``; returns one row per point (in ``points`` order)."""
    from reglue.distributed import DistInfo, all_sum

    dist = dist or DistInfo()
    out = Path(out)
    check_directory(out, _manifest(ckpt, base, ref, repeats, options), overwrite, dist.is_main)
    prepared = prepare(ckpt, base, options.device or "cpu")
    vae = load_vae(prepared.vae_id)[0].to(options.device or "cpu")
    default_interval = tuple(prepared.settings.guidance.interval)  # the checkpoint's, when no --interval is given
    rows = []
    for point in (dataclasses.replace(p, interval=p.interval or default_interval) for p in points):
        path = out / POINTS / f"{point.key}.json"
        if not all_sum([float(path.exists() and dist.is_main)])[0]:  # rank 0 decides for all
            result = _score_point(prepared, point, ref, inception_weights, options, repeats, vae)
            if dist.is_main:
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(path, json.dumps(result, indent=2))
            if on_point is not None and dist.is_main:
                on_point(point, result)
        if dist.is_main:
            rows.append(row_of(point, json.loads(path.read_text())))
    return rows


def _score_point(prepared, point: Point, ref, inception_weights, options, repeats: int, vae) -> dict:
    guidance = dataclasses.replace(prepared.settings.guidance, scale=point.cfg, cls_scale=point.cls_cfg,
                                   interval=point.interval)
    guided = dataclasses.replace(prepared, settings=dataclasses.replace(prepared.settings, guidance=guidance))
    return score_repeats(guided, ref, inception_weights, options, repeats, vae)


def row_of(point: Point, result: dict) -> dict:
    """A table row: the point and its metrics (the mean over repeats, with the std, when there were repeats)."""
    row = {"interval": f"{point.interval[0]:g},{point.interval[1]:g}", "cfg": point.cfg,
           "cls_cfg": point.cfg if point.cls_cfg is None else point.cls_cfg}
    for key in METRICS:
        if "spread" in result:
            row[key], row[f"{key}_std"] = result["spread"][key]["mean"], result["spread"][key]["std"]
        else:
            row[key] = result[key]
    return row


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
    if column in ("cfg", "cls_cfg"):
        return f"{value:g}"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def plot(rows: list[dict], path) -> Path:
    """FID and IS against the CFG scale, one line per interval (and [CLS] scale), the best point ringed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), dpi=120)
    series: dict[str, list[dict]] = {}
    for r in rows:
        label = f"interval {r['interval']}" + ("" if r["cls_cfg"] == r["cfg"] else f", [CLS] {r['cls_cfg']:g}")
        series.setdefault(label, []).append(r)
    for ax, key, name in ((axes[0], "fid", "FID"), (axes[1], "inception_score", "Inception Score")):
        for label, points in series.items():
            points = sorted(points, key=lambda r: r["cfg"])
            xs, ys = [r["cfg"] for r in points], [r[key] for r in points]
            errors = [r.get(f"{key}_std", 0.0) for r in points]
            ax.errorbar(xs, ys, yerr=errors if any(errors) else None, marker="o", capsize=3, label=label)
        ax.set_xlabel("CFG scale")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    top = best(rows)
    axes[0].scatter([top["cfg"]], [top["fid"]], s=160, facecolors="none", edgecolors="crimson", linewidths=2,
                    label=f"best: cfg {top['cfg']:g}, {top['interval']}", zorder=5)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    from reglue.fileio import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(path)

