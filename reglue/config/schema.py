"""The machinery of typed configuration sections: a section is a frozen dataclass whose fields are its keys.

Each field is declared with ``knob(default, doc, check)``: the default, one line saying what it does (docs/presets.md
is checked against these lines), and an optional range check. ``parse`` builds a section from plain data (a
preset's YAML) refusing unknown keys, wrong types and out-of-range values with the key named; ``plain`` turns a
section back into plain data (what checkpoints and config.yaml store).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import field
from typing import Any, Callable, Literal

from reglue.errors import ConfigError

Check = tuple[Callable[[Any], bool], str]


def knob(default: Any, doc: str, check: Check | None = None) -> Any:
    """A section field: its default, what it does (one line) and an optional (predicate, 'expected ...') check."""
    return field(default=default, metadata={"doc": doc, "check": check})


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


POSITIVE: Check = (lambda v: _number(v) and v > 0, "a finite number > 0")
NON_NEGATIVE: Check = (lambda v: _number(v) and v >= 0, "a finite number >= 0")
COUNT: Check = (lambda v: v >= 1, "an integer >= 1")
COUNT_OR_ZERO: Check = (lambda v: v >= 0, "an integer >= 0")
FRACTION: Check = (lambda v: 0 <= v <= 1, "a number in [0, 1]")
BETAS: Check = (lambda v: all(0 <= b < 1 for b in v), "two numbers in [0, 1)")
INTERVAL: Check = (lambda v: 0 <= v[0] <= v[1] <= 1, "[low, high] with 0 <= low <= high <= 1 (t = 1 is noise)")
SCHEDULE: Check = (lambda v: all(s >= 0 and lam >= 0 for s, lam in v), "[[step, lam], ...] with step, lam >= 0")


# Upper bounds of the count keys: far above every preset (SiT-XL/2: depth 28, width 1152; batches 256 and 4096),
# low enough that an absurd value (a typo, 1e20) is refused at load and `--dry-run` instead of building for ever.
MAX_DEPTH = 1024  # transformer blocks, the projector's block
MAX_WIDTH = 65536  # token widths, MLP widths, channel counts
MAX_HEADS = 1024  # attention heads
MAX_PATCH = 64  # latent patch side
MAX_GRID = 1024  # latent grid side (8192 px images)
MAX_PIXELS = 8192  # image sides (data.resolution, vfm.image_size)
MAX_CLASSES = 1_000_000  # class labels
MAX_BATCH = 1 << 20  # images per optimiser step
MAX_STEPS = 10**9  # optimiser steps and every cadence counted in steps
MAX_EPOCHS = 1_000_000  # passes over a dataset
MAX_SAMPLING_STEPS = 100_000  # integration steps of a sampler
MAX_IMAGES = 10**9  # images drawn for statistics
MAX_RUN_SEED = (1 << 32) - 1  # train.seed: a 32-bit seed, which every generator takes whole


def count(high: int, low: int = 1) -> Check:
    """An integer in ``low..high``."""
    return (lambda v: low <= v <= high, f"an integer >= {low} and <= {high}")


def optional(check: Check) -> Check:
    """``check``, or null."""
    return (lambda v: v is None or check[0](v), f"null or {check[1]}")


def _type_name(hint) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(hint)))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(hint))
    if origin is tuple:
        args = typing.get_args(hint)
        return f"a list of {_type_name(args[0])}" if args[-1] is Ellipsis else f"a list of {len(args)} values"
    if dataclasses.is_dataclass(hint):
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a mapping"}.get(
        hint, str(hint))


def _coerce(hint, value, key: str):
    """``value`` as the type ``hint`` names, or ConfigError naming ``key``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    wrong = ConfigError(f"{key}={value!r}: expected {_type_name(hint)}")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(inner[0], value, key)
        raise wrong
    if origin is Literal:
        if value in args and type(value) is type(next(a for a in args if a == value)):
            return value
        raise wrong
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise wrong
        if args[-1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise wrong
        return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if dataclasses.is_dataclass(hint):
        return parse(hint, value, key)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float) and (isinstance(value, bool) or not isinstance(value, hint)):
        raise wrong
    if hint is float and not math.isfinite(value):
        raise ConfigError(f"{key}={value!r}: expected a finite number")
    if not isinstance(value, hint):
        raise wrong
    return value


def names(cls) -> list[str]:
    """The keys a section declares, in order."""
    return [f.name for f in dataclasses.fields(cls)]


def parse(cls, data, where: str):
    """Build section ``cls`` (keys named ``where.key``; '' at the root) from a mapping; missing keys take their
    defaults, anything else is refused by name."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping of keys, got {data!r}")
    unknown = sorted(set(data) - set(names(cls)))
    if unknown:
        raise ConfigError(f"{where or 'config'}: unknown key(s) {', '.join(map(str, unknown))}; "
                          f"valid: {', '.join(names(cls))}")
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        key = f"{where}.{f.name}" if where else f.name
        value = _coerce(hints[f.name], data[f.name], key)
        check = f.metadata.get("check")
        if check is not None and value is not None and not check[0](value):
            raise ConfigError(f"{key}={data[f.name]!r}: expected {check[1]}")
        values[f.name] = value
    return cls(**values)


def plain(value):
    """A section (or any value inside one) as plain YAML data: dicts, lists, numbers, strings."""
    if dataclasses.is_dataclass(value):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (tuple, list)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def describe(cls, defaults: dict, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(dotted key, default, doc) of every key of section ``cls``, nested sections flattened; ``defaults`` is the
    plain form of the defaults (a nested section that defaults to null still lists its keys, with theirs)."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        default = (defaults or {}).get(f.name)
        inner = [a for a in (hints[f.name], *typing.get_args(hints[f.name])) if dataclasses.is_dataclass(a)]
        if inner:
            rows.append((key, None if isinstance(default, dict) else default, f.metadata.get("doc", "")))
            rows += describe(inner[0], default if isinstance(default, dict) else plain(inner[0]()), key + ".")
        else:
            rows.append((key, default, f.metadata.get("doc", "")))
    return rows


def flatten(data: dict, prefix: str = "") -> dict:
    """Nested mappings as one mapping of dotted keys ('model.depth'); tuples become lists (as JSON reads them)."""
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return out
