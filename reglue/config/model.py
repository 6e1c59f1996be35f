"""The model part of a run configuration as a typed, validated dataclass (the ``model`` section of a preset)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

from reglue.config.schema import (
    FRACTION,
    MAX_CLASSES,
    MAX_DEPTH,
    MAX_GRID,
    MAX_HEADS,
    MAX_PATCH,
    MAX_WIDTH,
    count,
    knob,
    optional,
    parse,
    plain,
)
from reglue.constants import LATENT_CHANNELS, NUM_CLASSES
from reglue.errors import ConfigError

__all__ = ["ConfigError", "ModelConfig", "ProjectorConfig", "SEMANTIC_SOURCES"]

SEMANTIC_SOURCES = ("none", "compressor", "pca")
PROJECTOR_KINDS = ("mlp", "conv")
TARGET_NORMS = ("none", "spatial")
CLASS_DROPOUT = 0.1  # label dropout of a class-conditional model (the official --cfg-prob)
MAX_MLP_RATIO = 64.0
MAX_PARAMETERS = 10**10  # 15x SiT-XL/2's 675M: refused at load, before anything is built (estimated_parameters)
WIDTH = count(MAX_WIDTH)


@dataclass(frozen=True)
class ProjectorConfig:
    """REPA: the projector on the hidden states after block ``depth`` (counted from 1) and its target's form."""

    depth: int = knob(4, "block (counted from 1) whose hidden states are projected: 4 for B/2, 8 for L/2 and XL/2",
                      count(MAX_DEPTH))
    kind: Literal["mlp", "conv"] = knob("mlp", "mlp: REPA's per-token 3-layer SiLU MLP; conv: iREPA's 3x3 convolution "
                                               "on the patch grid ([CLS]: its centre tap)")
    hidden_dim: int = knob(2048, f"hidden width of the 3-layer SiLU MLP (1..{MAX_WIDTH}; kind mlp only)", WIDTH)
    out_dim: int = knob(768, f"output width: the VFM's token width (1..{MAX_WIDTH})", WIDTH)
    align_patch: bool = knob(True, "align the projected patch tokens to the VFM's patch tokens")
    align_cls: bool = knob(True, "also align the projected [CLS] token to the VFM's [CLS] (needs model.cls_token)")
    target_norm: Literal["none", "spatial"] = knob("none", "the REPA target's patch tokens as the VFM gives them, or "
                                                           "iREPA's spatial normalisation (per image and channel "
                                                           "over the patches; [CLS] untouched)")
    target_gamma: float = knob(0.6, "target_norm spatial: the fraction of each channel's spatial mean removed (iREPA's "
                                    "SiT code 0.6, its paper's formula 1)", FRACTION)


