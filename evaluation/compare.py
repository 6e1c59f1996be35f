"""Our evaluated runs beside the published numbers (reference_stats/baselines.yaml), with the caveats that apply."""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections import Counter
from pathlib import Path

import yaml

from evaluation.determinism import deterministic_kernels, side_by_side
from evaluation.errors import InputError
from evaluation.extract import statistics
from evaluation.fid import frechet_distance
from evaluation.fileio import read_json_value
from evaluation.inception import is_published_weights
from evaluation.precision_recall import precision_recall
from evaluation.reference import REGISTRY, registry

BASELINES = REGISTRY.parent / "baselines.yaml"
GROUPS = ("sit-b2", "sit-xl2", "cfg", "ablation", "uncond", "frontier")
CONDITIONINGS = ("class-conditional", "unconditional")  # a row's `conditioning`; the defaults say class-conditional
UNCOND_MARK = " [uncond]"  # after the method of an unconditional row, in tables and in the plot's legend
UNCOND_PRESET_SUFFIX = "-uncond"  # our run is unconditional when its samples say num_classes 0, or its preset is
# named so (sit-b2-uncond, ...; samples written before num_classes was recorded)
REQUIRED = ("group", "method", "model", "steps", "fid", "source")
# The fields that make a comparison honest (baselines.yaml's header; null: the source does not say)
LATENTS = ("sd-vae", "va-vae", "e2e-vae", "rae-dinov2-b", "rae", "pixels", "stand-in", "other")
GUIDANCE_METHODS = ("none", "cfg", "cfg+interval", "autoguidance", "path-drop", "other")
LABELS = ("random", "balanced")
REFERENCES = ("adm", "other")  # adm: ADM's reference batch (VIRTUAL_imagenet256_labeled.npz at 256 px)
CHOICES = {"latent": LATENTS, "guidance_method": GUIDANCE_METHODS, "labels": LABELS, "reference": REFERENCES}
LATENT_NAMES = ((("e2e", "end-to-end"), "e2e-vae"), (("sd-vae",), "sd-vae"), (("va-vae", "vavae"), "va-vae"))
STEPS_SAMPLER = re.compile(r"(?:SDE Euler-Maruyama|ODE Euler|DDPM) (\d+)")  # one network evaluation per step
METRICS = (("FID", "fid", "{:.2f}"), ("sFID", "sfid", "{:.2f}"), ("IS", "is", "{:.1f}"),
           ("Prec", "precision", "{:.3f}"), ("Rec", "recall", "{:.3f}"))


class CompareError(InputError, ValueError):
    """An input that compare cannot read."""


def validate_baselines(data: dict) -> list[str]:
    """Problems with the baselines file's schema (empty when it is valid)."""
    problems = []
    for i, row in enumerate(data.get("rows", [])):
        row = {"conditioning": CONDITIONINGS[0], **data.get("defaults", {}), **row}
        missing = [k for k in REQUIRED if k not in row or (row[k] in (None, "") and k != "steps")]
        if missing:
            problems.append(f"row {i} ({row.get('method')}): missing {', '.join(missing)}")
        if row.get("group") not in GROUPS:
            problems.append(f"row {i}: unknown group {row.get('group')!r}")
        if row.get("conditioning") not in CONDITIONINGS:
            problems.append(f"row {i}: conditioning {row.get('conditioning')!r}, expected one of "
                            f"{', '.join(CONDITIONINGS)}")
        for _, key, _ in METRICS:
            if row.get(key) is not None and not isinstance(row[key], (int, float)):
                problems.append(f"row {i}: {key} is not a number")
        problems += _field_problems(i, row)
    return problems


def _field_problems(i: int, row: dict) -> list[str]:
    """Problems with a row's comparison fields (latent, guidance_method, labels, reference, sampler, nfe, cfg,
    also_in); each optional, null meaning "not stated"."""
    problems = []
    for key, allowed in CHOICES.items():
        if row.get(key) is not None and row[key] not in allowed:
            problems.append(f"row {i} ({row.get('method')}): {key} {row[key]!r} unknown, expected one of "
                            f"{', '.join(allowed)} or null")
    if row.get("sampler") is not None and not isinstance(row["sampler"], str):
        problems.append(f"row {i} ({row.get('method')}): sampler {row['sampler']!r} is not text")
    nfe = row.get("nfe")
    if nfe is not None and not (isinstance(nfe, int) and not isinstance(nfe, bool) and nfe > 0):
        problems.append(f"row {i} ({row.get('method')}): nfe {nfe!r} is not a positive whole number")
    if row.get("cfg") is not None and not isinstance(row["cfg"], dict):
        problems.append(f"row {i} ({row.get('method')}): cfg {row['cfg']!r} is not a mapping or null")
    also = row.get("also_in", [])
    if not isinstance(also, list) or any(g not in GROUPS for g in also):
        problems.append(f"row {i} ({row.get('method')}): also_in {also!r}, expected a list of {', '.join(GROUPS)}")
    return problems


