"""Class labels through the pipeline, in process: shards and loader to the training step and the
loss, the start-up checks, `data-prep images --labels folders`, the conditional model of every
family, held-out bits/dim given the true label, and the class-row grids."""

from __future__ import annotations

import copy
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_id_shards
from pipeline import conditioning, images, models
from pipeline import config as config_module
from pipeline.data import TrainingBatches, resolve_shards
from pipeline.distributed import Processes
from pipeline.errors import UserError
from pipeline.evaluate import held_out_evaluation
from pipeline.faults import Faults
from pipeline.manifest import read_manifest
from pipeline.periodic import SampleGrid
from pipeline.strategies.ddp import DDPStrategy
from pipeline.train_step import MetricWindow, Progress, TrainStep

SMALL_DIFFUSION = ["model.base_channels=8", "model.norm_groups=4", "model.timesteps=20",
                   "model.sample_steps=2", "data.image_size=8", "data.batch_size=6", "data.num_workers=0"]


def cond_config(digits_dir, *overrides):
    return config_module.load("configs/tiny/cond_ddpm.yaml", [
        f"data.shards={digits_dir / 'train'}", f"data.eval_shards={digits_dir / 'test'}", *SMALL_DIFFUSION,
        *overrides])


def shard_labels(split_dir) -> dict[str, int]:
    """key -> .cls of every sample of a split, read straight from the tar files."""
    labels = {}
    for path in sorted(split_dir.glob("*.tar")):
        with tarfile.open(path) as tar:
            for member in tar:
                if member.name.endswith(".cls"):
                    labels[member.name[:-4]] = int(tar.extractfile(member).read())
    return labels


# ------------------------------------------------------------------------- shards -> loader -> loss


