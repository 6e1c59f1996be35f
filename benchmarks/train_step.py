"""Training-step speed of our SiT against a reference-style SiT (timm blocks, explicit per-head attention).

Both are SiT-B/2 + REGLUE sized (20 input channels, [CLS] token, projector after block 4) and run the same
step: forward, the joint loss, backward, AdamW. Prints images/s for each and the ratio, per precision.
On a GPU it also reports model FLOPs utilisation.
Run: python benchmarks/train_step.py [--batch 8] [--steps 7] [--compile]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from reglue import presets  # noqa: E402
from reglue.models import build  # noqa: E402


def reference_model() -> nn.Module:
    """SiT-B/2 + REGLUE in the official layout (tests/official_layout.py): timm blocks, explicit attention."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from official_layout import OfficialSiT

    return OfficialSiT(in_channels=20, d=768, depth=12, heads=12, input_size=32, cls_dim=768, proj_dim=2048,
                       encoder_depth=4)


def reference_forward(model):
    def run(x, t, y, cls):
        velocity, projections, cls_velocity = model(x, t, y, cls_token=cls)
        return velocity, cls_velocity, projections
    return run


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
    ref = reference_model().to(device).train()
    print(f"SiT-B/2 + REGLUE, batch {batch}, median of {args.steps} alternating steps, device {device} "
          f"({torch.cuda.get_device_name() if device.type == 'cuda' else f'{torch.get_num_threads()} threads'})")
    for name in args.precisions.split(","):
        dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
        trainable = lambda m: [p for p in m.parameters() if p.requires_grad]  # noqa: E731
        steppers = {"reference": Stepper(reference_forward(ref), trainable(ref), batch, device, dtype),
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
