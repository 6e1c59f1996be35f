"""Every registry entry loads its weights in each published layout, and resizes positions and pixels as its family.

Layouts: timm's file for every entry, and the family's own release where it publishes one (torch.hub's DINOv2 and
DINOv3 files, DINO's and MAE's checkpoints, OpenAI CLIP's TorchScript archive, I-JEPA's training checkpoint). The
release layouts are built here from timm's keys by inverting timm's converters by hand. Large models are built on
the meta device (keys and shapes only, no memory); small and base models load real random-weight files and give
the same features from either layout. Position resizes and pixel preprocessing are checked against float64
references of each family's own run-time code (reference_resize.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
from reference_resize import antialiased_bicubic_matrix, bicubic_matrix, resize_grid

from reglue.encoders.loading import ModelLoadError
from reglue.encoders.registry import (
    POSITIONS_ANTIALIAS,
    POSITIONS_BICUBIC,
    POSITIONS_OFFSET,
    POSITIONS_ROPE,
    VFM_REGISTRY,
    VFMEntry,
)
from reglue.encoders.vfm import VisionFoundationModel, load_vfm
from reglue.encoders.weights import read_weights, resize_positions, unwrap_release, vit_from_state

# --- the families' release layouts, from timm's keys (each the inverse of what timm's converter undoes) ---

def dinov2_hub(state: dict) -> dict:
    """torch.hub's DINOv2 file: mask token, registers apart, [CLS] position inside pos_embed, SwiGLU w12/w3."""
    swiglu = _swiglu(state)
    out = {k.replace("mlp.fc1", "mlp.w12").replace("mlp.fc2", "mlp.w3") if swiglu else k: v for k, v in state.items()}
    dim = state["cls_token"].shape[-1]
    out["mask_token"] = torch.zeros(1, dim)
    if "reg_token" in out:  # timm folds the [CLS] position into cls_token; the hub keeps a row for it
        out["register_tokens"] = out.pop("reg_token")
        out["pos_embed"] = torch.cat([torch.zeros(1, 1, dim), out["pos_embed"]], dim=1)
    return out


def _swiglu(state: dict) -> bool:
    """The giant's packed SwiGLU: fc1 is twice as wide as fc2's input."""
    return state["blocks.0.mlp.fc1.weight"].shape[0] == 2 * state["blocks.0.mlp.fc2.weight"].shape[1]


def dinov3_hub(state: dict) -> dict:
    """DINOv3's own file: storage tokens, ls1/ls2.gamma, one qkv bias (k part zero) with its mask, RoPE periods."""
    out = {}
    for k, v in state.items():
        k = k.replace("reg_token", "storage_tokens").replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma")
        if k.endswith("attn.q_bias"):
            k, v = k.replace("q_bias", "qkv.bias"), torch.cat([v, torch.zeros_like(v), state[k.replace("q_", "v_")]])
        elif k.endswith("attn.v_bias"):
            continue
        out[k] = v
    dim = state["cls_token"].shape[-1]
    for k in [k for k in out if k.endswith("attn.qkv.weight")]:
        out.setdefault(k.replace("weight", "bias"), torch.zeros(3 * dim))  # the distilled models: all-zero biases
        out[k.replace("weight", "bias_mask")] = torch.ones(3 * dim)
    out.update({"mask_token": torch.zeros(1, dim), "rope_embed.periods": torch.ones(16)})
    return out


