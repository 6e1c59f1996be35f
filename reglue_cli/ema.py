"""`reglue ema`: choose the EMA length after training (post-hoc EMA, EDM2): rebuild a power-function EMA of any
sigma_rel from a run's snapshots, list what the snapshots support, or say what a classic decay corresponds to."""

from __future__ import annotations

import click

from reglue import config as run_config
from reglue.ema.profiles import classic_sigma_rel
from reglue.ema.reconstruct import (
    MAX_RESIDUAL,
    fit_target,
    read_snapshots,
    reconstruct,
    supported_range,
    write_checkpoint,
)
from reglue.ema.snapshots import load_snapshot
from reglue_cli.errors import fail
from reglue_cli.help_sections import OptionGroup, SectionedCommand, option, with_options

TARGET = OptionGroup("Target", [
    option("--sigma-rel", type=float, metavar="S",
           help="The EMA length to rebuild: the profile's std relative to the training length (EDM2's 0.05, 0.10; "
                "see --list for what the snapshots support)."),
    option("--step", type=click.IntRange(min=1), help="The training step of the EMA [default: the last snapshot's]."),
    option("--max-residual", type=click.FloatRange(min=0), default=MAX_RESIDUAL, show_default=True,
           help="Refuse a target whose profile the snapshots reproduce only to a larger relative L2 error."),
])

OUTPUT = OptionGroup("Output", [
    option("--out", type=click.Path(dir_okay=False),
           help="The checkpoint to write (loads in sample, eval --ckpt and sweep like any other)."),
])

INSPECT = OptionGroup("Inspect", [
    option("--list", "list_", is_flag=True,
           help="List RUN_DIR's snapshots, the sigma_rel range they support and the run's classic EMA in sigma_rel."),
    option("--decay", type=click.FloatRange(min=0, max=1, max_open=True),
           help="With --at-step: the sigma_rel of a classic EMA of this decay (no RUN_DIR needed)."),
    option("--at-step", type=click.IntRange(min=1), help="The step of --decay's equivalence."),
])


@click.command(cls=SectionedCommand, short_help="Choose the EMA length after training (post-hoc EMA from snapshots).")
@click.argument("run_dir", required=False, type=click.Path(file_okay=False))
@with_options(TARGET, OUTPUT, INSPECT)
def ema(run_dir, sigma_rel, step, max_residual, out, list_, decay, at_step) -> None:
    """Rebuild the power-function EMA of length --sigma-rel at --step from RUN_DIR/ema/ snapshots and write it
    to --out (EDM2's post-hoc EMA: a least-squares combination of the tracked profiles; docs/ema.md).

    \b
    Train with snapshots (ema.sigma_rels, ema.snapshot_every), then:
      reglue ema runs/b2 --list                               # snapshots, supported range
      reglue ema runs/b2 --sigma-rel 0.08 --out runs/b2/ema-0.08.pt
      reglue sweep --ckpt runs/b2 --ema 0.04:0.16:0.02 --cfg 1.5:3.0:0.25 ...   # EMA x guidance
      reglue ema --decay 0.9999 --at-step 400000              # a classic decay in sigma_rel
    The fit's residual (the relative L2 error of the rebuilt profile) is printed; a target the snapshots
    cannot represent (beyond the last snapshot, too short or too long an EMA) is refused, saying why.
    """
    if decay is not None or at_step is not None:
        if decay is None or at_step is None:
            fail("--decay and --at-step go together: the classic EMA of DECAY at step AT_STEP")
        equivalent = classic_sigma_rel(decay, at_step)
        click.echo(f"classic EMA decay {decay:g} at step {at_step:,}: sigma_rel {equivalent:.4f}")
        if run_dir is None:
            return
    if run_dir is None:
        fail("RUN_DIR is missing: the training run whose ema/ snapshots to use")
    if list_:
        _list(run_dir, max_residual)
        return
    if sigma_rel is None:
        fail("give --sigma-rel S and --out CKPT (or --list)")
    snapshots = read_snapshots(run_dir)
    target = fit_target(snapshots, sigma_rel, step, max_residual)
    if out is None:
        fail(f"--out is missing: the checkpoint to write (sigma_rel {sigma_rel:g} at step {target.step} fits to a "
             f"relative error of {target.fit.residual:.2e})")
    weights = reconstruct(snapshots, [target])[0]
    path = write_checkpoint(target, weights, snapshots, run_dir, out)
    used = len({i for i, _ in target.members})
    click.echo(f"wrote {path}: sigma_rel {target.sigma_rel:g} at step {target.step:,} from {used} snapshot(s), "
               f"relative error of the profile {target.fit.residual:.2e}")


def _list(run_dir, max_residual: float) -> None:
    """The snapshot table, the supported range at the last step and the run's classic EMA in sigma_rel."""
    snapshots = read_snapshots(run_dir)
    click.echo(f"{'step':>9}  {'profiles (sigma_rel)':<24}{'precision':<11}{'MB':>9}")
    for s in snapshots:
        click.echo(f"{s.step:>9}  {', '.join(f'{v:g}' for v in s.sigma_rels):<24}{s.precision:<11}"
                   f"{s.size / 2**20:>9.1f}")
    last = snapshots[-1].step
    found = supported_range(snapshots, last, max_residual)
    click.echo(f"{len(snapshots)} snapshots, {sum(s.size for s in snapshots) / 2**30:.2f} GiB; at step {last:,} they "
               + ("support no sigma_rel in 0.01..0.28" if found is None else
                  f"support sigma_rel {found[0]:g} to {found[1]:g}") + f" (relative error <= {max_residual:g})")
    stored = load_snapshot(snapshots[-1].path)["config"]
    decay = run_config.from_dict(stored, stored=True).ema.decay
    click.echo(f"the run's classic EMA (decay {decay:g}) at step {last:,}: sigma_rel "
               f"{classic_sigma_rel(decay, last):.4f}")
