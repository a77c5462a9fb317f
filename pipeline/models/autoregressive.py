"""Autoregressive family: PixelCNN++ (Salimans et al. 2017) and a masked gated PixelCNN.

p(x) = Π_i p(x_i | x_<i) over pixels in raster order. Two networks produce the conditionals:

- ``pixelcnn++`` (default): down-shifted ("u", everything strictly above) and down-right-shifted
  ("ul", everything above plus the pixels to the left) streams of gated resnets, a downsampling
  half and an upsampling half joined by skip connections. The network never sees any channel of
  the pixel it predicts; the channels within a pixel are ordered R → G → B by the discretised
  logistic mixture's linear mean coupling (`likelihoods`).
- ``pixelcnn``: a single-resolution gated PixelCNN (van den Oord et al. 2016, "Conditional Image
  Generation with PixelCNN Decoders") whose horizontal stack uses `MaskedConv2d` with type-A
  (first layer) and type-B masks over R → G → B channel groups, so the output for channel c of a
  pixel sees channels < c of that pixel; each subpixel gets a 256-way softmax or its own
  1-channel logistic mixture.

Class-conditional models (``num_classes``) follow the conditional PixelCNN (van den Oord et al.
2016, eq. 4): every gated unit adds a learned per-class bias V^T h (h the one-hot class) to its
pre-activations before the gate, tanh(W_f * x + V_f^T h) ⊙ σ(W_g * x + V_g^T h) (in PixelCNN++'s
gated resnets, to [a, b] of a · σ(b), as its reference code's ``h`` conditioning does). The bias
is the same at every position, so causality is untouched; it starts at zero.

The likelihood is exact: `bits_per_dim` is −log₂ p(x) / (C·H·W) (conditional: of p(x|y)).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from pipeline.configbase import StrictModel
from pipeline.errors import UserError
from pipeline.models.base import GenerativeModel, full_precision, to_unit_interval
from pipeline.models.likelihoods import (
    discretized_mix_logistic_log_prob,
    mixture_param_channels,
    sample_discretized_mix_logistic,
    temper_mixture_params,
)


class PixelCNNConfig(StrictModel):
    """Model section for the autoregressive family. Defaults are the paper's CIFAR-10 model."""

    family: Literal["autoregressive"] = "autoregressive"
    network: Literal["pixelcnn++", "pixelcnn"] = Field(
        "pixelcnn++",
        description="pixelcnn++: shifted-conv u/ul streams with down/up stages and a pixel-wise "
        "logistic mixture (Salimans et al. 2017); pixelcnn: single-resolution gated PixelCNN "
        "with type-A/B channel masks and per-subpixel outputs (van den Oord et al. 2016).",
    )
    filters: int = Field(160, ge=1, description="Feature channels of every layer (paper: 160).")
    num_resnet: int = Field(
        5,
        ge=1,
        description="Gated resnet blocks per stage (paper: 5). For network=pixelcnn the stack has "
        "1 + num_stages·num_resnet gated layers.",
    )
    num_stages: int = Field(
        3,
        ge=1,
        description="Resolution levels of the downsampling half; the upsampling half mirrors it "
        "(paper: 3, i.e. 6 stages of 5 blocks, 2 stride-2 down and 2 up). image_size must be "
        "divisible by 2^(num_stages-1).",
    )
    num_mixtures: int = Field(10, ge=1, description="Logistic mixture components (paper: 10).")
    dropout: float = Field(
        0.5, ge=0.0, lt=1.0, description="Dropout inside gated resnets (paper: 0.5 on CIFAR-10)."
    )
    output: Literal["logistic_mixture", "softmax"] = Field(
        "logistic_mixture",
        description="Per-pixel distribution. softmax (256-way per subpixel) only with network=pixelcnn.",
    )
    num_classes: int | None = Field(
        None,
        ge=1,
        description="Classes of a class-conditional model (labels 0..num_classes-1): per-class "
        "biases in every gated unit (conditional PixelCNN). None: unconditional.",
    )

    @model_validator(mode="after")
    def _softmax_needs_masked_network(self) -> PixelCNNConfig:
        if self.output == "softmax" and self.network != "pixelcnn":
            raise ValueError(
                "output=softmax needs network=pixelcnn (pixelcnn++ orders channels through the mixture)"
            )
        return self


