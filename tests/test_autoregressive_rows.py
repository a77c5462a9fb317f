"""The autoregressive family's cached-row sampler (pipeline/models/autoregressive_rows.py) against
the full-pass reference: the same network outputs at every pixel, the same images from the same
seed, and a fraction of the reference's arithmetic."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.models.autoregressive import PixelCNNConfig, PixelCNNModel
from pipeline.models.autoregressive_rows import CachedRows
from pipeline.models.base import to_unit_interval

NETWORKS = {
    "pixelcnn++ grey, 3 stages": (dict(network="pixelcnn++", num_resnet=1, num_stages=3), 8, 1),
    "pixelcnn++ rgb, 2 resnets": (dict(network="pixelcnn++", num_resnet=2, num_stages=2), 8, 3),
    "pixelcnn++ conditional": (dict(network="pixelcnn++", num_resnet=1, num_stages=2, num_classes=3), 8, 1),
    "pixelcnn rgb mixture": (dict(network="pixelcnn", num_resnet=1, num_stages=2), 6, 3),
    "pixelcnn softmax": (dict(network="pixelcnn", output="softmax", num_resnet=1, num_stages=2), 6, 1),
    "pixelcnn conditional": (dict(network="pixelcnn", num_resnet=2, num_stages=1, num_classes=3), 6, 3),
}


def model(settings: dict, size: int, channels: int, dtype=torch.float32) -> PixelCNNModel:
    torch.manual_seed(0)
    config = PixelCNNConfig(filters=8, num_mixtures=3, dropout=0.0, **settings)
    built = PixelCNNModel(config, size, channels).to(dtype).eval()
    with torch.no_grad():  # away from the initialisation (class biases start at zero)
        for parameter in built.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    if dtype != torch.float32:  # the reference feeds float32 images to the network
        built.network.register_forward_pre_hook(lambda module, args: (args[0].to(dtype), *args[1:]))
    return built


def labels_for(built: PixelCNNModel, n: int) -> torch.Tensor | None:
    return None if built.num_classes is None else torch.arange(n) % built.num_classes


@pytest.mark.parametrize("name", NETWORKS)
def test_cached_outputs_equal_the_full_pass_at_every_pixel(name):
    """In float64: only the summation order differs, so the outputs agree to rounding."""
    settings, size, channels = NETWORKS[name]
    built = model(settings, size, channels, torch.float64)
    x = torch.randint(0, 256, (3, channels, size, size), generator=torch.Generator().manual_seed(1),
                      dtype=torch.uint8)
    labels = labels_for(built, 3)
    with torch.no_grad():
        full = built.network(to_unit_interval(x).double(), labels)
        rows = CachedRows(built.network, size, labels)
        for i in range(size):
            for j in range(size):
                torch.testing.assert_close(rows.outputs(x, i, j), full[:, :, i : i + 1, j : j + 1],
                                           rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", NETWORKS)
def test_cached_sampler_draws_the_reference_images(name):
    """Same seed, same bytes. In float64, so that a different summation order (a strip instead of
    the whole image) cannot move a logistic draw across a rounding boundary."""
    settings, size, channels = NETWORKS[name]
    built = model(settings, size, channels, torch.float64)
    labels = labels_for(built, 5)
    temperature = 0.8 if channels == 3 else 1.0
    with torch.no_grad():
        reference = built._sample_batch(5, torch.Generator().manual_seed(7), temperature, labels, cached=False)
        cached = built._sample_batch(5, torch.Generator().manual_seed(7), temperature, labels, cached=True)
        through_sample = built.sample(5, torch.Generator().manual_seed(7), labels=labels, temperature=temperature)
    assert reference.float().std() > 10  # real draws, not a constant image
    assert torch.equal(cached, reference)
    assert torch.equal(through_sample, reference)  # sample() takes the cached path


@pytest.mark.parametrize("name", ["pixelcnn++ grey, 3 stages", "pixelcnn rgb mixture"])
def test_cached_sampler_does_a_fraction_of_the_reference_arithmetic(name):
    """Counted, not timed: one row (two at a row's start) instead of H at full resolution, one of
    H/2^l at level l. At H = 8 (6), under 2/H of the reference's floating-point operations."""
    settings, size, channels = NETWORKS[name]
    built = model(settings, size, channels)
    counts = {}
    for cached in (False, True):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            built._sample_batch(2, torch.Generator().manual_seed(0), 1.0, None, cached=cached)
        counts[cached] = counter.get_total_flops()
    assert counts[True] < counts[False] * 2 / size
