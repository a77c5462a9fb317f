"""Objectives (eps, v, flow matching), the ODE samplers and likelihood, classifier-free guidance.

Closed forms throughout: oracle networks that know the one training image make each objective's
loss vanish; the v <-> eps <-> x0 algebra is checked on random draws; Euler and Heun are run on a
Gaussian data distribution, whose flow-matching velocity field and ODE solution are known
exactly; the ODE likelihood of that Gaussian is compared with its log-density.
"""

from __future__ import annotations

import math

import pytest
import torch

from pipeline import config as config_module
from pipeline.errors import UserError
from pipeline.models import objectives, samplers
from pipeline.models.base import to_unit_interval
from pipeline.models.diffusion import (
    DiffusionConfig,
    DiffusionModel,
    NoiseSchedule,
    beta_schedule,
    classifier_free_guidance,
)


def schedule(timesteps: int = 50) -> NoiseSchedule:
    return NoiseSchedule(beta_schedule("cosine", timesteps), "fixed_large")


def tiny(**overrides) -> DiffusionModel:
    fields = dict(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(),
                  norm_groups=4, dropout=0.0, timesteps=50, sample_steps=5)
    fields.update(overrides)
    torch.manual_seed(0)
    model = DiffusionModel(DiffusionConfig(**fields), image_size=8, channels=1)
    with torch.no_grad():  # the zero-initialised output would make every prediction 0
        for parameter in model.net.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model.eval()


# ------------------------------------------------------------------------- v <-> eps <-> x0


def test_v_eps_x0_conversions_invert_each_other():
    generator = torch.Generator().manual_seed(0)
    abar = torch.rand(6, 1, 1, 1, generator=generator).clamp(0.01, 0.99)
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    x0 = torch.randn(6, 1, 4, 4, generator=generator, dtype=torch.float64).float()
    eps = torch.randn(6, 1, 4, 4, generator=generator)
    x_t = alpha * x0 + sigma * eps
    v = objectives.v_target(alpha, sigma, x0, eps)
    assert torch.allclose(objectives.v_to_eps(alpha, sigma, x_t, v), eps, atol=1e-5)
    assert torch.allclose(objectives.v_to_x0(alpha, sigma, x_t, v), x0, atol=1e-5)
    # v is x_t's derivative along the circle phi: x_t = cos(phi) x0 + sin(phi) eps
    assert torch.allclose(v, alpha * eps - sigma * x0)


def test_v_model_eps_is_the_algebraic_conversion_of_its_output():
    model = tiny(objective="v")
    x_t = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 17, 49])
    v = model.network(x_t, t)
    alpha = model.schedule.sqrt_alpha_bar[t].view(-1, 1, 1, 1)
    sigma = model.schedule.sqrt_one_minus_alpha_bar[t].view(-1, 1, 1, 1)
    assert torch.allclose(model.eps(x_t, t), sigma * x_t + alpha * v, atol=1e-6)
    # ... and that is what the DDPM samplers and the bound receive
    assert torch.allclose(model.eps_fn()(x_t, t), sigma * x_t + alpha * v, atol=1e-6)


# ------------------------------------------------------------------------- the losses


def _oracle(objective, x0_star: torch.Tensor, sched: NoiseSchedule):
    """The exact prediction of each objective for the one-image data set {x0*}."""

    def network(x_t, time, labels):
        if objective.name == "flow_matching":
            t = (time / objectives.FLOW_TIME_SCALE).view(-1, 1, 1, 1).double()
            return ((x_t.double() - x0_star.double()) / t).float()  # eps - x0 = (x_t - x0) / t
        a = sched.alpha_bar.double()[time].view(-1, 1, 1, 1)
        eps = (x_t.double() - a.sqrt() * x0_star.double()) / (1 - a).sqrt()
        if objective.name == "eps":
            return eps.float()
        return (a.sqrt() * eps - (1 - a).sqrt() * x0_star.double()).float()

    return network


