"""Who may enter a routing table, and how much one caller may ask of us: IP prefixes, bounded
per-key token buckets, and the dial-back queue.

A caller that claims to be a DHT server is not put in our routing table on its word: we first dial
one of the addresses it announced itself, on a fresh connection, and the handshake there must prove
the same PeerID (:class:`DialBacks`; peers we dialled ourselves before need none). Dial-backs run
a few at a time, are deduplicated, rate-limited per source prefix, and a failure is remembered for
a while. Table slots are counted per network prefix (:func:`prefix_of`: /24 for IPv4, /48 for IPv6),
so one address with any number of identities gets only a few slots (see
:class:`dht.routing.RoutingTable`). Loopback and private addresses are exempt by default (test
swarms on 127.0.0.1, LANs); ``local_too=True`` applies the limits to them as well.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import logging
import time
from typing import Awaitable, Callable, Generic, Hashable, TypeVar, overload

from .identity import PeerID

__all__ = ["host_of", "prefix_of", "TokenBucket", "KeyedBuckets", "BoundedLRU", "DialBacks"]

logger = logging.getLogger(__name__)
K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


def host_of(endpoint: object) -> str | None:
    """The IP address in an endpoint string such as ``"1.2.3.4:5"`` or ``"[::1]:5"``; None for anything
    else (``"memory:n3"``, ``"unknown"``, a DNS name, a non-string). Never raises."""
    if not isinstance(endpoint, str) or not endpoint or len(endpoint) > 100 or endpoint[0] not in _IP_START:
        return None  # fast: "memory:n3", "unknown", most names
    text = endpoint
    if text.startswith("["):
        text = text[1:text.find("]")] if "]" in text else ""
    else:
        head, colon, port = text.rpartition(":")
        if colon and head and port.isdigit():
            try:
                return str(ipaddress.ip_address(head))
            except ValueError:  # not HOST:PORT after all (a bare IPv6 address): parsed whole below
                pass
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


_IP_START = frozenset("0123456789abcdefABCDEF:[")


def prefix_of(host: str | None, local_too: bool = False) -> str | None:
    """The network ``host`` is charged to: its /24 (IPv4; IPv4-mapped IPv6 counts as IPv4) or /48
    (IPv6), as text. None if ``host`` is not an IP address, or is loopback/private/link-local
    (not globally routable) unless ``local_too``. Never raises."""
    if not host:
        return None
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if not local_too and not ip.is_global:
        return None
    bits = 24 if ip.version == 4 else 48
    return str(ipaddress.ip_network(f"{ip}/{bits}", strict=False))


class TokenBucket:
    """``rate`` tokens per second up to ``burst``; starts full."""

    __slots__ = ("rate", "burst", "tokens", "updated")

    def __init__(self, rate: float, burst: float, now: float):
        self.rate, self.burst, self.tokens, self.updated = rate, burst, burst, now

    def _refill(self, now: float) -> None:
        self.tokens = min(self.burst, self.tokens + max(now - self.updated, 0.0) * self.rate)
        self.updated = now

    def take(self, n: float, now: float) -> bool:
        """Take ``n`` tokens if there are that many (all or nothing)."""
        self._refill(now)
        if self.tokens >= n:
            self.tokens -= n
            return True
        return False

    def take_up_to(self, n: int, now: float) -> int:
        """Take as many whole tokens as there are, at most ``n``; returns how many."""
        self._refill(now)
        granted = int(min(n, self.tokens))
        self.tokens -= granted
        return granted


class BoundedLRU(Generic[K, V]):
    """A dict of at most ``max_size`` items; the least recently used is dropped first."""

    def __init__(self, max_size: int):
        self.max_size = max_size
        self._items: collections.OrderedDict[K, V] = collections.OrderedDict()

    @overload
    def get(self, key: K) -> V | None: ...
    @overload
    def get(self, key: K, default: V) -> V: ...

    def get(self, key: K, default: V | None = None) -> V | None:
        value = self._items.get(key, default)
        if key in self._items:
            self._items.move_to_end(key)
        return value

    @overload
    def peek(self, key: K) -> V | None: ...
    @overload
    def peek(self, key: K, default: V) -> V: ...

    def peek(self, key: K, default: V | None = None) -> V | None:
        """Like :meth:`get`, without making ``key`` the most recently used."""
        return self._items.get(key, default)

    def __setitem__(self, key: K, value: V) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.max_size:
            self._items.popitem(last=False)

    def pop(self, key: K, default: V | None = None) -> V | None:
        return self._items.pop(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def keys(self) -> list[K]:
        return list(self._items)

    def items(self) -> list[tuple[K, V]]:
        """A snapshot of the items, least recently used first (none made more recent)."""
        return list(self._items.items())


class KeyedBuckets:
    """A token bucket per key (a peer, an IP prefix), for at most ``max_keys`` keys (LRU)."""

    def __init__(self, rate: float, burst: float, max_keys: int = 4096):
        self.rate, self.burst = rate, burst
        self._buckets: BoundedLRU[Hashable, TokenBucket] = BoundedLRU(max_keys)

    def take(self, key: Hashable, n: float = 1.0, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now  # or the event loop's time (virtual clocks)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = TokenBucket(self.rate, self.burst, now)
            self._buckets[key] = bucket
        return bucket.take(n, now)

    def forget(self, key: Hashable) -> None:
        self._buckets.pop(key)

    def forget_refilled(self, now: float) -> int:
        """Drop the buckets that are full again (they carry no information); returns how many."""
        full = [key for key, b in self._buckets.items() if b.tokens + max(now - b.updated, 0.0) * b.rate >= b.burst]
        for key in full:
            self._buckets.pop(key)
        return len(full)

    def __len__(self) -> int:
        return len(self._buckets)

    def keys(self) -> list[Hashable]:
        return self._buckets.keys()


class DialBacks:
    """Verifies callers before they may enter the routing table, a few at a time.

    ``request(peer, source_prefix)`` queues ``peer`` (deduplicated; at most ``max_pending`` waiting;
    at most ``rate`` per second and ``burst`` at once per source prefix, None = not limited per
    prefix; at most ``rate_total`` per second, 4x that at once, from all sources). Up to
    ``concurrency`` workers run ``await verify(peer)``; on True, ``admit(peer)`` is called. A peer
    whose verification failed is not retried for ``retry_after`` seconds (at most ``max_remembered``
    such peers are remembered)."""

    def __init__(self, verify: Callable[[PeerID], Awaitable[bool]], admit: Callable[[PeerID], None], *,
                 concurrency: int = 8, max_pending: int = 256, rate: float = 2.0, burst: float = 20.0,
                 rate_total: float = 50.0, retry_after: float = 60.0, max_remembered: int = 4096):
        self._verify, self._admit = verify, admit
        self.concurrency, self.max_pending, self.retry_after = concurrency, max_pending, retry_after
        self._rates = KeyedBuckets(rate, burst, max_remembered)
        self._rate_total = rate_total
        self._total: TokenBucket | None = None  # made on first use (it needs the running loop's time)
        self._pending: collections.OrderedDict[PeerID, None] = collections.OrderedDict()
        self._running: set[PeerID] = set()
        self._failed: BoundedLRU[PeerID, float] = BoundedLRU(max_remembered)
        self._workers: set[asyncio.Task] = set()
        self._closed = False
        self.verified = self.refused = 0  # counters (diagnostics and tests)

    def __len__(self) -> int:
        """Peers waiting or being verified."""
        return len(self._pending) + len(self._running)

    def request(self, peer_id: PeerID, source_prefix: str | None) -> bool:
        """Queue ``peer_id`` for verification; False if it was not queued (duplicate, full, rate limit,
        failed recently)."""
        if self._closed or peer_id in self._pending or peer_id in self._running:
            return False
        failed_until = self._failed.get(peer_id)
        now = asyncio.get_running_loop().time()
        if failed_until is not None:
            if failed_until > now:
                return False
            self._failed.pop(peer_id)
        if len(self._pending) >= self.max_pending:
            return False
        if self._total is None:
            self._total = TokenBucket(self._rate_total, 4 * self._rate_total, now)
        if source_prefix is not None and not self._rates.take(source_prefix, 1.0, now):
            return False
        if not self._total.take(1.0, now):
            return False
        self._pending[peer_id] = None
        if len(self._workers) < self.concurrency:
            task = asyncio.ensure_future(self._work())
            self._workers.add(task)
            task.add_done_callback(self._workers.discard)
        return True

    async def _work(self) -> None:
        while self._pending and not self._closed:
            peer_id, _ = self._pending.popitem(last=False)
            self._running.add(peer_id)
            try:
                ok = await self._verify(peer_id)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a bug in verify must not kill the worker silently
                logger.warning("dial-back of %s failed unexpectedly: %s", peer_id.short(), type(e).__name__,
                               exc_info=True)
                ok = False
            finally:
                self._running.discard(peer_id)
            if ok:
                self.verified += 1
                self._admit(peer_id)
            else:
                self.refused += 1
                self._failed[peer_id] = asyncio.get_running_loop().time() + self.retry_after

    def forget(self, peer_id: PeerID) -> None:
        self._failed.pop(peer_id)

    def forget_expired(self) -> int:
        """Drop the failures whose retry time has come; returns how many."""
        now = asyncio.get_running_loop().time()
        expired = [p for p, until in self._failed.items() if until <= now]
        for peer_id in expired:
            self._failed.pop(peer_id)
        return len(expired)

    def remembered(self) -> int:
        """Peers whose failed verification is remembered."""
        return len(self._failed)

    async def close(self) -> None:
        self._closed = True
        self._pending.clear()
        for task in list(self._workers):
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
