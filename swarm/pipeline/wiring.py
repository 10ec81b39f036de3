"""Stochastic wiring (algorithms.md 1.2-1.3): which server of a stage gets the next task.

- :class:`PerformanceEMA`: a peer's throughput (samples/s) as a bias-corrected EMA of seconds per
  sample, ``alpha = 0.1``; overlapping calls to one peer do not double-count wall time.
- :class:`StageBalancer`: one per (trainer, stage). A virtual-time weighted fair queue: a min-heap
  of ``(virtual finish time, random tie-breaker, peer)``; :meth:`StageBalancer.choose` pops the
  minimum, pushes it back ``task_size / throughput`` later (``s0 = 1 s/sample`` before the first
  measurement) and returns it, so in steady state a peer gets a share ``tau / sum(tau)`` of the
  tasks. New peers enter at the heap's minimum (tried, and measured, almost at once). Backward
  tasks are sized :data:`BACKWARD_TASK_MULTIPLIER` (2.5) times the forward. A peer is *banned*
  after a non-timeout error (removed from the queue until the DHT shows it re-announced, after the
  ban, with a later expiration); a timeout only re-routes (its heap increment already penalised
  the peer).

Pure and synchronous (no I/O, no event loop): the clock is a parameter, for tests and simulations.
"""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass
from typing import Callable, Iterable

from dht import get_dht_time

__all__ = ["PerformanceEMA", "StageBalancer", "NoServersError", "BACKWARD_TASK_MULTIPLIER",
           "INITIAL_SECONDS_PER_SAMPLE"]

BACKWARD_TASK_MULTIPLIER = 2.5
INITIAL_SECONDS_PER_SAMPLE = 1.0  # s0: the reference's "initial_throughput", used as seconds per sample


class NoServersError(RuntimeError):
    """No usable (known, unexpired, unbanned) server of the stage."""


class PerformanceEMA:
    """Throughput in samples/s from completed tasks (algorithms.md 1.2).

    For the k-th task of ``task_size`` samples taking ``interval`` s: ``e_k = alpha * interval /
    task_size + (1 - alpha) * e_{k-1}`` (``e_0 = 0``), and :attr:`samples_per_second` ``= 1 / max(e_k
    / (1 - (1 - alpha) ** k), eps)``; 0.0 before the first update. :meth:`update_span` takes the
    call's start and end instead and counts only the time since the previous update's end, so
    concurrent calls to one peer do not count the same wall time twice.
    """

    def __init__(self, alpha: float = 0.1, eps: float = 1e-20):
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must lie in (0, 1], got {alpha}")
        self.alpha, self.eps = alpha, eps
        self.ema_seconds_per_sample = 0.0
        self.num_updates = 0
        self.last_update: float | None = None  # end time of the latest update (update_span's clock)

    def update(self, task_size: float, interval: float) -> float:
        """Account one completed task; returns the new :attr:`samples_per_second`."""
        if not task_size > 0 or not interval >= 0:
            raise ValueError(f"need task_size > 0 and interval >= 0, got {task_size} and {interval}")
        self.ema_seconds_per_sample = (self.alpha * interval / task_size
                                       + (1 - self.alpha) * self.ema_seconds_per_sample)
        self.num_updates += 1
        return self.samples_per_second

    def update_span(self, task_size: float, start: float, end: float) -> float:
        """:meth:`update` with ``interval = end - max(start, end of the previous update)``."""
        begin = start if self.last_update is None else max(start, self.last_update)
        self.last_update = end if self.last_update is None else max(end, self.last_update)
        return self.update(task_size, max(end - begin, 0.0))

    @property
    def samples_per_second(self) -> float:
        if self.num_updates == 0:
            return 0.0
        corrected = self.ema_seconds_per_sample / (1 - (1 - self.alpha) ** self.num_updates)
        return 1.0 / max(corrected, self.eps)

    def reset(self) -> None:
        """Forget every measurement (a server that moved to another stage)."""
        self.ema_seconds_per_sample, self.num_updates, self.last_update = 0.0, 0, None


@dataclass
class _Peer:
    expiration: float  # DHT expiration of its latest known record
    version: int = 0  # of its live heap entry (older entries are stale)
    banned_at_expiration: float | None = None  # banned while its known expiration was this
    banned_at: float = 0.0  # when (this balancer's clock)