def latent_of(decoder) -> str | None:
    """The latent space a decoder name implies: sd-vae-ft-ema/-mse -> 'sd-vae', VA-VAE -> 'va-vae', an end-to-end
    tuned VAE (E2E-...) -> 'e2e-vae', the random 'tiny' test VAE -> 'stand-in'; None when the name says nothing."""
    name = str(decoder or "").lower()
    for needles, latent in LATENT_NAMES:  # an E2E-VAVAE is end-to-end tuned: that first
        if any(needle in name for needle in needles):
            return latent
    return "stand-in" if name.rstrip("/").rsplit("/", 1)[-1] == "tiny" else None


def guidance_method_of(cfg) -> str:
    """A guidance mapping's method: 'none' without one, 'cfg+interval' when it acts on an interval other than
    [0, 1], else 'cfg'."""
    if not cfg:
        return "none"
    interval = cfg.get("interval")
    return "cfg+interval" if interval is not None and [float(x) for x in interval] != [0.0, 1.0] else "cfg"


def nfe_of_sampler(sampler) -> int | None:
    """Network evaluations per sample a published sampler text states: 'SDE Euler-Maruyama 250', 'ODE Euler 50',
    'DDPM 250' -> the steps; None for any other text (Heun and multistep solvers count differently)."""
    match = STEPS_SAMPLER.fullmatch(str(sampler or ""))
    return int(match.group(1)) if match else None


def _comparison_fields(row: dict) -> dict:
    """The row with latent, guidance_method and nfe filled in where it does not give them (from its decoder, cfg
    and sampler), and no labels when unconditional."""
    derived = {"latent": lambda: latent_of(row.get("decoder")), "guidance_method": lambda: guidance_method_of(
        row.get("cfg")), "nfe": lambda: nfe_of_sampler(row.get("sampler"))}
    row = {**{key: make() for key, make in derived.items() if key not in row}, **row}
    return {**row, "labels": None} if is_unconditional(row) else row


def load_baselines(groups: list[str] | None = None) -> list[dict]:
    """Published rows of the chosen groups (all when None; a row's ``also_in`` adds groups), defaults filled in."""
    data = yaml.safe_load(BASELINES.read_text())
    rows = [_comparison_fields({"conditioning": CONDITIONINGS[0], **data["defaults"], **row, "ours": False})
            for row in data["rows"]]
    return [r for r in rows if groups is None or {r["group"], *r.get("also_in", [])} & set(groups)]


METRIC_KEYS = ("fid", "sfid", "inception_score", "precision", "recall")
MAX_COUNT = 10**15  # sample counts and training steps: far above any run, small enough to format and plot


def read_json(path: Path):
    """The JSON value in ``path``, read defensively (evaluation.fileio.read_json_value, its 64 MiB limit): an
    InputError naming the file when it is too large, not JSON, nested too deeply for the parser, or holds a number
    Python cannot hold."""
    return read_json_value(path, what="metrics file from `reglue eval --json`")


