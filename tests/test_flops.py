"""FLOPs per forward pass, counted the DiT way (one multiply-add = one FLOP), against DiT's published Table 4
numbers (an independent source: the same backbone as SiT) and against a closed-form count written out here."""

import pytest

from reglue import presets
from reglue.models.flops import forward_gflops

DIT_TABLE4_GFLOPS = {"sit-s2": 6.06, "sit-b2": 23.01, "sit-l2": 80.71, "sit-xl2": 118.64}  # DiT-{S,B,L,XL}/2, 256 px


@pytest.mark.parametrize("preset", sorted(DIT_TABLE4_GFLOPS))
def test_plain_sit_matches_the_dit_paper_within_one_percent(preset):
    assert forward_gflops(presets.load(preset)) == pytest.approx(DIT_TABLE4_GFLOPS[preset], rel=0.01)


def closed_form_gflops(depth, width, tokens, in_channels, out_channels, patch, freq=256):
    """Multiply-adds of a SiT forward written out layer by layer (adaLN-Zero blocks, 4x MLP)."""
    per_block = (tokens * width * 3 * width  # qkv
                 + 2 * tokens * tokens * width  # q k^T and attention x v
                 + tokens * width * width  # output projection
                 + 2 * tokens * width * 4 * width  # MLP
                 + width * 6 * width)  # adaLN modulation of the conditioning vector
    stem = tokens * in_channels * patch * patch * width + freq * width + width * width  # patches, time MLP
    head = width * 2 * width + tokens * width * patch * patch * out_channels  # final adaLN and linear
    return (depth * per_block + stem + head) / 1e9


def test_reglue_counts_its_cls_token_and_semantic_channels():
    config = presets.load("sit-b2-reglue")
    m = config.model
    tokens = (m.input_size // m.patch_size) ** 2 + 1  # + the [CLS] token
    expected = closed_form_gflops(m.depth, m.hidden_size, tokens, m.in_channels, m.in_channels, m.patch_size)
    counted = forward_gflops(config)
    assert counted == pytest.approx(expected, rel=0.005)  # the [CLS] embedder/head are a few MFLOPs
    assert counted > forward_gflops(presets.load("sit-b2"))


@pytest.mark.parametrize("preset, published", [("sit-b2", 23.0), ("sit-xl2", 118.6)])
def test_train_dry_run_json_shows_the_forward_gflops(preset, published, capsys):
    import json

    from reglue_cli.main import main

    assert main(["train", "--preset", preset, "--dry-run", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["gflops_forward"] == pytest.approx(published, rel=0.01)


def test_mfu_uses_the_datasheet_peak_of_the_gpu_and_precision():
    from reglue.training.throughput import peak_tflops, training_figures

    assert peak_tflops("NVIDIA H100 PCIe", "bf16", True) == 756.0
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bf16", True) == 989.4
    assert peak_tflops("NVIDIA A100-SXM4-80GB", "fp32", True) == 156.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB", "fp32", False) is None  # strict fp32: no tensor-core peak listed
    assert peak_tflops("Some Future GPU", "bf16", True) is None
    figures = training_figures(1000.0, 23.0, 989.4)
    assert figures["tflops_per_s"] == pytest.approx(1000 * 23.0 * 2 * 3 / 1e3)
    assert figures["mfu"] == pytest.approx(figures["tflops_per_s"] / 989.4)
