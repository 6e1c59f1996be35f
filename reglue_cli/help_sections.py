"""Options declared in named groups, and `--help` printed in one section per group name.

A command declares its options as ``OptionGroup("Inputs", [option(...), ...])`` and applies them with
``with_options(*groups)``; each option carries its group's title, and a ``SectionedCommand`` lists the options
under those titles (groups of the same title share one section, in the order the titles first appear). The
help option joins the ``RUN`` section. Hidden options (deprecated spellings) need no section.
"""

from __future__ import annotations

from dataclasses import dataclass

import click

from reglue_cli.errors import check_device

RUN = "Run"  # how the command runs (device, batch size, progress ...), and --help itself
COLUMN_MAX = 30  # click's widest first column; wider option names go on a line of their own


def option(*declarations: str, **attributes) -> tuple[tuple[str, ...], dict]:
    """One option's ``click.option`` arguments, to be placed in an OptionGroup."""
    return declarations, attributes


DEVICE_OPTION = option("--device", default=None, callback=check_device,
                       help="cpu, cuda ... [default: cuda when available]")
QUIET_OPTION = option("--quiet", is_flag=True, help="No progress bars.")


@dataclass(frozen=True)
class OptionGroup:
    """Options that belong together, and the --help section that lists them."""

    title: str
    options: list

    def __iter__(self):
        return iter(self.options)


class SectionOption(click.Option):
    """A click option that knows its --help section."""

    def __init__(self, *args, section: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.section = section


def with_options(*groups: OptionGroup):
    """Decorate a click command with the options of ``groups``, in the order listed, each tagged with its group's
    title."""
    options = [(group.title, declarations, attributes) for group in groups for declarations, attributes in group]

    def decorate(command):
        for title, declarations, attributes in reversed(options):
            command = click.option(*declarations, cls=SectionOption, section=title, **attributes)(command)
        return command
    return decorate


class SectionedCommand(click.Command):
    """A click command whose --help lists its options in named sections instead of one flat list."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        loose = [p.name for p in self.params if isinstance(p, click.Option) and not isinstance(p, SectionOption)
                 and not p.hidden]
        if loose:
            raise TypeError(f"command {self.name!r}: options {loose} are in no OptionGroup (use with_options)")

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """One section per option group title, in the order the titles are first declared; --help joins RUN."""
        sections: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is not None and isinstance(param, click.Option):
                sections.setdefault(getattr(param, "section", RUN), []).append(record)
        width = min(COLUMN_MAX, max((len(term) for records in sections.values() for term, _ in records), default=0))
        for title, records in sections.items():
            with formatter.section(title):
                formatter.write_dl(_aligned(records, width), col_max=COLUMN_MAX)


def _aligned(records: list[tuple[str, str]], width: int) -> list[tuple[str, str]]:
    """Records whose short terms are padded to ``width``, so that every section's help column starts alike."""
    return [(term.ljust(width) if text else term, text) for term, text in records]
