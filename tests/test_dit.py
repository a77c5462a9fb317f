"""The DiT backbone: shapes, patchify/unpatchify, adaLN-Zero's identity start, attention, and the
parameter counts of the published sizes (built on the meta device: no memory, no compute)."""

from __future__ import annotations

import pytest
import torch

from pipeline import config as config_module
from pipeline import models
from pipeline.models.diffusion import DiffusionConfig, DiffusionModel
from pipeline.models.dit import DIT_SIZES, DiT, sincos_position_table

# The published counts (Peebles & Xie 2023; DiT's train.py prints XL/2's exactly): 32×32×4
# latents, 1000 classes plus the null class, learned sigma (8 output channels), and the frozen
# positional table counted as a parameter.
PUBLISHED = {"S": 33e6, "B": 130e6, "L": 458e6, "XL": 675e6}
PUBLISHED_XL2 = 675_129_632


def meta_dit(size: str, patch: int, **kwargs) -> DiT:
    depth, width, heads = DIT_SIZES[size]
    with torch.device("meta"):
        return DiT(4, 4, 32, patch, depth, width, heads, label_classes=1001, **kwargs)


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_xl2_has_the_published_parameter_count():
    """Ours + the positional table (a buffer here) + the learned-sigma half of the last layer
    (left out here) = DiT-XL/2's 675,129,632 exactly."""
    model = meta_dit("XL", 2)
    width, patch, channels = 1152, 2, 4
    positions = (32 // patch) ** 2 * width
    learned_sigma = width * patch * patch * channels + patch * patch * channels
    assert count(model) + positions + learned_sigma == PUBLISHED_XL2


@pytest.mark.parametrize("size", list(DIT_SIZES))
@pytest.mark.parametrize("patch", [2, 4, 8])
def test_every_published_size_has_its_rounded_count(size, patch):
    assert count(meta_dit(size, patch)) == pytest.approx(PUBLISHED[size], rel=0.01)


@pytest.mark.parametrize("path, size", [("configs/dit_xl2_latent32.yaml", "XL"), ("configs/dit_s2_latent32.yaml", "S")])
def test_latent_configs_validate_and_build_on_the_meta_device(path, size):
    config = config_module.load(path)
    assert config.model.network == "dit" and config.model.dit_size == size and config.model.latent_channels == 4
    with torch.device("meta"):
        model = models.build(config.model, config.data.image_size, config.data.channels)
    assert model.image_shape == (4, 32, 32) and model.num_classes == 1000
    assert count(model) == pytest.approx(PUBLISHED[size], rel=0.01)


def test_a_latent_model_refuses_pixel_batches_with_one_line():
    model = DiffusionModel(DiffusionConfig(network="dit", dit_depth=1, dit_width=16, dit_heads=2,
                                           latent_channels=4, num_classes=3), image_size=8, channels=1)
    with pytest.raises(Exception, match="latent data path"):
        model.loss(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), torch.tensor([0, 1]))


@pytest.mark.parametrize("patch", [1, 2, 4, 8])
def test_shapes_and_unpatchify_inverts_patchify(patch):
    torch.manual_seed(0)
    model = DiT(3, 3, 16, patch, depth=2, width=32, heads=4, label_classes=5)
    x = torch.randn(2, 3, 16, 16)
    assert model(x, torch.tensor([1.0, 900.0]), torch.tensor([0, 4])).shape == (2, 3, 16, 16)
    # Each token's p*p*C values are the patch's pixels in (row, column, channel) order.
    p = patch
    tokens = x.reshape(2, 3, 16 // p, p, 16 // p, p).permute(0, 2, 4, 3, 5, 1).reshape(2, (16 // p) ** 2, p * p * 3)
    assert torch.equal(model.unpatchify(tokens), x)


def test_adaln_zero_starts_every_block_as_the_identity():
    torch.manual_seed(0)
    model = DiT(1, 1, 8, 2, depth=3, width=32, heads=2, label_classes=11)
    x, t, labels = torch.randn(4, 1, 8, 8), torch.tensor([0.0, 10.0, 500.0, 999.0]), torch.tensor([0, 3, 7, 10])
    c = model.condition(t, labels)
    h = model.tokens(x)
    for block in model.blocks:
        assert torch.equal(block(h, c), h)  # zero gates: exactly the input
    assert torch.equal(model(x, t, labels), torch.zeros_like(x))
    # Once the modulation is not zero, the class and the time change the output.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    out = model(x, t, labels)
    assert not torch.allclose(out, model(x, t, torch.tensor([1, 3, 7, 10])))
    assert not torch.allclose(out, model(x, t + 100, labels))


def test_attention_is_softmax_attention_over_all_tokens():
    torch.manual_seed(0)
    block = DiT(1, 1, 8, 2, depth=1, width=16, heads=2).blocks[0].attn
    x = torch.randn(3, 16, 16)
    q, k, v = block.qkv(x).reshape(3, 16, 3, 2, 8).permute(2, 0, 3, 1, 4)
    weights = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1)
    expected = block.proj((weights @ v).transpose(1, 2).reshape(3, 16, 16))
    assert torch.allclose(block(x), expected, atol=1e-5)


def test_positions_are_2d_sine_cosine():
    table = sincos_position_table(8, 3)
    assert table.shape == (9, 8)
    # token (row 1, column 2): first half encodes the row, second the column
    row_part, column_part = table[1 * 3 + 2, :4], table[1 * 3 + 2, 4:]
    assert torch.allclose(row_part, torch.tensor([torch.sin(torch.tensor(1.0)), torch.sin(torch.tensor(0.01)),
                                                  torch.cos(torch.tensor(1.0)), torch.cos(torch.tensor(0.01))]))
    assert torch.allclose(column_part, torch.tensor([torch.sin(torch.tensor(2.0)), torch.sin(torch.tensor(0.02)),
                                                     torch.cos(torch.tensor(2.0)), torch.cos(torch.tensor(0.02))]))


@pytest.mark.parametrize("objective", ["eps", "v", "flow_matching"])
def test_every_objective_trains_the_dit(objective):
    torch.manual_seed(0)
    model = DiffusionModel(DiffusionConfig(network="dit", dit_depth=1, dit_width=16, dit_heads=2, patch_size=4,
                                           objective=objective, timesteps=20, sample_steps=2, num_classes=3),
                           image_size=8, channels=1)
    loss, metrics = model.loss(torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and set(metrics) == {"mse", "mse_q0", "mse_q1", "mse_q2", "mse_q3"}
    model.eval()
    images = model.sample(3, torch.Generator().manual_seed(0), labels=torch.tensor([2, 1, 0]), guidance=2.0)
    assert images.shape == (3, 1, 8, 8) and images.dtype == torch.uint8
