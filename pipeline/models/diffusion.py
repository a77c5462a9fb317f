"""Gaussian diffusion: noise schedules, q_sample, posterior, samplers, variational bound, the model.

The mathematics of DDPM (Ho et al. 2020, "Denoising Diffusion Probabilistic Models"), the cosine
schedule of Nichol & Dhariwal 2021 ("Improved DDPM") and DDIM (Song et al. 2021, "Denoising
Diffusion Implicit Models"), and `DiffusionModel`, which puts a network, an objective and a
sampler together. Each is apart: the network is only a function f(x_t, t, labels) (`unet.UNet`
or `dit.DiT`, ``model.network``); the objective (`objectives.py`: eps-prediction, v-prediction,
flow matching; ``model.objective``) says what f predicts and how it is trained; the samplers are
DDPM and DDIM here (eps and v: the v-model's eps follows algebraically) and Euler and Heun ODE
solvers for flow matching (`samplers.py`).

Class-conditional models (``model.num_classes``) add a class embedding to the network's time
embedding; with ``model.label_dropout`` > 0 a null class replaces the label of that fraction of
training images, so one network is both p(x|y) and p(x), and sampling can use classifier-free
guidance (Ho & Salimans 2022): f_u + s (f_c - f_u), scale s = 1 the conditional model, 0 the
unconditional one, both halves in one batched network pass (`classifier_free_guidance`).

Timesteps are 0-indexed: t in {0, ..., T-1} here is the paper's t in {1, ..., T}. "alpha_bar[-1]"
(the paper's alpha_bar_0) is 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from pipeline.configbase import StrictModel
from pipeline.errors import UserError
from pipeline.models import objectives, samplers
from pipeline.models.base import GenerativeModel, HeldOutEstimator, to_uint8, to_unit_interval
from pipeline.models.dit import DIT_SIZES, DiT
from pipeline.models.unet import UNet

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""eps_theta(x_t [N, C, H, W] float32, t [N] int64) -> predicted noise, float32, same shape."""


# --------------------------------------------------------------------------------------------
# Config


class DiffusionConfig(StrictModel):
    """The `model:` section of a diffusion run. Defaults: DDPM's CIFAR-10 model (35.7M params)."""

    family: Literal["diffusion"] = "diffusion"

    network: Literal["unet", "dit"] = "unet"
    """The network: "unet" (the DDPM U-Net, unet.py: the fields below down to dropout) or "dit"
    (the Diffusion Transformer, dit.py: dit_size, the dit_* overrides and patch_size)."""

    # -- network (unet.UNet) --
    base_channels: int = Field(128, ge=1)
    """Channels of the U-Net's first level (DDPM: 128)."""
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)
    """Channel multiplier per level; one level per entry, each but the last halves the resolution.
    DDPM: (1, 2, 2, 2) at 32px, (1, 1, 2, 2, 4, 4) at 256px."""
    num_res_blocks: int = Field(2, ge=1)
    """Residual blocks per level on the way down (one more on the way up)."""
    attention_resolutions: tuple[int, ...] = (16,)
    """Resolutions (in pixels, e.g. 16 for 16x16) whose blocks are followed by self-attention.
    Each must be reached, i.e. be image_size / 2^i for some level i (checked when building)."""
    num_heads: int = Field(1, ge=1)
    """Attention heads (DDPM: 1). Ignored when head_channels is set."""
    head_channels: int | None = Field(None, ge=1)
    """Channels per attention head; when set, heads = channels // head_channels at each level."""
    norm_groups: int = Field(32, ge=1)
    """Groups of every GroupNorm (DDPM: 32); must divide base_channels * every channel_mult."""
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    """Dropout inside residual blocks (DDPM: 0.1 on CIFAR-10, 0 on LSUN / CelebA-HQ)."""

    # -- network (dit.DiT) --
    dit_size: Literal["S", "B", "L", "XL"] = "S"
    """Published DiT size (Peebles & Xie 2023, table 1): depth, width and heads of S (12, 384,
    6), B (12, 768, 12), L (24, 1024, 16) or XL (28, 1152, 16)."""
    dit_depth: int | None = Field(None, ge=1)
    """Blocks, replacing the size's (a tiny DiT for tests and CPUs)."""
    dit_width: int | None = Field(None, ge=4)
    """Token channels, replacing the size's; a multiple of 4 and of the heads."""
    dit_heads: int | None = Field(None, ge=1)
    """Attention heads, replacing the size's."""
    patch_size: int = Field(2, ge=1)
    """Side of the square patch each DiT token covers (DiT: 2, 4 or 8); divides image_size."""
    latent_channels: int | None = Field(None, ge=1)
    """Channels of the latents the network models instead of pixels (4: Stable Diffusion's
    autoencoder), for latent-space configs; None: data.channels, or the autoencoder's latent
    channels with ``autoencoder`` set (which must agree)."""
    autoencoder: str | None = None
    """Run directory of an autoencoder (model.family autoencoder): latent diffusion
    (docs/latent.md). The model trains on the latent shards `data-prep latents` wrote with that
    run (data.shards; data.image_size is the latent side), and its samples are decoded to images
    through the autoencoder, whose frozen weights it loads from the run's newest checkpoint and
    then keeps in its own checkpoints."""

    # -- conditioning --
    num_classes: int | None = Field(None, ge=1)
    """Classes of a class-conditional model (labels 0..num_classes-1 from the shards' .cls);
    None: unconditional."""
    label_dropout: float = Field(0.1, ge=0.0, lt=1.0)
    """Fraction of training images whose label is replaced by the null class (conditional models
    only), which classifier-free guidance needs (Ho & Salimans 2022: 0.1 to 0.2; DiT: 0.1);
    0 trains no null class, and then sampling takes only guidance 1."""

    # -- objective (objectives.py) --
    objective: Literal["eps", "v", "flow_matching"] = "eps"
    """What the network predicts: "eps" the noise (DDPM), "v" = alpha_t eps - sigma_t x0
    (Salimans & Ho 2022), or "flow_matching" the velocity eps - x0 of x_t = (1 - t) x0 + t eps
    in continuous time (Lipman et al. 2023; rectified flow, Liu et al. 2023)."""
    time_sampling: Literal["uniform", "logit_normal"] = "uniform"
    """flow_matching: how t is drawn in training: uniform on [0, 1], or sigmoid(m + s n),
    n ~ N(0, 1) (Esser et al. 2024, eq. 19; m = logit_mean, s = logit_std)."""
    logit_mean: float = 0.0
    """m of the logit-normal time sampling (SD3: 0)."""
    logit_std: float = Field(1.0, gt=0.0)
    """s of the logit-normal time sampling (SD3: 1)."""
    likelihood_steps: int = Field(32, ge=1)
    """flow_matching: steps of the probability-flow ODE solve of bits_per_dim (each costs one
    network pass and one vector-Jacobian product per image, twice for heun)."""
    likelihood_solver: Literal["euler", "heun"] = "heun"
    """flow_matching: the ODE solver of bits_per_dim."""

    # -- forward process --
    timesteps: int = Field(1000, ge=2)
    """Number of diffusion steps T."""
    schedule: Literal["linear", "cosine"] = "linear"
    """Variance schedule: "linear" (DDPM: beta from beta_start to beta_end) or "cosine"
    (Nichol & Dhariwal 2021, eq. 17; beta_start and beta_end are then unused)."""
    beta_start: float = Field(1e-4, gt=0.0, lt=1.0)
    """beta_1 of the linear schedule (DDPM: 1e-4 for T = 1000)."""
    beta_end: float = Field(0.02, gt=0.0, lt=1.0)
    """beta_T of the linear schedule (DDPM: 0.02 for T = 1000)."""

    # -- reverse process --
    variance: Literal["fixed_large", "fixed_small"] = "fixed_large"
    """Fixed variance of p(x_{t-1}|x_t): "fixed_large" sigma^2 = beta_t (DDPM on CIFAR-10) or
    "fixed_small" sigma^2 = posterior variance beta~_t. Used by the DDPM sampler and the bound."""
    sampler: Literal["ddpm", "ddim", "euler", "heun"] | None = None
    """Sampler `sample()` uses unless told otherwise: for eps and v "ddpm" ancestral (T network
    calls) or "ddim" (sample_steps calls); for flow_matching the ODE solvers "euler"
    (sample_steps calls) or "heun" (2 sample_steps calls). None: ddpm, or heun for flow_matching."""
    sample_steps: int = Field(50, ge=1)
    """Steps of the DDIM sampler (at most timesteps) and of the Euler and Heun solvers. DDPM
    always takes T."""
    ddim_eta: float = Field(0.0, ge=0.0)
    """DDIM eta (Song et al. 2021, eq. 16): 0 deterministic, 1 the DDPM posterior variance."""
    clip_denoised: bool = True
    """Clip the predicted x_0 to [-1, 1] when sampling and in the variational bound."""
    vlb_timestep_batch: int = Field(4, ge=1)
    """Timesteps evaluated in one network call by bits_per_dim: the network sees
    batch * vlb_timestep_batch images at once. Changes speed and memory, never the result."""
    vlb_estimator: Literal["auto", "exact", "mc-stratified", "mc-importance"] = "auto"
    """How bits_per_dim, eval/bits_per_dim and `launch eval` evaluate the bound: "exact" sums all
    T terms (B * T network evaluations); "mc-stratified" and "mc-importance" estimate the middle
    terms without bias from vlb_timesteps_per_image timesteps per image (B * (K + 1)), in
    uniform strata or in strata of a proposal that starts at 1/t and is learnt over the pass
    (`TimestepImportance`; far less noisy: the first timesteps hold much of the bound); "auto"
    takes the exact sum when a pass's images * T is at most 20,000, else "mc-importance"."""
    vlb_timesteps_per_image: int = Field(16, ge=1)
    """Timesteps K per image of the Monte-Carlo estimates (at most T - 1 are used)."""

    @model_validator(mode="after")
    def _check(self) -> DiffusionConfig:
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ValueError(f"channel_mult must be a non-empty list of positive integers, "
                             f"got {list(self.channel_mult)}")
        if any(r < 1 for r in self.attention_resolutions):
            raise ValueError(f"attention_resolutions must be positive, got "
                             f"{list(self.attention_resolutions)}")
        bad = [self.base_channels * m for m in self.channel_mult
               if (self.base_channels * m) % self.norm_groups]
        if bad:
            raise ValueError(f"norm_groups {self.norm_groups} must divide the channels of every "
                             f"level; {bad} are not divisible (change base_channels or "
                             f"norm_groups)")
        if self.schedule == "linear" and self.beta_start > self.beta_end:
            raise ValueError(f"beta_start ({self.beta_start}) must not exceed beta_end "
                             f"({self.beta_end})")
        if self.objective != "flow_matching" and self.sample_steps > self.timesteps:
            raise ValueError(f"sample_steps ({self.sample_steps}) cannot exceed timesteps "
                             f"({self.timesteps})")
        if self.sampler is not None:
            check_sampler(self.objective, self.sampler, "sampler")
        width, heads = self.dit_shape()[1:]
        if self.network == "dit" and (width % heads or width % 4):
            raise ValueError(f"the DiT width {width} must be a multiple of 4 and of its "
                             f"{heads} heads (dit_width, dit_heads)")
        return self

    def dit_shape(self) -> tuple[int, int, int]:
        """(depth, width, heads) of the DiT: the size's, with any dit_* override."""
        depth, width, heads = DIT_SIZES[self.dit_size]
        return self.dit_depth or depth, self.dit_width or width, self.dit_heads or heads

    def resolved_sampler(self) -> str:
        return self.sampler or ("heun" if self.objective == "flow_matching" else "ddpm")


