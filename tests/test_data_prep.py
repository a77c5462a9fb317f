"""data_prep: digits and image trees become deterministic shards with manifests; verify checks them.

Everything is made inside tmp_path. Most tests call `data_prep.cli.main` in-process for speed; a
few run the installed `data-prep` command as a real subprocess.
"""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep import sources
from data_prep.cli import build_parser, main, run_images
from pipeline.errors import UserError
from pipeline.manifest import FORMAT, Manifest, ShardInfo, find_manifest, find_split_dirs, read_manifest, write_manifest

SIZE = 16  # small images keep the image-tree tests fast


# --- helpers ------------------------------------------------------------------------------------


def read_samples(split_dir: Path) -> list[dict[str, bytes]]:
    """All samples of a split in order, as {ext: bytes} with "__key__"."""
    manifest = read_manifest(split_dir)
    samples: list[dict] = []
    for shard_path in manifest.shard_paths(split_dir):
        with tarfile.open(shard_path) as archive:
            for member in archive:
                key, ext = member.name.split(".", 1)
                if not samples or samples[-1]["__key__"] != key:
                    samples.append({"__key__": key})
                samples[-1][ext] = archive.extractfile(member).read()
    return samples


def sources_of(split_dir: Path) -> list[str]:
    return [json.loads(s["json"])["source"] for s in read_samples(split_dir)]


def shas(out: Path) -> dict[str, list[str]]:
    return {d.name: [s.sha256 for s in read_manifest(d).shards] for d in find_split_dirs(out)}


def cli_command() -> list[str]:
    script = shutil.which("data-prep")
    return [script] if script else [sys.executable, "-m", "data_prep.cli"]


