"""Commands whose implementation has not landed yet: each says so and exits 2."""

from __future__ import annotations

import click

from reglue_cli.errors import fail

_PASS_THROUGH = {"ignore_unknown_options": True, "allow_extra_args": True}


def _pending(name: str, summary: str, issue: int) -> click.Command:
    @click.command(name=name, help=f"{summary}\n\nNot built yet (tracked in issue #{issue}).",
                   short_help=summary, context_settings=_PASS_THROUGH)
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    def command(args: tuple[str, ...]) -> None:
        fail(f"`reglue {name}` is not built yet (issue #{issue})")

    return command


compare = _pending("compare", "Tables of your runs beside the published REPA, ReDi, REG and REGLUE numbers.", 7)
