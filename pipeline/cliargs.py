"""Command-line parsing where options and positionals mix in any order.

``launch local CONFIG --nproc 2 train.lr=1e-4`` must mean what ``launch local CONFIG
train.lr=1e-4 --nproc 2`` means, as in torchrun, accelerate and sbatch. Plain argparse stops
collecting a ``nargs="*"`` positional at the first option and then refuses the overrides that
follow it; its intermixed mode does not, but refuses parsers with sub-commands. `Parser` is used
for every sub-command of ``launch`` and ``data-prep``: each sub-command parses intermixed, while
the top level keeps its sub-commands.
"""

from __future__ import annotations

import argparse


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose sub-commands accept options and positionals in any order."""

    _mixing = False

    def parse_known_args(self, args=None, namespace=None):
        if self._mixing or self._has_subcommands():
            return super().parse_known_args(args, namespace)
        # parse_known_intermixed_args calls parse_known_args itself (twice): the flag sends those
        # inner calls to argparse's own implementation.
        self._mixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._mixing = False

    def _has_subcommands(self) -> bool:
        return any(isinstance(action, argparse._SubParsersAction) for action in self._actions)


def subcommands(parser: argparse.ArgumentParser, **kwargs) -> argparse._SubParsersAction:
    """``parser.add_subparsers`` whose sub-command parsers are `Parser`s."""
    return parser.add_subparsers(parser_class=Parser, **kwargs)
