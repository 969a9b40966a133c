"""The engine-to-event-loop mailbox (serve/app.py): every event arrives, in order, per queue; a burst
posted while a delivery is pending wakes the loop once; a closed loop is reported to the sender."""

from __future__ import annotations

import asyncio
import threading

import pytest

from slimtune.serve.app import _Mailbox


def test_bursts_arrive_in_order_with_one_wake_up_each():
    async def main() -> tuple[list[list[int]], int]:
        loop = asyncio.get_running_loop()
        mailbox = _Mailbox(loop)
        wakeups = 0
        original = loop.call_soon_threadsafe

        def counting(callback, *args):
            nonlocal wakeups
            wakeups += 1
            return original(callback, *args)

        loop.call_soon_threadsafe = counting
        queues = [asyncio.Queue() for _ in range(4)]
        release = threading.Event()

        def engine() -> None:  # three bursts of 40 events over 4 queues, like three decode steps
            for burst in range(3):
                for i in range(40):
                    mailbox.post(queues[i % 4], burst * 40 + i)
                release.wait()
                release.clear()

        thread = threading.Thread(target=engine)
        thread.start()
        received: list[list[int]] = [[] for _ in queues]
        for _ in range(3):
            for q, queue in enumerate(queues):
                for _ in range(10):
                    received[q].append(await asyncio.wait_for(queue.get(), 5))
            release.set()
        thread.join()
        return received, wakeups

    received, wakeups = asyncio.run(main())
    for q, events in enumerate(received):
        assert events == [n for n in range(120) if n % 4 == q]
    assert wakeups <= 6, f"{wakeups} wake-ups for 3 bursts"  # one per burst (a burst may split in two)


def test_closed_loop_is_reported_to_the_sender():
    loop = asyncio.new_event_loop()
    mailbox = _Mailbox(loop)
    loop.close()
    with pytest.raises(RuntimeError):
        mailbox.post(asyncio.Queue(), "event")
