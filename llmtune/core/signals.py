"""SIGTERM is Ctrl-C: what schedulers, ``docker stop`` and ``kill`` send gets the same orderly stop.

`Terminated` is the `KeyboardInterrupt` a SIGTERM turns into, so every ``except KeyboardInterrupt`` and
``finally`` that cleans up after Ctrl-C (a temporary output removed, a training checkpoint saved) runs for it
too; the command line exits with 143 (128 + SIGTERM) instead of 130. `sigterm_raises` installs the handler
(main thread only); the training loop installs its own, which stops at the next step boundary as on SIGINT.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import threading
from collections.abc import Iterator
from typing import Any

#: The exit status of a process stopped by SIGTERM / by Ctrl-C (128 + the signal number).
EXIT_SIGTERM = 128 + signal.SIGTERM
EXIT_SIGINT = 128 + signal.SIGINT


class Terminated(KeyboardInterrupt):
    """A SIGTERM, raised like Ctrl-C's `KeyboardInterrupt` (and caught by the same handlers)."""


def exit_code(exc: BaseException) -> int:
    """143 for `Terminated`, 130 for any other `KeyboardInterrupt`."""
    return EXIT_SIGTERM if isinstance(exc, Terminated) else EXIT_SIGINT


@dataclasses.dataclass
class SigtermSeen:
    """What `sigterm_raises` yields: whether a SIGTERM arrived in its block."""

    received: bool = False


@contextlib.contextmanager
def sigterm_raises() -> Iterator[SigtermSeen]:
    """Within the block, SIGTERM raises `Terminated` (outside the main thread: nothing changes)."""
    seen = SigtermSeen()
    if threading.current_thread() is not threading.main_thread():
        yield seen
        return

    def handler(signum: int, frame: Any) -> None:
        seen.received = True
        raise Terminated("terminated (SIGTERM)")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield seen
    finally:
        signal.signal(signal.SIGTERM, previous)
