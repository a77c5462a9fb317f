"""Variational autoencoder for 8-bit images (Kingma & Welling 2014) with a logistic-mixture decoder.

q(z|x) = N(μ(x), diag σ²(x)) over a spatial latent z ∈ R^{latent_channels × H/f × W/f},
f = 2**downsample_levels; p(z) = N(0, I); p(x|z) a discretised logistic mixture per pixel
(Salimans et al. 2017; ``likelihoods.py``), so −log p(x|z) is a true discrete NLL in nats.

Objective (Kingma & Welling 2014 eq. 10, with the KL of their appendix B in closed form):

    −ELBO(x) = E_q[−log p(x|z)] + KL(q(z|x) ‖ N(0, I)),
    KL = ½ Σ_j (μ_j² + σ_j² − 1 − log σ_j²),

with z = μ + σ ⊙ ε, ε ~ N(0, I) (the reparameterisation trick, sec. 2.4). Training minimises
recon + β·KL: β ramps linearly 0 → ``beta`` over ``kl_warmup_steps`` training calls of ``loss``
(Bowman et al. 2016; Sønderby et al. 2016), counted in a buffer so resuming continues the ramp;
with ``free_bits`` = λ the KL of each latent channel (its spatial map is one group), averaged
over the batch, is clamped below at λ nats per latent dimension (Kingma et al. 2016, eq. 15).
Both only shape the training objective; the metrics and ``bits_per_dim`` always use β = 1.

``bits_per_dim`` is an upper bound on the model's −log2 p(x)/D: −ELBO, or with K > 1 importance
samples the tighter IWAE bound (Burda et al. 2016, eq. 8)
    log p(x) ≥ log (1/K) Σ_k p(x|z_k) p(z_k) / q(z_k|x),   z_k ~ q(z|x).
Losses and bits/dim divide nats by D·ln 2, D = C·H·W.

Class-conditional (``num_classes``; the conditional VAE of Sohn et al. 2015): the encoder
q(z|x, y) and the decoder p(x|z, y) add a learned per-class bias to the channels of their first
convolution, and the prior p(z|y) = N(μ_y, diag σ_y²) has a learned mean and log-variance map per
class, zero at initialisation (so it starts as N(0, I)). The KL term is then between two
Gaussians, ½ Σ_j (log σ_y,j² − log σ_j² + (σ_j² + (μ_j − μ_y,j)²) / σ_y,j² − 1), and sampling
draws z ~ N(μ_y, T² σ_y²) for the asked classes.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from pipeline.configbase import StrictModel
from pipeline.errors import UserError
from pipeline.models.base import GenerativeModel, to_unit_interval
from pipeline.models.likelihoods import (
    discretized_mix_logistic_log_prob,
    mixture_mean,
    mixture_param_channels,
    sample_discretized_mix_logistic,
)

LOG_2PI = math.log(2.0 * math.pi)
# log σ² is clamped so that exp() can neither overflow nor make σ exactly 0 early in training.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


class VAEConfig(StrictModel):
    """A convolutional VAE with a spatial Gaussian latent and a logistic-mixture decoder."""

    family: Literal["vae"] = "vae"
    """Discriminator of the model section."""
    hidden_channels: int = Field(default=128, ge=1)
    """Width of every convolution in the encoder and decoder."""
    downsample_levels: int = Field(default=2, ge=0)
    """Stride-2 downsamplings in the encoder (and 2× upsamplings in the decoder): the latent is
    [latent_channels, H / 2**levels, W / 2**levels]; image_size must be divisible by 2**levels."""
    res_blocks: int = Field(default=2, ge=0)
    """Residual blocks at each resolution of the encoder and decoder."""
    latent_channels: int = Field(default=16, ge=1)
    """Channels of the latent map (CIFAR-10 with the defaults: 16 × 8 × 8 = 1024 latent dims)."""
    num_mixtures: int = Field(default=10, ge=1)
    """Logistic mixture components per pixel of the decoder (PixelCNN++ uses 10)."""
    beta: float = Field(default=1.0, gt=0)
    """Weight of the KL term once warm-up is over (1 is the ELBO; ≠ 1 is a β-VAE objective)."""
    kl_warmup_steps: int = Field(default=0, ge=0)
    """The KL weight ramps linearly from 0 to ``beta`` over this many training calls of ``loss``
    (micro-batches, so with gradient accumulation it counts grad_accum per optimizer step);
    0 disables warm-up."""
    free_bits: float = Field(default=0.0, ge=0)
    """λ of free bits (Kingma et al. 2016): each latent channel's batch-mean KL is not pushed
    below λ nats per latent dimension. 0 disables it."""
    iwae_samples: int = Field(default=1, ge=1)
    """Importance samples K of ``bits_per_dim``: 1 reports −ELBO, K > 1 the IWAE bound."""
    num_classes: int | None = Field(default=None, ge=1)
    """Classes of a class-conditional VAE (labels 0..num_classes-1): conditional encoder,
    decoder and prior. None: unconditional."""


def gaussian_kl_to_standard(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Elementwise KL(N(mean, e^logvar) ‖ N(0, 1)) in nats (Kingma & Welling 2014, appendix B)."""
    return 0.5 * (mean**2 + torch.exp(logvar) - 1.0 - logvar)


