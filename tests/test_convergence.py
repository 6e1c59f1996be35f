"""Training and sampling fit together: a tiny REGLUE model trained by the real loop on data whose per-class
distributions are known in closed form, then sampled by the real `reglue sample` path, generates that data.

Each class k is a fixed pattern in every stream: latents N(mu_k, SIGMA^2) per element (posterior moments
mean mu_k / 0.18215, std SIGMA / 0.18215, so the loop's latent scale is exercised), semantic channels and [CLS]
exactly s_k and c_k (a closed-form stand-in replaces the frozen VFM + compressor, which other tests cover).
A convention that differs between the loss and the sampler (time direction, velocity sign, guidance branch,
latent scale) makes samples miss their patterns; the last test flips two of them and sees the check fail
(measured: time reversed, latent error 0.07-0.17 and spread 1.4-2.6 SIGMA; sign flipped, error 1.6).
About 45 s on two CPU cores.
"""

import numpy as np
import pytest
import torch

from reglue import presets
from reglue.data.writer import EncodedWriter
from reglue.models import ModelOutput
from reglue.sampling import run as sampling_run
from reglue.sampling.run import SampleSettings, sample_to_dir
from reglue.training import diffusion
from reglue.training.diffusion import TrainOptions, train_diffusion
from reglue.training.semantics import Semantics
from reglue.transport.samplers import Guidance

K, PER_CLASS, SIGMA, AMPLITUDE = 4, 32, 0.1, 0.8  # classes, images per class, latent noise, pattern entries +-0.8
SCALE = 0.18215  # SD-VAE latent scale (method: z = 0.18215 * (mean + std * eps)), restated here on purpose
STEPS = 1000  # optimiser steps: the losses flatten near step 500 at lr 2e-3 (about 24 s here)
N = 64  # samples per run, 16 per class (balanced)
# Tolerances. The mean of 16 latent samples of N(mu_k, 0.1^2) is off by 0.025 rms (one standard error); the
# model's own error adds to it (measured here, worst class: 0.023-0.030 for the three samplers). MEAN_TOL = 0.05 is two
# standard errors and 1/22 of the 1.1 rms distance between two class patterns. The point-mass streams have no
# sampling error, only the model's (measured: semantics 0.021-0.024, [CLS] 0.047-0.079): 0.08 and 0.15. The spread
# of samples around their pattern must stay between 0.6 and 1.25 SIGMA (measured 0.73-1.09): a sampler that
# collapses the noise or inflates it fails.
MEAN_TOL, SEMANTIC_TOL, CLS_TOL, SPREAD = 0.05, 0.08, 0.15, (0.6 * SIGMA, 1.25 * SIGMA)
SAMPLERS = {"sde": 50, "ode-euler": 20, "ode-heun": 10}  # steps: the SDE needs more to settle its noise


def _patterns():
    rng = np.random.default_rng(0)
    latent = rng.choice([-AMPLITUDE, AMPLITUDE], size=(K, 4, 8, 8))
    semantic = rng.choice([-AMPLITUDE, AMPLITUDE], size=(K, 4, 8, 8))
    cls = rng.choice([-AMPLITUDE, AMPLITUDE], size=(K, 32))
    return latent, semantic, cls


def _class_image(k: int) -> int:
    return 10 + 60 * k  # class k's images are one flat grey, which the stand-in encoder reads back


class ClosedFormSemantics(torch.nn.Module):
    """Stands in for the frozen VFM + compressor: class k's image -> semantics s_k, [CLS] c_k (exactly)."""

    def __init__(self, semantic, cls):
        super().__init__()
        self.semantic, self.cls = torch.tensor(semantic, dtype=torch.float32), torch.tensor(cls, dtype=torch.float32)

    def forward(self, images: torch.Tensor) -> Semantics:
        k = (images[:, 0, 0, 0].long() - _class_image(0)) // (_class_image(1) - _class_image(0))
        tokens = torch.zeros(len(k), 17, self.cls.shape[1])  # REPA target: constant (not what is tested here)
        return Semantics(self.semantic[k], self.cls[k], tokens)


