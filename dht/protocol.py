"""DHT wire messages (version 1): msgpack maps, validated on receipt, bounded in size and count.

=============  ======================================================================================
method         request -> response
=============  ======================================================================================
``dht.ping``   ``{"v": 1, "server": bool, "t": DHT time}`` -> ``{"v": 1, "server": bool, "t": DHT time}``
``dht.store``  ``{"v": 1, "server": bool, "items": [[key, subkey|None, value, expiration, in_cache], ...]}``
               -> ``{"v": 1, "ok": [true | "reason it was refused", ...]}`` (one per item)
``dht.find``   ``{"v": 1, "server": bool, "keys": [20-byte key id, ...], "k": int}``
               -> ``{"v": 1, "results": [[entry | None, [[peer id, [address, ...]], ...]], ...]}``
=============  ======================================================================================

``key``, ``subkey`` and ``value`` are msgpack bytes; an ``entry`` is ``[key, value, expiration]``
for a regular value or ``[key, [[subkey, value, expiration], ...]]`` for a dictionary, or
``[key, [...], omitted]`` for a dictionary cut to fit the reply (``omitted`` subkeys left out: a
find reply's entries fit in ``DHTLimits.max_find_reply_bytes``, smallest subkeys first, so a key can
never be made unreadable by large subkeys; a regular value that does not fit is sent as None). ``server``
says whether the sender accepts inbound calls (client-mode peers are never put in routing tables).
The caller's PeerID is not in the message: the transport authenticated it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .peer.errors import BadRequestError, ProtocolError
from .peer.identity import IdentityError, PeerID
from .storage import Entry

__all__ = ["VERSION", "DHTLimits", "parse_ping", "parse_store", "parse_store_near", "parse_store_contacts", "parse_find",
           "encode_entry", "encode_entry_within", "decode_entry", "parse_find_response", "parse_store_response", "StoreItem"]

VERSION = 1


@dataclass
class DHTLimits:
    """What one DHT node accepts (bytes, counts, seconds)."""

    max_value_size: int = 256 << 10  # serialized value (signature included)
    max_key_size: int = 1024  # serialized key or subkey
    max_items_per_store: int = 4096
    max_keys_per_find: int = 512
    max_ttl: float = 30 * 86400.0  # expirations further in the future are "absurd" and refused
    max_entries: int = 200_000  # stored entries (each subkey counts)
    max_entries_per_peer: int = 20_000  # entries stored on behalf of one peer
    # stored bytes (key + subkey + value + storage.RECORD_OVERHEAD per record): in total, per storing
    # peer, per source address range (/24 IPv4, /48 IPv6); see dht.storage for the eviction order
    max_bytes: int = 256 << 20
    max_bytes_per_peer: int = 16 << 20
    max_bytes_per_ip: int = 32 << 20
    max_subkeys_per_key: int = 1000  # over it, the source with the most subkeys under the key loses its oldest
    max_cache_bytes: int = 32 << 20  # the cache of looked-up values (a quarter per peer, half per address range)
    max_find_reply_bytes: int = 8 << 20  # entries of one find reply (also at most half the P2P message limit)
    store_rate: float = 5000.0  # items per second one peer may store here (token bucket)
    store_burst: float = 50_000.0
    # routing-table admission and per-caller work (dht.peer.admission): Sybil limits, bounded work per message
    max_peers_per_prefix_per_bucket: int = 2  # table slots (spares included) per /24 (IPv4) or /48 (IPv6) per bucket
    max_peers_per_prefix: int = 8  # same, in the whole table
    max_lookup_peers_per_prefix: int = 4  # contacts of one prefix considered by one lookup
    max_lookup_queries: int = 256  # RPCs one lookup may send
    diversity_for_local_addresses: bool = False  # apply the per-prefix limits to loopback/private addresses too
    dial_back_concurrency: int = 8  # callers verified (dialled back) at once
    max_pending_dial_backs: int = 256  # callers waiting to be verified; more are ignored
    dial_back_rate: float = 2.0  # callers verified per second per source prefix (burst: dial_back_burst)
    dial_back_burst: float = 20.0
    dial_back_rate_total: float = 50.0  # callers verified per second from all sources (burst: 4x)
    dial_back_retry_after: float = 60.0  # seconds before a caller that failed verification is tried again
    find_rate: float = 1000.0  # keys per second one peer may look up here (token bucket; over it: 'overloaded')
    find_burst: float = 4000.0
    find_rate_per_prefix: float = 4000.0  # same, all peers of one IP prefix together
    find_burst_per_prefix: float = 16_000.0
    handover_rate: float = 1.0  # record hand-overs to newcomers started per second (burst: handover_burst)
    handover_burst: float = 4.0
    max_queued_handovers: int = 32  # newcomers waiting for their records; more are skipped (republish covers them)
    handover_chunk: int = 256  # records scanned between yields to the event loop
    max_tracked_peers: int = 4096  # per-identity bookkeeping (rate buckets, backoff, ...): LRU size
    forget_after: float = 60.0  # seconds after which a peer neither connected nor in the table is forgotten

    def __post_init__(self) -> None:
        for name in ("max_entries", "max_entries_per_peer", "max_bytes", "max_bytes_per_peer", "max_bytes_per_ip",
                     "max_subkeys_per_key", "max_cache_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"DHTLimits.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.max_find_reply_bytes, int) or self.max_find_reply_bytes < 4096:
            raise ValueError(f"DHTLimits.max_find_reply_bytes must be an integer of at least 4096, "
                             f"got {self.max_find_reply_bytes!r}")
        for name in ("max_peers_per_prefix_per_bucket", "max_peers_per_prefix", "max_lookup_peers_per_prefix",
                     "max_lookup_queries", "dial_back_concurrency", "max_pending_dial_backs", "max_queued_handovers",
                     "handover_chunk", "max_tracked_peers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"DHTLimits.{name} must be a positive integer, got {value!r}")
        for name in ("dial_back_rate", "dial_back_burst", "dial_back_rate_total", "find_rate", "find_burst",
                     "find_rate_per_prefix", "find_burst_per_prefix", "handover_rate", "handover_burst"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < float("inf"):
                raise ValueError(f"DHTLimits.{name} must be a positive number, got {value!r}")
        for name in ("dial_back_retry_after", "forget_after"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < float("inf"):
                raise ValueError(f"DHTLimits.{name} must be a non-negative number of seconds, got {value!r}")


@dataclass(frozen=True)
class StoreItem:
    key: bytes
    subkey: bytes | None
    value: bytes
    expiration_time: float
    in_cache: bool


def _require(condition: bool, what: str) -> None:
    if not condition:
        raise BadRequestError(what)


def _common(request: Any) -> dict:
    _require(isinstance(request, dict), "request must be a map")
    _require(request.get("v") == VERSION, f"unsupported DHT protocol version {request.get('v')!r} (we speak {VERSION})")
    _require(isinstance(request.get("server", False), bool), "'server' must be a bool")
    return request


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def parse_ping(request: Any) -> tuple[bool, float | None]:
    request = _common(request)
    t = request.get("t")
    return request.get("server", False), (float(t) if _finite(t) else None)


def parse_store(request: Any, limits: DHTLimits) -> tuple[bool, list[StoreItem]]:
    request = _common(request)
    items = request.get("items")
    _require(isinstance(items, list), "'items' must be a list")
    _require(len(items) <= limits.max_items_per_store, f"too many items ({len(items)} > {limits.max_items_per_store})")
    parsed = []
    for item in items:
        _require(isinstance(item, list) and len(item) == 5, "each item is [key, subkey, value, expiration, in_cache]")
        key, subkey, value, expiration, in_cache = item
        _require(isinstance(key, bytes) and 0 < len(key) <= limits.max_key_size, "bad key")
        _require(subkey is None or (isinstance(subkey, bytes) and 0 < len(subkey) <= limits.max_key_size), "bad subkey")
        _require(isinstance(value, bytes), "value must be bytes")
        _require(_finite(expiration), "expiration must be a finite number")
        _require(isinstance(in_cache, bool), "in_cache must be a bool")
        parsed.append(StoreItem(key, subkey, value, float(expiration), in_cache))
    return request.get("server", False), parsed


def parse_find(request: Any, limits: DHTLimits) -> tuple[bool, list[bytes], int]:
    request = _common(request)
    keys, k = request.get("keys"), request.get("k", 20)
    _require(isinstance(keys, list) and len(keys) <= limits.max_keys_per_find, "'keys' must be a short list")
    _require(all(isinstance(key, bytes) and len(key) == 20 for key in keys), "key ids are 20 bytes")
    _require(isinstance(k, int) and 1 <= k <= 64, "'k' must be an integer in [1, 64]")
    return request.get("server", False), keys, k


_ITEM_OVERHEAD = 24  # msgpack bytes around one [subkey, value, expiration] (array, bin headers, float64)


def encode_entry(entry: Entry | None) -> list | None:
    """An entry as the wire carries it, whole."""
    return encode_entry_within(entry, None)[0]


def encode_entry_within(entry: Entry | None, max_bytes: int | None) -> tuple[list | None, int]:
    """An entry cut to at most about ``max_bytes`` bytes of msgpack (None: no limit), and its size.

    A dictionary keeps its smallest subkeys first (then the latest-expiring), so every subkey of at
    most ``max_bytes / number of subkeys`` bytes is always sent whatever else the key holds; the rest
    is counted in the third element. A regular value that does not fit is sent as None."""
    if entry is None:
        return None, 0
    limit = float("inf") if max_bytes is None else max_bytes
    used = len(entry.key_bytes) + _ITEM_OVERHEAD
    if entry.regular is not None:
        used += len(entry.regular[0])
        if used > limit:
            return None, 0
        return [entry.key_bytes, entry.regular[0], entry.regular[1]], used
    whole = used + sum(len(s) + len(v) + _ITEM_OVERHEAD for s, (v, _) in entry.subkeys.items())
    if whole <= limit:  # (no sorting when everything fits)
        return [entry.key_bytes, [[s, v, e] for s, (v, e) in entry.subkeys.items()]], whole
    items = sorted(entry.subkeys.items(), key=lambda item: (len(item[0]) + len(item[1][0]), -item[1][1]))
    sent = []
    for subkey, (value, exp) in items:
        size = len(subkey) + len(value) + _ITEM_OVERHEAD
        if used + size > limit:
            break
        used += size
        sent.append([subkey, value, exp])
    if len(sent) < len(items):
        return [entry.key_bytes, sent, len(items) - len(sent)], used + 9
    return [entry.key_bytes, sent], used


def decode_entry(data: Any) -> Entry | None:
    """Parse an entry from a find response; ProtocolError if malformed."""
    if data is None:
        return None
    try:
        if len(data) == 3 and not isinstance(data[1], list):
            key, value, exp = data
            if isinstance(key, bytes) and isinstance(value, bytes) and _finite(exp):
                return Entry(key, regular=(value, float(exp)))
        elif (len(data) == 2 or (len(data) == 3 and isinstance(data[2], int) and not isinstance(data[2], bool))) \
                and isinstance(data[0], bytes) and isinstance(data[1], list) and len(data[1]) <= 65536:
            entry = Entry(data[0])
            for subkey, value, exp in data[1]:
                if not (isinstance(subkey, bytes) and isinstance(value, bytes) and _finite(exp)):
                    raise ValueError
                entry.subkeys[subkey] = (value, float(exp))
            return entry
    except (TypeError, ValueError):
        pass
    raise ProtocolError("malformed DHT entry")


def parse_find_response(response: Any, num_keys: int) -> list[tuple[Entry | None, list[tuple[PeerID, list[str]]]]]:
    if not isinstance(response, dict) or not isinstance(response.get("results"), list):
        raise ProtocolError("malformed find response")
    results = response["results"]
    if len(results) != num_keys:
        raise ProtocolError(f"find response has {len(results)} results for {num_keys} keys")
    parsed = []
    for result in results:
        if not isinstance(result, list) or len(result) != 2:
            raise ProtocolError("malformed find result")
        parsed.append((decode_entry(result[0]), _parse_contacts(result[1])))
    return parsed


def _parse_contacts(contacts: Any) -> list[tuple[PeerID, list[str]]]:
    """``[[peer id bytes, [address, ...]], ...]`` (at most 64); malformed contacts are skipped."""
    if not isinstance(contacts, list) or len(contacts) > 64:
        raise ProtocolError("malformed contact list")
    peers = []
    for peer in contacts:
        try:
            raw, addrs = peer
            if isinstance(addrs, list) and len(addrs) <= 16 and all(isinstance(a, str) and len(a) < 256 for a in addrs):
                peers.append((PeerID(raw), addrs))
        except (TypeError, ValueError, IdentityError):
            continue  # skip a malformed contact, keep the rest
    return peers


def parse_store_near(request: dict) -> int | None:
    """The optional ``near`` of a store request (already parsed by :func:`parse_store`): the number of
    contacts near the first item's key the storing node wants back, so that a store can double as
    the lookup step of its own replication."""
    near = request.get("near")
    _require(near is None or (isinstance(near, int) and not isinstance(near, bool) and 1 <= near <= 64),
             "'near' must be an integer in [1, 64]")
    return near


def parse_store_contacts(response: Any) -> list[tuple[PeerID, list[str]]]:
    """The contacts of a store response (none if the responder did not send any)."""
    if not isinstance(response, dict) or response.get("near") is None:
        return []
    return _parse_contacts(response["near"])


def parse_store_response(response: Any, num_items: int) -> list[bool | str]:
    if not isinstance(response, dict) or not isinstance(response.get("ok"), list) or len(response["ok"]) != num_items:
        raise ProtocolError("malformed store response")
    return [x if isinstance(x, bool) else str(x)[:200] for x in response["ok"]]
