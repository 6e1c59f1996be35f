"""Paths, time sampling and the joint loss, checked against independent float64 NumPy computations."""

import numpy as np
import pytest
import torch
from conftest import randomize_, tiny_config

from reglue import presets
from reglue.config import to_dict
from reglue.models import SiT
from reglue.transport import CosinePath, JointLoss, LinearPath, LossWeights, repa_loss, sample_time


def test_linear_path_is_x_t_equals_one_minus_t_x0_plus_t_eps():
    x0, eps, t = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2), torch.tensor([0.0, 0.3, 0.7, 1.0])
    path = LinearPath()
    tt = t.numpy()[:, None, None, None]
    expected = (1 - tt) * x0.numpy() + tt * eps.numpy()
    np.testing.assert_allclose(path.interpolate(x0, eps, t).numpy(), expected, atol=1e-6)
    np.testing.assert_allclose(path.velocity(x0, eps, t).numpy(), eps.numpy() - x0.numpy(), atol=1e-6)
    assert torch.equal(path.interpolate(x0, eps, torch.ones(4)), eps)  # t = 1 is noise
    assert torch.equal(path.interpolate(x0, eps, torch.zeros(4)), x0)  # t = 0 is data


def test_cosine_path_velocity_is_the_time_derivative():
    x0, eps = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    t, h = torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64), 1e-6
    path = CosinePath()
    numeric = (path.interpolate(x0, eps, t + h) - path.interpolate(x0, eps, t - h)) / (2 * h)
    np.testing.assert_allclose(path.velocity(x0, eps, t).numpy(), numeric.numpy(), atol=1e-8)


def test_lognormal_times_follow_sigma_over_one_plus_sigma():
    torch.manual_seed(0)
    t = sample_time(50_000, "lognormal", "linear").double().numpy()
    sigma = t / (1 - t)
    log_sigma = np.log(sigma)
    assert abs(log_sigma.mean()) < 0.03 and abs(log_sigma.std() - 1) < 0.03  # log sigma ~ N(0, 1)
    u = sample_time(50_000, "uniform").numpy()
    assert 0 <= u.min() and u.max() <= 1 and abs(u.mean() - 0.5) < 0.01
    with pytest.raises(ValueError, match="unknown time sampler"):
        sample_time(2, "beta")


def _reference_losses(out, x0, eps, t, cls0, cls_eps, target, weights, c_lat, align):
    """Float64 NumPy recomputation of docs/method.md section 5 from the model's raw outputs."""
    x0, eps, t = x0.double().numpy(), eps.double().numpy(), t.double().numpy()
    v = eps - x0  # linear path target
    pred = out.velocity.detach().double().numpy()
    per_sample = lambda e: e.reshape(e.shape[0], -1).mean(axis=1)  # noqa: E731
    latent = per_sample((pred[:, :c_lat] - v[:, :c_lat]) ** 2).mean()
    semantic = per_sample((pred[:, c_lat:] - v[:, c_lat:]) ** 2).mean()
    cls_v = cls_eps.double().numpy() - cls0.double().numpy()
    cls = per_sample((out.cls_velocity.detach().double().numpy() - cls_v) ** 2).mean()
    proj = out.projections.detach().double().numpy()
    tgt = target.double().numpy()
    keep = {"both": slice(None), "patch": slice(1, None), "cls": slice(0, 1)}[align]
    proj, tgt = proj[:, keep], tgt[:, keep]
    cos = (proj * tgt).sum(-1) / (np.linalg.norm(proj, axis=-1) * np.linalg.norm(tgt, axis=-1))
    repa = (-cos).mean(axis=1).mean()
    return latent, semantic, cls, repa


@pytest.mark.parametrize("align", ["both", "patch", "cls"])
def test_joint_loss_matches_independent_float64_computation(align):
    config = tiny_config()
    model = randomize_(SiT(config)).eval()
    gen = torch.Generator().manual_seed(1)
    n, c, s = 4, config.in_channels, config.input_size
    x0, eps = torch.randn(n, c, s, s, generator=gen), torch.randn(n, c, s, s, generator=gen)
    cls0, cls_eps = torch.randn(n, 16, generator=gen), torch.randn(n, 16, generator=gen)
    t, y = torch.rand(n, generator=gen), torch.randint(0, 1000, (n,), generator=gen)
    target = torch.randn(n, 1 + config.num_patches, 16, generator=gen)
    weights = LossWeights(latent=1.0, semantic=0.7, cls=0.03, repa=0.5)
    loss = JointLoss(weights, align_patch=align != "cls", align_cls=align != "patch")
    terms = loss(model, x0, y, cls0=cls0, repa_target=target, t=t, noise=eps, cls_noise=cls_eps)

    # the model's raw outputs on the independently formed noisy inputs
    tt = t[:, None, None, None]
    out = model((1 - tt) * x0 + tt * eps, t, y, cls=(1 - t[:, None]) * cls0 + t[:, None] * cls_eps,
                return_projections=True)
    latent, semantic, cls, repa = _reference_losses(out, x0, eps, t, cls0, cls_eps, target, weights, 4, align)
    for got, want in [(terms.latent, latent), (terms.semantic, semantic), (terms.cls, cls), (terms.repa, repa)]:
        np.testing.assert_allclose(got.item(), want, rtol=1e-5, atol=1e-7)
    total = latent + 0.7 * semantic + 0.03 * cls + 0.5 * repa
    np.testing.assert_allclose(terms.total.item(), total, rtol=1e-5)


