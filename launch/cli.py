"""The ``launch`` command: train locally or on Slurm, sample, and inspect runs."""

from __future__ import annotations

import argparse
import os
import sys

from pipeline import cliargs
from pipeline.errors import UserError, one_line


def _local(args) -> int:
    from launch.local import launch_local
    from pipeline import config as config_module

    config = config_module.load(args.config, args.overrides)
    code = launch_local(config, args.nproc)
    if args.nproc == 1:  # this process trained: it ends as every training process does
        from pipeline.distributed import leave

        leave(code)
    return code


def _sample(args) -> int:
    from launch.sample import parse_options, sample_to_png

    path = sample_to_png(
        args.run_dir, args.n, args.out, args.seed, args.ema, parse_options(args.options),
        device=args.device, checkpoint_path=args.checkpoint, classes=args.classes,
    )
    print(path)
    return 0


def _eval(args) -> int:
    from launch.evaluate import launch_eval

    return launch_eval(args)

def _export(args) -> int:
    from launch.weights import export_weights

    print(export_weights(args.run_dir, args.out, args.ema, args.checkpoint))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = cliargs.Parser(prog="launch", description=__doc__)
    commands = cliargs.subcommands(parser, dest="command", required=True)

    local = commands.add_parser("local", help="train on this machine with N processes")
    local.add_argument("config", help="YAML config file")
    local.add_argument("overrides", nargs="*", default=[], help="key.sub=value overrides")
    local.add_argument("--nproc", type=int, default=1, help="processes (one per GPU, or CPU processes)")
    local.set_defaults(func=_local)

    sample = commands.add_parser("sample", help="write a grid of samples from a run's checkpoint")
    sample.add_argument("run_dir", help="a run directory, or a weights file from `launch export`")
    sample.add_argument("options", nargs="*", default=[], help="sampling options, e.g. sampler=ddim steps=50")
    sample.add_argument("--n", type=int, default=64,
                        help="number of images (with --classes: images per class)")
    sample.add_argument("--classes", default=None, metavar="0,1,2",
                        help="class-conditional runs: one grid row per listed class, in this order")
    sample.add_argument("--out", default="samples.png", help="output PNG")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                        help="use the EMA weights when the run has them (default)")
    sample.add_argument("--checkpoint", default=None, help="a specific checkpoint directory")
    sample.add_argument("--device", default="cpu")
    sample.set_defaults(func=_sample)

    from launch.evaluate import add_arguments as add_eval_arguments

    evaluate = commands.add_parser("eval", help="held-out bits/dim of a run's checkpoint, as JSON")
    add_eval_arguments(evaluate)
    evaluate.set_defaults(func=_eval)

    export = commands.add_parser(
        "export", help="write a run's full weights (any strategy, ZeRO included) to one safetensors file"
    )
    export.add_argument("run_dir")
    export.add_argument("--out", default="model.safetensors", help="output .safetensors file")
    export.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                        help="export the EMA weights when the run has them (default)")
    export.add_argument("--checkpoint", default=None, help="a specific checkpoint directory")
    export.set_defaults(func=_export)

    from launch import slurm, status

    slurm.add_commands(commands)
    status.add_command(commands)  # any run directory, Slurm or not
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:
        print(f"launch: error: {one_line(exc)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `launch status RUN | head`: the reader left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
