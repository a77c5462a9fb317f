"""Discretised logistic mixture likelihood for 8-bit images (Salimans et al. 2017, PixelCNN++).

The objective, apart from any network: the autoregressive family and the VAE decoder both turn
network outputs ``params`` into log-probabilities of uint8 pixels here, and sample from them.

Parameter layout along dim 1 of ``params`` (K = ``num_mixtures``, C = image channels)::

    [0, K)              mixture logits, shared by all channels of a pixel
    [K, K + C·K)        means, channel-major: channel c, component k at K + c·K + k
    [K + C·K, K + 2C·K) log-scales, same order
    [K + 2C·K, 10K)     C = 3 only: coupling coefficients (α, β, γ) for component k at
                        K + 6K + j·K + k, j = 0 (G|R), 1 (B|R), 2 (B|G); passed through tanh

Values live on the [-1, 1] scale (``to_unit_interval``): level v has centre v/127.5 − 1 and its
bin is that centre ± 1/255. Within a pixel the channels are coupled R → G → B through the means
(paper eq. 3): μ_G = μ_g + α·x_R, μ_B = μ_b + β·x_R + γ·x_G, with x_R, x_G the (quantised) values
already observed or sampled. Everything is computed in float32, also under autocast.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.models.base import full_precision, to_unit_interval

# Lower bound on log-scales: e^-7 ≈ 9e-4 is a quarter of a bin's half-width (1/255), so one
# component can still put ~97% of its mass in one bin, while the gradients of
# (x − μ)/s stay bounded early in training.
LOG_SCALE_MIN = -7.0
_HALF_BIN = 1.0 / 255.0
# Uniform noise is drawn in [eps, 1 − eps] so Gumbel and logistic transforms stay finite.
_UNIFORM_EPS = 1e-6


def mixture_param_channels(num_mixtures: int, channels: int) -> int:
    """Number of network output channels the mixture needs: 3K for C=1, 10K for C=3."""
    if num_mixtures < 1:
        raise ValueError(f"num_mixtures must be >= 1, got {num_mixtures}")
    if channels == 1:
        return 3 * num_mixtures
    if channels == 3:
        return 10 * num_mixtures
    raise ValueError(f"the logistic mixture supports 1 or 3 channels, got {channels}")


def _split_params(params: Tensor, num_mixtures: int, channels: int):
    """logits [B,K,H,W]; means, log_scales [B,C,K,H,W]; coeffs [B,3,K,H,W] or None."""
    expected = mixture_param_channels(num_mixtures, channels)
    if params.dim() != 4 or params.shape[1] != expected:
        raise ValueError(
            f"params must be [B, {expected}, H, W] for {num_mixtures} mixtures and {channels} "
            f"channels, got {tuple(params.shape)}"
        )
    b, _, h, w = params.shape
    k, c = num_mixtures, channels
    logits = params[:, :k]
    means = params[:, k : k + c * k].reshape(b, c, k, h, w)
    log_scales = params[:, k + c * k : k + 2 * c * k].reshape(b, c, k, h, w).clamp_min(LOG_SCALE_MIN)
    coeffs = torch.tanh(params[:, k + 2 * c * k :].reshape(b, 3, k, h, w)) if c == 3 else None
    return logits, means, log_scales, coeffs


def _coupled_mean(means: Tensor, coeffs: Tensor | None, previous: list[Tensor], channel: int) -> Tensor:
    """Mean of `channel` given the earlier channels' values [B,1,H,W] (paper eq. 3)."""
    mean = means[:, channel]
    if channel == 1:
        mean = mean + coeffs[:, 0] * previous[0]
    elif channel == 2:
        mean = mean + coeffs[:, 1] * previous[0] + coeffs[:, 2] * previous[1]
    return mean


def _bin_log_prob(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """log P(level) of one discretised logistic, x the bin centre on [-1, 1] (paper eq. 2).

    Interior bins: P = σ(u) − σ(l) with u, l = (x ± 1/255 − μ)/s. Instead of subtracting two
    sigmoids (which loses everything when both are near 0 or 1), use the exact identity
    σ(u) − σ(l) = σ(u)·σ(−l)·(1 − e^{−(u−l)}), all three factors in log form (log-sigmoid and
    log(−expm1)), accurate for any u, l. Edge bins integrate to ±∞: P(0) = σ(u), P(255) = σ(−l).
    Where the bin is so narrow relative to s that u − l underflows, fall back to the mid-point
    density times the bin width, as Salimans et al. do for tiny probabilities.
    """
    inv_scale = torch.exp(-log_scale)
    centred = x - mean
    upper = inv_scale * (centred + _HALF_BIN)
    lower = inv_scale * (centred - _HALF_BIN)
    log_cdf_upper = F.logsigmoid(upper)
    log_sf_lower = F.logsigmoid(-lower)
    width = inv_scale * (2.0 * _HALF_BIN)
    tiny = torch.finfo(width.dtype).tiny * 1e4
    log_interior = log_cdf_upper + log_sf_lower + torch.log(-torch.expm1(-width.clamp_min(tiny)))
    mid = inv_scale * centred
    log_mid = mid - log_scale - 2.0 * F.softplus(mid) + math.log(2.0 * _HALF_BIN)
    log_interior = torch.where(width > tiny, log_interior, log_mid)
    return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_sf_lower, log_interior))


