"""Sampling options are typed per family and checked when the config loads, not at the first grid."""

from __future__ import annotations

import pytest

from pipeline import config as config_module
from pipeline import models
from pipeline.errors import UserError


@pytest.mark.parametrize("config, override, message", [
    ("configs/tiny/ddpm.yaml", "sample.options.stpes=3", "unknown sampling option 'stpes' for the diffusion family"),
    ("configs/tiny/ddpm.yaml", "sample.options.sampler=ddmi", "sampler: Input should be 'ddpm', 'ddim', 'euler' or 'heun'"),
    ("configs/tiny/ddpm.yaml", "sample.options.steps=0", "steps: must be greater than 0"),
    ("configs/tiny/flow.yaml", "sample.options.temperature=-1", "temperature: must be greater than 0"),
    ("configs/tiny/vae.yaml", "sample.options.steps=10", "unknown sampling option 'steps' for the vae family"),
    ("configs/tiny/vae.yaml", "sample.options.mean=maybe", "mean: Input should be a valid boolean"),
    ("configs/tiny/pixelcnn.yaml", "sample.options.temperature=hot", "temperature"),
])
def test_a_bad_sampling_option_fails_when_the_config_loads(config, override, message):
    with pytest.raises(UserError) as error:
        config_module.load(config, [override])
    assert "sample.options: " in str(error.value) and message in str(error.value)


def test_good_options_load_with_their_types():
    config = config_module.load("configs/tiny/ddpm.yaml", ["sample.options.sampler=ddpm", "sample.options.steps=20"])
    assert models.check_sample_options("diffusion", dict(config.sample.options)) == {"sampler": "ddpm", "steps": 20}


def test_the_vae_mean_option_loads_as_a_boolean():
    config = config_module.load("configs/tiny/vae.yaml", ["sample.options.mean=false"])
    assert models.check_sample_options("vae", dict(config.sample.options))["mean"] is False


@pytest.mark.parametrize("family", list(models.FAMILIES))
def test_every_family_declares_its_options(family):
    assert models.sample_options_model(family).model_fields  # at least one option each