def openai_clip(state: dict) -> dict:
    """OpenAI CLIP's state: visual.* with conv1, ln_pre/ln_post, resblocks, in_proj; text tower beside it."""
    swaps = [("patch_embed.proj", "conv1"), ("pos_embed", "positional_embedding"),
             ("blocks.", "transformer.resblocks."),
             ("norm_pre", "ln_pre"), ("qkv.", "in_proj_"), ("attn.proj", "attn.out_proj"), ("mlp.fc1", "mlp.c_fc"),
             ("mlp.fc2", "mlp.c_proj"), ("norm1", "ln_1"), ("norm2", "ln_2")]
    out = {}
    for k, v in state.items():
        if k == "cls_token":
            out["visual.class_embedding"] = v[0, 0]
            continue
        if k == "norm.weight" or k == "norm.bias":
            out["visual." + k.replace("norm", "ln_post")] = v
            continue
        for a, b in swaps:
            k = k.replace(a, b)
        out["visual." + k] = v[0] if k == "positional_embedding" else v
    width = state["cls_token"].shape[-1]
    out["visual.proj"] = torch.zeros(width, 512)
    out.update({"logit_scale": torch.ones(()), "text_projection": torch.zeros(512, 512),
                "transformer.resblocks.0.ln_1.weight": torch.ones(512)})  # the text tower: not the VFM's
    return out


def ijepa_release(state: dict) -> dict:
    """I-JEPA's training checkpoint: the context encoder, the EMA target encoder (what is evaluated), predictor."""
    wrapped = {f"module.{k}": v for k, v in state.items()}
    return {"encoder": {k: torch.zeros_like(v) for k, v in wrapped.items()}, "target_encoder": wrapped,
            "predictor": {"module.predictor_embed.weight": torch.zeros(4, 4)}, "epoch": 300}


RELEASES = {"dinov2": dinov2_hub, "dinov3": dinov3_hub, "clip": openai_clip, "ijepa": ijepa_release,
            "mae": lambda state: {"model": state}, "dino": lambda state: dict(state)}
TIMM_ENTRIES = [name for name, entry in VFM_REGISTRY.items() if entry.timm_id]


def _layouts(name: str) -> list[str]:
    return ["timm"] + (["release"] if VFM_REGISTRY[name].hub_file else [])


def _release(name: str, state: dict) -> dict:
    return RELEASES[name.split("-")[0]](state)


def test_every_entry_with_a_release_file_has_a_layout_here():
    for name in TIMM_ENTRIES:
        assert (VFM_REGISTRY[name].hub_file is not None) == (name.split("-")[0] in RELEASES) or name.startswith(
            "siglip2"), name  # SigLIP 2: big_vision's npz is not supported, timm's file only


@pytest.mark.parametrize("name, layout", [(n, lay) for n in TIMM_ENTRIES for lay in _layouts(n)])
def test_each_entry_loads_each_published_layout_at_256_and_512(name, layout):
    entry = VFM_REGISTRY[name]
    with torch.device("meta"):  # the real architecture, no memory: the 1.1B-parameter giant too
        native = timm.create_model(entry.timm_id, pretrained=False, num_classes=0)
        state = native.state_dict()
        state = unwrap_release(_release(name, state)) if layout == "release" else state
        for resolution, grid in ((256, 16), (512, 32)):
            vit = vit_from_state(entry, entry.image_size(resolution), state)  # strict: every parameter found
            assert tuple(vit.patch_embed.grid_size) == (grid, grid)
            if getattr(vit, "pos_embed", None) is not None:
                table_prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
                assert vit.pos_embed.shape == (1, table_prefix + grid * grid, entry.width)


def _save_safetensors(state: dict, path) -> str:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return str(path)


