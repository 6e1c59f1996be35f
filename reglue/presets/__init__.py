"""Presets: YAML files shipped with the package, resolved through ``base:`` chains and overrides.

``load("sit-b2-reglue", train__global_batch=128)`` returns the typed run configuration (reglue.config): the
schema's defaults, then the preset's files, then the overrides, checked as a whole. An override
names a key by its path with ``__`` (or ``.``) between levels; a bare name is accepted when it is unique.
Files whose name starts with ``_`` are building blocks, not presets.
"""

from __future__ import annotations

import copy
from importlib import resources
from typing import Any, Iterable

import yaml

from reglue import config as run_config
from reglue.config import MOVED
from reglue.config.yamlfile import load_yaml
from reglue.encoders.registry import VFM_REGISTRY, vfm_entry
from reglue.errors import ConfigError


class PresetError(ConfigError):
    """An unknown preset, or an override that does not fit it."""


def _preset_files() -> dict[str, Any]:
    root = resources.files(__name__)
    return {p.name[: -len(".yaml")]: p for p in root.iterdir() if p.name.endswith(".yaml")}


def available() -> list[str]:
    """Names of every loadable preset, sorted."""
    return sorted(name for name in _preset_files() if not name.startswith("_"))


def deep_merge(base: dict, update: dict) -> dict:
    """A copy of ``base`` with ``update`` merged in, recursively for nested dicts."""
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _read(name: str, files: dict, chain: tuple[str, ...] = ()) -> dict:
    """The file ``name`` with its bases merged underneath it."""
    if name not in files:
        raise PresetError(f"unknown preset {name!r}; valid presets: {', '.join(available())}")
    if name in chain:
        raise PresetError(f"preset {name!r} inherits from itself via {' -> '.join(chain)}")
    data = load_yaml(files[name].read_text()) or {}
    bases = data.pop("base", None) or []
    resolved: dict = {}
    for base in [bases] if isinstance(bases, str) else bases:
        resolved = deep_merge(resolved, _read(base, files, chain + (name,)))
    return deep_merge(resolved, data)


def _leaf_paths(config: dict, prefix: tuple[str, ...] = ()) -> Iterable[tuple[str, ...]]:
    for key, value in config.items():
        path = prefix + (key,)
        yield path
        if isinstance(value, dict):
            yield from _leaf_paths(value, path)


def _resolve_key(config: dict, key: str) -> tuple[str, ...]:
    """Turn 'model__depth', 'model.depth' or a unique bare name into a key path."""
    parts = tuple(key.replace("__", ".").split("."))
    if len(parts) > 1:
        return parts
    matches = [p for p in _leaf_paths(config) if p[-1] == key and p[0] != "sources"]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise PresetError(f"override {key!r}: no such key in the preset")
    raise PresetError(f"override {key!r} is ambiguous: use one of {', '.join('.'.join(p) for p in matches)}")


def _check_type(path: tuple[str, ...], old: Any, new: Any) -> Any:
    if old is None or new is None or isinstance(new, type(old)):
        return new
    if isinstance(old, float) and isinstance(new, int) and not isinstance(new, bool):
        return float(new)
    raise PresetError(f"override {'.'.join(path)}={new!r}: expected {type(old).__name__}, got {type(new).__name__}")


def apply_override(config: dict, key: str, value: Any) -> dict:
    """Set one key (path or unique name) in place, checking that it exists and the type fits."""
    path = _resolve_key(config, key)
    node = config
    for part in path[:-1]:
        if not isinstance(node.get(part), dict):
            raise PresetError(f"override {'.'.join(path)}: {part!r} is not a section of this preset")
        node = node[part]
    if path[-1] not in node:
        moved = MOVED.get(tuple(path))
        if moved is not None:
            raise PresetError(f"override {'.'.join(path)}: this key is now {'.'.join(moved)}")
        raise PresetError(f"override {'.'.join(path)}: no such key; valid here: {', '.join(sorted(node))}")
    node[path[-1]] = _check_type(path, node[path[-1]], value)
    return config


