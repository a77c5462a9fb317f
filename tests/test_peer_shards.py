"""Shards made elsewhere: img2dataset's layout, any image size and shape, labels and captions.

The shards are made inside the tests in img2dataset's layout (``00000.tar`` holding
``NNNNNNNNN.jpg/.txt/.json``, with ``00000_stats.json`` and ``00000.parquet`` beside it). Each
image is wider or taller than square, of its own size, filled with the sample's own colour in
its centred square and black in the margins of its longer side: a centre crop sees only the
colour, a stretched image or an off-centre crop would show black. Training reads them at a
smaller size (16) from the bare directory; one test trains the tiny DDPM on them with `launch`.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_cli, tiny_overrides
from pipeline.data import Batch, TrainingBatches, check_shards_match, eval_batches, resolve_shards
from pipeline.decode import crop_box, decode_square
from pipeline.errors import UserError, one_line
from pipeline.shards import COUNTS_NAME

SIZE = 16
NUM_SHARDS, PER_SHARD = 4, 6
TOTAL = NUM_SHARDS * PER_SHARD
# (width, height) of sample i is SHAPES[i % len(SHAPES)]: landscape, portrait, square, large
SHAPES = [(48, 32), (30, 45), (40, 40), (64, 24), (20, 36), (96, 64)]


def colour(index: int) -> tuple[int, int, int]:
    return (40 + 8 * index, 230 - 8 * index, 60 + 4 * index)


def sample_image(index: int) -> Image.Image:
    width, height = SHAPES[index % len(SHAPES)]
    image = Image.new("RGB", (width, height), (0, 0, 0))
    image.paste(colour(index), crop_box(width, height))
    return image


def jpeg(image: Image.Image, quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def make_img2dataset_dir(directory: Path, labels: bool = False, stats: bool = True) -> Path:
    """img2dataset's output layout: NUM_SHARDS shards of PER_SHARD samples, keys 000000000..."""
    directory.mkdir(parents=True)
    for shard in range(NUM_SHARDS):
        members = []
        for index in range(shard * PER_SHARD, (shard + 1) * PER_SHARD):
            key = f"{index:09d}"
            members += [(f"{key}.jpg", jpeg(sample_image(index))),
                        (f"{key}.txt", f"caption {index}".encode()),
                        (f"{key}.json", json.dumps({"key": key, "url": f"http://x/{index}.jpg"}).encode())]
            if labels:
                members.append((f"{key}.cls", str(index % 3).encode()))
        write_tar(directory / f"{shard:05d}.tar", members)
        if stats:
            (directory / f"{shard:05d}_stats.json").write_text(
                json.dumps({"count": PER_SHARD + 2, "successes": PER_SHARD, "failed_to_download": 2}))
        (directory / f"{shard:05d}.parquet").write_bytes(b"PAR1 not read by the loader PAR1")
    return directory


@pytest.fixture(scope="module")
def peer_dir(tmp_path_factory) -> Path:
    return make_img2dataset_dir(tmp_path_factory.mktemp("peer") / "laion", labels=True)


def make_batches(shards, **overrides) -> TrainingBatches:
    if not hasattr(shards, "urls"):
        shards = resolve_shards(shards)
    options = dict(seed=0, rank=0, world_size=1, num_workers=0, batch_size=4, image_size=SIZE,
                   channels=3, shuffle_buffer=5, random_flip=False, prefetch_factor=2,
                   labels=True, fields=("txt", "json"))
    options.update(overrides)
    return TrainingBatches(shards, **options)


def take(batches: TrainingBatches, count: int) -> list[Batch]:
    try:
        return [batches.next_batch() for _ in range(count)]
    finally:
        batches.close()


def index_of(key: str) -> int:
    return int(key)


# --- shard lists ----------------------------------------------------------------------------------


def test_bare_directory_lists_its_tars_with_counts_from_stats(peer_dir):
    shards = resolve_shards(str(peer_dir))
    assert [Path(u).name for u in shards.urls] == [f"{i:05d}.tar" for i in range(NUM_SHARDS)]
    assert shards.manifest is None
    assert shards.counts == (PER_SHARD,) * NUM_SHARDS and shards.num_samples == TOTAL
    assert not (peer_dir / COUNTS_NAME).exists()  # img2dataset's stats sufficed: nothing counted


