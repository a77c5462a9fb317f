"""Errors a user can cause: bad configs, bad data, bad paths.

A `UserError` carries one line that names what is wrong and where; the command-line entry points
print it without a traceback and exit with status 2. Anything else is our own bug and keeps its
traceback.
"""

from __future__ import annotations

import os


class UserError(Exception):
    """A mistake in input the user controls (config, data, paths, arguments)."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def one_line(exc: BaseException) -> str:
    """The user-facing line of an exception, unwrapping errors re-raised from DataLoader workers.

    PyTorch re-raises a worker's exception as the same type with the worker's whole traceback as
    its message; the user's line is the last line of that traceback.
    """
    text = str(exc)
    if "Original Traceback" in text:
        last = text.strip().splitlines()[-1]
        prefix = f"{type(exc).__module__}.{type(exc).__qualname__}: "
        for head in (prefix, f"{type(exc).__qualname__}: "):
            if last.startswith(head):
                return last[len(head):]
        return last
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__


def rank_tag() -> str:
    """``"[rank R] "`` inside a multi-process job (torchrun-style environment), else ``""``."""
    if os.environ.get("WORLD_SIZE", "1") == "1":
        return ""
    return f"[rank {os.environ.get('RANK', '0')}] "
