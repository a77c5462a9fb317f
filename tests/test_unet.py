"""The DDPM U-Net: shapes, the paper configurations' parameter counts, time conditioning, grads."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.models.layers import AttentionBlock, timestep_embedding
from pipeline.models.unet import UNet


def tiny_unet(**overrides) -> UNet:
    kwargs = dict(in_channels=3, out_channels=3, base_channels=16, channel_mult=(1, 2),
                  num_res_blocks=1, attention_resolutions=(4,), dropout=0.0, image_size=8,
                  norm_groups=8)
    kwargs.update(overrides)
    return UNet(**kwargs)


def randomize_zero_layers(net: nn.Module) -> None:
    """DDPM zero-initialises residual-branch outputs and conv_out; give them random weights so
    the tests see a network whose output depends on every layer."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)


def count(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize("overrides, batch", [
    (dict(in_channels=1, out_channels=1, attention_resolutions=()), 3),
    (dict(attention_resolutions=(8, 4), num_heads=2), 1),
    (dict(image_size=16, channel_mult=(1, 1, 2), attention_resolutions=(8,), head_channels=8,
          num_res_blocks=2), 5),
])
def test_output_shape_matches_input(overrides, batch):
    net = tiny_unet(**overrides)
    size = overrides.get("image_size", 8)
    channels = overrides.get("in_channels", 3)
    x = torch.randn(batch, channels, size, size)
    out = net(x, torch.randint(0, 1000, (batch,)))
    assert out.shape == x.shape


def test_paper_parameter_counts():
    # Ho et al. 2020: 35.7M parameters for CIFAR-10, 114M for the 256x256 LSUN models.
    with torch.device("meta"):
        cifar = UNet(3, 3, 128, (1, 2, 2, 2), 2, (16,), 0.1, image_size=32)
        lsun = UNet(3, 3, 128, (1, 1, 2, 2, 4, 4), 2, (16,), 0.0, image_size=256)
    assert count(cifar) == 35_746_307
    assert count(lsun) == 113_673_219


def test_fresh_network_outputs_zero():
    net = tiny_unet()
    out = net(torch.randn(2, 3, 8, 8), torch.tensor([3, 700]))
    assert torch.equal(out, torch.zeros_like(out))


def test_timestep_changes_output():
    net = tiny_unet()
    randomize_zero_layers(net)
    x = torch.randn(2, 3, 8, 8)
    a = net(x, torch.tensor([1, 1]))
    b = net(x, torch.tensor([500, 500]))
    assert not torch.allclose(a, b, atol=1e-4)


def test_gradients_reach_every_parameter():
    net = tiny_unet(dropout=0.1)
    randomize_zero_layers(net)
    net(torch.randn(3, 3, 8, 8), torch.tensor([0, 10, 999])).square().mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_bf16_autocast():
    net = tiny_unet()
    randomize_zero_layers(net)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(torch.randn(2, 3, 8, 8), torch.tensor([5, 900]))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_impossible_configurations_fail_clearly():
    with pytest.raises(ValueError, match="attention resolutions \\[16\\] are never reached"):
        tiny_unet(attention_resolutions=(16,))
    with pytest.raises(ValueError, match="cannot be halved"):
        tiny_unet(image_size=6, channel_mult=(1, 2, 2))
    with pytest.raises(ValueError, match="not divisible into 3 heads"):
        tiny_unet(num_heads=3)
    with pytest.raises(ValueError, match="groups"):
        tiny_unet(norm_groups=32)


def test_timestep_embedding_and_attention_heads():
    emb = timestep_embedding(torch.tensor([0, 1, 999]), 16)
    assert emb.shape == (3, 16)
    # t = 0: sin(0) = 0, cos(0) = 1.
    assert torch.equal(emb[0], torch.cat([torch.zeros(8), torch.ones(8)]))
    one_head = AttentionBlock(16, num_heads=1, norm_groups=8)
    assert one_head.num_heads == 1
    assert AttentionBlock(16, head_channels=4, norm_groups=8).num_heads == 4


def _attention_by_hand(block: AttentionBlock, x: torch.Tensor) -> torch.Tensor:
    """DDPM's attn_block written out: 1x1 convs, per-head softmax(q k^T / sqrt(d)) v."""
    batch, channels, height, width = x.shape
    heads, d = block.num_heads, channels // block.num_heads
    q, k, v = block.qkv(block.norm(x)).reshape(batch, 3, heads, d, height * width).unbind(1)
    weights = torch.softmax(torch.einsum("bhdi,bhdj->bhij", q, k) / d ** 0.5, dim=-1)
    h = torch.einsum("bhij,bhdj->bhdi", weights, v).reshape(batch, channels, height, width)
    return x + block.proj_out(h)


@pytest.mark.parametrize("heads", [1, 4])
@pytest.mark.parametrize("channels_last", [False, True])
def test_attention_matches_the_written_out_formula_on_the_fused_kernel(heads, channels_last):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    block = AttentionBlock(32, num_heads=heads, norm_groups=8)
    torch.nn.init.normal_(block.proj_out.weight, std=0.1)
    x = torch.randn(2, 32, 8, 8)
    expected = _attention_by_hand(block, x)
    if channels_last:
        block.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    # Only the flash kernel allowed: it raises if q, k, v are not laid out as fused kernels need.
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        out = block(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
