"""Training-step speed of our SiT against a reference-style SiT (timm blocks, explicit per-head attention).

Both are SiT-B/2 + REGLUE sized (20 input channels, [CLS] token, projector after block 4) and run the same
step: forward, the joint loss, backward, AdamW. Prints images/s for each and the ratio, per precision.
On a GPU it also reports model FLOPs utilisation. Run: python benchmarks/train_step.py [--batch 8] [--steps 7] [--compile]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
from timm.models.vision_transformer import Attention, Mlp, PatchEmbed

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from reglue import presets  # noqa: E402
from reglue.models import build  # noqa: E402


def _modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class RefBlock(nn.Module):
    """The reference block: timm Attention with fused attention off, timm Mlp, adaLN-Zero."""

    def __init__(self, d, heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(d, num_heads=heads, qkv_bias=True)
        self.attn.fused_attn = False
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(in_features=d, hidden_features=4 * d, act_layer=lambda: nn.GELU(approximate="tanh"))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))

    def forward(self, x, c):
        s1, sc1, g1, s2, sc2, g2 = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + g1.unsqueeze(1) * self.attn(_modulate(self.norm1(x), s1, sc1))
        return x + g2.unsqueeze(1) * self.mlp(_modulate(self.norm2(x), s2, sc2))


class RefSiT(nn.Module):
    """Reference-style SiT + REGLUE with the same sizes as ours."""

    def __init__(self, depth=12, d=768, heads=12, channels=20, cls_dim=768, enc_depth=4):
        super().__init__()
        self.channels, self.enc_depth = channels, enc_depth
        self.x_embedder = PatchEmbed(32, 2, channels, d, bias=True)
        self.t_mlp = nn.Sequential(nn.Linear(256, d), nn.SiLU(), nn.Linear(d, d))
        self.y_embedder = nn.Embedding(1001, d)
        self.pos_embed = nn.Parameter(torch.zeros(1, 257, d), requires_grad=False)
        self.blocks = nn.ModuleList(RefBlock(d, heads) for _ in range(depth))
        self.projector = nn.Sequential(nn.Linear(d, 2048), nn.SiLU(), nn.Linear(2048, 2048), nn.SiLU(),
                                       nn.Linear(2048, cls_dim))
        self.cls_in = nn.Linear(cls_dim, d)
        self.cls_norm = nn.LayerNorm(d, eps=1e-6)
        self.norm_final = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.final_mod = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))
        self.linear = nn.Linear(d, 4 * channels)
        self.linear_cls = nn.Linear(d, cls_dim)

    def forward(self, x, t, y, cls):
        freqs = torch.exp(-math.log(10000) * torch.arange(128, device=x.device) / 128)
        args = t[:, None].float() * freqs[None]
        c = self.t_mlp(torch.cat([args.cos(), args.sin()], -1).to(x.dtype)) + self.y_embedder(y)
        h = torch.cat([self.cls_norm(self.cls_in(cls)).unsqueeze(1), self.x_embedder(x)], 1) + self.pos_embed
        zs = None
        for i, block in enumerate(self.blocks):
            h = block(h, c)
            if i + 1 == self.enc_depth:
                zs = self.projector(h)
        shift, scale = self.final_mod(c).chunk(2, -1)
        h = _modulate(self.norm_final(h), shift, scale)
        out = self.linear(h[:, 1:]).reshape(x.shape[0], 16, 16, 2, 2, self.channels)
        out = torch.einsum("nhwpqc->nchpwq", out).reshape(x.shape[0], self.channels, 32, 32)
        return out, self.linear_cls(h[:, 0]), zs


def ours_forward(model):
    def run(x, t, y, cls):
        out = model(x, t, y, cls=cls, return_projections=True)
        return out.velocity, out.cls_velocity, out.projections
    return run


class Stepper:
    """One model's training step (forward + joint loss + backward + AdamW) on fixed random inputs."""

    def __init__(self, forward, params, batch, device, dtype):
        self.forward, self.device, self.dtype = forward, device, dtype
        self.opt = torch.optim.AdamW(params, lr=1e-4)
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(batch, 20, 32, 32, generator=gen).to(device)
        self.cls = torch.randn(batch, 768, generator=gen).to(device)
        self.target = torch.randn(batch, 257, 768, generator=gen).to(device)
        self.t = torch.rand(batch, generator=gen).to(device)
        self.y = torch.randint(0, 1000, (batch,), generator=gen).to(device)

    def __call__(self) -> float:
        """Seconds for one step."""
        ctx = torch.autocast(self.device.type, dtype=self.dtype) if self.dtype else \
            torch.autocast(self.device.type, enabled=False)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with ctx:
            v, cv, zs = self.forward(self.x, self.t, self.y, self.cls)
            loss = (v.float() - self.x).square().mean() + 0.03 * (cv.float() - self.cls).square().mean()
        cos = nn.functional.cosine_similarity(zs.float(), self.target, dim=-1).mean()
        (loss - 0.5 * cos).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start


def compare(steppers: dict, steps: int, warmup: int = 1) -> dict:
    """Median seconds per step of each stepper, run alternately so that machine drift hits all alike."""
    times = {name: [] for name in steppers}
    for i in range(warmup + steps):
        for name, step in steppers.items():
            elapsed = step()
            if i >= warmup:
                times[name].append(elapsed)
    return {name: sorted(v)[len(v) // 2] for name, v in times.items()}


def flops_per_image(depth=12, d=768, tokens=257) -> float:
    """Approximate training FLOPs per image (3x the forward's matmul FLOPs) for MFU."""
    per_block = 2 * tokens * (4 * d * d + 2 * d * 4 * d) + 2 * 2 * tokens * tokens * d + 2 * 6 * d * d
    return 3 * depth * per_block


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=None, help="default: 8 on CPU, 64 on GPU")
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of ours")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak for MFU (H100 SXM: 989)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch = args.batch or (64 if device.type == "cuda" else 8)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    ours = build(presets.load("sit-b2-reglue")).to(device).train()
    ref = RefSiT().to(device).train()
    print(f"SiT-B/2 + REGLUE, batch {batch}, median of {args.steps} alternating steps, device {device} "
          f"({torch.cuda.get_device_name() if device.type == 'cuda' else f'{torch.get_num_threads()} threads'})")
    for name in args.precisions.split(","):
        dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
        trainable = lambda m: [p for p in m.parameters() if p.requires_grad]  # noqa: E731
        steppers = {"reference": Stepper(ref, trainable(ref), batch, device, dtype),
                    "ours": Stepper(ours_forward(ours), trainable(ours), batch, device, dtype)}
        if args.compile:
            steppers["ours+compile"] = Stepper(ours_forward(torch.compile(ours)), trainable(ours), batch, device, dtype)
        secs = compare(steppers, args.steps, warmup=2 if args.compile else 1)
        parts = [f"{k} {batch / v:8.2f} img/s" for k, v in secs.items()]
        ratios = [f"{k}/reference {secs['reference'] / v:.2f}x" for k, v in secs.items() if k != "reference"]
        line = f"{name}: " + ", ".join(parts + ratios)
        if device.type == "cuda":
            best = min(v for k, v in secs.items() if k != "reference")
            line += f", MFU {flops_per_image() * batch / best / 1e12 / args.peak_tflops:.1%}"
        print(line)


if __name__ == "__main__":
    main()
