"""Sample quality on the embedded digits: a small digits classifier's Fréchet distance ("digits
FD"), Inception-style score, confidence and class coverage of generated images, always reported
beside the same measures of the held-out real digits.

Inception features say little about 32×32 grayscale digits (and their weights cannot be
downloaded here); a classifier trained on the digits' own train split answers what matters on
them: does a sample look like *a* digit, which one, and do all ten appear.

Every image, real or generated, goes through one preprocessing (`digit_inputs`): luminance
(ITU-R 601 weights, as PIL's "L"), area-averaged to the digits' source resolution 8×8, scaled
to [0, 1]. Any sample resolution and channel count therefore works.

The classifier (`DigitsClassifier`) is an MLP 64 → 128 → 64 → 10 with ReLUs: its 64 penultimate
pre-activations are the FD features, its softmax is p(y|x). It is trained deterministically
(seeded initialisation, order and junk, one thread) on the train split only, with outlier
exposure (Hendrycks et al. 2019): uniform noise and pixel-scrambled training digits are trained
towards a uniform prediction, so unstructured images get a low confidence instead of an arbitrary
confident class. Its weights are plain tensors in ``digits_classifier.safetensors`` beside the
train split's manifest, written by ``data-prep digits``, or trained at first use and cached there
(atomic write; never a pickle), keyed by the recipe and the train shards' names and sizes.

Measures of N images (`DigitsQuality.report`, keys ``digits_*``):

- ``fd``: Fréchet distance of the features to the held-out split's (as `pipeline.fid`);
- ``is``: exp(E_x KL(p(y|x) ‖ p(y))), p(y) the mean prediction (Salimans et al. 2016), 1 to 10;
- ``confidence``: the mean of max_y p(y|x);
- ``class_histogram``: how many images each class is the prediction for, counting an image only
  when its top class has probability ≥ 0.5 (``unsure``: the fraction of the others, whose argmax
  of a near-uniform prediction names no class); ``classes_covered``: classes predicted for at
  least 2% of all images (a fifth of a uniform share: a class the model draws at all, however
  many images are unsure); ``class_entropy``: -Σ s ln s / ln 10 over the
  classes' shares s of all images (1: all ten equally often and no image unsure).

The reference (``digits_reference``) is the same on the held-out split, with the classifier's
accuracy there and, as the FD floor, the FD of real train images to the held-out ones: as many
train images as samples (all of them at most), since FD is biased upward at small N by an amount
that depends on N.

Across processes (`sample_quality`, `build`): each process generates and classifies its share of
the images (seeded per process, as `pipeline.fid`), the rows are gathered, and rank 0 reports;
rank 0 alone reads the shards and loads or trains the classifier, then broadcasts its weights.
`SampleQualityEval` is the trainer's component for ``eval.sample_quality_images`` (``due`` on FID's
schedule rule, ``run``: the ``eval/digits_*`` values with their references); ``launch eval
--sample-quality`` calls `build` and `sample_quality`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pipeline import fid
from pipeline.errors import UserError
from pipeline.manifest import DIGITS_CLASSIFIER

log = logging.getLogger(__name__)

SOURCE_SIDE = 8
"""The digits' source resolution: every image is area-averaged back to 8×8 before classifying."""
NUM_CLASSES = 10
FEATURE_DIMS = 64
COVERED_SHARE = 0.2
"""A class is covered when it is predicted for at least this fraction of a uniform share (1/10)
of all images: 2%, low enough that unsure images (counted apart) do not hide a class."""
SURE = 0.5
"""An image counts as a prediction of its top class only when that class has at least this
probability (more than all the others together); below it the image is "unsure": the argmax of a
near-uniform prediction (junk, by outlier exposure) names no class."""
CLASSIFIER_FILE = DIGITS_CLASSIFIER
LUMINANCE = (0.299, 0.587, 0.114)
"""ITU-R 601 luma weights, the ones PIL uses to convert RGB to "L"."""
NEEDS_LABELS = "the digits sample-quality measure needs the labelled shards that `data-prep digits` writes"
METRICS = ("fd", "is", "confidence", "classes_covered", "class_entropy")


