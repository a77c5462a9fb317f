"""VAE family: closed-form KL, IWAE vs ELBO, KL warm-up and its checkpointing, free bits, the
trainer interface (loss, bits/dim, sampling) and mixed precision. Tiny sizes, CPU."""

from __future__ import annotations

import pydantic
import pytest
import torch

from pipeline.errors import UserError
from pipeline.models.vae import VAEConfig, VAEModel, gaussian_kl_to_standard, gaussian_log_prob

TINY = dict(hidden_channels=16, downsample_levels=1, res_blocks=1, latent_channels=4, num_mixtures=3)


def _batch(n: int = 4, seed: int = 0, channels: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, 8, 8), generator=generator, dtype=torch.uint8)


def _model(**overrides) -> VAEModel:
    torch.manual_seed(0)
    return VAEModel(VAEConfig(**{**TINY, **overrides}), image_size=8, channels=3)


def test_closed_form_kl_matches_monte_carlo():
    generator = torch.Generator().manual_seed(0)
    mean = torch.randn(2, 3, 2, 2, generator=generator, dtype=torch.float64)
    logvar = torch.randn(2, 3, 2, 2, generator=generator, dtype=torch.float64)
    closed = gaussian_kl_to_standard(mean, logvar).flatten(1).sum(1)
    samples = 20000
    noise = torch.randn(samples, *mean.shape, generator=generator, dtype=torch.float64)
    z = mean + torch.exp(0.5 * logvar) * noise
    z = z.flatten(0, 1)
    repeat = lambda t: t.expand(samples, *t.shape).flatten(0, 1)  # noqa: E731
    log_ratio = gaussian_log_prob(z, repeat(mean), repeat(logvar)) - gaussian_log_prob(z)
    log_ratio = log_ratio.view(samples, 2)
    estimate, stderr = log_ratio.mean(0), log_ratio.std(0) / samples**0.5
    assert ((estimate - closed).abs() < 4 * stderr).all(), (estimate, closed, stderr)


def test_iwae_bound_is_tighter_than_elbo():
    model = _model().eval()
    batch = _batch(4)
    torch.manual_seed(0)
    elbo = torch.stack([model.bits_per_dim(batch) for _ in range(16)]).mean(0)
    torch.manual_seed(1)
    iwae = model.bits_per_dim(batch, iwae_samples=64)
    assert iwae.shape == (4,) and torch.isfinite(iwae).all()
    assert (iwae <= elbo + 1e-3).all(), (iwae, elbo)
    assert model.bits_per_dim_kind == "upper_bound"
    # The config's iwae_samples is the default K.
    default_k = _model(iwae_samples=64).eval()
    torch.manual_seed(1)
    assert torch.allclose(default_k.bits_per_dim(batch), iwae)


def test_kl_warmup_schedule_and_state_dict_round_trip():
    model = _model(kl_warmup_steps=4, beta=0.5).train()
    batch = _batch(2)
    weights = [model.loss(batch)[1]["kl_weight"].item() for _ in range(3)]
    assert weights == pytest.approx([0.0, 0.125, 0.25])

    resumed = _model(kl_warmup_steps=4, beta=0.5)
    resumed.load_state_dict(model.state_dict())
    resumed.train()
    assert [resumed.loss(batch)[1]["kl_weight"].item() for _ in range(3)] == pytest.approx([0.375, 0.5, 0.5])

    resumed.eval()  # evaluation does not advance the schedule
    calls = int(resumed.kl_warmup_calls)
    resumed.loss(batch)
    assert int(resumed.kl_warmup_calls) == calls
    assert _model().train().loss(batch)[1]["kl_weight"].item() == 1.0