DISCRETE_SAMPLERS = ("ddpm", "ddim")
ODE_SAMPLERS = ("euler", "heun")


def check_sampler(objective: str, sampler: str, what: str = "sampler") -> None:
    """ValueError when ``sampler`` does not apply to ``objective``."""
    if objective == "flow_matching" and sampler not in ODE_SAMPLERS:
        raise ValueError(f"{what} {sampler!r} is a sampler of the discrete DDPM chain; the "
                         f"flow_matching objective samples with 'euler' or 'heun'")
    if objective != "flow_matching" and sampler not in DISCRETE_SAMPLERS:
        raise ValueError(f"{what} {sampler!r} solves the flow-matching ODE; the {objective} "
                         f"objective samples with 'ddpm' or 'ddim'")


def check_guidance(config: DiffusionConfig, guidance: float | None) -> None:
    """ValueError when classifier-free guidance at ``guidance`` is not possible for this model."""
    if guidance is None or guidance == 1.0:
        return
    if config.num_classes is None:
        raise ValueError(f"guidance {guidance} needs a class-conditional model (model.num_classes "
                         f"is not set); leave guidance out")
    if config.label_dropout == 0:
        raise ValueError(f"guidance {guidance} needs the null class that model.label_dropout > 0 "
                         f"trains (it is 0 for this model); only guidance 1 is possible")


# --------------------------------------------------------------------------------------------
# Schedules and the forward process


def beta_schedule(name: str, timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02,
                  cosine_offset: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """beta_t for t = 1..T as a float64 tensor [T].

    linear: evenly spaced from beta_start to beta_end (Ho et al. 2020, sec. 4).
    cosine: alpha_bar(t) = f(t) / f(0), f(t) = cos^2((t/T + s) / (1 + s) * pi/2), s = 0.008, and
        beta_t = min(1 - alpha_bar(t) / alpha_bar(t-1), 0.999) (Nichol & Dhariwal 2021, eq. 17).
    """
    if name == "linear":
        return torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64, device="cpu")
    if name == "cosine":
        steps = torch.arange(timesteps + 1, dtype=torch.float64, device="cpu") / timesteps
        f = torch.cos((steps + cosine_offset) / (1 + cosine_offset) * math.pi / 2) ** 2
        alpha_bar = f / f[0]
        return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)
    raise ValueError(f"unknown beta schedule {name!r}; expected 'linear' or 'cosine'")


