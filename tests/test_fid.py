"""FID and KID (pipeline/fid.py): the distances against direct NumPy/SciPy computations, the full
path (samples -> features -> statistics -> FID/KID) with a stand-in feature network on tiny
shards, the reference-statistics cache, features gathered across processes, and the Inception
weights file (loading, and the one-line error when it is missing)."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
from scipy import linalg

from conftest import make_id_shards
from pipeline import fid
from pipeline.data import resolve_shards
from pipeline.errors import UserError


def direct_fid(x: np.ndarray, y: np.ndarray) -> float:
    """FID written out independently: Tr((Σ₁Σ₂)^½) = Tr((Σ₁^½ Σ₂ Σ₁^½)^½), a symmetric PSD root."""
    mu_x, mu_y = x.mean(0), y.mean(0)
    cov_x, cov_y = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    root_x = linalg.sqrtm(cov_x).real
    middle = root_x @ cov_y @ root_x
    trace_root = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    return float(((mu_x - mu_y) ** 2).sum() + np.trace(cov_x) + np.trace(cov_y) - 2 * trace_root)


def direct_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    d = x.shape[1]
    k = lambda a, b: (a @ b.T / d + 1) ** 3  # noqa: E731
    m = len(x)
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    off = ~np.eye(m, dtype=bool)
    return float(kxx[off].mean() + kyy[off].mean() - 2 * kxy.mean())


def features(n: int, d: int, shift: float = 0.0, seed: int = 0) -> np.ndarray:
    mixing = np.random.default_rng(100 + d).normal(size=(d, d)) / np.sqrt(d)  # one distribution per d
    return np.random.default_rng(seed).normal(size=(n, d)) @ mixing + shift


def test_frechet_distance_equals_a_direct_computation():
    x, y = features(300, 12, seed=1), features(250, 12, shift=0.3, seed=2)
    sx, sy = fid.feature_stats(x), fid.feature_stats(y)
    value = fid.frechet_distance(sx.mean, sx.cov, sy.mean, sy.cov)
    assert value == pytest.approx(direct_fid(x, y), rel=1e-6)
    assert value > 0.5  # the shift alone contributes 12 × 0.09


def test_fid_of_a_set_with_itself_is_zero():
    x = features(200, 16)
    stats = fid.feature_stats(x)
    assert abs(fid.frechet_distance(stats.mean, stats.cov, stats.mean, stats.cov)) < 1e-6 * np.trace(stats.cov)


def test_fid_survives_a_singular_covariance():
    x = features(10, 16, seed=3)  # fewer samples than dimensions: rank-deficient covariance
    y = features(10, 16, seed=4)
    sx, sy = fid.feature_stats(x), fid.feature_stats(y)
    value = fid.frechet_distance(sx.mean, sx.cov, sy.mean, sy.cov)
    assert np.isfinite(value) and value > 0


def test_kid_is_the_unbiased_polynomial_mmd():
    x, y = features(40, 8, seed=5), features(40, 8, shift=0.5, seed=6)
    # One subset of all images is a permutation of each set: exactly the MMD² estimate.
    kid, std = fid.kernel_inception_distance(x, y, num_subsets=1, subset_size=40)
    assert kid == pytest.approx(direct_mmd2(x, y), rel=1e-9)
    assert std == 0.0
    same, _ = fid.kernel_inception_distance(features(400, 8, seed=7), features(400, 8, seed=8), 20, 100)
    shifted, _ = fid.kernel_inception_distance(features(400, 8, seed=7), features(400, 8, shift=0.5, seed=8), 20, 100)
    assert abs(same) < shifted / 10


class NoiseModel(torch.nn.Module):
    """A stand-in generative model: uniform noise images from the caller's generator."""

    def __init__(self, size: int = 8, channels: int = 1):
        super().__init__()
        self.size, self.channels = size, channels

    def sample(self, n, generator):
        return torch.randint(0, 256, (n, self.channels, self.size, self.size), generator=generator, dtype=torch.uint8)


@pytest.fixture
def held_out(tmp_path):
    directory = make_id_shards(tmp_path / "test", num_shards=4, per_shard=12, size=8, split="test")
    return resolve_shards(str(directory), "data.eval_shards")


def test_full_path_from_samples_to_fid_and_kid_matches_direct_computation(held_out):
    extractor = fid.RandomConvFeatures(dims=8)
    kwargs = dict(image_size=8, channels=1, batch_size=10)
    result = fid.fid_and_kid(NoiseModel(), extractor, held_out, num_images=30, kid_subset_size=20,
                             kid_subsets=5, **kwargs)
    assert result["fid_images"] == 30 and result["fid_reference_images"] == 48
    assert np.isfinite(result["fid"]) and result["fid"] > 0 and np.isfinite(result["kid"])

    generated = fid.sample_features(NoiseModel(), extractor, 30, batch_size=7, seed=0).double().numpy()
    reference = fid.shard_features(extractor, held_out, **kwargs).double().numpy()
    assert result["fid"] == pytest.approx(direct_fid(generated, reference), rel=1e-6)
    # The held-out images against themselves.
    own = fid.feature_stats(reference)
    assert abs(fid.frechet_distance(own.mean, own.cov, own.mean, own.cov)) < 1e-8


