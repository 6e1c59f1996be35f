"""FLOPs of one forward pass, counted as the DiT paper counts them: one multiply-add is one FLOP.

Counted, not estimated: torch's FlopCounterMode runs the model's own forward on the meta device (no memory, no
arithmetic) and adds up every matmul, convolution and attention call; it counts a multiply-add as two, so the
total is halved. SiT-B/2 gives 23.0 and SiT-XL/2 118.6 GFLOPs at 256 px, DiT's Table 4 numbers.
"""

from __future__ import annotations

import torch

from reglue.models import build

FLOPS_PER_MAC = 2  # torch's counter: a multiply and an add; DiT's convention counts the pair once


def forward_gflops(config) -> float:
    """GFLOPs (multiply-adds, 1e9) of one sample's forward pass, [CLS] token and semantic channels included, REPA
    projector excluded (it runs in training only)."""
    from torch.utils.flop_counter import FlopCounterMode


    with torch.device("meta"):
        model = build(config).eval()
    cfg = model.config
    x = torch.empty(1, cfg.in_channels, cfg.input_size, cfg.input_size, device="meta")
    t = torch.empty(1, device="meta")
    y = torch.zeros(1, dtype=torch.long, device="meta")
    cls = torch.empty(1, cfg.cls_dim, device="meta") if cfg.cls_token else None
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x, t, y, cls=cls, return_projections=False)
    return counter.get_total_flops() / FLOPS_PER_MAC / 1e9
