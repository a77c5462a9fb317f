"""PixelCNN++ and the masked gated PixelCNN: causality (exact zero gradients), no blind spot,
within-pixel channel order, training signal, sampling, autocast and the paper's model size."""

from __future__ import annotations

import pydantic
import pytest
import torch

from pipeline.errors import UserError
from pipeline.models import build
from pipeline.models.autoregressive import MaskedConv2d, PixelCNNConfig, PixelCNNModel
from pipeline.models.base import to_unit_interval
from pipeline.models.likelihoods import _log_prob_scaled

SIZE = 8
POSITIONS = [(0, 0), (0, 5), (3, 4), (4, 7), (5, 0), (7, 7)]


def tiny(network: str = "pixelcnn++", output: str = "logistic_mixture", size: int = SIZE, channels: int = 3, **kw):
    torch.manual_seed(0)
    settings = dict(filters=16, num_resnet=1, num_stages=2, num_mixtures=2, dropout=0.0) | kw
    config = PixelCNNConfig(family="autoregressive", network=network, output=output, **settings)
    return PixelCNNModel(config, image_size=size, channels=channels).eval()


def random_input(channels: int = 3, size: int = SIZE, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (1, channels, size, size), generator=g, dtype=torch.uint8)
    return to_unit_interval(x).requires_grad_(True)