def gaussian_kl(mean: torch.Tensor, logvar: torch.Tensor, prior_mean: torch.Tensor,
                prior_logvar: torch.Tensor) -> torch.Tensor:
    """Elementwise KL(N(mean, e^logvar) ‖ N(prior_mean, e^prior_logvar)) in nats."""
    return 0.5 * (prior_logvar - logvar + (torch.exp(logvar) + (mean - prior_mean) ** 2)
                  * torch.exp(-prior_logvar) - 1.0)


def gaussian_log_prob(z: torch.Tensor, mean: torch.Tensor | None = None, logvar: torch.Tensor | None = None):
    """Per-image Σ log N(z; mean, e^logvar) (standard normal when mean is None), [B]."""
    if mean is None:
        per_dim = -0.5 * (z**2 + LOG_2PI)
    else:
        per_dim = -0.5 * ((z - mean) ** 2 * torch.exp(-logvar) + logvar + LOG_2PI)
    return per_dim.flatten(1).sum(1)


def _group_norm(channels: int) -> nn.GroupNorm:
    # Up to 32 groups (Wu & He 2018) of at least 2 channels, so a 1×1 latent map still normalises.
    return nn.GroupNorm(math.gcd(32, max(1, channels // 2)), channels)


class ResBlock(nn.Module):
    """x + conv(act(norm(conv(act(norm(x)))))), the pre-activation residual block."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            _group_norm(channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
            _group_norm(channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def _class_bias(config: VAEConfig) -> nn.Embedding | None:
    """A learned bias per class on the first convolution's channels (conditional models)."""
    if config.num_classes is None:
        return None
    bias = nn.Embedding(config.num_classes, config.hidden_channels)
    nn.init.zeros_(bias.weight)
    return bias


def _first_conv_then_rest(network: nn.Sequential, bias: nn.Embedding | None, x: torch.Tensor,
                          labels: torch.Tensor | None) -> torch.Tensor:
    h = network[0](x)
    if bias is not None:
        h = h + bias(labels).to(h.dtype)[:, :, None, None]
    return network[1:](h)


class Encoder(nn.Module):
    """x on [−1, 1] (and the class) -> (μ, log σ²) of q(z|x[, y]), each [B, latent_channels, H/f, W/f]."""

    def __init__(self, config: VAEConfig, channels: int):
        super().__init__()
        width = config.hidden_channels
        self.class_bias = _class_bias(config)
        layers: list[nn.Module] = [nn.Conv2d(channels, width, 3, padding=1)]
        for _ in range(config.downsample_levels):
            layers += [ResBlock(width) for _ in range(config.res_blocks)]
            layers.append(nn.Conv2d(width, width, 4, stride=2, padding=1))
        layers += [ResBlock(width) for _ in range(config.res_blocks)]
        layers += [_group_norm(width), nn.SiLU(), nn.Conv2d(width, 2 * config.latent_channels, 3, padding=1)]
        self.network = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        h = _first_conv_then_rest(self.network, self.class_bias, x, labels)
        h = h.to(torch.promote_types(h.dtype, torch.float32))  # KL and σ in fp32 under autocast
        mean, logvar = h.chunk(2, dim=1)
        return mean, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)


class Decoder(nn.Module):
    """z (and the class) -> logistic-mixture parameters [B, mixture_param_channels(K, C), H, W]."""

    def __init__(self, config: VAEConfig, channels: int):
        super().__init__()
        width = config.hidden_channels
        self.class_bias = _class_bias(config)
        layers: list[nn.Module] = [nn.Conv2d(config.latent_channels, width, 3, padding=1)]
        layers += [ResBlock(width) for _ in range(config.res_blocks)]
        for _ in range(config.downsample_levels):
            layers += [nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(width, width, 3, padding=1)]
            layers += [ResBlock(width) for _ in range(config.res_blocks)]
        out_channels = mixture_param_channels(config.num_mixtures, channels)
        layers += [_group_norm(width), nn.SiLU(), nn.Conv2d(width, out_channels, 3, padding=1)]
        self.network = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return _first_conv_then_rest(self.network, self.class_bias, z, labels)


class VAEModel(GenerativeModel):
    """The VAE objective (see the module docstring) behind the trainer's interface."""

    bits_per_dim_kind = "upper_bound"

    def __init__(self, config: VAEConfig, image_size: int, channels: int):
        super().__init__()
        factor = 2**config.downsample_levels
        if image_size % factor:
            raise UserError(
                f"model.downsample_levels={config.downsample_levels}: image_size {image_size} is not "
                f"divisible by 2**downsample_levels = {factor}; lower model.downsample_levels"
            )
        if channels not in (1, 3):
            raise UserError(
                f"data.channels={channels}: the VAE's logistic-mixture decoder supports 1 or 3 channels"
            )
        self.config, self.image_size, self.channels = config, image_size, channels
        self.latent_shape = (config.latent_channels, image_size // factor, image_size // factor)
        self.encoder = Encoder(config, channels)
        self.decoder = Decoder(config, channels)
        self.num_classes = config.num_classes
        if config.num_classes is not None:
            # p(z|y): a mean and a log-variance map per class, zero (N(0, I)) at initialisation.
            self.prior = nn.Embedding(config.num_classes, 2 * math.prod(self.latent_shape))
            nn.init.zeros_(self.prior.weight)
        # Training calls of `loss` so far, for the KL warm-up; a buffer so checkpoints carry it.
        self.register_buffer("kl_warmup_calls", torch.zeros((), dtype=torch.long))

    def kl_weight(self) -> torch.Tensor:
        """β at the current warm-up position: beta · min(1, calls / kl_warmup_steps), a 0-dim
        tensor computed on the device (reading the counter as a Python int would sync)."""
        steps = self.config.kl_warmup_steps
        if steps == 0:
            return torch.full((), self.config.beta, device=self.kl_warmup_calls.device)
        return self.config.beta * (self.kl_warmup_calls.float() / steps).clamp(max=1.0)

    def _encode(self, x: torch.Tensor, labels: torch.Tensor | None = None):
        return self.encoder(to_unit_interval(x).to(self._dtype()), labels)

    def _dtype(self) -> torch.dtype:
        return self.decoder.network[0].weight.dtype

    def _reconstruction_log_prob(self, x: torch.Tensor, z: torch.Tensor,
                                 labels: torch.Tensor | None = None) -> torch.Tensor:
        """log p(x|z[, y]) per image [B], in nats."""
        params = self.decoder(z.to(self._dtype()), labels)
        return discretized_mix_logistic_log_prob(x, params, self.config.num_mixtures).flatten(1).sum(1)

    def prior_params(self, labels: torch.Tensor | None):
        """(mean, log-variance) of p(z|y), each [B, *latent_shape] in float32; (None, None) for
        the unconditional prior N(0, I)."""
        if labels is None:
            return None, None
        mean, logvar = self.prior(labels).float().view(-1, 2, *self.latent_shape).unbind(1)
        return mean, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    def _kl_per_dim(self, mean, logvar, labels):
        prior_mean, prior_logvar = self.prior_params(labels)
        if prior_mean is None:
            return gaussian_kl_to_standard(mean, logvar)
        return gaussian_kl(mean, logvar, prior_mean, prior_logvar)

    def _labels(self, labels: torch.Tensor | None, count: int, device, required: bool = False):
        labels = self.check_labels(labels, count, required=required)
        if self.num_classes is not None and labels is None:
            labels = self.default_labels(count, device)
        return labels

    def loss(self, x: torch.Tensor, labels: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        labels = self._labels(labels, x.shape[0], x.device)
        mean, logvar = self._encode(x, labels)
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
        reconstruction_nll = -self._reconstruction_log_prob(x, z, labels)
        kl_per_dim = self._kl_per_dim(mean, logvar, labels)
        kl = kl_per_dim.flatten(1).sum(1)

        if self.config.free_bits > 0:
            # Kingma et al. 2016 eq. 15: Σ_groups max(λ, E_batch[KL_group]), a group = one channel.
            per_channel = kl_per_dim.sum(dim=(2, 3)).mean(0)
            kl_objective = per_channel.clamp_min(self.config.free_bits * kl_per_dim[0, 0].numel()).sum()
        else:
            kl_objective = kl.mean()

        weight = self.kl_weight()
        if self.training:
            self.kl_warmup_calls += 1
        nats_to_bpd = 1.0 / (x[0].numel() * math.log(2.0))
        loss = (reconstruction_nll.mean() + weight * kl_objective) * nats_to_bpd
        reconstruction_bpd = reconstruction_nll.mean().detach() * nats_to_bpd
        kl_bpd = kl.mean().detach() * nats_to_bpd
        metrics = {
            "reconstruction_bpd": reconstruction_bpd,
            "kl_bpd": kl_bpd,
            "elbo_bpd": reconstruction_bpd + kl_bpd,
            "kl_weight": weight.detach(),
        }
        return loss, metrics

    @torch.no_grad()
    def bits_per_dim(self, x: torch.Tensor, labels: torch.Tensor | None = None,
                     iwae_samples: int | None = None) -> torch.Tensor:
        """Per-image −ELBO (K = 1) or IWAE bound (K > 1) in bits/dim; K defaults to the config's.
        A conditional VAE's bound is on log p(x|y), given the true labels."""
        samples = self.config.iwae_samples if iwae_samples is None else iwae_samples
        if samples < 1:
            raise ValueError(f"iwae_samples must be >= 1, got {samples}")
        labels = self._labels(labels, x.shape[0], x.device, required=True)
        mean, logvar = self._encode(x, labels)
        std = torch.exp(0.5 * logvar)
        if samples == 1:
            z = mean + std * torch.randn_like(mean)
            kl = self._kl_per_dim(mean, logvar, labels).flatten(1).sum(1)
            bound = self._reconstruction_log_prob(x, z, labels) - kl
        else:
            prior_mean, prior_logvar = self.prior_params(labels)
            log_weights = []
            for _ in range(samples):
                z = mean + std * torch.randn_like(mean)
                log_weights.append(
                    self._reconstruction_log_prob(x, z, labels)
                    + gaussian_log_prob(z, prior_mean, prior_logvar)
                    - gaussian_log_prob(z, mean, logvar)
                )
            bound = torch.logsumexp(torch.stack(log_weights), dim=0) - math.log(samples)
        return -bound / (x[0].numel() * math.log(2.0))

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator, labels: torch.Tensor | None = None,
               temperature: float = 1.0, mean: bool = False, **options) -> torch.Tensor:
        """z ~ N(0, T²I) (conditional: N(μ_y, T²σ_y²) for the given classes) -> decoder -> a draw
        from the pixel mixture, or with ``mean`` the mixture's mean image (`mixture_mean`: no
        per-pixel noise, as VAE samples are usually shown); noise from `generator`."""
        if options:
            raise UserError(
                f"sampling options {sorted(options)} are not understood by the vae family "
                f"(temperature and mean only)"
            )
        device = self.decoder.network[0].weight.device
        labels = self._labels(labels, n, device)
        z = temperature * torch.randn((n, *self.latent_shape), generator=generator).to(device)
        if labels is not None:
            labels = labels.to(device)
            prior_mean, prior_logvar = self.prior_params(labels)
            z = prior_mean + torch.exp(0.5 * prior_logvar) * z
        params = self.decoder(z.to(device=device, dtype=self._dtype()), labels)
        if mean:
            return mixture_mean(params, self.config.num_mixtures, self.channels)
        return sample_discretized_mix_logistic(params, self.config.num_mixtures, self.channels, generator)
