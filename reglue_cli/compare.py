"""`reglue compare`: our evaluated runs beside the published numbers, as a table and a plot."""

from __future__ import annotations

import json
from pathlib import Path

import click

from evaluation.compare import (
    GROUPS,
    features_distance,
    format_rows,
    load_alignment,
    load_baselines,
    load_ours,
    plot_fid,
)
from reglue.fileio import atomic_write_text
from reglue_cli.errors import fail


@click.command(short_help="Tables of your runs beside the published REPA, ReDi, REG and REGLUE numbers.")
@click.argument("inputs", nargs=-1, type=click.Path())
@click.option("--baselines", default="sit-b2", show_default=True, metavar="GROUPS",
              help=f"Published rows to show: comma-separated of {', '.join(GROUPS)}, 'all' or 'none'.")
@click.option("--format", "fmt", type=click.Choice(["table", "markdown", "csv", "json"]), default="table",
              show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), help="Write the table here instead of printing it.")
@click.option("--plot", type=click.Path(dir_okay=False),
              help="Also draw the FIDs into this PNG: ranked at one training length, curves where a series has "
                   "several steps, stand-in numbers on their own panel; runs with probes (train --probe-every) add "
                   "their alignment against steps.")
def compare(inputs, baselines, fmt, out, plot) -> None:
    """Put INPUTS (run directories or `reglue eval --json` files) beside published numbers.

    \b
    Every published number carries its source; caveats are printed whenever rows differ in sampler, guidance,
    decoder, sample count or evaluator. Examples:
      reglue compare runs/b2 --baselines sit-b2 --plot fid.png
      reglue compare --baselines ablation --format markdown
    Two feature files from `reglue eval --features` give the distance between two sample sets:
      reglue compare a/features.h5 b/features.h5
    """
    if len(inputs) == 2 and all(Path(p).suffix in (".h5", ".hdf5") for p in inputs):
        result = features_distance(*inputs)  # an InputError is one line and exit 2 (reglue_cli.main)
        click.echo(json.dumps(result, indent=2) if fmt == "json" else
                   f"{inputs[0]} vs {inputs[1]}: FID {result['fid']:.4f}  sFID {result['sfid']:.4f}  "
                   f"precision {result['precision']:.4f}  recall {result['recall']:.4f}")
        return
    groups = None if baselines == "all" else [] if baselines == "none" else baselines.split(",")
    unknown = sorted(set(groups or []) - set(GROUPS))
    if unknown:
        fail(f"--baselines: unknown group(s) {', '.join(unknown)}; choose from {', '.join(GROUPS)}, all, none")
    rows = load_ours(list(inputs)) + load_baselines(groups)
    if not rows:
        fail("nothing to compare: give run directories or metrics files, or --baselines")
    text = format_rows(rows, fmt)
    if out:
        atomic_write_text(out, text + "\n")
        click.echo(f"wrote {out}")
    else:
        click.echo(text)
    if plot:
        try:
            plot_fid(rows, plot, load_alignment(list(inputs)))
        except ImportError:
            fail("--plot needs matplotlib: pip install 'reglue[plot]'")
        click.echo(f"plot: {plot}")
