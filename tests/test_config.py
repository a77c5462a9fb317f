"""pipeline.config: every shipped config validates; every mistake is one line naming file and key.

All tests are in-process and read or write only small YAML files under tmp_path.
"""

from __future__ import annotations

from pathlib import Path

import pydantic
import pytest
import yaml

from pipeline import config as config_module
from pipeline.errors import UserError

REPO = Path(__file__).resolve().parent.parent
CONFIGS = sorted(
    path for path in (REPO / "configs").rglob("*") if path.suffix in (".yaml", ".yml") and path.is_file()
)
TINY = REPO / "configs" / "tiny" / "ddpm.yaml"


def load_error(path, overrides=()) -> str:
    """The message of the UserError that loading raises, checked to be one line."""
    with pytest.raises(UserError) as info:
        config_module.load(path, list(overrides))
    message = str(info.value)
    assert "\n" not in message.strip(), f"not one line: {message!r}"
    return message


def write_config(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def tiny_raw() -> dict:
    return yaml.safe_load(TINY.read_text())


# --- shipped configs ------------------------------------------------------------------------------


def test_configs_directory_is_not_empty():
    assert TINY in CONFIGS
    assert len(CONFIGS) >= 3


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(REPO / "configs")) for p in CONFIGS])
def test_every_shipped_config_validates(path):
    config = config_module.load(path)
    assert config.run_dir
    assert config.train.max_steps > 0
    assert config.model.family in ("diffusion", "autoregressive", "vae", "flow", "autoencoder")


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(REPO / "configs")) for p in CONFIGS])
def test_resolved_config_round_trips_through_dump_yaml(path, tmp_path):
    config = config_module.load(path)
    dumped = write_config(tmp_path, config_module.dump_yaml(config), "resolved.yaml")
    again = config_module.load(dumped)
    assert again == config
    assert config_module.to_dict(again) == config_module.to_dict(config)
    # Dumping the reloaded config gives the same text: the resolved form is a fixed point.
    assert config_module.dump_yaml(again) == config_module.dump_yaml(config)


def test_round_trip_with_overrides(tmp_path):
    config = config_module.load(
        TINY, ["train.lr=1e-4", "wandb.tags=[a,b]", "model.channel_mult=[1,2]", "train.mixed_precision=no"]
    )
    dumped = write_config(tmp_path, config_module.dump_yaml(config), "resolved.yaml")
    assert config_module.load(dumped) == config


def test_round_trip_keeps_number_like_strings(tmp_path):
    raw = tiny_raw()
    raw["wandb"]["name"] = "1.5"
    path = write_config(tmp_path, yaml.safe_dump(raw))
    config = config_module.load(path)
    assert config.wandb.name == "1.5"
    dumped = write_config(tmp_path, config_module.dump_yaml(config), "resolved.yaml")
    assert config_module.load(dumped) == config


# --- unknown keys -------------------------------------------------------------------------------


def test_typo_in_file_names_file_key_and_near_match(tmp_path):
    raw = tiny_raw()
    raw["train"]["warmup_stpes"] = raw["train"].pop("warmup_steps")
    path = write_config(tmp_path, yaml.safe_dump(raw))
    message = load_error(path)
    assert str(path) in message
    assert "train.warmup_stpes" in message
    assert "'warmup_steps'" in message and "did you mean" in message


def test_typo_of_required_key_names_the_typo(tmp_path):
    raw = tiny_raw()
    raw["train"]["lrr"] = raw["train"].pop("lr")
    path = write_config(tmp_path, yaml.safe_dump(raw))
    message = load_error(path)
    assert str(path) in message
    assert "train.lrr" in message
    assert "'lr'" in message and "did you mean" in message


def test_typo_at_top_level(tmp_path):
    raw = tiny_raw()
    raw["sead"] = raw.pop("seed")
    path = write_config(tmp_path, yaml.safe_dump(raw))
    message = load_error(path)
    assert str(path) in message and "'sead'" in message and "'seed'" in message


def test_typo_in_override_names_file_and_key():
    message = load_error(TINY, ["data.batchsize=4"])
    assert str(TINY) in message
    assert "data.batchsize" in message
    assert "'batch_size'" in message


def test_typo_in_model_section_names_key():
    message = load_error(TINY, ["model.base_chanels=8"])
    assert str(TINY) in message
    assert "model.base_chanels" in message


def test_typo_in_model_section_suggests_near_match():
    message = load_error(TINY, ["model.base_chanels=8"])
    assert "did you mean 'base_channels'" in message


def test_nested_new_key_from_override_is_unknown():
    message = load_error(TINY, ["train.foo.bar=1"])
    assert "train.foo" in message and "unknown key" in message


