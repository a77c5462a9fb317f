"""The known-entropy data set (data_prep/calibration.py): its likelihood is right.

Everything the calibration test (tests/test_calibration.py) compares models against comes from
here, so it is checked against independent computations: each subpixel's level probabilities
against the error function and against the sampler's own frequencies (clipped tails included),
the mixture's normalisation over every possible image of a one-subpixel data set, the Monte-Carlo
entropy against the exact sum, the shards against the images the entropy was computed on, and the
Bayes-optimal denoiser against brute force.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from data_prep import calibration as cal


def _erf_level_probability(level: int, mean: float, sigma: float) -> float:
    """P(level) of round(mean + sigma n) clipped to [0, 255], from math.erfc (independent code;
    the upper tail Q(y) = erfc(y / sqrt 2) / 2, mirrored below the mean so no digits cancel)."""
    upper = math.inf if level == 255 else (level + 0.5 - mean) / sigma
    lower = -math.inf if level == 0 else (level - 0.5 - mean) / sigma
    tail = lambda y: 0.5 * math.erfc(y / math.sqrt(2.0))  # noqa: E731  P(n > y)
    if upper + lower > 0:
        return tail(lower) - tail(upper)
    return tail(-upper) - tail(-lower)


@pytest.mark.parametrize("mean", [-2.5, 0.3, 17.0, 127.5, 200.2, 254.9, 257.5])
def test_level_probabilities_match_erf_and_sum_to_one(mean):
    levels = torch.arange(256, dtype=torch.float64)
    log_p = cal.level_log_probs(levels, torch.tensor(mean, dtype=torch.float64), 4.0)
    probabilities = log_p.exp().numpy()
    assert probabilities.sum() == pytest.approx(1.0, abs=1e-12)
    for level in (0, 1, int(round(min(max(mean, 0), 255))), 254, 255):
        expected = _erf_level_probability(level, mean, 4.0)
        assert probabilities[level] == pytest.approx(expected, rel=1e-9, abs=1e-300)


def test_sampler_frequencies_match_the_probabilities_at_the_clipped_edge():
    # One prototype; its most extreme subpixel is 127.5 ± 130, beyond the end level, where
    # about 69% of the mass folds into the end bin.
    spec = cal.CalibrationSpec(image_size=4, channels=1, prototypes=1, amplitude=130.0)
    prototype = cal.prototype_images(spec).reshape(-1)
    extreme = int(np.abs(prototype - 127.5).argmax())
    mean = float(prototype[extreme])
    edge = 0 if mean < 127.5 else 255
    assert abs(mean - 127.5) == pytest.approx(130.0)
    images, components = cal.sample_images(spec, 100_000, seed=5)
    assert (components == 0).all()
    counts = np.bincount(images.reshape(len(images), -1)[:, extreme], minlength=256)
    probabilities = cal.level_log_probs(torch.arange(256.0), torch.tensor(mean), spec.sigma).exp().numpy()
    expected = probabilities * len(images)
    seen = expected > 50
    assert seen.sum() >= 5 and probabilities[edge] > 0.5
    # Poisson noise: 5 standard deviations on every well-populated level.
    assert np.all(np.abs(counts[seen] - expected[seen]) < 5 * np.sqrt(expected[seen]))
    assert counts[~seen].sum() < 5 * max(expected[~seen].sum(), 1)


def test_mixture_normalises_over_every_image():
    # A one-subpixel data set has only 256 possible images: their probabilities must sum to 1.
    spec = cal.CalibrationSpec(image_size=1, channels=1, prototypes=3, sigma=7.0, amplitude=100.0, seed=3)
    every_image = np.arange(256, dtype=np.uint8).reshape(256, 1, 1, 1)
    total = np.exp(cal.log_prob(spec, every_image)).sum()
    assert total == pytest.approx(1.0, abs=1e-12)
    # Its exact entropy, and the Monte-Carlo estimate within 4 standard errors of it.
    probabilities = np.exp(cal.log_prob(spec, every_image))
    exact = -(probabilities * np.log2(probabilities)).sum()
    estimate, stderr = cal.entropy_bits_per_dim(spec, samples=20_000, seed=1)
    assert abs(estimate - exact) < 4 * stderr, (estimate, stderr, exact)


def test_entropy_of_separated_components_is_log_k_plus_the_conditional_entropy():
    spec = cal.CalibrationSpec(image_size=4, channels=3, prototypes=4)
    estimate, stderr = cal.entropy_bits_per_dim(spec, samples=4000)
    assert stderr < 0.01
    # The components do not overlap in 48 dimensions, so H = log2 K + H(x | k) per image.
    assert abs(estimate - cal.conditional_entropy_bits(spec)) < 4 * stderr


def test_prototypes_are_the_same_fields_at_every_size():
    small = cal.prototype_images(cal.CalibrationSpec(image_size=8))
    large = cal.prototype_images(cal.CalibrationSpec(image_size=16))
    assert small.shape == (8, 3, 8, 8) and large.shape == (8, 3, 16, 16)
    # The extremes are ±amplitude around 127.5 at each size (normalised per size) and both are
    # smooth: neighbouring pixels differ by far less than the range.
    for fields in (small, large):
        assert fields.max() - fields.min() > 200
    assert np.abs(np.diff(large, axis=-1)).mean() < 15


def test_shards_hold_the_images_whose_likelihood_is_reported(tmp_path):
    from pipeline.data import eval_batches
    from pipeline.shards import resolve_shards

    spec = cal.CalibrationSpec(image_size=8, channels=3, prototypes=2)
    info = cal.write_data(tmp_path / "data", spec, train=40, test=30, entropy_samples=500,
                          samples_per_shard=16)
    assert info["held_out_images"] == 30 and info["dims"] == 192
    assert cal.read_info(tmp_path / "data")["spec"] == spec
    shards = resolve_shards(str(tmp_path / "data" / "test"))
    images = torch.cat(list(eval_batches(shards, rank=0, world_size=1, num_workers=0, batch_size=8,
                                         image_size=8, channels=3)))
    assert images.shape == (30, 3, 8, 8) and images.dtype == torch.uint8
    assert cal.bits_per_dim(spec, images.numpy()).mean() == pytest.approx(info["held_out_bits_per_dim"], abs=1e-12)
    written, _ = cal.sample_images(spec, 30, spec.seed * 10 + 2)
    assert sorted(map(bytes, images.numpy())) == sorted(map(bytes, written))


def test_posterior_mean_matches_brute_force():
    spec = cal.CalibrationSpec(image_size=1, channels=3, prototypes=3, sigma=3.0, seed=2)
    posterior = cal.PosteriorMean(spec)
    means = torch.from_numpy(cal.prototype_images(spec)).reshape(3, 3)  # [K, D]
    levels = torch.arange(256, dtype=torch.float64)
    log_p = cal.level_log_probs(levels.view(1, 1, -1), means[..., None], spec.sigma)  # [K, D, 256]
    values = levels / 127.5 - 1
    generator = torch.Generator().manual_seed(0)
    images, _ = cal.sample_images(spec, 4, seed=3)
    x0 = torch.from_numpy(images).double() / 127.5 - 1
    for alpha_bar in (0.99999, 0.9999, 0.95, 0.5, 0.01):
        # x_t as the bound draws it: from q(x_t | x_0) with x_0 from the data.
        noise = torch.randn(4, 3, 1, 1, generator=generator, dtype=torch.float64)
        x_t = math.sqrt(alpha_bar) * x0 + math.sqrt(1 - alpha_bar) * noise
        got = posterior(x_t, torch.full((4,), alpha_bar, dtype=torch.float64))
        for row in range(4):
            x = x_t[row].view(3)
            # Every (component, level triple) is too many; the subpixels are independent given
            # the component, so sum per subpixel, then over components.
            log_lik = -0.5 * (x.view(1, 3, 1) - math.sqrt(alpha_bar) * values) ** 2 / (1 - alpha_bar)
            joint = log_p + log_lik  # [K, D, 256]
            evidence = torch.logsumexp(joint, -1).sum(-1)  # [K]
            weights = torch.softmax(evidence, 0)
            per_component = (torch.softmax(joint, -1) * values).sum(-1)  # [K, D]
            expected = (weights[:, None] * per_component).sum(0)
            assert torch.allclose(got[row].view(3), expected, atol=1e-9), (alpha_bar, row)


def test_posterior_mean_limits():
    spec = cal.CalibrationSpec(image_size=4, channels=1, prototypes=2)
    posterior = cal.PosteriorMean(spec)
    images, _ = cal.sample_images(spec, 3, seed=1)
    x0 = torch.from_numpy(images).double() / 127.5 - 1
    # Almost no noise: the posterior mean is the image itself.
    nearly_clean = posterior(math.sqrt(1 - 1e-10) * x0, torch.full((3,), 1 - 1e-10, dtype=torch.float64))
    assert torch.allclose(nearly_clean, x0, atol=1e-6)
    # Almost only noise: the data's mean, whatever x_t.
    levels = torch.arange(256, dtype=torch.float64)
    means = torch.from_numpy(cal.prototype_images(spec))[..., None]
    expected_level = (cal.level_log_probs(levels, means, spec.sigma).exp() * levels).sum(-1)
    prior_mean = expected_level.mean(0) / 127.5 - 1
    noisy = posterior(torch.randn(3, 1, 4, 4, dtype=torch.float64), torch.full((3,), 1e-14, dtype=torch.float64))
    assert torch.allclose(noisy, prior_mean.expand_as(noisy), atol=1e-5)
