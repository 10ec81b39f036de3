"""The DHT wire protocol (version 1), sans I/O: every message's encoder next to its parser.

Each call is one msgpack map each way (a unary RPC of :class:`dht.peer.P2P`); requests carry
``"v"`` (the version) and ``"server"`` (whether the sender accepts inbound calls: client-mode peers
are never put in routing tables). The caller's PeerID is not in the message: the transport
authenticated it. Request parsers raise :class:`~dht.peer.errors.BadRequestError` (the caller gets
``bad_request``), response parsers :class:`~dht.peer.errors.ProtocolError`; nothing else, whatever
msgpack value arrives. No I/O here: :mod:`dht.node` sends what these functions build.

=============  ===================================  ===================================  ===============================
method         request                              response                             limits (DHTLimits defaults)
=============  ===================================  ===================================  ===============================
``dht.ping``   ``{"v": 1, "server": bool,``         ``{"v": 1, "server": bool,``         t: finite, else ignored
               ``"t": DHT time}``                   ``"t": DHT time}``
``dht.store``  ``{"v": 1, "server": bool,``         ``{"v": 1, "ok": [true | false |``   items <= max_items_per_store
               ``"items": [[key, subkey | None,``   ``"reason refused", ...]}``          (4096); key, subkey: 1 to
               ``value, expiration, in_cache],``    (one per item; false: older than     max_key_size (1024) bytes;
               ``...]}``, optionally ``"near": n``  what the node holds), and            expirations finite; near in
                                                    ``"near": [contact, ...]`` if asked  [1, 64]; <= 64 contacts of
                                                                                         <= 16 addresses (< 256 chars)
``dht.find``   ``{"v": 1, "server": bool,``         ``{"v": 1, "results": [[entry |``    keys <= max_keys_per_find
               ``"keys": [20-byte key id, ...],``   ``None, [contact, ...]], ...]}``     (512); k in [1, 64], default 20
               ``"k": int}``                        (one per key)                        entries within
                                                                                         max_find_reply_bytes (8 MiB)
=============  ===================================  ===================================  ===============================

Encoders and parsers: :func:`ping_request` / :func:`parse_ping`, :func:`ping_response` /
:func:`parse_ping_response`; :func:`store_request` / :func:`parse_store` and :func:`parse_store_near`,
:func:`store_response` / :func:`parse_store_response` and :func:`parse_store_contacts`;
:func:`find_request` / :func:`parse_find`, :func:`find_response` / :func:`parse_find_response`.
A value over ``max_value_size`` (256 KiB) or an expiration beyond ``max_ttl`` is refused (a reason
in ``ok``), not malformed.

``key``, ``subkey`` and ``value`` are msgpack bytes (a signed value carries its signature, see
:mod:`dht.validation`); ``in_cache`` asks the node to keep the item in its cache of looked-up
values rather than its storage. ``near``: a store of one key doubles as the lookup step of its own
replication: the node sends back up to ``near`` contacts nearest the first item's key (the asker
left out). A ``contact`` is ``[34-byte PeerID, [address, ...]]`` (malformed ones are skipped).

An ``entry`` (:func:`encode_entry_within`, :func:`decode_entry`) is ``[key, value, expiration]``
for a regular value, ``[key, [[subkey, value, expiration], ...]]`` for a dictionary (at most 65,536
subkeys), or ``[key, [...], omitted]`` for a dictionary cut to fit the reply (``omitted`` subkeys
left out: a find reply's entries fit in ``max_find_reply_bytes``, smallest subkeys first, so a key
can never be made unreadable by large subkeys; a regular value that does not fit is sent as None).
Maps keep the key order shown (``v`` first), so the bytes are stable (``tests/test_dht_protocol.py``
holds recorded vectors).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from .peer.errors import BadRequestError, ProtocolError
from .peer.identity import IdentityError, PeerID
from .peer.untrusted import brief
from .storage import Entry

__all__ = ["VERSION", "DHTLimits", "StoreItem", "MAX_CONTACTS", "MAX_ADDRESSES", "MAX_SUBKEYS",
           "ping_request", "ping_response", "parse_ping", "parse_ping_response",
           "store_request", "parse_store", "parse_store_near", "store_response", "parse_store_response",
           "parse_store_contacts", "find_request", "parse_find", "find_response", "parse_find_response",
           "encode_contacts", "encode_entry", "encode_entry_within", "decode_entry"]

VERSION = 1
MAX_CONTACTS = 64  # contacts per find result or store reply (also the largest ``k`` and ``near``)
MAX_ADDRESSES = 16  # addresses per contact (each shorter than 256 characters)
MAX_SUBKEYS = 65536  # subkeys of one dictionary entry in a find reply
DEFAULT_K = 20  # contacts per key of a find request without ``k``
Contact = tuple[PeerID, list[str]]


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
    """One record of a ``dht.store`` request (bytes as they are stored; ``expiration_time`` in DHT time)."""

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
    _require(request.get("v") == VERSION,
             f"unsupported DHT protocol version {brief(request.get('v'))} (we speak {VERSION})")
    _require(isinstance(request.get("server", False), bool), "'server' must be a bool")
    return request


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _small_int(x: Any, low: int, high: int) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and low <= x <= high


def _request(server: bool, **fields: Any) -> dict:
    return {"v": VERSION, "server": server, **fields}

# ---- dht.ping -----------------------------------------------------------------------------------


def ping_request(server: bool, t: float) -> dict:
    """``dht.ping`` from a peer that accepts calls (``server``) whose DHT time is ``t`` (seconds)."""
    return _request(server, t=t)


def ping_response(server: bool, t: float) -> dict:
    """The answer to a ping: the same fields as the request, from the answering node."""
    return _request(server, t=t)


def parse_ping(request: Any) -> tuple[bool, float | None]:
    """``(server, t)`` of a ping request (``t`` None unless a finite number); BadRequestError if malformed."""
    request = _common(request)
    t = request.get("t")
    return request.get("server", False), (float(t) if _finite(t) else None)


def parse_ping_response(response: Any) -> tuple[bool, float | None]:
    """``(server, t)`` of a ping response; ProtocolError if malformed."""
    try:
        return parse_ping(response)
    except BadRequestError as e:
        raise ProtocolError(f"malformed ping response: {e}") from None

# ---- dht.store ----------------------------------------------------------------------------------


def store_request(server: bool, items: Iterable[StoreItem], near: int | None = None) -> dict:
    """``dht.store`` of ``items``; ``near``: ask for that many contacts near the first item's key."""
    request = _request(server, items=[[i.key, i.subkey, i.value, i.expiration_time, i.in_cache] for i in items])
    if near is not None:
        request["near"] = near
    return request


