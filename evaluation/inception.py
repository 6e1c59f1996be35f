"""ADM's Inception features in PyTorch: torch-fidelity's TF-compatible InceptionV3, one pass, three feature sets.

- pool: pool_3, (N, 2048), for FID, precision and recall;
- spatial: ``Mixed_6d.branch1x1`` (TF ``mixed_6/conv``) channels 0..6 flattened in NHWC order, (N, 2023), for sFID;
- logits: the 1008 logits without the bias, (N, 1008), for the Inception Score.

Runs in fp32, eval mode, with TF32 off. Weights: ``--inception-weights PATH`` or $REGLUE_INCEPTION_WEIGHTS, else
torch-fidelity's release URL (cached by torch.hub); offline without a file, it fails at once saying what to fetch.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import NamedTuple

import torch

from evaluation.determinism import float32_matmuls
from evaluation.errors import InputError
from evaluation.images import file_sha256

WEIGHTS_ENV = "REGLUE_INCEPTION_WEIGHTS"
RANDOM_WEIGHTS = "random"  # a seeded random-weight stand-in (tests, the demo): never comparable to papers
RANDOM_SEED = 0
PUBLISHED_SHA256_PREFIX = "6726825d"  # torch-fidelity's release file name carries its sha256 prefix
SPATIAL_CHANNELS = 7  # ADM keeps mixed_6/conv[..., :7]: 17 x 17 x 7 = 2023 values


class InceptionError(InputError, RuntimeError):
    """The Inception weights cannot be found or are not the expected network."""


class Features(NamedTuple):
    """Inception features of one batch."""

    pool: torch.Tensor  # (B, 2048)
    spatial: torch.Tensor  # (B, 2023)
    logits: torch.Tensor  # (B, 1008), no bias


def is_published_weights(sha256: str) -> bool:
    """Whether a weights file's sha256 is torch-fidelity's published release (the only comparable weights)."""
    return str(sha256).startswith(PUBLISHED_SHA256_PREFIX)


def weights_url() -> str:
    """torch-fidelity's release of the converted TF Inception weights."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    return URL_INCEPTION_V3


def random_weights_file() -> str:
    """A seeded random-weights file with torch-fidelity's exact keys and shapes, made once in torch.hub's cache."""
    from unittest import mock

    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    path = Path(torch.hub.get_dir()) / "checkpoints" / f"reglue-random-inception-seed{RANDOM_SEED}.pth"
    if path.is_file():
        return str(path)
    # torch-fidelity's constructor always loads weights: build the structure with loading switched off
    with mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None), \
            mock.patch("torch.load", lambda *a, **k: {}):
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path="none")
    gen = torch.Generator().manual_seed(RANDOM_SEED)
    state = {}
    for key, value in net.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        if key.endswith("running_var") or (key.endswith(".weight") and value.dim() == 1):
            state[key] = torch.rand(value.shape, generator=gen) + 0.5
        elif value.dim() == 4:
            state[key] = torch.randn(value.shape, generator=gen) * (2.0 / value[0].numel()) ** 0.5
        else:
            state[key] = torch.randn(value.shape, generator=gen) * 0.05
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    torch.save(state, tmp)
    tmp.replace(path)
    return str(path)


def resolve_weights(path: str | None) -> str:
    """A local weights file: the given path ('random' for the stand-in), $REGLUE_INCEPTION_WEIGHTS, or the download."""
    path = path or os.environ.get(WEIGHTS_ENV)
    if path == RANDOM_WEIGHTS:
        return random_weights_file()
    if path:
        if not Path(path).is_file():
            raise InceptionError(f"Inception weights {path}: no such file")
        return path
    url = weights_url()
    cached = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[1]
    if cached.is_file():
        return str(cached)
    try:
        torch.hub.download_url_to_file(url, str(cached), progress=True)
        return str(cached)
    except Exception as exc:  # noqa: BLE001 - any network failure gets the same advice
        raise InceptionError(
            f"cannot download the Inception weights ({type(exc).__name__}); fetch {url} on a machine with network "
            f"and pass --inception-weights FILE or set {WEIGHTS_ENV}=FILE (or place it at {cached})") from None


def no_tf32():
    """Strict fp32 matmuls and convolutions inside (ADM's features are float32), restored afterwards."""
    return float32_matmuls(False)


class InceptionFeatures(torch.nn.Module):
    """uint8 images (B, 3, H, W) -> Features, with ADM's tensors."""

    def __init__(self, weights: str | None = None, device=None):
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        self.weights_path = resolve_weights(weights)
        try:  # a weights-only read first: the file must be tensors only before torch-fidelity unpickles it
            torch.load(self.weights_path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001
            raise InceptionError(f"{self.weights_path}: not a plain weights file ({type(exc).__name__})") from None
        try:
            self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                                   feature_extractor_weights_path=self.weights_path)
        except RuntimeError as exc:
            raise InceptionError(f"{self.weights_path}: not torch-fidelity's InceptionV3 "
                                 f"({str(exc).splitlines()[0][:150]})") from None
        self.weights_sha256 = file_sha256(self.weights_path)
        self._calls = threading.local()  # the hook's output per calling thread: extract may run chunks in parallel
        self.net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, out: setattr(self._calls, "spatial", out))
        self.eval().to(device or "cpu")

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> Features:
        """Features of uint8 NCHW images (any size: everything is resized to 299 the TF1 way)."""
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images (B, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        with no_tf32():
            pool, logits = self.net(images)
        spatial = self._calls.spatial[:, :SPATIAL_CHANNELS]  # (B, 7, 17, 17) after BN and ReLU
        spatial = spatial.permute(0, 2, 3, 1).reshape(spatial.shape[0], -1)  # NHWC order, as ADM flattens
        return Features(pool.float(), spatial.float(), logits.float())