def test_unknown_section_is_rejected():
    message = load_error(TINY, ["trian.lr=1"])
    assert "trian" in message and "'train'" in message


# --- wrong types and impossible values ------------------------------------------------------------


@pytest.mark.parametrize(
    "override, key, expected",
    [
        ("data.batch_size=-1", "data.batch_size", "greater than 0"),
        ("data.batch_size=0", "data.batch_size", "greater than 0"),
        ("data.batch_size=four", "data.batch_size", "integer"),
        ("train.max_steps=1.5", "train.max_steps", "integer"),
        ("train.lr=abc", "train.lr", "number"),
        ("train.lr=-0.5", "train.lr", "greater than 0"),
        ("train.mixed_precision=fp8", "train.mixed_precision", "'bf16'"),
        ("wandb.mode=sometimes", "wandb.mode", "'offline'"),
        ("data.channels=2", "data.channels", "1"),
        ("data.num_workers=-1", "data.num_workers", "greater than or equal to 0"),
        ("checkpoint.keep_last=0", "checkpoint.keep_last", "greater than or equal to 1"),
    ],
)
def test_wrong_value_names_key_and_expectation(override, key, expected):
    message = load_error(TINY, [override])
    assert str(TINY) in message
    assert key in message
    assert expected in message
    got = override.split("=", 1)[1]
    assert got in message  # what the user wrote is shown back


def test_unknown_model_family_lists_families():
    message = load_error(TINY, ["model.family=gan"])
    assert str(TINY) in message
    assert "model" in message and "'gan'" in message
    for family in ("diffusion", "autoregressive", "vae", "flow"):
        assert family in message


def test_missing_model_family(tmp_path):
    raw = tiny_raw()
    del raw["model"]["family"]
    message = load_error(write_config(tmp_path, yaml.safe_dump(raw)))
    assert "model" in message and "family" in message


def test_missing_required_key(tmp_path):
    raw = tiny_raw()
    del raw["data"]["batch_size"]
    path = write_config(tmp_path, yaml.safe_dump(raw))
    message = load_error(path)
    assert str(path) in message and "data.batch_size" in message and "missing" in message


def test_wrong_value_in_file_names_file(tmp_path):
    raw = tiny_raw()
    raw["data"]["batch_size"] = -4
    path = write_config(tmp_path, yaml.safe_dump(raw))
    message = load_error(path)
    assert message.startswith(str(path))
    assert "data.batch_size" in message and "-4" in message


def test_several_problems_are_counted_on_one_line(tmp_path):
    raw = tiny_raw()
    raw["data"]["batch_size"] = -4
    raw["train"]["lr"] = "fast"
    message = load_error(write_config(tmp_path, yaml.safe_dump(raw)))
    assert "1 more problem" in message


def test_cross_field_check(tmp_path):
    message = load_error(TINY, ["eval.every_steps=10", "data.eval_shards=null"])
    assert "eval.every_steps" in message and "eval_shards" in message


# --- YAML-level problems ------------------------------------------------------------------------


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = write_config(tmp_path, "run_dir: x\ntrain:\n  lr: [1, 2\n  max_steps: 3\n")
    message = load_error(path)
    assert str(path) in message
    assert "line 4" in message
    assert "YAML" in message


def test_tab_indentation_error_names_line(tmp_path):
    path = write_config(tmp_path, "run_dir: x\ntrain:\n\tlr: 1\n")
    message = load_error(path)
    assert str(path) in message and "line 3" in message


@pytest.mark.parametrize("text", ["", "\n\n", "# nothing but a comment\n"])
def test_empty_file(tmp_path, text):
    path = write_config(tmp_path, text)
    message = load_error(path)
    assert str(path) in message and "empty" in message


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_top_level_not_a_mapping(tmp_path, text):
    path = write_config(tmp_path, text)
    message = load_error(path)
    assert str(path) in message and "mapping" in message


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    message = load_error(path)
    assert str(path) in message and "not found" in message


# --- overrides ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, parts, value",
    [
        ("train.lr=1e-4", ["train", "lr"], 1e-4),
        ("train.lr=3E-4", ["train", "lr"], 3e-4),
        ("train.lr=0.5", ["train", "lr"], 0.5),
        ("train.max_steps=100", ["train", "max_steps"], 100),
        ("model.channel_mult=[1,2]", ["model", "channel_mult"], [1, 2]),
        ("model.channel_mult=[1, 2, 4]", ["model", "channel_mult"], [1, 2, 4]),
        ("wandb.project=my-project", ["wandb", "project"], "my-project"),
        ("wandb.project=a=b", ["wandb", "project"], "a=b"),
        ("train.compile=true", ["train", "compile"], True),
        ("data.eval_shards=null", ["data", "eval_shards"], None),
        ("wandb.project=", ["wandb", "project"], ""),
    ],
)
def test_parse_override(text, parts, value):
    got_parts, got_value = config_module.parse_override(text)
    assert got_parts == parts
    assert got_value == value
    assert type(got_value) is type(value)


