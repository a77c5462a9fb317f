"""The digits sample-quality measure (pipeline/digits_quality.py): a deterministic classifier
stored by `data-prep digits`, real held-out digits scoring high and clearly apart from noise,
scrambled digits and blobs, FD ≈ 0 of a set with itself, any resolution and channel count, the
cache and its one-line errors, the in-training schedule, processes sharing the work, and
`launch eval --sample-quality` / `launch status` on a briefly trained run."""

from __future__ import annotations

import contextlib
import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, make_id_shards, run_cli, tiny_overrides
from pipeline import config as config_module
from pipeline import digits_quality as dq
from pipeline.data import resolve_shards
from pipeline.distributed import Processes
from pipeline.errors import UserError


class ImagesModel(torch.nn.Module):
    """A stand-in generative model drawing (with replacement) from a fixed set of images."""

    def __init__(self, images: torch.Tensor):
        super().__init__()
        self.images = images

    def sample(self, n, generator):
        return self.images[torch.randint(len(self.images), (n,), generator=generator)]


class WholeModel:
    """What the component uses of a `pipeline.strategies.Strategy`: whole weights and autocast."""

    def __init__(self, model):
        self.model = model
        self.calls = []

    @contextlib.contextmanager
    def whole_model(self, ema, use_ema):
        self.calls.append((ema, use_ema))
        yield self.model

    def autocast(self):
        return contextlib.nullcontext()


