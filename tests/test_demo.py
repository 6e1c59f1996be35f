"""The demo pipeline (encode -> compressor -> tiny-reglue -> sample -> eval -> compare) at a smaller size, as CI."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_demo_pipeline_runs_end_to_end_and_again(tmp_path):
    bindir = Path(sys.executable).parent
    if not (bindir / "reglue").exists():
        bindir = Path(shutil.which("reglue")).parent
    env = {**os.environ, "DEMO_OUT": str(tmp_path / "demo"), "DEMO_PER_CLASS": "3", "DEMO_STEPS": "4",
           "DEMO_SAMPLES": "6", "PY": sys.executable, "REGLUE": str(bindir / "reglue"), "OMP_NUM_THREADS": "2",
           "REGLUE_FEATURE_CACHE": str(tmp_path / "cache")}
    first = subprocess.run(["bash", "scripts/demo.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    out = first.stdout
    for text in ("$ ", "reglue encode", "reglue train --preset compressor-tiny", "reglue sample", "reglue eval",
                 "reglue compare", "FID", "(m) REGLUE", "random-weight stand-ins"):
        assert text in out, text
    assert (tmp_path / "demo/fid.png").stat().st_size > 0
    assert (tmp_path / "demo/samples-0000004/samples.npz").exists()
    second = subprocess.run(["bash", "scripts/demo.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=900)
    assert second.returncode == 0
    assert "already complete" in second.stdout

    def table(text):
        return [line for line in text.splitlines() if line.startswith("*!")]

    assert table(second.stdout) == table(first.stdout) and table(first.stdout)
