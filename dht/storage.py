"""Local record storage of a DHT node: values with expiration times, dictionaries of subkeys, budgets.

Rules: every value has an absolute expiration time (DHT time, seconds); expired values are never
returned. A store wins only with a later expiration than what it replaces (re-storing the identical
value and expiration is an idempotent success). A key holds either a regular value or a dictionary
of subkeys, each with its own expiration; a regular value with a later expiration than every subkey
replaces the dictionary, and a subkey newer than the regular value replaces it with a dictionary.

Signed subkeys are protected (a subkey carrying an ``[owner:...]`` marker, see
:mod:`dht.validation`; the node validates every record before it gets here): a key holding a live
signed subkey accepts only subkeys, so no regular value replaces the dictionary whatever its
expiration, and a signed subkey replaces a regular value whatever the expirations. So nobody but
the owner can delete, hide or block the refresh of a signed subkey before it expires.

Budgets (all constructor arguments): each record costs ``len(key) + len(subkey) + len(value) +
RECORD_OVERHEAD`` bytes, charged to the peer that stored it and to the address range it came from
(``source``, e.g. its /24: see :func:`dht.peer.admission.prefix_of`). Over the peer's budget (bytes
or entries), a store is refused.
Over the address range's budget, the peer of that range holding the most bytes loses its oldest
records, unless that peer is the storer itself (then refused). Over the total budget (bytes or
entries): first whole keys of the foreign region go, farthest from ``own_id`` first, while
``is_foreign(key_id)`` says this node is not among the closest to them (others hold them); then the
oldest records of the heaviest peer of the heaviest address range; refused if that peer is the storer
itself. A key holds at most ``max_subkeys_per_key`` subkeys: over it, the source (address range,
then peer) with the most subkeys under that key loses its oldest ones (refused if that is the
storer). Eviction never takes more than it must, except a few subkeys at once from a source holding
many under a full key (it spares repeated scans of the key).

A cache (``cache=True``: a node's cache of looked-up values) evicts instead of refusing: over a
peer's budget that peer's least recently used records go; over an address range's budget, those of
the range's heaviest peer; over the total budget, those of the heaviest peer of the heaviest range
(whoever it is, the storer included). "Used" is stored or read (:meth:`Storage.touch`). Records
with ``origin=None`` (the node's own lookups) are held to no per-peer budget. Only a record larger
than a whole budget, or a rule (signed subkeys), is refused.
"""

from __future__ import annotations

import collections
import heapq
import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Hashable, Iterator, TypeVar

from .validation import has_owner_marker

__all__ = ["ValueWithExpiration", "Entry", "Storage", "StoreRefused", "RECORD_OVERHEAD"]

T = TypeVar("T")

RECORD_OVERHEAD = 512  # bytes charged per record for its bookkeeping (measured: ~400-850 bytes in CPython)


@dataclass(frozen=True)
class ValueWithExpiration(Generic[T]):
    """A value and its expiration time (DHT time); unpacks as ``value, expiration_time = result``."""

    value: T
    expiration_time: float

    def __iter__(self) -> Iterator[Any]:
        return iter((self.value, self.expiration_time))


class StoreRefused(Exception):
    """A record was not stored; the message says why (e.g. a quota)."""


@dataclass
class Entry:
    """What a node holds for one key: ``regular`` (value, expiration) or ``subkeys`` {subkey: (value, expiration)}
    (in the order they were last stored)."""

    key_bytes: bytes
    regular: tuple[bytes, float] | None = None
    subkeys: dict[bytes, tuple[bytes, float]] = field(default_factory=dict)

    @property
    def expiration_time(self) -> float:
        if self.regular is not None:
            return self.regular[1]
        return max((exp for _, exp in self.subkeys.values()), default=float("-inf"))

    def drop_expired(self, now: float) -> None:
        if self.regular is not None and self.regular[1] <= now:
            self.regular = None
        for subkey in [s for s, (_, exp) in self.subkeys.items() if exp <= now]:
            del self.subkeys[subkey]

    @property
    def empty(self) -> bool:
        return self.regular is None and not self.subkeys

    @property
    def has_signed_subkeys(self) -> bool:
        """Whether a subkey carries an owner marker (such a key accepts only subkeys)."""
        return any(has_owner_marker(subkey) for subkey in self.subkeys)


