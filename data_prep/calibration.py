"""Known-entropy images: a data set whose exact log-likelihood is computable, for calibration.

A trained model's held-out bits/dim says little on its own: is 3.9 good? Here it has a floor. The
data are a uniform mixture of K smooth prototype images μ_1..μ_K (C×H×W, values on the 8-bit
scale) plus independent Gaussian noise on every subpixel, rounded to the nearest level and clipped
at 0 and 255:

    k ~ U{1..K},   x_d = clip(round(μ_{k,d} + σ n_d), 0, 255),   n_d ~ N(0, 1) independently,

so each subpixel given the component is a discretised Gaussian whose tails are folded into the
end bins (the "discretised Gaussian" of Ho et al. 2020, eq. 13, on the 0..255 grid):

    P(v | k, d) = Φ((v + ½ − μ_{k,d}) / σ) − Φ((v − ½ − μ_{k,d}) / σ),   0 < v < 255,
    P(0 | k, d) = Φ((½ − μ_{k,d}) / σ),     P(255 | k, d) = 1 − Φ((254½ − μ_{k,d}) / σ),

and the exact log-likelihood of an image is a log-sum-exp over the components,

    log p(x) = log Σ_k (1/K) Π_d P(x_d | k, d).

The entropy in bits/dim, H = E[−log₂ p(x)] / D with D = C·H·W, is then a Monte-Carlo average
of exact per-image values over fresh samples (`entropy_bits_per_dim`, with its standard error);
with many samples the standard error is far below anything a model can resolve. Since the
components barely overlap in D dimensions, H ≈ (log₂ K + Σ_d mean_k H(P(· | k, d))) / D, which
`conditional_entropy_bits` computes independently for a check.

Prototypes are low-frequency random fields (`prototype_images`): each channel is a sum of
cosines of the 2-D DCT-II basis up to `frequencies` per axis with N(0, 1/(1 + u² + v²))
coefficients, plus a field shared by the channels (so colours are correlated, as in photographs),
scaled so that the extreme values over all prototypes reach ±`amplitude` around 127.5. With the
default amplitude of 130 a few subpixels of the brightest and darkest regions clip, so the end
bins' folded tails are exercised. The fields are defined in continuous coordinates, so the same
seed gives the same prototypes sampled at any image size.

For the diffusion family, `posterior_mean_x0` gives the Bayes-optimal denoiser of this data,
E[x_0 | x_t] for x_t = √ᾱ x_0 + √(1 − ᾱ) ε with x_0 the image on [−1, 1] (exact for the discrete
data: a posterior over the components and, per subpixel, over the levels). Plugged into the
variational bound as ε(x_t, t) it gives the bound of the best possible noise predictor under the
model's fixed reverse variances: how close the DDPM bound can get to the entropy at all.

``python -m data_prep.calibration OUT`` writes ``OUT/train`` and ``OUT/test`` (WebDataset shards
and manifests, by `data_prep.writer`, lossless PNG) and ``OUT/calibration.json`` (the parameters,
the entropy with its standard error, and the exact mean −log₂ p(x)/D of the held-out images).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data_prep.writer import Sample, StagedOutput, encode_image, write_split

INFO_NAME = "calibration.json"
_TRAIN_SEED_OFFSET, _TEST_SEED_OFFSET, _ENTROPY_SEED_OFFSET = 1, 2, 3
_WINDOW_SIGMAS = 8.0  # posterior_mean_x0 sums over levels within ±8σ of a prototype value


@dataclass(frozen=True)
class CalibrationSpec:
    """Everything that defines the data distribution (the seed fixes the prototypes)."""

    image_size: int = 16
    channels: int = 3
    prototypes: int = 8
    """K, the number of mixture components (equally likely)."""
    sigma: float = 4.0
    """Standard deviation of the per-subpixel noise, in 8-bit levels."""
    amplitude: float = 130.0
    """The prototypes' extreme values are 127.5 ± amplitude (over all prototypes)."""
    frequencies: int = 3
    """DCT frequencies per axis in the prototypes' fields (0..frequencies-1)."""
    seed: int = 0

    @property
    def dims(self) -> int:
        return self.channels * self.image_size * self.image_size


