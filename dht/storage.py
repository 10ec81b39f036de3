"""Local record storage of a DHT node: values with expiration times, dictionaries of subkeys.

Rules (hivemind's semantics): every value has an absolute expiration time (DHT time, seconds);
expired values are never returned. A store wins only with a later expiration than what it replaces
(re-storing the identical value and expiration is an idempotent success). A key holds either a
regular value or a dictionary of subkeys, each with its own expiration; a regular value with a later
expiration than every subkey replaces the dictionary, and a subkey newer than the regular value
replaces it with a dictionary. Capacity is bounded in entries overall and per storing peer.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Any, Generic, Iterator, TypeVar

__all__ = ["ValueWithExpiration", "Entry", "Storage", "StoreRefused"]

T = TypeVar("T")


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
    """What a node holds for one key: ``regular`` (value, expiration) or ``subkeys`` {subkey: (value, expiration)}."""

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


class Storage:
    """Records by key id, with lazy expiry and quotas (``max_entries`` total, ``max_entries_per_peer``)."""

    def __init__(self, max_entries: int = 200_000, max_entries_per_peer: int = 20_000):
        self.max_entries, self.max_entries_per_peer = max_entries, max_entries_per_peer
        self._entries: dict[int, Entry] = {}
        self._origin: dict[tuple[int, bytes | None], Any] = {}  # (key id, subkey) -> storing peer
        self._per_peer: dict[Any, int] = {}
        self._expiry: list[tuple[float, int, bytes | None]] = []
        self.stored_at: dict[int, float] = {}  # key id -> when it was last stored (for republishing)

    def __len__(self) -> int:
        return len(self._origin)

    def _count(self, key_id: int, subkey: bytes | None, origin: Any, now: float) -> None:
        self._uncount(key_id, subkey)
        self._origin[(key_id, subkey)] = origin
        self._per_peer[origin] = self._per_peer.get(origin, 0) + 1
        self.stored_at[key_id] = now

    def _uncount(self, key_id: int, subkey: bytes | None) -> None:
        if (key_id, subkey) in self._origin:
            origin = self._origin.pop((key_id, subkey))
            self._per_peer[origin] -= 1
            if not self._per_peer[origin]:
                del self._per_peer[origin]

    def _check_quota(self, key_id: int, subkey: bytes | None, origin: Any) -> None:
        if (key_id, subkey) in self._origin:
            return
        if len(self._origin) >= self.max_entries:
            raise StoreRefused(f"storage is full ({self.max_entries} entries)")
        if self._per_peer.get(origin, 0) >= self.max_entries_per_peer:
            raise StoreRefused(f"quota of {self.max_entries_per_peer} entries for this peer reached")

    def store(self, key_id: int, key_bytes: bytes, subkey: bytes | None, value: bytes, expiration_time: float,
              now: float, origin: Any = None) -> bool:
        """Store if newer than what is there; False if older; StoreRefused if over a quota."""
        self.purge(now)
        if expiration_time <= now:
            return False
        entry = self._entries.get(key_id)
        if entry is not None:
            entry.drop_expired(now)
            if entry.key_bytes != key_bytes:
                return False  # a different key with the same 160-bit id: keep the first
        if subkey is None:
            if entry is not None and entry.regular is not None:
                old_value, old_exp = entry.regular
                if expiration_time < old_exp or (expiration_time == old_exp and value != old_value):
                    return False
                if expiration_time == old_exp:
                    return True
            elif entry is not None and entry.subkeys and expiration_time <= entry.expiration_time:
                return False
            self._check_quota(key_id, None, origin)
            if entry is not None:
                for old_subkey in list(entry.subkeys):
                    self._uncount(key_id, old_subkey)
            self._entries[key_id] = Entry(key_bytes, regular=(value, expiration_time))
        else:
            if entry is not None and entry.regular is not None:
                if expiration_time <= entry.regular[1]:
                    return False
                self._uncount(key_id, None)
                entry = None
            if entry is not None and subkey in entry.subkeys:
                old_value, old_exp = entry.subkeys[subkey]
                if expiration_time < old_exp or (expiration_time == old_exp and value != old_value):
                    return False
                if expiration_time == old_exp:
                    return True
            self._check_quota(key_id, subkey, origin)
            if entry is None:
                entry = self._entries[key_id] = Entry(key_bytes)
            entry.subkeys[subkey] = (value, expiration_time)
        self._count(key_id, subkey, origin, now)
        heapq.heappush(self._expiry, (expiration_time, key_id, subkey))
        return True

    def get(self, key_id: int, now: float) -> Entry | None:
        """The live entry for ``key_id`` (expired parts removed), or None."""
        # purge (not Entry.drop_expired) so expired parts are also uncounted from the quotas;
        # every stored part has an expiry-heap item, so nothing expired survives it
        self.purge(now)
        return self._entries.get(key_id)

    def purge(self, now: float) -> None:
        """Forget everything that expired by ``now``."""
        while self._expiry and self._expiry[0][0] <= now:
            _, key_id, subkey = heapq.heappop(self._expiry)
            entry = self._entries.get(key_id)
            if entry is None:
                continue
            current = entry.regular if subkey is None else entry.subkeys.get(subkey)
            if current is not None and current[1] <= now:
                if subkey is None:
                    entry.regular = None
                else:
                    del entry.subkeys[subkey]
                self._uncount(key_id, subkey)
            if entry.empty:
                del self._entries[key_id]
                self.stored_at.pop(key_id, None)

    def items(self, now: float) -> Iterator[tuple[int, Entry]]:
        """All live entries (a snapshot of the keys; safe to store while iterating)."""
        self.purge(now)
        for key_id in list(self._entries):
            entry = self.get(key_id, now)
            if entry is not None:
                yield key_id, entry
