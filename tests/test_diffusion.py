"""Diffusion objective: schedules, forward process, posterior, samplers, bound, loss, config."""

from __future__ import annotations

import math

import pydantic
import pytest
import torch
from torch import nn

from pipeline.errors import UserError
from pipeline.models import build
from pipeline.models.base import to_unit_interval
from pipeline.models.diffusion import (
    DiffusionConfig,
    DiffusionModel,
    NoiseSchedule,
    beta_schedule,
    ddim_sample,
    ddim_timesteps,
    ddpm_sample,
    discretized_gaussian_log_likelihood,
    normal_kl,
)


def tiny_config(**overrides) -> DiffusionConfig:
    fields = dict(base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                  attention_resolutions=(4,), norm_groups=8, dropout=0.0, timesteps=20,
                  sample_steps=5)
    fields.update(overrides)
    return DiffusionConfig(**fields)


def tiny_model(**overrides) -> DiffusionModel:
    torch.manual_seed(0)
    model = DiffusionModel(tiny_config(**overrides), image_size=8, channels=3)
    # DDPM zero-initialises the output conv; give it weights so eps_theta is not identically 0.
    with torch.no_grad():
        model.net.conv_out.weight.normal_(0, 0.05)
    return model.eval()


class OracleEps(nn.Module):
    """The exact eps for a one-image data set x0*: eps = (x_t - sqrt(a_t) x0*) / sqrt(1 - a_t)."""

    def __init__(self, schedule: NoiseSchedule, x0: torch.Tensor):
        super().__init__()
        self.schedule, self.x0 = schedule, x0

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self.schedule.alpha_bar.double()[t].view(-1, 1, 1, 1)
        return ((x_t.double() - a.sqrt() * self.x0.double()) / (1 - a).sqrt()).float()


def one_image(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (1, 3, 8, 8), generator=torch.Generator().manual_seed(seed),
                         dtype=torch.uint8)


def oracle_model(image: torch.Tensor, **overrides) -> DiffusionModel:
    model = tiny_model(**overrides)
    model.net = OracleEps(model.schedule, to_unit_interval(image))
    return model


# ---------------------------------------------------------------------------------------- config


def test_config_defaults_are_ddpm_cifar10():
    config = DiffusionConfig()
    assert config.base_channels == 128 and config.channel_mult == (1, 2, 2, 2)
    assert config.num_res_blocks == 2 and config.attention_resolutions == (16,)
    assert (config.timesteps, config.beta_start, config.beta_end) == (1000, 1e-4, 0.02)
    model = build(tiny_config(), image_size=8, channels=1)
    assert isinstance(model, DiffusionModel) and model.bits_per_dim_kind == "upper_bound"


@pytest.mark.parametrize("overrides, message", [
    (dict(channel_mult=()), "channel_mult"),
    (dict(norm_groups=32), "norm_groups"),
    (dict(beta_start=0.1, beta_end=0.01), "beta_start"),
    (dict(sample_steps=21), "sample_steps"),
    (dict(dropout=1.0), "dropout"),
    (dict(timestep=10), "timestep"),
])
def test_config_rejects_impossible_values(overrides, message):
    with pytest.raises(pydantic.ValidationError, match=message):
        tiny_config(**overrides)


def test_model_rejects_unreachable_attention_resolution():
    with pytest.raises(UserError, match="attention_resolutions"):
        DiffusionModel(tiny_config(attention_resolutions=(32,)), image_size=8, channels=3)
    with pytest.raises(UserError, match="heads"):
        DiffusionModel(tiny_config(num_heads=3), image_size=8, channels=3)


def test_schedule_buffers_stay_out_of_checkpoints():
    model = tiny_model()
    assert not any(key.startswith("schedule.") for key in model.state_dict())
    assert model.schedule.alpha_bar.dtype == torch.float32


# ------------------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_alpha_bar_decreases_inside_unit_interval(name):
    alpha_bar = torch.cumprod(1 - beta_schedule(name, 1000), 0)
    assert (alpha_bar > 0).all() and (alpha_bar < 1).all()
    assert (alpha_bar[1:] < alpha_bar[:-1]).all()


