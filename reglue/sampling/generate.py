"""Samples made on demand for the evaluator: checkpoint -> sampler -> uint8 images -> features, nothing written.

``GeneratedImages`` is an image reader as evaluation.extract reads them (``len``, ``shape``, ``batches``): the
images of indices [start, stop) are those `reglue sample` writes for the same settings, because they come from
the same fixed sampler chunks (``settings.chunk``), per-index seeds, labels and kernels. So generate-and-score
gives exactly the features, and the metrics, of `reglue sample` followed by `reglue eval`.
"""

from __future__ import annotations

import json

import numpy as np
import torch

from evaluation.determinism import deterministic_kernels, side_by_side
from reglue.constants import VAE_DOWNSAMPLE
from reglue.encoders.vae import load_vae
from reglue.sampling.run import Prepared, sample_chunk
from reglue.sampling.seeds import make_labels

PROVENANCE_KEYS = ("preset", "step", "decoder", "quantisation", "checkpoint", "num_classes")  # as samples.h5's


class GeneratedImages:
    """A model's samples as an evaluation image reader, generated chunk by chunk on ``device``."""

    def __init__(self, prepared: Prepared, device, vae: torch.nn.Module | None = None):
        self.prepared, self.device = prepared, torch.device(device)
        settings, cfg = prepared.settings, prepared.model.config
        self.vae = vae if vae is not None else load_vae(prepared.vae_id)[0].to(self.device)
        self.labels = make_labels(settings.n, cfg.num_classes, settings.seed, settings.balanced,
                                  list(settings.classes or []))
        resolution = cfg.input_size * VAE_DOWNSAMPLE
        self.shape = (settings.n, resolution, resolution, 3)
        self.name = f"generated in process from {prepared.attrs['checkpoint']}"
        self._last: tuple[range | None, np.ndarray | None] = (None, None)

    def __len__(self) -> int:
        return self.shape[0]

    def statistics(self) -> None:
        return None

    def provenance(self) -> dict:
        """What `reglue sample` would have recorded in samples.h5 (as evaluate's ``sample_info``)."""
        attrs = self.prepared.attrs
        return {**{k: attrs[k] for k in PROVENANCE_KEYS}, "settings": json.loads(attrs["settings"]),
                "environment": json.loads(attrs["environment"]), "stand_ins": json.loads(attrs["stand_ins"]),
                "ema": json.loads(attrs["ema"]), **({"nfe": attrs["nfe"]} if "nfe" in attrs else {}),
                **({"guide_sha256": attrs["guide_sha256"]} if "guide_sha256" in attrs else {}),
                "generated_in_process": True}

    def batches(self, batch: int, start: int = 0, stop: int | None = None):
        """uint8 (b, H, W, 3) arrays for images [start, stop)."""
        stop = len(self) if stop is None else stop
        for i in range(start, stop, batch):
            yield self.read(i, min(i + batch, stop))

    def read(self, start: int, stop: int) -> np.ndarray:
        """uint8 (stop - start, H, W, 3): the sampler chunks covering [start, stop), cut to it. On a CPU the chunks
        are generated side by side, each on one thread (the bits of one after the other)."""
        size, n = self.prepared.settings.chunk, len(self)
        needed = [range(c * size, min((c + 1) * size, n)) for c in range(start // size, (stop - 1) // size + 1)]
        made = {r: self._last[1] for r in needed if r == self._last[0]}  # a chunk straddling two reads: made once
        missing = [r for r in needed if r not in made]
        with deterministic_kernels(self.device):  # a GPU generates them one after the other
            made.update(zip(missing, side_by_side(*(lambda r=r: self._generate(r) for r in missing),
                                                  device=self.device)))
        self._last = (needed[-1], made[needed[-1]])
        return np.concatenate([made[r][max(start - r.start, 0) : stop - r.start] for r in needed])

    @torch.no_grad()
    def _generate(self, indices: range) -> np.ndarray:
        p = self.prepared
        return sample_chunk(p.model, self.vae, p.settings, indices, self.labels, self.device, p.path,
                            p.config.data.latent_scale, p.guide)["images"]
