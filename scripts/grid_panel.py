"""One picture of the demo's sample grids: a row per run, a column per checkpoint, the same seeds in every cell.

python scripts/grid_panel.py OUT.png RUN_DIR [RUN_DIR ...]  (reads RUN_DIR/samples-STEP/grid.png)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image, ImageDraw

CELL = 384  # each grid is shrunk to this side
GAP = 12  # between cells
MARGIN = 24  # room for the column labels
LEFT = 72  # room for the row labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("runs", type=Path, nargs="+")
    args = parser.parse_args()
    rows = {run: sorted(run.glob("samples-*/grid.png")) for run in args.runs}
    if not all(rows.values()):
        sys.exit(f"grid_panel.py: error: {next(r for r, g in rows.items() if not g)}: no samples-*/grid.png")
    steps = sorted({int(g.parent.name.split("-")[1]) for grids in rows.values() for g in grids})
    panel = Image.new("RGB", (LEFT + (CELL + GAP) * len(steps), MARGIN + (CELL + GAP) * len(rows)), "white")
    pen = ImageDraw.Draw(panel)
    for j, step in enumerate(steps):
        pen.text((LEFT + (CELL + GAP) * j + CELL // 2 - 30, 6), f"step {step:,}", fill="black")
    for i, (run, grids) in enumerate(rows.items()):
        pen.text((4, MARGIN + (CELL + GAP) * i + CELL // 2 - 6), run.name, fill="black")
        for grid in grids:
            j = steps.index(int(grid.parent.name.split("-")[1]))
            cell = Image.open(grid).convert("RGB").resize((CELL, CELL), Image.Resampling.LANCZOS)
            panel.paste(cell, (LEFT + (CELL + GAP) * j, MARGIN + (CELL + GAP) * i))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    partial = args.out.with_name(args.out.name + ".partial.png")
    panel.save(partial)
    partial.replace(args.out)
    print(f"{args.out}: {len(rows)} runs x {len(steps)} checkpoints")


if __name__ == "__main__":
    main()
