"""Discretised logistic mixture: normalisation, agreement with a direct float64 computation,
numerical stability at the extremes, and sampling that follows the distribution."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.models.likelihoods import (
    _component_log_probs,
    _log_prob_scaled,
    discretized_mix_logistic_log_prob,
    mixture_mean,
    mixture_param_channels,
    sample_discretized_mix_logistic,
    temper_mixture_params,
)


def random_params(batch: int, k: int, c: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Means mostly inside [-1, 1], log-scales from very sharp (clamped) to broad, coeffs ±."""
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(batch, mixture_param_channels(k, c), h, w, generator=g)
    p[:, k : k + c * k] *= 0.7  # means
    p[:, k + c * k : k + 2 * c * k] = p[:, k + c * k : k + 2 * c * k] * 2.5 - 3.0  # log-scales
    return p


def levels_grid(values: torch.Tensor, c: int, h: int, w: int) -> torch.Tensor:
    """[len(values), c, h, w] uint8 where batch row n holds values[n] everywhere."""
    return values.to(torch.uint8).view(-1, 1, 1, 1).expand(-1, c, h, w).contiguous()


def test_param_channels():
    assert mixture_param_channels(10, 1) == 30
    assert mixture_param_channels(10, 3) == 100
    with pytest.raises(ValueError):
        mixture_param_channels(5, 2)


def test_one_channel_sums_to_one_over_all_256_levels():
    k, h, w = 4, 3, 3
    params = random_params(1, k, 1, h, w)
    params[0, k, 0, 0] = 3.0  # a mean far beyond the top edge
    params[0, 2 * k, 0, 0] = -20.0  # a log-scale far below the clamp
    x = levels_grid(torch.arange(256), 1, h, w)
    log_p = discretized_mix_logistic_log_prob(x, params.expand(256, -1, -1, -1), k)
    assert log_p.shape == (256, h, w)
    total = log_p.double().exp().sum(dim=0)
    torch.testing.assert_close(total, torch.ones_like(total), atol=1e-4, rtol=0)


def test_three_channel_conditionals_each_sum_to_one():
    """Per component, p(x_c | x_<c, k) sums to 1 over x_c for fixed earlier channels."""
    k, h, w = 3, 2, 2
    params = random_params(1, k, 3, h, w, seed=1)
    fixed = torch.randint(0, 256, (3, h, w), generator=torch.Generator().manual_seed(2))
    for c in range(3):
        x = fixed.expand(256, -1, -1, -1).clone()
        x[:, c] = torch.arange(256).view(-1, 1, 1)
        x_scaled = x.float() * (2 / 255) - 1
        log_weights, log_probs = _component_log_probs(x_scaled, params.expand(256, -1, -1, -1), k)
        total = log_probs[:, c].double().exp().sum(dim=0)  # [K, H, W]
        torch.testing.assert_close(total, torch.ones_like(total), atol=1e-4, rtol=0)
    torch.testing.assert_close(log_weights[0].exp().sum(0), torch.ones(h, w))


def test_three_channel_joint_marginalises_down_the_chain():
    """Σ_b p(r,g,b) = p(r,g); Σ_g p(r,g) = p(r); Σ_r p(r) = 1, on the public joint."""
    k = 3
    params = random_params(1, k, 3, 1, 1, seed=3)
    every = torch.arange(256)

    def prefix_prob(x: torch.Tensor, n: int) -> torch.Tensor:
        return _log_prob_scaled(x.float() * (2 / 255) - 1, params.expand(len(x), -1, -1, -1), k, n).double().exp()

    p_r = prefix_prob(torch.stack([every, every * 0, every * 0], 1).view(256, 3, 1, 1), 1).sum()
    assert abs(p_r.item() - 1) < 1e-4
    for r, g in [(0, 17), (128, 255), (90, 91), (255, 0)]:
        joint = discretized_mix_logistic_log_prob(
            torch.stack([every * 0 + r, every * 0 + g, every], 1).view(256, 3, 1, 1).to(torch.uint8),
            params.expand(256, -1, -1, -1),
            k,
        ).double().exp()
        p_rg = prefix_prob(torch.tensor([[r, g, 0]]).view(1, 3, 1, 1), 2)
        torch.testing.assert_close(joint.sum(), p_rg.sum(), atol=1e-6, rtol=1e-4)
        p_r_given = prefix_prob(torch.tensor([[r, 0, 0]]).view(1, 3, 1, 1), 1)
        sum_g = prefix_prob(torch.stack([every * 0 + r, every, every * 0], 1).view(256, 3, 1, 1), 2).sum()
        torch.testing.assert_close(sum_g, p_r_given.sum(), atol=1e-6, rtol=1e-4)