def _component_log_probs(x: Tensor, params: Tensor, num_mixtures: int):
    """Per-component, per-channel conditional log-probs and log mixture weights.

    x: bin centres on [-1, 1], [B, C, H, W] (float, may require grad). Returns
    (log_weights [B,K,H,W], log_probs [B,C,K,H,W]) with log_probs[:, c] = log p(x_c | x_<c, k).
    """
    channels = x.shape[1]
    logits, means, log_scales, coeffs = _split_params(params, num_mixtures, channels)
    previous = [x[:, c : c + 1] for c in range(channels)]  # [B,1,H,W] broadcasts over K
    per_channel = [
        _bin_log_prob(previous[c], _coupled_mean(means, coeffs, previous, c), log_scales[:, c])
        for c in range(channels)
    ]
    return F.log_softmax(logits, dim=1), torch.stack(per_channel, dim=1)


def _log_prob_scaled(x: Tensor, params: Tensor, num_mixtures: int, num_channels: int | None = None) -> Tensor:
    """log p(x_0..x_{n−1}) per pixel [B,H,W] of the first n channels (all by default).

    The mixture is over whole pixels (one component for all channels), so the joint is
    logsumexp_k(log π_k + Σ_c log p(x_c | x_<c, k)).
    """
    log_weights, log_probs = _component_log_probs(x, params, num_mixtures)
    if num_channels is not None:
        log_probs = log_probs[:, :num_channels]
    return torch.logsumexp(log_weights + log_probs.sum(dim=1), dim=1)


def discretized_mix_logistic_log_prob(x_uint8: Tensor, params: Tensor, num_mixtures: int) -> Tensor:
    """Log-probability in nats of each pixel, summed over its channels: [B, H, W].

    x_uint8: [B, C, H, W] uint8 (C = 1 or 3); params: [B, mixture_param_channels(K, C), H, W].
    The channels of a pixel share one mixture component and are coupled through the means, so
    per-channel terms do not exist separately: the result is log p(x_R, x_G, x_B) of the pixel.
    Computed in float32 whatever the autocast state.
    """
    if x_uint8.dtype != torch.uint8:
        raise TypeError(f"x must be a uint8 batch, got {x_uint8.dtype}")
    with full_precision(params):
        return _log_prob_scaled(to_unit_interval(x_uint8), params.float(), num_mixtures)


def temper_mixture_params(params: Tensor, num_mixtures: int, channels: int, temperature: float) -> Tensor:
    """params with logits / T and scales × T: T < 1 sharpens, T = 1 leaves them unchanged."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if temperature == 1.0:
        return params
    k, c = num_mixtures, channels
    params = params.clone()
    params[:, :k] /= temperature
    params[:, k + c * k : k + 2 * c * k] += math.log(temperature)
    return params


def mixture_mean(params: Tensor, num_mixtures: int, channels: int) -> Tensor:
    """uint8 [B, C, H, W]: each pixel's mean under the continuous mixture (before discretisation),
    E[x_c] = Σ_k π_k E[x_c | k], with E[x_c | k] = μ_c,k coupled to the earlier channels' means
    within component k (paper eq. 3); clipped to [-1, 1] and rounded to the nearest level. No
    noise: the image a decoder "means", not a draw from p(x|z)."""
    with full_precision(params):
        logits, means, _, coeffs = _split_params(params.float(), num_mixtures, channels)
        weights = torch.softmax(logits, dim=1)  # [B,K,H,W]
        levels, previous = [], []
        for c in range(channels):
            component_mean = _coupled_mean(means, coeffs, previous, c)  # [B,K,H,W]
            previous.append(component_mean)
            value = (weights * component_mean).sum(dim=1, keepdim=True)
            levels.append(torch.round((value.clamp(-1.0, 1.0) + 1.0) * 127.5))
        return torch.cat(levels, dim=1).to(torch.uint8)


def _uniform(shape, generator: torch.Generator, device: torch.device) -> Tensor:
    noise = torch.rand(shape, generator=generator, dtype=torch.float32)
    return noise.clamp_(_UNIFORM_EPS, 1.0 - _UNIFORM_EPS).to(device)


def sample_discretized_mix_logistic(
    params: Tensor, num_mixtures: int, channels: int, generator: torch.Generator
) -> Tensor:
    """uint8 samples [B, C, H, W] from the mixture, channel by channel R → G → B.

    All noise is drawn on the CPU from `generator` and then moved to params.device, so a seed
    gives the same bytes on any device. The component is drawn once per pixel by Gumbel-max;
    each channel is a logistic draw μ + s·(log u − log(1 − u)), rounded to the nearest level,
    and the quantised value (what the likelihood conditions on) feeds the next channel's mean.
    """
    with full_precision(params):
        params = params.float()
        logits, means, log_scales, coeffs = _split_params(params, num_mixtures, channels)
        b, k, h, w = logits.shape
        gumbel = -torch.log(-torch.log(_uniform((b, k, h, w), generator, params.device)))
        component = (logits + gumbel).argmax(dim=1, keepdim=True)  # [B,1,H,W]

        def pick(t: Tensor) -> Tensor:  # [B,n,K,H,W] -> [B,n,1,H,W] at the drawn component
            index = component.unsqueeze(1).expand(b, t.shape[1], 1, h, w)
            return t.gather(2, index)

        means, log_scales = pick(means), pick(log_scales)
        coeffs = pick(coeffs) if coeffs is not None else None
        u = _uniform((b, channels, h, w), generator, params.device)
        logistic = torch.log(u) - torch.log1p(-u)
        levels, previous = [], []
        for c in range(channels):
            mean = _coupled_mean(means, coeffs, previous, c)  # [B,1,H,W]
            value = mean + torch.exp(log_scales[:, c]) * logistic[:, c : c + 1]
            level = torch.round((value.clamp(-1.0, 1.0) + 1.0) * 127.5)
            levels.append(level)
            previous.append(level / 127.5 - 1.0)
        return torch.cat(levels, dim=1).to(torch.uint8)
