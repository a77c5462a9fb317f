"""`data-prep`: turn images into WebDataset shards with manifests, and check them.

    data-prep digits OUT      sklearn's 8x8 digits, upscaled, with labels (the default data set)
    data-prep images SRC OUT  a directory tree of image files, resized and centre-cropped
                              (files it passes over are counted, listed, and say why);
                              --labels folders: the first folder under SRC is the class
    data-prep reshard SRC OUT WebDataset shards of any origin (img2dataset's, ours; a directory,
                              pattern or URL) re-encoded at one size, keys and metadata kept
    data-prep verify OUT      check shards against their manifests
    data-prep latents AE_RUN SHARDS OUT
                              image shards encoded by an autoencoder run into latent shards
                              (data_prep/latents.py, docs/latent.md)

Output: ``OUT/train/shard-000000.tar ...`` and ``OUT/test/...`` (only with a test fraction or a
holdout), each split with its ``manifest.json``. `main` returns the exit status: 0 success,
1 problems found by verify, 2 a user error (printed as one line, no traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import multiprocessing
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from data_prep import latents, sources
from data_prep.writer import Sample, ShardWriter, StagedOutput, finish_split, write_split
from pipeline import cliargs
from pipeline.decode import IMAGE_MEMBERS
from pipeline.errors import UserError
from pipeline.manifest import MANIFEST_NAME, read_manifest


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return parse


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


def _quality(text: str) -> int:
    value = _int_at_least(1)(text)
    if value > 100:
        raise argparse.ArgumentTypeError(f"must be at most 100, got {value}")
    return value


def _default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the CPUs this process may use (Slurm, taskset)
    except AttributeError:
        return os.cpu_count() or 1


def build_parser() -> argparse.ArgumentParser:
    parser = cliargs.Parser(prog="data-prep", description=__doc__.split("\n")[0])
    commands = cliargs.subcommands(parser, dest="command", required=True, metavar="COMMAND")

    digits = commands.add_parser("digits", help="sklearn's 8x8 digits as shards (with labels)")
    digits.add_argument("out", metavar="OUT", help="output directory")
    digits.add_argument("--size", type=_int_at_least(1), default=32, help="image side (default 32)")
    digits.add_argument("--test-fraction", type=_fraction, default=0.2,
                        help="fraction held out as the test split (default 0.2)")
    digits.add_argument("--samples-per-shard", type=_int_at_least(1), default=100)
    digits.add_argument("--seed", type=int, default=0, help="seed of the split and order")
    digits.add_argument("--overwrite", action="store_true", help="replace existing splits in OUT")

    images = commands.add_parser("images", help="a directory tree of images as shards")
    images.add_argument("src", metavar="SRC", help="directory searched recursively for images")
    images.add_argument("out", metavar="OUT", help="output directory")
    images.add_argument("--size", type=_int_at_least(1), default=256,
                        help="image side (default 256)")
    images.add_argument("--holdout", type=_fraction, default=0.0,
                        help="fraction of files held out as the test split (default 0)")
    images.add_argument("--mode", choices=("RGB", "L"), default="RGB")
    images.add_argument("--format", choices=("jpg", "png", "webp"), default="jpg",
                        help="encoding of the stored images (default jpg)")
    images.add_argument("--quality", type=_quality, default=95,
                        help="jpg/webp quality (default 95)")
    images.add_argument("--samples-per-shard", type=_int_at_least(1), default=1000)
    images.add_argument("--workers", type=_int_at_least(1), default=None,
                        help="decoding processes (default: the CPUs available)")
    images.add_argument("--seed", type=int, default=0, help="seed of the holdout and order")
    images.add_argument("--labels", choices=("none", "folders"), default="none",
                        help="folders: label each image by the first folder under SRC (ImageFolder's "
                             "SRC/<class>/...; classes in sorted order, names and counts in the "
                             "manifest); none: unlabelled (default)")
    images.add_argument("--overwrite", action="store_true", help="replace existing splits in OUT")

    reshard = commands.add_parser(
        "reshard", help="WebDataset shards (img2dataset's, ours, ...) re-encoded at one size")
    reshard.add_argument("src", metavar="SRC_SHARDS",
                         help="shards in any form data.shards takes: a directory, a brace pattern "
                              "or glob, a .tar, s3:// or http(s):// URLs")
    reshard.add_argument("out", metavar="OUT", help="output directory")
    reshard.add_argument("--size", type=_int_at_least(1), default=256,
                         help="image side (default 256)")
    reshard.add_argument("--holdout", type=_fraction, default=0.0,
                         help="fraction of samples (by key) held out as the test split (default 0)")
    reshard.add_argument("--mode", choices=("RGB", "L"), default="RGB")
    reshard.add_argument("--format", choices=("jpg", "png", "webp"), default="jpg",
                         help="encoding of the stored images (default jpg)")
    reshard.add_argument("--quality", type=_quality, default=95,
                         help="jpg/webp quality (default 95)")
    reshard.add_argument("--samples-per-shard", type=_int_at_least(1), default=1000)
    reshard.add_argument("--workers", type=_int_at_least(1), default=None,
                         help="decoding processes (default: the CPUs available)")
    reshard.add_argument("--seed", type=int, default=0, help="seed of the holdout")
    reshard.add_argument("--overwrite", action="store_true", help="replace existing splits in OUT")

    verify = commands.add_parser("verify", help="check shards against their manifests")
    verify.add_argument("out", metavar="OUT", help="output directory, or one split directory")
    verify.add_argument("--no-decode", action="store_true",
                        help="skip decoding every image (files, sizes, hashes, counts only)")
    latents.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "digits":
            return run_digits(args)
        if args.command == "images":
            return run_images(args)
        if args.command == "reshard":
            return run_reshard(args)
        if args.command == "latents":
            return latents.run(args)
        return run_verify(args)
    except UserError as exc:
        print(f"data-prep: error: {exc}", file=sys.stderr)
        return UserError.exit_code


def _report(manifest, directory: Path) -> None:
    count = len(manifest.shards)
    print(f"{manifest.split}: {manifest.num_samples} samples in {count} "
          f"shard{'s' if count != 1 else ''} -> {directory}")


def _warn_empty_holdout(manifests: dict, holdout: float) -> None:
    """A --holdout that put no sample in the test split: said on stderr (the train split is
    still good), since held-out evaluation on that split would find nothing to score."""
    test = manifests.get("test")
    if test is not None and test.num_samples == 0:
        total = sum(m.num_samples for m in manifests.values())
        print(f"data-prep: warning: --holdout {holdout:g} put none of the {total} samples in the "
              f"test split (it is empty); raise --holdout for a held-out set", file=sys.stderr)


def run_digits(args: argparse.Namespace) -> int:
    splits = ["train"] + (["test"] if args.test_fraction > 0 else [])
    if not args.overwrite and all((Path(args.out) / split / "manifest.json").is_file() for split in splits):
        return _digits_again(args, splits)
    output = StagedOutput(args.out, splits, args.overwrite)
    try:
        samples = sources.digits_splits(args.size, args.test_fraction, args.seed)
        manifests = {
            split: write_split(samples[split], output.path(split), split=split,
                               image_size=args.size, channels=1, encoding="png",
                               samples_per_shard=args.samples_per_shard,
                               source=sources.digits_source(args.size, args.test_fraction, args.seed),
                               num_classes=10)
            for split in splits
        }
        # The classifier of the digits sample-quality measure, trained on the train split only.
        from pipeline import digits_quality

        classifier = digits_quality.write_classifier(output.path("train")).name
        finals = output.commit()
    except BaseException:
        output.discard()
        raise
    for split in splits:
        _report(manifests[split], finals[split])
    print(f"sample-quality classifier -> {finals['train'] / classifier}")
    return 0


def _digits_again(args: argparse.Namespace, splits: list[str]) -> int:
    """``data-prep digits OUT`` where OUT already holds digits: the same digits are "already
    prepared" (exit 0, nothing touched); digits of other options are refused as any existing
    output is, and so are damaged ones (the shards no longer match their manifest).

    The manifests record the options that decide every byte (size, test fraction and seed in
    ``source``, the shard size in the shards), so this takes milliseconds. Digits written before
    the options were recorded are made again aside (the embedded data are deterministic) and
    compared shard by shard."""
    import tempfile

    from data_prep.verify import verify_split

    out = Path(args.out)
    for split in splits:
        problems = verify_split(out / split, decode=False)
        if problems:
            raise UserError(f"{problems[0]} (pass --overwrite to make the digits again)")
    same = _same_options(out, splits, args)
    if same is None:
        with tempfile.TemporaryDirectory(prefix=".digits-check-", dir=out) as scratch:
            fresh = argparse.Namespace(**{**vars(args), "out": scratch, "overwrite": True})
            with contextlib.redirect_stdout(io.StringIO()):
                run_digits(fresh)
            same = all(_shard_hashes(out / split) == _shard_hashes(Path(scratch) / split) for split in splits)
    if not same:
        raise UserError(f"{out / splits[0]}: output split already exists and is not empty, with other digits "
                        f"than these options make (pass --overwrite to replace it)")
    for split in splits:
        print(f"{split}: already prepared, the same shards -> {out / split}")
    return 0


def _same_options(out: Path, splits: list[str], args: argparse.Namespace) -> bool | None:
    """Whether the manifests of OUT record these options (None: they record none, as before the
    options were recorded, or the classifier is missing)."""
    from pipeline.manifest import DIGITS_CLASSIFIER

    expected = sources.digits_source(args.size, args.test_fraction, args.seed)
    for split in splits:
        manifest = read_manifest(out / split)
        if manifest.source != expected:
            return False if manifest.source.startswith(sources.DIGITS_SOURCE + " (") else None
        if manifest.shards[0].num_samples != min(args.samples_per_shard, manifest.num_samples):
            return False
    return True if (out / "train" / DIGITS_CLASSIFIER).is_file() else None


def _shard_hashes(directory: Path) -> list[tuple[str, str]]:
    manifest = json.loads((directory / "manifest.json").read_text())
    return [(shard["name"], shard["sha256"]) for shard in manifest["shards"]]


def run_images(args: argparse.Namespace) -> int:
    src = Path(args.src)
    if not src.exists():
        raise UserError(f"{src}: source directory does not exist")
    if not src.is_dir():
        raise UserError(f"{src}: source is not a directory")
    paths, passed_over = sources.scan_tree(src)
    class_names, label_of = [], {}
    if args.labels == "folders":
        class_names, label_of = sources.folder_classes(paths)
        passed_over = sorted(passed_over + [{"path": path, "reason": sources.NO_CLASS_FOLDER}
                                            for path in paths if path not in label_of],
                             key=lambda item: item["path"])
        paths = [path for path in paths if path in label_of]
        if not class_names:
            raise UserError(f"{src}: --labels folders needs the images in one folder per class "
                            f"(SRC/<class>/...); every image is directly in {src}")
    if not paths:
        extensions = ", ".join(sorted(sources.image_extensions()))
        raise UserError(f"{src}: no image files ({extensions}) found"
                        + (f"; passed over {len(passed_over)} other file(s), first "
                           f"{passed_over[0]['path']}: {passed_over[0]['reason']}"
                           if passed_over else ""))
    split_of = {path: sources.assign_split(path, args.holdout, args.seed) for path in paths}
    splits = ["train"] + (["test"] if args.holdout > 0 else [])
    workers = max(1, min(args.workers or _default_workers(), len(paths)))
    decode = functools.partial(sources.decode_file, str(src), size=args.size, mode=args.mode,
                               encoding=args.format, quality=args.quality)
    output = StagedOutput(args.out, splits, args.overwrite)
    pool = None
    try:
        if workers > 1:
            # spawn: workers never inherit the parent's threads or locks (torch, pytest, ...)
            pool = multiprocessing.get_context("spawn").Pool(workers)
        manifests = {}
        for split in splits:
            order = sources.shuffled([p for p in paths if split_of[p] == split], args.seed)
            skipped = [item for item in passed_over
                       if sources.assign_split(item["path"], args.holdout, args.seed) == split]
            samples = _decoded(order, decode, pool, workers, skipped, label_of)
            manifests[split] = write_split(
                samples, output.path(split), split=split, image_size=args.size,
                channels=1 if args.mode == "L" else 3, encoding=args.format,
                samples_per_shard=args.samples_per_shard, source=str(src.resolve()),
                skipped=skipped, num_classes=len(class_names), class_names=tuple(class_names))
        if sum(m.num_samples for m in manifests.values()) == 0:
            raise UserError(f"{src}: none of the {len(paths)} image files could be read "
                            f"(first: {paths[0]})")
        finals = output.commit()
    except BaseException:
        output.discard()
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    for split in splits:
        _report(manifests[split], finals[split])
    _warn_empty_holdout(manifests, args.holdout)
    if class_names:
        counts = ", ".join(f"{name} {sum(m.class_counts[label] for m in manifests.values())}"
                           for label, name in enumerate(class_names))
        print(f"{len(class_names)} classes (labels 0..{len(class_names) - 1} in this order): {counts}")
    _report_skipped({split: (manifests[split], finals[split]) for split in splits})
    return 0


SKIPPED_SHOWN = 50  # lines of the summary naming skipped files; the manifests list them all


def _report_skipped(written: dict) -> None:
    """Count and name every input left out (unreadable, unsupported), and where all are listed."""
    skipped = sorted((item for manifest, _ in written.values() for item in manifest.skipped),
                     key=lambda item: item["path"])
    if not skipped:
        return
    unsupported = sum(item["reason"].startswith(sources.NOT_READ) for item in skipped)
    unfoldered = sum(item["reason"] == sources.NO_CLASS_FOLDER for item in skipped)
    unreadable = len(skipped) - unsupported - unfoldered
    kinds = [f"{unreadable} unreadable"] if unreadable else []
    if unsupported:
        kinds.append(f"{unsupported} not images by name (extension or hidden)")
    if unfoldered:
        kinds.append(f"{unfoldered} outside a class folder")
    where = ", ".join(str(final / MANIFEST_NAME) for manifest, final in written.values()
                      if manifest.skipped)
    plural = "s" if len(skipped) != 1 else ""
    print(f"skipped {len(skipped)} file{plural}: {', '.join(kinds)} (listed in {where})")
    for item in skipped[:SKIPPED_SHOWN]:
        print(f"  {item['path']}: {item['reason']}")
    if len(skipped) > SKIPPED_SHOWN:
        print(f"  ... and {len(skipped) - SKIPPED_SHOWN} more (listed in {where})")


def _decoded(order: list[str], decode, pool, workers: int, skipped: list[dict],
             label_of: dict[str, int] | None = None) -> Iterator[Sample]:
    """Samples of the decodable files of `order`, in that order (labelled from `label_of` when
    given); the others go to `skipped`."""
    if pool is None:
        results = (decode(path) for path in order)
    else:
        # imap keeps the input order whatever the workers' speed: deterministic output
        chunk = max(1, min(32, len(order) // (8 * workers) or 1))
        results = pool.imap(decode, order, chunksize=chunk)
    for path, data, reason in results:
        if data is None:
            skipped.append({"path": path, "reason": reason})
        else:
            yield Sample(image=data, source=path, label=label_of.get(path) if label_of else None)


RESHARD_CHUNK = 32  # samples sent to a worker at once


def run_reshard(args: argparse.Namespace) -> int:
    """Re-encode every sample of SRC_SHARDS at --size, in source order, into OUT's splits.

    Keys, labels (.cls) and every other member (.txt captions, .json metadata, ...) are kept as
    they are; images already in the asked encoding, size and mode are kept byte for byte. A
    sample whose image does not decode, a repeated key and a damaged source shard are skipped
    and listed (in the manifest and the summary).
    """
    from pipeline.shard_io import FetchPolicy
    from pipeline.shards import resolve_shards

    shards = resolve_shards(args.src, "SRC_SHARDS")
    splits = ["train"] + (["test"] if args.holdout > 0 else [])
    workers = max(1, args.workers or _default_workers())
    convert = functools.partial(sources.convert_samples, size=args.size, mode=args.mode,
                                encoding=args.format, quality=args.quality)
    output = StagedOutput(args.out, splits, args.overwrite)
    writers = {split: ShardWriter(output.path(split), args.samples_per_shard, args.format)
               for split in splits}
    skipped: dict[str, list[dict]] = {split: [] for split in splits}
    keys: dict[str, set[str]] = {split: set() for split in splits}
    labels: dict[str, list[int | None]] = {split: [] for split in splits}
    pool = None
    try:
        if workers > 1:
            pool = multiprocessing.get_context("spawn").Pool(workers)
        source_samples = _source_samples(shards.urls, FetchPolicy(), skipped[splits[0]])
        for where, key, members, encoded, reason in _reencoded(source_samples, convert, pool, workers):
            split = sources.assign_split(key, args.holdout, args.seed)
            if encoded is None:
                skipped[split].append({"path": where, "reason": reason})
                continue
            if key in keys[split]:
                skipped[split].append({"path": where, "reason": f"repeats the key {key} of an "
                                                              "earlier sample"})
                continue
            keys[split].add(key)
            extra = tuple(sorted((ext, data) for ext, data in members.items()
                                 if ext not in IMAGE_MEMBERS))
            labels[split].append(_label(members.get("cls")))
            writers[split].write(Sample(image=encoded, source=where, key=key, extra=extra))
        if sum(writer.num_samples for writer in writers.values()) == 0:
            raise UserError(f"{args.src}: none of its samples could be re-encoded"
                            + (f" (first: {_first_skipped(skipped)})" if _first_skipped(skipped) else ""))
        manifests = {
            split: finish_split(writers[split], split=split, image_size=args.size,
                                channels=1 if args.mode == "L" else 3, source=str(args.src),
                                skipped=skipped[split], num_classes=_num_classes(labels[split]),
                                keys="source")
            for split in splits
        }
        finals = output.commit()
    except BaseException:
        for writer in writers.values():
            writer.abort()
        output.discard()
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    for split in splits:
        _report(manifests[split], finals[split])
    _warn_empty_holdout(manifests, args.holdout)
    _report_skipped({split: (manifests[split], finals[split]) for split in splits})
    return 0


def _source_samples(urls, fetch, skipped: list[dict]) -> Iterator[tuple[str, str, dict]]:
    """(shard name/key, key, members) of every source sample; a damaged shard is listed."""
    from pipeline.shard_io import iter_raw_samples, opened_shards

    for url, downloaded in opened_shards(list(urls), fetch):
        name = url.rstrip("/").rsplit("/", 1)[-1]
        try:
            for key, members in iter_raw_samples(url, downloaded):
                yield f"{name}/{key}", key, members
        except UserError as exc:
            skipped.append({"path": name, "reason": f"rest of the shard not read: {exc}"})


def _reencoded(samples, convert, pool, workers: int):
    """(where, key, members, encoded image or None, reason) in source order, the decoding spread
    over `pool` in chunks, at most a few chunks per worker in flight (bounded memory)."""
    import collections

    def chunks():
        chunk = []
        for where, key, members in samples:
            chunk.append((where, key, members))
            if len(chunk) == RESHARD_CHUNK:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    def images(chunk):
        found = [(key, next((members[e] for e in IMAGE_MEMBERS if e in members), None))
                 for _, key, members in chunk]
        return [(key, data) for key, data in found if data is not None]

    def results(chunk, converted):
        converted = iter(converted)
        for where, key, members in chunk:
            if not any(e in members for e in IMAGE_MEMBERS):
                yield where, key, members, None, f"no image member (members: {', '.join(sorted(members))})"
                continue
            encoded, reason = next(converted)
            yield where, key, members, encoded, reason

    if pool is None:
        for chunk in chunks():
            yield from results(chunk, convert(images(chunk)))
        return
    in_flight: collections.deque = collections.deque()
    for chunk in chunks():
        in_flight.append((chunk, pool.apply_async(convert, (images(chunk),))))
        if len(in_flight) >= 3 * workers:
            done, pending = in_flight.popleft()
            yield from results(done, pending.get())
    while in_flight:
        done, pending = in_flight.popleft()
        yield from results(done, pending.get())


def _label(data: bytes | None) -> int | None:
    try:
        return int(data.decode("ascii").strip()) if data is not None else None
    except (UnicodeDecodeError, ValueError):
        return None


def _num_classes(labels: list[int | None]) -> int:
    """max label + 1 when every sample has a non-negative integer label, else 0 (unlabelled)."""
    if not labels or any(label is None or label < 0 for label in labels):
        return 0
    return max(labels) + 1


def _first_skipped(skipped: dict[str, list[dict]]) -> str:
    for items in skipped.values():
        if items:
            return f"{items[0]['path']}: {items[0]['reason']}"
    return ""


def run_verify(args: argparse.Namespace) -> int:
    from data_prep.verify import verify

    split_dirs, problems = verify(args.out, decode=not args.no_decode)
    for line in problems:
        print(line)
    names = ", ".join(str(d) for d in split_dirs)
    if problems:
        print(f"verify: {len(problems)} problem{'s' if len(problems) != 1 else ''} in {names}")
        return 1
    print(f"verify: ok ({names})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
