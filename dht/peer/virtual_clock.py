"""An asyncio event loop with a virtual clock, for fast deterministic simulations and tests.

Whenever the loop would sleep until its next timer, the clock jumps to that timer instead, so
``await asyncio.sleep(3600)`` returns at once in wall time while ``loop.time()`` advances by an
hour. Real I/O (sockets, threads) still works, but waiting for it does not advance the clock; while
a job runs in an executor (``loop.run_in_executor``, ``asyncio.to_thread``), the clock stands still
until it is done (computation takes no virtual time, and no timeout fires because of a thread).
``loop.dht_time()`` is the wall clock that goes with it (``epoch`` + virtual seconds): a
:class:`dht.DHTNode` created on this loop takes it as its clock, so record expirations follow
virtual time too. Use it with the in-memory transport (:mod:`dht.peer.memory_transport`):

>>> from dht.peer import virtual_clock
>>> virtual_clock.run(main())   # like asyncio.run(main()), on virtual time
"""

from __future__ import annotations

import asyncio
import selectors
from typing import Any, Callable, Coroutine, TypeVar

__all__ = ["VirtualClockLoop", "run", "EPOCH"]

T = TypeVar("T")

EPOCH = 1.7e9  # default wall-clock seconds (DHT time) at virtual time 0: a fixed value, for determinism


class _JumpingSelector(selectors.DefaultSelector):
    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.busy = 0  # executor jobs in flight

    def select(self, timeout: float | None = None) -> list:
        events = super().select(0)
        if events or timeout == 0:
            return events
        if timeout is None or self.busy:  # only real I/O or another thread can wake us (its job's end does)
            return super().select(None)
        self.now += timeout
        return []


class VirtualClockLoop(asyncio.SelectorEventLoop):
    """A selector event loop whose ``time()`` is virtual and jumps over idle waits."""

    def __init__(self, epoch: float = EPOCH) -> None:
        self._jumping_selector = _JumpingSelector()
        super().__init__(selector=self._jumping_selector)
        self._clock_resolution = 1e-9
        self.epoch = epoch

    def time(self) -> float:
        return self._jumping_selector.now

    def dht_time(self) -> float:
        """Wall-clock seconds (DHT time) on this loop: ``epoch`` + virtual seconds."""
        return self.epoch + self._jumping_selector.now

    # typeshed ties func's arguments to *args with a TypeVarTuple (typing_extensions on 3.10); this
    # override forwards them unchanged
    def run_in_executor(self, executor: Any, func: Callable[..., T],  # type: ignore[override]
                        *args: Any) -> asyncio.Future:
        """As asyncio's; the clock does not move until the job is done."""
        future = super().run_in_executor(executor, func, *args)
        self._jumping_selector.busy += 1

        def done(_: asyncio.Future) -> None:
            self._jumping_selector.busy -= 1

        future.add_done_callback(done)
        return future


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