@pytest.mark.parametrize("name", ["eps", "v", "flow_matching"])
def test_an_oracle_of_one_image_has_zero_loss(name):
    sched = schedule()
    objective = objectives.build(name, sched, "logit_normal")
    x0 = to_unit_interval(torch.randint(0, 256, (1, 1, 4, 4), generator=torch.Generator().manual_seed(3),
                                        dtype=torch.uint8)).expand(64, -1, -1, -1)
    torch.manual_seed(0)
    loss, buckets = objective(_oracle(objective, x0[:1], sched), x0, None)
    assert loss.shape == (64,) and buckets.shape == (64,)
    assert float(loss.max()) < 1e-6
    assert int(buckets.min()) >= 0 and int(buckets.max()) <= 3


@pytest.mark.parametrize("name", ["eps", "v", "flow_matching"])
def test_the_loss_is_the_squared_distance_to_the_objectives_target(name):
    """A recording network sees (x_t, time); the target is rebuilt from them and x0 in closed form."""
    sched = schedule()
    objective = objectives.build(name, sched)
    x0 = torch.rand(8, 1, 4, 4, generator=torch.Generator().manual_seed(4)) * 2 - 1
    seen = {}

    def network(x_t, time, labels):
        seen.update(x_t=x_t, time=time)
        return torch.zeros_like(x_t)

    torch.manual_seed(1)
    loss, _ = objective(network, x0, None)
    x_t, time = seen["x_t"], seen["time"]
    if name == "flow_matching":
        t = (time / objectives.FLOW_TIME_SCALE).view(-1, 1, 1, 1)
        eps = (x_t - (1 - t) * x0) / t
        target = eps - x0  # Lipman et al. eq. 23 with sigma_min = 0
    else:
        alpha = sched.sqrt_alpha_bar[time].view(-1, 1, 1, 1)
        sigma = sched.sqrt_one_minus_alpha_bar[time].view(-1, 1, 1, 1)
        eps = (x_t - alpha * x0) / sigma
        target = eps if name == "eps" else alpha * eps - sigma * x0
    assert torch.allclose(loss, target.square().mean(dim=(1, 2, 3)), rtol=1e-4, atol=1e-5)


def test_flow_matching_time_sampling_and_its_bucket_fractions():
    uniform = objectives.FlowMatching("uniform")
    assert uniform.bucket_fractions.tolist() == pytest.approx([0.25] * 4)
    logit = objectives.FlowMatching("logit_normal", logit_mean=0.5, logit_std=0.8)
    torch.manual_seed(0)
    t = logit.sample_time(200_000, torch.device("cpu"))
    logits = torch.log(t / (1 - t))
    assert float(logits.mean()) == pytest.approx(0.5, abs=0.01)
    assert float(logits.std()) == pytest.approx(0.8, abs=0.01)
    observed = torch.bincount((4 * t).long().clamp(max=3), minlength=4).double() / len(t)
    assert observed.tolist() == pytest.approx(logit.bucket_fractions.tolist(), abs=0.005)
    assert float(logit.bucket_fractions.sum()) == pytest.approx(1.0)


# ------------------------------------------------------------------------- ODE samplers on a Gaussian


MU, S = 0.7, 0.3  # data x0 ~ N(MU, S^2) per dimension


def gaussian_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The flow-matching velocity E[eps - x0 | x_t = x] for x0 ~ N(MU, S^2): the marginal of x_t is
    N((1-t) MU, sigma_t^2) with sigma_t^2 = (1-t)^2 S^2 + t^2, and the flow keeps x's standardised
    value z = (x - (1-t) MU) / sigma_t, so dx/dt = -MU + sigma_t' z."""
    t = t.view(-1, *([1] * (x.dim() - 1))).double()
    x = x.double()
    sigma = ((1 - t) ** 2 * S**2 + t**2).sqrt()
    dsigma = (-(1 - t) * S**2 + t) / sigma
    return (-MU + dsigma * (x - (1 - t) * MU) / sigma).float()


