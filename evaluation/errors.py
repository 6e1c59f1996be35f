"""The one base class of the evaluation suite's user errors."""

from __future__ import annotations


class InputError(Exception):
    """Bad input: a file, an option or a model that cannot be used; the CLI prints its message on one line and exits
    with code 2."""
