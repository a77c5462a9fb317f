"""Diffusion's Monte-Carlo estimates of the variational bound against its exact sum, the held-out
pass's standard error and estimator choice, and `launch eval`'s report and progress bar.

Every comparison with a tolerance uses fixed seeds, so a test passes or fails the same way on
every run and every machine; the tolerances are several standard errors of the quantity compared.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from pipeline.data import resolve_shards
from pipeline.errors import UserError
from pipeline.evaluate import held_out_bits_per_dim, held_out_evaluation, pass_images
from pipeline.models.base import GenerativeModel
from pipeline.models.diffusion import (
    DiffusionConfig,
    DiffusionModel,
    TimestepImportance,
    _bound_terms,
    sample_timesteps,
    variational_bound,
    variational_bound_mc,
)
from tests.conftest import make_id_shards, run_cli

LEGACY_DDPM = Path(__file__).resolve().parent / "fixtures" / "legacy_runs" / "ddp"


def tiny_model(timesteps: int = 20, **overrides) -> DiffusionModel:
    fields = dict(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(),
                  norm_groups=4, dropout=0.0, timesteps=timesteps, sample_steps=2)
    fields.update(overrides)
    torch.manual_seed(0)
    model = DiffusionModel(DiffusionConfig(**fields), image_size=8, channels=1)
    with torch.no_grad():  # the zero-initialised output conv would make eps_theta identically 0
        model.net.conv_out.weight.normal_(0, 0.05)
    return model.eval()


def one_image_repeated(rows: int) -> torch.Tensor:
    image = torch.randint(0, 256, (1, 1, 8, 8), generator=torch.Generator().manual_seed(5),
                          dtype=torch.uint8)
    return image.expand(rows, -1, -1, -1)


def mean_and_stderr(values: torch.Tensor) -> tuple[float, float]:
    values = values.double()
    return values.mean().item(), values.std().item() / math.sqrt(values.numel())


# ------------------------------------------------------------------------ timesteps and weights


@pytest.mark.parametrize("proposal", [None, "random"])
def test_sampled_timesteps_give_an_unbiased_sum_of_any_function(proposal):
    steps, per_image, draws = 11, 3, 200_000
    f = torch.arange(1, steps, dtype=torch.float64) ** 2  # f(t) for t = 1..10: sum 385
    if proposal == "random":
        proposal = torch.rand(steps - 1, generator=torch.Generator().manual_seed(1),
                              dtype=torch.float64) + 0.05
    t, weights = sample_timesteps(steps, per_image, draws, torch.Generator().manual_seed(2),
                                  proposal)
    assert t.shape == weights.shape == (per_image, draws)
    assert int(t.min()) >= 1 and int(t.max()) <= steps - 1
    mean, stderr = mean_and_stderr((weights * f[t - 1]).sum(0))
    assert abs(mean - 385.0) < 4 * stderr, (mean, stderr)


def test_uniform_strata_have_equal_width_and_that_width_as_weight():
    steps, per_image = 21, 4  # 20 middle timesteps: strata of 5
    t, weights = sample_timesteps(steps, per_image, 1000, torch.Generator().manual_seed(0))
    assert torch.all(weights == 5.0)
    for k in range(per_image):
        assert set(t[k].tolist()) == set(range(1 + 5 * k, 6 + 5 * k))
    # Strata need not hold a whole number of timesteps: 20 / 3 each, one draw per stratum.
    t, weights = sample_timesteps(steps, 3, 1000, torch.Generator().manual_seed(0))
    assert torch.allclose(weights, torch.full_like(weights, 20 / 3))
    assert int(t[0].max()) == 7 and int(t[1].min()) == 7 and int(t[2].min()) == 14
    # K = T - 1: every stratum is one timestep, and the estimate is the sum itself.
    t, weights = sample_timesteps(steps, steps - 1, 3, torch.Generator().manual_seed(0))
    assert torch.equal(t, torch.arange(1, steps).view(-1, 1).expand(-1, 3))
    assert torch.all(weights == 1.0)


def test_a_proposal_proportional_to_the_function_makes_every_draw_exact():
    f = torch.rand(30, generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 0.1
    t, weights = sample_timesteps(31, 2, 500, torch.Generator().manual_seed(4), f)
    torch.testing.assert_close((weights * f[t - 1]).sum(0), torch.full((500,), f.sum().item(),
                                                                       dtype=torch.float64))


def test_sample_timesteps_refuses_a_proposal_with_zeros_and_too_many_strata():
    with pytest.raises(ValueError, match="positive"):
        sample_timesteps(5, 2, 1, torch.Generator(), torch.tensor([0.5, 0.5, 0.0, 0.0]))
    with pytest.raises(ValueError, match="between 1 and T-1 = 4"):
        sample_timesteps(5, 5, 1, torch.Generator())


def test_importance_proposal_starts_at_one_over_t_then_follows_the_rms_of_the_terms():
    importance = TimestepImportance(11, uniform_mix=0.1)
    harmonic = 1 / torch.arange(1, 11, dtype=torch.float64)
    torch.testing.assert_close(importance.proposal(), 0.9 * harmonic / harmonic.sum() + 0.01)
    # t = 2 seen twice (rms 1), t = 8 once (term 4); the rest interpolated, constant beyond.
    importance.observe(torch.tensor([[2, 8], [2, 2]]), torch.tensor([[1.0, 4.0], [-1.0, 1.0]]))
    rms = torch.tensor([1.0, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.0, 4.0], dtype=torch.float64)
    torch.testing.assert_close(importance.proposal(), 0.9 * rms / rms.sum() + 0.01)


def test_a_learnt_proposal_adapts_to_terms_unlike_one_over_t():
    """Terms growing with t (the 1/t start is then a poor guess): after one batch the proposal
    has learnt them and the estimates' spread falls; every batch stays unbiased."""
    steps, per_image, batch = 101, 4, 4000
    f = torch.arange(1, steps, dtype=torch.float64) ** 2
    importance = TimestepImportance(steps)
    generator = torch.Generator().manual_seed(0)
    spreads = []
    for _ in range(2):
        t, weights = sample_timesteps(steps, per_image, batch, generator, importance.proposal())
        estimates = (weights * f[t - 1]).sum(0)
        mean, stderr = mean_and_stderr(estimates)
        assert abs(mean - f.sum().item()) < 4 * stderr
        spreads.append(estimates.std().item())
        importance.observe(t, f[t - 1])
    assert spreads[1] < 0.2 * spreads[0]