def _write_dataset(path, latent):
    labels = np.repeat(np.arange(K), PER_CLASS)
    images = np.stack([np.full((64, 64, 3), _class_image(k), np.uint8) for k in labels])
    mean = latent[labels] / SCALE
    moments = np.concatenate([mean, np.full_like(mean, SIGMA / SCALE)], axis=1).astype(np.float32)
    writer = EncodedWriter(path, "closed-form", 64, (8, 8, 8), "float32", False, [f"class{k}" for k in range(K)],
                           {"resolution": 64, "vae": "tiny"})  # latents built directly, decoded by the tiny VAE
    writer.append(images, moments, labels, np.array([f"{i}" for i in range(len(labels))], dtype=object), len(labels))
    writer.finish()
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(checkpoint, latent, semantic, cls patterns) of a tiny REGLUE model trained STEPS steps by the real loop."""
    root = tmp_path_factory.mktemp("convergence")
    latent, semantic, cls = _patterns()
    data = _write_dataset(root / "data.h5", latent)
    config = presets.load("tiny-reglue", model__num_classes=K, compressor__path="closed-form stand-in",
                          train__max_steps=STEPS, train__global_batch=32, train__ckpt_every=STEPS,
                          train__sample_every=0, train__log_every=100, optim__lr=2e-3, ema__decay=0.99)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(diffusion, "build_semantic_encoder", lambda *a, **k: ClosedFormSemantics(semantic, cls))
        train_diffusion(config, TrainOptions(data=str(data), outdir=str(root / "run"), workers=0, progress=False,
                                             echo=lambda s: None))
    return root / f"run/checkpoints/{STEPS:07d}.pt", latent, semantic, cls


class Flipped(torch.nn.Module):
    """The trained model seen through a convention the loss did not use: time reversed, or velocity negated."""

    def __init__(self, model, flip: str):
        super().__init__()
        self.model, self.flip = model, flip
        self.config, self.null_class = model.config, model.null_class

    def forward(self, x, t, y, **kw):
        if self.flip == "time":
            return self.model(x, 1 - t, y, **kw)
        out = self.model(x, t, y, **kw)
        return ModelOutput(-out.velocity, -out.cls_velocity, out.projections)


def _sample(ckpt, out, sampler, guidance=Guidance(), flip=None):
    """(final joint states x (N, 8, 8, 8), cls (N, 32), labels, uint8 images) from `reglue sample`'s own path."""
    import h5py

    states = []
    with pytest.MonkeyPatch.context() as patch:
        real_integrate, real_load = sampling_run.integrate, sampling_run.load_model
        patch.setattr(sampling_run, "integrate", lambda *a, **k: states.append(real_integrate(*a, **k)) or states[-1])
        if flip:
            patch.setattr(sampling_run, "load_model", lambda *a, **k: (lambda m, c: (Flipped(m, flip), c))(
                *real_load(*a, **k)))
        settings = SampleSettings(n=N, sampler=sampler, steps=SAMPLERS[sampler], guidance=guidance, balanced=True,
                                  vae="tiny", chunk=N)
        sample_to_dir(ckpt, out, settings, batch_size=N, progress=False)
    with h5py.File(out / "samples.h5") as f:
        labels, images = f["labels"][...], f["images"][...]
    x = torch.cat([s[0] for s in states]).numpy()
    cls = torch.cat([s[1] for s in states]).numpy()
    return x, cls, labels, images


def _rms(a, axes):
    return np.sqrt((a**2).mean(axis=axes))


def class_fit(x, cls, labels, latent, semantic, cls_patterns) -> dict:
    """Per-class mean errors of each stream, the latent spread around the patterns, and nearest-pattern accuracy."""
    means = np.stack([x[labels == k].mean(0) for k in range(K)])
    cls_means = np.stack([cls[labels == k].mean(0) for k in range(K)])
    truth = np.concatenate([latent, semantic], axis=1)
    nearest = _rms(x[:, None] - truth[None], (2, 3, 4)).argmin(1)
    return {"latent": _rms(means[:, :4] - latent, (1, 2, 3)).max(),
            "semantic": _rms(means[:, 4:] - semantic, (1, 2, 3)).max(),
            "cls": _rms(cls_means - cls_patterns, 1).max(),
            "spread": _rms(x[:, :4] - latent[labels], (0, 1, 2, 3)),
            "accuracy": (nearest == labels).mean()}


