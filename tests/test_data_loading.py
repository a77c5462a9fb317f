"""pipeline.data: shard lists, the partition split, determinism, exact resume, damaged data.

Shards are made inside each test (tests/conftest.py `make_id_shards`): 8 shards × 6 samples of
8×8 grayscale images whose first row holds the sample's id (``images[:, 0, 0, 0]``), so a batch
says which samples it holds. Everything runs in-process; ``num_workers=2`` uses real DataLoader
worker processes (fork).
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_id_shards
from pipeline.data import (
    TrainingBatches,
    resolve_shards,
    shards_for_partition,
)
from pipeline.errors import UserError, one_line

NUM_SHARDS, PER_SHARD, SIZE = 8, 6, 8
TOTAL = NUM_SHARDS * PER_SHARD


@pytest.fixture(scope="module")
def id_dir(tmp_path_factory) -> Path:
    return make_id_shards(tmp_path_factory.mktemp("ids") / "train", NUM_SHARDS, PER_SHARD, SIZE)


def shard_files(directory: Path) -> list[str]:
    return sorted(str(p) for p in Path(directory).glob("shard-*.tar"))


def make_batches(shards, **overrides) -> TrainingBatches:
    if not hasattr(shards, "urls"):
        shards = resolve_shards(shards)
    options = dict(
        seed=0, rank=0, world_size=1, num_workers=0, batch_size=4, image_size=SIZE, channels=1,
        shuffle_buffer=5, random_flip=False, prefetch_factor=2,
    )
    options.update(overrides)
    return TrainingBatches(shards, **options)


def take(batches: TrainingBatches, count: int) -> list[torch.Tensor]:
    return [next(batches) for _ in range(count)]


def ids(batch: torch.Tensor) -> list[int]:
    return batch[:, 0, 0, 0].tolist()


def shard_ids(url: str) -> set[int]:
    """The sample ids a shard of `make_id_shards` holds."""
    index = int(Path(url).stem.split("-")[1])
    return set(range(index * PER_SHARD, (index + 1) * PER_SHARD))


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def png(size: int, value: int = 0) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size), value, dtype=np.uint8), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


# --- resolve_shards -----------------------------------------------------------------------------


def test_resolve_prepared_directory(id_dir):
    shards = resolve_shards(str(id_dir))
    assert list(shards.urls) == shard_files(id_dir)
    assert shards.manifest is not None and shards.manifest.image_size == SIZE
    assert list(shards.expected_bytes) == [os.path.getsize(u) for u in shards.urls]


def test_resolve_brace_pattern(id_dir):
    shards = resolve_shards(str(id_dir / "shard-{000000..000007}.tar"))
    assert list(shards.urls) == shard_files(id_dir)
    assert shards.manifest is None


def test_resolve_list_and_single_tar(id_dir):
    files = shard_files(id_dir)
    assert list(resolve_shards(files[:3]).urls) == files[:3]
    assert list(resolve_shards(files[5]).urls) == [files[5]]
    # a list may mix forms
    mixed = resolve_shards([files[0], str(id_dir / "shard-{000001..000002}.tar")])
    assert list(mixed.urls) == files[:3]


def test_resolve_pipe_urls_and_read_them(id_dir):
    files = shard_files(id_dir)
    pipes = [f"pipe:cat {path}" for path in files]
    shards = resolve_shards(pipes)
    assert list(shards.urls) == pipes
    # The same shards through `cat` give the same stream as the files themselves.
    through_pipe = make_batches(shards)
    direct = make_batches(files)
    for a, b in zip(take(through_pipe, 14), take(direct, 14)):
        assert torch.equal(a, b)


def test_missing_shard_in_pattern_names_it(id_dir):
    with pytest.raises(UserError) as info:
        resolve_shards(str(id_dir / "shard-{000000..000008}.tar"))
    assert "shard-000008.tar" in str(info.value) and "does not exist" in str(info.value)


def test_missing_shard_in_list_names_it(id_dir, tmp_path):
    missing = str(tmp_path / "nope.tar")
    with pytest.raises(UserError) as info:
        resolve_shards([shard_files(id_dir)[0], missing])
    assert missing in str(info.value)


def test_missing_shard_of_manifest_names_it(id_dir, tmp_path):
    copy = Path(shutil.copytree(id_dir, tmp_path / "copy"))
    (copy / "shard-000003.tar").unlink()
    with pytest.raises(UserError) as info:
        resolve_shards(str(copy))
    assert str(copy / "shard-000003.tar") in str(info.value)


def test_size_mismatch_against_manifest_names_shard(id_dir, tmp_path):
    copy = Path(shutil.copytree(id_dir, tmp_path / "copy"))
    shard = copy / "shard-000002.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError) as info:
        resolve_shards(str(copy))
    message = str(info.value)
    assert str(shard) in message and "manifest" in message and "\n" not in message


def test_directory_without_manifest_is_read_as_its_tar_files(id_dir, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for path in shard_files(id_dir):
        shutil.copy(path, bare)
    (bare / "notes.txt").write_text("not a shard")
    shards = resolve_shards(str(bare))
    assert [Path(u).name for u in shards.urls] == [Path(u).name for u in shard_files(id_dir)]
    assert shards.manifest is None and shards.counts == (PER_SHARD,) * NUM_SHARDS
    batches = make_batches(shards, batch_size=4)
    assert sorted(i for batch in take(batches, TOTAL // 4) for i in ids(batch)) == list(range(TOTAL))

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError) as info:
        resolve_shards(str(empty))
    assert str(empty) in str(info.value) and "manifest" in str(info.value) and ".tar" in str(info.value)


def test_empty_list():
    with pytest.raises(UserError):
        resolve_shards([])


@pytest.mark.parametrize("world_size, num_workers", [(2, 2), (1, 3), (3, 1)])
def test_too_few_shards_for_readers_is_an_error_not_a_hang(id_dir, world_size, num_workers):
    files = shard_files(id_dir)[:2]
    with pytest.raises(UserError) as info:
        make_batches(files, world_size=world_size, num_workers=num_workers)
    message = str(info.value)
    assert "2 shard(s)" in message and f"{world_size * max(num_workers, 1)} readers" in message


# --- batches --------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_workers", [0, 2])
def test_batches_are_uint8_bchw(id_dir, num_workers):
    batches = make_batches(str(id_dir), num_workers=num_workers, batch_size=5)
    try:
        for batch in take(batches, 4):
            assert batch.dtype == torch.uint8
            assert tuple(batch.shape) == (5, 1, SIZE, SIZE)
    finally:
        batches.close()


def test_rgb_batches(tmp_path):
    directory = make_id_shards(tmp_path / "rgb", 2, 4, SIZE, channels=3)
    batches = make_batches(str(directory), batch_size=3, channels=3)
    batch = next(batches)
    assert batch.dtype == torch.uint8 and tuple(batch.shape) == (3, 3, SIZE, SIZE)


def test_one_epoch_delivers_every_sample_once(id_dir):
    batches = make_batches(str(id_dir), batch_size=4)
    seen = [i for batch in take(batches, TOTAL // 4) for i in ids(batch)]
    assert sorted(seen) == list(range(TOTAL))


def test_two_ranks_two_workers_split_epoch_zero(id_dir):
    # By default a run has one canonical partition per reader: 2 processes × 2 workers = 4.
    urls = tuple(shard_files(id_dir))
    partitions = [set(shards_for_partition(urls, 0, 0, partition, 4)) for partition in range(4)]
    assert set().union(*partitions) == set(urls)
    assert sum(len(p) for p in partitions) == len(urls)  # disjoint

    # Each partition holds 2 shards = 12 samples; a rank's two partitions give 24 samples, one
    # epoch, in 6 batches of 4 (2 from each worker's partition).
    per_rank: list[list[int]] = []
    for rank in (0, 1):
        batches = make_batches(str(id_dir), rank=rank, world_size=2, num_workers=2, batch_size=4)
        try:
            per_rank.append([i for batch in take(batches, 6) for i in ids(batch)])
            assert batches.layout.process_partitions() == range(2 * rank, 2 * rank + 2)
        finally:
            batches.close()
        expected = set().union(*(shard_ids(u) for p in (2 * rank, 2 * rank + 1) for u in partitions[p]))
        assert set(per_rank[rank]) == expected
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == list(range(TOTAL))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_stream_is_deterministic_for_a_seed(id_dir, num_workers):
    def first(seed):
        batches = make_batches(str(id_dir), seed=seed, num_workers=num_workers)
        try:
            return [ids(b) for b in take(batches, 8)]
        finally:
            batches.close()

    assert first(3) == first(3)
    assert first(3) != first(4)


def test_epochs_are_reshuffled(id_dir):
    batches = make_batches(str(id_dir), batch_size=TOTAL)
    epoch0, epoch1 = ids(next(batches)), ids(next(batches))
    assert sorted(epoch0) == sorted(epoch1) == list(range(TOTAL))
    assert epoch0 != epoch1


# --- exact resume ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "num_workers, consumed, after, shuffle_buffer",
    [
        (0, 3, 4, 5),  # inside epoch 0
        (0, 10, 6, 5),  # across the epoch boundary (12 batches per epoch)
        (0, 12, 3, 1000),  # exactly at the boundary, whole-epoch buffer
        (2, 4, 4, 5),  # two workers, each half of every batch
        (2, 5, 12, 5),  # across the epoch boundary (12 batches per epoch)
        (2, 13, 4, 1000),  # in epoch 1 already
    ],
)
def test_exact_resume(id_dir, num_workers, consumed, after, shuffle_buffer):
    reference = make_batches(str(id_dir), num_workers=num_workers, shuffle_buffer=shuffle_buffer)
    interrupted = make_batches(str(id_dir), num_workers=num_workers, shuffle_buffer=shuffle_buffer)
    try:
        expected = take(reference, consumed + after)[consumed:]
        take(interrupted, consumed)
        state = interrupted.state_dict()
    finally:
        reference.close()
        interrupted.close()
    resumed = make_batches(str(id_dir), num_workers=num_workers, shuffle_buffer=shuffle_buffer, state=state)
    try:
        got = take(resumed, after)
    finally:
        resumed.close()
    assert [ids(b) for b in got] == [ids(b) for b in expected]
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


def test_resume_twice(id_dir):
    reference = make_batches(str(id_dir), num_workers=0)
    expected = take(reference, 20)
    first = make_batches(str(id_dir))
    take(first, 7)
    second = make_batches(str(id_dir), state=first.state_dict())
    take(second, 6)
    third = make_batches(str(id_dir), state=second.state_dict())
    assert [ids(b) for b in take(third, 7)] == [ids(b) for b in expected[13:]]


def test_state_dict_is_json_plain(id_dir):
    import json

    batches = make_batches(str(id_dir))
    take(batches, 2)
    state = batches.state_dict()
    assert json.loads(json.dumps(state)) == state


def test_state_before_any_batch_restarts_at_the_beginning(id_dir):
    fresh = make_batches(str(id_dir))
    state = fresh.state_dict()
    resumed = make_batches(str(id_dir), state=state)
    assert [ids(b) for b in take(resumed, 3)] == [ids(b) for b in take(make_batches(str(id_dir)), 3)]


@pytest.mark.parametrize("consumed", [4, 15])  # in epoch 0; in epoch 1 (12 batches per epoch)
def test_worker_count_change_resumes_exactly(id_dir, consumed, caplog):
    # The partitions are the run's (4 here), whoever reads them: 2 workers, the training process, 1 worker.
    options = dict(canonical_partitions=4, batch_size=6)
    reference = take(make_batches(str(id_dir), **options), consumed + 12)
    two_workers = make_batches(str(id_dir), num_workers=2, **options)
    try:
        take(two_workers, consumed)
        state = two_workers.state_dict()
    finally:
        two_workers.close()
    with caplog.at_level(logging.WARNING, logger="pipeline.data"):
        one_reader = make_batches(str(id_dir), num_workers=0, state=state, **options)
        got = take(one_reader, 6)
        one_worker = make_batches(str(id_dir), num_workers=1, state=one_reader.state_dict(), **options)
    try:
        got += take(one_worker, 6)
    finally:
        one_worker.close()
    assert not caplog.records
    # The same batches, in the same order: the readers' pieces are put back in the order of the
    # process stream, whatever the number of readers.
    assert [ids(b) for b in got] == [ids(b) for b in reference[consumed:]]


def test_default_partitions_read_the_earlier_readers_streams(id_dir):
    # One partition per reader by default, read as reader r of R read before partitions existed
    # (the first 16 samples of each rank, 2 processes, 0 workers, as pipeline/data.py gave them
    # then): checkpoints written then resume onto the same streams.
    before = {0: [30, 33, 18, 32, 19, 21, 31, 35, 22, 23, 34, 26, 28, 27, 0, 29],
              1: [44, 42, 43, 37, 36, 47, 38, 41, 46, 40, 6, 45, 8, 39, 10, 13]}
    for rank, expected in before.items():
        batches = make_batches(str(id_dir), rank=rank, world_size=2)
        assert batches.layout.partitions == 2
        assert [i for batch in take(batches, 4) for i in ids(batch)] == expected


def test_shard_count_change_restarts_with_warning(id_dir, caplog):
    files = shard_files(id_dir)
    batches = make_batches(files)
    take(batches, 3)
    with caplog.at_level(logging.WARNING, logger="pipeline.data"):
        make_batches(files[:6], state=batches.state_dict())
    assert any("cannot resume exactly" in r.getMessage() for r in caplog.records)


# --- damaged data ---------------------------------------------------------------------------------


def damaged_copy(id_dir: Path, tmp_path: Path, how: str) -> tuple[list[str], str]:
    """Shard files (no manifest: the size check cannot catch it) with shard 3 damaged."""
    copy = Path(shutil.copytree(id_dir, tmp_path / "damaged"))
    (copy / "manifest.json").unlink()
    victim = copy / "shard-000003.tar"
    data = victim.read_bytes()
    if how == "truncated-mid-member":
        with tarfile.open(victim) as tar:
            member = [m for m in tar.getmembers() if m.name.endswith(".png")][2]
        victim.write_bytes(data[: member.offset_data + member.size // 2])
    elif how == "garbage":
        victim.write_bytes(np.random.default_rng(0).integers(0, 256, len(data), dtype=np.uint8).tobytes())
    elif how == "truncated-in-header":
        with tarfile.open(victim) as tar:
            member = [m for m in tar.getmembers() if m.name.endswith(".cls") or m.name.endswith(".json")][0]
            first_of_sample = [m for m in tar.getmembers() if m.name.startswith("000000020.")][0]
        # cut 100 bytes into the header of a sample's first member: the previous samples are
        # complete, so nothing but the tar structure tells that the shard is cut short
        victim.write_bytes(data[: first_of_sample.offset + 100])
    else:
        raise ValueError(how)
    return shard_files(copy), str(victim)


@pytest.mark.parametrize("how", ["truncated-mid-member", "garbage"])
def test_damaged_shard_names_it_when_iterated(id_dir, tmp_path, how):
    files, victim = damaged_copy(id_dir, tmp_path, how)
    batches = make_batches(files)  # resolving and building succeed: the damage is inside
    with pytest.raises(UserError) as info:
        take(batches, 2 * TOTAL // 4)
    message = str(info.value)
    assert victim in message and "\n" not in message


@pytest.mark.parametrize("how", ["truncated-mid-member", "garbage"])
def test_damaged_shard_in_worker_gives_one_line(id_dir, tmp_path, how):
    files, victim = damaged_copy(id_dir, tmp_path, how)
    batches = make_batches(files, num_workers=2)
    try:
        with pytest.raises(UserError) as info:
            take(batches, 2 * TOTAL // 4)
    finally:
        batches.close()
    line = one_line(info.value)
    assert "\n" not in line
    assert victim in line
    assert "damaged" in line


def test_shard_truncated_inside_a_header_is_an_error(id_dir, tmp_path):
    files, victim = damaged_copy(id_dir, tmp_path, "truncated-in-header")
    batches = make_batches(files)
    with pytest.raises(UserError) as info:
        take(batches, 2 * TOTAL // 4)
    assert victim in str(info.value)


def test_failing_pipe_command_names_it(id_dir, tmp_path):
    files = shard_files(id_dir)
    bad = f"pipe:cat {tmp_path / 'absent.tar'}"
    batches = make_batches(files[:7] + [bad])
    with pytest.raises(UserError) as info:
        take(batches, 2 * TOTAL // 4)
    assert "absent.tar" in str(info.value)


def test_undecodable_image_names_shard_and_key(tmp_path):
    shard = write_tar(
        tmp_path / "bad-image.tar",
        [("000000000.png", png(SIZE)), ("000000001.png", b"this is not a png"), ("000000002.png", png(SIZE))],
    )
    batches = make_batches([str(shard)], batch_size=3, shuffle_buffer=1)
    with pytest.raises(UserError) as info:
        next(batches)
    message = str(info.value)
    assert str(shard) in message and "000000001" in message and "not a decodable image" in message


def test_undecodable_image_in_worker_names_shard_and_key(tmp_path):
    shards = []
    for index in range(2):
        members = [(f"{index}{i:08d}.png", png(SIZE)) for i in range(3)]
        if index == 1:
            members[1] = ("100000001.png", b"\x89PNG garbage")
        shards.append(str(write_tar(tmp_path / f"s{index}.tar", members)))
    batches = make_batches(shards, num_workers=2, batch_size=3, shuffle_buffer=1)
    try:
        with pytest.raises(UserError) as info:
            take(batches, 4)
    finally:
        batches.close()
    line = one_line(info.value)
    assert shards[1] in line and "100000001" in line and "\n" not in line


def test_images_of_another_size_are_resized_to_image_size(tmp_path):
    shard = write_tar(
        tmp_path / "sizes.tar",
        [("a.png", png(SIZE, 10)), ("b.png", png(SIZE * 2, 20)), ("c.png", png(SIZE // 2, 30))],
    )
    batches = make_batches([str(shard)], batch_size=3, shuffle_buffer=1)
    batch = next(batches)
    assert tuple(batch.shape) == (3, 1, SIZE, SIZE)
    assert batch[:, 0].flatten(1).float().mean(1).tolist() == [10, 20, 30]


def test_sample_without_image_names_shard_and_key(tmp_path):
    shard = write_tar(tmp_path / "noimg.tar", [("a.png", png(SIZE)), ("b.txt", b"hello")])
    batches = make_batches([str(shard)], batch_size=2, shuffle_buffer=1)
    with pytest.raises(UserError) as info:
        next(batches)
    assert str(shard) in str(info.value) and "sample b" in str(info.value)


# --- random flip ----------------------------------------------------------------------------------


def test_random_flip_is_deterministic_and_flips_some(id_dir):
    ramp = np.arange(SIZE) * (200 // SIZE)
    plain = [b for b in take(make_batches(str(id_dir), random_flip=False), 6)]
    flipped = [b for b in take(make_batches(str(id_dir), random_flip=True), 6)]
    again = [b for b in take(make_batches(str(id_dir), random_flip=True), 6)]
    for a, b in zip(flipped, again):
        assert torch.equal(a, b)
    count_flipped = count_kept = 0
    for p, f in zip(plain, flipped):
        assert ids(p) == ids(f)  # flipping never changes the order
        for image_p, image_f in zip(p, f):
            assert image_p[0, 1].tolist() == ramp.tolist()
            if torch.equal(image_f, image_p):
                count_kept += 1
            else:
                assert torch.equal(image_f, image_p.flip(-1))
                count_flipped += 1
    assert count_flipped > 0 and count_kept > 0


def test_random_flip_survives_resume(id_dir):
    reference = take(make_batches(str(id_dir), random_flip=True), 9)
    first = make_batches(str(id_dir), random_flip=True)
    take(first, 4)
    resumed = make_batches(str(id_dir), random_flip=True, state=first.state_dict())
    for a, b in zip(take(resumed, 5), reference[4:]):
        assert torch.equal(a, b)