def prototype_images(spec: CalibrationSpec) -> np.ndarray:
    """The K prototypes μ_k, float64 [K, C, H, W] on the 8-bit scale (may exceed [0, 255] a
    little at the extremes: those subpixels clip)."""
    rng = np.random.default_rng(spec.seed)
    f = spec.frequencies
    u = np.arange(f).reshape(-1, 1)
    v = np.arange(f).reshape(1, -1)
    std = 1.0 / np.sqrt(1.0 + u**2 + v**2)
    # Coefficients drawn before anything depends on the image size, so every size shares them.
    shared = rng.standard_normal((spec.prototypes, 1, f, f)) * std
    own = rng.standard_normal((spec.prototypes, spec.channels, f, f)) * std
    coefficients = shared + 0.6 * own
    # DCT-II basis on the pixel centres (i + ½) / size of the unit square.
    centres = (np.arange(spec.image_size) + 0.5) / spec.image_size
    basis = np.cos(np.pi * np.arange(f).reshape(-1, 1) * centres.reshape(1, -1))  # [f, size]
    fields = np.einsum("kcuv,ui,vj->kcij", coefficients, basis, basis)
    fields -= fields.mean()
    extreme = np.abs(fields).max()
    return 127.5 + (spec.amplitude / extreme * fields if extreme > 0 else fields)


