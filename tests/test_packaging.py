"""A wheel install (not the editable one the tests run from) carries the presets and reference_stats/ data."""

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHECK = """
import sys; sys.path.insert(0, sys.argv[1])
import evaluation, reglue
assert evaluation.__file__.startswith(sys.argv[1]), evaluation.__file__
from evaluation.compare import load_baselines
from evaluation.reference import registry
from reglue import presets
print(len(load_baselines(["sit-b2"])), registry()["imagenet256"]["file"], presets.load("sit-b2-reglue").preset)
"""


def test_an_installed_wheel_finds_presets_registry_and_baselines(tmp_path):
    source = tmp_path / "src"  # a copy: an in-tree build/ left by another build could hide a missing file
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".*", "build", "*.egg-info", "__pycache__", "runs",
                                                                "demo_out", "tests"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                            str(tmp_path / "wheel"), str(source)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next((tmp_path / "wheel").glob("reglue-*.whl"))
    install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                              str(tmp_path / "site"), str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-2000:]
    done = subprocess.run([sys.executable, "-c", CHECK, str(tmp_path / "site")], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    count, ref_file, preset = done.stdout.split()
    assert int(count) > 3 and ref_file == "VIRTUAL_imagenet256_labeled.npz" and preset == "sit-b2-reglue"
