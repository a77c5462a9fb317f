"""Normalizing flows for 8-bit images: Glow (Kingma & Dhariwal 2018), RealNVP (Dinh et al. 2017).

The network is an invertible map f from the dequantised image to latents z; the objective is the
change-of-variables likelihood, log p(v) = log p(z) + log|det ∂f/∂v| (Dinh et al. 2017, eq. 3).
Every bijective layer has ``forward(x) -> (y, logdet [B])`` and ``inverse(y) -> x``; ``logdet``
is the per-image log|det| of the layer's Jacobian. The factor-out (`FactorOut`) is the one
non-layer: it passes half the channels through unchanged and returns their prior log-density.

Architecture (multi-scale, Dinh et al. 2017 sec. 3.6; Glow fig. 2): ``levels`` levels, each
    glow:    squeeze -> depth × [ActNorm -> invertible 1×1 conv -> affine coupling (channel split)]
    realnvp: depth × [ActNorm -> checkerboard coupling] -> squeeze -> depth × [ActNorm -> channel
             coupling], the masks alternating parity / half from one coupling to the next
and, after every level but the last, a factor-out: half the channels leave the flow as latents
with their own prior (N(0, I), or a Gaussian whose mean and log-std are predicted from the kept
half: Glow's "split2d" learned prior). The top latents have an N(0, I) prior. RealNVP used batch
norm where this uses ActNorm (Glow sec. 3.1), and a ResNet coupling network where this uses the
three-convolution network of Glow (sec. 3.3) for both choices.

Bits/dim accounting (what ``bits_per_dim`` and the loss report), for x ∈ {0..255}^D, D = C·H·W:

1. Dequantise: u ∈ [0, 1)^D from q(u|x) (uniform, or a flow conditioned on x: "variational
   dequantisation", Ho et al. 2019 sec. 3.1), giving x + u ∈ [0, 256)^D.
2. Rescale to the model's input range v = (x + u) / 256 − 1/2 ∈ [−1/2, 1/2)^D. This affine map
   has log|det| = −D·log 256 (the shift contributes nothing).
3. Flow: log p_V(v) = Σ_levels log p(z_level) + Σ_layers log|det J_layer|.
4. Density of the continuous x + u on [0, 256)^D: log p(x + u) = log p_V(v) − D·log 256.
5. The discrete model is P(x) = ∫_[0,1)^D p(x + u) du, and by Jensen
       log P(x) ≥ E_q(u|x)[log p(x + u) − log q(u|x)]
   (Theis et al. 2016 sec. 3.1; Ho et al. 2019 eq. 12). For uniform dequantisation log q = 0.
6. bits/dim = −(log p(x + u) − log q(u|x)) / (D·ln 2), one draw of u per image.

Class-conditional flows (``num_classes``) follow Glow's y-conditioning (Kingma & Dhariwal 2018,
sec. 5, "ycond"): the prior of the top-level latents is N(μ_y, diag σ_y²) with a mean and a
log-std per channel (shared by every position) from a zero-initialised embedding of the class,
so it starts as N(0, I); the invertible map itself is the same for every class. Sampling draws
the top latents from the asked class's prior.

So the reported number is a single-sample (unbiased) estimate of an *upper bound* on the discrete
model's −log2 P(x)/D: ``bits_per_dim_kind = "upper_bound"``. It is the number the literature
reports for dequantised flows (Glow's 3.35 on CIFAR-10 is this quantity), so it is comparable;
it is "exact" only in the sense that no further approximation (no ELBO over latents) is involved.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from pipeline.configbase import StrictModel
from pipeline.errors import UserError
from pipeline.models.base import GenerativeModel, full_precision

LOG_256 = math.log(256.0)


class FlowConfig(StrictModel):
    """A Glow or RealNVP flow over dequantised 8-bit images."""

    family: Literal["flow"] = "flow"
    """Discriminator of the model section."""
    architecture: Literal["glow", "realnvp"] = "glow"
    """glow: ActNorm → invertible 1×1 conv → channel-split affine coupling per step;
    realnvp: ActNorm → checkerboard couplings, squeeze, ActNorm → channel-mask couplings."""
    levels: int = Field(default=3, ge=1)
    """Scales of the multi-scale architecture; each squeezes once, so image_size must be
    divisible by 2**levels. Half the channels are factored out after every level but the last."""
    depth: int = Field(default=32, ge=1)
    """Flow steps per level (realnvp: couplings of each mask kind per level)."""
    hidden_channels: int = Field(default=512, ge=1)
    """Width of every coupling network (Glow CIFAR-10: 512)."""
    invertible_conv: Literal["plain", "lu"] = "lu"
    """Glow's 1×1 convolution: a full matrix with log|det| from slogdet, or the LU-decomposed
    W = P·L·(U + diag(sign·exp(log|s|))) whose log|det| is Σ log|s| (Glow sec. 3.2)."""
    coupling_scale: Literal["sigmoid", "exp_tanh"] | None = None
    """Scale of the affine couplings: sigmoid(h + 2) (Glow's code, stable, always < 1) or
    exp(w·tanh(h)) with a learned per-channel w (RealNVP). None: sigmoid for glow, exp_tanh for
    realnvp."""
    learned_prior: bool = True
    """Factored-out latents get a Gaussian prior whose mean and log-std a zero-initialised
    convolution predicts from the kept half (Glow's split2d); False: N(0, I)."""
    dequantization: Literal["uniform", "variational"] = "uniform"
    """u ~ U[0, 1)^D, or u = sigmoid(g(ε; x)) with ε ~ N(0, I) and g a small flow conditioned
    on x, paying −log q(u|x) in the bound (Flow++, Ho et al. 2019 sec. 3.1)."""
    dequant_depth: int = Field(default=4, ge=1)
    """Checkerboard couplings in the variational dequantisation flow."""
    dequant_hidden_channels: int = Field(default=32, ge=1)
    """Width of the dequantisation flow's coupling and context networks."""
    temperature: float = Field(default=0.7, gt=0)
    """Default sampling temperature: latents drawn with their prior std scaled by this (Glow
    sec. 5: T = 0.7 gives better-looking samples than 1.0)."""
    num_classes: int | None = Field(default=None, ge=1)
    """Classes of a class-conditional flow (labels 0..num_classes-1): a class-conditional prior
    of the top latents (Glow's y-conditioning). None: unconditional."""


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    """Log-determinants accumulate in float64 when the model runs in it, otherwise float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class ZeroConv2d(nn.Conv2d):
    """3×3 convolution initialised to zero, so a coupling starts as the identity (Glow sec. 3.3)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.bias)


class Squeeze(nn.Module):
    """Space-to-depth: [B, C, H, W] -> [B, 4C, H/2, W/2] (Dinh et al. 2017 fig. 3); log|det| = 0."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, c, h, w = x.shape
        y = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
        return y.reshape(b, c * 4, h // 2, w // 2), x.new_zeros(b, dtype=_acc_dtype(x))

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        b, c4, h, w = y.shape
        x = y.reshape(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
        return x.reshape(b, c4 // 4, h * 2, w * 2)


class ActNorm(nn.Module):
    """y = (x + b) ⊙ exp(s) per channel (Glow sec. 3.1, table 1); log|det| = H·W·Σ s.

    On the first forward in training mode, b and s are set from that batch so that y has zero
    mean and unit variance per channel. The ``initialized`` buffer travels in the state_dict, so
    a resumed model does not initialise again.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.log_scale = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.register_buffer("initialized", torch.tensor(False))
        # Python mirror of `initialized` once it is known True, so training steps do not read a
        # device tensor (a sync) in every ActNorm; reset whenever a state_dict is loaded.
        self._known_initialized = False

    def _load_from_state_dict(self, *args, **kwargs):
        self._known_initialized = False
        super()._load_from_state_dict(*args, **kwargs)

    @torch.no_grad()
    def _initialize(self, x: torch.Tensor) -> None:
        xf = x.to(self.bias.dtype)
        mean = xf.mean(dim=(0, 2, 3), keepdim=True)
        std = xf.std(dim=(0, 2, 3), keepdim=True, unbiased=False)
        self.bias.copy_(-mean)
        self.log_scale.copy_(-torch.log(std + 1e-6))
        self.initialized.fill_(True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.training and not self._known_initialized:
            if not x.is_meta and not bool(self.initialized):  # (on meta, a model of shapes only)
                self._initialize(x)
            self._known_initialized = True
        y = (x + self.bias) * torch.exp(self.log_scale)
        logdet = self.log_scale.to(_acc_dtype(x)).sum() * (x.shape[2] * x.shape[3])
        return y, logdet.expand(x.shape[0])

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y * torch.exp(-self.log_scale) - self.bias


class InvertibleConv1x1(nn.Module):
    """Invertible 1×1 convolution y = W x at every pixel (Glow sec. 3.2); log|det| = H·W·log|det W|.

    ``lu=True`` stores W = P·L·(U + diag(sign ⊙ exp(log_s))) (Glow eq. 10) with P and sign
    fixed, so log|det W| = Σ log_s costs O(C) instead of O(C³). Both start from a random
    rotation (log|det| = 0).
    """

    def __init__(self, channels: int, lu: bool):
        super().__init__()
        self.lu = lu
        rotation = torch.linalg.qr(torch.randn(channels, channels))[0]
        if not lu:
            self.weight = nn.Parameter(rotation)
            return
        permutation, lower, upper = torch.linalg.lu(rotation)
        diagonal = torch.diagonal(upper)
        self.register_buffer("permutation", permutation)
        self.register_buffer("sign_s", torch.sign(diagonal))
        self.register_buffer("lower_mask", torch.tril(torch.ones(channels, channels), -1))
        self.register_buffer("eye", torch.eye(channels))
        self.lower = nn.Parameter(lower)
        self.upper = nn.Parameter(torch.triu(upper, 1))
        self.log_s = nn.Parameter(torch.log(diagonal.abs()))

    def _weight_and_logdet_per_pixel(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.lu:
            return self.weight, torch.linalg.slogdet(self.weight)[1]
        lower = self.lower * self.lower_mask + self.eye
        upper = self.upper * self.lower_mask.T + torch.diag(self.sign_s * torch.exp(self.log_s))
        return self.permutation @ lower @ upper, self.log_s.sum()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with full_precision(x):
            weight, logdet = self._weight_and_logdet_per_pixel()
        y = F.conv2d(x, weight.unsqueeze(-1).unsqueeze(-1)).to(x.dtype)
        logdet = logdet.to(_acc_dtype(x)) * (x.shape[2] * x.shape[3])
        return y, logdet.expand(x.shape[0])

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        with full_precision(y):
            weight, _ = self._weight_and_logdet_per_pixel()
            inverse = torch.linalg.inv(weight.double()).to(weight.dtype)
        return F.conv2d(y, inverse.unsqueeze(-1).unsqueeze(-1)).to(y.dtype)


def _checkerboard(height: int, width: int, parity: int, like: torch.Tensor) -> torch.Tensor:
    rows = torch.arange(height, device=like.device).view(-1, 1)
    cols = torch.arange(width, device=like.device).view(1, -1)
    return ((rows + cols) % 2 == parity).to(like.dtype).view(1, 1, height, width)


class AffineCoupling(nn.Module):
    """y = b⊙x + (1−b)⊙(x⊙exp(log_s) + t), (log_s, t) = NN(b⊙x [, context]) (Dinh 2017 eq. 9).

    ``mask="channel"``: b selects one half of the channels (the half that conditions; Glow sec.
    3.3 with its split), ``parity`` picks which half. ``mask="checkerboard"``: b is a spatial
    checkerboard of the given parity. log|det| = Σ (1−b)⊙log_s.

    The scale is sigmoid(h + 2) (Glow's code: near 1 at the zero init, bounded, so no blow-up)
    or exp(w·tanh(h)) with a learned per-channel w (RealNVP). Glow writes (x + t)·s; the form
    x·s + t used here is the same family of maps. ``context`` (channels ``context_channels``)
    is concatenated to the network input, for the conditional flow of variational dequantisation.
    """

    def __init__(
        self,
        channels: int,
        hidden_channels: int,
        mask: Literal["channel", "checkerboard"],
        parity: int,
        scale: Literal["sigmoid", "exp_tanh"],
        context_channels: int = 0,
    ):
        super().__init__()
        self.mask, self.parity, self.scale = mask, parity, scale
        if mask == "channel":
            if channels < 2:
                raise ValueError("a channel-mask coupling needs at least 2 channels")
            first = channels // 2
            self.conditioning = slice(0, first) if parity == 0 else slice(first, channels)
            self.transformed = slice(first, channels) if parity == 0 else slice(0, first)
            in_channels = first if parity == 0 else channels - first
            out_channels = channels - in_channels
        else:
            in_channels = out_channels = channels
        self.network = nn.Sequential(
            nn.Conv2d(in_channels + context_channels, hidden_channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden_channels, hidden_channels, 1),
            nn.ReLU(),
            ZeroConv2d(hidden_channels, 2 * out_channels),
        )
        if scale == "exp_tanh":
            self.tanh_scale = nn.Parameter(torch.ones(1, out_channels, 1, 1))

    def _shift_and_log_scale(self, conditioner: torch.Tensor, context, dtype):
        if context is not None:
            conditioner = torch.cat([conditioner, context.to(conditioner.dtype)], dim=1)
        h = self.network(conditioner).to(dtype)
        shift, raw = h[:, 0::2], h[:, 1::2]
        if self.scale == "sigmoid":
            log_scale = F.logsigmoid(raw + 2.0)
        else:
            log_scale = self.tanh_scale * torch.tanh(raw)
        return shift, log_scale

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None):
        if self.mask == "channel":
            x_cond, x_trans = x[:, self.conditioning], x[:, self.transformed]
            shift, log_scale = self._shift_and_log_scale(x_cond, context, x.dtype)
            y_trans = x_trans * torch.exp(log_scale) + shift
            y = torch.cat([x_cond, y_trans] if self.parity == 0 else [y_trans, x_cond], dim=1)
        else:
            b = _checkerboard(x.shape[2], x.shape[3], self.parity, x)
            shift, log_scale = self._shift_and_log_scale(x * b, context, x.dtype)
            shift, log_scale = shift * (1 - b), log_scale * (1 - b)
            y = x * torch.exp(log_scale) + shift
        return y, log_scale.to(_acc_dtype(x)).flatten(1).sum(1)

    def inverse(self, y: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if self.mask == "channel":
            y_cond, y_trans = y[:, self.conditioning], y[:, self.transformed]
            shift, log_scale = self._shift_and_log_scale(y_cond, context, y.dtype)
            x_trans = (y_trans - shift) * torch.exp(-log_scale)
            return torch.cat([y_cond, x_trans] if self.parity == 0 else [x_trans, y_cond], dim=1)
        b = _checkerboard(y.shape[2], y.shape[3], self.parity, y)
        # b⊙y = b⊙x, so the network sees exactly what it saw in the forward pass.
        shift, log_scale = self._shift_and_log_scale(y * b, context, y.dtype)
        return (y - shift * (1 - b)) * torch.exp(-log_scale * (1 - b))


def _gaussian_log_prob(z: torch.Tensor, mean=None, log_std=None) -> torch.Tensor:
    """Σ over all but the batch dim of log N(z; mean, exp(log_std)²), in float32 or float64."""
    z = z.to(_acc_dtype(z))
    if mean is None:
        return (-0.5 * (z**2 + math.log(2 * math.pi))).flatten(1).sum(1)
    mean, log_std = mean.to(z.dtype), log_std.to(z.dtype)
    per_dim = -0.5 * (((z - mean) * torch.exp(-log_std)) ** 2 + math.log(2 * math.pi)) - log_std
    return per_dim.flatten(1).sum(1)


class FactorOut(nn.Module):
    """Split the channels in two; the first half leaves the flow as latents (Dinh et al. 2017 sec.
    3.6). Their prior is N(0, I) or, learned, N(μ(h), exp(log σ(h))²) of the kept half h (Glow)."""

    def __init__(self, channels: int, learned_prior: bool):
        super().__init__()
        self.prior = ZeroConv2d(channels - channels // 2, 2 * (channels // 2)) if learned_prior else None
        self.out_channels = channels // 2

    def prior_params(self, kept: torch.Tensor):
        if self.prior is None:
            return None, None
        h = self.prior(kept)
        return h[:, 0::2], h[:, 1::2]

    def forward(self, x: torch.Tensor):
        """-> (kept, z, log p(z | kept))."""
        z, kept = x[:, : self.out_channels], x[:, self.out_channels :]
        mean, log_std = self.prior_params(kept)
        return kept, z, _gaussian_log_prob(z, mean, log_std)

    def inverse(self, kept: torch.Tensor, z=None, noise=None, temperature: float = 1.0):
        """Rejoin the kept half with z, or with z = μ + T·σ·noise drawn from the prior."""
        if z is None:
            mean, log_std = self.prior_params(kept)
            z = temperature * noise if mean is None else mean + temperature * torch.exp(log_std) * noise
        return torch.cat([z.to(kept.dtype), kept], dim=1)


class FlowNetwork(nn.Module):
    """The multi-scale invertible map v -> (z_1, ..., z_levels) (see the module docstring)."""

    def __init__(self, config: FlowConfig, channels: int):
        super().__init__()
        scale = config.coupling_scale or ("sigmoid" if config.architecture == "glow" else "exp_tanh")
        hidden = config.hidden_channels
        self.levels = nn.ModuleList()
        self.splits = nn.ModuleList()
        c = channels
        for level in range(config.levels):
            layers: list[nn.Module] = []
            if config.architecture == "realnvp":
                for i in range(config.depth):
                    layers += [ActNorm(c), AffineCoupling(c, hidden, "checkerboard", i % 2, scale)]
            layers.append(Squeeze())
            c *= 4
            for i in range(config.depth):
                layers.append(ActNorm(c))
                if config.architecture == "glow":
                    layers.append(InvertibleConv1x1(c, lu=config.invertible_conv == "lu"))
                    layers.append(AffineCoupling(c, hidden, "channel", 0, scale))
                else:
                    layers.append(AffineCoupling(c, hidden, "channel", i % 2, scale))
            self.levels.append(nn.ModuleList(layers))
            if level < config.levels - 1:
                self.splits.append(FactorOut(c, config.learned_prior))
                c -= c // 2
        self.top_channels = c

    def forward(self, v: torch.Tensor, top_prior=None):
        """-> (latents, Σ log|det J| [B], Σ log prior of the latents [B]); ``top_prior``: the
        (mean, log-std) of the top latents' prior, broadcastable to them (None: N(0, I))."""
        logdet = v.new_zeros(v.shape[0], dtype=_acc_dtype(v))
        log_prior = torch.zeros_like(logdet)
        latents = []
        h = v
        for index, layers in enumerate(self.levels):
            for layer in layers:
                h, layer_logdet = layer(h)
                logdet = logdet + layer_logdet
            if index < len(self.splits):
                h, z, split_log_prior = self.splits[index](h)
                latents.append(z)
                log_prior = log_prior + split_log_prior
        latents.append(h)
        if top_prior is None:
            log_prior = log_prior + _gaussian_log_prob(h)
        else:
            mean, log_std = top_prior
            log_prior = log_prior + _gaussian_log_prob(h, mean.expand_as(h), log_std.expand_as(h))
        return latents, logdet, log_prior

    def inverse(self, latents=None, noises=None, temperature: float = 1.0, top_prior=None) -> torch.Tensor:
        """v from given latents (reconstruction), or sampled from noises with a temperature
        (the top latents from ``top_prior`` when given, as in `forward`)."""
        if latents is not None:
            h = latents[-1]
        elif top_prior is None:
            h = temperature * noises[-1]
        else:
            mean, log_std = top_prior
            h = (mean + temperature * torch.exp(log_std) * noises[-1]).to(noises[-1].dtype)
        for index in reversed(range(len(self.levels))):
            if index < len(self.splits):
                z = latents[index] if latents is not None else None
                noise = noises[index] if noises is not None else None
                h = self.splits[index].inverse(h, z=z, noise=noise, temperature=temperature)
            for layer in reversed(self.levels[index]):
                h = layer.inverse(h)
        return h

    def latent_shapes(self, channels: int, image_size: int) -> list[tuple[int, int, int]]:
        shapes, c, s = [], channels, image_size
        for index in range(len(self.levels)):
            c, s = c * 4, s // 2
            if index < len(self.splits):
                shapes.append((c // 2, s, s))
                c -= c // 2
        shapes.append((c, s, s))
        return shapes


class VariationalDequantizer(nn.Module):
    """q(u|x): u = sigmoid(g(ε; x)), ε ~ N(0, I), g conditional checkerboard couplings (Flow++).

    log q(u|x) = log N(ε) − log|det ∂g/∂ε| − Σ log sigmoid'(g) (change of variables through g
    and then the sigmoid, whose derivative is σ(a)(1 − σ(a))).
    """

    def __init__(self, channels: int, depth: int, hidden_channels: int):
        super().__init__()
        self.context = nn.Sequential(
            nn.Conv2d(channels, hidden_channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden_channels, hidden_channels, 3, padding=1),
            nn.ReLU(),
        )
        self.couplings = nn.ModuleList(
            AffineCoupling(channels, hidden_channels, "checkerboard", i % 2, "exp_tanh", hidden_channels)
            for i in range(depth)
        )

    def forward(self, x_centered: torch.Tensor, noise: torch.Tensor):
        """-> (u in (0, 1), log q(u|x) [B]) for x rescaled to [−1/2, 1/2]."""
        context = self.context(x_centered)
        a = noise
        log_q = _gaussian_log_prob(noise)
        for coupling in self.couplings:
            a, logdet = coupling(a, context)
            log_q = log_q - logdet
        a = a.to(_acc_dtype(a))
        log_sigmoid_derivative = -F.softplus(-a) - F.softplus(a)
        return torch.sigmoid(a), log_q - log_sigmoid_derivative.flatten(1).sum(1)


class FlowModel(GenerativeModel):
    """A dequantised Glow / RealNVP flow behind the trainer's interface."""

    bits_per_dim_kind = "upper_bound"
    data_dependent_init = True  # ActNorm initialises from the first training batch

    def __init__(self, config: FlowConfig, image_size: int, channels: int):
        super().__init__()
        if image_size % (2**config.levels):
            raise UserError(
                f"model.levels={config.levels}: image_size {image_size} is not divisible by "
                f"2**levels = {2**config.levels} (each level squeezes 2×2 pixels); lower model.levels"
            )
        self.config, self.image_size, self.channels = config, image_size, channels
        self.flow = FlowNetwork(config, channels)
        self.num_classes = config.num_classes
        if config.num_classes is not None:
            # Glow's y-conditioning: the top prior's mean and log-std per channel, per class.
            self.class_prior = nn.Embedding(config.num_classes, 2 * self.flow.top_channels)
            nn.init.zeros_(self.class_prior.weight)
        self.dequantizer = (
            VariationalDequantizer(channels, config.dequant_depth, config.dequant_hidden_channels)
            if config.dequantization == "variational"
            else None
        )

    def _dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def _top_prior(self, labels: torch.Tensor | None):
        """(mean, log-std) [B, C_top, 1, 1] of the top latents' prior for these classes, or None."""
        if labels is None:
            return None
        mean, log_std = self.class_prior(labels).float().view(-1, 2, self.flow.top_channels, 1, 1).unbind(1)
        return mean, log_std

    def _labels(self, labels: torch.Tensor | None, count: int, device, required: bool = False):
        labels = self.check_labels(labels, count, required=required)
        if self.num_classes is not None and labels is None:
            labels = self.default_labels(count, device)
        return labels

    def _log_likelihood_terms(self, x: torch.Tensor, labels: torch.Tensor | None = None
                              ) -> dict[str, torch.Tensor]:
        """Per-image terms of the bound of the module docstring, in nats [B]."""
        device, dtype = x.device, self._dtype()
        x = x.to(dtype)
        if self.dequantizer is None:
            u = torch.rand(x.shape, device=device, dtype=dtype)
            log_q = x.new_zeros(x.shape[0], dtype=_acc_dtype(x))
        else:
            noise = torch.randn(x.shape, device=device, dtype=dtype)
            u, log_q = self.dequantizer(x / 255.0 - 0.5, noise)
            u = u.to(dtype)
        v = (x + u) / 256.0 - 0.5
        _, logdet, log_prior = self.flow(v, self._top_prior(labels))
        dims = x[0].numel()
        log_density = log_prior + logdet - dims * LOG_256  # log p(x + u) on [0, 256)^D
        return {"log_prior": log_prior, "logdet": logdet, "log_q": log_q, "bound": log_density - log_q}

    def loss(self, x: torch.Tensor, labels: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        terms = self._log_likelihood_terms(x, self._labels(labels, x.shape[0], x.device))
        scale = 1.0 / (x[0].numel() * math.log(2.0))
        bits_per_dim = -terms["bound"] * scale
        loss = bits_per_dim.mean()
        metrics = {
            "bits_per_dim": loss.detach(),
            "prior_bpd": (-terms["log_prior"] * scale).mean().detach(),
            "logdet_bpd": (-terms["logdet"] * scale).mean().detach(),
        }
        if self.dequantizer is not None:
            metrics["dequant_log_q_bpd"] = (terms["log_q"] * scale).mean().detach()
        return loss.float(), metrics

    @torch.no_grad()
    def bits_per_dim(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """The bound of the module docstring per image; conditional on the true labels."""
        terms = self._log_likelihood_terms(x, self._labels(labels, x.shape[0], x.device, required=True))
        return (-terms["bound"] / (x[0].numel() * math.log(2.0))).float()

    @torch.no_grad()
    def sample(
        self, n: int, generator: torch.Generator, labels: torch.Tensor | None = None,
        temperature: float | None = None, **options
    ) -> torch.Tensor:
        """n uint8 images by the inverse pass from latents drawn at `temperature` (config default),
        the top latents from the given classes' prior for a conditional flow."""
        if options:
            raise UserError(
                f"sampling options {sorted(options)} are not understood by the flow family (temperature only)"
            )
        temperature = self.config.temperature if temperature is None else temperature
        device, dtype = next(self.parameters()).device, self._dtype()
        noises = [
            torch.randn((n, *shape), generator=generator).to(device=device, dtype=dtype)
            for shape in self.flow.latent_shapes(self.channels, self.image_size)
        ]
        labels = self._labels(labels, n, device)
        top_prior = None if labels is None else self._top_prior(labels.to(device))
        v = self.flow.inverse(noises=noises, temperature=temperature, top_prior=top_prior)
        # x + u = 256 (v + 1/2) lies in [0, 256); its integer part is the pixel.
        return torch.floor((v.float() + 0.5) * 256.0).clamp_(0, 255).to(torch.uint8)
