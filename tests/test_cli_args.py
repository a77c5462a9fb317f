"""Options and positionals in any order, for every `launch` and `data-prep` sub-command."""

from __future__ import annotations

import pytest

from data_prep.cli import build_parser as data_prep_parser
from launch.cli import build_parser as launch_parser


@pytest.mark.parametrize(
    "argv",
    [
        ["local", "c.yaml", "--nproc", "2", "train.lr=1e-4", "run_dir=runs/x"],
        ["local", "--nproc", "2", "c.yaml", "train.lr=1e-4", "run_dir=runs/x"],
        ["local", "c.yaml", "train.lr=1e-4", "--nproc", "2", "run_dir=runs/x"],
        ["local", "c.yaml", "train.lr=1e-4", "run_dir=runs/x", "--nproc=2"],
    ],
)
def test_launch_local_takes_overrides_anywhere(argv):
    args = launch_parser().parse_args(argv)
    assert (args.config, args.nproc, args.overrides) == ("c.yaml", 2, ["train.lr=1e-4", "run_dir=runs/x"])


def test_launch_sample_takes_options_anywhere():
    args = launch_parser().parse_args(["sample", "runs/x", "--n", "4", "sampler=ddim", "--out", "g.png", "steps=50"])
    assert (args.run_dir, args.n, args.out, args.options) == ("runs/x", 4, "g.png", ["sampler=ddim", "steps=50"])


def test_launch_slurm_takes_overrides_after_options():
    args = launch_parser().parse_args(["slurm", "c.yaml", "--dry-run", "slurm.nodes=2", "--wait", "x=1"])
    assert args.dry_run and args.wait and args.overrides == ["slurm.nodes=2", "x=1"]


def test_no_overrides_is_not_a_missing_argument(capsys):
    assert launch_parser().parse_args(["local", "c.yaml"]).overrides == []
    with pytest.raises(SystemExit):
        launch_parser().parse_args(["local"])
    assert "required: config\n" in capsys.readouterr().err


def test_data_prep_options_before_positionals():
    args = data_prep_parser().parse_args(["images", "--size", "16", "src", "--holdout", "0.1", "out"])
    assert (args.src, args.out, args.size, args.holdout) == ("src", "out", 16, 0.1)
