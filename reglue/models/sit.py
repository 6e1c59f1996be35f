"""The SiT backbone with REGLUE's optional parts: semantic channels, a [CLS] token and a REPA projector.

One implementation serves every row of the paper's ablation grid; a ModelConfig switches the parts on.
Shapes in comments use N = batch, C = input channels, H = W = input_size, T = tokens, D = hidden size,
p = patch size. Parameter names follow the DiT/SiT family so official weights map with a short table
(see reglue.checkpoints).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from reglue.config.model import ModelConfig
from reglue.constants import LAYER_NORM_EPS, TIME_FREQUENCY_DIM, TIME_MAX_PERIOD
from reglue.models.projector import build_projector


class ModelOutput(NamedTuple):
    """What SiT.forward returns."""

    velocity: torch.Tensor  # (N, C, H, W): latent channels first, then semantic channels
    cls_velocity: torch.Tensor | None  # (N, cls_dim) when the model has a [CLS] token
    projections: torch.Tensor | None  # (N, T, out_dim) REPA projections of all tokens, [CLS] first


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation: x (N, T, D), shift/scale (N, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_2d_embedding(dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding (grid_size**2, dim): first half encodes the column, second the row."""
    quarter = dim // 4
    omega = 1.0 / TIME_MAX_PERIOD ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # (dim/4,)
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")  # (G, G) each

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega  # (G*G, dim/4)
        return torch.cat([angles.sin(), angles.cos()], dim=1)  # (G*G, dim/2)

    return torch.cat([encode(cols), encode(rows)], dim=1).float()  # (G*G, dim)