def _per_sample(values: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """values[t] shaped [N, 1, 1, 1] to broadcast over images (a gather: no host sync)."""
    return values[t].view(-1, 1, 1, 1)


class NoiseSchedule(nn.Module):
    """The fixed forward process q and the fixed-variance reverse process p, as tensors.

    Everything is computed in float64 and stored as float32 non-persistent buffers: they follow
    the model to its device but stay out of checkpoints (they are rebuilt from the config).
    """

    def __init__(self, betas: torch.Tensor, variance: Literal["fixed_large", "fixed_small"]):
        super().__init__()
        betas = betas.to(torch.float64)
        alphas = 1 - betas
        alpha_bar = torch.cumprod(alphas, dim=0)
        alpha_bar_prev = torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])
        self.timesteps = betas.numel()
        self.variance = variance

        # Posterior q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, beta~_t) (Ho et al. eq. 6-7).
        posterior_variance = betas * (1 - alpha_bar_prev) / (1 - alpha_bar)
        # beta~ at t = 0 is 0; its log is clipped to beta~ at t = 1 (as DDPM does).
        posterior_log_variance = torch.log(
            torch.cat([posterior_variance[1:2], posterior_variance[1:]]))
        if variance == "fixed_large":
            # sigma_t^2 = beta_t, except at t = 0 where the decoder uses beta~_1 (DDPM's choice:
            # beta_1 would make the decoder too wide for the 256-bin likelihood).
            model_log_variance = torch.log(torch.cat([posterior_variance[1:2], betas[1:]]))
        elif variance == "fixed_small":
            model_log_variance = posterior_log_variance
        else:
            raise ValueError(f"unknown variance {variance!r}; expected 'fixed_large' or "
                             f"'fixed_small'")

        buffers = {
            "betas": betas,
            "alpha_bar": alpha_bar,
            "alpha_bar_prev": alpha_bar_prev,
            "sqrt_alpha_bar": alpha_bar.sqrt(),
            "sqrt_one_minus_alpha_bar": (1 - alpha_bar).sqrt(),
            "sqrt_recip_alpha_bar": alpha_bar.rsqrt(),
            "sqrt_recipm1_alpha_bar": (1 / alpha_bar - 1).sqrt(),
            "posterior_variance": posterior_variance,
            "posterior_log_variance_clipped": posterior_log_variance,
            "posterior_mean_coef1": betas * alpha_bar_prev.sqrt() / (1 - alpha_bar),
            "posterior_mean_coef2": (1 - alpha_bar_prev) * alphas.sqrt() / (1 - alpha_bar),
            "model_log_variance": model_log_variance,
        }
        device = torch.get_default_device()  # the meta device too, for a model built only for its shapes
        for name, value in buffers.items():
            self.register_buffer(name, value.to(device=device, dtype=torch.float32), persistent=False)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t ~ q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I) (Ho et al. eq. 4)."""
        return (_per_sample(self.sqrt_alpha_bar, t) * x0
                + _per_sample(self.sqrt_one_minus_alpha_bar, t) * noise)

    def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and clipped log variance of q(x_{t-1} | x_t, x_0) (Ho et al. eq. 6-7)."""
        mean = (_per_sample(self.posterior_mean_coef1, t) * x0
                + _per_sample(self.posterior_mean_coef2, t) * x_t)
        return mean, _per_sample(self.posterior_log_variance_clipped, t)

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t), eq. 4 solved for x_0."""
        return (_per_sample(self.sqrt_recip_alpha_bar, t) * x_t
                - _per_sample(self.sqrt_recipm1_alpha_bar, t) * eps)

    def predict_eps(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """The eps that eq. 4 pairs with (x_t, x_0)."""
        return ((_per_sample(self.sqrt_recip_alpha_bar, t) * x_t - x0)
                / _per_sample(self.sqrt_recipm1_alpha_bar, t))

    def p_mean_log_variance(self, eps: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                            clip_denoised: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, log variance of p_theta(x_{t-1} | x_t), and the predicted x_0.

        The mean is the posterior mean at the predicted x_0; without clipping this is exactly
        Ho et al. eq. 11, mu = (x_t - beta_t / sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_t).
        """
        x0 = self.predict_x0(x_t, t, eps)
        if clip_denoised:
            x0 = x0.clamp(-1.0, 1.0)
        mean, _ = self.q_posterior(x0, x_t, t)
        return mean, _per_sample(self.model_log_variance, t), x0


# --------------------------------------------------------------------------------------------
# Training loss


# The objectives (eps, v, flow matching) are in objectives.py.


def classifier_free_guidance(network: objectives.Network, x: torch.Tensor, time: torch.Tensor,
                             labels: torch.Tensor, null_label: int | None, scale: float
                             ) -> torch.Tensor:
    """f_u + scale (f_c - f_u) with f_c = f(x, t, labels) and f_u = f(x, t, null) (Ho & Salimans
    2022, eq. 6 with scale = 1 + w): both halves in one batched network pass. Scale 1 is the
    conditional network alone (one pass of half the size). The outputs are combined in the
    network's own parametrisation; eps, v and the velocity are linear in it given x_t, so this
    is guidance of each of them."""
    if scale == 1.0:
        return network(x, time, labels)
    if null_label is None:
        raise UserError(f"guidance {scale} needs the null class that model.label_dropout > 0 trains")
    both = network(torch.cat([x, x]), torch.cat([time, time]),
                   torch.cat([labels, torch.full_like(labels, null_label)]))
    conditional, unconditional = both.float().chunk(2)
    return unconditional + scale * (conditional - unconditional)


# --------------------------------------------------------------------------------------------
# Samplers: one signature, (eps_fn, schedule, x_T, generator, *, steps, eta, clip_denoised)
# -> x_0 in [-1, 1]. Noise comes from the CPU generator and is then moved to x_T's device.


