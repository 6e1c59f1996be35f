"""Where images come from: an ImageNet-style folder, a folder plus a labels file, or a .tar of a folder."""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

from reglue.data.crop import IMAGE_EXTENSIONS


class SourceError(ValueError):
    """The image source cannot be used; the message names the path and the problem."""


@dataclass(frozen=True)
class ImageSource:
    """An ordered list of (key, label) with the class names; bytes are read by key."""

    root: str
    keys: tuple[str, ...]
    labels: tuple[int, ...]
    class_names: tuple[str, ...]
    kind: str  # "folder" or "tar"

    def __len__(self) -> int:
        return len(self.keys)

    def fingerprint(self) -> str:
        """sha256 of the ordered keys, labels and class names: identifies the source across runs."""
        digest = hashlib.sha256()
        for key, label in zip(self.keys, self.labels):
            digest.update(f"{key}\t{label}\n".encode())
        digest.update("\n".join(self.class_names).encode())
        return digest.hexdigest()

    def reader(self) -> "SourceReader":
        """A reader for this process (open one per DataLoader worker, not before the fork)."""
        return SourceReader(self)


class SourceReader:
    """Reads the bytes of one image by index; holds an open tar file when the source is a .tar."""

    def __init__(self, source: ImageSource):
        self.source = source
        self._tar: tarfile.TarFile | None = None
        self._pid: int | None = None

    def read(self, index: int) -> bytes:
        """The raw file bytes of image ``index``."""
        key = self.source.keys[index]
        if self.source.kind == "folder":
            return (Path(self.source.root) / key).read_bytes()
        if self._tar is None or self._pid != os.getpid():
            self._tar, self._pid = tarfile.open(self.source.root), os.getpid()
        member = self._tar.extractfile(key)
        if member is None:
            raise OSError(f"{key} is not a regular file in {self.source.root}")
        return member.read()


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _from_class_dirs(root: str, kind: str, paths: list[str]) -> ImageSource:
    """Labels from the first path component: sorted class names give labels 0..K-1."""
    split = [p.split("/", 1) for p in paths if "/" in p]
    classes = sorted({parts[0] for parts in split})
    if not classes:
        raise SourceError(f"{root}: no class folders (expected one sub-folder of images per class)")
    index = {name: i for i, name in enumerate(classes)}
    keys = sorted(p for p in paths if "/" in p)
    return ImageSource(root, tuple(keys), tuple(index[k.split("/", 1)[0]] for k in keys), tuple(classes), kind)


def _walk_folder(root: Path) -> list[str]:
    return sorted(
        os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/")
        for d, _, files in os.walk(root) for f in files if _is_image(f)
    )


def _tar_members(path: Path) -> list[str]:
    try:
        with tarfile.open(path) as tar:
            names = [m.name for m in tar.getmembers() if m.isfile() and _is_image(m.name)]
    except (tarfile.TarError, OSError) as exc:
        raise SourceError(f"{path}: cannot read the tar file ({exc})") from None
    return sorted(names)


def _read_labels_file(path: Path) -> dict[str, int]:
    """``{relative path: label}`` from JSON ({"labels": [[path, label], ...]} or {path: label}) or text lines."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise SourceError(f"{path}: cannot read the labels file ({exc.strerror})") from None
    try:
        if path.suffix == ".json":
            data = json.loads(text)
            pairs = data["labels"] if isinstance(data, dict) and "labels" in data else data
            pairs = pairs.items() if isinstance(pairs, dict) else pairs
            return {str(k).replace("\\", "/"): int(v) for k, v in pairs}
        pairs = [line.replace(",", " ").split() for line in text.splitlines() if line.strip()]
        return {k: int(v) for k, v in pairs}
    except (ValueError, KeyError, TypeError) as exc:
        raise SourceError(f"{path}: expected 'path label' lines or JSON path->label ({exc})") from None


def _with_labels_file(root: str, kind: str, paths: list[str], labels_path: Path) -> ImageSource:
    table = _read_labels_file(labels_path)
    keys = sorted(p for p in paths if p in table)
    if not keys:
        raise SourceError(f"{labels_path}: none of its paths names an image under {root}")
    labels = tuple(table[k] for k in keys)
    return ImageSource(root, tuple(keys), labels, tuple(str(i) for i in range(max(labels) + 1)), kind)


def open_source(path: str | os.PathLike, labels_file: str | os.PathLike | None = None) -> ImageSource:
    """Index an image folder or .tar (labels from class sub-folders, or from ``labels_file``)."""
    path = Path(path)
    if not path.exists():
        raise SourceError(f"{path}: no such file or folder")
    if path.is_dir():
        kind, paths = "folder", _walk_folder(path)
    elif tarfile.is_tarfile(path):
        kind, paths = "tar", _tar_members(path)
    else:
        raise SourceError(f"{path}: expected an image folder or a .tar archive")
    if not paths:
        raise SourceError(f"{path}: no images found ({', '.join(IMAGE_EXTENSIONS)})")
    if labels_file is not None:
        return _with_labels_file(str(path), kind, paths, Path(labels_file))
    if kind == "tar":
        return _tar_class_dirs(str(path), paths)
    return _from_class_dirs(str(path), kind, paths)


def _tar_class_dirs(root: str, names: list[str]) -> ImageSource:
    """In a tar the class folders may sit under one top folder (``tar cf x.tar train/``): skip it."""
    tops = {n.split("/", 1)[0] for n in names}
    if len(tops) == 1 and all(n.count("/") >= 2 for n in names):
        top = next(iter(tops)) + "/"
        inner = _from_class_dirs(root, "tar", [n[len(top):] for n in names])
        return ImageSource(root, tuple(top + k for k in inner.keys), inner.labels, inner.class_names, "tar")
    return _from_class_dirs(root, "tar", names)