def direct_log_prob(x: torch.Tensor, params: torch.Tensor, k: int) -> torch.Tensor:
    """Reference in float64 straight from eqs. 2–3, with sigmoid differences."""
    x, params = x.double() / 127.5 - 1, params.double()
    b, c, h, w = x.shape
    logits = params[:, :k]
    means = params[:, k : k + c * k].view(b, c, k, h, w)
    log_scales = params[:, k + c * k : k + 2 * c * k].view(b, c, k, h, w).clamp_min(-7.0)
    coeffs = torch.tanh(params[:, k + 2 * c * k :].view(b, 3, k, h, w)) if c == 3 else None
    prob = torch.softmax(logits, dim=1)
    for ch in range(c):
        mean = means[:, ch]
        if ch == 1:
            mean = mean + coeffs[:, 0] * x[:, 0:1]
        if ch == 2:
            mean = mean + coeffs[:, 1] * x[:, 0:1] + coeffs[:, 2] * x[:, 1:2]
        s = log_scales[:, ch].exp()
        xc = x[:, ch : ch + 1]
        upper = torch.sigmoid((xc + 1 / 255 - mean) / s)
        lower = torch.sigmoid((xc - 1 / 255 - mean) / s)
        upper = torch.where(xc > 0.999, torch.ones_like(upper), upper)
        lower = torch.where(xc < -0.999, torch.zeros_like(lower), lower)
        prob = prob * (upper - lower)
    return prob.sum(dim=1).log()


@pytest.mark.parametrize("channels", [1, 3])
def test_matches_direct_float64_computation(channels):
    k, h, w = 5, 4, 4
    params = random_params(6, k, channels, h, w, seed=4)
    params[:, k + channels * k : k + 2 * channels * k].clamp_(-2.0, 0.5)  # mid-range probabilities
    x = torch.randint(10, 246, (6, channels, h, w), generator=torch.Generator().manual_seed(5)).to(torch.uint8)
    x[0, :, 0, 0] = 0
    x[1, :, 0, 0] = 255  # the edge bins too
    got = discretized_mix_logistic_log_prob(x, params, k)
    assert got.dtype == torch.float32 and got.shape == (6, h, w)
    torch.testing.assert_close(got.double(), direct_log_prob(x, params, k), atol=1e-4, rtol=1e-4)


def test_extreme_params_stay_finite_and_accurate():
    """A sharp component ~1000 scales away: sigmoid differences give log(0); ours stays exact."""
    k = 1
    params = torch.zeros(1, 3, 1, 3)
    params[0, 1] = -0.9  # mean
    params[0, 2] = -7.0  # log-scale: s = e^-7
    params.requires_grad_(True)
    x = torch.tensor([128, 0, 255], dtype=torch.uint8).view(1, 1, 1, 3)
    log_p = discretized_mix_logistic_log_prob(x, params, k)
    assert torch.isfinite(log_p).all()
    # Interior bin far right of the mean: log P = −l + log(1 − e^{−(u−l)}) up to e^{−l} terms.
    inv_s = math.exp(7.0)
    lower = inv_s * (128 / 127.5 - 1 - 1 / 255 + 0.9)
    expected = -lower + math.log(-math.expm1(-inv_s * 2 / 255))
    assert abs(log_p[0, 0, 0].item() - expected) < 1e-3 * abs(expected)
    log_p.sum().backward()
    assert torch.isfinite(params.grad).all()


def test_full_precision_under_autocast():
    k = 2
    params = random_params(2, k, 3, 4, 4, seed=6)
    x = torch.randint(0, 256, (2, 3, 4, 4), generator=torch.Generator().manual_seed(7)).to(torch.uint8)
    expected = discretized_mix_logistic_log_prob(x, params, k)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = discretized_mix_logistic_log_prob(x, params, k)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("channels", [1, 3])
def test_sample_dtype_range_and_determinism(channels):
    k = 3
    params = random_params(4, k, channels, 5, 5, seed=8)
    first = sample_discretized_mix_logistic(params, k, channels, torch.Generator().manual_seed(0))
    again = sample_discretized_mix_logistic(params, k, channels, torch.Generator().manual_seed(0))
    other = sample_discretized_mix_logistic(params, k, channels, torch.Generator().manual_seed(1))
    assert first.dtype == torch.uint8 and first.shape == (4, channels, 5, 5)
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_sharp_mixture_samples_its_mode_with_coupling():
    """One dominant, sharp component; G and B means shifted by α·x_R, β·x_R + γ·x_G."""
    k, n = 2, 2000
    centre = lambda level: level / 127.5 - 1  # noqa: E731
    params = torch.zeros(1, 10 * k, 1, 1)
    params[0, 0], params[0, 1] = 10.0, -10.0  # component 0 dominates
    alpha, beta, gamma = 0.5, -0.3, 0.8
    r, g, b = 200, 40, 150
    mu_g = centre(g) - alpha * centre(r)
    mu_b = centre(b) - beta * centre(r) - gamma * centre(g)
    params[0, k + 0 * k], params[0, k + 1 * k], params[0, k + 2 * k] = centre(r), mu_g, mu_b
    params[0, k + 3 * k : k + 6 * k] = -7.0
    params[0, k + 6 * k], params[0, k + 7 * k], params[0, k + 8 * k] = (
        math.atanh(alpha),
        math.atanh(beta),
        math.atanh(gamma),
    )
    x = sample_discretized_mix_logistic(params.expand(n, -1, -1, -1), k, 3, torch.Generator().manual_seed(0))
    for ch, mode in enumerate((r, g, b)):
        values = x[:, ch].long().flatten()
        assert (values == mode).float().mean() > 0.85, ch
        assert (values - mode).abs().max() <= 3, ch