@pytest.mark.parametrize("sampler, order", [("euler", 1), ("heun", 2)])
def test_ode_samplers_reach_the_known_solution_at_their_order(sampler, order):
    """From x_1 = z at t = 1 the exact solution at t = 0 is MU + S z; halving the step cuts the
    error by 2 (Euler) or 4 (Heun)."""
    z = torch.randn(16, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    exact = MU + S * z
    errors = []
    for steps in (8, 16, 32):
        x = samplers.ODE_SAMPLERS[sampler](gaussian_velocity, z.clone(), samplers.flow_times(steps))
        errors.append(float((x - exact).abs().max()))
    ratios = [errors[i] / errors[i + 1] for i in range(2)]
    assert all(r == pytest.approx(2**order, rel=0.25) for r in ratios), (errors, ratios)
    assert errors[-1] < (0.1 if order == 1 else 3e-3)


def test_ode_likelihood_matches_the_gaussian_log_density():
    """log p_0(x) = log N(x; MU, S^2) summed over dimensions. The velocity's Jacobian is diagonal, so
    Hutchinson's estimate with a Rademacher probe is exact and only the solver's error remains."""
    x = MU + S * torch.randn(6, 1, 3, 3, generator=torch.Generator().manual_seed(2))
    exact = (-0.5 * ((x.double() - MU) / S) ** 2 - math.log(S) - 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)
    estimate = samplers.ode_log_likelihood(gaussian_velocity, x, torch.Generator().manual_seed(0), steps=256)
    assert torch.allclose(estimate, exact, atol=1e-3)
    euler = samplers.ode_log_likelihood(gaussian_velocity, x, torch.Generator().manual_seed(0), steps=256,
                                        solver="euler")
    assert (euler - exact).abs().max() < 0.2 and (euler - exact).abs().max() > (estimate - exact).abs().max()


def test_hutchinson_is_unbiased_for_a_full_jacobian():
    """Mean of probe^T J probe over probes = trace J for a non-diagonal linear field."""
    matrix = torch.randn(4, 4, generator=torch.Generator().manual_seed(5))

    def linear(x, t):
        return (x.flatten(1) @ matrix.T).view_as(x)

    x = torch.zeros(20_000, 1, 2, 2)
    probe = samplers.rademacher(tuple(x.shape), torch.Generator().manual_seed(6))
    _, divergence = samplers.velocity_and_divergence(linear, x, torch.zeros(len(x)), probe)
    assert float(divergence.mean()) == pytest.approx(float(matrix.trace()), abs=0.06)


# ------------------------------------------------------------------------- guidance


def test_guidance_is_the_conditional_model_at_1_and_the_unconditional_at_0():
    model = tiny(num_classes=3, label_dropout=0.2)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(7))
    t = torch.tensor([3, 10, 30, 49])
    labels = torch.tensor([0, 1, 2, 1])
    null = torch.full_like(labels, 3)
    conditional = model.network(x, t, labels)
    unconditional = model.network(x, t, null)
    assert not torch.allclose(conditional, unconditional)
    guided = {s: classifier_free_guidance(model.network, x, t, labels, model.null_label, s) for s in (0.0, 1.0, 2.5)}
    assert torch.allclose(guided[1.0], conditional, atol=1e-6)
    assert torch.allclose(guided[0.0], unconditional, atol=1e-5)  # the batched pass: float rounding only
    assert torch.allclose(guided[2.5], unconditional + 2.5 * (conditional - unconditional), atol=1e-5)


def test_guided_sampling_runs_one_batched_pass_per_step():
    model = tiny(num_classes=3)
    calls = []
    forward = model.net.forward

    def counting(x, t, labels=None):
        calls.append(len(x))
        return forward(x, t, labels)

    model.net.forward = counting
    labels = torch.tensor([0, 1, 2])
    model.sample(3, torch.Generator().manual_seed(0), labels=labels, sampler="ddim", steps=4, guidance=3.0)
    assert calls == [6] * 4  # conditional and unconditional halves together
    calls.clear()
    model.sample(3, torch.Generator().manual_seed(0), labels=labels, sampler="ddim", steps=4)
    assert calls == [3] * 4  # guidance 1: the conditional model alone