def test_linear_schedule_endpoints():
    betas = beta_schedule("linear", 1000, 1e-4, 0.02)
    assert betas[0] == 1e-4 and betas[-1] == 0.02 and betas.dtype == torch.float64


def test_a_model_built_on_the_meta_device_is_all_meta():
    # launch's preflight and the FLOP counts build models for their shapes only: a schedule left
    # on the CPU would break any forward on meta tensors (and computing it on meta is slow).
    from conftest import REPO
    from pipeline import config as config_module

    config = config_module.load(REPO / "configs" / "tiny" / "ddpm.yaml")
    with torch.device("meta"):
        model = build(config.model, config.data.image_size, config.data.channels)
    assert {tensor.device.type for tensor in [*model.parameters(), *model.buffers()]} == {"meta"}
    loss, _ = model.loss(torch.zeros(2, 1, config.data.image_size, config.data.image_size, dtype=torch.uint8,
                                     device="meta"))
    assert loss.device.type == "meta"


def test_cosine_schedule_matches_closed_form():
    T, s = 1000, 0.008
    betas = beta_schedule("cosine", T)
    assert betas.max() <= 0.999
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    alpha_bar = torch.cumprod(1 - betas, 0)
    expected = torch.tensor([f(t) / f(0) for t in range(1, T + 1)], dtype=torch.float64)
    unclipped = betas < 0.999  # clipping only bites at the very end
    assert unclipped[: T - 5].all()
    torch.testing.assert_close(alpha_bar[: T - 5], expected[: T - 5], rtol=1e-10, atol=1e-12)


def test_q_sample_moments():
    schedule = NoiseSchedule(beta_schedule("linear", 1000), "fixed_large")
    generator = torch.Generator().manual_seed(0)
    x0 = torch.tensor([-1.0, -0.2, 0.5, 1.0]).view(1, 1, 1, 4).expand(40000, 1, 1, 4)
    for step in (0, 300, 999):
        t = torch.full((x0.shape[0],), step)
        x_t = schedule.q_sample(x0, t, torch.randn(x0.shape, generator=generator))
        a = schedule.alpha_bar[step]
        tolerance = 5 * (1 - a).sqrt() / math.sqrt(x0.shape[0])
        assert (x_t.mean(0) - a.sqrt() * x0[0]).abs().max() < tolerance
        torch.testing.assert_close(x_t.var(0), (1 - a).expand(1, 1, 4), rtol=0.03, atol=1e-6)


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("step", [1, 10, 500, 999])
def test_posterior_matches_closed_form_and_bayes(name, step):
    betas = beta_schedule(name, 1000)
    schedule = NoiseSchedule(betas, "fixed_small")
    alpha_bar = torch.cumprod(1 - betas, 0)
    beta, a_t, a_prev = betas[step], alpha_bar[step], alpha_bar[step - 1]
    x0, x_t = 0.3, -0.4
    t = torch.tensor([step])
    mean, log_var = schedule.q_posterior(torch.full((1, 1, 1, 1), x0),
                                         torch.full((1, 1, 1, 1), x_t), t)
    mean, var = mean.item(), log_var.exp().item()

    # Closed forms (Ho et al. eq. 7).
    expected_mean = (a_prev.sqrt() * beta / (1 - a_t) * x0
                     + (1 - beta).sqrt() * (1 - a_prev) / (1 - a_t) * x_t).item()
    expected_var = ((1 - a_prev) / (1 - a_t) * beta).item()
    assert mean == pytest.approx(expected_mean, rel=1e-5, abs=1e-6)
    assert var == pytest.approx(expected_var, rel=1e-5)

    # Bayes on a grid: q(x_{t-1} | x_t, x_0) is proportional to q(x_t | x_{t-1}) q(x_{t-1} | x_0).
    grid = torch.linspace(-8, 8, 800_001, dtype=torch.float64)
    log_density = (-(x_t - (1 - beta).sqrt() * grid) ** 2 / (2 * beta)
                   - (grid - a_prev.sqrt() * x0) ** 2 / (2 * (1 - a_prev)))
    weights = torch.softmax(log_density, 0)
    bayes_mean = (weights * grid).sum()
    bayes_var = (weights * (grid - bayes_mean) ** 2).sum()
    assert mean == pytest.approx(bayes_mean.item(), rel=1e-4, abs=1e-6)
    assert var == pytest.approx(bayes_var.item(), rel=1e-3)