def parse_store(request: Any, limits: DHTLimits) -> tuple[bool, list[StoreItem]]:
    """``(server, items)`` of a store request; BadRequestError if malformed (checked before anything is stored)."""
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


def parse_store_near(request: Any) -> int | None:
    """The optional ``near`` of a store request: the number of contacts near the first item's key the
    storing node wants back, so that a store can double as the lookup step of its own replication."""
    _require(isinstance(request, dict), "request must be a map")
    near = request.get("near")
    _require(near is None or _small_int(near, 1, MAX_CONTACTS), f"'near' must be an integer in [1, {MAX_CONTACTS}]")
    return near


def store_response(ok: Sequence[bool | str], near: Iterable[Contact] | None = None) -> dict:
    """The answer to a store: one ``True``/``False``/refusal reason per item, and the contacts asked for."""
    response: dict[str, Any] = {"v": VERSION, "ok": list(ok)}
    if near is not None:
        response["near"] = encode_contacts(near)
    return response


def parse_store_response(response: Any, num_items: int) -> list[bool | str]:
    """The per-item answers of a store response (reasons cut to 200 characters); ProtocolError if malformed."""
    if not isinstance(response, dict) or not isinstance(response.get("ok"), list) or len(response["ok"]) != num_items:
        raise ProtocolError("malformed store response")
    return [x if isinstance(x, bool) else x[:200] if isinstance(x, str) else brief(x) for x in response["ok"]]


