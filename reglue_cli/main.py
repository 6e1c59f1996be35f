"""The `reglue` command: encode -> train -> sample -> eval -> compare."""

from __future__ import annotations

import os
import sys

import click

from evaluation.collectives import DEFAULT_TIMEOUT_S, TIMEOUT_ENV
from reglue.errors import UserError
from reglue_cli.compare import compare
from reglue_cli.ema import ema
from reglue_cli.encode import encode
from reglue_cli.errors import EXIT_USAGE, report
from reglue_cli.eval import eval_
from reglue_cli.make_ref import make_ref
from reglue_cli.probe import probe
from reglue_cli.sample import sample
from reglue_cli.sweep import sweep
from reglue_cli.train import train

EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT): the shell's 128 + signal number (docs/failures.md)


class PipelineGroup(click.Group):
    """Lists commands in pipeline order rather than alphabetically."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)


def _set_dist_timeout(ctx, param, value):
    """--dist-timeout SECONDS: the process group's timeout for the command that follows (REGLUE_DIST_TIMEOUT)."""
    if value is not None:
        os.environ[TIMEOUT_ENV] = str(value)
    return value


@click.group(cls=PipelineGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="reglue")
@click.option("--dist-timeout", type=click.IntRange(min=1, max=10**7 - 1), metavar="SECONDS", expose_value=False,
              is_eager=True, callback=_set_dist_timeout,
              help=f"Under torchrun: how long a collective waits for the slowest rank [default: ${TIMEOUT_ENV} or "
                   f"{DEFAULT_TIMEOUT_S} s]. Rank-0-only phases (merges, checkpoints) never count against it.")
def cli() -> None:
    """Train, sample and evaluate REGLUE latent diffusion models and their baselines (SiT, REPA, ReDi, REG).

    \b
    The pipeline, one command per arrow:
      images/ --encode--> data.h5 --train--> run/checkpoints/*.pt --sample--> samples.npz
      samples.npz --eval--> metrics.json --compare--> tables beside the published numbers
    Generate and score in one process: `eval --ckpt` (one setting), `sweep` (a grid of guidance settings),
    `train --eval-every N` (FID while training). ImageNet's reference batches are downloaded by name;
    `make-ref` builds one for another dataset or resolution. `ema` rebuilds any EMA length after training
    from a run's snapshots (post-hoc EMA); `probe` measures how each block aligns with the VFM.

    Run `reglue COMMAND --help` for the options of each step.
    """


for command in (encode, train, ema, sample, make_ref, eval_, sweep, probe, compare):
    cli.add_command(command)


def _command_name(argv: list[str]) -> str | None:
    return next((a for a in argv if a in cli.commands), None)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; every expected failure is one line on stderr and a non-zero exit code, never a traceback."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        cli.main(args=argv, prog_name="reglue", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except (click.exceptions.Abort, KeyboardInterrupt):  # click turns Ctrl-C into Abort
        return report(_command_name(argv), "interrupted (Ctrl-C, SIGINT)", EXIT_INTERRUPTED)
    except click.UsageError as exc:
        return report(_command_name(argv), exc.format_message(), EXIT_USAGE)
    except click.ClickException as exc:
        return report(_command_name(argv), exc.format_message(), exc.exit_code)
    except UserError as exc:  # bad input of any command: one line (any other exception is a bug: traceback)
        return report(_command_name(argv), str(exc), EXIT_USAGE)
    except OSError as exc:  # a path the commands did not check (permissions, a vanished file, a full disk)
        return report(_command_name(argv), _describe_os_error(exc), EXIT_USAGE if exc.filename else 1)
    return 0


def _describe_os_error(exc: OSError) -> str:
    """'<file>: <reason>' for an OSError about a file, else its message."""
    reason = exc.strerror or str(exc)
    return f"{exc.filename}: {reason}" if exc.filename else reason


def entry_point() -> None:
    """Console-script entry: ``reglue ...``."""
    sys.exit(main())


if __name__ == "__main__":
    entry_point()
