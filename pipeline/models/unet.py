"""The DDPM U-Net (Ho et al. 2020, appendix B): a network f(x, t[, labels]), nothing about diffusion.

A PixelCNN++-style U-Net backbone (Salimans et al. 2017) with Wide-ResNet blocks, GroupNorm,
the timestep added inside every residual block, and self-attention at chosen resolutions.
Layout, top to bottom:

    timestep -> sinusoidal(ch) -> Linear(ch, 4ch) -> SiLU -> Linear(4ch, 4ch)        = temb
    (class-conditional: temb += Embedding(label), as improved-diffusion's label_emb)
    conv_in 3x3
    per level i (resolution image_size / 2^i): num_res_blocks x [ResBlock(ch * mult[i]) (+ attn)],
        then a stride-2 3x3 conv down (not after the last level); every output kept as a skip
    middle: ResBlock -> attn -> ResBlock
    per level, reversed: (num_res_blocks + 1) x [ResBlock(concat(h, skip)) (+ attn)],
        then nearest 2x upsample + 3x3 conv (not after level 0)
    GroupNorm -> SiLU -> conv_out 3x3

Initialisation follows DDPM: Xavier-uniform (fan-average) weights, zero biases, and zero weights
for the last layer of every residual branch and for conv_out, so at initialisation every block
is the identity and the network outputs zeros.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.layers import AttentionBlock, group_norm, timestep_embedding


class ResBlock(nn.Module):
    """Wide-ResNet block with the timestep added in the middle:

        h = conv3x3(SiLU(GroupNorm(x))) + Linear(SiLU(temb))
        out = shortcut(x) + conv3x3(dropout(SiLU(GroupNorm(h))))

    where shortcut is a 1x1 conv when the channel count changes, else the identity."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, dropout: float,
                 norm_groups: int):
        super().__init__()
        self.norm1 = group_norm(in_channels, norm_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.temb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = group_norm(out_channels, norm_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.shortcut = (nn.Conv2d(in_channels, out_channels, kernel_size=1)
                         if in_channels != out_channels else nn.Identity())

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.shortcut(x) + h


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour upsampling, then a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """f(x, t, labels): [B, in_channels, S, S], timesteps [B] (and class labels [B]) -> [B, out_channels, S, S].

    Args:
        in_channels / out_channels: image channels in and out.
        base_channels: channels of the first level (DDPM: 128).
        channel_mult: channels of level i are base_channels * channel_mult[i]; one level per entry,
            each but the last followed by a 2x downsample.
        num_res_blocks: residual blocks per level on the way down (one more on the way up).
        attention_resolutions: spatial sizes (e.g. 16 for 16x16) after whose res blocks a
            self-attention block is inserted.
        dropout: dropout probability inside the residual blocks.
        image_size: input height and width, needed to know which level has which resolution.
        num_heads / head_channels: attention heads; head_channels, when given, wins.
        norm_groups: groups of every GroupNorm (DDPM: 32).
        label_classes: rows of the class embedding added to the timestep embedding (the classes,
            plus one for the null class of classifier-free guidance); None: unconditional.
    """

    def __init__(self, in_channels: int, out_channels: int, base_channels: int = 128,
                 channel_mult: tuple[int, ...] = (1, 2, 2, 2), num_res_blocks: int = 2,
                 attention_resolutions: tuple[int, ...] = (16,), dropout: float = 0.0,
                 image_size: int = 32, num_heads: int = 1, head_channels: int | None = None,
                 norm_groups: int = 32, label_classes: int | None = None):
        super().__init__()
        if not channel_mult:
            raise ValueError("UNet: channel_mult must have at least one level")
        num_levels = len(channel_mult)
        if image_size % 2 ** (num_levels - 1):
            raise ValueError(f"UNet: image_size {image_size} cannot be halved {num_levels - 1} "
                             f"times for {num_levels} levels")
        resolutions = [image_size // 2 ** i for i in range(num_levels)]
        unreachable = sorted(set(attention_resolutions) - set(resolutions))
        if unreachable:
            raise ValueError(f"UNet: attention resolutions {unreachable} are never reached; "
                             f"the levels of a {image_size}px input have resolutions {resolutions}")

        self.base_channels = base_channels
        temb_channels = 4 * base_channels
        self.time_embed = nn.Sequential(
            nn.Linear(base_channels, temb_channels), nn.SiLU(),
            nn.Linear(temb_channels, temb_channels))
        # None adds no parameters: an unconditional network keeps DDPM's parameter names.
        self.label_embed = nn.Embedding(label_classes, temb_channels) if label_classes else None
        self.conv_in = nn.Conv2d(in_channels, base_channels, kernel_size=3, padding=1)

        def res(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, cout, temb_channels, dropout, norm_groups)

        def attn(c: int) -> AttentionBlock:
            return AttentionBlock(c, num_heads, head_channels, norm_groups)

        # Down path: each entry is (res, attn or Identity) or a Downsample; skip channels recorded.
        self.down = nn.ModuleList()
        skip_channels = [base_channels]
        channels = base_channels
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                block = nn.ModuleList([res(channels, base_channels * mult)])
                channels = base_channels * mult
                block.append(attn(channels) if resolutions[level] in attention_resolutions
                             else nn.Identity())
                self.down.append(block)
                skip_channels.append(channels)
            if level != num_levels - 1:
                self.down.append(Downsample(channels))
                skip_channels.append(channels)

        self.mid_res1 = res(channels, channels)
        self.mid_attn = attn(channels)
        self.mid_res2 = res(channels, channels)

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(num_res_blocks + 1):
                block = nn.ModuleList([res(channels + skip_channels.pop(), base_channels * mult)])
                channels = base_channels * mult
                block.append(attn(channels) if resolutions[level] in attention_resolutions
                             else nn.Identity())
                self.up.append(block)
            if level != 0:
                self.up.append(Upsample(channels))
        assert not skip_channels

        self.norm_out = group_norm(channels, norm_groups)
        self.conv_out = nn.Conv2d(channels, out_channels, kernel_size=3, padding=1)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        # Close every residual branch and the output: the network starts as identity blocks.
        zeroed = [self.conv_out] + [m.conv2 for m in self.modules() if isinstance(m, ResBlock)] + [
            m.proj_out for m in self.modules() if isinstance(m, AttentionBlock)]
        for module in zeroed:
            nn.init.zeros_(module.weight)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        temb = self.time_embed(timestep_embedding(t, self.base_channels))
        if self.label_embed is not None:
            if labels is None:
                raise ValueError("UNet: this network is class-conditional and needs labels")
            temb = temb + self.label_embed(labels)
        h = self.conv_in(x)
        skips = [h]
        for block in self.down:
            if isinstance(block, Downsample):
                h = block(h)
            else:
                h = block[1](block[0](h, temb))
            skips.append(h)
        h = self.mid_res2(self.mid_attn(self.mid_res1(h, temb)), temb)
        for block in self.up:
            if isinstance(block, Upsample):
                h = block(h)
            else:
                h = block[1](block[0](torch.cat([h, skips.pop()], dim=1), temb))
        return self.conv_out(F.silu(self.norm_out(h)))
