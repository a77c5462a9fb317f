"""Sample quality: FID and KID between generated images and a held-out shard set.

A `FeatureExtractor` turns uint8 images into feature vectors. `InceptionFeatures` is the FID
network (Inception-v3 pool3, 2048 features, the TF-ported weights that pytorch-fid and clean-fid
use), loaded from a local file named by ``eval.inception_weights`` (nothing is downloaded);
`RandomConvFeatures` is a small fixed random conv net for smoke tests, whose numbers compare only
with themselves. An extractor's ``id`` includes a hash of its weights, so statistics computed with
other weights are never mistaken for these.

Both sets of features are computed across all processes (each its share of the shards or of the
generated images) and gathered with ``all_gather``; rank 0 computes the numbers. Reference
statistics (mean, covariance and a feature subsample for KID) of a shard set are cached beside its
manifest as ``fid_stats-<extractor id>.npz``, keyed by the shard list and the image count.

- FID (Heusel et al. 2017): ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2(Σ₁Σ₂)^½), computed as pytorch-fid does
  (an ε·I offset when the square root is singular; a negligible imaginary part is dropped).
- KID (Bińkowski et al. 2018): unbiased MMD² with the kernel k(x, y) = (xᵀy / d + 1)³, averaged
  over random subsets, as StyleGAN2-ADA and clean-fid compute it.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pipeline.errors import UserError
from pipeline.files import atomic_write

log = logging.getLogger(__name__)

KID_MAX_FEATURES = 10_000
"""Reference features kept (a fixed random subsample) for KID; the mean and covariance use all."""
EXPECTED_INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
"""pytorch-fid's FID Inception weights (a plain state_dict), or a safetensors copy of it."""


# ---------------------------------------------------------------------------------------------
# Feature extractors


class FeatureExtractor(nn.Module):
    """uint8 images [B, C, H, W] (C = 1 or 3) -> float32 features [B, dims].

    ``id`` names the network and a hash of its weights; it keys cached reference statistics.
    """

    id: str
    dims: int

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 -> float in [0, 1], three channels, on the extractor's device."""
        device = next(self.parameters()).device
        x = images.to(device).float() / 255.0
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return x

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self(self.prepare(images)).float()


def weights_hash(module: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:12]


class RandomConvFeatures(FeatureExtractor):
    """A fixed random conv net (seeded, independent of the global RNG): a stand-in for Inception
    in tests and smoke runs. Its FID/KID values mean nothing next to Inception's."""

    def __init__(self, dims: int = 32, seed: int = 0):
        super().__init__()
        self.dims = dims
        self.net = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.Tanh(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.Tanh(),
            nn.Conv2d(32, dims, 3, stride=1, padding=1),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for parameter in self.net.parameters():
                fan_in = parameter[0].numel() if parameter.dim() > 1 else 1
                parameter.copy_(torch.randn(parameter.shape, generator=generator) / fan_in**0.5)
        self.eval()
        self.id = f"random_conv{dims}-{weights_hash(self)}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(2 * x - 1)


# --- Inception-v3 as in pytorch-fid's FIDInceptionA/C/E_1/E_2 (the TF 2015-12-05 graph) ----------


class _Conv(nn.Module):
    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg3(x):
    # The TF graph averages without the padding (pytorch-fid's count_include_pad=False).
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class _InceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = _Conv(cin, 64, 1)
        self.branch5x5_1 = _Conv(cin, 48, 1)
        self.branch5x5_2 = _Conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _Conv(cin, 64, 1)
        self.branch3x3dbl_2 = _Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _Conv(96, 96, 3, padding=1)
        self.branch_pool = _Conv(cin, pool_features, 1)

    def forward(self, x):
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg3(x)),
        ], 1)


class _InceptionB(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = _Conv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = _Conv(cin, 64, 1)
        self.branch3x3dbl_2 = _Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _Conv(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, stride=2),
        ], 1)


class _InceptionC(nn.Module):
    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = _Conv(cin, 192, 1)
        self.branch7x7_1 = _Conv(cin, c7, 1)
        self.branch7x7_2 = _Conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = _Conv(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = _Conv(cin, c7, 1)
        self.branch7x7dbl_2 = _Conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = _Conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = _Conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = _Conv(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = _Conv(cin, 192, 1)

    def forward(self, x):
        dbl = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                      self.branch7x7dbl_4, self.branch7x7dbl_5):
            dbl = layer(dbl)
        return torch.cat([
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            dbl,
            self.branch_pool(_avg3(x)),
        ], 1)


class _InceptionD(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = _Conv(cin, 192, 1)
        self.branch3x3_2 = _Conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _Conv(cin, 192, 1)
        self.branch7x7x3_2 = _Conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _Conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _Conv(192, 192, 3, stride=2)

    def forward(self, x):
        seven = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), seven, F.max_pool2d(x, 3, stride=2)], 1)


