"""Stop training cleanly on SIGTERM / SIGINT: finish the step, save a checkpoint, exit 0.

Inside `stop_requests()` the first signal only sets a flag that the loop reads after each step;
further signals while the checkpoint is being written are noted and ignored, so a second Ctrl-C
cannot tear a half-written save (the write is atomic anyway, see `checkpoint`).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class StopFlag:
    def __init__(self) -> None:
        self.signal_name: str | None = None

    @property
    def requested(self) -> bool:
        return self.signal_name is not None


@contextmanager
def stop_requests() -> Iterator[StopFlag]:
    """Route SIGTERM and SIGINT to a flag for the duration of the block (main thread only)."""
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, _frame) -> None:
        if flag.signal_name is None:
            flag.signal_name = signal.Signals(signum).name

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