# --------------------------------------------------------- the estimates against the exact bound


@pytest.fixture(scope="module")
def exact_bound():
    """The tiny model (T = 20), one image in 128 rows, and the exact bound of each row in nats:
    every row an independent draw of the x_t, so the rows' mean estimates E[L_vlb]."""
    model = tiny_model()
    x0 = one_image_repeated(128).float() * (2 / 255) - 1
    exact = variational_bound(model.eps, model.schedule, x0, torch.Generator().manual_seed(0),
                              timestep_batch=20)
    return model, exact


def test_mc_estimates_are_unbiased_for_the_exact_bound(exact_bound):
    """Each estimate's mean over 256 rows (independent draws of t and x_t) and the exact sum's
    mean over 128 rows agree within their standard errors."""
    model, exact = exact_bound
    exact_mean, exact_se = mean_and_stderr(exact)
    x0 = one_image_repeated(256).float() * (2 / 255) - 1
    schedule, eps = model.schedule, model.eps
    # A proposal from an earlier, independent exact pass (as TimestepImportance would learn it).
    pilot = _bound_terms(eps, schedule, x0[:8], torch.arange(20).view(-1, 1).expand(-1, 8),
                         torch.Generator().manual_seed(9), timestep_batch=20, clip_denoised=True)
    proposal = pilot[1:].square().mean(1).sqrt()
    for seed, per_image, proposal_or_none in ((1, 6, None), (2, 3, proposal)):
        estimate, t, terms = variational_bound_mc(
            eps, schedule, x0, torch.Generator().manual_seed(seed), timesteps_per_image=per_image,
            proposal=proposal_or_none, timestep_batch=3)
        assert t.shape == terms.shape == (per_image, 256)
        mean, se = mean_and_stderr(estimate)
        assert abs(mean - exact_mean) < 4 * math.hypot(se, exact_se), (mean, exact_mean, se)
    # The importance-sampled check is sharp enough to see a bias of half a middle term's mean
    # (e.g. strata of width T / K instead of (T - 1) / K). Uniform strata are far noisier here:
    # L_1 alone is a fifth of the bound, and one stratum in K holds it.
    middle_mean = (exact_mean - pilot[0].mean().item()) / 19
    assert 4 * math.hypot(se, exact_se) < 0.5 * middle_mean


def test_mc_spread_shrinks_as_timesteps_per_image_grow(exact_bound):
    model, exact = exact_bound
    x0 = one_image_repeated(128).float() * (2 / 255) - 1
    spreads = {}
    for per_image in (1, 6, 19):
        estimate, _, _ = variational_bound_mc(
            model.eps, model.schedule, x0, torch.Generator().manual_seed(per_image),
            timesteps_per_image=per_image, timestep_batch=5)
        spreads[per_image] = estimate.std().item()
    assert spreads[1] > 1.5 * spreads[6] > 1.5 * spreads[19]
    # With K = T - 1 only x_t's noise is left, as in the exact sum.
    assert spreads[19] == pytest.approx(exact.std().item(), rel=0.3)