# ----------------------------------------------------------------------------------------------
# Shifted convolutions (PixelCNN++ section 2.x, "down-shifted" and "down-right-shifted").
# Padding only on top (and left) makes output (i, j) depend on rows ≤ i (and columns ≤ j);
# the initial `down_shift` / `right_shift` then removes the current row / column.


def down_shift(x: Tensor) -> Tensor:
    """Row i takes row i − 1's values; row 0 gets zeros."""
    return F.pad(x, (0, 0, 1, 0))[:, :, :-1]


def right_shift(x: Tensor) -> Tensor:
    """Column j takes column j − 1's values; column 0 gets zeros."""
    return F.pad(x, (1, 0, 0, 0))[:, :, :, :-1]


def class_bias(num_classes: int | None, channels: int) -> nn.Embedding | None:
    """V^T h of the conditional PixelCNN for a one-hot class h: a learned bias per class over
    ``channels`` pre-activations, zero at initialisation (None when unconditional)."""
    if num_classes is None:
        return None
    bias = nn.Embedding(num_classes, channels)
    nn.init.zeros_(bias.weight)
    return bias


def _add_class_bias(h: Tensor, bias: nn.Embedding | None, labels: Tensor | None) -> Tensor:
    if bias is None:
        return h
    return h + bias(labels).to(h.dtype)[:, :, None, None]


def concat_elu(x: Tensor) -> Tensor:
    """ELU of [x, −x]: both signs pass, doubling the channels (PixelCNN++ section 2.x)."""
    return F.elu(torch.cat([x, -x], dim=1))


class DownShiftedConv2d(nn.Conv2d):
    """Output (i, j) sees input rows i−kh+1..i and columns j−kw//2..j+kw//2."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size=(2, 3), stride: int = 1):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride)
        kh, kw = self.kernel_size
        self.pad = (kw // 2, kw // 2, kh - 1, 0)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(F.pad(x, self.pad))


class DownRightShiftedConv2d(nn.Conv2d):
    """Output (i, j) sees input rows i−kh+1..i and columns j−kw+1..j."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size=(2, 2), stride: int = 1):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride)
        kh, kw = self.kernel_size
        self.pad = (kw - 1, 0, kh - 1, 0)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(F.pad(x, self.pad))


class DownShiftedConvTranspose2d(nn.ConvTranspose2d):
    """Stride-2 (2, 3) upsampling: output row r reads input row r // 2 (no later rows); the
    first column is cropped so input column j feeds output columns 2j−1..2j+1."""

    def __init__(self, channels: int):
        super().__init__(channels, channels, (2, 3), stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x)[:, :, :, 1:]


class DownRightShiftedConvTranspose2d(nn.ConvTranspose2d):
    """Stride-2 (2, 2) upsampling: output (r, c) reads input (r // 2, c // 2) only, which was
    computed from pixels before (2·(r//2), 2·(c//2)) ≤ (r, c): causality is kept."""

    def __init__(self, channels: int):
        super().__init__(channels, channels, (2, 2), stride=2)


class GatedResnet(nn.Module):
    """x + a·σ(b), [a, b] = conv(dropout(concat_elu(conv(concat_elu(x)) + nin(concat_elu(aux)))))
    (+ the class's bias on [a, b] when conditional)."""

    def __init__(self, filters: int, conv: type[nn.Conv2d], aux_channels: int, dropout: float,
                 num_classes: int | None = None):
        super().__init__()
        self.conv_in = conv(2 * filters, filters)
        self.aux = nn.Conv2d(2 * aux_channels, filters, 1) if aux_channels else None
        self.dropout = nn.Dropout(dropout)
        self.conv_out = conv(2 * filters, 2 * filters)
        self.class_bias = class_bias(num_classes, 2 * filters)

    def forward(self, x: Tensor, aux: Tensor | None = None, labels: Tensor | None = None) -> Tensor:
        h = self.conv_in(concat_elu(x))
        if self.aux is not None:
            h = h + self.aux(concat_elu(aux))
        h = _add_class_bias(self.conv_out(self.dropout(concat_elu(h))), self.class_bias, labels)
        a, b = h.chunk(2, dim=1)
        return x + a * torch.sigmoid(b)