class _Heaviest:
    """Amounts by key with the largest one at hand: a max-heap whose items are upper bounds of the
    amounts (pushed when an amount grows; a stale item is replaced by the current amount when it
    reaches the top), rebuilt when stale items outnumber live ones: amortized O(log n) per change."""

    __slots__ = ("amount", "_heap", "_seq")

    def __init__(self) -> None:
        self.amount: dict[Any, int] = {}
        self._heap: list[tuple[int, int, Any]] = []
        self._seq = itertools.count()

    def add(self, key: Any, delta: int) -> None:
        amount = self.amount
        value = amount.get(key, 0) + delta
        if value <= 0:
            amount.pop(key, None)
            return
        amount[key] = value
        if delta > 0:
            heapq.heappush(self._heap, (-value, next(self._seq), key))
            if len(self._heap) > 2 * len(amount) + 64:
                self._heap = [(-v, next(self._seq), k) for k, v in amount.items()]
                heapq.heapify(self._heap)

    def _clean(self) -> None:
        heap, amount = self._heap, self.amount
        while heap:
            bound, _, key = heap[0]
            current = amount.get(key)
            if current == -bound:
                return
            if current is None:
                heapq.heappop(heap)
            else:
                heapq.heapreplace(heap, (-current, next(self._seq), key))

    def top(self, avoid: Any = None) -> Any:
        """The key with the largest amount (among equals, one other than ``avoid`` if any); None if empty."""
        self._clean()
        heap = self._heap
        if not heap:
            return None
        best = heap[0]
        if best[2] == avoid and len(self.amount) > 1:  # another key with as much?
            heapq.heappop(heap)
            self._clean()
            while heap and heap[0][2] == avoid:  # more items of ``avoid`` (bounds of its amount): ``best`` stays
                heapq.heappop(heap)
                self._clean()
            runner_up = heap[0] if heap else None
            heapq.heappush(heap, best)
            if runner_up is not None and runner_up[0] == best[0]:
                return runner_up[2]
        return best[2]


_Charge = tuple[Any, Any, int]  # (peer, source, cost): who stored a record, from which address range, and its bytes
_ANY = object()  # any address range


