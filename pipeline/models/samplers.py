"""ODE samplers and the ODE likelihood of continuous-time flows (flow matching / rectified flow).

A flow-matching model is a velocity field v(x, t): integrating dx/dt = v from t = 1 (noise,
x_1 ~ N(0, I)) to t = 0 gives a sample (Lipman et al. 2023, sec. 3; Liu et al. 2023, eq. 1).
The samplers share one signature, k-diffusion's ``(model, x, sigmas, ...)`` with times in place of
noise levels: ``sampler(velocity, x, times, generator=None) -> x at times[-1]``, where
``velocity(x [N, ...], t [N]) -> dx/dt`` and ``times`` runs from the start time to the end time
(`flow_times`). They are deterministic; ``generator`` is accepted for the shared signature.

- `euler_sample`: x_{i+1} = x_i + (t_{i+1} - t_i) v(x_i, t_i), one evaluation per step.
- `heun_sample`: Heun's second-order method (the trapezoidal predictor-corrector of Karras et al.
  2022, algorithm 1), two evaluations per step. The velocity is finite at t = 0, so the last step
  is corrected too (EDM skips it only because its denoiser is undefined at sigma = 0).

`ode_log_likelihood` is the instantaneous change of variables of a continuous normalising flow
(Chen et al. 2018, theorem 1): along dx/dt = v, d log p_t(x_t) / dt = -div v(x_t, t), so
    log p_0(x_0) = log N(x_1; 0, I) + integral_0^1 div v(x_t, t) dt,
integrating from the data at t = 0 to t = 1, with the divergence estimated by Hutchinson's
trace estimator eps^T (dv/dx) eps, eps a Rademacher vector per image held for the whole
trajectory (Grathwohl et al. 2019, FFJORD, sec. 3.1): one vector-Jacobian product per evaluation.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""velocity(x [N, C, H, W] float32, t [N] float32 in [0, 1]) -> dx/dt, float32, the shape of x."""


def flow_times(steps: int, start: float = 1.0, end: float = 0.0) -> torch.Tensor:
    """``steps + 1`` evenly spaced times from ``start`` to ``end`` (float64, CPU)."""
    if steps < 1:
        raise ValueError(f"an ODE solve needs at least one step; got steps={steps}")
    return torch.linspace(start, end, steps + 1, dtype=torch.float64)


def _at(t: float, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), t, device=x.device, dtype=torch.float32)


def euler_sample(velocity: Velocity, x: torch.Tensor, times: torch.Tensor,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Euler's method along ``times`` (``len(times) - 1`` velocity evaluations)."""
    times = times.tolist()
    for t, t_next in zip(times[:-1], times[1:]):
        x = x + (t_next - t) * velocity(x, _at(t, x)).float()
    return x


def heun_sample(velocity: Velocity, x: torch.Tensor, times: torch.Tensor,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Heun's method along ``times`` (2 (``len(times) - 1``) velocity evaluations)."""
    times = times.tolist()
    for t, t_next in zip(times[:-1], times[1:]):
        step = t_next - t
        slope = velocity(x, _at(t, x)).float()
        predicted = x + step * slope
        x = x + 0.5 * step * (slope + velocity(predicted, _at(t_next, x)).float())
    return x


ODE_SAMPLERS = {"euler": euler_sample, "heun": heun_sample}


def rademacher(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """A tensor of independent +-1 entries (CPU, float32) drawn from ``generator``."""
    return torch.randint(0, 2, shape, generator=generator).float().mul_(2).sub_(1)


def velocity_and_divergence(velocity: Velocity, x: torch.Tensor, t: torch.Tensor,
                            probe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(v(x, t), Hutchinson's estimate probe^T (dv/dx) probe per image [N]); no graph kept."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        v = velocity(x, t).float()
        (vjp,) = torch.autograd.grad(v, x, probe)
    return v.detach(), (vjp * probe).flatten(1).sum(1).double()


def standard_normal_log_prob(x: torch.Tensor) -> torch.Tensor:
    """Sum over all but the batch dimension of log N(x; 0, 1), float64 [N]."""
    x = x.double()
    return (-0.5 * (x.square() + math.log(2 * math.pi))).flatten(1).sum(1)


def ode_log_likelihood(velocity: Velocity, x0: torch.Tensor, generator: torch.Generator, *,
                       steps: int, solver: str = "heun",
                       progress: Callable[[float], None] | None = None) -> torch.Tensor:
    """log p_0(x0) in nats per image, float64 [N] (module docstring), by Euler or Heun over
    ``steps`` even steps from t = 0 to 1, the divergence by Hutchinson's estimator with one
    Rademacher probe per image from ``generator``. An estimate: the trace estimate is unbiased,
    the ODE's discretisation error is not. ``progress(fraction)`` after each step."""
    if solver not in ODE_SAMPLERS:
        raise ValueError(f"unknown ODE solver {solver!r}; expected one of {sorted(ODE_SAMPLERS)}")
    probe = rademacher(tuple(x0.shape), generator).to(x0.device)
    x = x0.float()
    integral = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    times = flow_times(steps, start=0.0, end=1.0).tolist()
    for t, t_next in zip(times[:-1], times[1:]):
        step = t_next - t
        slope, divergence = velocity_and_divergence(velocity, x, _at(t, x), probe)
        if solver == "euler":
            x = x + step * slope
            integral = integral + step * divergence
        else:
            predicted = x + step * slope
            slope_next, divergence_next = velocity_and_divergence(velocity, predicted,
                                                                  _at(t_next, x), probe)
            x = x + 0.5 * step * (slope + slope_next)
            integral = integral + 0.5 * step * (divergence + divergence_next)
        if progress is not None:
            progress(1.0 / steps)
    return standard_normal_log_prob(x) + integral