def test_reference_statistics_are_cached_beside_the_manifest(held_out, tmp_path):
    extractor = fid.RandomConvFeatures(dims=8)
    kwargs = dict(image_size=8, channels=1, batch_size=16)
    cache = tmp_path / "test" / f"fid_stats-{extractor.id}.npz"
    assert fid.stats_cache_path(held_out, extractor.id) == cache
    first, hit = fid.reference_stats(extractor, held_out, **kwargs)
    assert not hit and cache.is_file() and first.count == 48
    second, hit = fid.reference_stats(extractor, held_out, **kwargs)
    assert hit and second.count == 48
    np.testing.assert_array_equal(first.mean, second.mean)
    np.testing.assert_array_equal(first.cov, second.cov)
    # Another image count is another key: recomputed (and the cache now holds that one).
    fewer, hit = fid.reference_stats(extractor, held_out, max_images=20, **kwargs)
    assert not hit and fewer.count == 20
    # Other weights, other file.
    other = fid.RandomConvFeatures(dims=8, seed=1)
    assert other.id != extractor.id
    _, hit = fid.reference_stats(other, held_out, **kwargs)
    assert not hit and (tmp_path / "test" / f"fid_stats-{other.id}.npz").is_file()
    # A changed shard set invalidates the entry.
    _, hit = fid.reference_stats(other, held_out, **kwargs)
    assert hit
    with open(held_out.urls[0], "ab") as handle:
        handle.write(b"\0" * 512)
    _, hit = fid.reference_stats(other, resolve_shards(held_out.urls, "x"), **kwargs)
    assert not hit


def test_missing_inception_weights_is_one_line_naming_the_file(tmp_path):
    missing = tmp_path / "weights" / fid.EXPECTED_INCEPTION_FILE
    with pytest.raises(UserError) as caught:
        fid.InceptionFeatures(missing)
    message = str(caught.value)
    assert "\n" not in message and str(missing) in message and "eval.inception_weights" in message
    with pytest.raises(UserError, match=fid.EXPECTED_INCEPTION_FILE):
        fid.InceptionFeatures(None)


@pytest.mark.slow
def test_inception_loads_a_state_dict_file_and_gives_2048_features(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    network = fid.InceptionV3Pool3()
    state = dict(network.state_dict())
    state["fc.weight"] = torch.zeros(1008, 2048)  # pytorch-fid's file has the classifier; ignored
    state["fc.bias"] = torch.zeros(1008)
    torch.save(state, tmp_path / "inception.pth")
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "inception.safetensors")
    for name in ("inception.pth", "inception.safetensors"):
        extractor = fid.InceptionFeatures(tmp_path / name)
        assert extractor.id.startswith("inception-") and extractor.dims == 2048
    values = extractor.features(torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8))
    assert values.shape == (2, 2048) and torch.isfinite(values).all()
    torch.save(fid.RandomConvFeatures().state_dict(), tmp_path / "other.pth")
    with pytest.raises(UserError, match="not an Inception-v3 state_dict"):
        fid.InceptionFeatures(tmp_path / "other.pth")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_process_reference(rank: int, world_size: int, port: int, urls, out_dir: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        shards = resolve_shards(list(urls), "x")
        extractor = fid.RandomConvFeatures(dims=8)
        local = fid.shard_features(extractor, shards, image_size=8, channels=1, batch_size=5,
                                   rank=rank, world_size=world_size)
        gathered = fid.gather_features(local, world_size)
        np.save(os.path.join(out_dir, f"gathered-{rank}.npy"), gathered.numpy())
        np.save(os.path.join(out_dir, f"local-{rank}.npy"), local.numpy())
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_features_are_gathered_across_processes(tmp_path):
    import torch.multiprocessing as mp

    directory = make_id_shards(tmp_path / "test", num_shards=3, per_shard=7, size=8, split="test")
    shards = resolve_shards(str(directory), "x")  # 3 shards over 2 processes: 14 and 7 images
    mp.spawn(_two_process_reference, args=(2, _free_port(), shards.urls, str(tmp_path)), nprocs=2)
    gathered = [np.load(tmp_path / f"gathered-{rank}.npy") for rank in (0, 1)]
    local = [np.load(tmp_path / f"local-{rank}.npy") for rank in (0, 1)]
    assert [len(x) for x in local] == [14, 7]
    np.testing.assert_array_equal(gathered[0], gathered[1])
    np.testing.assert_array_equal(gathered[0], np.concatenate(local))
    single = fid.shard_features(fid.RandomConvFeatures(dims=8), shards, image_size=8, channels=1, batch_size=5)
    one, two = fid.feature_stats(single.numpy()), fid.feature_stats(gathered[0])
    np.testing.assert_allclose(one.mean, two.mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(one.cov, two.cov, rtol=1e-4, atol=1e-7)


def test_remote_reference_shards_are_not_cached_as_local_paths():
    from pipeline.shards import ShardSet

    for url in ("s3://bucket/eval/shard-000000.tar", "https://example.org/eval/shard-000000.tar"):
        assert fid.stats_cache_path(ShardSet(urls=(url,)), "random_conv-0") is None


def test_reference_statistics_that_cannot_be_cached_are_only_a_warning(tmp_path, caplog):
    # A read-only data set (here: the cache's directory is a file) costs a recomputation next
    # time, never the evaluation.
    (tmp_path / "not_a_directory").write_text("")
    stats = fid.FeatureStats(np.zeros(2), np.eye(2), np.zeros((1, 2)), 1)
    fid.save_cached_stats(tmp_path / "not_a_directory" / "stats.npz", "key", stats)
    assert "could not cache FID reference statistics" in caplog.text