def test_loss_without_semantics_cls_or_projector_is_plain_mse():
    config = tiny_config(semantic_channels=0, semantic_source="none", cls_token=False, projector=None)
    model = randomize_(SiT(config)).eval()
    x0 = torch.randn(2, 4, 8, 8)
    eps, t = torch.randn_like(x0), torch.tensor([0.1, 0.9])
    terms = JointLoss(LossWeights())(model, x0, torch.tensor([1, 2]), t=t, noise=eps)
    assert terms.semantic.item() == terms.cls.item() == terms.repa.item() == 0.0
    tt = t[:, None, None, None]
    pred = model((1 - tt) * x0 + tt * eps, t, torch.tensor([1, 2])).velocity.double()
    np.testing.assert_allclose(terms.total.item(), ((pred - (eps - x0).double()) ** 2).mean().item(), rtol=1e-6)


def test_repa_without_cls_token_aligns_patch_tokens_only():
    config = tiny_config(cls_token=False, projector=tiny_config().projector.__class__(
        depth=1, hidden_dim=8, out_dim=16, align_patch=True, align_cls=False))
    model = randomize_(SiT(config)).eval()
    x0 = torch.randn(2, 8, 8, 8)
    target = torch.randn(2, 1 + 16, 16)
    target_other_cls = target.clone()
    target_other_cls[:, 0] = torch.randn(2, 16)
    loss = JointLoss(LossWeights(), align_cls=False)
    kw = dict(t=torch.tensor([0.5, 0.5]), noise=torch.zeros_like(x0))
    a = loss(model, x0, torch.tensor([0, 1]), repa_target=target, **kw).repa
    b = loss(model, x0, torch.tensor([0, 1]), repa_target=target_other_cls, **kw).repa
    assert a.item() == b.item() != 0.0


def test_repa_cosine_is_float32_under_autocast():
    gen = torch.Generator().manual_seed(0)
    proj = torch.randn(2, 5, 7, generator=gen).bfloat16()
    tgt = torch.randn(2, 5, 7, generator=gen).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = repa_loss(proj, tgt)
    assert out.dtype == torch.float32
    p, z = proj.double().numpy(), tgt.double().numpy()
    cos = (p * z).sum(-1) / (np.linalg.norm(p, axis=-1) * np.linalg.norm(z, axis=-1))
    np.testing.assert_allclose(out.numpy(), -cos.mean(axis=1), rtol=1e-6)


def test_semantic_weight_schedule_of_the_xl_preset():
    config = presets.load("sit-xl2-reglue")
    weights = config.loss
    assert isinstance(weights, LossWeights)
    assert LossWeights.from_dict(to_dict(config)["loss"]) == weights  # the plain form reads back the same
    assert [weights.semantic_at(s) for s in (0, 249_999, 250_000, 499_999, 500_000, 10**6)] == [
        1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
    assert presets.load("sit-b2-reglue").loss.semantic_at(10**6) == 1.0
    assert (weights.cls, weights.repa, weights.latent) == (0.03, 0.5, 1.0)


def test_same_t_for_latents_and_cls_and_independent_noise():
    config = tiny_config()
    seen = {}

    class Spy(torch.nn.Module):
        def forward(self, x, t, y, cls=None, return_projections=None, drop_mask=None):
            seen.update(x=x, t=t, cls=cls)
            return SiT(config).eval()(x, t, y, cls=cls, return_projections=return_projections)

    x0, cls0 = torch.zeros(2, 8, 8, 8), torch.zeros(2, 16)
    JointLoss(LossWeights())(Spy(), x0, torch.tensor([0, 1]), cls0=cls0, t=torch.tensor([0.25, 0.5]))
    # with clean data at zero, x_t = t * eps: the spatial and CLS noise scale with the same t
    assert torch.equal(seen["t"], torch.tensor([0.25, 0.5]))
    ratio_x = seen["x"].flatten(1).std(1) / torch.tensor([0.25, 0.5])
    assert torch.allclose(ratio_x, torch.ones(2), atol=0.2)
    assert not torch.allclose(seen["cls"][0] / 0.25, seen["x"][0].flatten()[:16] / 0.25)
