"""The model part of a preset as a typed, validated dataclass."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from reglue.constants import LATENT_CHANNELS, NUM_CLASSES

SEMANTIC_SOURCES = ("none", "compressor", "pca")


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key."""


@dataclass(frozen=True)
class ProjectorConfig:
    """The REPA projector: an MLP on the hidden states after block ``depth`` (counted from 1)."""

    depth: int = 4
    hidden_dim: int = 2048
    out_dim: int = 768
    align_patch: bool = True
    align_cls: bool = True


@dataclass(frozen=True)
class ModelConfig:
    """Every switch of the SiT family; see docs/api.md for the meaning of each field."""

    depth: int = 12
    hidden_size: int = 768
    num_heads: int = 12
    patch_size: int = 2
    input_size: int = 32
    mlp_ratio: float = 4.0
    latent_channels: int = LATENT_CHANNELS
    semantic_channels: int = 0
    semantic_source: str = "none"
    cls_token: bool = False
    cls_dim: int = 768
    projector: ProjectorConfig | None = None
    qk_norm: bool = False
    num_classes: int = NUM_CLASSES
    class_dropout: float = 0.1
    fused_attn: bool = True
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def in_channels(self) -> int:
        """Channels of the spatial input: VAE latents then semantic channels."""
        return self.latent_channels + self.semantic_channels

    @property
    def num_patches(self) -> int:
        """Spatial tokens after patchification."""
        return (self.input_size // self.patch_size) ** 2

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        """Build from a preset's ``model`` section, rejecting unknown keys by name."""
        data = dict(data)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        unknown = sorted(set(data) - names - {"size"})
        if unknown:
            raise ConfigError(f"model: unknown key(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))}")
        data.pop("size", None)
        projector = data.pop("projector", None)
        if projector is not None:
            pnames = {f.name for f in dataclasses.fields(ProjectorConfig)}
            bad = sorted(set(projector) - pnames)
            if bad:
                raise ConfigError(f"model.projector: unknown key(s) {', '.join(bad)}; valid: {', '.join(sorted(pnames))}")
            projector = ProjectorConfig(**projector)
        config = cls(projector=projector, **data)
        config.validate()
        return config

    def to_dict(self) -> dict:
        """Plain-data form (what checkpoints and config.yaml store)."""
        data = dataclasses.asdict(self)
        data.pop("extra")
        return data

    def validate(self) -> None:
        """Raise ConfigError naming the first inconsistent field."""
        for name in ("depth", "hidden_size", "num_heads", "patch_size", "input_size", "latent_channels", "cls_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be at least 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"model.hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.hidden_size % 4:
            raise ConfigError(f"model.hidden_size {self.hidden_size} must be a multiple of 4 (2-D sin-cos embedding)")
        if self.input_size % self.patch_size:
            raise ConfigError(f"model.input_size {self.input_size} is not divisible by patch_size {self.patch_size}")
        if self.semantic_source not in SEMANTIC_SOURCES:
            raise ConfigError(f"model.semantic_source {self.semantic_source!r}: choose one of {', '.join(SEMANTIC_SOURCES)}")
        if (self.semantic_channels > 0) != (self.semantic_source != "none"):
            raise ConfigError(
                f"model.semantic_channels={self.semantic_channels} and semantic_source={self.semantic_source!r} disagree"
            )
        if not 0.0 <= self.class_dropout < 1.0:
            raise ConfigError(f"model.class_dropout {self.class_dropout} must lie in [0, 1)")
        if self.projector is not None:
            p = self.projector
            if not 1 <= p.depth <= self.depth:
                raise ConfigError(f"model.projector.depth {p.depth} must lie in 1..{self.depth}")
            if not (p.align_patch or p.align_cls):
                raise ConfigError("model.projector: align_patch and align_cls are both off; drop the projector instead")
            if p.align_cls and not self.cls_token:
                raise ConfigError("model.projector.align_cls needs model.cls_token: true")
