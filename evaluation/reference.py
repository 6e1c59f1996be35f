"""Reference batches: the registry in reference_stats/registry.yaml, download with checksum, or a local path."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

REFERENCE_DIR_ENV = "REGLUE_REFERENCE_DIR"  # where named reference batches are looked for and downloaded to
REGISTRY = Path(__file__).resolve().parents[1] / "reference_stats" / "registry.yaml"


class ReferenceError(ValueError):
    """A reference batch that cannot be found or verified."""


def registry() -> dict:
    """Name -> entry (file, url, sha256, images, source)."""
    return yaml.safe_load(REGISTRY.read_text())


def reference_dir() -> Path:
    """Where named reference batches live: $REGLUE_REFERENCE_DIR or ~/.cache/reglue/reference."""
    return Path(os.environ.get(REFERENCE_DIR_ENV, Path.home() / ".cache" / "reglue" / "reference"))


def resolve_reference(ref: str, download: bool = True) -> Path:
    """A local .npz for ``ref``: an existing path, or a registry name (downloaded and checked when missing)."""
    path = Path(ref)
    if path.exists():
        return path
    entries = registry()
    if ref not in entries:
        raise ReferenceError(f"reference {ref!r}: no such file, and not one of {', '.join(entries)}")
    entry = entries[ref]
    target = reference_dir() / entry["file"]
    if target.exists():
        return target
    if not download:
        raise ReferenceError(f"reference {ref}: {target} is missing")
    return _download(entry, target, ref)


def _download(entry: dict, target: Path, name: str) -> Path:

    import torch

    from evaluation.images import file_sha256

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".partial")
    try:
        torch.hub.download_url_to_file(entry["url"], str(tmp), progress=True)
    except Exception as exc:  # noqa: BLE001 - any network failure gets the same advice
        raise ReferenceError(
            f"cannot download reference {name} ({type(exc).__name__}); fetch {entry['url']} elsewhere and put it at "
            f"{target} (or set {REFERENCE_DIR_ENV}), or pass --ref PATH") from None
    if entry.get("sha256") and file_sha256(tmp) != entry["sha256"]:
        tmp.unlink()
        raise ReferenceError(f"reference {name}: checksum mismatch after download")
    tmp.replace(target)
    return target