def jpeg_bytes(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", **kwargs)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims a huge size: PIL must refuse it from the header alone."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def make_tree(root: Path) -> dict[str, str]:
    """A small tree with every awkward kind of file; returns {relative path: what it is}."""
    rng = np.random.default_rng(0)
    (root / "a").mkdir(parents=True)
    (root / "b" / "deep").mkdir(parents=True)
    (root / "bad").mkdir()
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(root / "a" / "rgb.jpg")
    rgba = np.zeros((24, 24, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:12, :, 3] = 255  # bottom half fully transparent: must come out white
    Image.fromarray(rgba).save(root / "a" / "rgba.png")
    palette = Image.new("P", (20, 20), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.save(root / "b" / "palette.png", transparency=1)  # all transparent: all white
    gray16 = np.full((20, 20), 65535, np.uint16)
    gray16[:, :10] = 0
    Image.fromarray(gray16).save(root / "b" / "gray16.png")
    Image.new("CMYK", (20, 20), (0, 255, 255, 0)).save(root / "b" / "deep" / "cmyk.jpg")
    # stored 40x20, top half red, bottom blue; EXIF orientation 6 turns it upright to 20x40
    rotated = Image.new("RGB", (40, 20), (0, 0, 255))
    rotated.paste((255, 0, 0), (0, 0, 40, 10))
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated.save(root / "b" / "deep" / "rotated.jpg", exif=exif)
    Image.new("RGB", (10, 7), (0, 255, 0)).save(root / "tiny.png")
    Image.new("RGB", (20, 20), (9, 9, 9)).save(root / "UPPER.JPEG", format="JPEG")
    (root / "bad" / "not-an-image.jpg").write_bytes(b"this is text, not a jpeg\n" * 10)
    full = jpeg_bytes(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    (root / "bad" / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (root / "bad" / "bomb.png").write_bytes(png_header_only(30000, 30000))
    (root / "notes.txt").write_text("not an image: listed as passed over")
    (root / "b" / "drawing.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg"/>')
    (root / "b" / "phone.heic").write_bytes(b"\x00\x00\x00\x18ftypheic")
    make_gifs(root / "gif")
    return {
        "gif/transparent.gif": "ok", "gif/animated.gif": "ok", "gif/gray.gif": "ok",
        "a/rgb.jpg": "ok", "a/rgba.png": "ok", "b/palette.png": "ok", "b/gray16.png": "ok",
        "b/deep/cmyk.jpg": "ok", "b/deep/rotated.jpg": "ok", "tiny.png": "ok", "UPPER.JPEG": "ok",
        "bad/not-an-image.jpg": "bad", "bad/truncated.jpg": "bad", "bad/bomb.png": "bad",
    }


NOT_IMAGES = {"notes.txt": "unsupported extension .txt", "b/drawing.svg": "unsupported extension .svg"}
if ".heic" not in sources.image_extensions():  # pillow-heif not installed
    NOT_IMAGES["b/phone.heic"] = "unsupported extension .heic (needs pillow-heif"
else:
    NOT_IMAGES["b/phone.heic"] = "not a recognised image"


def make_gifs(directory: Path) -> None:
    """A palette GIF with a transparent index, a two-frame GIF, a grayscale GIF."""
    directory.mkdir()
    transparent = Image.new("P", (20, 20), 0)
    transparent.putpalette([0, 0, 255, 255, 0, 0] + [0] * 762)
    transparent.paste(1, (0, 0, 20, 10))  # top half red, bottom half index 0: transparent
    transparent.save(directory / "transparent.gif", transparency=0)
    frames = [Image.new("RGB", (20, 20), (0, 255, 0)), Image.new("RGB", (20, 20), (255, 0, 255))]
    frames[0].save(directory / "animated.gif", save_all=True, append_images=frames[1:])
    Image.new("L", (20, 20), 77).save(directory / "gray.gif")


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("src")
    return root, make_tree(root)


@pytest.fixture(scope="module")
def digits_out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digits") / "out"
    assert main(["digits", str(out)]) == 0
    return out


@pytest.fixture
def digits_copy(digits_out, tmp_path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(digits_out, copy)
    return copy


# --- manifest -----------------------------------------------------------------------------------


def test_manifest_round_trip_and_errors(tmp_path):
    manifest = Manifest(split="train", image_size=8, channels=3, encoding="jpg", num_samples=5,
                        shards=(ShardInfo("shard-000000.tar", 5, 10240, "0" * 64),),
                        skipped=({"path": "x.jpg", "reason": "truncated"},), source="/src",
                        created="2024-01-01T00:00:00+00:00")
    path = write_manifest(manifest, tmp_path)
    assert find_manifest(tmp_path) == path and not (tmp_path / "manifest.json.tmp").exists()
    assert read_manifest(tmp_path) == manifest == read_manifest(path)
    # every field, but "keys" only when not the default, the classes' names and counts only
    # where known, and "kind"/"latents" only for latent splits (older readers know no such fields)
    assert set(json.loads(path.read_text())) == {f.name for f in dataclasses.fields(Manifest)} - {
        "keys", "class_names", "class_counts", "kind", "latents"}
    latent = dataclasses.replace(manifest, kind="latents", channels=4, encoding="npy", latents={"scale_factor": 0.5})
    assert read_manifest(write_manifest(latent, tmp_path)) == latent
    resharded = dataclasses.replace(manifest, keys="source")
    assert read_manifest(write_manifest(resharded, tmp_path)) == resharded
    named = dataclasses.replace(manifest, num_classes=2, class_names=("cat", "dog"), class_counts=(3, 2))
    assert read_manifest(write_manifest(named, tmp_path)) == named
    assert manifest.format == FORMAT
    assert manifest.shard_paths(tmp_path) == [str(tmp_path / "shard-000000.tar")]

    data = json.loads(path.read_text())
    del data["image_size"]
    path.write_text(json.dumps(data))
    with pytest.raises(UserError, match=r"manifest\.json: missing field 'image_size'"):
        read_manifest(tmp_path)
    data["image_size"] = 8
    data["shards"][0]["num_samples"] = "5"
    path.write_text(json.dumps(data))
    with pytest.raises(UserError, match=r"field 'shards\[0\]\.num_samples' must be an integer"):
        read_manifest(tmp_path)
    path.write_text("{not json")
    with pytest.raises(UserError, match=r"manifest\.json: invalid JSON"):
        read_manifest(tmp_path)
    with pytest.raises(UserError, match="no such manifest"):
        read_manifest(tmp_path / "elsewhere")
    assert find_manifest(tmp_path / "elsewhere") is None


def test_to_8bit_and_assign_split_are_pure_functions():
    floats = Image.fromarray(np.array([[0.0, 0.5], [1.0, 0.25]], np.float32))
    assert np.asarray(sources.to_8bit(floats, "L")).tolist() == [[0, 128], [255, 64]]
    wide = Image.fromarray(np.array([[-10.0, 990.0]], np.float32))  # stretched min..max
    assert np.asarray(sources.to_8bit(wide, "RGB"))[0, :, 0].tolist() == [0, 255]
    bits16 = Image.fromarray(np.array([[0, 257, 65535]], np.uint16))
    assert np.asarray(sources.to_8bit(bits16, "L")).tolist() == [[0, 1, 255]]
    paths = [f"class{i % 3}/img{i}.jpg" for i in range(400)]
    test = [p for p in paths if sources.assign_split(p, 0.25, seed=7) == "test"]
    assert 60 < len(test) < 140
    assert test != [p for p in paths if sources.assign_split(p, 0.25, seed=8) == "test"]
    assert all(sources.assign_split(p, 0.0, seed=7) == "train" for p in paths)


# --- digits -------------------------------------------------------------------------------------


def test_digits_end_to_end(digits_out):
    train, test = read_manifest(digits_out / "train"), read_manifest(digits_out / "test")
    assert train.num_samples + test.num_samples == 1797
    assert test.num_samples == round(1797 * 0.2)
    for manifest in (train, test):
        assert (manifest.image_size, manifest.channels, manifest.encoding) == (32, 1, "png")
        assert manifest.num_classes == 10 and manifest.skipped == ()
        assert all(s.num_samples <= 100 for s in manifest.shards)
        assert sum(s.num_samples for s in manifest.shards) == manifest.num_samples
    samples = read_samples(digits_out / "train")
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(train.num_samples)]
    first = samples[0]
    assert set(first) == {"__key__", "png", "cls", "json"}
    pixels = np.asarray(Image.open(io.BytesIO(first["png"])))
    assert pixels.dtype == np.uint8 and pixels.shape == (32, 32) and pixels.max() > 200
    assert {int(s["cls"]) for s in samples} == set(range(10))
    all_sources = sources_of(digits_out / "train") + sources_of(digits_out / "test")
    assert sorted(all_sources) == sorted(f"sklearn.digits/{i}" for i in range(1797))
    # the label is the digit of that index
    from sklearn.datasets import load_digits
    target = load_digits().target
    index = int(json.loads(first["json"])["source"].split("/")[1])
    assert int(first["cls"]) == target[index]


def test_digits_is_deterministic(digits_out, tmp_path):
    again = tmp_path / "again"
    assert main(["digits", str(again)]) == 0
    assert shas(again) == shas(digits_out)
    with tarfile.open(again / "train" / "shard-000000.tar") as archive:
        member = archive.getmembers()[0]
        assert (member.mtime, member.uid, member.gid, member.uname, member.gname, member.mode) == \
            (0, 0, 0, "", "", 0o644)


def test_digits_again_into_the_same_directory_is_already_prepared(digits_copy, capsys):
    # The README shows `data-prep digits data/digits` after the quickstart made them: the same
    # shards are reported as prepared (nothing rewritten); other options are refused as before.
    before = shas(digits_copy)
    assert main(["digits", str(digits_copy)]) == 0
    assert "train: already prepared, the same shards" in capsys.readouterr().out
    assert shas(digits_copy) == before and sorted(p.name for p in digits_copy.iterdir()) == ["test", "train"]
    assert main(["digits", str(digits_copy), "--seed", "1"]) == 2
    assert "with other digits than these options make" in capsys.readouterr().err and shas(digits_copy) == before


def test_digits_again_is_decided_from_the_manifests_without_making_them_again(digits_out, digits_copy, capsys,
                                                                            monkeypatch):
    # What the manifests record (the options in `source`, the shards' hashes) decides at once.
    def made_again(*args, **kwargs):
        raise AssertionError("the digits were made again")

    monkeypatch.setattr(sources, "digits_splits", made_again)
    assert main(["digits", str(digits_copy)]) == 0
    assert "test: already prepared" in capsys.readouterr().out
    assert main(["digits", str(digits_copy), "--seed", "1"]) == 2
    assert main(["digits", str(digits_copy), "--samples-per-shard", "50"]) == 2
    assert capsys.readouterr().err.count("with other digits than these options make") == 2
    monkeypatch.undo()

    # A damaged shard, or manifests that do not record the options (digits of an older version),
    # are compared the slow way: the digits are made again aside.
    victim = digits_copy / "train" / "shard-000003.tar"
    data = bytearray(victim.read_bytes())
    data[2000:2010] = bytes(255 - b for b in data[2000:2010])  # inside the first image's bytes
    victim.write_bytes(bytes(data))
    assert main(["digits", str(digits_copy)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and str(victim) in error and "sha256" in error and "--overwrite" in error
    shutil.copy(digits_out / "train" / victim.name, victim)
    for split in ("train", "test"):
        path = digits_copy / split / "manifest.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "source": sources.DIGITS_SOURCE}))
    assert main(["digits", str(digits_copy)]) == 0
    assert "train: already prepared" in capsys.readouterr().out


def test_digits_no_test_split(tmp_path):
    out = tmp_path / "out"
    assert main(["digits", str(out), "--size", "8", "--test-fraction", "0",
                 "--samples-per-shard", "1000"]) == 0
    assert [d.name for d in find_split_dirs(out)] == ["train"]
    assert read_manifest(out / "train").num_samples == 1797


# --- images -------------------------------------------------------------------------------------


def test_images_converts_every_mode_and_skips_bad_files(tree, tmp_path, capsys):
    src, kinds = tree
    out = tmp_path / "out"
    assert main(["images", str(src), str(out), "--size", str(SIZE), "--format", "png",
                 "--workers", "1", "--samples-per-shard", "3"]) == 0
    manifest = read_manifest(out / "train")
    good = sorted(p for p, k in kinds.items() if k == "ok")
    bad = sorted(p for p, k in kinds.items() if k == "bad")
    assert manifest.num_samples == len(good) and len(manifest.shards) == -(-len(good) // 3)
    assert sorted(item["path"] for item in manifest.skipped) == sorted(bad + list(NOT_IMAGES))
    reasons = {item["path"]: item["reason"] for item in manifest.skipped}
    assert "not a recognised image" in reasons["bad/not-an-image.jpg"]
    assert "truncated" in reasons["bad/truncated.jpg"]
    assert "decompression bomb" in reasons["bad/bomb.png"]
    for path, reason in NOT_IMAGES.items():
        assert reasons[path].startswith(reason)
    printed = capsys.readouterr().out
    assert (f"skipped 6 files: 3 unreadable, 3 not images by name (extension or hidden) "
            f"(listed in {out / 'train' / 'manifest.json'})") in printed
    for path in bad + list(NOT_IMAGES):  # every one named, with its reason
        assert f"\n  {path}: {reasons[path]}\n" in printed

    samples = read_samples(out / "train")
    assert sorted(sources_of(out / "train")) == good
    assert sources_of(out / "train") != good  # shuffled, not in walk order
    images = {}
    for sample in samples:
        image = Image.open(io.BytesIO(sample["png"]))
        assert image.size == (SIZE, SIZE) and image.mode == "RGB"
        assert set(sample) == {"__key__", "png", "json"}  # no labels for image trees
        images[json.loads(sample["json"])["source"]] = np.asarray(image).astype(int)
    assert (images["b/palette.png"] == 255).all()  # transparent palette on white
    assert (images["a/rgba.png"][-2:] == 255).all()  # transparent half white ...
    assert abs(images["a/rgba.png"][1] - [200, 0, 0]).max() <= 1  # ... opaque half red
    gray = images["b/gray16.png"]
    assert gray[:, 1].max() <= 1 and gray[:, -2].min() >= 254  # 16-bit scaled, not clipped
    cyan = images["b/deep/cmyk.jpg"].mean(axis=(0, 1))
    assert cyan[0] > 200 and cyan[1] < 60 and cyan[2] < 60  # C=0,M=Y=255 is red
    rotated = images["b/deep/rotated.jpg"]  # upright: left half blue, right half red
    assert rotated[SIZE // 2, 1, 2] > 200 and rotated[SIZE // 2, -2, 0] > 200
    tiny = images["tiny.png"]
    assert abs(tiny - [0, 255, 0]).max() <= 2  # 10x7 upscaled to SIZE x SIZE
    gif = images["gif/transparent.gif"]  # top half red, transparent bottom half on white
    assert abs(gif[1] - [255, 0, 0]).max() <= 2 and (gif[-2:] >= 253).all()
    assert abs(images["gif/animated.gif"] - [0, 255, 0]).max() <= 2  # the first frame
    assert abs(images["gif/gray.gif"] - 77).max() <= 1 and images["gif/gray.gif"].shape[-1] == 3


def test_images_mode_l_and_jpg(tree, tmp_path):
    src, _ = tree
    out = tmp_path / "out"
    assert main(["images", str(src), str(out), "--size", "12", "--mode", "L",
                 "--workers", "1", "--quality", "90"]) == 0
    manifest = read_manifest(out / "train")
    assert (manifest.channels, manifest.encoding, manifest.image_size) == (1, "jpg", 12)
    for sample in read_samples(out / "train"):
        image = Image.open(io.BytesIO(sample["jpg"]))
        assert image.size == (12, 12) and image.mode == "L"


def test_holdout_is_stable_when_a_file_is_added(tree, tmp_path):
    src, _ = tree
    copy = tmp_path / "src"
    shutil.copytree(src, copy)
    first, second = tmp_path / "first", tmp_path / "second"
    args = ["--size", "8", "--holdout", "0.5", "--workers", "1", "--format", "png"]
    assert main(["images", str(copy), str(first), *args]) == 0
    before = {split: set(sources_of(first / split)) for split in ("train", "test")}
    assert before["train"] and before["test"]
    for i in range(4):
        Image.new("RGB", (9, 9), (i, i, i)).save(copy / "a" / f"added{i}.png")
    assert main(["images", str(copy), str(second), *args]) == 0
    after = {split: set(sources_of(second / split)) for split in ("train", "test")}
    for split in ("train", "test"):
        assert before[split] <= after[split]
    assert len(after["train"] | after["test"]) == len(before["train"] | before["test"]) + 4
    # skipped files are listed in the split they were assigned to
    skipped = [item["path"] for split in ("train", "test")
               for item in read_manifest(first / split).skipped]
    assert sorted(skipped) == sorted(["bad/bomb.png", "bad/not-an-image.jpg", "bad/truncated.jpg",
                                      *NOT_IMAGES])


def test_parallel_workers_give_the_same_bytes(tree, tmp_path):
    src, _ = tree
    args = ["--size", "8", "--holdout", "0.3", "--samples-per-shard", "2"]
    assert main(["images", str(src), str(tmp_path / "one"), *args, "--workers", "1"]) == 0
    assert main(["images", str(src), str(tmp_path / "two"), *args, "--workers", "2"]) == 0
    assert shas(tmp_path / "one") == shas(tmp_path / "two")


def test_images_user_errors(tree, tmp_path, capsys):
    src, _ = tree
    with pytest.raises(UserError, match="does not exist"):
        run_images(build_parser().parse_args(["images", str(tmp_path / "missing"), "o"]))
    assert main(["images", str(tmp_path / "missing"), str(tmp_path / "o")]) == 2
    assert f"data-prep: error: {tmp_path / 'missing'}: source directory does not exist" in \
        capsys.readouterr().err

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images")
    assert main(["images", str(empty), str(tmp_path / "o")]) == 2
    assert f"{empty}: no image files" in capsys.readouterr().err

    unreadable = tmp_path / "unreadable"
    unreadable.mkdir()
    (unreadable / "a.png").write_bytes(b"nope")
    assert main(["images", str(unreadable), str(tmp_path / "o"), "--workers", "1"]) == 2
    assert f"{unreadable}: none of the 1 image files could be read" in capsys.readouterr().err
    assert not (tmp_path / "o" / "train").exists()  # nothing half-written left behind
    assert [p.name for p in (tmp_path / "o").iterdir()] == []

    out = tmp_path / "out"
    args = ["images", str(src), str(out), "--size", "8", "--workers", "1"]
    assert main(args) == 0
    before = shas(out)
    assert main(args + ["--seed", "1"]) == 2
    assert "already exists" in capsys.readouterr().err and shas(out) == before
    assert main(args + ["--seed", "1", "--overwrite"]) == 0
    assert shas(out) != before


def test_overwrite_removes_a_stale_test_split(tree, tmp_path):
    src, _ = tree
    out = tmp_path / "out"
    args = ["--size", "8", "--workers", "1"]
    assert main(["images", str(src), str(out), *args, "--holdout", "0.5"]) == 0
    assert (out / "test" / "manifest.json").exists()
    assert main(["images", str(src), str(out), *args, "--overwrite"]) == 0
    assert [d.name for d in find_split_dirs(out)] == ["train"] and not (out / "test").exists()


def test_a_holdout_that_holds_out_nothing_is_said(tree, tmp_path, capsys):
    src, _ = tree
    out = tmp_path / "out"
    assert main(["images", str(src), str(out), "--size", "8", "--workers", "1", "--holdout", "1e-9"]) == 0
    captured = capsys.readouterr()
    assert "test: 0 samples in 0 shards" in captured.out
    line = next(line for line in captured.err.splitlines() if "warning" in line)
    train = read_manifest(out / "train").num_samples
    assert line == (f"data-prep: warning: --holdout 1e-09 put none of the {train} samples in the test "
                    "split (it is empty); raise --holdout for a held-out set")
    assert main(["reshard", str(out / "train"), str(tmp_path / "re"), "--size", "8", "--workers", "1",
                 "--holdout", "1e-9"]) == 0
    assert f"put none of the {train} samples" in capsys.readouterr().err
    # a holdout that holds some out says nothing
    assert main(["images", str(src), str(tmp_path / "half"), "--size", "8", "--workers", "1",
                 "--holdout", "0.5"]) == 0
    assert "warning" not in capsys.readouterr().err


# --- verify -------------------------------------------------------------------------------------


def test_verify_passes_on_good_output(digits_out, capsys):
    assert main(["verify", str(digits_out)]) == 0
    assert "verify: ok" in capsys.readouterr().out
    assert main(["verify", str(digits_out / "test"), "--no-decode"]) == 0


def test_verify_reports_truncated_flipped_and_missing_shards(digits_copy, capsys):
    train = digits_copy / "train"
    truncated, flipped, missing = (train / f"shard-00000{i}.tar" for i in range(3))
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2 + 100])
    data = bytearray(flipped.read_bytes())
    data[len(data) // 3] ^= 0xFF
    flipped.write_bytes(bytes(data))
    missing.unlink()
    assert main(["verify", str(digits_copy)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert any(str(truncated) in line and "size" in line for line in lines)
    assert any(str(truncated) in line and ("samples" in line or "unreadable" in line) for line in lines[1:])
    assert any(str(flipped) in line and "sha256" in line for line in lines)
    assert any(str(missing) in line and "missing shard" in line for line in lines)
    assert lines[-1].startswith("verify: ") and "problems" in lines[-1]


def test_verify_checks_image_size_against_manifest(digits_copy, capsys):
    manifest = read_manifest(digits_copy / "test")
    write_manifest(dataclasses.replace(manifest, image_size=16), digits_copy / "test")
    assert main(["verify", str(digits_copy / "test")]) == 1
    assert "image 32x32, manifest says 16x16" in capsys.readouterr().out
    assert main(["verify", str(digits_copy / "test"), "--no-decode"]) == 0


def test_verify_user_errors(digits_copy, tmp_path, capsys):
    assert main(["verify", str(tmp_path / "nothing")]) == 2
    assert "no manifest.json here" in capsys.readouterr().err
    (digits_copy / "train" / "manifest.json").write_text('{"split": "train"')
    assert main(["verify", str(digits_copy)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("data-prep: error: ") and "manifest.json: invalid JSON" in err
    (digits_copy / "train" / "manifest.json").write_text('{"split": "train"}')
    assert main(["verify", str(digits_copy)]) == 2
    assert "missing field 'image_size'" in capsys.readouterr().err


# --- the installed command ----------------------------------------------------------------------


def test_cli_subprocess_images_verify_and_errors(tree, tmp_path):
    src, _ = tree
    out = tmp_path / "out"

    def run(*args):
        return subprocess.run([*cli_command(), *args], capture_output=True, text=True, timeout=120)

    done = run("images", str(src), str(out), "--size", "8", "--workers", "2", "--holdout", "0.3")
    assert done.returncode == 0, done.stderr
    assert "skipped 6 files: 3 unreadable, 3 not images by name" in done.stdout
    assert "\n  notes.txt: unsupported extension .txt\n" in done.stdout
    done = run("verify", str(out))
    assert done.returncode == 0 and "verify: ok" in done.stdout, done.stdout + done.stderr
    done = run("images", str(tmp_path / "missing"), str(out))
    assert done.returncode == 2
    missing = tmp_path / "missing"
    assert done.stderr.strip() == f"data-prep: error: {missing}: source directory does not exist"
    assert "Traceback" not in done.stderr