# -------------------------------------------------------------------------------------- samplers


def test_ddim_timesteps():
    assert ddim_timesteps(20, 20) == list(range(20))
    for T, steps in [(1000, 50), (1000, 999), (7, 3), (10, 1)]:
        taus = ddim_timesteps(T, steps)
        assert len(taus) == steps and taus[-1] == T - 1
        assert all(b > a for a, b in zip(taus, taus[1:]))
        assert steps == 1 or taus[0] == 0
    with pytest.raises(UserError):
        ddim_timesteps(10, 11)


@pytest.mark.parametrize("options", [dict(sampler="ddpm"), dict(sampler="ddim", steps=4),
                                     dict(sampler="ddim", steps=4, eta=1.0)])
def test_sampler_output_and_determinism(options):
    model = tiny_model(timesteps=10)
    images = model.sample(3, torch.Generator().manual_seed(7), batch_size=2, **options)
    assert images.shape == (3, 3, 8, 8) and images.dtype == torch.uint8
    again = model.sample(3, torch.Generator().manual_seed(7), batch_size=2, **options)
    other = model.sample(3, torch.Generator().manual_seed(8), batch_size=2, **options)
    assert torch.equal(images, again)
    assert not torch.equal(images, other)


def test_sample_keeps_training_flag_and_builds_no_graph():
    model = tiny_model(dropout=0.1).train()
    images = model.sample(1, torch.Generator().manual_seed(0), sampler="ddim", steps=2)
    assert model.training and model.net.training and not images.requires_grad
    model.eval()
    model.sample(1, torch.Generator().manual_seed(0), sampler="ddim", steps=2)
    assert not model.training


def test_ddpm_sampler_refuses_strided_steps():
    with pytest.raises(UserError, match="ddim"):
        tiny_model().sample(1, torch.Generator(), sampler="ddpm", steps=5)


@pytest.mark.parametrize("variance", ["fixed_large", "fixed_small"])
def test_oracle_ddpm_recovers_the_image(variance):
    image = one_image()
    model = oracle_model(image, timesteps=1000, variance=variance)
    assert torch.equal(model.sample(2, torch.Generator().manual_seed(0), sampler="ddpm"),
                       image.expand(2, -1, -1, -1))


@pytest.mark.parametrize("steps", [1000, 10])
def test_oracle_ddim_recovers_the_image(steps):
    image = one_image()
    model = oracle_model(image, timesteps=1000, clip_denoised=False)
    assert torch.equal(model.sample(2, torch.Generator().manual_seed(0), sampler="ddim",
                                    steps=steps, eta=0.0), image.expand(2, -1, -1, -1))


def test_samplers_share_a_signature():
    schedule = NoiseSchedule(beta_schedule("linear", 10), "fixed_large")
    x_T = torch.randn(2, 1, 4, 4)
    for sampler in (ddpm_sample, ddim_sample):
        out = sampler(lambda x, t: torch.zeros_like(x), schedule, x_T, torch.Generator(),
                      steps=None, eta=0.0, clip_denoised=True)
        assert out.shape == x_T.shape and out.abs().max() <= 1


# ----------------------------------------------------------------------------- variational bound


def test_normal_kl_matches_torch_distributions():
    m1, m2 = torch.tensor([0.3, -1.0]), torch.tensor([0.1, 2.0])
    lv1, lv2 = torch.tensor([-2.0, 0.5]), torch.tensor([-1.0, 0.0])
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(m1, (0.5 * lv1).exp()),
                                                 torch.distributions.Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), expected)


