"""The model family: one SiT with optional semantic channels, [CLS] token and REPA projector; the compressor."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from reglue.config.model import ConfigError, ModelConfig, ProjectorConfig
from reglue.models.compressor import SemanticCompressor
from reglue.models.projector import ReprProjector
from reglue.models.sit import ModelOutput, SiT

__all__ = [
    "ConfigError", "ModelConfig", "ModelOutput", "ProjectorConfig", "ReprProjector", "SemanticCompressor", "SiT",
    "build", "build_compressor", "count_compressor_parameters", "count_parameters",
]


def _model_config(config) -> ModelConfig:
    """The ModelConfig of a run configuration, a ModelConfig, or a plain ``model`` section."""
    if isinstance(config, ModelConfig):
        return config
    if isinstance(config, Mapping):
        return ModelConfig.from_dict(config.get("model", config))
    return config.model


def build(config) -> SiT:
    """Build the diffusion model from a run configuration (or a ModelConfig, or a plain ``model`` section)."""
    return SiT(_model_config(config))


def build_compressor(config) -> SemanticCompressor:
    """Build the semantic compressor from a compressor run configuration."""
    return SemanticCompressor(list(config.compressor.channels))


def count_parameters(config) -> dict[str, int]:
    """Total, trainable and without-projector parameter counts, computed on the meta device (no memory)."""
    with torch.device("meta"):
        model = build(config)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    projector = sum(p.numel() for p in model.projector.parameters()) if model.projector is not None else 0
    return {"total": total, "trainable": trainable, "without_projector": total - projector, "projector": projector}


def count_compressor_parameters(config) -> dict[str, int]:
    """Encoder, decoder and total parameter counts of the semantic compressor."""
    with torch.device("meta"):
        compressor = build_compressor(config)
    encoder = sum(p.numel() for p in compressor.encoder.parameters())
    decoder = sum(p.numel() for p in compressor.decoder.parameters())
    return {"total": encoder + decoder, "encoder": encoder, "decoder": decoder}