class _InceptionE(nn.Module):
    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool  # the last block of the TF graph max-pools (pytorch-fid's E_2)
        self.branch1x1 = _Conv(cin, 320, 1)
        self.branch3x3_1 = _Conv(cin, 384, 1)
        self.branch3x3_2a = _Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = _Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _Conv(cin, 448, 1)
        self.branch3x3dbl_2 = _Conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = _Conv(cin, 192, 1)

    def forward(self, x):
        three = self.branch3x3_1(x)
        dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg3(x)
        return torch.cat([
            self.branch1x1(x),
            torch.cat([self.branch3x3_2a(three), self.branch3x3_2b(three)], 1),
            torch.cat([self.branch3x3dbl_3a(dbl), self.branch3x3dbl_3b(dbl)], 1),
            self.branch_pool(pooled),
        ], 1)


class InceptionV3Pool3(nn.Module):
    """Inception-v3 up to the 2048-d average pool, parameter names as torchvision/pytorch-fid."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = _Conv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _Conv(32, 32, 3)
        self.Conv2d_2b_3x3 = _Conv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _Conv(64, 80, 1)
        self.Conv2d_4a_3x3 = _Conv(80, 192, 3)
        self.Mixed_5b = _InceptionA(192, 32)
        self.Mixed_5c = _InceptionA(256, 64)
        self.Mixed_5d = _InceptionA(288, 64)
        self.Mixed_6a = _InceptionB(288)
        self.Mixed_6b = _InceptionC(768, 128)
        self.Mixed_6c = _InceptionC(768, 160)
        self.Mixed_6d = _InceptionC(768, 160)
        self.Mixed_6e = _InceptionC(768, 192)
        self.Mixed_7a = _InceptionD(768)
        self.Mixed_7b = _InceptionE(1280, max_pool=False)
        self.Mixed_7c = _InceptionE(2048, max_pool=True)

    def forward(self, x):
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c",
                     "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"):
            x = getattr(self, name)(x)
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


class InceptionFeatures(FeatureExtractor):
    """FID Inception pool3 features from a local weights file (safetensors or a weights-only
    torch file holding the state_dict; the classifier head and aux logits are ignored)."""

    dims = 2048

    def __init__(self, path: str | os.PathLike | None):
        super().__init__()
        path = check_inception_weights(path)
        state = _read_state_dict(path)
        self.net = InceptionV3Pool3()
        ignored = tuple(k for k in state if k.startswith(("fc.", "AuxLogits.")))
        for key in ignored:
            state.pop(key)
        missing, unexpected = self.net.load_state_dict(state, strict=False)
        if missing or unexpected:
            example = (missing or unexpected)[0]
            raise UserError(
                f"eval.inception_weights: {path} is not an Inception-v3 state_dict "
                f"({len(missing)} missing and {len(unexpected)} unexpected keys, e.g. {example!r})"
            )
        self.eval()
        self.id = f"inception-{_file_hash(path)}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # pytorch-fid: bilinear resize to 299 of [0, 1] images, then scale to [-1, 1].
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return self.net(2 * x - 1)


def check_inception_weights(path: str | os.PathLike | None) -> Path:
    """The weights file as a Path, or a one-line UserError naming the file expected."""
    if path is None:
        raise UserError(
            "eval.inception_weights is not set: FID/KID need the FID Inception weights as a local "
            f"file (pytorch-fid's {EXPECTED_INCEPTION_FILE} or a safetensors copy of it)"
        )
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(
            f"eval.inception_weights: {path} does not exist; FID/KID need the FID Inception "
            f"weights there (pytorch-fid's {EXPECTED_INCEPTION_FILE} or a safetensors copy); "
            "they cannot be downloaded here"
        )
    return path


def _file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise UserError(f"eval.inception_weights: cannot read {path}: {str(exc).splitlines()[0]}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UserError(f"eval.inception_weights: {path} does not hold a state_dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def build_extractor(evaluation, device: torch.device | str = "cpu") -> FeatureExtractor:
    """The feature network an `EvalConfig` names, on ``device``."""
    if evaluation.fid_feature_network == "random_conv":
        extractor: FeatureExtractor = RandomConvFeatures()
    else:
        extractor = InceptionFeatures(evaluation.inception_weights)
    return extractor.to(device)


# ---------------------------------------------------------------------------------------------
# Statistics and distances


@dataclass
class FeatureStats:
    mean: np.ndarray  # [d], float64
    cov: np.ndarray  # [d, d], float64
    features: np.ndarray  # [≤ KID_MAX_FEATURES, d] float32 subsample, for KID
    count: int


def feature_stats(features: np.ndarray, seed: int = 0) -> FeatureStats:
    features = np.asarray(features, dtype=np.float64)
    if len(features) < 2:
        raise UserError(f"FID needs at least 2 images (got {len(features)})")
    kept = features
    if len(features) > KID_MAX_FEATURES:
        index = np.random.default_rng(seed).choice(len(features), KID_MAX_FEATURES, replace=False)
        kept = features[np.sort(index)]
    return FeatureStats(features.mean(0), np.cov(features, rowvar=False), kept.astype(np.float32), len(features))


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2(Σ₁Σ₂)^½), as pytorch-fid's calculate_frechet_distance."""
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        log.warning("FID: singular product of covariances; adding %g to the diagonals", eps)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            worst = np.max(np.abs(covmean.imag))
            raise ValueError(f"FID: the covariance square root has an imaginary component {worst:.3g} "
                             "(too few images for the feature dimension?)")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def kernel_inception_distance(
    features1: np.ndarray, features2: np.ndarray, num_subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """(mean, std over subsets) of the unbiased MMD² with kernel (xᵀy/d + 1)³ (StyleGAN2-ADA)."""
    x_all = np.asarray(features1, dtype=np.float64)
    y_all = np.asarray(features2, dtype=np.float64)
    d = x_all.shape[1]
    m = min(len(x_all), len(y_all), subset_size)
    if m < 2:
        raise UserError(f"KID needs at least 2 images in each set (got {len(x_all)} and {len(y_all)})")
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(num_subsets):
        x = x_all[rng.choice(len(x_all), m, replace=False)]
        y = y_all[rng.choice(len(y_all), m, replace=False)]
        a = (x @ x.T / d + 1) ** 3 + (y @ y.T / d + 1) ** 3
        b = (x @ y.T / d + 1) ** 3
        values.append(((a.sum() - np.diag(a).sum()) / (m - 1) - b.sum() * 2 / m) / m)
    return float(np.mean(values)), float(np.std(values))


# ---------------------------------------------------------------------------------------------
# Features across processes


def gather_features(local: torch.Tensor, world_size: int) -> torch.Tensor:
    """Concatenate every process's [n_r, d] features (rank order); sizes may differ by rank."""
    if world_size == 1:
        return local
    device = local.device
    if dist.get_backend() == "gloo" and device.type != "cpu":
        local = local.cpu()
    counts = [torch.zeros(1, dtype=torch.int64, device=local.device) for _ in range(world_size)]
    dist.all_gather(counts, torch.tensor([len(local)], dtype=torch.int64, device=local.device))
    largest = int(max(c.item() for c in counts))
    padded = torch.zeros(largest, local.shape[1], dtype=local.dtype, device=local.device)
    padded[: len(local)] = local
    gathered = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(gathered, padded)
    return torch.cat([g[: int(c.item())] for g, c in zip(gathered, counts)]).to(device)


@torch.no_grad()
def shard_features(extractor: FeatureExtractor, shards, *, image_size: int, channels: int, batch_size: int,
                   rank: int = 0, world_size: int = 1, max_images: int | None = None) -> torch.Tensor:
    """This process's features of its share of ``shards`` (``shards.urls[rank::world_size]``)."""
    from pipeline.data import eval_batches

    loader = eval_batches(shards, rank=rank, world_size=world_size, num_workers=0, batch_size=batch_size,
                          image_size=image_size, channels=channels, max_images=max_images)
    parts = [extractor.features(batch) for batch in loader]
    device = next(extractor.parameters()).device
    return torch.cat(parts) if parts else torch.zeros(0, extractor.dims, device=device)


def images_for_rank(total: int, rank: int, world_size: int) -> int:
    return total // world_size + (rank < total % world_size)


@torch.no_grad()
def sample_features(model, extractor: FeatureExtractor, total: int, *, batch_size: int, seed: int,
                    rank: int = 0, world_size: int = 1, autocast=None, **sample_options) -> torch.Tensor:
    """This process's features of its share of ``total`` generated images (seeded per rank).
    ``autocast``: a callable returning the context to sample in (e.g. ``torch.autocast``)."""
    import contextlib

    count = images_for_rank(total, rank, world_size)
    generator = torch.Generator().manual_seed(int.from_bytes(
        hashlib.sha256(repr(("fid", seed, rank)).encode()).digest()[:4], "little"))
    was_training = model.training
    model.eval()
    parts = []
    try:
        done = 0
        while done < count:
            n = min(batch_size, count - done)
            with autocast() if autocast is not None else contextlib.nullcontext():
                generated = model.sample(n, generator, **sample_options)
            parts.append(extractor.features(generated))
            done += n
    finally:
        model.train(was_training)
    device = next(extractor.parameters()).device
    return torch.cat(parts) if parts else torch.zeros(0, extractor.dims, device=device)


# ---------------------------------------------------------------------------------------------
# Cached reference statistics


def stats_cache_path(shards, extractor_id: str) -> Path | None:
    """``<split dir>/fid_stats-<extractor id>.npz`` beside the manifest; other shard lists get a
    name with a hash of their URLs beside the first shard; ``pipe:`` and remote (``s3://``,
    ``https://``...) shards are not cached."""
    first = shards.urls[0]
    if first.startswith("pipe:") or "://" in first:
        return None
    directory = Path(first).parent
    if shards.manifest is not None and (directory / "manifest.json").is_file():
        return directory / f"fid_stats-{extractor_id}.npz"
    urls = hashlib.sha256("\n".join(shards.urls).encode()).hexdigest()[:8]
    return directory / f"fid_stats-{extractor_id}-{urls}.npz"


def _cache_key(shards, extractor_id: str, max_images: int | None) -> str:
    sizes = [os.path.getsize(u) if not u.startswith("pipe:") and os.path.isfile(u) else None for u in shards.urls]
    return json.dumps({"extractor": extractor_id, "max_images": max_images,
                       "shards": [Path(u).name for u in shards.urls], "bytes": sizes}, sort_keys=True)


def load_cached_stats(path: Path | None, key: str) -> FeatureStats | None:
    if path is None or not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["key"]) != key:
                return None
            return FeatureStats(data["mean"], data["cov"], data["features"], int(data["count"]))
    except (OSError, KeyError, ValueError) as exc:
        log.warning("ignoring unreadable FID statistics %s (%s)", path, exc)
        return None