def _finite(value) -> bool:
    """A JSON number that is a finite float (a huge integer is not: formatting it would overflow)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_COUNT


def _check_numbers(path: Path, m: dict) -> None:
    """CompareError unless every metric present is a finite number (``fid`` required), ``n`` and the training
    step counts, and ``sample_info`` a mapping."""
    for key in METRIC_KEYS:
        value = m.get(key)
        if (value is not None or key == "fid") and not _finite(value):
            shown = repr(value) if len(repr(value)) <= 40 else f"{repr(value)[:20]}... ({len(repr(value))} chars)"
            raise CompareError(f"{path}: '{key}' is {shown}, expected a number (a finite one, as in a metrics file "
                               "from `reglue eval --json`)")
    if not isinstance(m.get("sample_info", {}), dict):
        raise CompareError(f"{path}: 'sample_info' is not a mapping")
    for where, key in ((m, "n"), (m.get("sample_info", {}), "step")):
        if where.get(key) is not None and not _count(where[key]):
            raise CompareError(f"{path}: '{key}' is not a count in 0..{MAX_COUNT:.0e}")


def _row_from_metrics(path: Path, label: str, m: dict | None = None) -> dict:
    """Our row of metrics file ``path`` (its content ``m``, read here when not given)."""
    m = read_json(path) if m is None else m
    _check_numbers(path, m)
    info = m.get("sample_info", {})
    settings = info.get("settings", {})
    guidance = settings.get("guidance", {})
    cfg = None
    if guidance and (guidance.get("scale", 1) != 1 or guidance.get("cls_scale", 1) != 1):
        cfg = {"scale": guidance["scale"], "cls_scale": guidance.get("cls_scale"), "channels": guidance["channels"],
               "interval": guidance.get("interval")}
    kind = settings.get("sampler", "unknown")
    steps = settings.get("steps")
    sampler = f"SDE Euler-Maruyama {steps}" if kind == "sde" else f"{kind} {steps}"
    shift = settings.get("time_shift")
    sampler += f", time shift {shift:g}" if _finite(shift) and shift != 1 else ""
    stand_in = info.get("decoder") == "tiny" or str(info.get("preset", "")).startswith("tiny") or \
        bool(info.get("stand_ins")) or not is_published_weights(m.get("inception_weights_sha256", ""))
    unconditional = info.get("num_classes") == 0 or str(info.get("preset", "")).endswith(UNCOND_PRESET_SUFFIX)
    conditioning = CONDITIONINGS[1] if unconditional else CONDITIONINGS[0]
    return {"group": "ours", "method": label, "model": info.get("preset", "?"), "steps": info.get("step"),
            "epochs": None, "fid": m["fid"], "sfid": m.get("sfid"), "is": m.get("inception_score"),
            "precision": m.get("precision"), "recall": m.get("recall"), "sampler": sampler, "cfg": cfg,
            "decoder": decoder_name(info.get("decoder", "?")), "samples": m.get("n"), "evaluator": "ADM (reglue eval)",
            "source": str(path), "note": None, "conditioning": conditioning, "ours": True, "stand_in": stand_in,
            "ema": ema_label(info.get("ema")),
            "reference_sha256": m.get("reference_sha256"), "inception_sha256": m.get("inception_weights_sha256"),
            **our_comparison_fields(m, unconditional)}


def our_comparison_fields(m: dict, unconditional: bool = False) -> dict:
    """Latent, guidance method, labels, reference, NFE of our metrics ``m`` (from its sample_info); None where the
    file does not say. ``evaluations``: the samples' own count of model evaluations (guided passes counted twice),
    when they record it."""
    info = m.get("sample_info", {})
    settings = info.get("settings", {}) if isinstance(info.get("settings"), dict) else {}
    decoder = info.get("decoder")
    stand_ins = info.get("stand_ins") if isinstance(info.get("stand_ins"), list) else []
    stand_in = decoder == "tiny" or bool({"decoder", "vae"} & set(map(str, stand_ins)))
    latent = "stand-in" if stand_in else latent_of(decoder) or ("other" if decoder else None)
    labels = None if unconditional or not settings else "balanced" if settings.get("balanced") else "random"
    return {"latent": latent, "guidance_method": _our_guidance_method(settings), "labels": labels,
            "reference": reference_kind(m.get("reference_sha256"), m.get("reference")),
            "nfe": steps_nfe(settings.get("sampler"), settings.get("steps")),
            "evaluations": info.get("nfe") if _count(info.get("nfe")) else None}


def _our_guidance_method(settings: dict) -> str | None:
    """'none' when both scales are 1, 'autoguidance' with a guide model (``reglue sample --guide-ckpt``),
    'cfg+interval' when guidance acts on an interval other than [0, 1], else 'cfg'; None when the samples record no
    settings."""
    if not settings:
        return None
    guidance = settings.get("guidance") or {}
    if guidance.get("scale", 1) == 1 and guidance.get("cls_scale", 1) in (1, None):
        return "none"
    return "autoguidance" if settings.get("guide") else guidance_method_of({"interval": guidance.get("interval")})


def steps_nfe(sampler, steps) -> int | None:
    """Network evaluations per sample for ``reglue sample``'s steps, guidance's second pass not counted: the SDE and
    the Euler ODE evaluate once a step, our Heun twice (its corrector runs on the last step too); None when the
    sampler or steps are not known."""
    if not _count(steps) or not steps:
        return None
    return {"sde": steps, "ode-euler": steps, "ode-heun": 2 * steps}.get(sampler)


def reference_kind(sha256, path) -> str | None:
    """'adm' when a reference batch is one of the registry's (ADM's VIRTUAL_imagenet*.npz): its sha256 is a
    registered one, or, for an entry whose sha256 is not yet recorded, its file has that entry's name; 'other'
    otherwise; None when the metrics name no reference."""
    if not sha256 and not path:
        return None
    sha256 = str(sha256) if sha256 else None
    entries = registry().values()
    if sha256 and sha256 in {e.get("sha256") for e in entries if e.get("sha256")}:
        return "adm"
    unverified = {e.get("file") for e in entries if not e.get("sha256")}
    return "adm" if path and Path(str(path)).name in unverified else "other"


def ema_label(ema) -> str | None:
    """The average of the weights a row's samples came from, as the table shows it: '0.9999' (a classic decay),
    'post-hoc 0.08' (sigma_rel, `reglue ema`), 'raw' (no EMA); None when the samples do not say."""
    if not isinstance(ema, dict):
        return None
    kind = ema.get("kind")
    if kind == "classic":
        return f"{ema.get('decay'):g}" if isinstance(ema.get("decay"), (int, float)) else "classic"
    if kind == "post-hoc":
        return f"post-hoc {ema.get('sigma_rel'):g}" if isinstance(ema.get("sigma_rel"), (int, float)) else "post-hoc"
    return "raw" if kind == "none" else None


def is_unconditional(row: dict) -> bool:
    """Whether a row's number is for unconditional generation (no class labels)."""
    return row.get("conditioning") == "unconditional"


def method_label(row: dict) -> str:
    """The row's method, marked ' [uncond]' when unconditional: never an unmarked unconditional number."""
    return str(row["method"]) + (UNCOND_MARK if is_unconditional(row) else "")


def decoder_name(decoder: str) -> str:
    """The decoder as the baselines name it: 'stabilityai/sd-vae-ft-ema' or a folder .../sd-vae-ft-ema ->
    'sd-vae-ft-ema'."""
    return str(decoder).rstrip("/").rsplit("/", 1)[-1] or str(decoder)


