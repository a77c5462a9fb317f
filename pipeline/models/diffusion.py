"""Gaussian diffusion: noise schedules, q_sample, posterior, loss, samplers, variational bound.

The mathematics of DDPM (Ho et al. 2020, "Denoising Diffusion Probabilistic Models"), the cosine
schedule of Nichol & Dhariwal 2021 ("Improved DDPM") and DDIM (Song et al. 2021, "Denoising
Diffusion Implicit Models"). The network is only a function eps(x_t, t) (`unet.UNet`); it can be
swapped without touching anything here.

Timesteps are 0-indexed: t in {0, ..., T-1} here is the paper's t in {1, ..., T}. "alpha_bar[-1]"
(the paper's alpha_bar_0) is 1.
"""

from __future__ import annotations

import math
from typing import Callable, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from pipeline.configbase import StrictModel
from pipeline.errors import UserError
from pipeline.models.base import GenerativeModel, HeldOutEstimator, to_uint8, to_unit_interval
from pipeline.models.unet import UNet

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""eps_theta(x_t [N, C, H, W] float32, t [N] int64) -> predicted noise, float32, same shape."""


# --------------------------------------------------------------------------------------------
# Config


class DiffusionConfig(StrictModel):
    """The `model:` section of a diffusion run. Defaults: DDPM's CIFAR-10 model (35.7M params)."""

    family: Literal["diffusion"] = "diffusion"

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
    sampler: Literal["ddpm", "ddim"] = "ddpm"
    """Sampler `sample()` uses unless told otherwise: "ddpm" ancestral (T network calls) or
    "ddim" (sample_steps network calls)."""
    sample_steps: int = Field(50, ge=1)
    """Network evaluations of the DDIM sampler (at most timesteps). DDPM always takes T."""
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
    def _check(self) -> "DiffusionConfig":
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
        if self.sample_steps > self.timesteps:
            raise ValueError(f"sample_steps ({self.sample_steps}) cannot exceed timesteps "
                             f"({self.timesteps})")
        return self


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
        return torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)
    if name == "cosine":
        steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
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
        for name, value in buffers.items():
            self.register_buffer(name, value.to(torch.float32), persistent=False)

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