def parse_store_contacts(response: Any) -> list[Contact]:
    """The contacts of a store response (none if the responder did not send any); ProtocolError if malformed."""
    if not isinstance(response, dict) or response.get("near") is None:
        return []
    return _parse_contacts(response["near"])

# ---- dht.find -----------------------------------------------------------------------------------


def find_request(server: bool, keys: Sequence[bytes], k: int) -> dict:
    """``dht.find`` of 20-byte key ids ``keys``, asking for ``k`` contacts nearest each."""
    return _request(server, keys=list(keys), k=k)


def parse_find(request: Any, limits: DHTLimits) -> tuple[bool, list[bytes], int]:
    """``(server, keys, k)`` of a find request; BadRequestError if malformed."""
    request = _common(request)
    keys, k = request.get("keys"), request.get("k", DEFAULT_K)
    _require(isinstance(keys, list) and len(keys) <= limits.max_keys_per_find, "'keys' must be a short list")
    _require(all(isinstance(key, bytes) and len(key) == 20 for key in keys), "key ids are 20 bytes")
    _require(_small_int(k, 1, MAX_CONTACTS), f"'k' must be an integer in [1, {MAX_CONTACTS}]")
    return request.get("server", False), keys, k


def find_response(results: Iterable[tuple[list | None, Iterable[Contact]]]) -> dict:
    """The answer to a find: per key, its entry as :func:`encode_entry_within` made it (or None) and contacts."""
    return {"v": VERSION, "results": [[entry, encode_contacts(contacts)] for entry, contacts in results]}


def parse_find_response(response: Any, num_keys: int) -> list[tuple[Entry | None, list[Contact]]]:
    """Per key, the entry (or None) and the contacts of a find response; ProtocolError if malformed."""
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

# ---- contacts and entries -----------------------------------------------------------------------


def encode_contacts(contacts: Iterable[Contact]) -> list:
    """``[[peer id bytes, [address, ...]], ...]``."""
    return [[peer_id.raw, list(addresses)] for peer_id, addresses in contacts]


def _parse_contacts(contacts: Any) -> list[Contact]:
    """``[[peer id bytes, [address, ...]], ...]`` (at most MAX_CONTACTS); malformed contacts are skipped."""
    if not isinstance(contacts, list) or len(contacts) > MAX_CONTACTS:
        raise ProtocolError("malformed contact list")
    peers = []
    for peer in contacts:
        if not (isinstance(peer, list) and len(peer) == 2):
            continue  # skip a malformed contact, keep the rest
        raw, addrs = peer
        if not (isinstance(addrs, list) and len(addrs) <= MAX_ADDRESSES and
                all(isinstance(a, str) and len(a) < 256 for a in addrs)):
            continue
        try:
            peers.append((PeerID(raw), addrs))
        except IdentityError:
            continue
    return peers


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


def _decode_dictionary(key: Any, items: Any) -> Entry | None:
    if not (isinstance(key, bytes) and isinstance(items, list) and len(items) <= MAX_SUBKEYS):
        return None
    entry = Entry(key)
    for item in items:
        if not (isinstance(item, list) and len(item) == 3):
            return None
        subkey, value, exp = item
        if not (isinstance(subkey, bytes) and isinstance(value, bytes) and _finite(exp)):
            return None
        entry.subkeys[subkey] = (value, float(exp))
    return entry


def decode_entry(data: Any) -> Entry | None:
    """Parse an entry from a find response (None stays None); ProtocolError if malformed."""
    if data is None:
        return None
    entry = None
    if isinstance(data, list) and len(data) == 3 and not isinstance(data[1], list):
        key, value, exp = data
        if isinstance(key, bytes) and isinstance(value, bytes) and _finite(exp):
            entry = Entry(key, regular=(value, float(exp)))
    elif isinstance(data, list) and (len(data) == 2 or (len(data) == 3 and _small_int(data[2], -(1 << 63), 1 << 64))):
        entry = _decode_dictionary(data[0], data[1])
    if entry is None:
        raise ProtocolError("malformed DHT entry")
    return entry
