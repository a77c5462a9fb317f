"""Training objectives of the diffusion family: what the network predicts and the loss teaching it.

Each objective is a small callable ``objective(network, x0, labels) -> (loss [B], bucket [B])``:
the per-image mean squared error of one noisy draw (float32 whatever the autocast state of the
network) and the quarter of the noise range each image's draw fell in, for the loss metrics
(``bucket_fractions`` says how often each quarter is drawn). The network is any function
``network(x_t, time, labels) -> output`` of the shape of x_t (`Network`); the U-Net and the DiT
are two. What the output means differs, and the objective says how to read it:

- `EpsilonPrediction` (DDPM, Ho et al. 2020 eq. 14, "L_simple"): the network predicts the noise
  eps of x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps at a discrete timestep t.
- `VPrediction` (Salimans & Ho 2022, "Progressive Distillation", sec. 4 and appendix D): the
  network predicts v = alpha_t eps - sigma_t x0 with alpha_t = sqrt(abar_t), sigma_t =
  sqrt(1 - abar_t), on the same forward process. Since alpha_t^2 + sigma_t^2 = 1,
  x0 = alpha_t x_t - sigma_t v and eps = sigma_t x_t + alpha_t v (`v_to_eps`, `v_to_x0`), so
  every DDPM sampler and the variational bound take a v-model's eps unchanged.
- `FlowMatching` (conditional flow matching with the optimal-transport path and sigma_min = 0,
  Lipman et al. 2023 eqs. 20-23, which is rectified flow, Liu et al. 2023 eq. 1): continuous
  t in [0, 1], x_t = (1 - t) x0 + t eps, and the network predicts the velocity
  dx_t/dt = eps - x0. Sampling integrates dx/dt = v(x, t) from t = 1 (noise) to t = 0
  (`pipeline.models.samplers`). t is drawn uniformly or from the logit-normal density of Esser
  et al. 2024 ("Scaling Rectified Flow Transformers", eq. 19): t = sigmoid(m + s n), n ~ N(0, 1).

Times reach the network on one scale: the discrete timestep 0..T-1 for the first two, and
``FLOW_TIME_SCALE * t`` for flow matching, so the sinusoidal embedding sees the same range.
All randomness (timesteps, noise) comes from torch's generator of x0's device, as training's does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch

Network = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
"""network(x_t [N, C, H, W] float32, time [N] on the network's scale, labels [N] int64 or None)
-> its prediction, float32, the shape of x_t."""

FLOW_TIME_SCALE = 1000.0
"""Flow matching's t in [0, 1] reaches the network as 1000 t: the range of DDPM's timesteps."""

ObjectiveName = Literal["eps", "v", "flow_matching"]
TimeSampling = Literal["uniform", "logit_normal"]


def _per_sample(values: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """values[t] shaped [N, 1, 1, 1] to broadcast over images (a gather: no host sync)."""
    return values[t].view(-1, 1, 1, 1)


def _mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (target - prediction.float()).square().mean(dim=(1, 2, 3))


def _discrete_bucket_fractions(timesteps: int) -> torch.Tensor:
    """Fraction of the T timesteps in each quarter 4t // T == i (T need not divide by 4)."""
    return torch.tensor([sum(1 for t in range(timesteps) if 4 * t // timesteps == i) / timesteps
                         for i in range(4)])


# --------------------------------------------------------------------------------------------
# Conversions on the DDPM forward process (alpha = sqrt(abar_t), sigma = sqrt(1 - abar_t))


def v_target(alpha: torch.Tensor, sigma: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor
             ) -> torch.Tensor:
    """v = alpha eps - sigma x0 (Salimans & Ho 2022, sec. 4)."""
    return alpha * eps - sigma * x0


def v_to_eps(alpha: torch.Tensor, sigma: torch.Tensor, x_t: torch.Tensor, v: torch.Tensor
             ) -> torch.Tensor:
    """eps = sigma x_t + alpha v, from x_t = alpha x0 + sigma eps and alpha^2 + sigma^2 = 1."""
    return sigma * x_t + alpha * v


def v_to_x0(alpha: torch.Tensor, sigma: torch.Tensor, x_t: torch.Tensor, v: torch.Tensor
            ) -> torch.Tensor:
    """x0 = alpha x_t - sigma v (Salimans & Ho 2022, appendix D)."""
    return alpha * x_t - sigma * v


# --------------------------------------------------------------------------------------------
# The objectives


class EpsilonPrediction:
    """||eps - eps_theta(x_t, t)||^2 / D at t uniform in {0..T-1} (Ho et al. 2020, eq. 14)."""

    name = "eps"
    discrete = True

    def __init__(self, schedule):
        self.schedule = schedule
        self.bucket_fractions = _discrete_bucket_fractions(schedule.timesteps)

    def __call__(self, network: Network, x0: torch.Tensor, labels: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        x0 = x0.float()
        t = torch.randint(0, self.schedule.timesteps, (x0.shape[0],), device=x0.device)
        noise = torch.randn_like(x0)
        x_t = self.schedule.q_sample(x0, t, noise)
        return _mse(network(x_t, t, labels), self.target(x0, noise, t)), 4 * t // self.schedule.timesteps

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return noise

    def eps(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The noise prediction the DDPM samplers and the bound use."""
        return output


class VPrediction(EpsilonPrediction):
    """||v - v_theta(x_t, t)||^2 / D, v = alpha_t eps - sigma_t x0 (Salimans & Ho 2022, sec. 4).

    For the same x_t, ||v - v_hat||^2 = ||eps - eps_hat||^2 / alpha_t^2: in eps terms the error
    is weighted by 1 / alpha_t^2 = 1 + 1 / SNR(t), more at the noisy end, where eps-prediction's
    x0 = (x_t - sigma_t eps) / alpha_t divides by alpha_t -> 0 and v-prediction's
    x0 = alpha_t x_t - sigma_t v divides by nothing."""

    name = "v"

    def _coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (_per_sample(self.schedule.sqrt_alpha_bar, t),
                _per_sample(self.schedule.sqrt_one_minus_alpha_bar, t))

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return v_target(*self._coefficients(t), x0, noise)

    def eps(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return v_to_eps(*self._coefficients(t), x_t, output.float())


class FlowMatching:
    """||(eps - x0) - v_theta(x_t, t)||^2 / D with x_t = (1 - t) x0 + t eps (Lipman et al. 2023,
    eq. 23 with sigma_min = 0; Liu et al. 2023, eq. 1), t from `time_sampling`."""

    name = "flow_matching"
    discrete = False

    def __init__(self, time_sampling: TimeSampling = "uniform", logit_mean: float = 0.0,
                 logit_std: float = 1.0):
        if time_sampling not in ("uniform", "logit_normal"):
            raise ValueError(f"unknown time sampling {time_sampling!r}; expected 'uniform' or "
                             f"'logit_normal'")
        self.time_sampling, self.logit_mean, self.logit_std = time_sampling, logit_mean, logit_std
        self.bucket_fractions = torch.tensor([self.time_probability(i / 4, (i + 1) / 4)
                                              for i in range(4)])

    def sample_time(self, batch: int, device: torch.device) -> torch.Tensor:
        """t [batch] in (0, 1): uniform, or sigmoid(m + s n) with n ~ N(0, 1) (Esser et al. eq. 19)."""
        if self.time_sampling == "uniform":
            return torch.rand(batch, device=device)
        return torch.sigmoid(self.logit_mean + self.logit_std * torch.randn(batch, device=device))

    def time_probability(self, low: float, high: float) -> float:
        """P(low <= t < high) under the time sampling."""
        if self.time_sampling == "uniform":
            return high - low

        def cdf(value: float) -> float:
            if value <= 0:
                return 0.0
            if value >= 1:
                return 1.0
            logit = math.log(value / (1 - value))
            return 0.5 * (1 + math.erf((logit - self.logit_mean) / (self.logit_std * math.sqrt(2))))

        return cdf(high) - cdf(low)

    def __call__(self, network: Network, x0: torch.Tensor, labels: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        x0 = x0.float()
        t = self.sample_time(x0.shape[0], x0.device)
        noise = torch.randn_like(x0)
        x_t = interpolate(x0, noise, t)
        prediction = network(x_t, FLOW_TIME_SCALE * t, labels)
        return _mse(prediction, noise - x0), (4 * t).long().clamp(max=3)


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t eps, t [N] broadcast over the images."""
    t = t.view(-1, 1, 1, 1).to(x0.dtype)
    return (1 - t) * x0 + t * noise


def build(name: ObjectiveName, schedule, time_sampling: TimeSampling = "uniform",
          logit_mean: float = 0.0, logit_std: float = 1.0):
    """The objective called ``name`` (``schedule``: the DDPM forward process of eps and v)."""
    if name == "eps":
        return EpsilonPrediction(schedule)
    if name == "v":
        return VPrediction(schedule)
    if name == "flow_matching":
        return FlowMatching(time_sampling, logit_mean, logit_std)
    raise ValueError(f"unknown objective {name!r}; expected 'eps', 'v' or 'flow_matching'")