def epsilon_loss(eps_fn: EpsFn, schedule: NoiseSchedule, x0: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image ||eps - eps_theta(x_t, t)||^2 / D at uniform t (Ho et al. eq. 14, L_simple),
    and the timesteps drawn. Float32 whatever the autocast state of the network."""
    t = torch.randint(0, schedule.timesteps, (x0.shape[0],), device=x0.device)
    noise = torch.randn_like(x0, dtype=torch.float32)
    x_t = schedule.q_sample(x0.float(), t, noise)
    eps = eps_fn(x_t, t).float()
    return (noise - eps).square().mean(dim=(1, 2, 3)), t


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
    """DDPM: a U-Net eps_theta trained with L_simple, sampled by DDPM or DDIM, evaluated by
    its variational bound."""

    bits_per_dim_kind = "upper_bound"

    def __init__(self, config: DiffusionConfig, image_size: int, channels: int):
        super().__init__()
        self.config = config
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
        self.image_shape = (channels, image_size, image_size)
        try:
            self.net = UNet(
                in_channels=channels, out_channels=channels, base_channels=config.base_channels,
                channel_mult=config.channel_mult, num_res_blocks=config.num_res_blocks,
                attention_resolutions=config.attention_resolutions, dropout=config.dropout,
                image_size=image_size, num_heads=config.num_heads,
                head_channels=config.head_channels, norm_groups=config.norm_groups)
        except ValueError as error:  # heads that don't divide a level's channels
            raise UserError(f"model: {error}") from None
        self.schedule = NoiseSchedule(
            beta_schedule(config.schedule, config.timesteps, config.beta_start, config.beta_end),
            config.variance)
        # Fraction of the T timesteps in each quartile (T need not be a multiple of 4).
        # A buffer so the loss never copies from the host.
        fractions = [sum(1 for t in range(config.timesteps) if 4 * t // config.timesteps == i)
                     / config.timesteps for i in range(4)]
        self.register_buffer("quartile_fractions", torch.tensor(fractions), persistent=False)

    def eps(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The network's noise prediction in float32 (it may run in bf16 under autocast)."""
        return self.net(x_t, t).float()

    def loss(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """L_simple on a uint8 batch, with the MSE overall and per timestep quartile.

        ``mse_q{i}`` (quartile i: 4t // T == i) divides the quartile's summed MSE by its
        *expected* count B * |q_i| / T rather than by how many of this batch's timesteps fell in
        it: an unbiased estimate of E[mse | quartile] that is never NaN for an empty quartile,
        so the trainer can average it over steps and ranks like any other metric (one step's
        value is noisy). mse = sum_i |q_i| / T * mse_q{i} exactly.
        """
        mse, t = epsilon_loss(self.eps, self.schedule, to_unit_interval(x))
        loss = mse.mean()
        with torch.no_grad():
            quartile = (t * 4) // self.schedule.timesteps
            members = (quartile[:, None] == torch.arange(4, device=t.device)).float()  # [B, 4]
            expected = self.quartile_fractions * t.shape[0]
            per_quartile = (members * mse.detach()[:, None]).sum(0) / expected
        metrics = {"mse": loss.detach()}
        metrics.update({f"mse_q{i}": per_quartile[i] for i in range(4)})
        return loss, metrics

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator, sampler: Literal["ddpm", "ddim"] | None = None,
               steps: int | None = None, eta: float | None = None,
               batch_size: int | None = None) -> torch.Tensor:
        """n uint8 images; config defaults (sampler, sample_steps, ddim_eta) unless overridden.

        x_T of each batch, then the sampler's noise, come from `generator` in order. The
        training flag is left as found: the caller chooses eval mode.
        """
        sampler = sampler or self.config.sampler
        if sampler not in SAMPLERS:
            raise UserError(f"unknown sampler {sampler!r}; expected one of {sorted(SAMPLERS)}")
        if sampler == "ddim" and steps is None:
            steps = self.config.sample_steps
        if eta is None:
            eta = self.config.ddim_eta
        device = self.schedule.betas.device
        batch_size = batch_size or n
        images = []
        for start in range(0, n, batch_size):
            shape = (min(batch_size, n - start), *self.image_shape)
            x_T = torch.randn(shape, generator=generator, dtype=torch.float32).to(device)
            x0 = SAMPLERS[sampler](self.eps, self.schedule, x_T, generator, steps=steps, eta=eta,
                                   clip_denoised=self.config.clip_denoised)
            images.append(to_uint8(x0))
        return torch.cat(images)

    def bound_options(self, images: int | None, *, estimator: str | None = None,
                      timesteps_per_image: int | None = None) -> dict:
        """The estimator of the bound for a pass over `images` images (None: unknown), as
        bits_per_dim's options: {"estimator": "exact"} or {"estimator": "mc-...",
        "timesteps_per_image": K}. Unset options come from the config (vlb_estimator,
        vlb_timesteps_per_image); "auto" becomes "exact" when images * T is at most
        EXACT_BOUND_MAX_EVALUATIONS and no timesteps_per_image was asked for, else
        "mc-importance". K is capped at T - 1."""
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

    def held_out_estimator(self, images: int | None, **options) -> HeldOutEstimator:
        """The bound for a pass over `images` images, with `bound_options` chosen once for the
        pass and, for "mc-importance", one `TimestepImportance` learnt over its batches."""
        return _BoundPass(self, self.bound_options(images, **options))

    @torch.no_grad()
    def bits_per_dim(self, x: torch.Tensor, generator: torch.Generator | None = None,
                     timestep_batch: int | None = None, estimator: str | None = None,
                     timesteps_per_image: int | None = None,
                     importance: TimestepImportance | None = None,
                     progress: Callable[[float], None] | None = None) -> torch.Tensor:
        """Upper bound on bits per dimension per image [B] from the variational bound: the exact
        sum over all T timesteps (`variational_bound`) or an unbiased Monte-Carlo estimate of it
        per image (`variational_bound_mc`), as `bound_options` chooses for this batch alone.
        "mc-importance" takes its proposal from `importance` and adds this batch's terms to it
        (without one, from a fresh `TimestepImportance`: the 1/t proposal). Noise from
        `generator` (CPU), else from one seeded off torch's global RNG. `progress(fraction)` after
        each network call."""
        options = self.bound_options(x.shape[0], estimator=estimator,
                                     timesteps_per_image=timesteps_per_image)
        if generator is None:
            seed = int(torch.randint(0, 2**62, ()).item())  # CPU global RNG: no device sync
            generator = torch.Generator().manual_seed(seed)
        common = dict(timestep_batch=timestep_batch or self.config.vlb_timestep_batch,
                      clip_denoised=self.config.clip_denoised, progress=progress)
        x0 = to_unit_interval(x)
        if options["estimator"] == "exact":
            nats = variational_bound(self.eps, self.schedule, x0, generator, **common)
        else:
            if options["estimator"] == "mc-importance" and importance is None:
                importance = TimestepImportance(self.schedule.timesteps)
            learn = options["estimator"] == "mc-importance"
            nats, timesteps, terms = variational_bound_mc(
                self.eps, self.schedule, x0, generator,
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

    def __call__(self, x: torch.Tensor,
                 progress: Callable[[float], None] | None = None) -> torch.Tensor:
        return self.model.bits_per_dim(x, importance=self.importance, progress=progress,
                                       **self.options)
