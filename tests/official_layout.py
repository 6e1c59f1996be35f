"""Test helper: a SiT and compressor written in the official REG/REGLUE/REPA layout (official names).

Small in the tests; benchmarks/train_step.py builds it at SiT-B/2 size as its reference-style model.

Written for the tests from the official code's structure (timm's PatchEmbed/Attention/Mlp, explicit softmax
attention, the official parameter names) and never imported from reglue, so that loading its state dict into
reglue checks the name mapping and the numerics independently.
"""

import math
import zipfile

import numpy as np
import torch
import torch.nn as nn
from timm.models.vision_transformer import Attention, Mlp, PatchEmbed


def _modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class _Timesteps(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(256, d), nn.SiLU(), nn.Linear(d, d))

    def forward(self, t):
        freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32, device=t.device) / 128)
        args = t[:, None].float() * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class _Labels(nn.Module):
    def __init__(self, d, num_classes):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, d)  # + the null class (cfg_prob > 0)

    def forward(self, y):
        return self.embedding_table(y)


class _Block(nn.Module):
    def __init__(self, d, heads, qk_norm):
        super().__init__()
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(d, num_heads=heads, qkv_bias=True, qk_norm=qk_norm, norm_layer=nn.LayerNorm)
        self.attn.fused_attn = False  # explicit softmax attention, unlike reglue's default
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(in_features=d, hidden_features=4 * d, act_layer=lambda: nn.GELU(approximate="tanh"), drop=0)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))

    def forward(self, x, c):
        s1, sc1, g1, s2, sc2, g2 = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + g1.unsqueeze(1) * self.attn(_modulate(self.norm1(x), s1, sc1))
        return x + g2.unsqueeze(1) * self.mlp(_modulate(self.norm2(x), s2, sc2))


class _Final(nn.Module):
    def __init__(self, d, out, cls_dim, with_cls):
        super().__init__()
        self.norm_final = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(d, 4 * out)
        if with_cls:
            self.linear_cls = nn.Linear(d, cls_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))


class OfficialSiT(nn.Module):
    """Official layout; ``with_cls`` gives REG/REGLUE (257-row pos_embed), without it REPA (256 rows)."""

    def __init__(self, in_channels=20, d=128, depth=2, heads=2, input_size=8, cls_dim=16, proj_dim=24,
                 encoder_depth=1, with_cls=True, with_projector=True, qk_norm=False, num_classes=1000):
        super().__init__()
        self.in_channels, self.encoder_depth, self.with_cls = in_channels, encoder_depth, with_cls
        self.x_embedder = PatchEmbed(input_size, 2, in_channels, d, bias=True)
        self.t_embedder = _Timesteps(d)
        self.y_embedder = _Labels(d, num_classes)
        n = self.x_embedder.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, n + int(with_cls), d), requires_grad=False)
        self.blocks = nn.ModuleList(_Block(d, heads, qk_norm) for _ in range(depth))
        if with_projector:
            mlp = [nn.Linear(d, proj_dim), nn.SiLU(), nn.Linear(proj_dim, proj_dim), nn.SiLU(),
                   nn.Linear(proj_dim, cls_dim)]
            self.projectors = nn.ModuleList([nn.Sequential(*mlp)])
        self.final_layer = _Final(d, in_channels, cls_dim, with_cls)
        if with_cls:
            self.cls_projectors2 = nn.Linear(cls_dim, d)
            self.wg_norm = nn.LayerNorm(d, elementwise_affine=True, eps=1e-6)

    def forward(self, x, t, y, cls_token=None):
        """(velocity, projections or None, cls velocity or None)."""
        x = self.x_embedder(x)
        if self.with_cls:
            x = torch.cat([self.wg_norm(self.cls_projectors2(cls_token)).unsqueeze(1), x], dim=1)
        x = x + self.pos_embed
        n, tokens, d = x.shape
        c = self.t_embedder(t) + self.y_embedder(y)
        zs = None
        for i, block in enumerate(self.blocks):
            x = block(x, c)
            if i + 1 == self.encoder_depth and hasattr(self, "projectors"):
                zs = self.projectors[0](x.reshape(-1, d)).reshape(n, tokens, -1)
        f = self.final_layer
        shift, scale = f.adaLN_modulation(c).chunk(2, dim=-1)
        x = _modulate(f.norm_final(x), shift, scale)
        cls_out = f.linear_cls(x[:, 0]) if self.with_cls else None
        x = f.linear(x[:, 1:] if self.with_cls else x)
        h = int(x.shape[1] ** 0.5)
        x = x.reshape(n, h, h, 2, 2, self.in_channels)
        x = torch.einsum("nhwpqc->nchpwq", x).reshape(n, self.in_channels, 2 * h, 2 * h)
        return x, zs, cls_out


class OfficialResidualBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + x)


class _Stack(nn.Module):
    def __init__(self, channels):
        super().__init__()
        layers = []
        for i in range(len(channels) - 1):
            layers.append(nn.Conv2d(channels[i], channels[i + 1], 3, padding=1))
            if i < len(channels) - 2:
                layers.append(OfficialResidualBlock(channels[i + 1]))
        self.model = nn.Sequential(*layers)

    def forward(self, x):
        return self.model(x)


class OfficialEncoderDecoder(nn.Module):
    """The official compressor's names: encoder.model.I..., decoder.model.I... (decoder on the reversed list)."""

    def __init__(self, channels):
        super().__init__()
        self.encoder, self.decoder = _Stack(channels), _Stack(channels[::-1])


def randomize(module, seed=0):
    """Random non-zero values in every parameter (zero-initialised heads too) and BatchNorm statistics."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        for name, b in module.named_buffers():
            if "running_var" in name:
                b.copy_(torch.rand(b.shape, generator=gen) + 0.5)
            elif "running_mean" in name:
                b.copy_(torch.randn(b.shape, generator=gen) * 0.1)
    return module


def numpy_stats(channels, seed=0):
    """What the official calc_norm_stats.py saves: {'mean', 'std'} float32 numpy arrays."""
    rng = np.random.default_rng(seed)
    return {"mean": rng.standard_normal(channels).astype(np.float32),
            "std": (rng.random(channels) + 0.5).astype(np.float32)}


def rename_pickle_global(path, old: bytes, new: bytes) -> None:
    """Rewrite a torch.save zip so its pickle names ``new`` where it said ``old`` (e.g. numpy 1.x module names)."""
    with zipfile.ZipFile(path) as z:
        entries = [(info.filename, z.read(info.filename)) for info in z.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, data in entries:
            if name.endswith("data.pkl"):
                assert old in data, f"{old!r} not in the pickle"
                data = data.replace(old, new)
            z.writestr(name, data)