def load_ours(paths: list[str]) -> list[dict]:
    """Rows from `reglue eval --json` files, or from every such file under run directories."""
    rows = []
    for given in map(Path, paths):
        if not given.exists():
            raise CompareError(f"{given}: no such file or directory")
        files = [given] if given.is_file() else sorted(given.rglob("*.json"))
        for f in files:
            try:
                data = read_json(f)
            except InputError:
                if f == given:
                    raise
                continue  # another program's file inside a run directory
            if isinstance(data, dict) and "fid" in data:
                rows.append(_row_from_metrics(f, given.name if given.is_dir() else f.parent.name or f.stem, data))
            elif f == given:
                raise CompareError(f"{f}: not a metrics file from `reglue eval --json` (no 'fid')")
        if given.is_dir() and not any(r["source"].startswith(str(given)) for r in rows) and not load_alignment([given]):
            raise CompareError(f"{given}: no metrics.json from `reglue eval --json` inside")
    return rows


def _family(sampler: str) -> str:
    """SDE, ODE (Euler, Heun, DPM-Solver) or DDPM: the kind of a sampler text."""
    s = sampler.lower()
    return "SDE" if "sde" in s else "ODE" if any(k in s for k in ("ode", "heun", "dpm")) else \
        "DDPM" if "ddpm" in s else s


def caveats(rows: list[dict]) -> list[str]:
    """What makes the numbers in ``rows`` not directly comparable (baselines.md, section 2d)."""
    notes = []
    families = sorted({_family(r["sampler"]) for r in rows if r.get("sampler")})
    if len(families) > 1:
        notes.append(f"Samplers differ ({', '.join(families)}): SiT-XL/2's 8.3 is an SDE number, its ODE gives ~9.5 "
                     "(SiT #31); compare SDE with SDE.")
    unconditional = sum(map(is_unconditional, rows))
    if 0 < unconditional < len(rows):
        notes.append("Unconditional and class-conditional numbers are mixed (rows marked [uncond]): an unconditional "
                     "FID is not comparable with a class-conditional one (SiT-B/2 @400K: 59.8 vs 33.0).")
    guided = [r for r in rows if r["cfg"]]
    if guided and len(guided) < len(rows):
        notes.append("Guided and unguided numbers are mixed: a CFG FID is not comparable with one without CFG.")
    channel_sets = sorted({str(r["cfg"]["channels"]) for r in guided if r["cfg"].get("channels")})
    if len(channel_sets) > 1:
        notes.append(f"Guidance touches different channels ({', '.join(channel_sets)}); guidance intervals differ too.")
    if any(r["cfg"] and r["cfg"].get("interval") for r in guided):
        notes.append("Guidance intervals use t = 1 as noise (REPA/REG/REGLUE): 'high 0.7' leaves the noisiest 30% "
                     "unguided; SiT and LightningDiT run time the other way.")
    emas = sorted({str(r["ema"]) for r in rows if r["ours"] and r.get("ema")})
    if len(emas) > 1:
        notes.append(f"Our rows average the weights differently (EMA {', '.join(emas)}): the EMA length alone moves "
                     "FID by more than most differences between methods (docs/ema.md).")
    decoders = sorted({str(r["decoder"]) for r in rows if r.get("decoder")})
    if len(decoders) > 1:
        notes.append(f"VAE decoders differ ({', '.join(decoders)}).")
    counts = sorted({r["samples"] for r in rows if r["samples"]})
    if counts != [50000]:
        notes.append(f"Sample counts differ from 50,000 ({', '.join(f'{c:,}' for c in counts)}): FID is biased upward "
                     "for small N.")
    if any(r["steps"] is None or r.get("epochs") for r in rows):
        notes.append("Steps and epochs are mixed: 80 epochs = 400K steps at batch 256; LightningDiT trains at 1024.")
    if any(r.get("stand_in") for r in rows):
        notes.append("Rows marked '!' were computed with stand-ins (a tiny or toy VAE/VFM, or Inception weights "
                     "other than the published file): not comparable to papers.")
    notes += field_caveats(rows)
    if any(r["ours"] for r in rows):
        notes.append("Reruns of one baseline vary by 1-3 FID (REPA SiT-B/2: 24.4 published, 22.38-27.33 rerun).")
    return notes


FIELD_CAVEATS = (  # (field, what differs, why it matters): one caveat each when published rows differ from ours
    ("latent", "Latent spaces differ",
     "FID scores the whole system, its autoencoder included; a number from another latent space ranks systems, not "
     "the method on our latents."),
    ("guidance_method", "Guidance methods differ",
     "plain CFG, interval CFG, autoguidance and path-drop guidance reach different FIDs from one model; compare like "
     "with like."),
    ("labels", "Label sampling differs",
     "balanced labels (N/1000 per class, `reglue sample --balanced`) lower FID by about 0.1 against uniform random "
     "ones."),
    ("reference", "Reference statistics differ",
     "an FID against another batch than ADM's VIRTUAL_imagenet256_labeled.npz is on another scale."),
    ("nfe", "Sampler NFE differs",
     "network evaluations per sample for the sampler's steps (Euler and SDE: the steps; our Heun: twice the steps; "
     "guidance's extra pass not counted); fewer evaluations usually cost FID."),
)


