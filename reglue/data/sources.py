"""Where images come from: an ImageNet-style folder, a folder plus a labels file, a .tar of a folder, or ImageNet's
own ILSVRC2012_img_train.tar (a tar of one tar per class, read in place: no extraction)."""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from reglue.data.crop import IMAGE_EXTENSIONS
from reglue.errors import UserError


class SourceError(UserError, ValueError):
    """The image source cannot be used; the message names the path and the problem."""


@dataclass(frozen=True)
class ImageSource:
    """An ordered list of (key, label) with the class names; bytes are read by key."""

    root: str
    keys: tuple[str, ...]
    labels: tuple[int, ...]
    class_names: tuple[str, ...]
    kind: str  # "folder", "tar" or "nested-tar"
    # nested-tar: (N, 2) int64 byte offset and size of each image in the outer file
    spans: np.ndarray | None = field(default=None, compare=False)

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
        self._raw = None  # the outer file of a nested tar
        self._pid: int | None = None

    def read(self, index: int) -> bytes:
        """The raw file bytes of image ``index``."""
        key = self.source.keys[index]
        if self.source.kind == "folder":
            return (Path(self.source.root) / key).read_bytes()
        if self.source.spans is not None:
            return self._read_span(*(int(v) for v in self.source.spans[index]))
        if self._tar is None or self._pid != os.getpid():
            self._tar, self._pid = tarfile.open(self.source.root), os.getpid()
        member = self._tar.extractfile(key)
        if member is None:
            raise OSError(f"{key} is not a regular file in {self.source.root}")
        return member.read()

    def _read_span(self, offset: int, size: int) -> bytes:
        if self._raw is None or self._pid != os.getpid():
            self._raw, self._pid = open(self.source.root, "rb"), os.getpid()  # noqa: SIM115 - kept for every read
        self._raw.seek(offset)
        data = self._raw.read(size)
        if len(data) != size:
            raise OSError(f"{self.source.root}: truncated at byte {offset + len(data)}")
        return data


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
        if not paths and labels_file is None:
            return _nested_tar(path)
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


NESTED_TAR_SUFFIX = ".tar"  # ILSVRC2012_img_train.tar holds n01440764.tar ... n15075141.tar, JPEGs inside each


def _nested_tar(path: Path) -> ImageSource:
    """A tar of per-class tars: class = inner tar's stem (sorted, as ImageNet's labels), images read by byte span."""
    keys, classes, spans = [], [], []
    try:
        with tarfile.open(path, "r:") as outer:  # uncompressed only: spans are offsets in the file itself
            for member in outer:
                if not (member.isfile() and member.name.endswith(NESTED_TAR_SUFFIX)):
                    continue
                with tarfile.open(fileobj=outer.extractfile(member), mode="r:") as inner:
                    for image in inner:
                        if image.isfile() and _is_image(image.name):
                            keys.append(f"{member.name}/{image.name}")
                            classes.append(Path(member.name).name[: -len(NESTED_TAR_SUFFIX)])
                            spans.append((member.offset_data + image.offset_data, image.size))
    except (tarfile.TarError, OSError) as exc:
        raise SourceError(f"{path}: no images, and not a readable uncompressed tar of per-class tars ({exc})") from None
    if not keys:
        raise SourceError(f"{path}: no images found ({', '.join(IMAGE_EXTENSIONS)}), directly or in inner .tar files")
    names = sorted(set(classes))
    index = {name: i for i, name in enumerate(names)}
    order = sorted(range(len(keys)), key=keys.__getitem__)
    return ImageSource(str(path), tuple(keys[i] for i in order), tuple(index[classes[i]] for i in order), tuple(names),
                       "nested-tar", np.asarray([spans[i] for i in order], dtype=np.int64).reshape(-1, 2))
