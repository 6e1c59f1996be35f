"""Print the table of every run-configuration key, its default and its meaning (the tables of docs/presets.md)."""

from __future__ import annotations

import json

from reglue import config as run_config
from reglue.config.schema import describe


def key_table(kind: str) -> str:
    """A Markdown table of every key of a ``kind`` run: key, default, meaning."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    defaults = run_config.defaults(kind)
    for key, default, doc in describe(run_config.KINDS[kind], defaults):
        if key == "origin":  # set when a checkpoint is loaded, not a preset key
            continue
        node = defaults
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        shown = "section" if isinstance(node, dict) and key != "sources" else f"`{json.dumps(default)}`"
        rows.append(f"| `{key}` | {shown} | {doc} |")
    return "\n".join(rows)


if __name__ == "__main__":
    for kind in run_config.KINDS:
        print(f"### `kind: {kind}`\n\n{key_table(kind)}\n")