def _noise_like(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    noise = torch.randn(x.shape, generator=generator, dtype=torch.float32)
    if x.device.type != "cuda":
        return noise.to(x.device)
    # From pinned memory the copy is asynchronous: the host draws the next step's noise while the
    # GPU still runs this step, instead of waiting for the GPU at every step of the chain.
    return noise.pin_memory().to(x.device, non_blocking=True)


def ddpm_sample(eps_fn: EpsFn, schedule: NoiseSchedule, x_T: torch.Tensor,
                generator: torch.Generator, *, steps: int | None = None, eta: float | None = None,
                clip_denoised: bool = True) -> torch.Tensor:
    """Ancestral sampling (Ho et al. 2020, algorithm 2) through all T steps with the schedule's
    fixed variance: x_{t-1} = mu_theta(x_t, t) + sigma_t z, and no noise at the last step.
    `eta` is unused (the variance is the schedule's); `steps` must be None or T."""
    if steps is not None and steps != schedule.timesteps:
        raise UserError(f"the ddpm sampler takes all {schedule.timesteps} steps; got steps={steps} "
                        f"(use the ddim sampler for fewer)")
    x = x_T
    for step in reversed(range(schedule.timesteps)):
        t = torch.full((x.shape[0],), step, device=x.device, dtype=torch.long)
        mean, log_variance, _ = schedule.p_mean_log_variance(eps_fn(x, t).float(), x, t,
                                                             clip_denoised)
        x = (mean + (0.5 * log_variance).exp() * _noise_like(x, generator)) if step > 0 else mean
    return x


def ddim_timesteps(timesteps: int, steps: int) -> list[int]:
    """`steps` evenly spaced timesteps from 0 to T-1, both included (integer rounding)."""
    if not 1 <= steps <= timesteps:
        raise UserError(f"DDIM steps must be between 1 and timesteps ({timesteps}); got {steps}")
    if steps == 1:
        return [timesteps - 1]
    return [(2 * i * (timesteps - 1) + steps - 1) // (2 * (steps - 1)) for i in range(steps)]


def ddim_sample(eps_fn: EpsFn, schedule: NoiseSchedule, x_T: torch.Tensor,
                generator: torch.Generator, *, steps: int | None = None, eta: float | None = 0.0,
                clip_denoised: bool = True) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12) on a subsequence tau of `steps` timesteps:

        x_prev = sqrt(a_prev) x0_hat + sqrt(1 - a_prev - sigma^2) eps + sigma z,
        sigma  = eta sqrt((1 - a_prev) / (1 - a_t)) sqrt(1 - a_t / a_prev)      (eq. 16)

    with a = alpha_bar. When x0_hat is clipped, eps is recomputed from the clipped x0_hat so the
    step stays on the line eq. 4 draws through (x0_hat, eps).
    """
    eta = 0.0 if eta is None else eta
    taus = ddim_timesteps(schedule.timesteps, schedule.timesteps if steps is None else steps)
    x = x_T
    for i in reversed(range(len(taus))):
        t = torch.full((x.shape[0],), taus[i], device=x.device, dtype=torch.long)
        eps = eps_fn(x, t).float()
        x0 = schedule.predict_x0(x, t, eps)
        if clip_denoised:
            x0 = x0.clamp(-1.0, 1.0)
            eps = schedule.predict_eps(x, t, x0)
        if i == 0:
            return x0
        alpha_bar = schedule.alpha_bar[taus[i]]
        alpha_bar_prev = schedule.alpha_bar[taus[i - 1]]
        sigma = eta * ((1 - alpha_bar_prev) / (1 - alpha_bar)
                       * (1 - alpha_bar / alpha_bar_prev)).sqrt()
        direction = (1 - alpha_bar_prev - sigma.square()).clamp(min=0).sqrt()
        x = alpha_bar_prev.sqrt() * x0 + direction * eps
        if eta > 0:
            x = x + sigma * _noise_like(x, generator)
    return x


SAMPLERS = {"ddpm": ddpm_sample, "ddim": ddim_sample}


# --------------------------------------------------------------------------------------------
# Variational bound


def normal_kl(mean1: torch.Tensor, log_var1: torch.Tensor, mean2: torch.Tensor,
              log_var2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, exp(log_var1)) || N(mean2, exp(log_var2))), elementwise, in nats."""
    return 0.5 * (log_var2 - log_var1 + torch.exp(log_var1 - log_var2)
                  + (mean1 - mean2).square() * torch.exp(-log_var2) - 1.0)


def _log_ndtr_difference(upper: torch.Tensor, lower: torch.Tensor) -> torch.Tensor:
    """log(Phi(upper) - Phi(lower)) for upper > lower, accurate in both tails.

    In the right tail Phi(u) - Phi(l) = Phi(-l) - Phi(-u), so flip there and always subtract in
    the left tail, where log_ndtr keeps its precision; then log(e^a - e^b) = a + log(-expm1(b - a)).
    """
    flip = (upper + lower) > 0
    a = torch.special.log_ndtr(torch.where(flip, -lower, upper))
    b = torch.special.log_ndtr(torch.where(flip, -upper, lower))
    return a + torch.log(-torch.expm1(b - a))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor,
                                        log_variance: torch.Tensor, bins: int = 256
                                        ) -> torch.Tensor:
    """log p(x) elementwise for x on the grid of `bins` levels in [-1, 1] (Ho et al. eq. 13).

    p(x) = Phi((x + 1/(bins-1) - mu) / sigma) - Phi((x - 1/(bins-1) - mu) / sigma), with the
    lowest bin's lower edge at -inf and the highest bin's upper edge at +inf so the bins sum to
    one. Evaluated in float64.
    """
    x, mean = x.double(), mean.double()
    inv_std = torch.exp(-0.5 * log_variance.double())
    half_bin = 1.0 / (bins - 1)
    inf = torch.tensor(math.inf, dtype=torch.float64, device=x.device)
    upper = torch.where(x > 1 - half_bin, inf, (x + half_bin - mean) * inv_std)
    lower = torch.where(x < -1 + half_bin, -inf, (x - half_bin - mean) * inv_std)
    return _log_ndtr_difference(upper, lower)


BoundEstimator = Literal["exact", "mc-stratified", "mc-importance"]

EXACT_BOUND_MAX_EVALUATIONS = 20_000
"""``estimator="auto"`` takes the exact sum when images x T network evaluations are at most this
many (20 images at T = 1000), and the importance-sampled Monte-Carlo estimate otherwise."""


def prior_term(schedule: NoiseSchedule, x0: torch.Tensor) -> torch.Tensor:
    """L_T = KL(q(x_T | x_0) || N(0, I)) per image, in nats, float64 [B] (closed form)."""
    last = torch.full((x0.shape[0],), schedule.timesteps - 1, device=x0.device, dtype=torch.long)
    mean = _per_sample(schedule.sqrt_alpha_bar, last) * x0
    log_var = torch.log(1 - _per_sample(schedule.alpha_bar, last))
    return normal_kl(mean, log_var, torch.zeros_like(x0),
                     torch.zeros_like(log_var)).sum(dim=(1, 2, 3)).double()


def _bound_terms(eps_fn: EpsFn, schedule: NoiseSchedule, x0: torch.Tensor,
                 timesteps: torch.Tensor, generator: torch.Generator, *, timestep_batch: int,
                 clip_denoised: bool, progress: Callable[[float], None] | None = None
                 ) -> torch.Tensor:
    """The bound's term at timesteps [J, B] (CPU, int64) per image: nats, float64 [J, B].

    Column j holds one timestep per image. t = 0 gives the decoder's -log p_theta(x_0 | x_1)
    (Ho et al. eq. 13), t >= 1 the KL of q(x_{t-1} | x_t, x_0) from p_theta(x_{t-1} | x_t)
    (eq. 5); t = 0 must fill column 0 and nothing else, where the decoder is evaluated. x_t ~
    q(x_t | x_0) is drawn from `generator` one column at a time, so `timestep_batch` (columns per
    network call) changes nothing but speed and memory. `progress(fraction)` after each network
    call, with the fraction of the J columns it did.
    """
    columns, batch = timesteps.shape
    if not (timesteps[0] == 0).all() or (timesteps[1:] == 0).any():
        raise ValueError("_bound_terms: t = 0 must fill column 0 and appear nowhere else")
    timesteps = timesteps.to(x0.device)
    terms = []
    for start in range(0, columns, timestep_batch):
        chunk = range(start, min(start + timestep_batch, columns))
        noise = torch.cat([_noise_like(x0, generator) for _ in chunk])
        t = timesteps[chunk.start:chunk.stop].reshape(-1)
        x0_rep = x0.repeat(len(chunk), 1, 1, 1)
        x_t = schedule.q_sample(x0_rep, t, noise)
        mean, log_var, _ = schedule.p_mean_log_variance(eps_fn(x_t, t).float(), x_t, t,
                                                        clip_denoised)
        true_mean, true_log_var = schedule.q_posterior(x0_rep, x_t, t)
        chunk_terms = normal_kl(true_mean, true_log_var, mean, log_var).sum(dim=(1, 2, 3)).double()
        if chunk.start == 0:  # the first `batch` rows are t = 0: the decoder replaces the KL
            decoder_nll = -discretized_gaussian_log_likelihood(
                x0, mean[:batch], log_var[:batch]).sum(dim=(1, 2, 3))
            chunk_terms = torch.cat([decoder_nll, chunk_terms[batch:]])
        terms.append(chunk_terms.view(len(chunk), batch))
        if progress is not None:
            progress(len(chunk) / columns)
    return torch.cat(terms)