def _values_text(values) -> str:
    """Distinct values of a field, in order (numbers by size), joined."""
    return ", ".join(map(str, sorted(values, key=lambda v: (isinstance(v, str), v))))


def field_caveats(rows: list[dict]) -> list[str]:
    """One caveat per comparison field (FIELD_CAVEATS) whose values differ between our rows and the published rows
    shown, naming both sides' values; none without both kinds of rows, and none for a field all rows that state it
    share (null, "not stated", never counts as a difference; the caveat says how many published rows leave it out)."""
    ours = [r for r in rows if r["ours"]]
    published = [r for r in rows if not r["ours"]]
    notes = []
    for key, what, why in FIELD_CAVEATS:
        mine = {r.get(key) for r in ours} - {None}
        theirs = {r.get(key) for r in published} - {None}
        if not mine or not theirs or len(mine | theirs) == 1:
            continue
        unstated = sum(r.get(key) is None for r in published)
        left_out = f"; not stated for {unstated} published row{'s' * (unstated > 1)}" if unstated else ""
        notes.append(f"{what} ({_values_text(mine)} for ours; {_values_text(theirs)} for published rows{left_out}): "
                     f"{why}")
    return notes


def _cfg_cell(cfg) -> str:
    """A guidance mapping as the table shows it: its scale ('?' when not stated) and the channels it touches."""
    if not cfg:
        return "-"
    scale = "?" if cfg.get("scale") is None else str(cfg["scale"])
    return f"{scale} ({cfg['channels']})" if cfg.get("channels") else scale


def _cells(row: dict) -> list[str]:
    """One table row: marks, method, model, steps (epochs when only they are known), metrics, guidance, the
    comparison fields ('?' where not stated), EMA, source."""
    mark = ("*" if row["ours"] else "") + ("!" if row.get("stand_in") else "")
    steps = "-" if row["steps"] is None else f"{row['steps'] / 1000:g}K"
    steps = f"{row['epochs']} ep" if row["steps"] is None and row.get("epochs") else steps
    metrics = ["-" if row.get(key) is None else fmt.format(row[key]) for _, key, fmt in METRICS]
    fields = ["?" if row.get(key) is None else str(row[key]) for key in COMPARISON_COLUMNS.values()]
    return [mark, method_label(row), str(row["model"]), steps, *metrics, _cfg_cell(row["cfg"]), *fields,
            row.get("ema") or "-", row["source"]]


COMPARISON_COLUMNS = {"guidance": "guidance_method", "latent": "latent", "labels": "labels", "ref": "reference",
                      "NFE": "nfe"}
HEADER = ["", "method", "model", "steps", *[name for name, _, _ in METRICS], "CFG", *COMPARISON_COLUMNS, "EMA",
          "source"]