def fits(report: dict) -> bool:
    """The samples are the data: every class mean on its pattern in every stream, the right spread, no mix-ups."""
    return (report["latent"] < MEAN_TOL and report["semantic"] < SEMANTIC_TOL and report["cls"] < CLS_TOL
            and SPREAD[0] < report["spread"] < SPREAD[1] and report["accuracy"] == 1.0)


def _separation(x, labels) -> float:
    means = np.stack([x[labels == k].mean(0) for k in range(K)])
    return float(np.mean([_rms(means[i] - means[j], None) for i in range(K) for j in range(i + 1, K)]))


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_conditional_samples_are_the_training_distribution(trained, tmp_path, sampler):
    ckpt, latent, semantic, cls = trained
    x, cls_x, labels, images = _sample(ckpt, tmp_path / "s", sampler)
    report = class_fit(x, cls_x, labels, latent, semantic, cls)
    assert fits(report), report
    # The saved pixels: each image is nearest to its own class's pattern decoded (here, with the latent scale
    # restated) by the same tiny VAE, so sample and decode agree on the latent scale.
    from reglue.encoders.vae import build_tiny_vae

    with torch.no_grad():
        decoded = build_tiny_vae().decode(torch.tensor(latent / SCALE, dtype=torch.float32)).sample
    decoded = ((decoded + 1) / 2 * 255).clamp(0, 255).permute(0, 2, 3, 1).numpy()
    distance = _rms(images[:, None].astype(np.float64) - decoded[None], (2, 3, 4))
    assert (distance.argmin(1) == labels).all()


@pytest.mark.parametrize("sampler", ["sde", "ode-euler"])
def test_unconditional_samples_cover_every_class(trained, tmp_path, sampler):
    """--cfg 0 on [0, 1] is the unconditional model: every class appears, and samples sit on some pattern (0.35 rms
    is well under the 0.55 half-way distance between two patterns). The unconditional model learns only from the
    10% of dropped labels, so it is rougher: 3/4 of the samples must be that close (measured: all 64 for the SDE,
    whose noise corrects the drift's errors; 56 for Euler)."""
    ckpt, latent, semantic, cls = trained
    x, _, _, _ = _sample(ckpt, tmp_path / "s", sampler, Guidance(scale=0.0, cls_scale=0.0, interval=(0.0, 1.0)))
    truth = np.concatenate([latent, semantic], axis=1)
    distance = _rms(x[:, None] - truth[None], (2, 3, 4))
    counts = np.bincount(distance.argmin(1), minlength=K)
    assert counts.min() >= N // (4 * K), counts  # at least a quarter of a fair share each
    assert (distance.min(1) < 0.35).mean() >= 0.75, np.sort(distance.min(1))


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_guidance_moves_class_means_apart(trained, tmp_path, sampler):
    ckpt, latent, semantic, cls = trained
    x1, _, labels1, _ = _sample(ckpt, tmp_path / "plain", sampler)
    x4, _, labels4, _ = _sample(ckpt, tmp_path / "guided", sampler, Guidance(scale=4.0, interval=(0.0, 1.0)))
    assert np.array_equal(labels1, labels4)  # the same seeds: the difference is the guidance, not the noise
    assert _separation(x4, labels4) > _separation(x1, labels1)


@pytest.mark.parametrize("flip", ["time", "sign"])
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_a_flipped_convention_fails_the_check(trained, tmp_path, sampler, flip):
    """The check above can fail: sampling with the time direction or the velocity sign the loss did not use."""
    ckpt, latent, semantic, cls = trained
    x, cls_x, labels, _ = _sample(ckpt, tmp_path / "s", sampler, flip=flip)
    assert not fits(class_fit(x, cls_x, labels, latent, semantic, cls))