def timestep_frequencies(t: torch.Tensor, dim: int = TIME_FREQUENCY_DIM) -> torch.Tensor:
    """Sinusoidal features of t in [0, 1] (unscaled): (N,) -> (N, dim), [cos, sin] halves."""
    half = dim // 2
    freqs = torch.exp(-math.log(TIME_MAX_PERIOD) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (N, dim/2)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    """t (N,) -> (N, D) through sinusoidal features and Linear-SiLU-Linear."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(TIME_FREQUENCY_DIM, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_frequencies(t).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels (N,) -> (N, D); row NULL_CLASS is the unconditional embedding, used by label dropout."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)  # +1: the null class
        self.null_class = num_classes
        self.dropout_prob = dropout_prob

    def drop_labels(self, labels: torch.Tensor, drop_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Replace labels by the null class where ``drop_mask`` is true (default: with probability dropout_prob)."""
        if drop_mask is None:
            drop_mask = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        return torch.where(drop_mask, torch.full_like(labels, self.null_class), labels)

    def forward(self, labels: torch.Tensor, drop_mask: torch.Tensor | None = None) -> torch.Tensor:
        if drop_mask is not None or (self.training and self.dropout_prob > 0):
            labels = self.drop_labels(labels, drop_mask)
        return self.embedding_table(labels)


class ClsEmbedder(nn.Module):
    """The noisy [CLS] state (N, cls_dim) -> one token (N, 1, D): Linear then affine LayerNorm."""

    def __init__(self, cls_dim: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Linear(cls_dim, hidden_size)
        self.norm = nn.LayerNorm(hidden_size, eps=LAYER_NORM_EPS)

    def forward(self, cls: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(cls)).unsqueeze(1)


class PatchEmbed(nn.Module):
    """(N, C, H, W) -> (N, H*W/p^2, D) with one strided convolution."""

    def __init__(self, in_channels: int, hidden_size: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def use_fused_kernel(q: torch.Tensor) -> bool:
    """SDPA everywhere except half precision on CPU, where its kernel measured 3x slower than two bf16 matmuls
    (fwd+bwd of 8x12x257x64: 43 ms against 15 ms, torch 2.14, docs/performance.md)."""
    return q.device.type != "cpu" or q.dtype == torch.float32


class Attention(nn.Module):
    """Multi-head self-attention through scaled_dot_product_attention, with optional qk-norm."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False, fused: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.fused = fused
        self.qkv = nn.Linear(dim, dim * 3)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (N, heads, T, head_dim) each
        q, k = self.q_norm(q), self.k_norm(k)
        if self.fused and use_fused_kernel(q):
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            weights = (q * self.head_dim**-0.5) @ k.transpose(-2, -1)  # (N, heads, T, T)
            out = weights.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(n, t, d))


class Mlp(nn.Module):
    """Linear - tanh-GELU - Linear."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning on c (N, D)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        d = config.hidden_size
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=LAYER_NORM_EPS)
        self.attn = Attention(d, config.num_heads, qk_norm=config.qk_norm, fused=config.fused_attn)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(d, int(d * config.mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm, then per-patch velocities and (optionally) the [CLS] velocity."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        d, p = config.hidden_size, config.patch_size
        self.norm_final = nn.LayerNorm(d, elementwise_affine=False, eps=LAYER_NORM_EPS)
        self.linear = nn.Linear(d, p * p * config.in_channels)
        self.linear_cls = nn.Linear(d, config.cls_dim) if config.cls_token else None
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        x = modulate(self.norm_final(x), shift, scale)  # (N, T, D)
        if self.linear_cls is None:
            return self.linear(x), None  # (N, T, p*p*C)
        return self.linear(x[:, 1:]), self.linear_cls(x[:, 0])  # (N, T-1, p*p*C), (N, cls_dim)


class SiT(nn.Module):
    """Scalable interpolant transformer over latents (+ semantics) with an optional [CLS] token and projector."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config  # checked when it was built (ModelConfig.__post_init__)
        d = config.hidden_size
        self.x_embedder = PatchEmbed(config.in_channels, d, config.patch_size)
        self.t_embedder = TimestepEmbedder(d)
        # an unconditional model (num_classes 0) has no label table: c = t embedding only
        self.y_embedder = LabelEmbedder(config.num_classes, d, config.class_dropout) if config.num_classes else None
        self.cls_embedder = ClsEmbedder(config.cls_dim, d) if config.cls_token else None
        num_tokens = config.num_patches + int(config.cls_token)
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, d), requires_grad=False)  # fixed sin-cos
        self.blocks = nn.ModuleList(SiTBlock(config) for _ in range(config.depth))
        self.projector = build_projector(config)  # MLP or conv (config.projector.kind), or None
        self.final_layer = FinalLayer(config)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Xavier linears, sin-cos positions, N(0, 0.02) embeddings, zero adaLN and output heads."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        grid = self.config.input_size // self.config.patch_size
        with torch.no_grad():
            self.pos_embed[0, int(self.config.cls_token):].copy_(sincos_2d_embedding(self.config.hidden_size, grid))
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        zeroed = [block.adaLN_modulation[-1] for block in self.blocks]
        zeroed += [self.final_layer.adaLN_modulation[-1], self.final_layer.linear, self.final_layer.linear_cls]
        for layer in filter(None, zeroed):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p*p*C) -> (N, C, H, W)."""
        p, c = self.config.patch_size, self.config.in_channels
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None,
        cls: torch.Tensor | None = None,
        return_projections: bool | None = None,
        drop_mask: torch.Tensor | None = None,
    ) -> ModelOutput:
        """Velocity of x (N, C, H, W) [and cls (N, cls_dim)] at times t (N,) for labels y (N,) (ignored, may be
        None, in an unconditional model).

        ``drop_mask`` (N,) bool replaces those labels by the null class (the training loop draws it from its own
        generator so that a run is reproducible); without it, training mode drops labels at random.
        """
        if (cls is None) == self.config.cls_token:
            need = "needs a [CLS] state (cls=...)" if self.config.cls_token else "has no [CLS] token; pass cls=None"
            raise ValueError(f"this model {need}")
        tokens = self.x_embedder(x)  # (N, T, D)
        if cls is not None:
            tokens = torch.cat([self.cls_embedder(cls), tokens], dim=1)  # (N, 1 + T, D)
        tokens = tokens + self.pos_embed
        c = self.t_embedder(t)  # (N, D)
        if self.y_embedder is not None:
            c = c + self.y_embedder(y, drop_mask)
        want_projections = self.training if return_projections is None else return_projections
        projections = None
        for depth, block in enumerate(self.blocks, start=1):
            tokens = block(tokens, c)
            if want_projections and self.projector is not None and depth == self.config.projector.depth:
                projections = self.projector(tokens)  # (N, T, out_dim)
        patches, cls_velocity = self.final_layer(tokens, c)
        return ModelOutput(self.unpatchify(patches), cls_velocity, projections)

    @property
    def null_class(self) -> int | None:
        """The label that means "no class" (classifier-free guidance): NULL_CLASS for ImageNet-1k; None when the
        model is unconditional."""
        return None if self.y_embedder is None else self.y_embedder.null_class