def format_rows(rows: list[dict], fmt: str = "table") -> str:
    """The rows as an aligned text table, markdown, csv or json, caveats under the text forms."""
    if fmt == "json":
        return json.dumps({"rows": rows, "caveats": caveats(rows)}, indent=2, default=str)
    cells = [_cells(r) for r in rows]
    if fmt == "csv":
        buffer = io.StringIO()
        csv.writer(buffer).writerows([HEADER, *cells])
        return buffer.getvalue()
    notes = "\n".join(f"- {c}" for c in caveats(rows))
    if fmt == "markdown":
        lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
        lines += ["| " + " | ".join(c) + " |" for c in cells]
        return "\n".join(lines) + ("\n\nCaveats:\n" + notes if notes else "")
    widths = [max(len(str(x)) for x in column) for column in zip(HEADER, *cells)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip() for line in [HEADER, *cells]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    legend = "* our runs (reglue eval); ! stand-ins (random-weight or toy models)"
    return "\n".join(lines) + f"\n{legend}" + ("\n\nCaveats:\n" + notes if notes else "")


SERIES_KEYS = (("reference_sha256", "ref"), ("inception_sha256", "inception"), ("samples", "N"))  # what splits a curve
SHORT_SHA = 8  # hex digits of a sha256 in a legend
OURS_COLOURS = ("black", "crimson", "navy", "darkgreen", "darkorange")


def _series_part(key: str, value) -> str:
    if value is None:
        return "?"
    return f"{value:,}" if key == "samples" else str(value)[:SHORT_SHA]


def series(rows: list[dict]) -> list[dict]:
    """Our runs' curves: one per (method, reference sha256, Inception weights sha256, N), never joining points
    scored against another reference or evaluator. Each is {"label", "points": [(steps, fid), ...]}; with more
    than one curve, the labels name whichever of reference, weights and N differ between them."""
    ours = [r for r in rows if r["ours"] and r["steps"]]
    groups: dict[tuple, list] = {}
    for r in ours:
        groups.setdefault((method_label(r), *(r.get(key) for key, _ in SERIES_KEYS)), []).append(r)
    varying = [i for i, _ in enumerate(SERIES_KEYS) if len({key[1 + i] for key in groups}) > 1]
    out = []
    for key in sorted(groups, key=lambda k: tuple(map(str, k))):
        parts = ["ours"] + [f"{SERIES_KEYS[i][1]} {_series_part(SERIES_KEYS[i][0], key[1 + i])}" for i in varying]
        out.append({"label": f"{key[0]} ({', '.join(parts)})",
                    "points": sorted((r["steps"], r["fid"]) for r in groups[key])})
    return out


# with the method: what one published curve shares
PUBLISHED_SERIES_KEYS = ("model", "sampler", "decoder", "cfg", "guidance_method")
RANKED_ROW_INCHES = 0.3  # one row of the ranked chart: 9 pt labels never touch
RANKED_EXTRA_INCHES = 1.5  # its title, x axis and label
CURVES_INCHES = 4.2
FIGURE_WIDTH = 11.0
STAND_IN_TITLE = "Stand-in numbers (random-weight evaluators or tiny stand-ins): not comparable to the paper"
PAPER_TITLE = "Published numbers and our runs scored with the published evaluator"
STAND_IN_FACE = "#fff3e0"  # the stand-in panel's background, so it never reads as the paper's axis
PUBLISHED_STYLE = {"color": "steelblue", "marker": "o", "markersize": 6}
OURS_STYLE = {"color": "crimson", "marker": "D", "markersize": 8}


def _steps_text(steps) -> str:
    """Training steps, short: 400000 -> '400K', 1750000 -> '1.75M', 100 -> '100', None -> '? steps'."""
    if not steps:
        return "? steps" if steps is None else str(steps)
    if steps >= 1_000_000:
        return f"{steps / 1_000_000:g}M"
    return f"{steps / 1000:g}K" if steps >= 1000 else str(steps)


def _point_order(point) -> tuple:
    """Points by training steps, a point without steps last."""
    return (point[0] is None, point[0] or 0, point[1])


def _published_series(rows: list[dict]) -> list[dict]:
    """The published rows as series, one per (method, model, sampler, decoder, guidance); a label names the model
    when the rows span several, the guidance scale when guided, and sampler and decoder when still ambiguous."""
    published = [r for r in rows if not r["ours"]]
    several_models = len({r["model"] for r in published}) > 1
    groups: dict[tuple, list] = {}
    for r in published:
        groups.setdefault((method_label(r), *(repr(r.get(k)) for k in PUBLISHED_SERIES_KEYS)), []).append(r)
    out = []
    for members in groups.values():
        first = members[0]
        label = method_label(first) + (f" ({first['model']})" if several_models else "")
        if first.get("cfg"):
            scale = first["cfg"].get("scale")
            label += f", CFG {scale}" if scale is not None else f", {first.get('guidance_method') or 'guided'}"
        out.append({"label": label, "ours": False, "sampler": first.get("sampler"), "decoder": first.get("decoder"),
                    "points": sorted(((r["steps"], r["fid"]) for r in members), key=_point_order)})
    labels = Counter(s["label"] for s in out)
    for s in out:
        if labels[s["label"]] > 1:
            s["label"] += f", {s['sampler']}, {s['decoder']}"
    return out


def _our_series(rows: list[dict]) -> list[dict]:
    """Our runs as series: those of ``series``, and one point per row without a training step."""
    out = [{**curve, "ours": True} for curve in series(rows)]
    return out + [{"label": f"{method_label(r)} (ours)", "ours": True, "points": [(r["steps"], r["fid"])]}
                  for r in rows if r["ours"] and not r["steps"]]


def panels(rows: list[dict]) -> list[tuple[str, list[dict]]]:
    """("paper", series) for the published rows and our runs scored with the published evaluator, then
    ("stand-in", series) for rows marked ``stand_in`` (random-weight Inception, tiny VAE or preset): their numbers
    never share the paper's axis. Only panels with rows."""
    parts = (("paper", [r for r in rows if not r.get("stand_in")]),
             ("stand-in", [r for r in rows if r.get("stand_in")]))
    return [(name, _published_series(part) + _our_series(part)) for name, part in parts if part]


def is_curve(one_series: dict) -> bool:
    """Whether a series has points at several training lengths (drawn as a curve; one point is ranked)."""
    return len({steps for steps, _ in one_series["points"] if steps}) > 1


def ranking_length(all_series: list[dict]):
    """The training length most points share (the longer on a tie); None when no point has one."""
    counts = Counter(steps for s in all_series for steps, _ in s["points"] if steps)
    return max(counts, key=lambda steps: (counts[steps], steps)) if counts else None


def ranked(all_series: list[dict]) -> list[dict]:
    """The ranked chart's rows, lowest FID first: every point of a one-length series, and with them each curve's
    point at the ranking length (and any curve point without steps). A row's label names its training length
    when that is not the ranking length. Each row is {"label", "fid", "ours", "steps"}."""
    length = ranking_length(all_series)
    any_single = any(not is_curve(s) for s in all_series)
    rows = []
    for s in all_series:
        for steps, fid in s["points"]:
            if not is_curve(s) or not steps or (any_single and steps == length):
                suffix = "" if steps == length else f" @ {_steps_text(steps)}"
                rows.append({"label": s["label"] + suffix, "fid": fid, "ours": s["ours"], "steps": steps})
    return sorted(rows, key=lambda row: (row["fid"], row["label"]))


def _ranked_title(entries: list[dict], length) -> str:
    """What the ranked chart shows: one training length, or mostly one (the others named in the labels)."""
    if length is not None and all(e["steps"] == length for e in entries):
        return f"FID at {_steps_text(length)} training steps, ranked (lower is better)"
    return "FID ranked (lower is better)" + (f"; rows not at {_steps_text(length)} steps name theirs" if length else "")


def _draw_ranked(ax, entries: list[dict], title: str) -> None:
    """A ranked dot chart: one row per entry (its label the y tick), best on top, our runs in red diamonds."""
    from matplotlib.lines import Line2D

    for y, entry in enumerate(entries):
        style = OURS_STYLE if entry["ours"] else PUBLISHED_STYLE
        ax.hlines(y, 0, entry["fid"], color=style["color"], alpha=0.25, linewidth=1)
        ax.plot(entry["fid"], y, linestyle="none", zorder=3, **style)
        ax.annotate(f"{entry['fid']:.2f}", (entry["fid"], y), xytext=(7, 0), textcoords="offset points",
                    va="center", fontsize=8)
    ax.set_yticks(range(len(entries)), [e["label"] for e in entries], fontsize=9)
    for tick, entry in zip(ax.get_yticklabels(), entries):
        if entry["ours"]:
            tick.set_color(OURS_STYLE["color"])
            tick.set_fontweight("bold")
    ax.set_ylim(len(entries) - 0.5, -0.5)  # the lowest FID on top
    ax.set_xlim(0, max(max(e["fid"] for e in entries) * 1.15, 1e-6))
    ax.set_xlabel("FID (lower is better)")
    ax.grid(True, axis="x", alpha=0.3)
    ax.set_title(title, fontsize=10, loc="left")
    if any(e["ours"] for e in entries):
        handles = [Line2D([], [], linestyle="none", **PUBLISHED_STYLE, label="published"),
                   Line2D([], [], linestyle="none", **OURS_STYLE, label="our runs")]
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)