@dataclass(frozen=True)
class ModelConfig:
    """Every switch of the SiT family (SiT paper Table 1 sizes; docs/models.md)."""

    size: str = knob("B/2", "a label for logs and tables (S/2, B/2, L/2, XL/2); depth and widths decide the model")
    depth: int = knob(12, f"transformer blocks (1..{MAX_DEPTH})", count(MAX_DEPTH))
    hidden_size: int = knob(768, f"token width (1..{MAX_WIDTH})", WIDTH)
    num_heads: int = knob(12, f"attention heads (1..{MAX_HEADS})", count(MAX_HEADS))
    patch_size: int = knob(2, f"latent patch side (1..{MAX_PATCH})", count(MAX_PATCH))
    input_size: int = knob(32, f"latent grid side: data.resolution / 8 (1..{MAX_GRID})", count(MAX_GRID))
    mlp_ratio: float = knob(4.0, f"MLP width / token width (above 0, at most {MAX_MLP_RATIO:g})",
                            (lambda v: 0 < v <= MAX_MLP_RATIO, f"a number in (0, {MAX_MLP_RATIO:g}]"))
    latent_channels: int = knob(LATENT_CHANNELS, f"SD-VAE latent channels (1..{MAX_WIDTH})", WIDTH)
    semantic_channels: int = knob(0, "semantic channels concatenated to the latents (ReDi 8, REGLUE 16; "
                                     f"0..{MAX_WIDTH})", count(MAX_WIDTH, 0))
    semantic_source: str = knob("none", "where they come from: none, compressor (REGLUE) or pca (ReDi)",
                                (lambda v: v in SEMANTIC_SOURCES, "one of " + ", ".join(SEMANTIC_SOURCES)))
    cls_token: bool = knob(False, "denoise the VFM's global [CLS] jointly, as token 0 (REG, REGLUE)")
    cls_dim: int = knob(768, f"[CLS] width: the VFM's token width (1..{MAX_WIDTH})", WIDTH)
    projector: ProjectorConfig | None = knob(None, "the REPA projector, or null for none")
    qk_norm: bool = knob(False, "LayerNorm on queries and keys")
    num_classes: int = knob(NUM_CLASSES, f"class labels (ImageNet 1000; at most {MAX_CLASSES:,}); 0 trains an "
                                         "unconditional model", count(MAX_CLASSES, 0))
    class_dropout: float | None = knob(None, f"label dropout for guidance; null: {CLASS_DROPOUT} with labels, 0 "
                                             "without", optional(FRACTION))
    fused_attn: bool = knob(True, "fused scaled-dot-product attention (same result, faster)")

    def __post_init__(self):
        if self.class_dropout is None:  # resolved once, so checkpoints and config.yaml hold the number
            object.__setattr__(self, "class_dropout", CLASS_DROPOUT if self.num_classes else 0.0)
        self.validate()

    @property
    def in_channels(self) -> int:
        """Channels of the spatial input: VAE latents then semantic channels."""
        return self.latent_channels + self.semantic_channels

    @property
    def uses_vfm(self) -> bool:
        """Whether the model is trained against the VFM: semantic channels, a [CLS] token or a REPA projector."""
        return bool(self.semantic_channels or self.cls_token or self.projector is not None)

    @property
    def num_patches(self) -> int:
        """Spatial tokens after patchification."""
        return (self.input_size // self.patch_size) ** 2

    @property
    def estimated_parameters(self) -> int:
        """About the model's parameter count, from the widths alone (nothing built): per block attention (4 d^2),
        MLP (2 r d^2) and adaLN (6 d^2), plus the label table and the position embedding; within 3% at the paper's
        sizes."""
        d = self.hidden_size
        per_block = (4 + 2 * self.mlp_ratio + 6) * d * d
        return int(self.depth * per_block + (self.num_classes + 1) * d + (self.num_patches + 1) * d)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        """Build from a preset's ``model`` section, rejecting unknown keys and wrong types by name."""
        return parse(cls, data, "model")

    def to_dict(self) -> dict:
        """Plain-data form (what checkpoints and config.yaml store)."""
        return plain(self)

    def _validate_irepa(self, p: ProjectorConfig) -> None:
        """The projector's kind and target normalisation: known values, and no key set that nothing would read."""
        if p.kind not in PROJECTOR_KINDS or p.target_norm not in TARGET_NORMS:
            raise ConfigError(f"model.projector.kind {p.kind!r} / target_norm {p.target_norm!r}: choose kind from "
                              f"{', '.join(PROJECTOR_KINDS)} and target_norm from {', '.join(TARGET_NORMS)}")
        if not 0.0 <= p.target_gamma <= 1.0:
            raise ConfigError(f"model.projector.target_gamma {p.target_gamma} must lie in [0, 1]")
        if p.kind == "conv" and not p.align_patch:
            raise ConfigError("model.projector.kind conv convolves the patch grid, but align_patch is off (nothing "
                              "would read the grid); use kind mlp")
        if p.target_norm == "spatial" and not p.align_patch:
            raise ConfigError("model.projector.target_norm spatial normalises the patch tokens, but align_patch is "
                              "off, so nothing would read them")
        if p.target_norm == "spatial" and self.num_patches < 2:
            raise ConfigError(f"model.projector.target_norm spatial needs at least 2 patch tokens, the model has "
                              f"{self.num_patches}")
        default = {f.name: f.default for f in fields(ProjectorConfig)}
        unread = [("hidden_dim", "kind is conv (no hidden layer)")] if p.kind == "conv" else []
        unread += [("target_gamma", "target_norm is none")] if p.target_norm == "none" else []
        for key, why in unread:
            if getattr(p, key) != default[key]:
                raise ConfigError(f"model.projector.{key}={getattr(p, key)!r}: {why}, so nothing would read it; "
                                  f"leave it at {default[key]!r}")

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
            raise ConfigError(f"model.semantic_source {self.semantic_source!r}: choose one of "
                              f"{', '.join(SEMANTIC_SOURCES)}")
        if (self.semantic_channels > 0) != (self.semantic_source != "none"):
            raise ConfigError(
                f"model.semantic_channels={self.semantic_channels} and semantic_source={self.semantic_source!r} "
                "disagree"
            )
        if not 0.0 <= self.class_dropout < 1.0:
            raise ConfigError(f"model.class_dropout {self.class_dropout} must lie in [0, 1)")
        if self.num_classes == 0 and self.class_dropout:
            raise ConfigError(f"model.class_dropout {self.class_dropout}: an unconditional model (num_classes 0) "
                              "has no labels to drop; set it to 0 or null")
        if self.projector is not None:
            p = self.projector
            if not 1 <= p.depth <= self.depth:
                raise ConfigError(f"model.projector.depth {p.depth} must lie in 1..{self.depth}")
            if not (p.align_patch or p.align_cls):
                raise ConfigError("model.projector: align_patch and align_cls are both off; drop the projector instead")
            if p.align_cls and not self.cls_token:
                raise ConfigError("model.projector.align_cls needs model.cls_token: true")
            self._validate_irepa(p)
        if self.estimated_parameters > MAX_PARAMETERS:
            raise ConfigError(f"model: depth {self.depth} x hidden_size {self.hidden_size} gives about "
                              f"{self.estimated_parameters:.2e} parameters, above the {MAX_PARAMETERS:.0e} this "
                              "toolkit builds (SiT-XL/2 has 6.75e+08)")