def sample_images(spec: CalibrationSpec, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` images uint8 [N, C, H, W] and their components [N], from the seed alone."""
    means = prototype_images(spec)
    rng = np.random.default_rng(seed)
    components = rng.integers(spec.prototypes, size=count)
    noise = rng.standard_normal((count, spec.channels, spec.image_size, spec.image_size))
    values = np.rint(means[components] + spec.sigma * noise)
    return np.clip(values, 0, 255).astype(np.uint8), components


def _log_ndtr_difference(upper: torch.Tensor, lower: torch.Tensor) -> torch.Tensor:
    """log(Φ(upper) − Φ(lower)), upper > lower, float64, accurate in both tails: subtract in the
    left tail (Φ(u) − Φ(l) = Φ(−l) − Φ(−u) when u + l > 0), in log form."""
    flip = (upper + lower) > 0
    a = torch.special.log_ndtr(torch.where(flip, -lower, upper))
    b = torch.special.log_ndtr(torch.where(flip, -upper, lower))
    return a + torch.log(-torch.expm1(b - a))


def level_log_probs(levels: torch.Tensor, means: torch.Tensor, sigma: float) -> torch.Tensor:
    """log P(v | μ) of the discretised, clipped Gaussian, elementwise (broadcasting), float64."""
    levels, means = levels.double(), means.double()
    inf = torch.tensor(math.inf, dtype=torch.float64, device=levels.device)
    upper = torch.where(levels >= 255, inf, (levels + 0.5 - means) / sigma)
    lower = torch.where(levels <= 0, -inf, (levels - 0.5 - means) / sigma)
    return _log_ndtr_difference(upper, lower)


def log_prob(spec: CalibrationSpec, images: np.ndarray | torch.Tensor, chunk: int = 256
             ) -> np.ndarray:
    """Exact log p(x) in nats per image, float64 [N], for uint8 images [N, C, H, W]."""
    images = torch.as_tensor(np.asarray(images))
    if images.shape[1:] != (spec.channels, spec.image_size, spec.image_size):
        raise ValueError(f"images must be [N, {spec.channels}, {spec.image_size}, "
                         f"{spec.image_size}], got {tuple(images.shape)}")
    means = torch.from_numpy(prototype_images(spec)).flatten(1)  # [K, D]
    out = []
    for start in range(0, images.shape[0], chunk):
        x = images[start:start + chunk].flatten(1).double()  # [n, D]
        per_component = level_log_probs(x[:, None, :], means[None], spec.sigma).sum(-1)  # [n, K]
        out.append(torch.logsumexp(per_component, dim=1) - math.log(spec.prototypes))
    return torch.cat(out).numpy()


def bits_per_dim(spec: CalibrationSpec, images) -> np.ndarray:
    """Exact −log₂ p(x) / D per image [N]."""
    return -log_prob(spec, images) / (spec.dims * math.log(2.0))


def entropy_bits_per_dim(spec: CalibrationSpec, samples: int = 20_000, seed: int | None = None
                         ) -> tuple[float, float]:
    """(H, its standard error): the Monte-Carlo mean of the exact −log₂ p(x)/D over `samples`
    fresh images (seeded apart from the train and test splits) and std / √samples."""
    seed = spec.seed * 10 + _ENTROPY_SEED_OFFSET if seed is None else seed
    images, _ = sample_images(spec, samples, seed)
    values = bits_per_dim(spec, images)
    return float(values.mean()), float(values.std(ddof=1) / math.sqrt(samples))


def conditional_entropy_bits(spec: CalibrationSpec) -> float:
    """(log₂ K + Σ_d mean_k H(P(· | k, d))) / D: the entropy when the components do not overlap
    (an upper bound on H in general, by H(x) = H(k) + H(x | k) − H(k | x)), by summing every
    level's probability: an independent check of the Monte-Carlo entropy."""
    means = torch.from_numpy(prototype_images(spec)).flatten(1)  # [K, D]
    levels = torch.arange(256, dtype=torch.float64).view(256, 1, 1)
    log_p = level_log_probs(levels, means[None], spec.sigma)  # [256, K, D]
    per_subpixel = -(log_p.exp() * log_p).sum(0)  # nats [K, D]
    nats = math.log(spec.prototypes) + per_subpixel.sum(1).mean().item()
    return nats / (spec.dims * math.log(2.0))


# --- the Bayes-optimal denoiser (for the diffusion bound's floor) ------------------------------


class PosteriorMean:
    """E[x_0 | x_t] under this data for x_t = √ᾱ x_0 + √(1 − ᾱ) ε, x_0 = v / 127.5 − 1 on [−1, 1].

    p(x_0 | x_t) ∝ Σ_k (1/K) Π_d P(x_0,d | k, d) N(x_t,d; √ᾱ x_0,d, 1 − ᾱ): a posterior
    w_k(x_t) over components, from the per-subpixel evidences Σ_v P(v | k, d) N(x_t,d; √ᾱ s_v, 1 − ᾱ),
    and per subpixel a posterior over levels. Levels beyond ±8σ of μ_{k,d} (probability < 1e-15)
    are left out of the sums. Float64 throughout.
    """

    def __init__(self, spec: CalibrationSpec, device: torch.device | str = "cpu"):
        self.spec = spec
        means = torch.from_numpy(prototype_images(spec)).flatten(1)  # [K, D]
        low = (means - _WINDOW_SIGMAS * spec.sigma).floor().clamp(0, 255)
        high = (means + _WINDOW_SIGMAS * spec.sigma).ceil().clamp(0, 255)
        width = int((high - low).max().item()) + 1
        levels = low[..., None] + torch.arange(width, dtype=torch.float64)  # [K, D, L]
        valid = levels <= high[..., None]
        log_p = level_log_probs(levels.clamp(max=255), means[..., None], spec.sigma)
        self.log_p = torch.where(valid, log_p, torch.tensor(-math.inf, dtype=torch.float64)).to(device)
        self.values = (levels.clamp(max=255) / 127.5 - 1.0).to(device)  # [K, D, L]
        self.log_weight = -math.log(spec.prototypes)

    def __call__(self, x_t: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
        """E[x_0 | x_t] [N, C, H, W] (float64) for x_t [N, C, H, W] and ᾱ per image [N]."""
        shape = x_t.shape
        x = x_t.double().flatten(1)[:, None, :, None]  # [N, 1, D, 1]
        a = alpha_bar.double().view(-1, 1, 1, 1)
        log_likelihood = -0.5 * (x - a.sqrt() * self.values[None]) ** 2 / (1 - a)  # [N, K, D, L]
        joint = self.log_p[None] + log_likelihood
        evidence = torch.logsumexp(joint, dim=-1)  # [N, K, D] (up to a constant shared by all k)
        level_posterior = torch.softmax(joint, dim=-1)
        component_mean = (level_posterior * self.values[None]).sum(-1)  # [N, K, D]
        component_posterior = torch.softmax(evidence.sum(-1) + self.log_weight, dim=1)  # [N, K]
        return (component_posterior[..., None] * component_mean).sum(1).view(shape)


def oracle_eps_fn(spec: CalibrationSpec, schedule, chunk: int = 64):
    """ε(x_t, t) of the Bayes-optimal denoiser, (x_t − √ᾱ_t E[x_0 | x_t]) / √(1 − ᾱ_t), for
    `pipeline.models.diffusion`'s bound and samplers (``schedule``: its `NoiseSchedule`)."""
    posterior = PosteriorMean(spec, schedule.alpha_bar.device)

    def eps(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha_bar = schedule.alpha_bar[t].double()
        out = []
        for start in range(0, x_t.shape[0], chunk):
            rows = slice(start, start + chunk)
            x0 = posterior(x_t[rows], alpha_bar[rows])
            a = alpha_bar[rows].view(-1, 1, 1, 1)
            out.append((x_t[rows].double() - a.sqrt() * x0) / (1 - a).sqrt())
        return torch.cat(out).float()

    return eps


# --- shards ------------------------------------------------------------------------------------


def _samples(spec: CalibrationSpec, images: np.ndarray, split: str) -> list[Sample]:
    mode = "L" if spec.channels == 1 else "RGB"
    samples = []
    for index, image in enumerate(images):
        array = image[0] if spec.channels == 1 else image.transpose(1, 2, 0)
        samples.append(Sample(image=encode_image(Image.fromarray(array, mode=mode), "png"),
                              source=f"calibration/{split}/{index}"))
    return samples


def write_data(out: str | Path, spec: CalibrationSpec, *, train: int, test: int,
               entropy_samples: int = 20_000, samples_per_shard: int = 256,
               overwrite: bool = False) -> dict:
    """Write ``OUT/train``, ``OUT/test`` (shards + manifests, PNG) and ``OUT/calibration.json``;
    return what the JSON holds: the spec, the entropy H ± its standard error (bits/dim), the
    exact mean −log₂ p(x)/D of the held-out images ± its standard error, and the fraction of
    subpixels at 0 or 255."""
    out = Path(out)
    staged = StagedOutput(out, ("train", "test"), overwrite)
    try:
        splits = {"train": sample_images(spec, train, spec.seed * 10 + _TRAIN_SEED_OFFSET)[0],
                  "test": sample_images(spec, test, spec.seed * 10 + _TEST_SEED_OFFSET)[0]}
        for split, images in splits.items():
            write_split(_samples(spec, images, split), staged.path(split), split=split,
                        image_size=spec.image_size, channels=spec.channels, encoding="png",
                        samples_per_shard=samples_per_shard, source=f"calibration seed {spec.seed}")
        staged.commit()
    except BaseException:
        staged.discard()
        raise
    entropy, entropy_stderr = entropy_bits_per_dim(spec, entropy_samples)
    held_out = bits_per_dim(spec, splits["test"])
    info = {
        "spec": asdict(spec),
        "dims": spec.dims,
        "entropy_bits_per_dim": entropy,
        "entropy_stderr": entropy_stderr,
        "entropy_samples": entropy_samples,
        "entropy_non_overlapping_bits_per_dim": conditional_entropy_bits(spec),
        "held_out_images": test,
        "held_out_bits_per_dim": float(held_out.mean()),
        "held_out_stderr": float(held_out.std(ddof=1) / math.sqrt(test)) if test > 1 else None,
        "train_images": train,
        "clipped_fraction": float(np.isin(splits["test"], (0, 255)).mean()),
    }
    (out / INFO_NAME).write_text(json.dumps(info, indent=1) + "\n")
    return info


def read_info(out: str | Path) -> dict:
    """``OUT/calibration.json`` as written by `write_data` (with ``spec`` a `CalibrationSpec`)."""
    info = json.loads((Path(out) / INFO_NAME).read_text())
    info["spec"] = CalibrationSpec(**info["spec"])
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_prep.calibration",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("out", metavar="OUT")
    defaults = CalibrationSpec()
    parser.add_argument("--size", type=int, default=defaults.image_size)
    parser.add_argument("--channels", type=int, choices=(1, 3), default=defaults.channels)
    parser.add_argument("--prototypes", type=int, default=defaults.prototypes)
    parser.add_argument("--sigma", type=float, default=defaults.sigma, help="noise std in levels")
    parser.add_argument("--amplitude", type=float, default=defaults.amplitude)
    parser.add_argument("--frequencies", type=int, default=defaults.frequencies)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--train", type=int, default=8192, help="training images")
    parser.add_argument("--test", type=int, default=1024, help="held-out images")
    parser.add_argument("--entropy-samples", type=int, default=20_000)
    parser.add_argument("--samples-per-shard", type=int, default=256)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    spec = CalibrationSpec(image_size=args.size, channels=args.channels, prototypes=args.prototypes,
                           sigma=args.sigma, amplitude=args.amplitude,
                           frequencies=args.frequencies, seed=args.seed)
    info = write_data(args.out, spec, train=args.train, test=args.test,
                      entropy_samples=args.entropy_samples,
                      samples_per_shard=args.samples_per_shard, overwrite=args.overwrite)
    json.dump(info, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