def swap_vfm(config: dict, name: str) -> dict:
    """Set ``vfm.name`` in a plain config and make what depends on the VFM follow (in place): its input size for
    ``data.resolution``, the [CLS] width, the projector's output width, the compressor's input width, and the
    blocks (the same distance from the last block)."""

    old, new = VFM_REGISTRY.get(config["vfm"]["name"]), vfm_entry(name)
    vfm, model, compressor = config["vfm"], config.get("model", {}), config["compressor"]
    shift = new.depth - old.depth if old is not None else 0
    vfm.update(name=name, image_size=new.image_size(config["data"]["resolution"]),
               layers=[max(0, block + shift) for block in vfm["layers"]])
    for key in ("cls_layer", "repa_layer"):
        if vfm.get(key, -1) >= 0:
            vfm[key] = max(0, vfm[key] + shift)
    if "cls_dim" in model:
        model["cls_dim"] = new.width
    if model.get("projector"):
        model["projector"]["out_dim"] = new.width
    if compressor.get("channels"):
        compressor["channels"] = [new.width * len(vfm["layers"]), *compressor["channels"][1:]]
    return config


def _uses_vfm(model: dict) -> bool:
    """Whether a plain ``model`` section reads the VFM (semantic channels, a [CLS] token or a REPA projector)."""
    return bool(model.get("semantic_channels") or model.get("cls_token") or model.get("projector"))


def apply_overrides(config: dict, overrides: dict) -> dict:
    """Apply ``{key: value}`` overrides in order (in place); setting ``vfm.name`` swaps the VFM (swap_vfm).

    Two overrides of one key (``depth`` and ``model.depth``) are refused, and so is a VFM for a model that reads
    none (a plain SiT): neither would do what it says."""
    seen: dict[tuple[str, ...], str] = {}
    for key, value in overrides.items():
        path = _resolve_key(config, key)
        if path in seen:
            raise PresetError(f"override {'.'.join(path)} given twice ({seen[path]} and {key}); give it once")
        seen[path] = key
        if path == ("vfm", "name"):
            swap_vfm(config, value)
        else:
            apply_override(config, key, value)
    if ("vfm", "name") in seen and config.get("kind") == "diffusion" and not _uses_vfm(config.get("model", {})):
        raise PresetError(f"--vfm / vfm.name={config['vfm']['name']!r}: preset {config.get('preset', '?')!r} reads no "
                          "VFM (no semantic channels, [CLS] token or REPA projector); pick a preset that does, e.g. "
                          "sit-b2-reglue or sit-b2-repa")
    return config


def parse_assignment(text: str) -> tuple[str, Any]:
    """'model.depth=4' -> ('model.depth', 4), the value parsed as YAML."""
    if "=" not in text:
        raise PresetError(f"override {text!r}: expected KEY=VALUE, e.g. train.global_batch=128")
    key, raw = text.split("=", 1)
    try:
        return key.strip(), load_yaml(raw)
    except yaml.YAMLError as exc:
        raise PresetError(f"override {text!r}: value is not valid YAML ({exc.problem})") from None


def parse_assignments(texts: Iterable[str]) -> dict[str, Any]:
    """``--set`` assignments as ``{key: value}`` in order; a key given twice is refused, naming it (a dict would
    silently keep the last)."""
    overrides: dict[str, Any] = {}
    for text in texts:
        key, value = parse_assignment(text)
        spelled = key.replace("__", ".")
        if spelled in overrides:
            raise PresetError(f"--set {spelled} given twice; give it once")
        overrides[spelled] = value
    return overrides


def resolve(name: str) -> dict:
    """The plain form of preset ``name``: the schema's defaults for its kind with its files merged on top."""
    data = {"preset": name, **_read(name, _preset_files())}
    kind = data.get("kind")
    if kind not in run_config.KINDS:
        raise PresetError(f"preset {name!r}: kind {kind!r}, expected one of {', '.join(run_config.KINDS)}")
    return deep_merge(run_config.defaults(kind), data)


def load(name: str, **overrides: Any) -> run_config.RunConfig:
    """The typed preset ``name`` with keyword overrides applied (``model__depth=4`` or a unique bare key)."""
    return run_config.from_dict(apply_overrides(resolve(name), overrides))