def save_cached_stats(path: Path | None, key: str, stats: FeatureStats) -> None:
    if path is None:
        return
    buffer = io.BytesIO()
    np.savez(buffer, key=np.array(key), mean=stats.mean, cov=stats.cov, features=stats.features,
             count=np.array(stats.count))
    try:
        atomic_write(path, buffer.getvalue())
    except OSError as exc:  # a read-only data set: compute again next time
        log.warning("could not cache FID reference statistics at %s (%s)", path, exc)


def reference_stats(
    extractor: FeatureExtractor,
    shards,
    *,
    image_size: int,
    channels: int,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    max_images: int | None = None,
) -> tuple[FeatureStats | None, bool]:
    """(statistics on rank 0 / None elsewhere, whether they came from the cache). Collective."""
    path = stats_cache_path(shards, extractor.id)
    key = _cache_key(shards, extractor.id, max_images)
    cached = load_cached_stats(path, key) if rank == 0 else None
    hit = [cached is not None]
    if world_size > 1:
        dist.broadcast_object_list(hit, src=0)
    if hit[0]:
        return cached, True
    local = shard_features(extractor, shards, image_size=image_size, channels=channels, batch_size=batch_size,
                           rank=rank, world_size=world_size, max_images=max_images)
    features = gather_features(local, world_size)
    if rank != 0:
        return None, False
    stats = feature_stats(features.double().cpu().numpy())
    save_cached_stats(path, key, stats)
    return stats, False