def test_samples_follow_the_distribution():
    """Histogram of 40k draws vs the exact probabilities (1 channel; R marginal of 3 channels)."""
    k, n = 3, 40000
    params = random_params(1, k, 3, 1, 1, seed=9)
    params[:, k + 3 * k : k + 6 * k] = torch.tensor([-2.5, -3.0, -2.0] * 3).view(1, 9, 1, 1)
    draws = sample_discretized_mix_logistic(params.expand(n, -1, -1, -1), k, 3, torch.Generator().manual_seed(0))
    # The R marginal is the 1-channel mixture of (logits, μ_R, log s_R).
    r_params = torch.cat([params[:, :k], params[:, k : 2 * k], params[:, 4 * k : 5 * k]], dim=1)
    exact = discretized_mix_logistic_log_prob(
        levels_grid(torch.arange(256), 1, 1, 1), r_params.expand(256, -1, -1, -1), k
    ).exp().flatten()
    empirical = torch.bincount(draws[:, 0].long().flatten(), minlength=256).float() / n
    total_variation = 0.5 * (empirical - exact).abs().sum().item()
    assert total_variation < 0.04, total_variation
    # The G marginal Σ_r p(r, g) depends on the coupling α·x_R: 65536 prefix terms.
    grid = torch.stack(torch.meshgrid(torch.arange(256), torch.arange(256), indexing="ij"), 0).view(2, -1)
    x_rg = torch.cat([grid, torch.zeros(1, grid.shape[1], dtype=grid.dtype)]).T.reshape(-1, 3, 1, 1)
    x_rg = x_rg.float() * (2 / 255) - 1
    p_rg = _log_prob_scaled(x_rg, params.expand(len(x_rg), -1, -1, -1), k, 2).double().exp().view(256, 256)
    exact_g = p_rg.sum(dim=0)
    empirical_g = torch.bincount(draws[:, 1].long().flatten(), minlength=256).double() / n
    total_variation = 0.5 * (empirical_g - exact_g).abs().sum().item()
    assert total_variation < 0.04, total_variation


def test_temperature_sharpens():
    k = 2
    params = random_params(1, k, 1, 1, 1, seed=10)
    cold = temper_mixture_params(params, k, 1, 0.5)
    assert torch.equal(temper_mixture_params(params, k, 1, 1.0), params)
    torch.testing.assert_close(cold[:, :k], params[:, :k] * 2)
    torch.testing.assert_close(cold[:, 2 * k :], params[:, 2 * k :] + math.log(0.5))
    with pytest.raises(ValueError):
        temper_mixture_params(params, k, 1, 0.0)


@pytest.mark.parametrize("channels", [1, 3])
def test_mixture_mean_is_the_mean_of_the_draws(channels):
    """mixture_mean (the VAE's ``mean`` sampling option) against the average of 20k draws, with
    means and scales that keep the draws off the clipped ends: within a level and a half."""
    k, n = 3, 20000
    params = random_params(1, k, channels, 2, 2, seed=11)
    params[:, k : k + channels * k] *= 0.4
    params[:, k + channels * k : k + 2 * channels * k] = -3.0
    if channels == 3:
        params[:, k + 6 * k :] *= 0.5  # modest coupling keeps G and B inside [-1, 1] too
    mean = mixture_mean(params, k, channels)
    assert mean.dtype == torch.uint8 and mean.shape == (1, channels, 2, 2)
    draws = sample_discretized_mix_logistic(params.expand(n, -1, -1, -1), k, channels,
                                            torch.Generator().manual_seed(0))
    assert (draws.float().mean(0) - mean[0].float()).abs().max() < 1.5


def test_mixture_mean_of_one_component_is_its_centre():
    """One component: the mean is μ itself (coupled for G and B), rounded to its level."""
    centre = lambda level: level / 127.5 - 1  # noqa: E731
    params = torch.zeros(1, 10, 1, 1)
    alpha, beta, gamma = 0.5, -0.3, 0.8
    r, g, b = 200, 40, 150
    params[0, 1], params[0, 2], params[0, 3] = (centre(r), centre(g) - alpha * centre(r),
                                                centre(b) - beta * centre(r) - gamma * centre(g))
    params[0, 7], params[0, 8], params[0, 9] = math.atanh(alpha), math.atanh(beta), math.atanh(gamma)
    assert mixture_mean(params, 1, 3).flatten().tolist() == [r, g, b]
    params[0, 1] = 3.0  # beyond the top level: clipped to 255
    assert mixture_mean(params[:, [0, 1, 4]], 1, 1).item() == 255