def variational_bound(eps_fn: EpsFn, schedule: NoiseSchedule, x0: torch.Tensor,
                      generator: torch.Generator, *, timestep_batch: int = 1,
                      clip_denoised: bool = True,
                      progress: Callable[[float], None] | None = None) -> torch.Tensor:
    """-log p(x0) <= L_vlb per image, in nats [B] (Ho et al. eq. 5; x0 on the 256-level grid).

    L_vlb = L_T + sum_{t=1}^{T-1} L_{t-1} + L_0 with
      L_T     = KL(q(x_T | x_0) || N(0, I)),
      L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t)), x_t ~ q(x_t | x_0),
      L_0     = -log p_theta(x_0 | x_1), the discretised Gaussian decoder (eq. 13).
    Every timestep is evaluated (B * T network evaluations); one x_t per timestep and image,
    drawn from `generator` in timestep order, so `timestep_batch` (timesteps per network call)
    changes nothing but speed and memory. `progress` as in `_bound_terms`.
    """
    x0 = x0.float()
    steps = schedule.timesteps
    timesteps = torch.arange(steps).view(steps, 1).expand(steps, x0.shape[0])
    terms = _bound_terms(eps_fn, schedule, x0, timesteps, generator,
                         timestep_batch=timestep_batch, clip_denoised=clip_denoised,
                         progress=progress)
    return prior_term(schedule, x0) + terms.sum(dim=0)


