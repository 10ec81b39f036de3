"""An asyncio event loop with a virtual clock, for fast deterministic simulations and tests.

Whenever the loop would sleep until its next timer, the clock jumps to that timer instead, so
``await asyncio.sleep(3600)`` returns at once in wall time while ``loop.time()`` advances by an
hour. Real I/O (sockets, threads) still works, but waiting for it does not advance the clock.
Use it with the in-memory transport (:mod:`dht.peer.memory_transport`):

>>> from dht.peer import virtual_clock
>>> virtual_clock.run(main())   # like asyncio.run(main()), on virtual time
"""

from __future__ import annotations

import asyncio
import selectors
from typing import Any, Coroutine, TypeVar

__all__ = ["VirtualClockLoop", "run"]

T = TypeVar("T")


class _JumpingSelector(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0

    def select(self, timeout: float | None = None) -> list:
        events = super().select(0)
        if events or timeout == 0:
            return events
        if timeout is None:  # nothing scheduled: only real I/O (or another thread) can wake us
            return super().select(None)
        self.now += timeout
        return []


class VirtualClockLoop(asyncio.SelectorEventLoop):
    """A selector event loop whose ``time()`` is virtual and jumps over idle waits."""

    def __init__(self) -> None:
        self._jumping_selector = _JumpingSelector()
        super().__init__(selector=self._jumping_selector)
        self._clock_resolution = 1e-9

    def time(self) -> float:
        return self._jumping_selector.now


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion on a fresh VirtualClockLoop (like ``asyncio.run``)."""
    loop = VirtualClockLoop()
    try:
        asyncio.set_event_loop(loop)
        return loop.run_until_complete(coro)
    finally:
        try:
            tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for task in tasks:
                task.cancel()
            if tasks:
                loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            asyncio.set_event_loop(None)
            loop.close()