def fid_and_kid(model, extractor: FeatureExtractor, shards, *, num_images: int, image_size: int, channels: int,
                batch_size: int, rank: int = 0, world_size: int = 1, reference_images: int | None = None,
                seed: int = 0, kid_subsets: int = 100, kid_subset_size: int = 1000, autocast=None,
                **sample_options) -> dict[str, float] | None:
    """FID and KID of ``num_images`` samples of ``model`` against ``shards``; collective, the
    result on rank 0 (None on the others)."""
    reference, _ = reference_stats(extractor, shards, image_size=image_size, channels=channels,
                                   batch_size=batch_size, rank=rank, world_size=world_size,
                                   max_images=reference_images)
    local = sample_features(model, extractor, num_images, batch_size=batch_size, seed=seed, rank=rank,
                            world_size=world_size, autocast=autocast, **sample_options)
    generated = gather_features(local, world_size)
    if rank != 0:
        return None
    generated_np = generated.double().cpu().numpy()
    stats = feature_stats(generated_np)
    if stats.count <= extractor.dims:
        log.warning("FID from %d images of %d features: the covariance is singular and FID is biased "
                    "upward (use at least %d images)", stats.count, extractor.dims, extractor.dims + 1)
    fid = frechet_distance(stats.mean, stats.cov, reference.mean, reference.cov)
    kid, kid_std = kernel_inception_distance(generated_np, reference.features, kid_subsets, kid_subset_size, seed)
    return {"fid": fid, "kid": kid, "kid_std": kid_std, "fid_images": float(stats.count),
            "fid_reference_images": float(reference.count)}
