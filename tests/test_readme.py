"""Every command in README.md, run: the ImageNet recipe at real model sizes, the dry-run excerpt, the Python API.

ImageNet, the pretrained weights and 8 GPUs are not here, so the recipe runs as written with only these changes,
each listed below so that a README edit the test cannot follow fails loudly:
- the ImageNet folder is a toy folder of 256 x 256 images in class sub-folders, and /data/... lives in tmp_path;
- SD-VAE and DINOv2-B/14-reg have their real architectures with random weights, saved in the real file formats
  (a diffusers folder, a timm safetensors file) and given through the README's variables; Inception is the seeded
  random stand-in with torch-fidelity's layout; `imagenet256` is built from the toy images with `reglue make-ref` into
  $REGLUE_REFERENCE_DIR, as a cluster without network would place the downloaded file;
- 2 processes instead of 8; 2 optimiser steps at batch 4 instead of 400K at 256; 4 samples of 4 steps, not 50K of 250.
"""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
BIN = Path(sys.executable).parent

SUBSTITUTIONS = (  # (as written in the README, as run here): each must occur in the recipe
    ("--nproc_per_node 8", "--nproc_per_node 2"),
    ("/data/imagenet/train", "{tmp}/imagenet/train"),
    ("/data/in256.h5", "{tmp}/in256.h5"),
    ("0400000.pt", "0000002.pt"),
    ("--num-samples 50000", "--num-samples 4"),
)
SCALE = {  # appended to each command of the recipe: the size of the run, nothing else
    "encode": ["--batch-size", "4", "--workers", "0", "--quiet"],
    "train": ["--max-steps", "2", "--global-batch", "4", "--workers", "0", "--quiet"],
    "sample": ["--steps", "4", "--chunk", "2", "--quiet"],  # 2 chunks of 2: each process samples one
    "eval": ["--quiet"],
    "compare": [],
}


def fenced_blocks(text: str, after: str = "", lang: str = "") -> list[str]:
    """The fenced code blocks of ``text`` (after the heading ``after``) whose info string is ``lang``."""
    parts = text.split(after, 1)[1].split("```") if after else text.split("```")
    blocks = parts[1::2]
    return [b.split("\n", 1)[1] for b in blocks if b.split("\n", 1)[0].strip() == lang]


def recipe_commands(text: str) -> list[str]:
    """The recipe's shell commands: continuation lines joined, comments dropped."""
    block = fenced_blocks(text, "## The real recipe")[0].replace("\\\n", " ")
    return [" ".join(line.split()) for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def subcommand(command: str) -> str:
    """encode / train / sample / eval / compare."""
    return next(word for word in command.split() if word in SCALE)


def runnable(command: str, tmp: Path) -> list[str]:
    """The README command with the substitutions and the scale flags, as argv."""
    for written, here in SUBSTITUTIONS:
        command = command.replace(written, here.format(tmp=tmp))
    argv = shlex.split(command)
    argv[0] = str(BIN / argv[0])  # torchrun / reglue of this environment
    return argv + SCALE[subcommand(command)]


def make_stand_in_weights(root: Path) -> dict:
    """SD-VAE and DINOv2-B/14-reg at their real sizes with random weights, in their real formats; the env to use
    them."""
    import timm
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    torch.manual_seed(0)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        norm_num_groups=32, sample_size=256)  # the sd-vae-ft-* config
    vae.save_pretrained(root / "sd-vae")
    vit = timm.create_model("vit_base_patch14_reg4_dinov2", pretrained=False, img_size=224, num_classes=0)
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(root / "dinov2-b-reg.safetensors"))
    return {"REGLUE_VAE": str(root / "sd-vae"), "REGLUE_VAE_DECODER": str(root / "sd-vae"),
            "REGLUE_VFM": str(root / "dinov2-b-reg.safetensors"), "REGLUE_INCEPTION_WEIGHTS": "random",
            "REGLUE_REFERENCE_DIR": str(root / "reference")}


def run(argv: list[str], cwd: Path, env: dict) -> str:
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{shlex.join(argv)}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def test_the_recipe_parses_into_the_five_commands_and_every_substitution_applies():
    text = README.read_text()
    commands = recipe_commands(text)
    assert [subcommand(c) for c in commands] == ["encode", "train", "train", "sample", "eval", "compare"]
    joined = "\n".join(commands)
    for written, _ in SUBSTITUTIONS:
        assert written in joined, f"the README recipe no longer says {written!r}: update SUBSTITUTIONS"


def test_dry_run_excerpt_matches_the_command():
    block = next(b for b in fenced_blocks(README.read_text()) if b.startswith("$ reglue train"))
    command, shown = block.split("\n", 1)
    done = subprocess.run(command[2:], shell=True, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"})
    assert done.returncode == 0 and done.stdout == shown


def test_the_imagenet_recipe_runs_as_written_at_real_model_sizes(tmp_path):
    env = {**os.environ, **make_stand_in_weights(tmp_path / "weights"), "OMP_NUM_THREADS": "1"}
    run([sys.executable, str(REPO / "scripts/toy_dataset.py"), str(tmp_path / "imagenet/train"), "--per-class", "1",
         "--size", "256"], tmp_path, env)
    for command in recipe_commands(README.read_text()):
        if subcommand(command) == "eval":  # where a cluster would put the downloaded VIRTUAL_imagenet256_labeled.npz
            run([str(BIN / "reglue"), "make-ref", str(tmp_path / "in256.h5"), "--out",
                 str(Path(env["REGLUE_REFERENCE_DIR"]) / "VIRTUAL_imagenet256_labeled.npz"), "--quiet"], tmp_path, env)
        out = run(runnable(command, tmp_path), tmp_path, env)
    assert "REGLUE" in out and "12.90" in out and "REGLUE Tables 1-2" in out  # the compare table
    assert (tmp_path / "runs/comp/compressor.pt").is_file() and (tmp_path / "runs/b2/fid.png").stat().st_size
    with np.load(tmp_path / "runs/b2/samples-400k/samples.npz") as samples:
        assert samples["arr_0"].shape == (4, 256, 256, 3) and samples["arr_0"].dtype == np.uint8
    metrics = json.loads((tmp_path / "runs/b2/eval/0400000.json").read_text())
    assert metrics["n"] == 4 and np.isfinite(metrics["fid"]) and metrics["sample_info"]["preset"] == "sit-b2-reglue"
    _run_python_api_block(tmp_path)


def _run_python_api_block(cwd: Path) -> None:
    code = fenced_blocks(README.read_text(), lang="python")[0].replace("0400000.pt", "0000002.pt")
    namespace: dict = {}
    old = os.getcwd()
    os.chdir(cwd)
    try:
        exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the README's own example
    finally:
        os.chdir(old)
    out = namespace["out"]
    assert out.velocity.shape == (2, 20, 32, 32) and out.cls_velocity.shape == (2, 768)
    assert namespace["config"].preset == "sit-b2-reglue" and namespace["model"].config.in_channels == 20
