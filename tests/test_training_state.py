"""The EMA update (one multi-tensor lerp) and the optimiser's kernel choice."""

import numpy as np
import torch
from conftest import randomize_, tiny_config

from reglue.config.sections import OptimConfig
from reglue.models.sit import SiT
from reglue.training.state import make_optimizer, update_ema


def test_the_multi_tensor_ema_equals_the_per_parameter_update_to_the_bit_and_float64_to_rounding():
    model, ema = randomize_(SiT(tiny_config()), seed=1), randomize_(SiT(tiny_config()), seed=2)
    before = {k: v.detach().double().numpy().copy() for k, v in ema.named_parameters()}
    one_by_one = {k: v.detach().clone() for k, v in ema.named_parameters()}
    for key, p in model.named_parameters():
        one_by_one[key].lerp_(p.detach(), 1.0 - 0.9999)
    update_ema(ema, model, 0.9999)
    for key, p in model.named_parameters():
        got = dict(ema.named_parameters())[key].detach()
        assert torch.equal(got, one_by_one[key]), key
        expected = 0.9999 * before[key] + (1 - 0.9999) * p.detach().double().numpy()
        np.testing.assert_allclose(got.double().numpy(), expected, rtol=0, atol=1e-7)


def test_the_fused_optimiser_kernel_is_asked_for_on_a_gpu_only():
    optimizer = make_optimizer(SiT(tiny_config()), OptimConfig())
    assert optimizer.defaults["fused"] is None  # CPU: torch's default multi-tensor kernel, as before


def test_a_checkpoint_records_the_environment_that_decided_its_bits(tmp_path):
    from reglue import checkpoints, presets
    from reglue.models import build

    config = presets.load("tiny-sit")
    model = build(config)
    path = checkpoints.save_checkpoint(tmp_path / "0000001.pt", config=config, step=1, model=model, ema=model)
    env = checkpoints.load_checkpoint(path)["environment"]
    assert env["torch"] == str(torch.__version__) and env["device_type"] == "cpu"
    assert env["matmul_allow_tf32"] == torch.backends.cuda.matmul.allow_tf32
    assert env["cpu_threads"] == torch.get_num_threads()


def test_noise_drawn_ahead_in_a_thread_is_the_noise_of_its_step():
    from reglue.training.order import NoiseAhead, step_noise

    draw = lambda step: step_noise(step, 3, 8, 6, 4, 4, 5, 0.1, lambda n, g: torch.rand(n, generator=g))  # noqa
    ahead = NoiseAhead(draw)
    try:
        for step in (0, 1, 2, 7, 8):  # 7: a jump (a resume) is drawn on demand, then ahead again
            got, expected = ahead(step), draw(step)
            for name in ("t", "drop", "posterior", "noise", "cls_noise"):
                assert torch.equal(getattr(got, name), getattr(expected, name)), (step, name)
    finally:
        ahead.close()