def test_counts_without_stats_are_counted_once_and_cached(tmp_path):
    directory = make_img2dataset_dir(tmp_path / "nostats", stats=False)
    assert resolve_shards(str(directory)).counts == (PER_SHARD,) * NUM_SHARDS
    cache = directory / COUNTS_NAME
    data = json.loads(cache.read_text())
    assert len(data["shards"]) == NUM_SHARDS
    # the next start reads the cache, not the shards: a number planted there comes back ...
    first = str((directory / "00000.tar").resolve())
    data["shards"][first]["samples"] = 99
    cache.write_text(json.dumps(data))
    assert resolve_shards(str(directory)).counts[0] == 99
    # ... until the shard changes (size and modification time are remembered)
    write_tar(directory / "00000.tar", [("a.jpg", jpeg(sample_image(0))), ("b.jpg", jpeg(sample_image(1)))])
    assert resolve_shards(str(directory)).counts[0] == 2


def test_counts_cache_of_an_unwritable_directory_goes_to_the_cache_dir(tmp_path, monkeypatch):
    if os.geteuid() == 0:
        pytest.skip("root may write to any directory: no unwritable directory to test with")
    directory = make_img2dataset_dir(tmp_path / "readonly", stats=False)
    monkeypatch.setenv("GENPIPE_CACHE_DIR", str(tmp_path / "cache"))
    directory.chmod(0o555)
    try:
        assert resolve_shards(str(directory)).counts == (PER_SHARD,) * NUM_SHARDS
    finally:
        directory.chmod(0o755)
    assert not (directory / COUNTS_NAME).exists()
    assert len(list((tmp_path / "cache").glob("shard-counts-*.json"))) == 1


def test_glob_pattern(peer_dir):
    shards = resolve_shards(str(peer_dir / "0000[01].tar"))
    assert [Path(u).name for u in shards.urls] == ["00000.tar", "00001.tar"]
    with pytest.raises(UserError, match="no file matches"):
        resolve_shards(str(peer_dir / "*.tgz"))


# --- batches ---------------------------------------------------------------------------------------