def _label_log_axis(axis, limits) -> None:
    """Steps on a log axis: every decade labelled, and within a decade every digit when under 0.6 decades show,
    2, 3 and 5 up to 1.5 decades, 2 and 5 up to 3 (the labels never crowd)."""
    import matplotlib.ticker as ticker

    decades = math.log10(max(limits) / min(limits))
    digits = "123456789" if decades <= 0.6 else "235" if decades <= 1.5 else "25" if decades <= 3 else ""
    axis.set_major_formatter(ticker.FuncFormatter(lambda value, _: _steps_text(round(value))))
    axis.set_minor_formatter(ticker.FuncFormatter(
        lambda value, _: _steps_text(round(value)) if f"{value:.6e}"[0] in digits else ""))


def _fid_text(value, _) -> str:
    """An FID tick: 3, 12.5, 40."""
    return f"{value:g}"


def _draw_curves(ax, curves: list[dict], title: str) -> None:
    """FID against training steps (log axes): published series dashed, our runs solid; the legend beside."""
    import matplotlib
    import matplotlib.ticker as ticker

    palette = matplotlib.colormaps["tab10"]
    published = [c for c in curves if not c["ours"]]
    ours = [c for c in curves if c["ours"]]
    for i, curve in enumerate(published):
        ax.plot(*zip(*[p for p in curve["points"] if p[0]]), linestyle="--", linewidth=1.2, marker="s", markersize=5,
                color=palette(i % 10), label=f"{curve['label']} (published)")
    for i, curve in enumerate(ours):
        ax.plot(*zip(*[p for p in curve["points"] if p[0]]), marker="o", markersize=7, linewidth=2.5, zorder=5,
                color=OURS_COLOURS[i % len(OURS_COLOURS)], label=curve["label"])
    ax.set_xscale("log")
    _label_log_axis(ax.xaxis, ax.get_xlim())
    fids = [fid for c in curves for steps, fid in c["points"] if steps]
    if min(fids) > 0 and max(fids) / min(fids) >= 4:  # a narrower range reads better on a linear axis
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(_fid_text))
        ax.yaxis.set_minor_formatter(ticker.FuncFormatter(
            lambda value, _: _fid_text(value, _) if f"{value:.6e}"[0] in "235" else ""))
    ax.set_xlabel("training steps (published runs: batch 256)" if published else "training steps")
    ax.set_ylabel("FID")
    ax.set_title(title, fontsize=10, loc="left")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)