def test_labels_travel_from_the_shards_through_the_step_into_the_loss(digits_dir):
    config = cond_config(digits_dir)
    shards = resolve_shards(config.data.shards)
    batches = TrainingBatches.from_config(shards, config.data, seed=0, rank=0, world_size=1, labels=True)
    peeked = batches.peek_batch()
    stored = shard_labels(digits_dir / "train")
    assert peeked.labels.dtype == torch.int64 and peeked.labels.shape == (6,)
    assert [stored[key] for key in peeked.keys] == peeked.labels.tolist()

    torch.manual_seed(0)
    model = models.build(config.model, 8, 1)
    perturb(model)
    reference = copy.deepcopy(model)
    strategy = DDPStrategy(config)
    strategy.processes = Processes(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    strategy.wrap(model, build_model=lambda: models.build(config.model, 8, 1), faults=Faults())
    step = TrainStep(strategy, batches, config.train, global_batch=6, labels=True)
    torch.manual_seed(1)
    values = step(Progress(), MetricWindow(torch.device("cpu")))
    # The same loss by hand: the batch's own labels, the same noise, timesteps and label dropout.
    torch.manual_seed(1)
    expected, _ = reference.loss(peeked.images, peeked.labels)
    torch.manual_seed(1)
    other, _ = reference.loss(peeked.images, (peeked.labels + 1) % 10)
    assert float(values["loss"]) == pytest.approx(float(expected.detach()), rel=1e-6)
    assert float(other.detach()) != pytest.approx(float(expected.detach()), rel=1e-6)
    batches.close()


def test_a_conditional_model_on_unlabelled_shards_is_one_clear_error(tmp_path, digits_dir):
    unlabelled = resolve_shards(str(make_id_shards(tmp_path / "ids")))
    config = cond_config(digits_dir)
    with pytest.raises(UserError, match="labels were asked for but the shards carry none"):
        conditioning.check_shards(unlabelled, 8, 1, "data.shards", config.model)
    conditioning.check_shards(unlabelled, 8, 1, "data.shards", config_module.load("configs/tiny/ddpm.yaml").model)
    too_few = cond_config(digits_dir, "model.num_classes=5")
    with pytest.raises(UserError, match=r"hold 10 classes \(labels 0..9\) but model.num_classes is 5"):
        conditioning.check_shards(resolve_shards(str(digits_dir / "train")), 8, 1, "data.shards", too_few.model)


def test_classes_are_parsed_in_order_and_checked():
    assert conditioning.parse_classes("3, 0,3", 10) == [3, 0, 3]
    with pytest.raises(UserError, match="unconditional"):
        conditioning.parse_classes("0", None)
    with pytest.raises(UserError, match="class 10 is out of range; this model has classes 0..9"):
        conditioning.parse_classes("1,10", 10)
    with pytest.raises(UserError, match="'x' is not a class number"):
        conditioning.parse_classes("1,x", 10)


# ------------------------------------------------------------------------- data-prep --labels folders


def test_images_labelled_by_their_first_folder(tmp_path):
    from data_prep.cli import main

    source = tmp_path / "src"
    counts = {"zebra": 3, "ant": 5, "bee": 2}
    generator = np.random.default_rng(0)
    for name, count in counts.items():
        for index in range(count):
            folder = source / name / ("deeper" if index == 0 else "")
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(generator.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(folder / f"{index}.png")
    Image.fromarray(np.zeros((12, 12, 3), dtype=np.uint8)).save(source / "loose.png")
    assert main(["images", str(source), str(tmp_path / "out"), "--size", "8", "--labels", "folders",
                 "--workers", "1"]) == 0
    manifest = read_manifest(tmp_path / "out" / "train")
    assert manifest.class_names == ("ant", "bee", "zebra")  # sorted, as ImageFolder
    assert manifest.num_classes == 3 and manifest.class_counts == (5, 2, 3)
    assert [item["path"] for item in manifest.skipped] == ["loose.png"]
    labels = shard_labels(tmp_path / "out" / "train")
    sources = {}
    for path in (tmp_path / "out" / "train").glob("*.tar"):
        with tarfile.open(path) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    sources[member.name[:-5]] = json.loads(tar.extractfile(member).read())["source"]
    assert {key: sources[key].split("/")[0] for key in labels} == {
        key: manifest.class_names[label] for key, label in labels.items()}
    # unlabelled, the default: no classes recorded
    assert main(["images", str(source), str(tmp_path / "plain"), "--size", "8", "--workers", "1"]) == 0
    plain = read_manifest(tmp_path / "plain" / "train")
    assert plain.num_classes == 0 and plain.class_names == () and "class_names" not in json.loads(
        (tmp_path / "plain" / "train" / "manifest.json").read_text())


def test_folders_without_class_folders_is_one_clear_error(tmp_path, capsys):
    from data_prep.cli import main

    (tmp_path / "flat").mkdir()
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "flat" / "a.png")
    assert main(["images", str(tmp_path / "flat"), str(tmp_path / "out"), "--labels", "folders"]) == 2
    assert "needs the images in one folder per class" in capsys.readouterr().err


# ------------------------------------------------------------------------- every family


FAMILY_CONFIGS = {
    "vae": ("configs/tiny/cond_vae.yaml", []),
    "flow": ("configs/tiny/cond_flow.yaml", ["model.levels=2", "model.depth=1", "model.hidden_channels=8"]),
    "autoregressive": ("configs/tiny/cond_pixelcnn.yaml", ["model.filters=8", "model.num_stages=2"]),
    "diffusion": ("configs/tiny/cond_ddpm.yaml", ["model.base_channels=8", "model.norm_groups=4",
                                                  "model.timesteps=20", "model.sample_steps=2",
                                                  "sample.options.guidance=1.0"]),
}


def family_model(family: str, **changes):
    path, overrides = FAMILY_CONFIGS[family]
    config = config_module.load(path, overrides + [f"model.{k}={v}" for k, v in changes.items()])
    torch.manual_seed(0)
    return models.build(config.model, 8, 1)


def perturb_class_parameters(model) -> None:
    """The class parameters start at zero (conditional = unconditional at init), and so do the
    U-Net's residual branches and output: give them values."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Embedding):
                module.weight.normal_(0, 0.5)
    if hasattr(model, "net"):
        perturb(model)


def perturb(model) -> None:
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))


@pytest.mark.parametrize("family", list(FAMILY_CONFIGS))
def test_every_family_is_conditional_on_its_labels(family):
    model = family_model(family)
    assert model.num_classes == 10
    x = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    if model.data_dependent_init:
        model.train()
        model.loss(x, torch.tensor([0, 1, 2, 3]))
    perturb_class_parameters(model)
    model.eval()
    ones, twos = torch.full((4,), 1), torch.full((4,), 2)

    def bits(labels):
        torch.manual_seed(0)
        kwargs = {"timesteps_per_image": 2, "estimator": "mc-stratified"} if family == "diffusion" else {}
        return model.bits_per_dim(x, labels=labels, **kwargs)

    assert torch.equal(bits(ones), bits(ones)) and not torch.allclose(bits(ones), bits(twos))
    with pytest.raises(UserError, match="the labels of the images are needed"):
        model.bits_per_dim(x)
    loss, _ = model.loss(x, ones)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.zero_grad()
    n = 1 if family == "autoregressive" else 2

    def sample(label):
        return model.sample(n, torch.Generator().manual_seed(0), labels=torch.full((n,), label))

    first, second = sample(1), sample(7)
    assert first.shape == (n, 1, 8, 8) and first.dtype == torch.uint8 and not torch.equal(first, second)
    assert torch.equal(first, sample(1))


@pytest.mark.parametrize("family", list(FAMILY_CONFIGS))
def test_an_unconditional_model_refuses_labels(family):
    model = family_model(family, num_classes="null").eval()
    x = torch.zeros(2, 1, 8, 8, dtype=torch.uint8)
    with pytest.raises(UserError, match="unconditional"):
        model.loss(x, torch.tensor([0, 1]))
    with pytest.raises(UserError, match="unconditional"):
        model.sample(2, torch.Generator().manual_seed(0), labels=torch.tensor([0, 1]))


def test_conditional_vae_kl_matches_its_closed_form():
    from pipeline.models.vae import gaussian_kl

    generator = torch.Generator().manual_seed(0)
    mean, logvar, prior_mean, prior_logvar = (torch.randn(200_000, generator=generator) * 0.5 for _ in range(4))
    z = mean + torch.exp(0.5 * logvar) * torch.randn(200_000, generator=generator)
    log_q = -0.5 * ((z - mean) ** 2 / logvar.exp() + logvar)
    log_p = -0.5 * ((z - prior_mean) ** 2 / prior_logvar.exp() + prior_logvar)
    assert float((log_q - log_p).mean()) == pytest.approx(float(gaussian_kl(mean, logvar, prior_mean, prior_logvar).mean()), abs=0.01)


def test_conditional_pixelcnn_stays_causal():
    """The class bias is the same at every position: output (i, j) still sees only earlier pixels."""
    model = family_model("autoregressive").eval()
    perturb_class_parameters(model)
    x = torch.randint(0, 256, (1, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([4])
    base = model.network(x.float() / 127.5 - 1, labels)
    changed = x.clone()
    changed[0, 0, 3, 5] = 255 - changed[0, 0, 3, 5]
    after = model.network(changed.float() / 127.5 - 1, labels)
    differs = (after - base).abs().amax(1)[0] > 1e-6
    order = torch.arange(64).view(8, 8)
    assert not differs[order <= 3 * 8 + 5].any() and differs[order > 3 * 8 + 5].any()


def test_conditional_flow_is_invertible_and_its_prior_follows_the_class():
    model = family_model("flow")
    x = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    model.train()
    model.loss(x, torch.tensor([0, 1, 2]))
    model.eval()
    perturb_class_parameters(model)
    v = (x.float() + 0.5) / 256 - 0.5
    latents, _, log_prior = model.flow(v, model._top_prior(torch.tensor([0, 1, 2])))
    assert torch.allclose(model.flow.inverse(latents=latents), v, atol=1e-4)
    _, _, other = model.flow(v, model._top_prior(torch.tensor([5, 5, 5])))
    assert not torch.allclose(log_prior, other)


# ------------------------------------------------------------------------- evaluation and grids


def test_held_out_bits_per_dim_is_conditional_on_the_true_label(digits_dir):
    model = family_model("vae")
    perturb_class_parameters(model)
    shards = resolve_shards(str(digits_dir / "test"))
    common = dict(image_size=8, channels=1, batch_size=16, max_images=32)
    torch.manual_seed(0)
    result = held_out_evaluation(model, shards, **common)
    from pipeline.data import eval_batches

    torch.manual_seed(0)
    manual = torch.cat([model.bits_per_dim(batch.images, labels=batch.labels) for batch in eval_batches(
        shards, rank=0, world_size=1, num_workers=0, labels=True, **common)])
    assert result.images == 32 and result.bits_per_dim == pytest.approx(float(manual.double().mean()), rel=1e-6)


def test_class_rows_and_the_training_grid_layout(digits_dir):
    assert images.class_rows([2, 0], 3).tolist() == [2, 2, 2, 0, 0, 0]
    assert images.grid_classes(10, 100) == (list(range(10)), 10)
    assert images.grid_classes(1000, 64) == (list(range(8)), 8)
    assert images.grid_classes(10, 4) == ([0, 1], 2)
    config = cond_config(digits_dir, "sample.n=9")
    grid = SampleGrid(config, None, None, None, None, None, None)
    count, labels, columns = grid.layout(family_model("diffusion"))
    assert (count, columns) == (9, 3) and labels["labels"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert grid.layout(family_model("diffusion", num_classes="null")) == (9, {}, None)
    picture = images.grid(torch.zeros(6, 1, 4, 4, dtype=torch.uint8), columns=3)
    assert picture.shape == (2 * 6 + 2, 3 * 6 + 2)  # 2 rows of 3, 2 pixels of padding