def input_grad(output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    (grad,) = torch.autograd.grad(output, x, retain_graph=True)
    return grad[0]  # [C, H, W]


def assert_causal(grad: torch.Tensor, i: int, j: int, own_pixel_channels_allowed: int):
    """Zero for every pixel after (i, j) and for channels >= allowed of (i, j) itself."""
    c, h, w = grad.shape
    later = torch.arange(h * w).view(h, w) > i * w + j
    assert (grad[:, later] == 0).all(), f"output at {(i, j)} sees a later pixel"
    assert (grad[own_pixel_channels_allowed:, i, j] == 0).all(), f"output at {(i, j)} sees its own pixel"


def assert_not_blind(grad: torch.Tensor, i: int, j: int):
    h, w = grad.shape[1:]
    if i > 0 and j + 1 < w:
        assert grad[:, i - 1, j + 1].abs().sum() > 0, f"{(i, j)} blind to the pixel above-right"
    if j > 0:
        assert grad[:, i, j - 1].abs().sum() > 0, f"{(i, j)} blind to the pixel on the left"
    if i > 0:
        assert grad[:, i - 1, j].abs().sum() > 0, f"{(i, j)} blind to the pixel above"


def test_pixelcnnpp_output_is_strictly_causal_with_full_receptive_field():
    model = tiny()
    x = random_input()
    out = model.network(x)
    for i, j in POSITIONS:
        grad = input_grad(out[0, :, i, j].sum(), x)
        assert_causal(grad, i, j, own_pixel_channels_allowed=0)
        assert_not_blind(grad, i, j)
    # No blind spot: at (4, 4) every earlier pixel, far above-right included, is seen.
    grad = input_grad(out[0, :, 4, 4].sum(), x).abs().sum(0).flatten()
    assert (grad[: 4 * SIZE + 4] > 0).all()


def test_pixelcnnpp_first_layer_never_sees_its_own_pixel():
    model = tiny()
    x = random_input()
    u, ul = model.network.initial_streams(x)
    for i, j in POSITIONS:
        grad_u = input_grad(u[0, :, i, j].sum(), x)
        assert (grad_u[:, i:] == 0).all(), "u stream must see only rows above"
        assert_causal(input_grad(ul[0, :, i, j].sum(), x), i, j, own_pixel_channels_allowed=0)


def test_pixelcnnpp_channels_within_a_pixel_follow_the_mixture_coupling():
    """log p(x_≤c) at pixel i: blind to channels > c of i, depends on channels < c of i."""
    model = tiny()
    x = random_input(seed=1)
    params = model.network(x)
    k = model.config.num_mixtures
    for c in range(3):
        log_p = _log_prob_scaled(x, params, k, num_channels=c + 1)
        for i, j in POSITIONS:
            grad = input_grad(log_p[0, i, j], x)
            assert_causal(grad, i, j, own_pixel_channels_allowed=c + 1)
            for earlier in range(c):
                assert grad[earlier, i, j] != 0, f"channel {c} ignores channel {earlier} of its pixel"


@pytest.mark.parametrize("output", ["logistic_mixture", "softmax"])
def test_masked_pixelcnn_is_causal_over_pixels_and_colours(output):
    model = tiny("pixelcnn", output)
    x = random_input(seed=2)
    out = model.network(x)
    block = out.shape[1] // 3
    for c in range(3):
        for i, j in POSITIONS:
            grad = input_grad(out[0, c * block : (c + 1) * block, i, j].sum(), x)
            assert_causal(grad, i, j, own_pixel_channels_allowed=c)
            assert_not_blind(grad, i, j)
            for earlier in range(c):
                assert grad[earlier, i, j].abs() > 0, f"colour {c} ignores colour {earlier} of its pixel"


def test_masked_conv_masks():
    conv = MaskedConv2d(3, 6, 3, "A", colours=3)
    centre = conv.mask[:, :, 1, 1]
    expected = torch.tensor([[0, 0, 0]] * 2 + [[1, 0, 0]] * 2 + [[1, 1, 0]] * 2, dtype=centre.dtype)
    assert torch.equal(centre, expected)
    assert (conv.mask[:, :, 2] == 0).all() and (conv.mask[:, :, 1, 2] == 0).all()
    assert (conv.mask[:, :, 0] == 1).all() and (conv.mask[:, :, 1, 0] == 1).all()
    type_b = MaskedConv2d(6, 6, 3, "B", colours=3).mask[:, :, 1, 1]
    assert torch.equal(type_b, (torch.arange(6)[None] // 2 <= torch.arange(6)[:, None] // 2).float())
    assert (MaskedConv2d(1, 4, 3, "A", colours=1).mask[:, :, 1, 1] == 0).all()
    assert (MaskedConv2d(4, 4, 3, "B", colours=1).mask[:, :, 1, 1] == 1).all()
    assert "mask" not in conv.state_dict()  # derived from the config, never checkpointed


@pytest.mark.parametrize("network,output", [("pixelcnn++", "logistic_mixture"), ("pixelcnn", "softmax")])
def test_bits_per_dim_start_near_8_and_fall_with_training(network, output):
    model = tiny(network, output).train()
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 256, (4, 3, SIZE, SIZE), generator=g, dtype=torch.uint8)
    x[:, :, :4] = 60  # some structure to learn
    with torch.no_grad():
        start = model.bits_per_dim(x)
    assert start.shape == (4,) and torch.isfinite(start).all()
    assert 7.0 < start.mean().item() < 11.0
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(8):
        loss, metrics = model.loss(x)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        end = model.bits_per_dim(x)
    assert end.mean() < start.mean() - 0.1, (start.mean(), end.mean())


def test_loss_has_grads_and_detached_metric():
    model = tiny().train()
    x = torch.randint(0, 256, (2, 3, SIZE, SIZE), dtype=torch.uint8)
    loss, metrics = model(x)
    assert loss.dim() == 0 and loss.requires_grad
    assert set(metrics) == {"bits_per_dim"}
    bpd = metrics["bits_per_dim"]
    assert bpd.dim() == 0 and not bpd.requires_grad and torch.equal(bpd, loss.detach())
    loss.backward()
    assert model.network.out.weight.grad.abs().sum() > 0
    assert model.network.u_init.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "network,output,channels",
    [
        ("pixelcnn++", "logistic_mixture", 3),
        ("pixelcnn++", "logistic_mixture", 1),
        ("pixelcnn", "softmax", 3),
        ("pixelcnn", "logistic_mixture", 1),
    ],
)
def test_sample_shape_dtype_and_seed(network, output, channels):
    model = tiny(network, output, size=4, channels=channels).train()
    first = model.sample(2, torch.Generator().manual_seed(0))
    assert model.training, "sample restores the training mode"
    assert first.shape == (2, channels, 4, 4) and first.dtype == torch.uint8
    assert torch.equal(first, model.sample(2, torch.Generator().manual_seed(0)))
    assert not torch.equal(first, model.sample(2, torch.Generator().manual_seed(1)))
    chunked = model.sample(3, torch.Generator().manual_seed(0), temperature=0.8, batch_size=2)
    assert chunked.shape == (3, channels, 4, 4)


def test_bf16_autocast():
    model = tiny().train()
    x = torch.randint(0, 256, (2, 3, SIZE, SIZE), dtype=torch.uint8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, metrics = model.loss(x)
        bpd = model.bits_per_dim(x)
        samples = tiny(size=4).sample(1, torch.Generator().manual_seed(0))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert bpd.dtype == torch.float32
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert samples.dtype == torch.uint8


def test_paper_cifar10_configuration_size():
    """160 filters, 5 resnets per stage, 3 down + 3 up stages, 10 mixtures, 32×32×3: ~53M."""
    with torch.device("meta"):
        model = build(PixelCNNConfig(family="autoregressive"), image_size=32, channels=3)
    count = sum(p.numel() for p in model.parameters())
    assert count == 53_618_660
    assert abs(count - 53e6) / 53e6 < 0.02


def test_config_validation():
    config = PixelCNNConfig(family="autoregressive")
    fields = ("network", "filters", "num_resnet", "num_stages", "num_mixtures", "dropout", "output")
    assert [getattr(config, name) for name in fields] == ["pixelcnn++", 160, 5, 3, 10, 0.5, "logistic_mixture"]
    with pytest.raises(pydantic.ValidationError):
        PixelCNNConfig(family="autoregressive", output="softmax")
    with pytest.raises(pydantic.ValidationError):
        PixelCNNConfig(family="autoregressive", filterz=3)
    with pytest.raises(pydantic.ValidationError):
        PixelCNNConfig(family="autoregressive", dropout=1.0)
    with pytest.raises(UserError, match="divisible by 4"):
        PixelCNNModel(config, image_size=30, channels=3)
    with pytest.raises(UserError, match="1 or 3"):
        PixelCNNModel(config, image_size=32, channels=2)