def test_batches_are_centre_crops_at_the_training_size_with_labels_and_fields(peer_dir):
    seen = {}
    for batch in take(make_batches(str(peer_dir)), TOTAL // 4):
        assert batch.images.dtype == torch.uint8 and tuple(batch.images.shape) == (4, 3, SIZE, SIZE)
        assert batch.labels.dtype == torch.int64 and tuple(batch.labels.shape) == (4,)
        for image, label, key, text, meta in zip(batch.images, batch.labels, batch.keys,
                                                 batch.fields["txt"], batch.fields["json"]):
            index = index_of(key)
            seen[index] = image
            assert int(label) == index % 3
            assert text == f"caption {index}" and meta["key"] == key
    assert sorted(seen) == list(range(TOTAL))
    for index, image in seen.items():
        # only the sample's colour, no black margin: kept aspect ratio, cut at the centre (the
        # outermost pixels see a little of the margin through the resampling filter and JPEG)
        inside = image[:, 1:-1, 1:-1].permute(1, 2, 0).float()
        difference = (inside - torch.tensor(colour(index))).abs()
        assert difference.max() <= 12, (index, SHAPES[index % len(SHAPES)])


def test_plain_next_still_gives_the_image_tensor(peer_dir):
    batches = make_batches(str(peer_dir), labels=False, fields=())
    try:
        images = next(batches)
        assert isinstance(images, torch.Tensor) and tuple(images.shape) == (4, 3, SIZE, SIZE)
        assert batches.peek_batch().labels is None and batches.peek().shape == images.shape
    finally:
        batches.close()


def test_grayscale_conversion(peer_dir):
    images = take(make_batches(str(peer_dir), channels=1), 1)[0].images
    assert tuple(images.shape) == (4, 1, SIZE, SIZE)


def test_random_crops_and_flips_follow_the_sample_not_the_reader(peer_dir):
    """The same sample is cut and flipped alike whatever reads it (worker count, process count)
    in the same epoch; different samples and epochs are cut in different places."""
    options = dict(crop="random", random_flip=True, fields=())

    def by_key(batches_list: list[list[Batch]]) -> dict[str, torch.Tensor]:
        return {key: image for batches in batches_list for batch in batches
                for key, image in zip(batch.keys, batch.images)}

    one_reader = by_key([take(make_batches(str(peer_dir), **options), TOTAL // 4)])
    two_workers = by_key([take(make_batches(str(peer_dir), num_workers=2, **options), TOTAL // 4)])
    two_ranks = by_key([take(make_batches(str(peer_dir), rank=rank, world_size=2, **options), TOTAL // 8)
                        for rank in (0, 1)])
    assert sorted(one_reader) == sorted(two_workers) == sorted(two_ranks)
    for key in one_reader:
        assert torch.equal(one_reader[key], two_workers[key]) and torch.equal(one_reader[key], two_ranks[key])
    # random crops of the wide and tall images show some black margin, at varying places
    margins = [float((image.float().sum(0) < 40).float().mean()) for image in one_reader.values()]
    assert sum(m > 0.05 for m in margins) >= 4
    centre = by_key([take(make_batches(str(peer_dir), fields=()), TOTAL // 4)])
    assert sum(not torch.equal(one_reader[k], centre[k]) for k in centre) >= TOTAL // 2
    # the second epoch cuts the samples elsewhere
    two_epochs = take(make_batches(str(peer_dir), **options), 2 * TOTAL // 4)
    second = by_key([two_epochs[TOTAL // 4:]])
    assert sum(not torch.equal(second[k], one_reader[k]) for k in second) >= TOTAL // 2


@pytest.mark.parametrize("num_workers", [0, 2])
def test_exact_resume_with_random_crops(peer_dir, num_workers):
    options = dict(crop="random", random_flip=True, num_workers=num_workers, shuffle_buffer=7)
    reference = take(make_batches(str(peer_dir), **options), 11)
    first = make_batches(str(peer_dir), **options)
    take_some = [first.next_batch() for _ in range(5)]
    state = first.state_dict()
    first.close()
    resumed = take(make_batches(str(peer_dir), state=state, **options), 6)
    for a, b in zip(take_some + resumed, reference):
        assert a.keys == b.keys and torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)


def test_eval_batches_centre_crop_with_labels(peer_dir):
    loader = eval_batches(resolve_shards(str(peer_dir)), rank=0, world_size=1, num_workers=0,
                          batch_size=5, image_size=SIZE, channels=3, max_images=7, labels=True)
    batches = list(loader)
    assert [len(b.images) for b in batches] == [5, 2]
    assert torch.cat([b.labels for b in batches]).tolist() == [i % 3 for i in range(7)]


# --- labels that are not there ---------------------------------------------------------------------


def test_labels_asked_of_shards_without_them(tmp_path):
    directory = make_img2dataset_dir(tmp_path / "unlabelled")
    shards = resolve_shards(str(directory))
    with pytest.raises(UserError) as info:
        check_shards_match(shards, SIZE, 3, "data.shards", labels=True)
    message = str(info.value)
    assert "00000.tar" in message and ".cls" in message and "\n" not in message
    check_shards_match(shards, SIZE, 3, "data.shards")  # nothing asked: nothing to say

    for workers in (0, 1):
        batches = make_batches(shards, num_workers=workers)
        with pytest.raises(UserError) as info:
            take(batches, 1)
        line = one_line(info.value)
        assert "has no .cls label" in line and ".tar" in line and "sample 0000000" in line


def test_labels_asked_of_a_prepared_split_without_classes(tmp_path):
    from conftest import make_id_shards

    directory = make_id_shards(tmp_path / "ids", 2, 3, 8)
    with pytest.raises(UserError, match="num_classes 0"):
        check_shards_match(resolve_shards(str(directory)), 8, 1, "data.shards", labels=True)


# --- decoding --------------------------------------------------------------------------------------


def test_large_jpegs_decode_reduced_close_to_a_full_decode():
    rng = np.random.default_rng(0)
    smooth = np.kron(rng.integers(0, 256, (12, 16, 3)), np.ones((32, 32, 1))).astype(np.uint8)
    data = jpeg(Image.fromarray(smooth))  # 512×384: decoded at 1/8 scale for a 32 target
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        full = image.crop(crop_box(*image.size)).resize((32, 32), Image.Resampling.BILINEAR)
    reduced = decode_square(data, 32, 3)
    assert reduced.shape == (32, 32, 3)
    assert np.abs(reduced.astype(int) - np.asarray(full).astype(int)).mean() < 4


def test_images_at_the_training_size_are_only_decoded():
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    data = jpeg(image)
    with Image.open(io.BytesIO(data)) as plain:
        expected = np.asarray(plain.convert("RGB"))
    assert np.array_equal(decode_square(data, SIZE, 3), expected)


# --- end to end ------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.quick
def test_launch_local_trains_on_the_bare_directory_at_a_smaller_size(peer_dir, digits_dir, tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(
        "launch", "local", "configs/tiny/ddpm.yaml",
        *tiny_overrides(digits_dir, run_dir, **{
            "data.shards": str(peer_dir), "data.image_size": SIZE, "data.channels": 3,
            # data.crop takes effect once the trainer builds its batches with from_config
            "data.crop": "random", "data.random_flip": "true", "data.batch_size": 4,
            "data.shuffle_buffer": 8, "model.base_channels": 8, "model.norm_groups": 4,
            "model.channel_mult": "[1,2]", "model.attention_resolutions": "[]",
            "model.sample_steps": 2, "train.max_steps": 6, "train.warmup_steps": 1,
            "train.log_every_steps": 3, "checkpoint.every_steps": 6, "eval.every_steps": 0}),
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps and steps[-1] == 6
    assert all(np.isfinite(r["loss"]) for r in records if "loss" in r)
