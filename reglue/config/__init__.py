"""The typed run configuration: ``from_dict`` builds it from a resolved preset, ``to_dict`` gives its plain form.

``from_dict`` refuses unknown keys (naming the valid ones), wrong types, out-of-range values and sections that do
not fit each other, so every problem is one line at ``--dry-run`` time. Sections: reglue.config.sections.
"""

from __future__ import annotations

from reglue.config.checks import check_compressor, check_diffusion
from reglue.config.schema import describe, parse, plain
from reglue.config.sections import (
    KINDS,
    CompressorRun,
    DiffusionRun,
    LatentData,
    RunConfig,
    SamplingConfig,
    TransportConfig,
)
from reglue.errors import ConfigError

__all__ = ["KINDS", "MOVED", "CompressorRun", "ConfigError", "DiffusionRun", "LatentData", "RunConfig",
           "SamplingConfig", "TransportConfig", "defaults", "describe", "from_dict", "plain", "to_dict"]

# Keys older versions wrote that no longer exist, each with the only value that was ever honoured (None: any).
# Checkpoints and run directories written before the typed configuration still load; a preset or --set holding
# one of them is refused like any unknown key.
RETIRED = {("transport", "prediction"): "v", ("train", "steps_per_epoch"): None}
# Keys older versions wrote under another name: a stored value is read from its new home.
MOVED = {("optim", "ema_decay"): ("ema", "decay")}


def _kind(data: dict) -> type:
    kind = data.get("kind")
    if kind not in KINDS:
        raise ConfigError(f"kind {kind!r}: expected one of {', '.join(KINDS)}")
    return KINDS[kind]


def defaults(kind: str) -> dict:
    """The plain form of a run of ``kind`` with every default (what presets are merged onto)."""
    data = plain(KINDS[kind]())
    if kind == "diffusion":
        data["model"]["class_dropout"] = None  # decided by model.num_classes when the run is built
    return data


def retire(data: dict) -> dict:
    """A copy of stored plain config ``data`` with MOVED keys in their new homes and without RETIRED keys;
    ConfigError when a retired key holds another value."""
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for (section, key), (home, name) in MOVED.items():
        if key in (data.get(section) or {}):
            data.setdefault(home, {})[name] = data[section].pop(key)
    for (section, key), only in RETIRED.items():
        if key in (data.get(section) or {}):
            value = data[section].pop(key)
            if only is not None and value != only:
                raise ConfigError(f"{section}.{key}={value!r}: this version only trains {key} {only!r}")
    return data


def from_dict(data: dict, stored: bool = False) -> RunConfig:
    """The typed, checked run configuration of plain ``data``; ``stored``: written by an earlier run (RETIRED)."""
    if not isinstance(data, dict):
        raise ConfigError(f"a run configuration is a mapping of sections, got {type(data).__name__}")
    if not stored:
        for (section, key), home in MOVED.items():
            if key in (data.get(section) or {}):
                raise ConfigError(f"{section}.{key}: this key is now {'.'.join(home)}")
    data = retire(data) if stored else data
    run = parse(_kind(data), data, "")
    return (check_diffusion if run.kind == "diffusion" else check_compressor)(run, stored)


def to_dict(run: RunConfig) -> dict:
    """Plain data (dicts, lists, numbers, strings): what checkpoints, config.yaml and --dry-run hold."""
    return plain(run)
