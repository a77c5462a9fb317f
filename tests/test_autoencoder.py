"""The autoencoder family (latent diffusion's first stage): shapes and the downsampling factor,
encode/decode, a finite loss that trains, the bits/dim bound and held-out PSNR/KL. Tiny, CPU."""

from __future__ import annotations

import pytest
import torch

from pipeline.errors import UserError
from pipeline.models import build
from pipeline.models.autoencoder import AutoencoderConfig, AutoencoderModel, psnr_from_mse

TINY = dict(base_channels=8, channel_mult=[1, 2, 2], latent_channels=4, norm_groups=4)


def _model(**overrides) -> AutoencoderModel:
    torch.manual_seed(0)
    return AutoencoderModel(AutoencoderConfig(**{**TINY, **overrides}), image_size=16, channels=1)


def _batch(n: int = 4) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 1, 16, 16), generator=generator, dtype=torch.uint8)


def test_shapes_factor_and_round_trip():
    model = _model()
    assert model.config.downsampling == 4 and model.latent_shape == (4, 4, 4)
    assert _model(channel_mult=[1, 2, 2, 2]).latent_shape == (4, 2, 2)
    mean, logvar = model.encode(_batch())
    assert mean.shape == logvar.shape == (4, 4, 4, 4)
    assert model.decode(mean).shape == (4, 1, 16, 16)
    assert model.reconstruct(_batch()).dtype == torch.uint8
    assert model.sample(3, torch.Generator().manual_seed(0)).shape == (3, 1, 16, 16)
    with pytest.raises(UserError, match="does not divide image_size"):
        AutoencoderModel(AutoencoderConfig(**TINY), image_size=18, channels=1)


def test_registered_and_loss_trains():
    model = build(AutoencoderConfig(**TINY), image_size=16, channels=1)
    batch = _batch(8)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(30):
        loss, metrics = model.loss(batch)
        assert torch.isfinite(loss) and set(metrics) == {"rec", "kl", "psnr"}
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < first
    assert model.recon_mse.item() != 0.01  # the running decoder variance moved


def test_bits_per_dim_and_held_out_metrics():
    model = _model().eval()
    batch = _batch()
    bits = model.bits_per_dim(batch)
    assert bits.shape == (4,) and torch.isfinite(bits).all() and (bits > 0).all()
    metrics = model.held_out_metrics(batch)
    assert set(metrics) == {"psnr", "kl"}
    assert metrics["psnr"].shape == metrics["kl"].shape == (4,)
    assert (metrics["kl"] >= 0).all()
    # PSNR of the reconstruction against the definition.
    reconstruction = model.reconstruct(batch).float()
    mse = (reconstruction - batch.float()).square().flatten(1).mean(1) / 255.0**2
    assert torch.allclose(metrics["psnr"], 10 * torch.log10(1 / mse), atol=1e-4)
    assert psnr_from_mse(torch.tensor([0.01])).item() == pytest.approx(20.0)


def test_held_out_pass_reports_psnr_and_kl(tmp_path):
    """pipeline.evaluate adds the family's held-out measures (eval/psnr, eval/kl) to the pass."""
    import numpy as np
    from PIL import Image

    from data_prep.writer import Sample, encode_image, write_split
    from pipeline.data import resolve_shards
    from pipeline.evaluate import held_out_evaluation

    generator = np.random.default_rng(0)
    images = [generator.integers(0, 256, (16, 16), dtype=np.uint8) for _ in range(6)]
    write_split(
        (Sample(encode_image(Image.fromarray(image, "L"), "png"), f"test/{i}") for i, image in enumerate(images)),
        tmp_path,
        split="test",
        image_size=16,
        channels=1,
        encoding="png",
        samples_per_shard=4,
        source="test",
    )
    model = _model()
    result = held_out_evaluation(model, resolve_shards(str(tmp_path), "data.eval_shards"), image_size=16,
                                 channels=1, batch_size=4)
    assert result.images == 6 and set(result.metrics) == {"psnr", "kl"}
    batch = torch.from_numpy(np.stack(images))[:, None]
    expected = model.held_out_metrics(batch)
    assert result.metrics["psnr"] == pytest.approx(expected["psnr"].mean().item(), rel=1e-5)
    assert result.metrics["kl"] == pytest.approx(expected["kl"].mean().item(), rel=1e-5)
