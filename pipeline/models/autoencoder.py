"""The VAE family's autoencoder mode: a KL-regularised convolutional autoencoder for latent diffusion.

Latent diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion
Models", sec. 3.1 and appendix G) trains the diffusion model on the latent grid of an autoencoder
instead of on pixels. The autoencoder is a VAE whose latent is a spatial map z ∈ R^{c × H/f × W/f}
(downsampling factor f = 2^(levels − 1), c latent channels) with q(z|x) = N(μ(x), diag σ²(x)),
reparameterised z = μ + σ·ε, and a decoder x̂ = D(z). Its loss is the LDM recipe:

    L = ( Σ_pixels |x − x̂|  +  β · Σ_latent KL(q(z|x) ‖ N(0, I)) ) / pixels        (LDM eq. 25)

with a small β (LDM: 1e-6), so the latent keeps the detail a diffusion model needs while its scale
stays near unit variance; ``recon_loss: mse`` uses squared error instead of L1. Perceptual (LPIPS)
and adversarial terms of the paper need pretrained networks that cannot be downloaded here and are
left out.

Held-out reports (`held_out_metrics`): reconstruction PSNR (dB, on the uint8 reconstruction) and
the KL per image in nats. ``bits_per_dim`` is a true upper bound, the negative ELBO with β = 1 and a
discretised Gaussian decoder N(x̂, s²) whose variance s² is the training reconstructions' mean
squared error (its maximum-likelihood value, a running average kept as a buffer, no gradient):
with β ≪ 1 in training the bound is loose, and it says how far the latent is from a density
model, not how good the autoencoder is.

`encode` / `decode` are what `data-prep latents` and latent diffusion use.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from pipeline.configbase import StrictModel
from pipeline.errors import UserError
from pipeline.models.base import GenerativeModel, to_uint8, to_unit_interval
from pipeline.models.layers import group_norm


class AutoencoderConfig(StrictModel):
    family: Literal["autoencoder"] = "autoencoder"
    base_channels: int = Field(default=64, ge=1)
    """Channels at full resolution; level i has base_channels × channel_mult[i]."""
    channel_mult: list[int] = Field(default_factory=lambda: [1, 2, 2, 4], min_length=1)
    """One entry per resolution level; the downsampling factor is 2^(len − 1) (LDM f=8: 4 levels)."""
    num_res_blocks: int = Field(default=1, ge=1)
    latent_channels: int = Field(default=4, ge=1)
    """Channels c of the latent grid (LDM: 4 at f=8)."""
    norm_groups: int = Field(default=32, ge=1)
    recon_loss: Literal["l1", "mse"] = "l1"
    kl_weight: float = Field(default=1e-6, ge=0)
    """β of the loss above (LDM: 1e-6 with sums over pixels and latent elements)."""
    mid_attention: bool = False
    """Self-attention at the lowest resolution (LDM's mid block); off for CPU-sized models."""

    @model_validator(mode="after")
    def _groups_divide(self) -> AutoencoderConfig:
        for multiplier in self.channel_mult:
            if (self.base_channels * multiplier) % self.norm_groups:
                raise ValueError(f"norm_groups {self.norm_groups} does not divide the "
                                 f"{self.base_channels * multiplier} channels of a level")
        return self

    @property
    def downsampling(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)


class _ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.body = nn.Sequential(
            group_norm(cin, groups), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1),
            group_norm(cout, groups), nn.SiLU(), nn.Conv2d(cout, cout, 3, padding=1),
        )
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.body(x)


def _mid(channels: int, config: AutoencoderConfig) -> nn.Sequential:
    from pipeline.models.layers import AttentionBlock

    layers = [_ResBlock(channels, channels, config.norm_groups)]
    if config.mid_attention:
        layers += [AttentionBlock(channels, norm_groups=config.norm_groups),
                   _ResBlock(channels, channels, config.norm_groups)]
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    """x [-1, 1] → (μ, log σ²), each [B, c, H/f, W/f]."""

    def __init__(self, config: AutoencoderConfig, channels: int):
        super().__init__()
        widths = [config.base_channels * m for m in config.channel_mult]
        layers: list[nn.Module] = [nn.Conv2d(channels, widths[0], 3, padding=1)]
        current = widths[0]
        for level, width in enumerate(widths):
            for _ in range(config.num_res_blocks):
                layers.append(_ResBlock(current, width, config.norm_groups))
                current = width
            if level < len(widths) - 1:
                layers.append(nn.Conv2d(current, current, 3, stride=2, padding=1))
        layers += [_mid(current, config), group_norm(current, config.norm_groups), nn.SiLU(),
                   nn.Conv2d(current, 2 * config.latent_channels, 3, padding=1)]
        self.network = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, logvar = self.network(x).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)  # LDM's clamp: exp stays finite in fp32


class Decoder(nn.Module):
    """z [B, c, H/f, W/f] → x̂ [B, C, H, W] in [-1, 1] (unclamped)."""

    def __init__(self, config: AutoencoderConfig, channels: int):
        super().__init__()
        widths = [config.base_channels * m for m in config.channel_mult]
        current = widths[-1]
        layers: list[nn.Module] = [nn.Conv2d(config.latent_channels, current, 3, padding=1), _mid(current, config)]
        for level in reversed(range(len(widths))):
            for _ in range(config.num_res_blocks):
                layers.append(_ResBlock(current, widths[level], config.norm_groups))
                current = widths[level]
            if level > 0:
                layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(current, current, 3, padding=1)]
        layers += [group_norm(current, config.norm_groups), nn.SiLU(), nn.Conv2d(current, channels, 3, padding=1)]
        self.network = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.network(z)