class Storage:
    """Records by key id, with lazy expiry, budgets and eviction (see the module docstring).

    ``max_entries`` (200,000) and ``max_bytes`` (256 MiB) in total; ``max_entries_per_peer``
    (20,000) and ``max_bytes_per_peer`` (16 MiB) per storing peer; ``max_bytes_per_ip`` (32 MiB)
    per address range (``source`` of a store; None: not counted); ``max_subkeys_per_key`` (1,000).
    ``own_id`` and ``is_foreign`` (both optional) enable evicting the foreign region first.
    ``cache`` (False): evict the least recently used instead of refusing (see the module docstring)."""

    def __init__(self, max_entries: int = 200_000, max_entries_per_peer: int = 20_000, *,
                 max_bytes: int = 256 << 20, max_bytes_per_peer: int = 16 << 20, max_bytes_per_ip: int = 32 << 20,
                 max_subkeys_per_key: int = 1000, own_id: int | None = None,
                 is_foreign: Callable[[int], bool] | None = None, cache: bool = False):
        self.cache = cache
        self.max_entries, self.max_entries_per_peer = max(1, max_entries), max(1, max_entries_per_peer)
        self.max_bytes, self.max_bytes_per_peer, self.max_bytes_per_ip = max_bytes, max_bytes_per_peer, max_bytes_per_ip
        self.max_subkeys_per_key = max(1, max_subkeys_per_key)
        self.own_id, self.is_foreign = own_id, is_foreign
        self._entries: dict[int, Entry] = {}
        self._origin: dict[tuple[int, bytes | None], _Charge] = {}  # (key id, subkey) -> (peer, source, cost)
        self._per_peer: dict[Any, int] = {}  # entries per storing peer
        self._peer_bytes: dict[Any, int] = {}
        self._peer_records: dict[Any, collections.OrderedDict] = {}  # peer -> its (key id, subkey), oldest first
        self._sources = _Heaviest()  # bytes per address range
        self._source_peers: dict[Any, _Heaviest] = {}  # address range -> bytes per peer
        self.total_bytes = 0
        self.evicted = 0  # records evicted to make room (diagnostics)
        self._expiry: list[tuple[float, int, int, bytes | None]] = []  # (expiration, key id, seq, subkey)
        self._seq = itertools.count()  # (a regular value and a subkey of one key may expire together)
        self._far: list[tuple[int, int]] = []  # (-(key id ^ own id), key id): farthest key first
        self.stored_at: dict[int, float] = {}  # key id -> when it was last stored (for republishing)

    def __len__(self) -> int:
        return len(self._origin)

    def bytes_of(self, peer: Any) -> int:
        """Bytes charged to ``peer``."""
        return self._peer_bytes.get(peer, 0)

    def bytes_of_source(self, source: Hashable) -> int:
        """Bytes charged to the address range ``source``."""
        return self._sources.amount.get(source, 0)

    # ---- accounting ------------------------------------------------------------------------
    def _charge(self, key_id: int, subkey: bytes | None, peer: Any, source: Any, cost: int, now: float) -> None:
        self._origin[(key_id, subkey)] = (peer, source, cost)
        self._per_peer[peer] = self._per_peer.get(peer, 0) + 1
        self._peer_bytes[peer] = self._peer_bytes.get(peer, 0) + cost
        self._peer_records.setdefault(peer, collections.OrderedDict())[(key_id, subkey)] = None
        self._sources.add(source, cost)
        tracker = self._source_peers.get(source)
        if tracker is None:
            tracker = self._source_peers[source] = _Heaviest()
        tracker.add(peer, cost)
        self.total_bytes += cost
        self.stored_at[key_id] = now

    def _uncharge(self, key_id: int, subkey: bytes | None) -> _Charge | None:
        charge = self._origin.pop((key_id, subkey), None)
        if charge is None:
            return None
        peer, source, cost = charge
        self._per_peer[peer] -= 1
        if not self._per_peer[peer]:
            del self._per_peer[peer]
        self._peer_bytes[peer] -= cost
        if not self._peer_bytes[peer]:
            del self._peer_bytes[peer]
        records = self._peer_records[peer]
        del records[(key_id, subkey)]
        if not records:
            del self._peer_records[peer]
        self._sources.add(source, -cost)
        tracker = self._source_peers[source]
        tracker.add(peer, -cost)
        if not tracker.amount:
            del self._source_peers[source]
        self.total_bytes -= cost
        return charge

    def _put(self, key_id: int, key_bytes: bytes, subkey: bytes | None, value: bytes, exp: float,
             charge: _Charge | None, now: float) -> None:
        assert charge is not None  # (every stored part is charged: what _take returns for it is not None)
        entry = self._entries.get(key_id)
        if entry is None:
            entry = self._entries[key_id] = Entry(key_bytes)
            if self.own_id is not None:
                heapq.heappush(self._far, (-(key_id ^ self.own_id), key_id))
                if len(self._far) > 2 * len(self._entries) + 64:
                    self._far = [(-(k ^ self.own_id), k) for k in self._entries]
                    heapq.heapify(self._far)
        if subkey is None:
            entry.regular = (value, exp)
        else:
            entry.subkeys[subkey] = (value, exp)
        self._charge(key_id, subkey, *charge, now)

    def _take(self, key_id: int, subkey: bytes | None) -> tuple[bytes, float, _Charge | None]:
        """Remove one part of an entry (and its charge); the entry goes when it is empty."""
        entry = self._entries[key_id]
        if subkey is None:
            assert entry.regular is not None  # (callers take parts that exist)
            (value, exp), entry.regular = entry.regular, None
        else:
            value, exp = entry.subkeys.pop(subkey)
        charge = self._uncharge(key_id, subkey)
        if entry.empty:
            del self._entries[key_id]
            self.stored_at.pop(key_id, None)
        return value, exp, charge

    def _evict(self, key_id: int, subkey: bytes | None) -> None:
        self._take(key_id, subkey)
        self.evicted += 1

    # ---- eviction --------------------------------------------------------------------------
    def _evict_oldest_of(self, peer: Any, source: Any) -> bool:
        """Evict the oldest record ``peer`` stored from ``source``; False if it has none."""
        for key_id, subkey in self._peer_records.get(peer, ()):
            if self._origin[(key_id, subkey)][1] == source:
                self._evict(key_id, subkey)
                return True
        return False

    def _evict_foreign(self, keep: int) -> bool:
        """Evict the farthest key if this node is not among the closest to it (never ``keep``)."""
        if self.is_foreign is None or self.own_id is None:
            return False
        while self._far:
            key_id = self._far[0][1]
            entry = self._entries.get(key_id)
            if entry is None:
                heapq.heappop(self._far)
                continue
            if key_id == keep or not self.is_foreign(key_id):
                return False
            heapq.heappop(self._far)
            for subkey in ([None] if entry.regular is not None else []) + list(entry.subkeys):
                self._evict(key_id, subkey)
            return True
        return False

    def _make_room_in_key(self, key_id: int, peer: Any, source: Any) -> None:
        entry = self._entries.get(key_id)
        if entry is None or len(entry.subkeys) < self.max_subkeys_per_key:
            return
        per_source: collections.Counter = collections.Counter()
        per_peer: collections.Counter = collections.Counter()
        for subkey in entry.subkeys:
            who, where, _ = self._origin[(key_id, subkey)]
            per_source[where] += 1
            per_peer[where, who] += 1
        heavy_source = max(per_source, key=lambda s: (per_source[s], s != source))
        heavy_peer = max((p for s, p in per_peer if s == heavy_source),
                         key=lambda p: (per_peer[heavy_source, p], p != peer))
        if heavy_peer == peer and heavy_source == source and not self.cache:
            raise StoreRefused(f"this key holds {len(entry.subkeys)} subkeys (the limit), the most of them "
                               f"stored by this peer")
        excess = len(entry.subkeys) - self.max_subkeys_per_key + 1
        batch = max(excess, min(64, per_peer[heavy_source, heavy_peer] // 4))
        victims = [s for s in entry.subkeys if self._origin[(key_id, s)][:2] == (heavy_peer, heavy_source)][:batch]
        for subkey in victims:
            self._evict(key_id, subkey)

    def _evict_lru_of(self, peer: Any, source: Any = _ANY) -> None:
        """Evict the least recently used record of ``peer`` (from ``source``, or from any)."""
        if source is _ANY:
            self._evict(*next(iter(self._peer_records[peer])))
        elif not self._evict_oldest_of(peer, source):
            raise AssertionError("cache accounting: the peer has no record from that range")

    def _make_room_in_cache(self, cost: int, peer: Any, source: Any) -> None:
        """Cache mode: evict until a record of ``cost`` bytes from ``peer`` and ``source`` fits."""
        if cost > self.max_bytes or (source is not None and cost > self.max_bytes_per_ip) or \
                (peer is not None and cost > self.max_bytes_per_peer):
            raise StoreRefused(f"a record of {cost} bytes is larger than the cache's budgets")
        if peer is not None:
            while self._per_peer.get(peer, 0) >= self.max_entries_per_peer or \
                    self._peer_bytes.get(peer, 0) + cost > self.max_bytes_per_peer:
                self._evict_lru_of(peer)
        if source is not None:
            while self._sources.amount.get(source, 0) + cost > self.max_bytes_per_ip:
                self._evict_lru_of(self._source_peers[source].top(avoid=peer), source)
        while self.total_bytes + cost > self.max_bytes or len(self._origin) >= self.max_entries:
            heavy_source = self._sources.top()
            self._evict_lru_of(self._source_peers[heavy_source].top(), heavy_source)

    def _check_budgets(self, key_id: int, cost: int, peer: Any, source: Any) -> None:
        if self.cache:
            self._make_room_in_cache(cost, peer, source)
            return
        if self._per_peer.get(peer, 0) >= self.max_entries_per_peer:
            raise StoreRefused(f"quota of {self.max_entries_per_peer} entries for this peer reached")
        if self._peer_bytes.get(peer, 0) + cost > self.max_bytes_per_peer:
            raise StoreRefused(f"quota of {self.max_bytes_per_peer} bytes for this peer reached")
        if source is not None:
            while self._sources.amount.get(source, 0) + cost > self.max_bytes_per_ip:
                victim = self._source_peers[source].top(avoid=peer)
                if victim == peer or not self._evict_oldest_of(victim, source):
                    raise StoreRefused(f"quota of {self.max_bytes_per_ip} bytes for peers of this address "
                                       f"range ({source}) reached")
        foreign_left = self.is_foreign is not None and self.own_id is not None
        while self.total_bytes + cost > self.max_bytes or len(self._origin) >= self.max_entries:
            if foreign_left:
                if self._evict_foreign(keep=key_id):
                    continue
                foreign_left = False  # nothing foreign left to evict for this store
                if self.is_foreign is not None and self.is_foreign(key_id):
                    raise StoreRefused("storage is full and this node is not among the closest to the key")
            heavy_source = self._sources.top(avoid=source)
            victim = self._source_peers[heavy_source].top(avoid=peer) if heavy_source in self._source_peers else None
            if victim is None or (victim == peer and heavy_source == source) or \
                    not self._evict_oldest_of(victim, heavy_source):
                raise StoreRefused(f"storage is full ({len(self._origin)} entries, {self.total_bytes} bytes), "
                                   f"and this peer holds the most of it")

    # ---- public API ------------------------------------------------------------------------
    def store(self, key_id: int, key_bytes: bytes, subkey: bytes | None, value: bytes, expiration_time: float,
              now: float, origin: Any = None, source: Hashable = None) -> bool:
        """Store if newer than what is there; False if older; StoreRefused if a rule or budget forbids it.
        ``origin``: the storing peer; ``source``: its address range (None: not counted per range)."""
        self.purge(now)
        if expiration_time <= now:
            return False
        entry = self._entries.get(key_id)
        if entry is not None and entry.key_bytes != key_bytes:
            return False  # a different key with the same 160-bit id: keep the first
        replaced: list[bytes | None] = []
        if subkey is None:
            if entry is not None and entry.regular is not None:
                old_value, old_exp = entry.regular
                if expiration_time < old_exp or (expiration_time == old_exp and value != old_value):
                    return False
                if expiration_time == old_exp:
                    return True
                replaced = [None]
            elif entry is not None and entry.subkeys:
                if entry.has_signed_subkeys:
                    raise StoreRefused("this key holds signed subkeys: only subkeys can be stored under it")
                if expiration_time <= entry.expiration_time:
                    return False
                replaced = list(entry.subkeys)
        else:
            if entry is not None and entry.regular is not None:
                if expiration_time <= entry.regular[1] and not has_owner_marker(subkey):
                    return False
                replaced = [None]
            elif entry is not None and subkey in entry.subkeys:
                old_value, old_exp = entry.subkeys[subkey]
                if expiration_time < old_exp or (expiration_time == old_exp and value != old_value):
                    return False
                if expiration_time == old_exp:
                    return True
                replaced = [subkey]
        cost = len(key_bytes) + (0 if subkey is None else len(subkey)) + len(value) + RECORD_OVERHEAD
        stored_at = self.stored_at.get(key_id)
        saved = [(part, self._take(key_id, part)) for part in replaced]  # put back if the store is refused
        try:
            if subkey is not None:
                self._make_room_in_key(key_id, origin, source)
            self._check_budgets(key_id, cost, origin, source)
        except StoreRefused:
            for part, (old_value, old_exp, charge) in saved:
                self._put(key_id, key_bytes, part, old_value, old_exp, charge, now)
            if saved and stored_at is not None:
                self.stored_at[key_id] = stored_at
            raise
        self._put(key_id, key_bytes, subkey, value, expiration_time, (origin, source, cost), now)
        heapq.heappush(self._expiry, (expiration_time, key_id, next(self._seq), subkey))
        return True

    def touch(self, key_id: int) -> None:
        """Mark the records of ``key_id`` as just used (a cache evicts the least recently used first)."""
        entry = self._entries.get(key_id)
        if entry is None:
            return
        for subkey in ([None] if entry.regular is not None else []) + list(entry.subkeys):
            charge = self._origin.get((key_id, subkey))
            if charge is not None:
                self._peer_records[charge[0]].move_to_end((key_id, subkey))

    def get(self, key_id: int, now: float) -> Entry | None:
        """The live entry for ``key_id`` (expired parts removed), or None."""
        # purge (not Entry.drop_expired) so expired parts are also uncounted from the quotas;
        # every stored part has an expiry-heap item, so nothing expired survives it
        self.purge(now)
        return self._entries.get(key_id)

    def purge(self, now: float) -> None:
        """Forget everything that expired by ``now``."""
        while self._expiry and self._expiry[0][0] <= now:
            _, key_id, _, subkey = heapq.heappop(self._expiry)
            entry = self._entries.get(key_id)
            if entry is None:
                continue
            current = entry.regular if subkey is None else entry.subkeys.get(subkey)
            if current is not None and current[1] <= now:
                self._take(key_id, subkey)

    def items(self, now: float) -> Iterator[tuple[int, Entry]]:
        """All live entries (a snapshot of the keys; safe to store while iterating)."""
        self.purge(now)
        for key_id in list(self._entries):
            entry = self.get(key_id, now)
            if entry is not None:
                yield key_id, entry
