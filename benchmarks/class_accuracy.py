"""How often a class-conditional digits model draws the class it is asked for, per guidance scale.

Method. The run's newest checkpoint (EMA weights when the run has them) samples ``--per-class``
images of each class 0..9 (labels class by class, one seed, the run's ``sample.options``, updated by
the ``key=value`` options after the run directory, with ``guidance`` replaced by each of
``--scales``; families without guidance take one row, scale
null). The digits classifier of `pipeline.digits_quality` (trained on the run's train split,
98.3% accurate on the held-out digits) classifies every image: ``accuracy`` is the fraction whose
most probable class is the asked one, ``sure_accuracy`` the fraction where that class also has
probability >= 0.5, ``per_class`` the accuracy of each class. The same images give the digits
measures of `DigitsQuality.report` (digits FD against the held-out split, its floor at the same
count, IS, confidence, unsure). One JSON line per scale is printed and appended to ``--out``.

    OMP_NUM_THREADS=1 python benchmarks/class_accuracy.py runs/tiny_cond_ddpm --scales 0,1,2,3,5

``seconds`` is the sampling time of the row (all images, one process, CPU unless ``--device``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from launch.sample import parse_options  # noqa: E402
from launch.weights import load_model  # noqa: E402
from pipeline import digits_quality, images  # noqa: E402
from pipeline.errors import UserError, one_line  # noqa: E402
from pipeline.models import check_sample_options  # noqa: E402

DIGIT_CLASSES = 10


def measure(run_dir: str, scales: list[float | None], per_class: int, seed: int, batch_size: int,
            device: str = "cpu", use_ema: bool = True, options: dict | None = None) -> list[dict]:
    """One result row per guidance scale (module docstring); ``options`` are sampling options
    that replace the run's ``sample.options`` (as `launch sample RUN key=value`)."""
    model, manifest, config = load_model(run_dir, use_ema, None, device)
    if model.num_classes != DIGIT_CLASSES:
        raise UserError(f"{run_dir}: the model has model.num_classes={model.num_classes}; this "
                        f"measure needs a class-conditional digits model (10 classes)")
    data = config.data
    quality = digits_quality.build(data.shards, data.eval_shards, image_size=data.image_size,
                                   channels=data.channels, device=device)
    labels = images.class_rows(range(DIGIT_CLASSES), per_class)
    rows = []
    for scale in scales:
        row_options = {**config.sample.options, **(options or {})}
        if scale is not None:
            row_options["guidance"] = scale
        try:
            row_options = check_sample_options(config.model.family, row_options, config.model)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        generator = torch.Generator().manual_seed(seed)
        started = time.perf_counter()
        samples = []
        with torch.no_grad():
            for start in range(0, len(labels), batch_size):
                chunk = labels[start:start + batch_size]
                samples.append(model.sample(len(chunk), generator, labels=chunk, **row_options).cpu())
        seconds = time.perf_counter() - started
        samples = torch.cat(samples)
        features = quality.classifier.features(samples).cpu().double().numpy()
        _, log_probabilities = digits_quality.DigitsClassifier.split(features)
        probabilities = torch.from_numpy(log_probabilities).exp()
        top = probabilities.argmax(1)
        right = top == labels
        sure = probabilities.max(1).values >= digits_quality.SURE
        report = quality.report(features)
        rows.append({
            "run_dir": run_dir, "step": int(manifest["step"]), "objective": getattr(config.model, "objective", None),
            "guidance": scale, "options": row_options, "images": len(labels),
            "accuracy": float(right.double().mean()), "sure_accuracy": float((right & sure).double().mean()),
            "per_class": [float(right[labels == k].double().mean()) for k in range(DIGIT_CLASSES)],
            "digits_fd": report["digits_fd"], "digits_fd_floor": report["digits_reference"]["digits_fd"],
            "digits_is": report["digits_is"], "digits_confidence": report["digits_confidence"],
            "digits_unsure": report["digits_unsure"], "seconds": seconds,
        })
    return rows


def _scales(text: str) -> list[float | None]:
    return [None if part.strip() in ("", "none") else float(part) for part in text.split(",")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("options", nargs="*", default=[],
                        help="sampling options replacing the run's, e.g. sampler=ddim steps=50")
    parser.add_argument("--scales", default="none",
                        help="guidance scales, comma-separated (none: the run's sample.options as they are)")
    parser.add_argument("--per-class", type=int, default=50, help="images per class (default 50)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None, help="append the rows to this JSON-lines file")
    args = parser.parse_args(argv)
    try:
        rows = measure(args.run_dir, _scales(args.scales), args.per_class, args.seed, args.batch_size,
                       args.device, options=parse_options(args.options))
    except UserError as exc:
        print(f"class_accuracy: error: {one_line(exc)}", file=sys.stderr)
        return 2
    for row in rows:
        line = json.dumps(row)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as handle:
                handle.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