def test_free_bits_only_changes_the_objective():
    batch = _batch(2)
    plain, free = _model(), _model(free_bits=10.0)
    torch.manual_seed(0)
    loss_plain, metrics_plain = plain.loss(batch)
    torch.manual_seed(0)
    loss_free, metrics_free = free.loss(batch)
    assert torch.equal(metrics_plain["elbo_bpd"], metrics_free["elbo_bpd"])
    # At init the KL is far below 10 nats per dim, so the clamp raises the objective to the floor.
    latent_dims = 4 * 4 * 4
    nats_to_bpd = 1.0 / (3 * 64 * torch.log(torch.tensor(2.0)))
    expected = metrics_plain["reconstruction_bpd"] + 10.0 * latent_dims * nats_to_bpd
    assert torch.allclose(loss_free, expected, rtol=1e-5)


def test_training_reduces_bits_per_dim_and_sampling():
    model = _model(kl_warmup_steps=2)
    batch = _batch(8)
    model.train()
    loss, metrics = model.loss(batch)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert set(metrics) == {"reconstruction_bpd", "kl_bpd", "elbo_bpd", "kl_weight"}
    assert all(m.dim() == 0 and not m.requires_grad for m in metrics.values())
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name

    def evaluate():
        model.eval()
        torch.manual_seed(123)
        bpd = model.bits_per_dim(batch)
        model.train()
        return bpd

    before = evaluate()
    assert before.shape == (8,) and torch.isfinite(before).all()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(10):
        optimizer.zero_grad()
        model.loss(batch)[0].backward()
        optimizer.step()
    after = evaluate()
    assert after.mean() < before.mean() - 0.05, (before.mean(), after.mean())

    model.eval()
    samples = model.sample(5, torch.Generator().manual_seed(7))
    assert samples.shape == (5, 3, 8, 8) and samples.dtype == torch.uint8
    assert torch.equal(samples, model.sample(5, torch.Generator().manual_seed(7)))
    assert not torch.equal(samples, model.sample(5, torch.Generator().manual_seed(8)))
    assert model.sample(2, torch.Generator().manual_seed(7), temperature=0.5).shape == (2, 3, 8, 8)


def test_mean_option_decodes_the_same_latents_without_pixel_noise():
    """sample(mean=True): the same z as a draw from the same seed (the latents come first), then
    the decoder's mixture mean instead of a draw from it."""
    from pipeline.models.likelihoods import mixture_mean

    model = _model().eval()
    with torch.no_grad():
        mean = model.sample(4, torch.Generator().manual_seed(3), mean=True)
        z = torch.randn((4, *model.latent_shape), generator=torch.Generator().manual_seed(3))
        expected = mixture_mean(model.decoder(z), model.config.num_mixtures, 3)
        drawn = model.sample(4, torch.Generator().manual_seed(3))
        other = model.sample(4, torch.Generator().manual_seed(4), mean=True)
    assert mean.dtype == torch.uint8 and mean.shape == (4, 3, 8, 8)
    assert torch.equal(mean, expected)
    assert not torch.equal(mean, drawn) and not torch.equal(mean, other)


def test_autocast_bfloat16():
    model = _model().train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = model.loss(_batch(4))
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        loss.backward()
        model.eval()
        assert torch.isfinite(model.bits_per_dim(_batch(4), iwae_samples=2)).all()
        assert model.sample(2, torch.Generator().manual_seed(0)).dtype == torch.uint8
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_grayscale_and_config_errors():
    torch.manual_seed(0)
    gray = VAEModel(VAEConfig(**{**TINY, "downsample_levels": 3}), image_size=8, channels=1)
    assert torch.isfinite(gray.loss(_batch(2, channels=1))[0])
    assert gray.sample(1, torch.Generator().manual_seed(0)).shape == (1, 1, 8, 8)
    with pytest.raises(UserError, match="model.downsample_levels"):
        VAEModel(VAEConfig(downsample_levels=2), image_size=6, channels=3)
    with pytest.raises(UserError, match="data.channels"):
        VAEModel(VAEConfig(**TINY), image_size=8, channels=2)
    with pytest.raises(pydantic.ValidationError):
        VAEConfig(latent_channels=0)
    with pytest.raises(pydantic.ValidationError):
        VAEConfig(kl_warmup=10)  # misspelt key
    with pytest.raises(UserError, match="sampling options"):
        gray.sample(1, torch.Generator(), steps=3)
