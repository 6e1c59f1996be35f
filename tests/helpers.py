"""Plain helpers the test files share (fixtures live in conftest.py): a folder of mixed images, the demo's toy
images, an npz writer, and `reglue` run as the user runs it with the one-line error check."""

import importlib.util
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
MODES = ["RGB", "L", "CMYK", "P", "RGBA", "LA", "PA"]


def make_image(rng, mode: str, ext: str, path: Path, size=None) -> None:
    """One random image in ``mode`` saved as ``ext`` at ``path`` (random size between 40 and 300 px unless given)."""
    w, h = size or rng.integers(40, 300, 2)
    image = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    if mode == "PA":
        image = image.convert("P")
        image.info["transparency"] = 3
    else:
        image = image.convert(mode)
    image.save(path, format={"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[ext])


def make_folder(root: Path, per_class: int = 5, seed: int = 0, corrupt: bool = True) -> Path:
    """Three class folders with mixed sizes, formats and modes, plus one corrupt file."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(["n02", "n01", "n03"]):  # unsorted on purpose
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            mode = MODES[(i + c) % len(MODES)]
            ext = "jpg" if mode in ("RGB", "L", "CMYK") else ("webp" if mode == "RGBA" else "png")
            make_image(rng, mode, ext, root / name / f"img{i:03d}.{ext}")
    if corrupt:
        (root / "n01" / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    return root


def script(name: str):
    """The module of scripts/NAME.py (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def toy_images(per_class: int, seed: int = 0, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (N, size, size, 3) images drawn by the demo's own scripts/toy_dataset.py, with their class ids in the
    order `reglue encode` numbers the demo's folders (sorted names: circle-blue, circle-red, cross-blue, ...)."""
    toy = script("toy_dataset")
    names = sorted(f"{shape}-{colour}" for shape in toy.SHAPES for colour in toy.COLOURS)
    rng = np.random.default_rng(seed)
    images = [np.asarray(toy.draw(n.split("-")[0], toy.COLOURS[n.split("-")[1]], size, rng))
              for n in names for _ in range(per_class)]
    return np.stack(images), np.repeat(np.arange(len(names)), per_class)


def write_npz(path, images, **extra):
    """Save ``images`` as arr_0 (and ``extra`` arrays beside it) in an npz at ``path``; returns ``path``."""
    np.savez(path, arr_0=images, **extra)
    return path


def reglue(*args, limit: int | None = None, cwd=REPO, separate: bool = False):
    """Run `reglue ARGS`: in a process of its own with every file it writes limited to ``limit`` bytes, or, with
    no limit, in this process (a process start and a torch import saved; ``separate`` forces a process)."""
    if limit is None and not separate:
        return _in_process(args)

    def set_limit():
        if limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "reglue_cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600, preexec_fn=set_limit)


def _in_process(args):
    """Run `reglue ARGS` in this process; its exit code and what it printed, as subprocess.run reports them."""
    import contextlib
    import io
    from types import SimpleNamespace

    from reglue_cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def assert_one_line(result, *words):
    """Exit 2, one line on stderr naming each of ``words``, no traceback."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    for word in words:
        assert str(word) in lines[0], lines[0]