def _save_torchscript(state: dict, path) -> str:
    """A TorchScript archive whose state dict is ``state`` (OpenAI CLIP publishes its weights this way)."""

    class Holder(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    root = Holder()
    for key, value in state.items():
        *parents, leaf = key.split(".")
        module = root
        for part in parents:
            if part not in module._modules:
                module.add_module(part, Holder())
            module = module._modules[part]
        module.register_parameter(leaf, nn.Parameter(value.clone(), requires_grad=False))
    with pytest.warns(Warning):  # torch.jit is deprecated; OpenAI's files still use it
        torch.jit.save(torch.jit.script(root), str(path))
    return str(path)


def _features_from_both_layouts(tmp_path, name: str, seed: int, save_release) -> tuple:
    """Random weights for ``name`` saved in timm's and the family's layout, loaded at 256 px: the two VFMs."""
    entry = VFM_REGISTRY[name]
    torch.manual_seed(seed)
    state = {k: v + 0.02 * torch.randn_like(v) if v.is_floating_point() else v  # no zero biases hiding a swap
             for k, v in timm.create_model(entry.timm_id, pretrained=False, num_classes=0).state_dict().items()}
    timm_file = _save_safetensors(state, tmp_path / "model.safetensors")
    release_file = save_release(_release(name, state), tmp_path / entry.hub_file)
    size = entry.image_size(256)
    return state, load_vfm(name, size, timm_file), load_vfm(name, size, release_file)


def _same_features(a: VisionFoundationModel, b: VisionFoundationModel, entry: VFMEntry) -> None:
    images = torch.randint(0, 256, (2, 3, 256, 256), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    fa, fb = a(images, list(entry.last_layers)), b(images, list(entry.last_layers))
    assert fa.local.shape == (2, 4 * entry.width, 16, 16)  # the declared shapes: maps, [CLS], REPA target
    assert fa.cls.shape == (2, entry.width) and fa.tokens.shape == (2, 1 + 256, entry.width)
    for x, y in zip(fa, fb):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_dinov3_release_file_gives_the_features_of_timms_file(tmp_path):
    entry = VFM_REGISTRY["dinov3-vits16"]
    _, ours, theirs = _features_from_both_layouts(tmp_path, "dinov3-vits16", 0, lambda s, p: torch.save(s, p) or p)
    _same_features(ours, theirs, entry)


def test_openai_clip_torchscript_file_gives_the_features_of_timms_file_and_open_clips_position_resize(tmp_path):
    entry = VFM_REGISTRY["clip-vitb16"]
    state, ours, theirs = _features_from_both_layouts(tmp_path, "clip-vitb16", 1, _save_torchscript)
    _same_features(ours, theirs, entry)
    table = state["pos_embed"][0].double().numpy()  # [CLS] row, then 14 x 14 (224 px)
    want = resize_grid(table[1:].reshape(14, 14, -1), bicubic_matrix(14, 16, 16 / 14)).reshape(256, -1)
    np.testing.assert_allclose(theirs.vit.pos_embed[0, 1:].double().numpy(), want, atol=1e-5, rtol=0)
    np.testing.assert_allclose(theirs.vit.pos_embed[0, 0].double().numpy(), table[0], atol=0, rtol=0)


@pytest.mark.parametrize("name", ["mae-vitb16"])  # DINO's file is timm's layout; its rule: the float64 test below
def test_release_checkpoints_resize_positions_as_the_familys_code(tmp_path, name):
    """MAE's interpolate_pos_embed (bicubic to the grid; DINO's scale (16.1)/14 rule takes the same code path)."""
    entry = VFM_REGISTRY[name]
    state, ours, theirs = _features_from_both_layouts(tmp_path, name, 2, lambda s, p: torch.save(s, p) or p)
    _same_features(ours, theirs, entry)
    table = state["pos_embed"][0].double().numpy()[1:].reshape(14, 14, -1)
    weights = bicubic_matrix(14, 16, 16.1 / 14 if name.startswith("dino") else 16 / 14)
    want = resize_grid(table, weights).reshape(256, -1)
    np.testing.assert_allclose(theirs.vit.pos_embed[0, 1:].double().numpy(), want, atol=1e-5, rtol=0)


def test_ijepa_release_gives_the_ema_target_encoder(tmp_path):
    torch.manual_seed(0)
    state = {"pos_embed": torch.randn(1, 4, 8), "blocks.0.attn.qkv.weight": torch.randn(24, 8)}
    torch.save(ijepa_release(state), tmp_path / "IN1K-vit.h.14-300e.pth.tar")
    got = read_weights(str(tmp_path / "IN1K-vit.h.14-300e.pth.tar"))
    assert got.keys() == state.keys() and all(torch.equal(got[k], v) for k, v in state.items())


@pytest.mark.parametrize("rule, m, grid", [(POSITIONS_BICUBIC, 14, 16), (POSITIONS_BICUBIC, 16, 32),
                                           (POSITIONS_OFFSET, 14, 16), (POSITIONS_OFFSET, 37, 32),
                                           (POSITIONS_ANTIALIAS, 37, 16), (POSITIONS_ANTIALIAS, 37, 32),
                                           (POSITIONS_ROPE, 14, 16)])
def test_position_rules_against_float64_references(rule, m, grid):
    torch.manual_seed(0)
    table_prefix = 0 if rule == POSITIONS_ANTIALIAS else 1
    pos = torch.randn(1, table_prefix + m * m, 6)
    got = resize_positions(VFMEntry(patch=16, width=6, depth=4, positions=rule), pos, grid, table_prefix)
    if rule == POSITIONS_ROPE:
        assert got is pos
        return
    weights = {POSITIONS_BICUBIC: bicubic_matrix(m, grid, grid / m), POSITIONS_ANTIALIAS:
               antialiased_bicubic_matrix(m, grid), POSITIONS_OFFSET: bicubic_matrix(m, grid, (grid + 0.1) / m)}[rule]
    table = pos[0, table_prefix:].double().numpy().reshape(m, m, -1)
    np.testing.assert_allclose(got[0, table_prefix:].double().numpy(), resize_grid(table, weights).reshape(-1, 6),
                               atol=1e-5, rtol=0)
    assert torch.equal(got[:, :table_prefix], pos[:, :table_prefix])


# each family's own preprocessing constants, as its code publishes them (not read from the registry)
FAMILY_PIXELS = {"dinov2": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # torchvision ImageNet, as REPA feeds them
                 "dinov3": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # dinov3 make_transform (LVD-1689M)
                 "dino": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
                 "mae": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
                 "ijepa": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
                 "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),  # clip.py
                 "siglip2": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))}  # transformers' SiglipImageProcessor