@pytest.mark.parametrize("text", ["train.lr", "=3", "train..lr=3", ".lr=3"])
def test_malformed_override(text):
    with pytest.raises(UserError) as info:
        config_module.parse_override(text)
    assert text in str(info.value)


def test_overrides_apply_numbers_lists_and_strings():
    config = config_module.load(
        TINY,
        [
            "train.lr=1e-4",
            "train.max_steps=7",
            "model.channel_mult=[1,2]",
            "wandb.project=some-project",
            "data.shards=[a.tar,b.tar]",
            "train.betas=[0.5,0.9]",
            "sample.options.steps=5",
        ],
    )
    assert config.train.lr == pytest.approx(1e-4) and isinstance(config.train.lr, float)
    assert config.train.max_steps == 7
    assert config.model.channel_mult == (1, 2)
    assert config.wandb.project == "some-project"
    assert config.data.shards == ["a.tar", "b.tar"]
    assert config.train.betas == (0.5, 0.9)
    assert config.sample.options == {"steps": 5}


def test_later_override_wins():
    config = config_module.load(TINY, ["train.lr=1e-4", "train.lr=2e-4"])
    assert config.train.lr == pytest.approx(2e-4)


def test_override_does_not_change_other_keys():
    base = config_module.load(TINY)
    changed = config_module.load(TINY, ["train.lr=1e-4"])
    assert config_module.to_dict(changed)["train"] | {"lr": base.train.lr} == config_module.to_dict(base)["train"]
    assert changed.model == base.model and changed.data == base.data


def test_override_creates_missing_optional_section():
    config = config_module.load(TINY, ["slurm.nodes=2"])
    assert config.slurm.nodes == 2


def test_override_value_with_section_is_rejected():
    with pytest.raises(UserError) as info:
        config_module.load(TINY, ["train.lr.value=3"])
    message = str(info.value)
    assert "train.lr" in message and "not a section" in message


def test_override_section_with_value_is_rejected():
    message = load_error(TINY, ["train=3"])
    assert str(TINY) in message and "train" in message


def test_override_section_then_subkey_is_rejected():
    with pytest.raises(UserError):
        config_module.load(TINY, ["model=diffusion", "model.base_channels=8"])


def test_apply_overrides_does_not_touch_input():
    raw = tiny_raw()
    before = yaml.safe_dump(raw)
    config_module.apply_overrides(raw, ["train.lr=1", "new.section=2"], "x")
    assert yaml.safe_dump(raw) == before


# --- mixed_precision: no ------------------------------------------------------------------------


def test_mixed_precision_bare_no_in_file_reads_as_no(tmp_path):
    text = TINY.read_text().replace('mixed_precision: "no"', "mixed_precision: no")
    assert "mixed_precision: no\n" in text
    assert yaml.safe_load(text)["train"]["mixed_precision"] is False  # what YAML 1.1 gives
    config = config_module.load(write_config(tmp_path, text))
    assert config.train.mixed_precision == "no"


def test_mixed_precision_no_override():
    config = config_module.load(TINY, ["train.mixed_precision=no"])
    assert config.train.mixed_precision == "no"
    assert config_module.load(TINY, ["train.mixed_precision=bf16"]).train.mixed_precision == "bf16"


def test_mixed_precision_true_is_not_a_precision():
    message = load_error(TINY, ["train.mixed_precision=yes"])
    assert "train.mixed_precision" in message


# --- frozen -------------------------------------------------------------------------------------


def test_config_is_frozen():
    config = config_module.load(TINY)
    with pytest.raises(pydantic.ValidationError):
        config.train.lr = 1.0
    with pytest.raises(pydantic.ValidationError):
        config.run_dir = "elsewhere"
    with pytest.raises(pydantic.ValidationError):
        config.model.base_channels = 4
    assert config.train.lr == config_module.load(TINY).train.lr


def test_dump_yaml_is_plain_yaml():
    config = config_module.load(TINY)
    data = yaml.safe_load(config_module.dump_yaml(config))
    assert data["train"]["mixed_precision"] == "no"
    assert data["model"]["family"] == "diffusion"
    assert isinstance(data["train"]["betas"], list)