class StageBalancer:
    """The virtual-time queue over one stage's servers (see the module docstring).

    ``clock`` (default :func:`dht.get_dht_time`) dates expirations; ``initial_seconds_per_sample``:
    ``s0``; ``rng``: the tie-breakers' source (seed it for reproducible runs).
    """

    def __init__(self, *, clock: Callable[[], float] = get_dht_time,
                 initial_seconds_per_sample: float = INITIAL_SECONDS_PER_SAMPLE,
                 alpha: float = 0.1, rng: random.Random | None = None):
        self.clock, self.s0, self.alpha = clock, initial_seconds_per_sample, alpha
        self.rng = rng or random.Random()
        self._peers: dict[str, _Peer] = {}
        self.ema: dict[str, PerformanceEMA] = {}
        self._heap: list[tuple[float, float, str, int]] = []

    # ---- membership

    @property
    def peers(self) -> list[str]:
        """Known peers that are neither expired nor banned."""
        now = self.clock()
        return [p for p, info in self._peers.items() if info.banned_at_expiration is None and info.expiration > now]

    def _minimum(self) -> float:
        return self._heap[0][0] if self._heap else 0.0

    def _push(self, peer: str, t: float) -> None:
        info = self._peers[peer]
        info.version += 1
        heapq.heappush(self._heap, (t, self.rng.random(), peer, info.version))

    def add_peer(self, peer: str, expiration: float, announced_at: float | None = None) -> None:
        """A peer seen in the DHT with a record expiring at ``expiration`` and dated ``announced_at``
        (optional). A new one is queued at the heap's minimum; a banned one is unbanned (queued
        likewise) by a record with a later expiration than when it was banned and, if dated, dated
        after the ban (a re-announcement made before it failed, but read only after, does not count)."""
        info = self._peers.get(peer)
        if info is None:
            self._peers[peer] = _Peer(expiration)
            self.ema.setdefault(peer, PerformanceEMA(self.alpha))
            self._push(peer, self._minimum())
            return
        if info.banned_at_expiration is not None:
            if expiration > info.banned_at_expiration and (announced_at is None or announced_at > info.banned_at):
                info.banned_at_expiration = None
                info.expiration = expiration
                self._push(peer, self._minimum())
            return
        revived = info.expiration <= self.clock() < expiration
        info.expiration = max(info.expiration, expiration)
        if revived:  # it had expired (its entry was discarded): queue it again
            self._push(peer, self._minimum())

    def update_peers(self, peers: Iterable[tuple[str, float] | tuple[str, float, float]],
                     forget_after: float = 600.0) -> None:
        """:meth:`add_peer` for each ``(peer, expiration[, announced_at])`` (a refresh from the DHT);
        peers whose record expired over ``forget_after`` seconds ago are forgotten (bounded tables)."""
        for entry in peers:
            self.add_peer(*entry)
        horizon = self.clock() - forget_after
        for peer in [p for p, info in self._peers.items() if info.expiration < horizon]:
            del self._peers[peer]
            self.ema.pop(peer, None)
        if len(self._heap) > 4 * len(self._peers) + 64:  # drop the stale entries
            self._heap = [e for e in self._heap if e[2] in self._peers and e[3] == self._peers[e[2]].version]
            heapq.heapify(self._heap)

    def ban(self, peer: str) -> None:
        """Remove ``peer`` from the queue until it re-announces (see :meth:`add_peer`)."""
        info = self._peers.get(peer)
        if info is not None and info.banned_at_expiration is None:
            info.banned_at_expiration, info.banned_at = info.expiration, self.clock()
            info.version += 1  # its heap entry is stale now

    def is_banned(self, peer: str) -> bool:
        info = self._peers.get(peer)
        return info is not None and info.banned_at_expiration is not None

    # ---- scheduling

    def throughput(self, peer: str) -> float:
        """The peer's measured samples/s (0.0 before its first completed task)."""
        ema = self.ema.get(peer)
        return ema.samples_per_second if ema is not None else 0.0

    def choose(self, task_size: float = 1.0) -> str:
        """The peer for a task of ``task_size`` samples (Choose() of algorithms.md 1.2);
        NoServersError when no peer is usable."""
        now = self.clock()
        while self._heap:
            t, _, peer, version = heapq.heappop(self._heap)
            info = self._peers.get(peer)
            if info is None or version != info.version or info.banned_at_expiration is not None:
                continue  # stale or banned
            if info.expiration <= now:
                info.version += 1  # expired: dropped until a later record shows up
                continue
            ema = self.ema[peer]
            duration = task_size / ema.samples_per_second if ema.num_updates else self.s0 * task_size
            self._push(peer, t + duration)
            return peer
        raise NoServersError("no usable server of this stage")

    def on_success(self, peer: str, task_size: float, start: float, end: float) -> None:
        """A task of ``task_size`` samples on ``peer`` ran from ``start`` to ``end`` (seconds, any
        monotonic clock): update its throughput. Failed calls are not measured."""
        ema = self.ema.get(peer)
        if ema is not None:
            ema.update_span(task_size, start, end)