@dataclass(frozen=True)
class Recipe:
    """How the classifier is trained; part of the cache key, so a change retrains it."""

    epochs: int = 40
    batch_size: int = 128
    lr: float = 5e-3
    weight_decay: float = 1e-4
    outlier_weight: float = 0.5
    seed: int = 0
    version: int = 1


RECIPE = Recipe()


# ---------------------------------------------------------------------------------------------
# The classifier


def digit_inputs(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, C, H, W] (C = 1 or 3, any H, W) -> float [B, 64] in [0, 1]: luminance,
    area-averaged to 8×8."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected uint8 images [B, 1 or 3, H, W], got shape {tuple(images.shape)}")
    x = images.float() / 255.0
    if x.shape[1] == 3:
        weights = torch.tensor(LUMINANCE, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        x = (x * weights).sum(1, keepdim=True)
    return F.adaptive_avg_pool2d(x, SOURCE_SIDE).flatten(1)


class DigitsClassifier(fid.FeatureExtractor):
    """MLP on 8×8 digits. `features` returns, per image, the 64 FD features and the 10 class
    log-probabilities side by side (one row, so that one gather moves both); `split` parts them."""

    dims = FEATURE_DIMS + NUM_CLASSES

    def __init__(self):
        super().__init__()
        # nn.Linear's default initialisation draws from the global generator: leave it untouched,
        # so that measuring (on rank 0 only, in training) never shifts the training's random stream
        with torch.random.fork_rng(devices=[]):
            self.hidden = nn.Linear(SOURCE_SIDE * SOURCE_SIDE, 128)
            self.embed = nn.Linear(128, FEATURE_DIMS)
            self.head = nn.Linear(FEATURE_DIMS, NUM_CLASSES)
        self.id = "digits_mlp-untrained"

    def refresh_id(self) -> None:
        self.id = f"digits_mlp-{fid.weights_hash(self)}"

    def embedding(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.embed(F.relu(self.hidden(inputs)))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Logits of [B, 64] inputs."""
        return self.head(F.relu(self.embedding(inputs)))

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        device = next(self.parameters()).device
        embedding = self.embedding(digit_inputs(images.to(device)))
        return torch.cat([embedding, F.log_softmax(self.head(F.relu(embedding)), 1)], 1).float()

    @staticmethod
    def split(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(features [N, 64], class log-probabilities [N, 10]) of `features` rows."""
        return rows[:, :FEATURE_DIMS], rows[:, FEATURE_DIMS:]


def _outliers(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Junk with no digit in it: uniform noise at a random brightness, and the batch's digits
    with their pixels scrambled (the same ink, no strokes)."""
    count = len(batch)
    noise = torch.rand(count, batch.shape[1], generator=generator) * torch.rand(count, 1, generator=generator)
    order = torch.rand(count, batch.shape[1], generator=generator).argsort(1)
    return torch.cat([noise, torch.gather(batch, 1, order)])


def train_classifier(images: torch.Tensor, labels: torch.Tensor, recipe: Recipe = RECIPE) -> DigitsClassifier:
    """A classifier trained on ``images`` (uint8 [N, C, H, W]) and ``labels`` (0..9); the same
    inputs give the same weights (on the same CPU and library)."""
    inputs = digit_inputs(images.cpu())
    labels = labels.cpu().long()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the same sums in the same order whatever the machine
    try:
        generator = torch.Generator().manual_seed(recipe.seed)
        classifier = DigitsClassifier()
        with torch.no_grad():
            for parameter in classifier.parameters():
                if parameter.dim() > 1:  # He initialisation, from the recipe's generator
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * (2 / parameter.shape[1]) ** 0.5)
                else:
                    parameter.zero_()
        optimizer = torch.optim.AdamW(classifier.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
        with torch.enable_grad():
            for _ in range(recipe.epochs):
                order = torch.randperm(len(inputs), generator=generator)
                for start in range(0, len(inputs), recipe.batch_size):
                    index = order[start:start + recipe.batch_size]
                    batch = inputs[index]
                    loss = F.cross_entropy(classifier(batch), labels[index])
                    junk = _outliers(batch, generator)
                    # cross-entropy to the uniform distribution (outlier exposure)
                    loss = loss - recipe.outlier_weight * F.log_softmax(classifier(junk), 1).mean()
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
    finally:
        torch.set_num_threads(threads)
    classifier.eval()
    classifier.refresh_id()
    return classifier


# ---------------------------------------------------------------------------------------------
# Labelled shards and the cached classifier


def check_labelled(shards, key: str) -> None:
    """Fail early when a prepared split's manifest says it holds no digit labels."""
    manifest = shards.manifest
    if manifest is not None and manifest.num_classes != NUM_CLASSES:
        where = Path(shards.urls[0]).parent
        raise UserError(f"{key}: {where} holds {manifest.num_classes or 'no'} classes of labels, not 10; "
                        f"{NEEDS_LABELS}")


def read_labelled(shards, key: str, image_size: int, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images [N, C, H, W], labels [N]) of every sample of ``shards``, in shard order."""
    from pipeline.data import decode_image, iter_raw_samples

    check_labelled(shards, key)
    images, labels = [], []
    for url in shards.urls:
        for sample_key, sample in iter_raw_samples(url):
            text = sample.get("cls", b"").decode("ascii", "replace").strip()
            if not text.isdigit() or int(text) >= NUM_CLASSES:
                what = "has no label (.cls)" if not text else f"has the label {text!r}, not 0..9"
                raise UserError(f"{key}: shard {url} sample {sample_key} {what}; {NEEDS_LABELS}")
            images.append(decode_image(sample, sample_key, url, image_size, channels))
            labels.append(int(text))
    if not images:
        raise UserError(f"{key}: no images in {shards.urls[0]}{' ...' if len(shards.urls) > 1 else ''}")
    return torch.from_numpy(np.stack(images)), torch.tensor(labels)


def classifier_path(train_shards) -> Path | None:
    """``<train split>/digits_classifier.safetensors`` beside the manifest; another shard list
    gets a name with a hash of its URLs beside its first shard; ``pipe:`` commands and remote
    URLs: not cached (trained in memory each time)."""
    first = train_shards.urls[0]
    if first.startswith("pipe:") or "://" in first:
        return None
    directory = Path(first).parent
    if train_shards.manifest is not None and (directory / "manifest.json").is_file():
        return directory / CLASSIFIER_FILE
    urls = hashlib.sha256("\n".join(train_shards.urls).encode()).hexdigest()[:8]
    return directory / f"{Path(CLASSIFIER_FILE).stem}-{urls}.safetensors"


def _cache_key(train_shards, recipe: Recipe) -> str:
    sizes = [os.path.getsize(u) if not u.startswith("pipe:") and os.path.isfile(u) else None
             for u in train_shards.urls]
    return json.dumps({"recipe": asdict(recipe), "shards": [Path(u).name for u in train_shards.urls],
                       "bytes": sizes}, sort_keys=True)


def _load_cached(path: Path | None, key: str) -> DigitsClassifier | None:
    if path is None or not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            if json.loads((handle.metadata() or {}).get("genpipe", "{}")).get("key") != key:
                return None
            state = {name: handle.get_tensor(name) for name in handle.keys()}
        classifier = DigitsClassifier()
        classifier.load_state_dict(state)
    except Exception as exc:  # noqa: BLE001 - a damaged cache is trained again and replaced
        log.warning("ignoring unreadable digits classifier %s (%s)", path, exc)
        return None
    classifier.eval()
    classifier.refresh_id()
    return classifier


def _save(path: Path | None, key: str, classifier: DigitsClassifier, train_images: int) -> None:
    if path is None:
        return
    from safetensors.torch import save_file

    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in classifier.state_dict().items()}
    try:
        # one metadata entry: safetensors writes several in an arbitrary order, this keeps the bytes reproducible
        metadata = json.dumps({"key": key, "train_images": train_images, "id": classifier.id}, sort_keys=True)
        save_file(state, str(temporary), metadata={"genpipe": metadata})
        os.replace(temporary, path)
    except OSError as exc:  # a read-only data set: train again next time
        log.warning("could not cache the digits classifier at %s (%s)", path, exc)
        temporary.unlink(missing_ok=True)


def load_or_train(train_shards, train_images: torch.Tensor, train_labels: torch.Tensor,
                  recipe: Recipe = RECIPE) -> tuple[DigitsClassifier, bool]:
    """(the classifier of ``train_shards``, whether it came from the cache); trained from the given
    images and labels of that split and cached when the cache is absent or stale."""
    path = classifier_path(train_shards)
    key = _cache_key(train_shards, recipe)
    cached = _load_cached(path, key)
    if cached is not None:
        return cached, True
    log.info("training the digits classifier on %d images (%s)", len(train_images), path or "not cached")
    classifier = train_classifier(train_images, train_labels, recipe)
    _save(path, key, classifier, len(train_images))
    return classifier, False


def write_classifier(split_dir: str | os.PathLike, recipe: Recipe = RECIPE) -> Path:
    """Train (or find up to date) the classifier of a prepared train split and store it there;
    ``data-prep digits`` calls this. Returns the file."""
    from pipeline.data import resolve_shards

    shards = resolve_shards(str(split_dir), "train split")
    manifest = shards.manifest
    images, labels = read_labelled(shards, "train split", manifest.image_size, manifest.channels)
    load_or_train(shards, images, labels, recipe)
    path = classifier_path(shards)
    if not path.is_file():
        raise UserError(f"{split_dir}: could not write {path.name} there (see the warning above)")
    return path


# ---------------------------------------------------------------------------------------------
# Measures


def class_scores(log_probabilities: np.ndarray) -> dict:
    """IS, confidence and class coverage of [N, 10] class log-probabilities (unprefixed keys)."""
    log_p = np.asarray(log_probabilities, dtype=np.float64)
    log_p = log_p - np.logaddexp.reduce(log_p, axis=1, keepdims=True)  # rows that sum to 1 exactly
    p = np.exp(log_p)
    log_marginal = np.log(np.maximum(p.mean(0), 1e-300))
    # Each KL(p(y|x) ‖ p(y)) is ≥ 0; rounding can leave a term at -1e-9 (IS just under 1 for an
    # untrained model's samples), so each is clamped, and IS is at least 1 as defined.
    divergence = np.maximum((p * (log_p - log_marginal)).sum(1), 0.0)
    sure = p.max(1) >= SURE
    histogram = np.bincount(p.argmax(1)[sure], minlength=NUM_CLASSES)
    present = histogram[histogram > 0] / len(p)  # shares of all images: unsure ones add nothing
    return {
        "is": float(np.exp(divergence.mean())),
        "confidence": float(p.max(1).mean()),
        "classes_covered": int((histogram >= np.ceil(COVERED_SHARE / NUM_CLASSES * len(p) - 1e-9)).sum()),
        "class_entropy": max(0.0, float(-(present * np.log(present)).sum() / np.log(NUM_CLASSES))),
        "class_histogram": [int(c) for c in histogram],
        "unsure": float(1 - sure.mean()),
    }


def frechet(features: np.ndarray, reference: fid.FeatureStats) -> float:
    """FD of [N, 64] features to the reference statistics."""
    stats = fid.feature_stats(features)
    with warnings.catch_warnings():  # a singular product at small N: frechet_distance handles it
        warnings.simplefilter("ignore")
        return fid.frechet_distance(stats.mean, stats.cov, reference.mean, reference.cov)


@dataclass
class Reference:
    """The held-out real digits as the measure sees them, and the train features for the floor."""

    held_out: fid.FeatureStats
    scores: dict
    train_features: np.ndarray

    def floor(self, count: int) -> tuple[float, int]:
        """(FD of min(count, all) real train images to the held-out ones, that number): a fixed
        subsample, so the same count always gives the same floor."""
        count = max(2, min(count, len(self.train_features)))
        chosen = np.sort(np.random.default_rng(0).choice(len(self.train_features), count, replace=False))
        return frechet(self.train_features[chosen], self.held_out), count


@dataclass
class DigitsQuality:
    """The classifier and, on the process that reports (rank 0), the reference."""

    classifier: DigitsClassifier
    reference: Reference | None = None

    def report(self, rows: np.ndarray) -> dict:
        """The ``digits_*`` measures of `DigitsClassifier.features` rows, with the reference."""
        features, log_probabilities = DigitsClassifier.split(np.asarray(rows, dtype=np.float64))
        if len(features) <= FEATURE_DIMS:
            log.warning("digits FD from %d images of %d features: the covariance is singular and FD is "
                        "biased upward (compare with the floor at the same count)", len(features), FEATURE_DIMS)
        scores = {"fd": frechet(features, self.reference.held_out), **class_scores(log_probabilities)}
        result = {f"digits_{name}": value for name, value in scores.items()}
        result["digits_images"] = len(features)
        held_out = self.reference.scores
        floor, floor_images = self.reference.floor(len(features))
        result["digits_reference"] = {
            "digits_fd": floor, "fd_train_images": floor_images,
            **{f"digits_{name}": held_out[name] for name in METRICS[1:] + ("class_histogram", "unsure")},
            "accuracy": held_out["accuracy"], "images": held_out["images"],
        }
        result["digits_classifier"] = self.classifier.id
        return result

    def score_images(self, images: torch.Tensor, batch_size: int = 512) -> dict:
        """The report of a uint8 tensor of images (tests, docs)."""
        rows = torch.cat([self.classifier.features(images[i:i + batch_size]).cpu()
                          for i in range(0, len(images), batch_size)])
        return self.report(rows.double().numpy())


def build_reference(classifier: DigitsClassifier, train_images: torch.Tensor, test_shards, *, test_key: str,
                    image_size: int, channels: int) -> Reference:
    """The reference of the held-out ``test_shards``: computed on the CPU, so that it is the same
    wherever the samples are classified."""
    test_images, test_labels = read_labelled(test_shards, test_key, image_size, channels)
    cpu = classifier.cpu()
    rows = cpu.features(test_images).double().numpy()
    features, log_probabilities = DigitsClassifier.split(rows)
    scores = class_scores(log_probabilities)
    scores["accuracy"] = float((log_probabilities.argmax(1) == test_labels.numpy()).mean())
    scores["images"] = len(test_images)
    train_features = DigitsClassifier.split(cpu.features(train_images).double().numpy())[0]
    return Reference(fid.feature_stats(features), scores, train_features)


def build(train_spec, test_spec, *, image_size: int, channels: int, device: torch.device | str = "cpu",
          rank: int = 0, world_size: int = 1, train_key: str = "data.shards",
          test_key: str = "data.eval_shards") -> DigitsQuality:
    """The measure for a run's train split (the classifier's data) and held-out split (the
    reference). Collective: rank 0 reads the shards, loads or trains the classifier and
    broadcasts its weights (or its error, which every rank then raises)."""
    from pipeline.data import resolve_shards

    message: list = [None]
    measure = None
    if rank == 0:
        try:
            train_shards = resolve_shards(train_spec, train_key)
            test_shards = resolve_shards(test_spec, test_key)
            check_labelled(test_shards, test_key)
            train_images, train_labels = read_labelled(train_shards, train_key, image_size, channels)
            classifier, cached = load_or_train(train_shards, train_images, train_labels)
            reference = build_reference(classifier, train_images, test_shards, test_key=test_key,
                                        image_size=image_size, channels=channels)
            log.info("digits classifier %s (%s)", classifier.id, "cached" if cached else "trained now")
            measure = DigitsQuality(classifier, reference)
            message[0] = {name: tensor.cpu() for name, tensor in classifier.state_dict().items()}
        except UserError as exc:
            message[0] = exc.message
            if world_size == 1:
                raise
    if world_size > 1:
        dist.broadcast_object_list(message, src=0)
    if isinstance(message[0], str):
        raise UserError(message[0])
    if measure is None:
        classifier = DigitsClassifier()
        classifier.load_state_dict(message[0])
        classifier.eval()
        classifier.refresh_id()
        measure = DigitsQuality(classifier)
    measure.classifier.to(device)
    return measure


def sample_quality(model, measure: DigitsQuality, *, num_images: int, batch_size: int, seed: int, rank: int = 0,
                   world_size: int = 1, autocast=None, **sample_options) -> dict | None:
    """The digits measures of ``num_images`` samples of ``model``; collective (each process
    samples its share, seeded per process, as `pipeline.fid.sample_features`), the result on
    rank 0 and None on the others."""
    local = fid.sample_features(model, measure.classifier, num_images, batch_size=batch_size, seed=seed, rank=rank,
                                world_size=world_size, autocast=autocast, **sample_options)
    rows = fid.gather_features(local, world_size)
    if rank != 0:
        return None
    return measure.report(rows.double().cpu().numpy())


# ---------------------------------------------------------------------------------------------
# In training


def check_config(config) -> None:
    """Start-up checks of ``eval.sample_quality_images``: the held-out split is set and both
    splits are labelled digits (from their manifests; nothing is read yet)."""
    if not config.eval.sample_quality_images:
        return
    from pipeline.data import resolve_shards

    if config.data.eval_shards is None:
        raise UserError("eval.sample_quality_images is set but data.eval_shards (the held-out digits) is not")
    check_labelled(resolve_shards(config.data.shards, "data.shards"), "data.shards")
    check_labelled(resolve_shards(config.data.eval_shards, "data.eval_shards"), "data.eval_shards")


def training_record(result: dict | None) -> dict[str, float]:
    """``eval/digits_*`` values of a `sample_quality` result, each reference as ``..._reference``
    (the histogram stays out: a list, not a scalar to plot)."""
    if result is None:
        return {}
    record = {}
    reference = result["digits_reference"]
    for name in METRICS:
        record[f"eval/digits_{name}"] = result[f"digits_{name}"]
        record[f"eval/digits_{name}_reference"] = reference[f"digits_{name}"]
    record["eval/digits_images"] = result["digits_images"]
    return record


class SampleQualityEval:
    """The trainer's component (as `pipeline.periodic.FidEval`): `due` on the evaluation record
    (``eval.sample_quality_every_steps`` 0) or on the first training record at or after each
    multiple of ``eval.sample_quality_every_steps``; `run` the ``eval/digits_*`` values, on rank 0
    ({} elsewhere). Both collective: every process calls them with the same records.
    ``processes``: rank, world_size, device; ``strategy``: whole_model(ema, use_ema), autocast."""

    def __init__(self, config, processes, strategy, ema):
        check_config(config)  # at start-up: unlabelled or missing splits fail now
        self.config = config
        self.processes = processes
        self.strategy = strategy
        self.ema = ema
        self.measure: DigitsQuality | None = None
        self.last_period: int | None = None

    def due(self, record: dict) -> bool:
        evaluation = self.config.eval
        if not evaluation.sample_quality_images:
            return False
        every = evaluation.sample_quality_every_steps
        if not every:
            return "eval/bits_per_dim" in record
        if "loss" not in record:
            return False
        period = record["step"] // every
        if self.last_period is None:
            self.last_period = (record["step"] - 1) // every
        if period <= self.last_period:
            return False
        self.last_period = period
        return True

    def run(self) -> dict[str, float]:
        config, processes = self.config, self.processes
        data, evaluation = config.data, config.eval
        started = time.perf_counter()
        if self.measure is None:
            self.measure = build(data.shards, data.eval_shards, image_size=data.image_size, channels=data.channels,
                                 device=processes.device, rank=processes.rank, world_size=processes.world_size)
        try:
            with self.strategy.whole_model(self.ema, evaluation.use_ema) as model:
                result = sample_quality(
                    model, self.measure, num_images=evaluation.sample_quality_images,
                    batch_size=evaluation.batch_size or data.batch_size, seed=config.sample.seed,
                    rank=processes.rank, world_size=processes.world_size, autocast=self.strategy.autocast,
                    **config.sample.options)
        except ValueError as exc:  # rank 0 only, after the last collective: the others carry on
            log.warning("digits sample quality skipped: %s", exc)
            return {}
        record = training_record(result)
        if record:
            record["eval/digits_seconds"] = time.perf_counter() - started
        return record


# ---------------------------------------------------------------------------------------------
# ``launch eval --sample-quality``


def check_splits(train_spec, test_shards, test_key: str) -> None:
    """One-line errors before any work when either split of a run holds no digit labels."""
    from pipeline.data import resolve_shards

    check_labelled(resolve_shards(train_spec, "data.shards"), "data.shards")
    check_labelled(test_shards, test_key)


# ---------------------------------------------------------------------------------------------
# Calibration: what real digits and junk score


def junk_images(held_out: torch.Tensor, count: int = 400, seed: int = 123) -> dict[str, torch.Tensor]:
    """Images with no digit in them, ``count`` of each kind, at the held-out images' size:
    uniform noise, held-out digits with their pixels scrambled (the same ink, no strokes), and
    blurred blobs (one Gaussian blob each, random place and width)."""
    generator = torch.Generator().manual_seed(seed)
    _, channels, height, width = held_out.shape
    noise = torch.randint(0, 256, (count, channels, height, width), generator=generator, dtype=torch.uint8)
    digits = held_out[torch.randint(len(held_out), (count,), generator=generator)].flatten(1)
    order = torch.rand(count, digits.shape[1], generator=generator).argsort(1)
    scrambled = torch.gather(digits, 1, order).view(count, channels, height, width)
    rows, columns = torch.meshgrid(torch.arange(float(height)), torch.arange(float(width)), indexing="ij")
    centres = (torch.rand(count, 2, generator=generator) * 0.6 + 0.2) * torch.tensor([width, height])
    widths = (torch.rand(count, 1, 1, generator=generator) * 0.15 + 0.06) * height
    blobs = torch.exp(-((columns - centres[:, 0, None, None]) ** 2 + (rows - centres[:, 1, None, None]) ** 2)
                      / (2 * widths**2))
    blurred_blobs = (255 * blobs).round().to(torch.uint8)[:, None].expand(-1, channels, -1, -1).contiguous()
    return {"noise": noise, "scrambled digits": scrambled, "blurred blobs": blurred_blobs}


def _grid_images(path: str, image_size: int, count: int | None) -> torch.Tensor:
    """The images of a sample grid PNG (`pipeline.images.tiles`); UserError naming the file."""
    from PIL import Image

    from pipeline import images

    try:
        with Image.open(path) as picture:
            canvas = np.asarray(picture.convert("L" if picture.mode in ("L", "P", "1") else "RGB"))
        return images.tiles(canvas, image_size, count)
    except OSError as exc:
        raise UserError(f"{path}: cannot read the grid ({exc})") from None
    except ValueError as exc:
        raise UserError(f"{path}: {exc}; give the grid's --image-size (and --count)") from None


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.digits_quality DIGITS_DIR``: one JSON line each for the held-out
    digits and for the kinds of `junk_images`, scored by the classifier of DIGITS_DIR/train
    (trained and stored there if absent) against DIGITS_DIR/test, then the FD floor at several
    image counts. With ``--grid PNG --image-size S``: one JSON line scoring the images of a
    sample grid (``launch sample --out``) instead."""
    import argparse
    import sys

    from pipeline.data import resolve_shards
    from pipeline.errors import one_line

    parser = argparse.ArgumentParser(prog="python -m pipeline.digits_quality", description=main.__doc__)
    parser.add_argument("digits_dir", help="output directory of `data-prep digits` (with train/ and test/)")
    parser.add_argument("--grid", metavar="PNG", help="score the images of this sample grid (launch sample --out)")
    parser.add_argument("--image-size", type=int, metavar="S", help="side of the grid's images (with --grid)")
    parser.add_argument("--count", type=int, metavar="N", help="images in the grid (default: every tile)")
    args = parser.parse_args(argv)
    if args.grid is not None and args.image_size is None:
        parser.error("--grid needs --image-size (the side of the grid's images)")
    try:
        test = resolve_shards(os.path.join(args.digits_dir, "test"), "DIGITS_DIR/test")
        if test.manifest is None:
            raise UserError(f"{args.digits_dir}/test: not a split written by `data-prep digits`")
        size, channels = test.manifest.image_size, test.manifest.channels
        measure = build(os.path.join(args.digits_dir, "train"), os.path.join(args.digits_dir, "test"),
                        image_size=size, channels=channels, train_key="DIGITS_DIR/train", test_key="DIGITS_DIR/test")
        held_out, _ = read_labelled(test, "DIGITS_DIR/test", size, channels)
        if args.grid is not None:
            grid = _grid_images(args.grid, args.image_size, args.count)
    except UserError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return UserError.exit_code
    if args.grid is not None:
        print(json.dumps({"images": args.grid, **measure.score_images(grid)}), flush=True)
        return 0
    sets = {"held-out digits": held_out, **junk_images(held_out)}
    for name, images in sets.items():
        report = measure.score_images(images)
        print(json.dumps({"images": name, **report}), flush=True)
    counts = (64, 100, 200, 500, 1000, len(measure.reference.train_features))
    floors = {count: measure.reference.floor(count)[0] for count in counts}
    print(json.dumps({"images": "real train subsets: the FD floor by image count", "digits_fd": floors}))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