def test_guidance_options_are_checked_when_the_config_loads():
    with pytest.raises(UserError, match="guidance 2.0 needs a class-conditional model"):
        config_module.load("configs/tiny/ddpm.yaml", ["sample.options.guidance=2.0"])
    with pytest.raises(UserError, match="needs the null class"):
        config_module.load("configs/tiny/cond_ddpm.yaml", ["model.label_dropout=0"])
    with pytest.raises(UserError, match="guidance: must be at least 0"):
        config_module.load("configs/tiny/cond_ddpm.yaml", ["sample.options.guidance=-1"])
    with pytest.raises(UserError, match="flow_matching objective samples with 'euler' or 'heun'"):
        config_module.load("configs/tiny/flow_matching.yaml", ["sample.options.sampler=ddim"])
    with pytest.raises(UserError, match="solves the flow-matching ODE"):
        config_module.load("configs/tiny/ddpm.yaml", ["model.sampler=heun"])


# ------------------------------------------------------------------------- the model


def test_label_dropout_replaces_labels_by_the_null_class_in_training_only():
    model = tiny(num_classes=3, label_dropout=0.5)
    seen = []
    forward = model.net.forward
    model.net.forward = lambda x, t, labels=None: (seen.append(labels.clone()), forward(x, t, labels))[1]
    x = torch.randint(0, 256, (400, 1, 8, 8), dtype=torch.uint8)
    labels = torch.arange(400) % 3
    model.train()
    torch.manual_seed(0)
    model.loss(x, labels)
    dropped = seen[-1] == 3
    assert 0.4 < float(dropped.double().mean()) < 0.6
    assert torch.equal(seen[-1][~dropped], labels[~dropped])
    model.eval()
    model.loss(x, labels)
    assert torch.equal(seen[-1], labels)


def test_flow_matching_bits_per_dim_is_an_estimate_named_by_its_options():
    model = tiny(objective="flow_matching", likelihood_steps=3)
    assert model.bits_per_dim_kind == "estimate"
    estimator = model.held_out_estimator(10)
    assert estimator.options == {"estimator": "probability-flow-ode", "ode_steps": 3, "solver": "heun"}
    x = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8)
    done = []
    bits = estimator(x, done.append)
    assert bits.shape == (2,) and bool(torch.isfinite(bits).all()) and sum(done) == pytest.approx(1.0)
    same = model.bits_per_dim(x, torch.Generator().manual_seed(0), ode_steps=3)
    again = model.bits_per_dim(x, torch.Generator().manual_seed(0), ode_steps=3)
    assert torch.equal(same, again)
    with pytest.raises(UserError, match="applies to the variational bound of the eps and v objectives"):
        model.held_out_estimator(10, estimator="mc-importance")
    with pytest.raises(UserError, match="ode_steps and solver apply to"):
        tiny().held_out_estimator(10, ode_steps=4)


def test_flow_matching_sampling_counts_its_network_evaluations():
    model = tiny(objective="flow_matching")
    calls = []
    forward = model.net.forward
    model.net.forward = lambda x, t, labels=None: (calls.append(float(t[0])), forward(x, t))[1]
    images = model.sample(2, torch.Generator().manual_seed(0), sampler="euler", steps=4)
    assert images.dtype == torch.uint8 and images.shape == (2, 1, 8, 8)
    assert calls == pytest.approx([1000.0, 750.0, 500.0, 250.0])  # t from 1 towards 0, on the 1000 scale
    calls.clear()
    model.sample(2, torch.Generator().manual_seed(0), sampler="heun", steps=4)
    assert len(calls) == 8
    with pytest.raises(UserError, match="flow_matching objective samples with"):
        model.sample(2, torch.Generator().manual_seed(0), sampler="ddpm")