@pytest.mark.parametrize("name", TIMM_ENTRIES)
def test_preprocessing_equals_the_familys_resize_then_normalise_in_float64(name):
    entry = VFM_REGISTRY[name]
    mean, std = (np.array(c).reshape(3, 1, 1) for c in FAMILY_PIXELS[name.split("-")[0]])
    size = entry.image_size(256)
    vfm = VisionFoundationModel(nn.Identity(), name, size, True, entry.mean, entry.std)
    images = torch.randint(0, 256, (1, 3, 256, 256), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    pixels = images[0].double().numpy().transpose(1, 2, 0) / 255  # (H, W, 3)
    if size != 256:  # bicubic without antialiasing (REPA's F.interpolate), then the family's mean/std
        pixels = resize_grid(pixels, bicubic_matrix(256, size, size / 256))
    want = (pixels.transpose(2, 0, 1) - mean) / std
    # PyTorch computes source coordinates in float32 (up to 255, spacing 1.5e-5): with the cubic's slope and a
    # normalised pixel range of ~4.4, a few 1e-4 are its rounding, not a different rule (which moves by 1e-2)
    np.testing.assert_allclose(vfm.preprocess(images)[0].double().numpy(), want, atol=5e-4, rtol=0)


def test_a_file_of_another_model_is_one_line_naming_it(tmp_path):
    path = _save_safetensors({"pos_embed": torch.zeros(1, 5, 8)}, tmp_path / "foreign.safetensors")
    with pytest.raises(ModelLoadError, match=r"cannot load VFM mae-vitb16 from .*foreign.safetensors: .*mae_pretrain"):
        load_vfm("mae-vitb16", 256, path)


def test_docs_models_md_holds_the_registry_table():
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("vfm_table", root / "scripts" / "vfm_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.vfm_table() in (root / "docs" / "models.md").read_text(), "docs/models.md: run scripts/vfm_table.py"