def test_importance_sampling_is_far_less_noisy_than_uniform_strata():
    model = tiny_model()
    images = one_image_repeated(64)
    options = dict(timesteps_per_image=4, timestep_batch=5)
    uniform = model.bits_per_dim(images, torch.Generator().manual_seed(1),
                                 estimator="mc-stratified", **options)
    importance = TimestepImportance(20)
    first = model.bits_per_dim(images, torch.Generator().manual_seed(1),
                               estimator="mc-importance", importance=importance, **options)
    assert first.std() < 0.5 * uniform.std()  # the 1/t start already
    assert int(importance.counts.sum()) == 4 * 64  # the batch's terms were observed
    learnt = model.bits_per_dim(images, torch.Generator().manual_seed(2),
                                estimator="mc-importance", importance=importance, **options)
    assert learnt.std() < 0.5 * uniform.std()
    # Without a state to learn in, a fresh one: the 1/t proposal.
    alone = model.bits_per_dim(images, torch.Generator().manual_seed(1),
                               estimator="mc-importance", **options)
    assert torch.equal(alone, first)


def test_bound_options_choose_exact_for_a_small_pass_and_mc_otherwise():
    model = tiny_model(timesteps=1000)
    assert model.bound_options(20) == {"estimator": "exact"}
    assert model.bound_options(21) == {"estimator": "mc-importance", "timesteps_per_image": 16}
    assert model.bound_options(None) == {"estimator": "mc-importance", "timesteps_per_image": 16}
    assert model.bound_options(20, timesteps_per_image=8) == {
        "estimator": "mc-importance", "timesteps_per_image": 8}
    assert model.bound_options(10**6, estimator="exact") == {"estimator": "exact"}
    assert model.bound_options(1, estimator="mc-stratified", timesteps_per_image=5000) == {
        "estimator": "mc-stratified", "timesteps_per_image": 999}
    configured = tiny_model(timesteps=1000, vlb_estimator="mc-stratified",
                            vlb_timesteps_per_image=3)
    assert configured.bound_options(1) == {"estimator": "mc-stratified", "timesteps_per_image": 3}
    with pytest.raises(UserError, match="timesteps_per_image=4 applies to a Monte-Carlo"):
        model.bound_options(1, estimator="exact", timesteps_per_image=4)
    with pytest.raises(UserError, match="unknown bound estimator 'mc'"):
        model.bound_options(1, estimator="mc")


# ----------------------------------------------------------------------------- held-out passes


class MeanPixel(GenerativeModel):
    """A stand-in family: bits/dim = the image's mean pixel / 100 (known per image)."""

    def loss(self, x):
        raise NotImplementedError

    def sample(self, n, generator, **options):
        raise NotImplementedError

    def bits_per_dim(self, x, scale: float = 100.0):
        return x.float().mean(dim=(1, 2, 3)) / scale


def test_held_out_stderr_is_the_spread_of_the_per_image_values(tmp_path):
    shards = resolve_shards(str(make_id_shards(tmp_path / "ids", num_shards=3, per_shard=5)))
    common = dict(image_size=8, channels=1, batch_size=4)
    result = held_out_evaluation(MeanPixel(), shards, scale=50.0, **common)
    per_image = torch.cat([MeanPixel().bits_per_dim(torch.from_numpy(_image(i)), 50.0)
                           for i in range(15)])
    mean, stderr = mean_and_stderr(per_image)
    assert result.images == 15 and result.options == {"scale": 50.0}
    assert result.bits_per_dim == pytest.approx(mean) and result.stderr == pytest.approx(stderr)
    assert held_out_bits_per_dim(MeanPixel(), shards, scale=50.0, **common) == pytest.approx(
        (mean, 15))
    one = held_out_evaluation(MeanPixel(), shards, max_images=1, **common)
    assert one.images == 1 and one.stderr is None


