"""`data-prep reshard`: WebDataset shards of any origin re-encoded at one size, keys kept.

Sources are made inside the tests: img2dataset's layout with images of mixed sizes and shapes
(tests/test_peer_shards.py), plus a corrupt image, a sample without an image, a repeated key and
a shard cut short; and the repository's own shards.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_peer_shards import NUM_SHARDS, TOTAL, colour, jpeg, make_img2dataset_dir, write_tar

from conftest import make_id_shards, run_cli
from data_prep.cli import main
from pipeline.data import TrainingBatches, resolve_shards
from pipeline.manifest import read_manifest


def read_split(directory: Path) -> dict[str, dict[str, bytes]]:
    """{key: {ext: bytes}} of every sample of a written split, in order."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in read_manifest(directory).shard_paths(directory):
        with tarfile.open(shard) as archive:
            for member in archive:
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = archive.extractfile(member).read()
    return samples


def source_members(directory: Path) -> dict[str, dict[str, bytes]]:
    """The first occurrence of each key of the source shards (the cut shard read up to its cut)."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(directory.glob("*.tar")):
        seen_here: set[str] = set()
        try:
            with tarfile.open(shard) as archive:
                for member in archive:
                    key, ext = member.name.split(".", 1)
                    if key in samples and key not in seen_here:
                        continue  # a repeated key: the reshard keeps the first
                    seen_here.add(key)
                    samples.setdefault(key, {})[ext] = archive.extractfile(member).read()
        except tarfile.ReadError:
            pass
    return samples


@pytest.fixture(scope="module")
def messy(tmp_path_factory) -> Path:
    """img2dataset shards (labelled) plus a fifth shard with every kind of bad sample, and a
    sixth cut short after its first sample."""
    directory = make_img2dataset_dir(tmp_path_factory.mktemp("messy") / "src", labels=True)
    good = jpeg(Image.new("RGB", (40, 24), (10, 200, 30)))
    write_tar(directory / f"{NUM_SHARDS:05d}.tar", [
        ("000000900.jpg", b"\xff\xd8 not really a jpeg"),
        ("000000900.cls", b"1"),
        ("000000901.txt", b"a caption without its image"),
        ("000000000.jpg", good),  # the key of the very first sample again
        ("000000000.cls", b"1"),
        ("000000902.jpg", good),
        ("000000902.cls", b"2"),
    ])
    cut = directory / f"{NUM_SHARDS + 1:05d}.tar"
    write_tar(cut, [("000000950.jpg", good), ("000000950.cls", b"0"),
                    ("000000951.jpg", good), ("000000951.cls", b"0")])
    with tarfile.open(cut) as archive:
        second = archive.getmember("000000951.jpg")
    cut.write_bytes(cut.read_bytes()[: second.offset_data + 10])  # inside the second image
    return directory


@pytest.fixture(scope="module")
def resharded(messy, tmp_path_factory):
    out = tmp_path_factory.mktemp("resharded") / "out"
    done = run_cli("data-prep", "reshard", str(messy), str(out), "--size", "12", "--holdout", "0.25",
                   "--samples-per-shard", "5", "--workers", "2")
    assert done.returncode == 0, done.stderr
    return out, done.stdout


def test_reshard_keeps_keys_labels_and_metadata_at_the_new_size(messy, resharded):
    out, _ = resharded
    source = source_members(messy)
    written = {**read_split(out / "train"), **read_split(out / "test")}
    expected_keys = {f"{i:09d}" for i in range(TOTAL)} | {"000000902", "000000950"}
    assert set(written) == expected_keys
    for key, members in written.items():
        image = Image.open(io.BytesIO(members["jpg"]))
        assert image.size == (12, 12) and image.mode == "RGB"
        for ext in ("cls", "txt", "json"):
            if ext in source[key]:
                assert members[ext] == source[key][ext], (key, ext)  # byte for byte
        if key < f"{TOTAL:09d}":  # the sample's colour, centre-cropped, never stretched
            pixels = np.asarray(image).astype(int)[2:-2, 2:-2]
            assert np.abs(pixels - colour(int(key))).max() <= 12
    for split in ("train", "test"):
        manifest = read_manifest(out / split)
        assert manifest.keys == "source" and manifest.num_classes == 3
        assert manifest.image_size == 12 and manifest.encoding == "jpg"
    # the holdout is a function of the key: stable, disjoint
    assert not set(read_split(out / "train")) & set(read_split(out / "test"))
    assert read_split(out / "test")


def test_reshard_lists_every_sample_it_skips(messy, resharded):
    out, printed = resharded
    skipped = {item["path"]: item["reason"]
               for split in ("train", "test") for item in read_manifest(out / split).skipped}
    assert set(skipped) == {"00004.tar/000000900", "00004.tar/000000901", "00004.tar/000000000",
                            "00005.tar"}
    assert "truncated" in skipped["00004.tar/000000900"] or "recognised" in skipped["00004.tar/000000900"]
    assert skipped["00004.tar/000000901"].startswith("no image member")
    assert "repeats the key 000000000" in skipped["00004.tar/000000000"]
    assert "damaged" in skipped["00005.tar"] and "rest of the shard" in skipped["00005.tar"]
    assert "skipped 4 files: 4 unreadable" in printed
    for path in skipped:
        assert f"\n  {path}: " in printed


def test_reshard_output_verifies_and_trains(resharded):
    out, _ = resharded
    done = run_cli("data-prep", "verify", str(out))
    assert done.returncode == 0 and "verify: ok" in done.stdout, done.stdout + done.stderr
    batches = TrainingBatches(resolve_shards(str(out / "train")), seed=0, rank=0, world_size=1,
                              num_workers=0, batch_size=4, image_size=8, channels=1,
                              shuffle_buffer=4, random_flip=False, labels=True)
    batch = batches.next_batch()
    assert tuple(batch.images.shape) == (4, 1, 8, 8) and batch.labels.tolist()
    batches.close()


def test_reshard_is_deterministic_whatever_the_worker_count(messy, tmp_path):
    for workers in ("1", "3"):
        assert main(["reshard", str(messy), str(tmp_path / workers), "--size", "10",
                     "--samples-per-shard", "7", "--workers", workers]) == 0
    one, three = (read_manifest(tmp_path / w / "train") for w in ("1", "3"))
    assert [s.sha256 for s in one.shards] == [s.sha256 for s in three.shards]


def test_reshard_keeps_images_already_ready_byte_for_byte(tmp_path):
    ids = make_id_shards(tmp_path / "ids", 3, 4, 8)  # 8×8 grayscale PNG with labels absent
    assert main(["reshard", str(ids), str(tmp_path / "same"), "--size", "8", "--mode", "L",
                 "--format", "png", "--workers", "1"]) == 0
    before, after = read_split(ids), read_split(tmp_path / "same" / "train")
    assert list(after) == list(before)
    assert all(after[key]["png"] == before[key]["png"] for key in before)
    assert main(["reshard", str(ids), str(tmp_path / "smaller"), "--size", "4", "--mode", "L",
                 "--format", "png", "--workers", "1"]) == 0
    image = Image.open(io.BytesIO(read_split(tmp_path / "smaller" / "train")["000000000"]["png"]))
    assert image.size == (4, 4) and image.mode == "L"


def test_reshard_user_errors(tmp_path, capsys):
    assert main(["reshard", str(tmp_path / "absent"), str(tmp_path / "out")]) == 2
    assert f"SRC_SHARDS: shard {tmp_path / 'absent'} does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    write_tar(bad / "0.tar", [("a.jpg", b"nope"), ("b.txt", b"no image")])
    assert main(["reshard", str(bad), str(tmp_path / "out"), "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert "none of its samples could be re-encoded (first: 0.tar/a:" in err
    assert not (tmp_path / "out" / "train").exists()