def sample_timesteps(timesteps: int, per_image: int, batch: int, generator: torch.Generator,
                     proposal: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Timesteps t in {1, ..., T-1} [K, B] and weights [K, B] (CPU; int64, float64) such that
    sum_k w_k f(t_k) is an unbiased estimate of sum_{t=1}^{T-1} f(t) for every f and image.

    Stratified in the proposal's quantiles: u_k = (k + U_k) / K, U_k ~ U[0, 1) (one uniform draw
    per stratum of width 1/K, independently per image), t_k = F^-1(u_k) with F the CDF of the
    proposal p over {1, ..., T-1}, and w_k = 1 / (K p(t_k)). Then sum_t f(t) = integral over
    [0, 1) of f(t(u)) / p(t(u)) du, and each stratum's term is an unbiased estimate of its part
    of that integral; any p > 0 everywhere keeps it unbiased, and p proportional to f >= 0 makes
    every draw exact. Without a proposal p is uniform: the strata are K intervals of width W = (T-1) / K
    timesteps (W need not be an integer) and every weight is W; with K = T-1 every stratum is one
    timestep and the estimate is the sum itself.
    """
    middle = timesteps - 1
    if not 1 <= per_image <= middle:
        raise ValueError(f"timesteps per image must be between 1 and T-1 = {middle}; "
                         f"got {per_image}")
    if proposal is None:
        probabilities = torch.full((middle,), 1.0 / middle, dtype=torch.float64)
        cdf = torch.arange(1, middle + 1, dtype=torch.float64) / middle  # exact strata edges
    else:
        probabilities = proposal.detach().to("cpu", torch.float64)
        if probabilities.shape != (middle,) or not bool((probabilities > 0).all()):
            raise ValueError(f"the proposal must be {middle} positive probabilities (one per "
                             f"t = 1..T-1); got shape {tuple(probabilities.shape)}")
        probabilities = probabilities / probabilities.sum()
        cdf = probabilities.cumsum(0)
    offsets = torch.rand((per_image, batch), generator=generator, dtype=torch.float64)
    quantiles = (torch.arange(per_image, dtype=torch.float64).view(-1, 1) + offsets) / per_image
    index = torch.searchsorted(cdf, quantiles, right=True).clamp(max=middle - 1)
    return 1 + index, 1.0 / (per_image * probabilities[index])


class TimestepImportance:
    """A running estimate of E[L_t^2] per middle timestep t = 1..T-1 of the bound and the
    proposal p_t proportional to sqrt(E[L_t^2]) it gives: the variance-minimising proposal of
    importance sampling when L_t varies little across images, as improved-DDPM's importance
    sampling of the training loss (Nichol & Dhariwal 2021, sec. 3.3, eq. 18).

    A held-out pass observes the terms of each batch after using the proposal for it, so every
    batch's estimate is unbiased given the ones before. Unlike improved-DDPM (uniform until every
    t holds 10 losses), a pass draws far fewer than 10 (T-1) terms, so timesteps not yet drawn
    take the estimate interpolated linearly between the nearest drawn ones (constant beyond the
    ends): the terms change smoothly with t. Before the first observation the estimate is 1/t:
    the weight of the noise-prediction error in L_t (Ho et al. eq. 12) falls roughly as 1/t near
    t = 0 for the linear and cosine schedules, and there the terms are largest (uniform strata
    would miss L_1, a quarter of the tiny DDPM's bound, in most images). The proposal is mixed
    with the uniform distribution (`uniform_mix`), so every weight stays below
    (T-1) / (K uniform_mix) whatever the estimate.
    """

    def __init__(self, timesteps: int, uniform_mix: float = 0.1):
        if not 0 < uniform_mix <= 1:
            raise ValueError(f"uniform_mix must be in (0, 1]; got {uniform_mix}")
        self.uniform_mix = uniform_mix
        self.square_sums = torch.zeros(timesteps - 1, dtype=torch.float64)
        self.counts = torch.zeros(timesteps - 1, dtype=torch.float64)

    def observe(self, timesteps: torch.Tensor, terms: torch.Tensor) -> None:
        """Add the terms L_t [...] drawn at timesteps t [...] (t in 1..T-1)."""
        index = timesteps.reshape(-1).cpu() - 1
        self.square_sums.index_add_(0, index, terms.reshape(-1).detach().cpu().double().square())
        self.counts.index_add_(0, index, torch.ones(index.numel(), dtype=torch.float64))

    def proposal(self) -> torch.Tensor:
        """p_t for t = 1..T-1 (float64, sums to 1)."""
        seen = self.counts > 0
        steps = torch.arange(self.counts.numel(), dtype=torch.float64)
        where = seen.nonzero().view(-1).double()
        rms = (self.square_sums[seen] / self.counts[seen]).sqrt()
        right = torch.searchsorted(where, steps).clamp(1, max(len(where) - 1, 1))
        left = right - 1
        if len(where) == 0:
            estimate = 1 / (steps + 1)
        elif len(where) == 1:
            estimate = rms.expand_as(steps)
        else:
            span = where[right] - where[left]
            fraction = ((steps - where[left]) / span).clamp(0, 1)
            estimate = rms[left] + fraction * (rms[right] - rms[left])
        total = estimate.sum()
        uniform = torch.full_like(estimate, 1.0 / estimate.numel())
        if not bool(total > 0) or not bool(torch.isfinite(total)):
            return uniform
        return (1 - self.uniform_mix) * estimate / total + self.uniform_mix * uniform


def variational_bound_mc(eps_fn: EpsFn, schedule: NoiseSchedule, x0: torch.Tensor,
                         generator: torch.Generator, *, timesteps_per_image: int,
                         proposal: torch.Tensor | None = None, timestep_batch: int = 1,
                         clip_denoised: bool = True,
                         progress: Callable[[float], None] | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An unbiased Monte-Carlo estimate of `variational_bound` per image: (nats [B], and the
    drawn middle timesteps [K, B] and their terms L_t in nats [K, B], for `TimestepImportance`).

    L_vlb = L_T + L_0 + S with S = sum_{t=1}^{T-1} L_t, numbered as in Ho et al. eq. 5 (L_t is
    the term of the 0-indexed timestep t here, L_0 the decoder's). The prior term L_T is exact (closed form) and the decoder term L_0 is
    always evaluated (it is the largest term); S is estimated from K = `timesteps_per_image`
    timesteps per image, stratified and, with a `proposal`, importance-weighted
    (`sample_timesteps`): S_hat = sum_k w_k L_{t_k}. For each image E[S_hat] = E[S] over the
    draws of t and x_t, so the estimate is unbiased for the image's bound, from B * (K + 1)
    network evaluations instead of B * T. Its spread over images (which holds the Monte-Carlo
    noise) gives an honest standard error of a data set's mean (`pipeline.evaluate`).

    The strata come first from `generator`, then x_t column by column: column 0 the decoder's,
    then one column per stratum, so `timestep_batch` changes nothing but speed and memory.
    """
    x0 = x0.float()
    batch = x0.shape[0]
    middle, weights = sample_timesteps(schedule.timesteps, timesteps_per_image, batch, generator,
                                       proposal)
    timesteps = torch.cat([torch.zeros(1, batch, dtype=torch.long), middle])
    terms = _bound_terms(eps_fn, schedule, x0, timesteps, generator,
                         timestep_batch=timestep_batch, clip_denoised=clip_denoised,
                         progress=progress)
    estimate = prior_term(schedule, x0) + terms[0] + (weights.to(terms.device) * terms[1:]).sum(0)
    return estimate, middle, terms[1:]


# --------------------------------------------------------------------------------------------
# The model


class DiffusionModel(GenerativeModel):
    """A network (U-Net or DiT) trained with an objective (eps, v or flow matching), sampled by
    DDPM / DDIM or by an ODE solver, evaluated by its variational bound (eps, v) or its
    probability-flow likelihood (flow matching); class-conditional with ``model.num_classes``."""

    bits_per_dim_kind = "upper_bound"

    def __init__(self, config: DiffusionConfig, image_size: int, channels: int):
        super().__init__()
        self.config = config
        self.first_stage = None
        if config.autoencoder is not None:
            channels = self._attach_first_stage(config, image_size)
        channels = config.latent_channels or channels
        self.image_shape = (channels, image_size, image_size)
        if config.autoencoder is not None or config.latent_channels is not None:
            # 1/std of the data's latents (pipeline/latents.py): set from the latent shards'
            # manifest when training starts, then saved with the weights.
            self.register_buffer("latent_scale", torch.tensor(1.0))
        self.num_classes = config.num_classes
        # Classifier-free guidance's null class is one more row of the class embedding.
        self.null_label = (config.num_classes if config.num_classes is not None
                           and config.label_dropout > 0 else None)
        label_classes = None if config.num_classes is None else (
            config.num_classes + (self.null_label is not None))
        self.net = _network(config, image_size, channels, label_classes)
        self.schedule = NoiseSchedule(
            beta_schedule(config.schedule, config.timesteps, config.beta_start, config.beta_end),
            config.variance)
        self.objective = objectives.build(config.objective, self.schedule, config.time_sampling,
                                          config.logit_mean, config.logit_std)
        self.flow_matching = config.objective == "flow_matching"
        if self.flow_matching:
            self.bits_per_dim_kind = "estimate"
        # Fraction of training draws in each quarter of the noise range (T need not be a
        # multiple of 4). A buffer so the loss never copies from the host.
        self.register_buffer("quartile_fractions", self.objective.bucket_fractions.float(),
                             persistent=False)

    def _attach_first_stage(self, config: DiffusionConfig, image_size: int) -> int:
        """Load the frozen autoencoder of ``model.autoencoder``; its latent channels."""
        from pipeline.latents import load_autoencoder

        stage = load_autoencoder(config.autoencoder)
        latent_channels, side = stage.model.latent_shape[0], stage.model.latent_shape[1]
        if config.latent_channels is not None and config.latent_channels != latent_channels:
            raise UserError(f"model.latent_channels={config.latent_channels}, but the autoencoder "
                            f"{config.autoencoder} makes {latent_channels}-channel latents; drop "
                            "model.latent_channels")
        if side != image_size:
            raise UserError(f"data.image_size={image_size}, but the autoencoder {config.autoencoder} "
                            f"makes {side}×{side} latents; set data.image_size={side}")
        self.first_stage = stage.model
        self.first_stage_sha256 = stage.checkpoint_sha256
        self.first_stage_checkpoint = stage.checkpoint
        return latent_channels

    def fsdp_blocks(self) -> list[nn.Module]:
        return [block for block in super().fsdp_blocks() if self.first_stage is None
                or not any(block is module for module in self.first_stage.modules())]

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """uint8 images of scaled latents z (the diffusion model's scale), through the autoencoder."""
        return to_uint8(self.first_stage.decode(z / self.latent_scale).float())

    # -- the network, guided ------------------------------------------------------------------

    def network(self, x_t: torch.Tensor, time: torch.Tensor, labels: torch.Tensor | None = None
                ) -> torch.Tensor:
        """The network's prediction in float32 (it may run in bf16 under autocast)."""
        return (self.net(x_t, time) if labels is None else self.net(x_t, time, labels)).float()

    def eps(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None
            ) -> torch.Tensor:
        """The noise prediction at timesteps t (eps and v objectives), float32."""
        return self.objective.eps(self.network(x_t, t, labels), x_t, t)

    def _guided(self, labels: torch.Tensor | None, guidance: float = 1.0):
        """network(x, time) conditional on ``labels`` (tiled when x holds several copies of the
        images, as the bound's timestep batches do) and guided at ``guidance``."""
        if labels is None:
            return self.network

        def guided(x: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
            rows = labels.repeat(x.shape[0] // labels.shape[0])
            return classifier_free_guidance(self.network, x, time, rows, self.null_label, guidance)

        return guided

    def eps_fn(self, labels: torch.Tensor | None = None, guidance: float = 1.0) -> EpsFn:
        """eps(x_t, t) for the DDPM samplers and the bound: conditional on ``labels``, guided."""
        if self.flow_matching:
            raise UserError("a flow-matching model predicts velocities; it has no eps for the "
                            "DDPM chain")
        guided = self._guided(labels, guidance)
        return lambda x_t, t: self.objective.eps(guided(x_t, t), x_t, t)

    def velocity_fn(self, labels: torch.Tensor | None = None, guidance: float = 1.0
                    ) -> samplers.Velocity:
        """v(x, t) with t in [0, 1] for the ODE solvers (flow matching), conditional, guided."""
        guided = self._guided(labels, guidance)
        return lambda x, t: guided(x, objectives.FLOW_TIME_SCALE * t)

    # -- training -----------------------------------------------------------------------------

    def _inputs(self, x: torch.Tensor) -> torch.Tensor:
        """A uint8 batch on the model's scale, [-1, 1]; a float batch of latent shards' arrays
        (moments or draws, pipeline/latents.py) as z = μ + σ·ε times the latent scale."""
        if x.is_floating_point() and hasattr(self, "latent_scale"):
            from pipeline.latents import draw

            channels = self.image_shape[0]
            if x.shape[1] not in (channels, 2 * channels):
                raise UserError(f"the latent batches hold {x.shape[1]} channels; this model takes "
                                f"{channels}-channel latents (or their {2 * channels} moments)")
            return draw(x, channels) * self.latent_scale
        if x.shape[1] != self.image_shape[0]:
            raise UserError(f"model.latent_channels={self.config.latent_channels}: the network "
                            f"models {self.image_shape[0]}-channel latents, and the batches hold "
                            f"{x.shape[1]}-channel images; training on latents needs the latent "
                            f"data path: shards written by `data-prep latents` (docs/latent.md)")
        return to_unit_interval(x)

    def loss(self, x: torch.Tensor, labels: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The objective's MSE on a uint8 batch, with the MSE overall and per quarter of the noise
        range (timestep quartile 4t // T, or 4t for flow matching's t in [0, 1]).

        ``mse_q{i}`` divides the quarter's summed MSE by its *expected* count B * p_i (p_i the
        probability that a draw falls in it) rather than by how many of this batch's draws fell
        in it: an unbiased estimate of E[mse | quarter] that is never NaN for an empty quarter,
        so the trainer can average it over steps and ranks like any other metric (one step's
        value is noisy). mse = sum_i p_i * mse_q{i} in expectation (exactly for eps and v).

        A conditional model replaces each label by the null class with probability
        ``model.label_dropout`` in training mode.
        """
        labels = self.check_labels(labels, x.shape[0])
        if self.num_classes is not None:
            if labels is None:
                labels = self.default_labels(x.shape[0], x.device)
            if self.training and self.null_label is not None:
                dropped = torch.rand(labels.shape, device=labels.device) < self.config.label_dropout
                labels = torch.where(dropped, torch.full_like(labels, self.null_label), labels)
        mse, quartile = self.objective(self.network, self._inputs(x), labels)
        loss = mse.mean()
        with torch.no_grad():
            members = (quartile[:, None] == torch.arange(4, device=quartile.device)).float()  # [B, 4]
            expected = self.quartile_fractions * quartile.shape[0]
            per_quartile = (members * mse.detach()[:, None]).sum(0) / expected
        metrics = {"mse": loss.detach()}
        metrics.update({f"mse_q{i}": per_quartile[i] for i in range(4)})
        return loss, metrics

    # -- sampling -----------------------------------------------------------------------------

    @staticmethod
    def check_sample_options(config: DiffusionConfig, options: dict) -> None:
        """ValueError for options that do not apply to this model (at config load)."""
        if options.get("sampler") is not None:
            check_sampler(config.objective, options["sampler"])
        check_guidance(config, options.get("guidance"))

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator, labels: torch.Tensor | None = None,
               sampler: Literal["ddpm", "ddim", "euler", "heun"] | None = None,
               steps: int | None = None, eta: float | None = None, guidance: float | None = None,
               batch_size: int | None = None) -> torch.Tensor:
        """n uint8 images; config defaults (sampler, sample_steps, ddim_eta) unless overridden.

        ``labels`` [n]: the class of each image (a conditional model; default the classes in
        turn). ``guidance``: the classifier-free guidance scale (default 1, the conditional
        model; 0 the unconditional one). x_T of each batch, then the sampler's noise, come from
        `generator` in order. The training flag is left as found: the caller chooses eval mode.
        """
        sampler = sampler or self.config.resolved_sampler()
        guidance = 1.0 if guidance is None else float(guidance)
        try:
            check_sampler(self.config.objective, sampler)
            check_guidance(self.config, guidance)
        except ValueError as error:
            raise UserError(str(error)) from None
        if sampler == "ddim" or sampler in ODE_SAMPLERS:
            steps = self.config.sample_steps if steps is None else steps
        if eta is None:
            eta = self.config.ddim_eta
        labels = self.check_labels(labels, n)
        if self.num_classes is not None and labels is None:
            labels = self.default_labels(n)
        device = self.schedule.betas.device
        batch_size = batch_size or n
        images = []
        for start in range(0, n, batch_size):
            shape = (min(batch_size, n - start), *self.image_shape)
            x_T = torch.randn(shape, generator=generator, dtype=torch.float32).to(device)
            rows = None if labels is None else labels[start:start + shape[0]].to(device)
            if self.flow_matching:
                x0 = samplers.ODE_SAMPLERS[sampler](self.velocity_fn(rows, guidance), x_T,
                                                    samplers.flow_times(steps), generator)
            else:
                x0 = SAMPLERS[sampler](self.eps_fn(rows, guidance), self.schedule, x_T, generator,
                                       steps=steps, eta=eta, clip_denoised=self.config.clip_denoised)
            images.append(to_uint8(x0) if self.first_stage is None else self.decode_latents(x0))
        return torch.cat(images)

    # -- likelihood ---------------------------------------------------------------------------

    def bound_options(self, images: int | None, *, estimator: str | None = None,
                      timesteps_per_image: int | None = None, ode_steps: int | None = None,
                      solver: str | None = None) -> dict:
        """The estimator of the bound for a pass over `images` images (None: unknown), as
        bits_per_dim's options: {"estimator": "exact"} or {"estimator": "mc-...",
        "timesteps_per_image": K}. Unset options come from the config (vlb_estimator,
        vlb_timesteps_per_image); "auto" becomes "exact" when images * T is at most
        EXACT_BOUND_MAX_EVALUATIONS and no timesteps_per_image was asked for, else
        "mc-importance". K is capped at T - 1.

        A flow-matching model has no DDPM chain and so no such bound: its options are
        {"estimator": "probability-flow-ode", "ode_steps": N, "solver": "heun" | "euler"}
        (`flow_bits_per_dim`; defaults model.likelihood_steps and model.likelihood_solver)."""
        if self.flow_matching:
            return self._ode_options(estimator, timesteps_per_image, ode_steps, solver)
        if ode_steps is not None or solver is not None:
            raise UserError(f"ode_steps and solver apply to the probability-flow likelihood of a "
                            f"flow-matching model; this model's objective is {self.config.objective}")
        steps = self.schedule.timesteps
        chosen = estimator or self.config.vlb_estimator
        if chosen not in ("auto", *BoundEstimator.__args__):
            raise UserError(f"unknown bound estimator {chosen!r}; expected 'auto' or one of "
                            f"{list(BoundEstimator.__args__)}")
        if timesteps_per_image is not None and timesteps_per_image < 1:
            raise UserError(f"timesteps_per_image must be at least 1 (got {timesteps_per_image})")
        if timesteps_per_image is not None and chosen == "exact":
            raise UserError(f"timesteps_per_image={timesteps_per_image} applies to a Monte-Carlo "
                            f"estimate, not to the exact sum over all {steps} timesteps; drop one "
                            f"of the two")
        if chosen == "auto":
            small = images is not None and images * steps <= EXACT_BOUND_MAX_EVALUATIONS
            chosen = "exact" if small and timesteps_per_image is None else "mc-importance"
        if chosen == "exact":
            return {"estimator": "exact"}
        per_image = min(timesteps_per_image or self.config.vlb_timesteps_per_image, steps - 1)
        return {"estimator": chosen, "timesteps_per_image": per_image}

    def _ode_options(self, estimator, timesteps_per_image, ode_steps, solver) -> dict:
        if estimator not in (None, "auto", ODE_ESTIMATOR) or timesteps_per_image is not None:
            asked = f"estimator {estimator!r}" if timesteps_per_image is None else "timesteps_per_image"
            raise UserError(f"{asked} applies to the variational bound of the eps and v "
                            f"objectives; a flow-matching model's bits/dim is the probability-flow "
                            f"ODE estimate (model.likelihood_steps, model.likelihood_solver)")
        if ode_steps is not None and ode_steps < 1:
            raise UserError(f"ode_steps must be at least 1 (got {ode_steps})")
        solver = solver or self.config.likelihood_solver
        if solver not in samplers.ODE_SAMPLERS:
            raise UserError(f"unknown ODE solver {solver!r}; expected one of {sorted(samplers.ODE_SAMPLERS)}")
        return {"estimator": ODE_ESTIMATOR, "ode_steps": ode_steps or self.config.likelihood_steps,
                "solver": solver}

    def held_out_estimator(self, images: int | None, **options) -> HeldOutEstimator:
        """The bound for a pass over `images` images, with `bound_options` chosen once for the
        pass and, for "mc-importance", one `TimestepImportance` learnt over its batches."""
        return _BoundPass(self, self.bound_options(images, **options))

    @torch.no_grad()
    def bits_per_dim(self, x: torch.Tensor, generator: torch.Generator | None = None,
                     timestep_batch: int | None = None, estimator: str | None = None,
                     timesteps_per_image: int | None = None,
                     importance: TimestepImportance | None = None,
                     progress: Callable[[float], None] | None = None,
                     labels: torch.Tensor | None = None, ode_steps: int | None = None,
                     solver: str | None = None) -> torch.Tensor:
        """Upper bound on bits per dimension per image [B] from the variational bound: the exact
        sum over all T timesteps (`variational_bound`) or an unbiased Monte-Carlo estimate of it
        per image (`variational_bound_mc`), as `bound_options` chooses for this batch alone.
        "mc-importance" takes its proposal from `importance` and adds this batch's terms to it
        (without one, from a fresh `TimestepImportance`: the 1/t proposal). Noise from `generator` (CPU), else
        from one seeded off torch's global RNG. `progress(fraction)` after each network call.
        A conditional model's bound is conditional on the true ``labels`` (required).
        Flow matching: the probability-flow ODE estimate instead (`flow_bits_per_dim`)."""
        labels = self.check_labels(labels, x.shape[0], required=True)
        options = self.bound_options(x.shape[0], estimator=estimator,
                                     timesteps_per_image=timesteps_per_image,
                                     ode_steps=ode_steps, solver=solver)
        if generator is None:
            seed = int(torch.randint(0, 2**62, ()).item())  # CPU global RNG: no device sync
            generator = torch.Generator().manual_seed(seed)
        if self.flow_matching:
            return flow_bits_per_dim(self.velocity_fn(labels), self._inputs(x), generator,
                                     steps=options["ode_steps"], solver=options["solver"],
                                     progress=progress)
        common = dict(timestep_batch=timestep_batch or self.config.vlb_timestep_batch,
                      clip_denoised=self.config.clip_denoised, progress=progress)
        x0 = self._inputs(x)
        eps_fn = self.eps_fn(labels)
        if options["estimator"] == "exact":
            nats = variational_bound(eps_fn, self.schedule, x0, generator, **common)
        else:
            if options["estimator"] == "mc-importance" and importance is None:
                importance = TimestepImportance(self.schedule.timesteps)
            learn = options["estimator"] == "mc-importance"
            nats, timesteps, terms = variational_bound_mc(
                eps_fn, self.schedule, x0, generator,
                timesteps_per_image=options["timesteps_per_image"],
                proposal=importance.proposal() if learn else None, **common)
            if learn:
                importance.observe(timesteps, terms)
        return (nats / (math.prod(x.shape[1:]) * math.log(2))).float()


class _BoundPass(HeldOutEstimator):
    """DiffusionModel.held_out_estimator: fixed options and, for "mc-importance", the proposal
    learnt from the batches before."""

    def __init__(self, model: DiffusionModel, options: dict):
        super().__init__(model, options)
        self.importance = (TimestepImportance(model.schedule.timesteps)
                           if options["estimator"] == "mc-importance" else None)

    def __call__(self, x: torch.Tensor, progress: Callable[[float], None] | None = None,
                 labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.model.bits_per_dim(x, importance=self.importance, progress=progress,
                                       labels=labels, **self.options)


# --------------------------------------------------------------------------------------------
# Flow matching's likelihood and the networks


ODE_ESTIMATOR = "probability-flow-ode"


def flow_bits_per_dim(velocity: samplers.Velocity, x0: torch.Tensor, generator: torch.Generator,
                      *, steps: int, solver: str = "heun",
                      progress: Callable[[float], None] | None = None) -> torch.Tensor:
    """Bits/dim [B] of images on the 256-level grid of [-1, 1] (x0 = 2k / 255 - 1) under a
    flow-matching model, from its probability-flow ODE (`samplers.ode_log_likelihood`).

    Dequantised as flows are (Theis et al. 2016, sec. 3.1): y = x0 + (u - 1/2) 2/255 with
    u ~ U[0, 1)^D from ``generator`` fills the pixel's bin of width 2/255 around the level the
    model was trained on, and -log2 P(k) <= E_u[-log p(y)] - D log(2/255), in bits per dimension.
    Reported as an estimate, not a bound: one draw of u and of the Hutchinson probe per image
    (both unbiased), and an ODE solved in ``steps`` steps, whose error has no sign."""
    dims = math.prod(x0.shape[1:])
    u = torch.rand(x0.shape, generator=generator, dtype=torch.float32).to(x0.device)
    y = x0.float() + (u - 0.5) * (2.0 / 255.0)
    log_density = samplers.ode_log_likelihood(velocity, y, generator, steps=steps, solver=solver,
                                              progress=progress)
    nats = -(log_density + dims * math.log(2.0 / 255.0))
    return (nats / (dims * math.log(2))).float()


def _network(config: DiffusionConfig, image_size: int, channels: int, label_classes: int | None
             ) -> nn.Module:
    """The network of ``model.network``, sized for the image and the classes (or a UserError
    naming the field that does not fit)."""
    if config.network == "dit":
        depth, width, heads = config.dit_shape()
        if image_size % config.patch_size:
            raise UserError(f"model.patch_size: {config.patch_size} does not divide the "
                            f"{image_size}px image into patches")
        return DiT(channels, channels, image_size, config.patch_size, depth, width, heads,
                   label_classes)
    num_levels = len(config.channel_mult)
    if image_size % 2 ** (num_levels - 1):
        raise UserError(f"model.channel_mult: {num_levels} levels halve the resolution "
                        f"{num_levels - 1} times, which a {image_size}px image does not allow")
    resolutions = [image_size // 2 ** i for i in range(num_levels)]
    unreachable = sorted(set(config.attention_resolutions) - set(resolutions))
    if unreachable:
        raise UserError(f"model.attention_resolutions: {unreachable} never occur; with "
                        f"image_size {image_size} and {num_levels} levels the resolutions are "
                        f"{resolutions}")
    try:
        return UNet(
            in_channels=channels, out_channels=channels, base_channels=config.base_channels,
            channel_mult=config.channel_mult, num_res_blocks=config.num_res_blocks,
            attention_resolutions=config.attention_resolutions, dropout=config.dropout,
            image_size=image_size, num_heads=config.num_heads,
            head_channels=config.head_channels, norm_groups=config.norm_groups,
            label_classes=label_classes)
    except ValueError as error:  # heads that don't divide a level's channels
        raise UserError(f"model: {error}") from None