class PixelCNNPlusPlusNetwork(nn.Module):
    """x on [-1, 1] [B, C, H, W] -> mixture params [B, out_channels, H, W], strictly causal.

    Downsampling half: `num_stages` levels of `num_resnet` (u, ul) resnet pairs (ul also reads
    the u stream), a stride-2 shifted conv between levels. Upsampling half: starts from the last
    activations of the first half and consumes every earlier one, newest first, as a skip input
    (u resnets read the u skip; ul resnets read [u, ul skip]); so its first level has
    `num_resnet` pairs and the others `num_resnet + 1`, with a stride-2 transposed conv between.
    """

    def __init__(
        self, channels: int, out_channels: int, filters: int, num_resnet: int, num_stages: int, dropout: float,
        num_classes: int | None = None,
    ):
        super().__init__()
        f = filters
        # A constant channel of ones lets the first layer tell zero padding (outside the image,
        # and the not-yet-seen row/column) from real mid-grey pixels, which are 0 on [-1, 1].
        in_ch = channels + 1
        self.u_init = DownShiftedConv2d(in_ch, f, (2, 3))
        self.ul_init_above = DownShiftedConv2d(in_ch, f, (1, 3))
        self.ul_init_left = DownRightShiftedConv2d(in_ch, f, (2, 1))

        def pairs(n: int, u_aux: int, ul_aux: int) -> nn.ModuleList:
            return nn.ModuleList(
                nn.ModuleList(
                    [
                        GatedResnet(f, DownShiftedConv2d, u_aux, dropout, num_classes),
                        GatedResnet(f, DownRightShiftedConv2d, ul_aux, dropout, num_classes),
                    ]
                )
                for _ in range(n)
            )

        self.down_stages = nn.ModuleList(pairs(num_resnet, 0, f) for _ in range(num_stages))
        self.downsample = nn.ModuleList(
            nn.ModuleList(
                [DownShiftedConv2d(f, f, (2, 3), stride=2), DownRightShiftedConv2d(f, f, (2, 2), stride=2)]
            )
            for _ in range(num_stages - 1)
        )
        self.up_stages = nn.ModuleList(
            pairs(num_resnet if s == 0 else num_resnet + 1, f, 2 * f) for s in range(num_stages)
        )
        self.upsample = nn.ModuleList(
            nn.ModuleList([DownShiftedConvTranspose2d(f), DownRightShiftedConvTranspose2d(f)])
            for _ in range(num_stages - 1)
        )
        self.out = nn.Conv2d(f, out_channels, 1)

    def initial_streams(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """u: rows strictly above; ul: rows above plus the same row strictly left."""
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        u = down_shift(self.u_init(x))
        ul = down_shift(self.ul_init_above(x)) + right_shift(self.ul_init_left(x))
        return u, ul

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        u, ul = self.initial_streams(x)
        u_skips, ul_skips = [u], [ul]
        for level, stage in enumerate(self.down_stages):
            for u_block, ul_block in stage:
                u = u_block(u, labels=labels)
                ul = ul_block(ul, u, labels)
                u_skips.append(u)
                ul_skips.append(ul)
            if level < len(self.downsample):
                u_down, ul_down = self.downsample[level]
                u, ul = u_down(u), ul_down(ul)
                u_skips.append(u)
                ul_skips.append(ul)
        u, ul = u_skips.pop(), ul_skips.pop()
        for level, stage in enumerate(self.up_stages):
            for u_block, ul_block in stage:
                u = u_block(u, u_skips.pop(), labels)
                ul = ul_block(ul, torch.cat([u, ul_skips.pop()], dim=1), labels)
            if level < len(self.upsample):
                u_up, ul_up = self.upsample[level]
                u, ul = u_up(u), ul_up(ul)
        assert not u_skips and not ul_skips, "every downsampling activation is used once"
        return self.out(F.elu(ul))


# ----------------------------------------------------------------------------------------------
# Masked convolutions (van den Oord et al. 2016, PixelRNN section 3.4 / Figure 2).


def colour_groups(num: int, colours: int, chunks: int = 1) -> Tensor:
    """Colour group (0 = R, 1 = G, 2 = B) of each of `num` channels: each of `chunks` equal
    chunks is split into `colours` contiguous blocks. Chunks keep a gate's two halves aligned."""
    size = num // chunks
    if size * chunks != num or size < colours:
        raise ValueError(f"{num} channels cannot form {chunks} chunks of >= {colours} colour groups")
    return (torch.arange(size) * colours // size).repeat(chunks)


class MaskedConv2d(nn.Conv2d):
    """Convolution whose kernel sees only the rows above and the columns to the left of the
    centre, and at the centre tap only earlier colours: type "A" connects output group g to input
    groups < g (first layer: a pixel never sees its own value), type "B" to groups ≤ g (later
    layers, whose group-g features already exclude colour g of the pixel). Colours are ordered
    R → G → B; with one colour, A hides the centre entirely and B shows it."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        mask_type: Literal["A", "B"],
        colours: int = 3,
        out_chunks: int = 1,
    ):
        if mask_type not in ("A", "B"):
            raise ValueError(f"mask_type must be 'A' or 'B', got {mask_type!r}")
        kernel_size = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        kh, kw = kernel_size
        if kh % 2 == 0 or kw % 2 == 0:
            raise ValueError(f"masked kernels need odd sizes, got {kernel_size}")
        super().__init__(in_channels, out_channels, kernel_size, padding=(kh // 2, kw // 2))
        self.mask_type = mask_type
        mask = torch.ones(out_channels, in_channels, kh, kw)
        mask[:, :, kh // 2 + 1 :, :] = 0
        mask[:, :, kh // 2, kw // 2 + 1 :] = 0
        g_out = colour_groups(out_channels, colours, out_chunks)[:, None]
        g_in = colour_groups(in_channels, colours)[None, :]
        centre = g_in < g_out if mask_type == "A" else g_in <= g_out
        mask[:, :, kh // 2, kw // 2] = centre.to(mask.dtype)
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.weight * self.mask, self.bias)


def gate(x: Tensor) -> Tensor:
    """tanh(a)·σ(b) for x = [a, b] (gated PixelCNN's activation)."""
    a, b = x.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


class GatedMaskedLayer(nn.Module):
    """One gated PixelCNN layer without blind spot: a vertical stack over rows ≤ i (all columns
    of the window) that reaches the horizontal stack only shifted down a row, and a masked
    horizontal stack over the current row's columns ≤ j. A conditional layer adds its class's
    bias to both stacks' pre-activations (van den Oord et al. 2016, eq. 4)."""

    def __init__(self, in_channels: int, filters: int, colours: int, first: bool, dropout: float,
                 num_classes: int | None = None):
        super().__init__()
        mask_type = "A" if first else "B"
        self.first = first
        self.vertical = DownShiftedConv2d(in_channels, 2 * filters, (2, 3))
        self.vertical_to_horizontal = nn.Conv2d(2 * filters, 2 * filters, 1)
        self.horizontal = MaskedConv2d(in_channels, 2 * filters, (1, 3), mask_type, colours, out_chunks=2)
        self.dropout = nn.Dropout(dropout)
        self.horizontal_out = MaskedConv2d(filters, filters, 1, "B", colours)
        self.vertical_class_bias = class_bias(num_classes, 2 * filters)
        self.horizontal_class_bias = class_bias(num_classes, 2 * filters)

    def forward(self, v: Tensor, h: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        v_pre = self.vertical(v)
        h_pre = self.horizontal(h) + self.vertical_to_horizontal(down_shift(v_pre))
        # After v_pre feeds the horizontal stack: each stack gets its own class bias once.
        v_pre = _add_class_bias(v_pre, self.vertical_class_bias, labels)
        h_pre = _add_class_bias(h_pre, self.horizontal_class_bias, labels)
        h_new = self.horizontal_out(self.dropout(gate(h_pre)))
        # No residual on the first layer: its input is the image, own pixel included.
        return gate(v_pre), h_new if self.first else h + h_new


class MaskedPixelCNNNetwork(nn.Module):
    """x on [-1, 1] -> per-subpixel outputs [B, C·per_channel, H, W], block c for colour c."""

    def __init__(self, channels: int, per_channel: int, filters: int, num_layers: int, dropout: float,
                 num_classes: int | None = None):
        super().__init__()
        self.layers = nn.ModuleList(
            GatedMaskedLayer(channels if i == 0 else filters, filters, channels, i == 0, dropout, num_classes)
            for i in range(num_layers)
        )
        # ELU rather than ReLU: no unit is ever dead, so no colour block loses its inputs.
        self.head = nn.Sequential(
            nn.ELU(),
            MaskedConv2d(filters, filters, 1, "B", channels),
            nn.ELU(),
            MaskedConv2d(filters, channels * per_channel, 1, "B", channels),
        )

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        v, h = x, x
        for layer in self.layers:
            v, h = layer(v, h, labels)
        return self.head(h)


# ----------------------------------------------------------------------------------------------


class PixelCNNModel(GenerativeModel):
    """Exact-likelihood autoregressive model; the loss is the mean NLL in bits per dimension."""

    bits_per_dim_kind = "exact"

    def __init__(self, config: PixelCNNConfig, image_size: int, channels: int):
        super().__init__()
        if channels not in (1, 3):
            raise UserError(f"model.family=autoregressive supports 1 or 3 image channels, got {channels}")
        factor = 2 ** (config.num_stages - 1)
        if config.network == "pixelcnn++" and image_size % factor:
            raise UserError(
                f"model.num_stages={config.num_stages} halves the image {config.num_stages - 1} times, "
                f"so image_size must be divisible by {factor}, got {image_size}"
            )
        self.config = config
        self.image_size = image_size
        self.channels = channels
        self.num_classes = config.num_classes
        k = config.num_mixtures
        if config.network == "pixelcnn++":
            self.network = PixelCNNPlusPlusNetwork(
                channels,
                mixture_param_channels(k, channels),
                config.filters,
                config.num_resnet,
                config.num_stages,
                config.dropout,
                config.num_classes,
            )
        else:
            self.per_channel = 256 if config.output == "softmax" else mixture_param_channels(k, 1)
            num_layers = 1 + config.num_stages * config.num_resnet
            self.network = MaskedPixelCNNNetwork(
                channels, self.per_channel, config.filters, num_layers, config.dropout, config.num_classes
            )

    @property
    def _masked(self) -> bool:
        return self.config.network == "pixelcnn"

    def _subpixel_outputs(self, out: Tensor, c: int) -> Tensor:
        return out[:, c * self.per_channel : (c + 1) * self.per_channel]

    def _labels(self, labels: Tensor | None, count: int, device, required: bool = False):
        labels = self.check_labels(labels, count, required=required)
        if self.num_classes is not None and labels is None:
            labels = self.default_labels(count, device)
        return labels

    def log_prob(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        """log p(x) (conditional: log p(x|y)) in nats per image [B] of a uint8 batch [B, C, H, W]."""
        out = self.network(to_unit_interval(x), labels)
        if not self._masked:
            return discretized_mix_logistic_log_prob(x, out, self.config.num_mixtures).sum(dim=(1, 2))
        total = 0.0
        for c in range(self.channels):
            params = self._subpixel_outputs(out, c)
            if self.config.output == "softmax":
                with full_precision(out):
                    log_probs = F.log_softmax(params.float(), dim=1)
                    term = log_probs.gather(1, x[:, c : c + 1].long()).squeeze(1)
            else:
                term = discretized_mix_logistic_log_prob(x[:, c : c + 1], params, self.config.num_mixtures)
            total = total + term.sum(dim=(1, 2))
        return total

    def bits_per_dim(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        """Exact −log₂ p(x) / (C·H·W) per image (conditional: of p(x|y), given the true labels)."""
        labels = self._labels(labels, x.shape[0], x.device, required=True)
        return -self.log_prob(x, labels) / (x[0].numel() * math.log(2.0))

    def loss(self, x: Tensor, labels: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Mean bits per dimension (NLL in bits, so its value is the metric itself)."""
        labels = self._labels(labels, x.shape[0], x.device)
        loss = (-self.log_prob(x, labels) / (x[0].numel() * math.log(2.0))).mean()
        return loss, {"bits_per_dim": loss.detach()}

    @torch.no_grad()
    def sample(
        self, n: int, generator: torch.Generator, labels: Tensor | None = None, temperature: float = 1.0,
        batch_size: int | None = None
    ) -> Tensor:
        """n uint8 images, pixel by pixel in raster order (and R → G → B within a pixel), one
        network pass per pixel (per subpixel for network=pixelcnn). temperature scales the
        mixture logits and scales (softmax: the logits); noise comes from the CPU generator."""
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        batch_size = batch_size or n
        device = next(self.parameters()).device
        labels = self._labels(labels, n, device)
        was_training = self.training
        self.eval()
        try:
            chunks = [
                self._sample_batch(min(batch_size, n - start), generator, temperature,
                                   None if labels is None else labels[start:start + batch_size].to(device))
                for start in range(0, n, batch_size)
            ]
        finally:
            self.train(was_training)
        return torch.cat(chunks, dim=0)

    def _sample_batch(self, n: int, generator: torch.Generator, temperature: float,
                      labels: Tensor | None = None, cached: bool = True) -> Tensor:
        """One batch in raster order. cached: each pass recomputes only the rows that changed
        (`autoregressive_rows`); False: the whole network every pass (the reference it equals)."""
        from pipeline.models.autoregressive_rows import CachedRows  # it imports this module

        device = next(self.parameters()).device
        size, channels, k = self.image_size, self.channels, self.config.num_mixtures
        x = torch.zeros(n, channels, size, size, dtype=torch.uint8, device=device)
        if cached:
            outputs_at = CachedRows(self.network, size, labels).outputs
        else:
            def outputs_at(x: Tensor, i: int, j: int) -> Tensor:
                return self.network(to_unit_interval(x), labels)[:, :, i : i + 1, j : j + 1]
        for i in range(size):
            for j in range(size):
                if not self._masked:
                    params = outputs_at(x, i, j)
                    params = temper_mixture_params(params.float(), k, channels, temperature)
                    x[:, :, i : i + 1, j : j + 1] = sample_discretized_mix_logistic(params, k, channels, generator)
                    continue
                for c in range(channels):
                    out = outputs_at(x, i, j)
                    params = self._subpixel_outputs(out, c).float()
                    if self.config.output == "softmax":
                        uniform = torch.rand((n, 256, 1, 1), generator=generator).clamp_(1e-6, 1 - 1e-6)
                        gumbel = -torch.log(-torch.log(uniform.to(device)))
                        level = (params / temperature + gumbel).argmax(dim=1, keepdim=True)
                        x[:, c : c + 1, i : i + 1, j : j + 1] = level.to(torch.uint8)
                    else:
                        params = temper_mixture_params(params, k, 1, temperature)
                        x[:, c : c + 1, i : i + 1, j : j + 1] = sample_discretized_mix_logistic(params, k, 1, generator)
        return x
