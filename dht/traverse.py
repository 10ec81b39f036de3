"""Kademlia's iterative lookup: query the closest known nodes, ``alpha`` at a time, until the
``k`` closest nodes seen so far have all answered (or failed), or the caller has what it needs.

Diversity: with ``group_of`` (a contact's IP prefix, or None) at most ``max_per_group`` contacts of
one group are considered in one lookup, so Sybils of one address that answer every query with each
other cannot crowd the honest nodes out of the ``k`` closest; ``max_queries`` bounds the RPCs.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from .peer.identity import PeerID

__all__ = ["LookupResult", "iterative_lookup"]

# query(peer) -> the contacts it returned as (peer, node id), or None if it failed
Query = Callable[[PeerID], Awaitable["list[tuple[PeerID, int]] | None"]]


@dataclass
class LookupResult:
    nearest: list[tuple[PeerID, int]] = field(default_factory=list)  # k closest that answered, closest first
    queried: int = 0  # RPCs sent
    rounds: int = 0  # longest chain of dependent queries (the lookup's hop count)


async def iterative_lookup(target: int, initial: list[tuple[PeerID, int]], query: Query, *, k: int = 20,
                           alpha: int = 3, done: Callable[[], bool] = lambda: False,
                           exclude: PeerID | None = None, group_of: Callable[[PeerID], str | None] | None = None,
                           max_per_group: int | None = None, max_queries: int | None = None) -> LookupResult:
    """Find the ``k`` nodes closest to ``target``. ``done()`` is checked after every answer and stops
    the lookup early (e.g. a value was found). Queries run with ``alpha`` in flight at once, at most
    ``max_queries`` in all (None: unbounded); ``group_of``/``max_per_group``: see the module docstring."""
    result = LookupResult()
    heap: list[tuple[int, PeerID, int, int]] = []  # (distance, peer, node id, hop at which it was learned)
    seen: set[PeerID] = set()
    answered: list[tuple[int, PeerID, int]] = []
    failed: set[PeerID] = set()
    per_group: collections.Counter[str] = collections.Counter()

    def learn(contacts: list[tuple[PeerID, int]], hop: int) -> None:
        for peer_id, node_id in contacts:
            if peer_id not in seen and peer_id != exclude:
                if group_of is not None and max_per_group is not None:
                    group = group_of(peer_id)
                    if group is not None:
                        if per_group[group] >= max_per_group:
                            continue
                        per_group[group] += 1
                seen.add(peer_id)
                heapq.heappush(heap, (node_id ^ target, peer_id, node_id, hop))

    learn(initial, 0)
    in_flight: dict[asyncio.Task, tuple[int, PeerID, int, int]] = {}

    def kth_answered_distance() -> int | None:
        if len(answered) < k:
            return None
        return heapq.nsmallest(k, answered)[-1][0]

    try:
        while True:
            while heap and len(in_flight) < alpha and not done() and \
                    (max_queries is None or result.queried < max_queries):
                bound = kth_answered_distance()
                if bound is not None and heap[0][0] >= bound:
                    break  # every unqueried node is farther than the k closest that answered
                candidate = heapq.heappop(heap)
                task = asyncio.ensure_future(query(candidate[1]))
                in_flight[task] = candidate
                result.queried += 1
            if not in_flight or done():
                break
            finished, _ = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
            for task in finished:
                distance, peer_id, node_id, hop = in_flight.pop(task)
                contacts = None if task.cancelled() or task.exception() else task.result()
                if contacts is None:
                    failed.add(peer_id)
                    continue
                answered.append((distance, peer_id, node_id))
                result.rounds = max(result.rounds, hop + 1)
                learn(contacts, hop + 1)
    finally:
        for task in in_flight:
            task.cancel()
    result.nearest = [(peer_id, node_id) for _, peer_id, node_id in sorted(answered, key=lambda x: x[0])[:k]]
    return result
