"""Stop a run cleanly on SIGTERM / SIGINT, from the first check to the last file written.

Inside `stop_requests()` the first signal only sets a flag; the run reads it at its safe points (after
the check stage, after the model has loaded, after each optimizer step, between evaluation batches) and
stops there with `StopRequested`, after saving what can be saved. Further signals are noted and ignored,
so a second Ctrl-C cannot tear a half-written save (writes are atomic anyway, see `checkpoint`). A signal
that arrives during the final save lets the save finish: the run is then complete.

The blocks nest: an inner `stop_requests()` (the training loop's) shares the outer block's flag, so a
signal during model loading is still seen after it.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from slimtune.errors import SlimtuneError


class StopFlag:
    def __init__(self) -> None:
        self.signal_name: str | None = None

    @property
    def requested(self) -> bool:
        return self.signal_name is not None


class StopRequested(SlimtuneError):
    """A signal stopped the run at a safe point; not an error (the CLI exits 0).

    `resumable`: a complete checkpoint exists, so `resume=true` continues the run; otherwise the same
    command starts it again."""

    def __init__(self, message: str, resumable: bool) -> None:
        super().__init__(message)
        self.resumable = resumable


_active: StopFlag | None = None


@contextmanager
def stop_requests() -> Iterator[StopFlag]:
    """Route SIGTERM and SIGINT to a flag for the duration of the block (main thread only)."""
    global _active
    if _active is not None:  # nested: the outer block already routes the signals
        yield _active
        return
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, _frame) -> None:
        if flag.signal_name is None:
            flag.signal_name = signal.Signals(signum).name

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    _active = flag
    try:
        yield flag
    finally:
        _active = None
        for sig, old in previous.items():
            signal.signal(sig, old)


def requested_stop() -> str | None:
    """The name of the signal that asked the current run to stop, or None (also outside any run)."""
    return _active.signal_name if _active is not None else None


def stop_point(where: str, resumable: bool, then: str = "") -> None:
    """A safe point: raise `StopRequested` if a stop was requested; `where` says what was cut short."""
    name = requested_stop()
    if name is not None:
        raise StopRequested(f"{name}: stopped {where}" + (f"; {then}" if then else ""), resumable)
