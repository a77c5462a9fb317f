"""Stop requests from signals: the handler only records the signal; the trainer acts on it.

Slurm (``--signal=USR2@N``, preemption), ``launch local`` (SIGTERM/SIGUSR1 forwarded to its
processes) and Ctrl-C all arrive here. Nothing is done inside the handler: the trainer polls
`stop_requested` at step boundaries, all processes agree, save one checkpoint together and exit
with `EXIT_PREEMPTED` so the launcher (or Slurm) knows a relaunch continues the run.
"""

from __future__ import annotations

import signal
from types import FrameType

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped cleanly, relaunching resumes
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)

_received: int | None = None


def _handler(signum: int, frame: FrameType | None) -> None:
    global _received
    if signum == signal.SIGINT and _received == signal.SIGINT:
        # A second Ctrl-C means now.
        raise KeyboardInterrupt
    _received = signum


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
