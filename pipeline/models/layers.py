"""Small layers shared by the networks: timestep embedding, group norm, self-attention.

Nothing here knows about any objective; the U-Net (`unet.py`) and other networks compose them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [N, dim] of (possibly fractional) timesteps t [N].

    The Transformer position encoding (Vaswani et al. 2017, sec. 3.5) as used by DDPM (Ho et al.
    2020, appendix B): frequencies 1 / max_period^(i / half) for i in [0, half), sines then
    cosines. Computed in float32 whatever the autocast state, since bf16 cannot resolve
    t * frequency for t in the hundreds.
    """
    half = dim // 2
    exponent = (torch.arange(half, device=t.device, dtype=torch.float32)
                * (-math.log(max_period) / half))
    args = t.float()[:, None] * torch.exp(exponent)[None, :]
    embedding = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2:
        embedding = F.pad(embedding, (0, 1))
    return embedding


def group_norm(channels: int, groups: int = 32) -> nn.GroupNorm:
    """GroupNorm (Wu & He 2018) with `groups` groups (DDPM: 32); a clear error if it can't be."""
    if channels % groups:
        raise ValueError(f"GroupNorm: {channels} channels are not divisible into {groups} groups")
    return nn.GroupNorm(groups, channels, eps=1e-6)


class AttentionBlock(nn.Module):
    """Residual spatial self-attention over all H*W positions (DDPM's attn_block, multi-head).

    x + proj(softmax(q k^T / sqrt(d)) v) with q, k, v from a 1x1 convolution of GroupNorm(x).
    Heads: ``head_channels`` (channels per head) when given, else ``num_heads``. One head with
    d = C is DDPM's choice. The attention itself is `scaled_dot_product_attention`, which picks a
    fused kernel where one exists.
    """

    def __init__(self, channels: int, num_heads: int = 1, head_channels: int | None = None,
                 norm_groups: int = 32):
        super().__init__()
        if head_channels is not None:
            if head_channels < 1 or channels % head_channels:
                raise ValueError(f"attention: {channels} channels are not divisible into heads of "
                                 f"{head_channels} channels")
            num_heads = channels // head_channels
        if num_heads < 1 or channels % num_heads:
            raise ValueError(f"attention: {channels} channels are not divisible into "
                             f"{num_heads} heads")
        self.num_heads = num_heads
        self.norm = group_norm(channels, norm_groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        heads = self.num_heads
        # The 1x1 convolutions are applied as matmuls over tokens [B, HW, C], so that q, k and v
        # come out with their feature dimension contiguous, as the fused attention kernels
        # (flash, memory-efficient) require; a conv output sliced per head is not, and attention
        # would fall back to the unfused math kernel. In channels-last layout the token view of
        # the input is free.
        tokens = self.norm(x).flatten(2).transpose(1, 2)
        qkv = F.linear(tokens, self.qkv.weight.flatten(1), self.qkv.bias)
        # [B, HW, 3C] -> 3 x [B, heads, HW, C/heads]
        q, k, v = qkv.reshape(batch, height * width, 3, heads, channels // heads).permute(2, 0, 3, 1, 4).unbind(0)
        h = F.scaled_dot_product_attention(q, k, v)
        h = h.transpose(1, 2).reshape(batch, height * width, channels)
        out = F.linear(h, self.proj_out.weight.flatten(1), self.proj_out.bias)
        return x + out.transpose(1, 2).reshape(batch, channels, height, width)
