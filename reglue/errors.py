"""The one base class of user errors: bad input that the CLI reports on one line with exit code 2.

It is ``evaluation.errors.InputError`` (the evaluation package stays usable without reglue), so
`reglue_cli.main` catches one class for both packages; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from evaluation.errors import InputError as UserError

__all__ = ["ConfigError", "UserError"]


class ConfigError(UserError, ValueError):
    """A configuration value that cannot work; the message names the key."""