ONE_PROCESS = Processes(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def measure(digits_dir) -> dq.DigitsQuality:
    return dq.build(str(digits_dir / "train"), str(digits_dir / "test"), image_size=32, channels=1)


@pytest.fixture(scope="module")
def held_out(digits_dir) -> torch.Tensor:
    images, _ = dq.read_labelled(resolve_shards(str(digits_dir / "test")), "test", 32, 1)
    return images


def test_data_prep_stores_a_classifier_that_training_again_reproduces(digits_dir):
    stored = digits_dir / "train" / dq.CLASSIFIER_FILE
    assert stored.is_file()
    shards = resolve_shards(str(digits_dir / "train"))
    images, labels = dq.read_labelled(shards, "train", 32, 1)
    assert len(images) == 1438 and sorted(set(labels.tolist())) == list(range(10))
    again = dq.train_classifier(images, labels)
    from safetensors.torch import load_file

    saved = load_file(str(stored))
    assert set(saved) == set(again.state_dict())
    for name, tensor in again.state_dict().items():
        assert torch.equal(saved[name], tensor), name


def test_real_held_out_digits_score_high_and_apart_from_junk(measure, held_out):
    reference = measure.reference.scores
    assert reference["images"] == 359 and reference["accuracy"] >= 0.95
    assert reference["is"] >= 8.5 and reference["confidence"] >= 0.95
    assert reference["classes_covered"] == 10 and reference["class_entropy"] > 0.98

    real = measure.score_images(held_out)
    assert abs(real["digits_fd"]) < 1e-6  # the held-out set against itself
    assert real["digits_is"] == pytest.approx(reference["is"])
    floor = real["digits_reference"]["digits_fd"]
    assert 0 < floor < 10 and real["digits_reference"]["fd_train_images"] == 359
    assert reference["unsure"] < 0.03
    for kind, images in dq.junk_images(held_out).items():
        scores = measure.score_images(images)
        assert scores["digits_is"] < 3, kind
        assert scores["digits_confidence"] < 0.7, kind
        assert scores["digits_unsure"] > 0.3 and scores["digits_classes_covered"] <= 8, kind
        if kind != "blurred blobs":
            assert scores["digits_unsure"] > 0.95 and scores["digits_classes_covered"] == 0, kind
        assert scores["digits_fd"] > 30 * floor, kind
        assert scores["digits_reference"]["fd_train_images"] == 400


def test_any_resolution_and_channel_count_reads_as_the_stored_digits(measure, held_out):
    larger_rgb = held_out.repeat_interleave(2, 2).repeat_interleave(2, 3).expand(-1, 3, -1, -1)
    assert larger_rgb.shape[1:] == (3, 64, 64)
    scores = measure.score_images(larger_rgb.contiguous())
    assert abs(scores["digits_fd"]) < 1e-3
    assert scores["digits_class_histogram"] == measure.reference.scores["class_histogram"]
    eight = F.adaptive_avg_pool2d(held_out.float(), 8).round().to(torch.uint8)  # stored at 8×8
    assert measure.score_images(eight)["digits_is"] > 8.5


def test_a_sample_grid_png_scores_as_its_images(digits_dir, held_out, measure, tmp_path, capsys):
    """``python -m pipeline.digits_quality DIR --grid PNG --image-size S``: the grid's tiles
    (`pipeline.images.tiles`, the inverse of `images.grid`) scored as the images themselves."""
    from pipeline import images

    sixteen = F.adaptive_avg_pool2d(held_out[:30].float(), 16).round().to(torch.uint8)
    path = images.save_png(sixteen, tmp_path / "grid.png")  # 6 columns, 5 rows
    assert torch.equal(images.tiles(images.grid(sixteen), 16), sixteen)
    assert dq.main([str(digits_dir), "--grid", str(path), "--image-size", "16"]) == 0
    scored = json.loads(capsys.readouterr().out)
    expected = measure.score_images(sixteen)
    assert scored["images"] == str(path) and scored["digits_images"] == 30
    assert scored["digits_is"] == pytest.approx(expected["digits_is"])
    assert scored["digits_class_histogram"] == expected["digits_class_histogram"]
    assert dq.main([str(digits_dir), "--grid", str(path), "--image-size", "16", "--count", "25"]) == 0
    assert json.loads(capsys.readouterr().out)["digits_images"] == 25
    assert dq.main([str(digits_dir), "--grid", str(path), "--image-size", "15"]) == UserError.exit_code
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "grid.png" in error and "not a grid of 15x15 images" in error


def test_class_scores_by_hand():
    one_hot = np.log(np.clip(np.eye(10)[np.arange(100) % 10], 1e-30, None))
    scores = dq.class_scores(one_hot)
    assert scores["is"] == pytest.approx(10) and scores["confidence"] == pytest.approx(1)
    assert scores["classes_covered"] == 10 and scores["class_entropy"] == pytest.approx(1)
    assert scores["class_histogram"] == [10] * 10
    one_class = dq.class_scores(one_hot[np.arange(100) % 10 == 3])
    assert one_class["is"] == pytest.approx(1) and one_class["classes_covered"] == 1
    assert one_class["class_entropy"] == 0
    assert scores["unsure"] == 0
    uniform = dq.class_scores(np.full((50, 10), np.log(0.1)))
    assert uniform["is"] == pytest.approx(1) and uniform["confidence"] == pytest.approx(0.1)
    # a near-uniform prediction names no class: nothing in the histogram, nothing covered
    assert uniform["unsure"] == 1 and uniform["class_histogram"] == [0] * 10
    assert uniform["classes_covered"] == 0 and uniform["class_entropy"] == 0
    # entropy over the shares of all images: half of them sure of class 0, half unsure
    half = dq.class_scores(np.concatenate([one_hot[[0] * 5], np.full((5, 10), np.log(0.1))]))
    assert half["class_entropy"] == pytest.approx(-0.5 * np.log(0.5) / np.log(10))
    # 97 images of class 0, 2 of class 1 and 1 of class 2: 2% counts as covered, 1% does not.
    skewed = dq.class_scores(one_hot[[0] * 97 + [1] * 2 + [2] * 1])
    assert skewed["classes_covered"] == 2 and skewed["class_histogram"][:3] == [97, 2, 1]


def test_inception_score_is_never_below_one():
    # An untrained model's samples: every image gets nearly the same prediction, and the mean KL
    # rounds to about -1e-9 unless each term is kept at 0 or above (IS >= 1 by definition).
    rng = np.random.default_rng(0)
    row = np.log(rng.dirichlet(np.ones(10)))
    for scale in (0.0, 1e-12, 1e-9):
        log_probabilities = row + scale * rng.standard_normal((64, 10))
        assert dq.class_scores(log_probabilities)["is"] >= 1.0
    unnormalised = np.full((64, 10), np.log(0.1)) + 1e-9  # rows that sum to just over 1
    assert dq.class_scores(unnormalised)["is"] == pytest.approx(1.0, abs=1e-12)


def test_cache_is_written_atomically_and_keyed_by_recipe_and_shards(digits_dir, tmp_path):
    import shutil

    train = tmp_path / "train"
    shutil.copytree(digits_dir / "train", train)
    shards = resolve_shards(str(train))
    images, labels = dq.read_labelled(shards, "train", 32, 1)
    path = train / dq.CLASSIFIER_FILE
    stored = path.read_bytes()
    _, cached = dq.load_or_train(shards, images, labels)
    assert cached  # data-prep's file, still valid in the copy (names and sizes, not paths)
    quick = dq.Recipe(epochs=1)
    classifier, cached = dq.load_or_train(shards, images, labels, quick)
    assert not cached and path.read_bytes() != stored
    assert dq.load_or_train(shards, images, labels, quick)[1]
    path.write_bytes(b"not a safetensors file")  # damaged: trained again and replaced
    assert not dq.load_or_train(shards, images, labels, quick)[1]
    assert dq.load_or_train(shards, images, labels, quick)[1]
    assert sorted(p.name for p in train.iterdir() if not p.name.startswith("shard-")) == \
        ["digits_classifier.safetensors", "manifest.json"]  # no staging file left
    with open(shards.urls[0], "ab") as handle:  # a changed train split invalidates it
        handle.write(b"\0" * 512)
    assert not dq.load_or_train(resolve_shards(shards.urls, "x"), images, labels, quick)[1]
    # a list of shards without a manifest: cached beside them under a name with their hash
    listed = resolve_shards(list(shards.urls[:3]), "data.shards")
    assert dq.classifier_path(listed).name.startswith("digits_classifier-")


def test_unlabelled_shards_are_a_one_line_error_naming_them(digits_dir, tmp_path):
    plain = make_id_shards(tmp_path / "plain", size=32)
    with pytest.raises(UserError) as caught:
        dq.build(str(plain), str(digits_dir / "test"), image_size=32, channels=1)
    message = str(caught.value)
    assert "data.shards" in message and str(plain) in message and "data-prep digits" in message
    assert "\n" not in message
    with pytest.raises(UserError, match="data.eval_shards"):
        dq.build(str(digits_dir / "train"), str(plain), image_size=32, channels=1)


def test_in_training_schedule_and_record(digits_dir, tmp_path, held_out):
    def load(**extra):
        return config_module.load(REPO / "configs/tiny/ddpm.yaml", tiny_overrides(digits_dir, tmp_path / "run", **extra))

    model = ImagesModel(held_out)
    strategy = WholeModel(model)

    def component(config):
        return dq.SampleQualityEval(config, ONE_PROCESS, strategy, ema=None)

    quality = component(load(**{"eval.sample_quality_images": 150, "eval.sample_quality_every_steps": 10}))
    records = [{"step": 5, "loss": 1.0}, {"step": 10, "loss": 1.0}, {"step": 15, "loss": 1.0},
               {"step": 20, "eval/bits_per_dim": 3.0}, {"step": 20, "loss": 1.0}, {"step": 40, "loss": 1.0}]
    assert [quality.due(r) for r in records] == [False, True, False, False, True, True]
    riding = component(load(**{"eval.sample_quality_images": 150, "eval.every_steps": 10}))
    assert [riding.due(r) for r in records] == [False, False, False, True, False, False]
    assert not component(load()).due(records[1])

    state = torch.get_rng_state()
    record = quality.run()
    assert strategy.calls == [(None, True)]  # whole weights asked for, EMA ones by default (eval.use_ema)
    assert torch.equal(torch.get_rng_state(), state)  # the training's random stream is untouched
    assert record["eval/digits_images"] == 150
    assert record["eval/digits_is"] > 8.5 and record["eval/digits_confidence"] > 0.95
    assert record["eval/digits_is_reference"] == pytest.approx(quality.measure.reference.scores["is"])
    assert 0 < record["eval/digits_fd"] < 3 * record["eval/digits_fd_reference"]
    assert all(isinstance(v, (int, float)) for v in record.values())
    strategy.model = ImagesModel(dq.junk_images(held_out)["noise"])
    noise = quality.run()
    assert noise["eval/digits_fd"] > 30 * noise["eval/digits_fd_reference"] and noise["eval/digits_is"] < 2

    with pytest.raises(UserError, match="data.eval_shards"):
        component(load(**{"eval.sample_quality_images": 150, "eval.sample_quality_every_steps": 10,
                          "data.eval_shards": "null"}))
    with pytest.raises(UserError, match="sample_quality_images"):
        load(**{"eval.sample_quality_images": 150})  # no schedule


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(rank, world_size, port, digits_dir, unlabelled, out_dir):
    import torch.distributed as dist

    from pipeline import fid

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        measure = dq.build(f"{digits_dir}/train", f"{digits_dir}/test", image_size=32, channels=1,
                           rank=rank, world_size=world_size)
        images, _ = dq.read_labelled(resolve_shards(f"{digits_dir}/test"), "test", 32, 1)
        model = ImagesModel(images)
        result = dq.sample_quality(model, measure, num_images=91, batch_size=20, seed=3, rank=rank,
                                   world_size=world_size)
        local = fid.sample_features(model, measure.classifier, 91, batch_size=20, seed=3, rank=rank,
                                    world_size=world_size)
        np.save(os.path.join(out_dir, f"local-{rank}.npy"), local.numpy())
        try:
            dq.build(unlabelled, f"{digits_dir}/test", image_size=32, channels=1, rank=rank, world_size=world_size)
            error = None
        except UserError as exc:
            error = str(exc)
        with open(os.path.join(out_dir, f"rank-{rank}.json"), "w") as handle:
            json.dump({"result": result, "id": measure.classifier.id, "error": error}, handle)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_processes_share_the_samples_and_rank_zero_reports(digits_dir, tmp_path, measure):
    import torch.multiprocessing as mp

    unlabelled = make_id_shards(tmp_path / "plain", size=32)
    mp.spawn(_two_processes, args=(2, _free_port(), str(digits_dir), str(unlabelled), str(tmp_path)), nprocs=2)
    ranks = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[1]["result"] is None and ranks[0]["id"] == ranks[1]["id"] == measure.classifier.id
    local = [np.load(tmp_path / f"local-{rank}.npy") for rank in (0, 1)]
    assert [len(rows) for rows in local] == [46, 45]
    result = ranks[0]["result"]
    assert result["digits_images"] == 91
    expected = measure.report(np.concatenate(local).astype(np.float64))
    for name in ("digits_fd", "digits_is", "digits_confidence", "digits_class_entropy"):
        assert result[name] == pytest.approx(expected[name], rel=1e-9), name
    assert result["digits_class_histogram"] == expected["digits_class_histogram"]
    # rank 0's error reaches every process as the same one line
    assert ranks[0]["error"] == ranks[1]["error"] and str(unlabelled) in ranks[0]["error"]


@pytest.mark.slow
@pytest.mark.quick
def test_launch_eval_sample_quality_and_status(digits_dir, tmp_path):
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(digits_dir, run_dir, **{"train.max_steps": 6, "model.kl_warmup_steps": 3,
                                                        "checkpoint.every_steps": 6, "eval.every_steps": 0})
    trained = run_cli("launch", "local", "configs/tiny/vae.yaml", *overrides)
    assert trained.returncode == 0, trained.stderr[-3000:]

    result = run_cli("launch", "eval", str(run_dir), "--sample-quality", "120", "--max-images", "4",
                     "--batch-size", "60")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["digits_images"] == 120 and len(report["digits_class_histogram"]) == 10
    reference = report["digits_reference"]
    assert reference["images"] == 359 and reference["digits_is"] >= 8.5 and reference["fd_train_images"] == 120
    assert report["digits_fd"] > reference["digits_fd"] and 1 <= report["digits_is"] <= 10
    assert 0.1 <= report["digits_confidence"] <= 1 and report["digits_classifier"].startswith("digits_mlp-")
    assert report["bits_per_dim"] > 0 and report["step"] == 6
    saved = json.loads((run_dir / "eval" / "step-000000006.json").read_text())
    assert saved["digits_fd"] == report["digits_fd"]

    again = run_cli("launch", "eval", str(run_dir), "--sample-quality", "120", "--max-images", "4",
                    "--batch-size", "60")
    assert json.loads(again.stdout.strip().splitlines()[-1])["digits_fd"] == report["digits_fd"]  # seeded

    plain = make_id_shards(tmp_path / "plain", size=32)
    unlabelled = run_cli("launch", "eval", str(run_dir), "--sample-quality", "--shards", str(plain),
                         "--max-images", "2")
    assert unlabelled.returncode == 2
    lines = unlabelled.stderr.strip().splitlines()
    assert len(lines) == 1 and str(plain) in lines[0] and "--shards" in lines[0], unlabelled.stderr
    misplaced = run_cli("launch", "eval", "--sample-quality", str(run_dir))
    assert misplaced.returncode == 2 and "put the run directory before --sample-quality" in misplaced.stderr

    # what the trainer logs (dq.training_record) is what `launch status` shows beside the reference
    record = {"time": 1.0, "step": 6, **dq.training_record(report)}
    with open(run_dir / "metrics.jsonl", "a") as handle:
        handle.write(json.dumps(record) + "\n")
    status = run_cli("launch", "status", str(run_dir))
    assert status.returncode == 0, status.stderr
    line = [text for text in status.stdout.splitlines() if text.startswith("digits:")]
    assert line == [f"digits:      FD {report['digits_fd']:.2f} (real {reference['digits_fd']:.2f}), "
                    f"IS {report['digits_is']:.2f} (real {reference['digits_is']:.2f}), "
                    f"confidence {report['digits_confidence']:.3f} (real {reference['digits_confidence']:.3f}), "
                    f"classes {report['digits_classes_covered']} (real 10); 120 images, step 6"]


def test_status_shows_the_latest_digits_measures_beside_the_reference(tmp_path):
    from launch import status

    run_dir = tmp_path / "run"
    config = config_module.load(REPO / "configs/tiny/ddpm.yaml", [f"run_dir={run_dir}"])
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(config_module.dump_yaml(config))
    records = [{"time": 1.0, "step": 10, "images_seen": 320, "loss": 0.5}]
    for step, fd in ((10, 40.0), (20, 12.345)):
        records.append({"time": 2.0, "step": step, "eval/digits_fd": fd, "eval/digits_fd_reference": 2.5,
                        "eval/digits_is": 7.5, "eval/digits_is_reference": 9.55,
                        "eval/digits_confidence": 0.9, "eval/digits_confidence_reference": 0.986,
                        "eval/digits_classes_covered": 9, "eval/digits_classes_covered_reference": 10,
                        "eval/digits_images": 500})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    lines = [line for line in status.status_lines(run_dir, now=3.0) if line.startswith("digits:")]
    assert lines == ["digits:      FD 12.35 (real 2.50), IS 7.50 (real 9.55), confidence 0.900 (real 0.986), "
                     "classes 9 (real 10); 500 images, step 20"]


@pytest.mark.slow
def test_training_logs_sample_quality_and_status_shows_it(digits_dir, tmp_path):
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(digits_dir, run_dir, **{
        "train.max_steps": 4, "train.log_every_steps": 2, "checkpoint.every_steps": 4, "eval.every_steps": 0,
        "model.base_channels": 8, "model.norm_groups": 4, "model.channel_mult": "[1,2]",
        "model.attention_resolutions": "[]", "model.sample_steps": 2, "data.batch_size": 8,
        "eval.sample_quality_images": 40, "eval.sample_quality_every_steps": 2, "sample.at_end": "false"})
    trained = run_cli("launch", "local", "configs/tiny/ddpm.yaml", *overrides)
    assert trained.returncode == 0, trained.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    quality = [record for record in records if "eval/digits_fd" in record]
    assert [record["step"] for record in quality] == [2, 4]  # on the training records it rides on
    assert all(record["eval/digits_images"] == 40 and 1 <= record["eval/digits_is"] <= 10 for record in quality)
    status = run_cli("launch", "status", str(run_dir))
    assert any(line.startswith("digits:") and "40 images, step 4" in line for line in status.stdout.splitlines()), status.stdout
