"""DINOv2 weight files in torch.hub's layout load into the timm models as the hub models would run at 224 px.

torch.hub's DINOv2 keeps a 37 x 37 position grid (trained at 518 px) and resizes it at run time in
``interpolate_pos_encoding``: without registers, bicubic with scale (16 + 0.1) / 37 and no antialiasing; with
registers, bicubic to size 16 with antialiasing. The files here have random weights and the hub's keys
(``mask_token``, ``register_tokens``, [CLS] position inside ``pos_embed``), built from timm models in code.
"""

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from reference_resize import bicubic_matrix

HUB_GRID, GRID = 37, 16


def _hub_state(name: str, seed: int) -> dict:
    """A random state dict in torch.hub's DINOv2 layout for the timm model ``name`` (at the native 518 px)."""
    torch.manual_seed(seed)
    state = timm.create_model(name, pretrained=False, num_classes=0).state_dict()
    dim = state["cls_token"].shape[-1]
    state["mask_token"] = torch.randn(1, dim)
    state = {k: torch.randn_like(v) * 0.02 if v.dim() else v for k, v in state.items()}
    if "reg_token" in state:  # timm folds the [CLS] position into cls_token and keeps registers apart
        state["register_tokens"] = state.pop("reg_token")
        state["pos_embed"] = torch.cat([torch.randn(1, 1, dim) * 0.02, state["pos_embed"]], dim=1)
    assert state["pos_embed"].shape == (1, 1 + HUB_GRID * HUB_GRID, dim)
    return state


def test_fd_dinov2_model_resizes_positions_as_torch_hub(tmp_path):
    from evaluation.dinov2 import load_dinov2

    state = _hub_state("vit_small_patch14_dinov2", seed=0)  # ViT-S/14: the L/14 code path, 15x fewer weights
    torch.save(state, tmp_path / "dinov2_vits14_pretrain.pth")
    model = load_dinov2(str(tmp_path / "dinov2_vits14_pretrain.pth"), name="vit_small_patch14_dinov2.lvd142m")
    pos = state["pos_embed"][0].double().numpy()
    grid = pos[1:].reshape(HUB_GRID, HUB_GRID, -1)
    w = bicubic_matrix(HUB_GRID, GRID, (GRID + 0.1) / HUB_GRID)
    want = np.concatenate([pos[:1], np.einsum("ia,abd,jb->ijd", w, grid, w).reshape(GRID * GRID, -1)])
    got = model.pos_embed[0].double().numpy()
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    timm_default = F.interpolate(torch.from_numpy(grid).permute(2, 0, 1)[None].float(), size=GRID, mode="bicubic",
                                 antialias=True)[0].permute(1, 2, 0).reshape(GRID * GRID, -1).double().numpy()
    assert np.abs(got[1:] - timm_default).max() > 1e-3  # the distinction matters
    torch.testing.assert_close(model.blocks[3].attn.qkv.weight, state["blocks.3.attn.qkv.weight"])
    with torch.inference_mode():
        assert model(torch.zeros(2, 3, 224, 224)).shape == (2, 384)


@pytest.mark.parametrize("layout", ["hub", "timm"])
def test_reglue_vfm_file_in_either_layout_gives_the_hub_model(tmp_path, layout):
    from reglue.encoders.vfm import DINOV2_B_REG, load_vfm

    state = _hub_state("vit_base_patch14_reg4_dinov2", seed=1)
    cls_pos = state["pos_embed"][:, :1]
    want_pos = F.interpolate(state["pos_embed"][:, 1:].reshape(1, HUB_GRID, HUB_GRID, -1).permute(0, 3, 1, 2),
                             size=GRID, mode="bicubic", antialias=True)  # the hub's call for register models
    want_pos = want_pos.permute(0, 2, 3, 1).reshape(1, GRID * GRID, -1)
    if layout == "timm":  # what timm's own safetensors holds: no mask token, [CLS] position folded in
        native = timm.create_model("vit_base_patch14_reg4_dinov2", pretrained=False, num_classes=0)
        native.load_state_dict({**{k: v for k, v in state.items() if k not in ("mask_token", "register_tokens")},
                                "reg_token": state["register_tokens"], "cls_token": state["cls_token"] + cls_pos,
                                "pos_embed": state["pos_embed"][:, 1:]})
        file = tmp_path / "model.safetensors"
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in native.state_dict().items()}, str(file))
    else:
        file = tmp_path / "dinov2_vitb14_reg4_pretrain.pth"
        torch.save(state, file)
    vit = load_vfm(DINOV2_B_REG, 224, str(file)).vit
    torch.testing.assert_close(vit.pos_embed, want_pos, atol=1e-5, rtol=0)
    torch.testing.assert_close(vit.reg_token, state["register_tokens"])
    torch.testing.assert_close(vit.cls_token, state["cls_token"] + cls_pos)  # the hub adds it at run time
    torch.testing.assert_close(vit.blocks[11].mlp.fc2.weight, state["blocks.11.mlp.fc2.weight"])


@pytest.mark.parametrize("name, timm_name", [("dinov2-vits14", "vit_small_patch14_dinov2"),
                                             ("dinov2-vits14-reg", "vit_small_patch14_reg4_dinov2")])
def test_registry_entries_load_the_hub_file_as_the_hub_runs_it(tmp_path, name, timm_name):
    """Each DINOv2 family of the registry from torch.hub's file: positions as the hub resizes them at run time
    (without registers: scale (16 + 0.1) / 37, no antialias, checked in float64; with: timm's load-time resize)."""
    from reglue.encoders.vfm import load_vfm

    state = _hub_state(timm_name, seed=2)
    torch.save(state, tmp_path / "hub.pth")
    vit = load_vfm(name, 224, str(tmp_path / "hub.pth")).vit
    pos = state["pos_embed"][0].double().numpy()
    grid = pos[1:].reshape(HUB_GRID, HUB_GRID, -1)
    if "reg" in name:
        want = F.interpolate(torch.from_numpy(grid).permute(2, 0, 1)[None].float(), size=GRID, mode="bicubic",
                             antialias=True)[0].permute(1, 2, 0).reshape(GRID * GRID, -1).double().numpy()
        got = vit.pos_embed[0].double().numpy()
    else:
        w = bicubic_matrix(HUB_GRID, GRID, (GRID + 0.1) / HUB_GRID)
        want = np.einsum("ia,abd,jb->ijd", w, grid, w).reshape(GRID * GRID, -1)
        got = vit.pos_embed[0, 1:].double().numpy()
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(vit.blocks[5].attn.qkv.weight, state["blocks.5.attn.qkv.weight"])
