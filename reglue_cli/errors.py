"""One-line errors and exit codes shared by every command."""

from __future__ import annotations

import sys

import click

from reglue.distributed import device_problem

EXIT_USAGE = 2  # bad input: wrong option, unreadable file, unknown preset


class CommandError(click.ClickException):
    """Bad input: printed as one line, exit code 2."""

    exit_code = EXIT_USAGE


def fail(message: str) -> None:
    """Raise a CommandError with ``message``."""
    raise CommandError(message)


def report(command: str | None, message: str, code: int = EXIT_USAGE) -> int:
    """Print ``reglue <command>: error: <message>`` on one line to stderr and return the exit code."""
    where = f"reglue {command}" if command else "reglue"
    first = " ".join(str(message).split())  # collapse newlines: one line, always
    sys.stderr.write(f"{where}: error: {first}\n")  # one write: lines of several torchrun ranks do not interleave
    sys.stderr.flush()
    return code


def check_device(ctx, param, value):
    """Click callback for --device: one line naming the problem when the device cannot be used here."""

    problem = device_problem(value)
    if problem:
        raise click.BadParameter(problem, ctx=ctx, param=param)
    return value
