"""The VFM registry: every entry's record matches the real timm architecture, token grids follow the resolution,
and a DINOv3 file in timm's format loads and gives features of the declared shapes."""

from __future__ import annotations

import pytest
import torch

from reglue.encoders.registry import DINOV3_B, VFM_REGISTRY
from reglue.encoders.vfm import VFM_ENV, load_vfm
from reglue_cli.main import main

TIMM_ENTRIES = [name for name, entry in VFM_REGISTRY.items() if entry.timm_id]


@pytest.mark.parametrize("name", TIMM_ENTRIES)
def test_each_record_matches_the_timm_architecture(name):
    import timm

    entry = VFM_REGISTRY[name]
    with torch.device("meta"):  # no memory, no initialisation: the giant builds in a blink too
        vit = timm.create_model(entry.timm_id, pretrained=False, num_classes=0, img_size=entry.image_size(256))
    assert (vit.patch_embed.patch_size[0], vit.embed_dim, len(vit.blocks), vit.num_prefix_tokens) == \
        (entry.patch, entry.width, entry.depth, entry.prefix_tokens)
    config = timm.data.resolve_model_data_config(vit)  # the family's own preprocessing, as timm publishes it
    assert tuple(config["mean"]) == pytest.approx(entry.mean) and tuple(config["std"]) == pytest.approx(entry.std)
    for resolution, grid in ((256, 16), (512, 32)):  # one VFM token per 2x2 latent patch
        assert entry.image_size(resolution) // entry.patch == grid
    assert entry.last_layers == tuple(range(entry.depth - 4, entry.depth))


@pytest.fixture(scope="module")
def dinov3_small_file(tmp_path_factory):
    """Random DINOv3-S/16 weights saved the way timm publishes them (model.safetensors)."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch16_dinov3", pretrained=False, num_classes=0, img_size=256)
    path = tmp_path_factory.mktemp("dinov3") / "model.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path))
    return path, vit.eval()


@pytest.mark.parametrize("resolution", [256, 512])
def test_a_dinov3_file_in_timms_format_loads_and_gives_the_declared_shapes(dinov3_small_file, resolution,
                                                                           monkeypatch):
    path, reference = dinov3_small_file
    entry = VFM_REGISTRY["dinov3-vits16"]
    monkeypatch.setenv(VFM_ENV, str(path))
    vfm = load_vfm("dinov3-vits16", entry.image_size(resolution))
    images = torch.randint(0, 256, (2, 3, resolution, resolution), dtype=torch.uint8)
    features = vfm(images, list(entry.last_layers))
    grid = resolution // 16
    assert features.local.shape == (2, 4 * entry.width, grid, grid)
    assert features.cls.shape == (2, entry.width) and features.tokens.shape == (2, 1 + grid * grid, entry.width)
    if resolution == 256:  # the same random weights, run by timm's own forward: the final normed tokens agree
        with torch.no_grad():
            final = reference.forward_features(vfm.preprocess(images))  # (N, 5 + 256, D), registers at 1..4
        torch.testing.assert_close(features.cls, final[:, 0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(features.tokens[:, 1:], final[:, entry.prefix_tokens:], rtol=1e-5, atol=1e-5)


def test_a_model_without_cls_gives_the_mean_patch_token_as_its_global_token():
    import timm

    from reglue.encoders.vfm import VisionFoundationModel

    entry = VFM_REGISTRY["siglip2-vitb16"]
    torch.manual_seed(0)
    vit = timm.create_model("vit_base_patch16_siglip_224", pretrained=False, num_classes=0, img_size=256, depth=2)
    vfm = VisionFoundationModel(vit, "siglip2-vitb16", 256, True, entry.mean, entry.std)
    images = torch.randint(0, 256, (2, 3, 256, 256), dtype=torch.uint8)
    features = vfm(images, [1])
    with torch.no_grad():
        x = (images.float() / 255 - 0.5) / 0.5  # SigLIP's preprocessing written out
        patches = vit.norm(vit.blocks(vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))))  # no prefix tokens
    torch.testing.assert_close(features.cls, patches.mean(dim=1), rtol=1e-5, atol=1e-5)
    assert features.tokens.shape == (2, 257, 768)
    torch.testing.assert_close(features.tokens[:, 1:], patches, rtol=1e-5, atol=1e-5)


def test_offline_without_weights_names_the_file_to_fetch(monkeypatch, capsys):
    monkeypatch.delenv(VFM_ENV, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from reglue.encoders.loading import ModelLoadError

    with pytest.raises(ModelLoadError, match=r"DINOv3 License.*timm/vit_base_patch16_dinov3.lvd1689m.*REGLUE_VFM"):
        load_vfm(DINOV3_B, 256)


def test_table1_n_resolves_with_dinov3_b(capsys):
    assert main(["train", "--preset", "table1-n", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "name: dinov3-vitb16" in out and "image_size: 256" in out


def test_dinov2_without_registers_loads_as_the_fd_dinov2_evaluator_loads_it(tmp_path, monkeypatch):
    """Training and evaluation must not disagree on DINOv2: the same file through both loaders."""
    import timm
    from safetensors.torch import save_file

    from evaluation.dinov2 import load_dinov2

    torch.manual_seed(1)
    native = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0)  # 518 px, 37x37
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in native.state_dict().items()}, str(path))
    ours = load_vfm("dinov2-vits14", 224, str(path)).vit
    theirs = load_dinov2(str(path), name="vit_small_patch14_dinov2.lvd142m")
    for (name, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        assert torch.equal(a, b), name
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_features(x), theirs.forward_features(x), rtol=0, atol=0)
