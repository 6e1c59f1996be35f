"""``python -m reglue_cli`` (what ``torchrun -m reglue_cli`` runs)."""

from reglue_cli.main import entry_point

entry_point()