def kl_to_standard_normal(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Per-image Σ KL(N(μ, σ²) ‖ N(0, 1)) in nats (Kingma & Welling 2014, appendix B)."""
    return (0.5 * (mean.square() + logvar.exp() - 1.0 - logvar)).flatten(1).sum(1)


def discretized_gaussian_nll(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """Per-image −log P(x) in nats of 8-bit x (in [-1, 1], bins of width 2/255) under N(mean, s²),
    the end bins taking the tails (DDPM's decoder, Ho et al. 2020 eq. 13)."""
    from pipeline.models.diffusion import discretized_gaussian_log_likelihood

    log_scale = log_scale.expand_as(mean)
    return -discretized_gaussian_log_likelihood(x, mean, 2.0 * log_scale).flatten(1).sum(1).float()


class AutoencoderModel(GenerativeModel):
    """KL-regularised autoencoder (module docstring); the latent-diffusion first stage."""

    bits_per_dim_kind = "upper_bound"
    held_out_metric_names = ("psnr", "kl")
    """What `held_out_metrics` returns; `pipeline.evaluate` logs them as eval/psnr and eval/kl."""

    def __init__(self, config: AutoencoderConfig, image_size: int, channels: int):
        super().__init__()
        self.config = config
        factor = config.downsampling
        if image_size % factor:
            raise UserError(f"model.channel_mult: {len(config.channel_mult)} levels downsample by {factor}, "
                            f"which does not divide image_size {image_size}")
        self.image_shape = (channels, image_size, image_size)
        self.latent_shape = (config.latent_channels, image_size // factor, image_size // factor)
        self.encoder = Encoder(config, channels)
        self.decoder = Decoder(config, channels)
        self.register_buffer("recon_mse", torch.tensor(0.01))
        """Running mean squared reconstruction error on [-1, 1]: the bound's decoder variance."""

    def fsdp_blocks(self) -> list[nn.Module]:
        return [self.encoder, self.decoder]

    # -- the two halves ----------------------------------------------------------------------------

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(μ, log σ²) of q(z|x) for a uint8 batch."""
        return self.encoder(to_unit_interval(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """x̂ in [-1, 1] (unclamped) for latents z."""
        return self.decoder(z)

    def _terms(self, x: torch.Tensor, noise: torch.Tensor | None = None):
        target = to_unit_interval(x)
        mean, logvar = self.encoder(target)
        if noise is None:
            noise = torch.randn_like(mean)
        z = mean + torch.exp(0.5 * logvar) * noise
        reconstruction = self.decoder(z)
        return target, reconstruction, mean, logvar

    # -- the family interface ------------------------------------------------------------------------

    def loss(self, x: torch.Tensor, labels: torch.Tensor | None = None):
        self.check_labels(labels, x.shape[0])
        target, reconstruction, mean, logvar = self._terms(x)
        error = reconstruction.float() - target
        per_pixel = error.abs() if self.config.recon_loss == "l1" else error.square()
        pixels = math.prod(self.image_shape)
        rec = per_pixel.flatten(1).sum(1)
        kl = kl_to_standard_normal(mean.float(), logvar.float())
        loss = ((rec + self.config.kl_weight * kl) / pixels).mean()
        mse = error.detach().square().flatten(1).mean(1)
        if self.training:
            with torch.no_grad():
                self.recon_mse.lerp_(mse.mean().to(self.recon_mse.dtype), 0.01)
        metrics = {"rec": rec.detach().mean() / pixels, "kl": kl.detach().mean(), "psnr": psnr_from_mse(mse / 4).mean()}
        return loss, metrics

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator, labels: torch.Tensor | None = None,
               temperature: float = 1.0) -> torch.Tensor:
        """z ~ N(0, T²I) decoded: what the prior alone gives (a diffusion model on the latents is
        what makes good samples: launch sample on a latent-diffusion run)."""
        self.check_labels(labels, n)
        device = self.recon_mse.device
        z = temperature * torch.randn((n, *self.latent_shape), generator=generator).to(device)
        return to_uint8(self.decoder(z).float())

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 reconstruction from the posterior mean."""
        return to_uint8(self.decoder(self.encode(x)[0]).float())

    def bits_per_dim(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """−ELBO (β = 1) in bits per dimension, one posterior draw (module docstring)."""
        self.check_labels(labels, x.shape[0])
        target, reconstruction, mean, logvar = self._terms(x)
        log_scale = 0.5 * torch.log(self.recon_mse.float().clamp_min(1e-8))
        nll = discretized_gaussian_nll(target, reconstruction.float(), log_scale)
        nats = nll + kl_to_standard_normal(mean.float(), logvar.float())
        return nats / (math.prod(self.image_shape) * math.log(2))

    @torch.no_grad()
    def held_out_metrics(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Per-image reconstruction PSNR (dB, the uint8 reconstruction from μ) and KL (nats)."""
        mean, logvar = self.encode(x)
        reconstruction = to_uint8(self.decoder(mean).float()).float()
        mse = (reconstruction - x.float()).square().flatten(1).mean(1) / 255.0**2
        return {"psnr": psnr_from_mse(mse), "kl": kl_to_standard_normal(mean.float(), logvar.float())}


def psnr_from_mse(mse: torch.Tensor, peak: float = 1.0) -> torch.Tensor:
    """10 log10(peak² / mse) per image; images in [0, 1] have peak 1 (the [-1, 1] scale: use mse/4)."""
    return 10.0 * torch.log10(peak**2 / mse.clamp_min(1e-12))
