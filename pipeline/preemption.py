"""Stop requests from signals: the handler only records the signal; the trainer acts on it.

Slurm (``--signal=USR2@N``, preemption), ``launch local`` (SIGTERM/SIGUSR1 forwarded to its
processes) and Ctrl-C all arrive here. Nothing is done inside the handler: the trainer polls
`stop_requested` at step boundaries, all processes agree, save one checkpoint together and exit
with `EXIT_PREEMPTED` so the launcher (or Slurm) knows a relaunch continues the run.

The one exception is long work that is not training and can be dropped (a sample grid): inside
`interruptible()` the handler also raises `StopRequested`, so a stop is honoured at once instead
of minutes later when the grid is done.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from types import FrameType

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped cleanly, relaunching resumes
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)

_received: int | None = None
_interruptible = False


class StopRequested(Exception):
    """Raised inside `interruptible()` when a stop signal arrives."""


def _handler(signum: int, frame: FrameType | None) -> None:
    global _received
    if signum == signal.SIGINT and _received == signal.SIGINT:
        # A second Ctrl-C means now.
        raise KeyboardInterrupt
    _received = signum
    if _interruptible:
        raise StopRequested(signal.Signals(signum).name)


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Work inside may be abandoned: a stop signal (already received, or arriving inside) raises
    `StopRequested` here. The flag is recorded as usual, so the trainer still stops and saves."""
    global _interruptible
    if _received is not None:
        raise StopRequested(received_signal_name())
    _interruptible = True
    try:
        yield
    finally:
        _interruptible = False


def install(signals: tuple[int, ...] = STOP_SIGNALS) -> None:
    """Route the stop signals to the flag (call in every training process)."""
    for signum in signals:
        signal.signal(signum, _handler)


def stop_requested() -> bool:
    return _received is not None


def received_signal() -> int | None:
    """The signal number that asked this process to stop, if any."""
    return _received


def received_signal_name() -> str | None:
    return signal.Signals(_received).name if _received is not None else None


def adopt(signum: int) -> None:
    """Record a signal another process received, once all processes agreed to stop on it, so
    every rank reports the same reason (e.g. rank 0 decides on requeueing)."""
    global _received
    if _received is None:
        _received = signum


def reset() -> None:
    global _received
    _received = None