def test_decoder_probabilities_sum_to_one():
    levels = torch.arange(256, dtype=torch.float64) * (2 / 255) - 1
    for mean in (-1.3, -1.0, -0.2, 0.0, 0.77, 1.0, 2.0):
        for log_var in (-20.0, -9.0, -3.0, 0.0, 2.0):
            log_p = discretized_gaussian_log_likelihood(
                levels, torch.full_like(levels, mean), torch.full_like(levels, log_var))
            assert torch.isfinite(log_p).all()
            assert log_p.exp().sum().item() == pytest.approx(1.0, abs=1e-9)
    # An interior bin is the CDF difference across it.
    x, mean, std = torch.tensor([0.2], dtype=torch.float64), 0.15, 0.05
    direct = (torch.special.ndtr((x + 1 / 255 - mean) / std)
              - torch.special.ndtr((x - 1 / 255 - mean) / std)).log()
    torch.testing.assert_close(discretized_gaussian_log_likelihood(
        x, torch.full_like(x, mean), torch.full_like(x, 2 * math.log(std))), direct)


def test_bound_is_small_for_the_oracle_and_larger_for_a_random_network():
    image = one_image()
    images = image.expand(2, -1, -1, -1)
    # DDPM's T = 1000 linear schedule: the oracle's bound is then dominated by the decoder, whose
    # width sqrt(beta~_1) ~ 0.007 is about two bins: ~1.3 bits/dim.
    oracle = oracle_model(image, timesteps=1000)
    oracle_bpd = oracle.bits_per_dim(images, torch.Generator().manual_seed(0), timestep_batch=100)
    assert oracle_bpd.shape == (2,) and torch.isfinite(oracle_bpd).all()
    assert (oracle_bpd < 2).all()
    random_net = tiny_model(timesteps=1000)
    random_bpd = random_net.bits_per_dim(images, torch.Generator().manual_seed(0),
                                         timestep_batch=100)
    assert torch.isfinite(random_bpd).all() and (random_bpd > oracle_bpd + 1).all()


def test_bound_does_not_depend_on_timestep_batch():
    model = tiny_model(variance="fixed_small")
    images = torch.randint(0, 256, (2, 3, 8, 8), generator=torch.Generator().manual_seed(3),
                           dtype=torch.uint8)
    results = [model.bits_per_dim(images, torch.Generator().manual_seed(0), timestep_batch=k)
               for k in (1, 3, 20)]
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("estimator", ["mc-stratified", "mc-importance"])
def test_bound_estimate_does_not_depend_on_timestep_batch(estimator):
    model = tiny_model(variance="fixed_small")
    images = torch.randint(0, 256, (2, 3, 8, 8), generator=torch.Generator().manual_seed(3),
                           dtype=torch.uint8)
    results = [model.bits_per_dim(images, torch.Generator().manual_seed(0), timestep_batch=k,
                                  estimator=estimator, timesteps_per_image=5) for k in (1, 4, 6)]
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], rtol=1e-5, atol=1e-5)
    exact = model.bits_per_dim(images, torch.Generator().manual_seed(0), estimator="exact")
    assert not torch.allclose(results[0], exact)  # a different estimate of the same bound


# ------------------------------------------------------------------------------------------ loss


def test_loss_grads_and_metrics():
    model = tiny_model().train()
    images = torch.randint(0, 256, (8, 3, 8, 8), dtype=torch.uint8)
    loss, metrics = model.loss(images)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert set(metrics) == {"mse", "mse_q0", "mse_q1", "mse_q2", "mse_q3"}
    for value in metrics.values():
        assert isinstance(value, torch.Tensor) and value.dim() == 0 and not value.requires_grad


@pytest.mark.parametrize("timesteps, batch", [(4, 64), (10, 1)])
def test_loss_quartiles_decompose_the_mse(timesteps, batch):
    torch.manual_seed(0)
    model = tiny_model(timesteps=timesteps, sample_steps=2)
    _, metrics = model.loss(torch.randint(0, 256, (batch, 3, 8, 8), dtype=torch.uint8))
    quartiles = torch.stack([metrics[f"mse_q{i}"] for i in range(4)])
    assert torch.isfinite(quartiles).all()  # even with empty quartiles (batch 1)
    # T = 10: quartiles hold timesteps {0,1,2}, {3,4}, {5,6,7}, {8,9}.
    weights = torch.tensor([0.25] * 4 if timesteps == 4 else [0.3, 0.2, 0.3, 0.2])
    torch.testing.assert_close((weights * quartiles).sum(), metrics["mse"])


def test_loss_under_bf16_autocast():
    model = tiny_model().train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, metrics = model.loss(torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert metrics["mse"].dtype == torch.float32
    loss.backward()
