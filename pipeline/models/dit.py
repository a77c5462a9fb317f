"""The Diffusion Transformer (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers"):
a network f(x, t, labels), nothing about diffusion. It serves every diffusion objective
(`objectives.py`), as the U-Net does.

Layout, top to bottom:

    x [B, C, S, S] -> patchify: a p x p stride-p convolution to `width` channels, flattened to
        N = (S / p)^2 tokens, plus a fixed 2-D sine-cosine position table       (paper sec. 3.1)
    c = TimestepEmbedding(t) [+ Embedding(labels)]                               (sec. 3.2)
    depth x DiT block with adaLN-Zero conditioning on c:
        shift1, scale1, gate1, shift2, scale2, gate2 = Linear(SiLU(c))  (zero-initialised)
        h = h + gate1 * Attention(LayerNorm(h) * (1 + scale1) + shift1)
        h = h + gate2 * MLP(LayerNorm(h) * (1 + scale2) + shift2)
    final: LayerNorm modulated by (shift, scale) of c, Linear to p * p * C_out per token
        (zero-initialised), unpatchified to [B, C_out, S, S]

Attention is `scaled_dot_product_attention` over all tokens, q, k, v laid out [B, heads, N, d]
with d contiguous, as its fused kernels want. adaLN-Zero (sec. 3.2): every block's modulation is
initialised to zero, so each block starts as the identity and the whole network outputs zeros.

No learned variance: the output is the objective's prediction only (eps, v or a velocity), and
the variance stays the schedule's fixed choice; the published models' extra "learned sigma" half
of the last layer (``width`` x p^2 C weights) is the one part of them left out. Their positional
table is a frozen parameter there and a buffer rebuilt from the shape here, so it is not counted
among the parameters (tests/test_dit.py compares the counts with the published ones).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.layers import timestep_embedding

DIT_SIZES: dict[str, tuple[int, int, int]] = {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
"""Published sizes (Peebles & Xie 2023, table 1): name -> (depth, width, heads)."""

FREQUENCY_CHANNELS = 256
"""Channels of the sinusoidal timestep features the timestep MLP reads (DiT: 256)."""


def sincos_position_table(width: int, grid: int) -> torch.Tensor:
    """[grid * grid, width] 2-D sine-cosine positions (MAE, He et al. 2022): the first half of the
    channels encodes the row, the second the column, each as sines then cosines of
    position / 10000^(2i / (width / 2))."""
    if width % 4:
        raise ValueError(f"DiT width {width} must be divisible by 4 for 2-D sine-cosine positions")
    quarter = width // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    coordinates = torch.arange(grid, dtype=torch.float64)
    rows, columns = torch.meshgrid(coordinates, coordinates, indexing="ij")

    def encode(positions: torch.Tensor) -> torch.Tensor:
        angles = positions.reshape(-1, 1) * omega.view(1, -1)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(rows), encode(columns)], dim=1).float()


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x * (1 + scale) + shift, the per-sample affine of adaptive layer norm, over all tokens."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimestepEmbedding(nn.Module):
    """t [B] -> sinusoidal features (256) -> Linear -> SiLU -> Linear -> [B, width]."""

    def __init__(self, width: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(FREQUENCY_CHANNELS, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        features = timestep_embedding(t, FREQUENCY_CHANNELS)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class Attention(nn.Module):
    """Multi-head self-attention over tokens [B, N, width] (qkv and output projections with bias)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"DiT width {width} is not divisible into {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        # [B, N, 3, heads, d] -> 3 x [B, heads, N, d], d contiguous for the fused kernels
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(q, k, v)
        return self.proj(h.transpose(1, 2).reshape(batch, tokens, width))


class DiTBlock(nn.Module):
    """A transformer block with adaLN-Zero conditioning (module docstring)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c).chunk(6, dim=1)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """Modulated LayerNorm, then a linear map of each token to its p x p x C_out patch."""

    def __init__(self, width: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, patch_size * patch_size * out_channels)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """f(x, t, labels): [B, in_channels, S, S], times [B] (and class labels [B]) -> [B, out_channels, S, S].

    Args:
        in_channels / out_channels: channels in and out (4 and 4 for Stable Diffusion's latents).
        image_size: S; must be a multiple of patch_size.
        patch_size: p, the side of the square patch each token covers (DiT: 2, 4 or 8).
        depth / width / heads: blocks, token channels and attention heads (`DIT_SIZES`).
        label_classes: rows of the class embedding (the classes, plus one for the null class of
            classifier-free guidance); None: an unconditional network.
        mlp_ratio: hidden width of each block's MLP over ``width`` (DiT: 4).
    """

    def __init__(self, in_channels: int, out_channels: int, image_size: int, patch_size: int = 2,
                 depth: int = 12, width: int = 384, heads: int = 6, label_classes: int | None = None,
                 mlp_ratio: float = 4.0):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"DiT: image_size {image_size} is not a multiple of patch_size {patch_size}")
        self.patch_size, self.out_channels = patch_size, out_channels
        self.grid = image_size // patch_size
        self.patchify = nn.Conv2d(in_channels, width, kernel_size=patch_size, stride=patch_size)
        self.register_buffer("positions", sincos_position_table(width, self.grid), persistent=False)
        self.time_embed = TimestepEmbedding(width)
        self.label_embed = nn.Embedding(label_classes, width) if label_classes else None
        self.blocks = nn.ModuleList(DiTBlock(width, heads, mlp_ratio) for _ in range(depth))
        self.final = FinalLayer(width, patch_size, out_channels)
        self._init_weights()

    def _init_weights(self) -> None:
        """DiT's initialisation: Xavier-uniform linear layers (the patch convolution as one),
        zero biases, N(0, 0.02) for the class embedding and the timestep MLP, and zeros for every
        adaLN modulation and the last linear layer (adaLN-Zero)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.xavier_uniform_(self.patchify.weight.view(self.patchify.weight.shape[0], -1))
        nn.init.zeros_(self.patchify.bias)
        if self.label_embed is not None:
            nn.init.normal_(self.label_embed.weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.modulation[-1].weight)
            nn.init.zeros_(block.modulation[-1].bias)
        for layer in (self.final.modulation[-1], self.final.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def condition(self, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """c [B, width]: the timestep embedding, plus the class embedding when conditional."""
        c = self.time_embed(t)
        if self.label_embed is not None:
            if labels is None:
                raise ValueError("DiT: this network is class-conditional and needs labels")
            c = c + self.label_embed(labels)
        return c

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, S, S] -> [B, N, width], positions added."""
        return self.patchify(x).flatten(2).transpose(1, 2) + self.positions.to(x.dtype)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, N, p * p * C] -> [B, C, S, S] (each token's p x p x C values back in place)."""
        batch, p, grid, channels = tokens.shape[0], self.patch_size, self.grid, self.out_channels
        x = tokens.reshape(batch, grid, grid, p, p, channels)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(batch, channels, grid * p, grid * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        c = self.condition(t, labels)
        h = self.tokens(x)
        for block in self.blocks:
            h = block(h, c)
        return self.unpatchify(self.final(h, c))