def fid_figure(rows: list[dict], alignment: list[dict] | None = None):
    """The FID figure: per panel (the paper's axis, then stand-in numbers apart) a ranked dot chart of the points at
    one training length and FID-against-steps curves for series with several; under them our runs' alignment
    against steps (``alignment``: load_alignment's curves); its height grows with the rows."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    charts = []  # (panel, draw, data, title, height in inches)
    parts = panels(rows)
    for name, all_series in parts:
        prefix = f"{STAND_IN_TITLE}\n" if name == "stand-in" else f"{PAPER_TITLE}\n" if len(parts) > 1 else ""
        entries, curves = ranked(all_series), [s for s in all_series if is_curve(s)]
        if entries:
            charts.append((name, _draw_ranked, entries, prefix + _ranked_title(entries, ranking_length(all_series)),
                           RANKED_ROW_INCHES * len(entries) + RANKED_EXTRA_INCHES))
        if curves:
            charts.append((name, _draw_curves, curves, prefix + "FID against training steps", CURVES_INCHES))
    if alignment:
        charts.append(("alignment", _draw_alignment, alignment, ALIGNMENT_TITLE, CURVES_INCHES))
    heights = [chart[-1] for chart in charts]
    fig = Figure(figsize=(FIGURE_WIDTH, max(sum(heights), 2.0)), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    if not charts:
        fig.text(0.5, 0.5, "no FID to plot", ha="center")
        return fig
    axes = fig.subplots(len(charts), 1, squeeze=False, gridspec_kw={"height_ratios": heights})[:, 0]
    for ax, (name, draw, data, title, _) in zip(axes, charts):
        draw(ax, data, title)
        if name == "stand-in":
            ax.set_facecolor(STAND_IN_FACE)
    return fig


def plot_fid(rows: list[dict], path, alignment: list[dict] | None = None) -> Path:
    """Write ``fid_figure`` of ``rows`` (and the runs' ``alignment`` curves, load_alignment) to the PNG ``path``
    (atomically: a partial file, then a rename)."""
    fig = fid_figure(rows, alignment)
    path = Path(path)
    tmp = path.with_name(path.name + ".partial.png")
    fig.savefig(tmp)
    tmp.replace(path)
    return path


PROBE_FORMAT = "reglue-probe"  # `reglue probe` / `train --probe-every` records (RUN/probe/STEP.json)
ALIGNMENT_T = 0.5  # the noise level an alignment curve follows (the probe's level nearest to it)
ALIGNMENT_TITLE = f"Alignment with the VFM against training steps (CKNNA of the best block, t nearest {ALIGNMENT_T})"


def _alignment_point(data: dict) -> tuple[int, float] | None:
    """(step, the best block's CKNNA at the noise level nearest ALIGNMENT_T) of a probe record, or None when the
    record is not one or is damaged."""
    try:
        ts, table = [float(t) for t in data["t"]], data["metrics"]["cknna"]
        k = min(range(len(ts)), key=lambda i: abs(ts[i] - ALIGNMENT_T))
        value, step = max(float(row[k]) for row in table), int(data["step"])
    except (KeyError, TypeError, ValueError, IndexError):
        return None
    return (step, value) if _finite(value) and _count(step) else None


def load_alignment(paths: list[str]) -> list[dict]:
    """Our runs' alignment curves: per run directory among ``paths``, the probe records under it as (step, CKNNA)
    points; {"label", "points"} each, runs without probes left out."""
    curves = []
    for given in map(Path, paths):
        if not given.is_dir():
            continue
        points = []
        for f in sorted(given.rglob("*.json")):
            try:
                data = read_json(f)
            except InputError:
                continue
            if isinstance(data, dict) and data.get("format") == PROBE_FORMAT:
                point = _alignment_point(data)
                points += [point] if point else []
        if points:
            curves.append({"label": given.name, "points": sorted(set(points))})
    return curves


def _draw_alignment(ax, curves: list[dict], title: str) -> None:
    """CKNNA against training steps, one line per run."""
    for i, curve in enumerate(curves):
        ax.plot(*zip(*curve["points"]), marker="o", markersize=6, linewidth=2.0,
                color=OURS_COLOURS[i % len(OURS_COLOURS)], label=curve["label"])
    ax.set_xlabel("training steps")
    ax.set_ylabel("CKNNA")
    ax.set_title(title, fontsize=10, loc="left")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)


def features_distance(a, b, pr_precision: str = "fp32") -> dict:
    """FID, sFID, precision and recall between two `reglue eval --features` files (b is the reference side)."""
    import h5py
    import numpy as np
    import torch


    sets = []
    for path in (a, b):
        try:
            with h5py.File(path, "r") as f:
                sets.append({k: f[k][...] for k in ("pool", "spatial")})
        except (OSError, KeyError) as exc:
            raise CompareError(f"{path}: not a features file from `reglue eval --features` ({exc})") from None
    with deterministic_kernels(torch.device("cpu")):  # the statistics and algebra `reglue eval` computes, alike
        stats = [(statistics(f["pool"], "cpu").mean_cov(), statistics(f["spatial"], "cpu").mean_cov()) for f in sets]
        fid, sfid = side_by_side(lambda: frechet_distance(*stats[0][0], *stats[1][0], "eigh", torch.device("cpu")),
                                 lambda: frechet_distance(*stats[0][1], *stats[1][1], "eigh", torch.device("cpu")),
                                 device="cpu")
        prec, rec = precision_recall(torch.from_numpy(np.asarray(sets[1]["pool"])),
                                     torch.from_numpy(np.asarray(sets[0]["pool"])), precision=pr_precision)
    return {"fid": fid, "sfid": sfid, "precision": prec, "recall": rec, "a": str(a), "b": str(b)}