def _image(index: int):
    """make_id_shards' sample `index`, as a [1, 1, 8, 8] uint8 array."""
    import numpy as np

    array = np.full((8, 8), 255 - index, dtype=np.uint8)
    array[0, :] = index
    array[1, :] = np.arange(8, dtype=np.uint8) * (200 // 8)
    return array[None, None]


def test_pass_images_counts_the_manifest_and_max_images(tmp_path):
    shards = resolve_shards(str(make_id_shards(tmp_path / "ids", num_shards=3, per_shard=5)))
    assert pass_images(shards) == 15
    assert pass_images(shards, max_images=7) == 7
    assert pass_images(shards, rank=0, world_size=2) == 10
    assert pass_images(shards, rank=1, world_size=2, max_images=7) == 3
    bare = resolve_shards(shards.urls[0])
    assert pass_images(bare) is None and pass_images(bare, max_images=4) == 4


def test_held_out_diffusion_pass_resolves_auto_learns_a_proposal_and_reports_progress(tmp_path):
    shards = resolve_shards(str(make_id_shards(tmp_path / "ids", num_shards=4, per_shard=6)))
    common = dict(image_size=8, channels=1, batch_size=8)
    # 24 images x T = 1000 > 20,000: the Monte-Carlo estimate; importance from the second batch.
    model = tiny_model(timesteps=1000, vlb_timesteps_per_image=4)
    done = []
    torch.manual_seed(0)
    result = held_out_evaluation(model, shards, progress=done.append, **common)
    assert result.options == {"estimator": "mc-importance", "timesteps_per_image": 4}
    assert result.images == 24 and result.stderr > 0 and math.isfinite(result.bits_per_dim)
    assert sum(done) == pytest.approx(24) and len(done) > 3  # within batches, not only after
    # The same pass by hand: one estimator, the same seeds, batch after batch.
    torch.manual_seed(0)
    estimator = model.held_out_estimator(24)
    from pipeline.data import eval_batches

    per_image = torch.cat([estimator(batch) for batch in eval_batches(
        shards, rank=0, world_size=1, num_workers=0, **common)])
    assert int(estimator.importance.counts.sum()) == 4 * 24
    mean, stderr = mean_and_stderr(per_image)
    assert result.bits_per_dim == pytest.approx(mean) and result.stderr == pytest.approx(stderr)
    # 24 images x T = 20: the exact sum.
    small = held_out_evaluation(tiny_model(timesteps=20), shards, **common)
    assert small.options == {"estimator": "exact"}


# ---------------------------------------------------------------------------------- launch eval


@pytest.fixture(scope="module")
def ddpm_run(tmp_path_factory) -> Path:
    """A copy of the 3-step tiny DDPM (T = 50, 32px) in tests/fixtures: no training needed."""
    run_dir = tmp_path_factory.mktemp("eval_bound") / "run"
    shutil.copytree(LEGACY_DDPM, run_dir)
    return run_dir


def _eval(run_dir: Path, digits_dir: Path, *extra: str):
    return run_cli("launch", "eval", str(run_dir), "--shards", str(digits_dir / "test"),
                   "--batch-size", "8", *extra)


def _report(result) -> dict:
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, result.stdout  # stdout: the JSON only
    return json.loads(lines[0])


@pytest.mark.slow
def test_launch_eval_names_the_estimator_and_shows_progress(ddpm_run, digits_dir):
    mc = _report(_eval(ddpm_run, digits_dir, "--max-images", "16", "--estimator",
                       "mc-importance", "--timesteps-per-image", "4"))
    assert mc["estimator"] == "mc-importance" and mc["timesteps_per_image"] == 4
    assert mc["kind"] == "upper_bound" and mc["images"] == 16
    assert 0 < mc["bits_per_dim_stderr"] < mc["bits_per_dim"]

    exact = _eval(ddpm_run, digits_dir, "--max-images", "16")  # auto: 16 x 50 is small
    report = _report(exact)
    assert report["estimator"] == "exact" and "timesteps_per_image" not in report
    assert report["bits_per_dim_stderr"] > 0
    bar = exact.stderr.replace("\r", "\n")
    assert "16/16 images" in bar and "eval" in bar
    # Within a batch the bar moves too: 8 images a batch, 50 timesteps in calls of 4.
    assert any(f"| {n}/16 images" in bar for n in (1, 2, 3, 5, 6, 7))

    quiet = _eval(ddpm_run, digits_dir, "--max-images", "4", "--no-progress")
    assert _report(quiet)["images"] == 4 and "images" not in quiet.stderr


@pytest.mark.slow
def test_launch_eval_progress_comes_from_rank_0_only(ddpm_run, digits_dir):
    result = _eval(ddpm_run, digits_dir, "--max-images", "8", "--nproc", "2",
                   "--timesteps-per-image", "2")
    report = _report(result)
    assert report["images"] == 8 and report["estimator"] == "mc-importance"
    assert "rank 0 of 2" in result.stderr and "rank 1" not in result.stderr


@pytest.mark.slow
def test_launch_eval_estimator_errors_are_one_line(ddpm_run, digits_dir):
    result = _eval(ddpm_run, digits_dir, "--estimator", "exact", "--timesteps-per-image", "4")
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "timesteps_per_image=4 applies to a Monte-Carlo" in lines[0], lines
