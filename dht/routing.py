"""Kademlia routing: 160-bit DHT ids, the XOR metric, and a k-bucket routing table.

Node ids are derived from PeerIDs (``DHTID.of_peer``), key ids from the msgpack bytes of the key
(``DHTID.of_key``); both are the first 160 bits of a SHA-256, so nobody picks their position.
Buckets split when they cover this node's own id or when their depth is not a multiple of
``depth_modulo`` (hivemind's relaxation, which keeps more contacts far from us). A full bucket keeps
newcomers in a replacement cache and asks the caller to ping its least-recently-seen node: if that
node answers it stays (stable nodes are preferred), otherwise it is replaced.

Diversity filter (go-libp2p-kad-dht's idea): each contact may carry a *group*, the IP prefix it was
reached at (:func:`dht.peer.admission.prefix_of`); at most ``max_per_group_per_bucket`` contacts of one
group sit in one bucket and ``max_per_group`` in the whole table (replacement caches included), so
one address with many identities cannot fill the table. Contacts without a group are not limited.
"""

from __future__ import annotations

import collections
import hashlib
import heapq
import random
from dataclasses import dataclass
from typing import Any, Callable

from .peer.identity import PeerID

__all__ = ["DHTID", "KBucket", "RoutingTable", "ID_BITS"]

ID_BITS = 160
ID_MAX = 1 << ID_BITS


_PEER_IDS: dict[bytes, "DHTID"] = {}  # of_peer, memoized: lookups meet the same few peers over and over
_PEER_IDS_MAX = 8192  # bounded: throw-away identities must not pile up (cleared when full)


class DHTID(int):
    """A 160-bit identifier on the Kademlia ring."""

    @classmethod
    def of_bytes(cls, data: bytes) -> "DHTID":
        return cls(int.from_bytes(hashlib.sha256(data).digest()[:ID_BITS // 8], "big"))

    @classmethod
    def of_peer(cls, peer_id: PeerID) -> "DHTID":
        node_id = _PEER_IDS.get(peer_id.raw)
        if node_id is None:
            if len(_PEER_IDS) >= _PEER_IDS_MAX:
                _PEER_IDS.clear()
            node_id = _PEER_IDS[peer_id.raw] = cls.of_bytes(b"swarm-node:" + peer_id.raw)
        return node_id

    @classmethod
    def of_key(cls, key_bytes: bytes) -> "DHTID":
        """Id of a key, given the key's msgpack serialization."""
        return cls.of_bytes(b"swarm-key:" + key_bytes)

    @classmethod
    def random(cls, rng: random.Random | None = None, lower: int = 0, upper: int = ID_MAX) -> "DHTID":
        return cls((rng or random).randrange(lower, upper))

    def to_bytes20(self) -> bytes:
        return int(self).to_bytes(ID_BITS // 8, "big")

    @classmethod
    def from_bytes20(cls, data: bytes) -> "DHTID":
        if not isinstance(data, bytes) or len(data) != ID_BITS // 8:
            raise ValueError("a DHT id is 20 bytes")
        return cls(int.from_bytes(data, "big"))


@dataclass
class KBucket:
    """Nodes whose ids lie in ``[lower, upper)``, least recently seen first."""

    lower: int
    upper: int
    depth: int
    size: int

    def __post_init__(self) -> None:
        self.nodes: collections.OrderedDict[PeerID, DHTID] = collections.OrderedDict()
        self.replacements: collections.OrderedDict[PeerID, DHTID] = collections.OrderedDict()

    def covers(self, node_id: int) -> bool:
        return self.lower <= node_id < self.upper

    def split(self) -> tuple["KBucket", "KBucket"]:
        middle = (self.lower + self.upper) // 2
        left = KBucket(self.lower, middle, self.depth + 1, self.size)
        right = KBucket(middle, self.upper, self.depth + 1, self.size)
        for source, attr in ((self.nodes, "nodes"), (self.replacements, "replacements")):
            for peer_id, node_id in source.items():
                getattr(left if left.covers(node_id) else right, attr)[peer_id] = node_id
        return left, right


class RoutingTable:
    """The k-bucket table of one node (``own_id``); not thread-safe, used from one event loop.

    ``max_per_group_per_bucket`` / ``max_per_group``: diversity limits (None: unlimited), see the
    module docstring."""

    def __init__(self, own_id: DHTID, bucket_size: int = 20, depth_modulo: int = 5,
                 max_per_group_per_bucket: int | None = None, max_per_group: int | None = None):
        self.own_id = own_id
        self.bucket_size = bucket_size
        self.depth_modulo = depth_modulo
        self.max_per_group_per_bucket, self.max_per_group = max_per_group_per_bucket, max_per_group
        self.buckets = [KBucket(0, ID_MAX, 0, bucket_size)]
        self._ids: dict[PeerID, DHTID] = {}
        self._spares: dict[PeerID, DHTID] = {}  # peers in replacement caches
        self._groups: dict[PeerID, str] = {}  # group of each node or spare that has one
        self._group_counts: collections.Counter[str] = collections.Counter()

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, peer_id: PeerID) -> bool:
        return peer_id in self._ids

    def knows(self, peer_id: PeerID) -> bool:
        """In the table or in a replacement cache."""
        return peer_id in self._ids or peer_id in self._spares

    def group_count(self, group: str) -> int:
        """Nodes and spares of ``group``."""
        return self._group_counts.get(group, 0)

    def bucket_index(self, node_id: int) -> int:
        lo, hi = 0, len(self.buckets)
        while lo < hi:  # buckets are sorted and contiguous
            mid = (lo + hi) // 2
            if node_id < self.buckets[mid].lower:
                hi = mid
            elif node_id >= self.buckets[mid].upper:
                lo = mid + 1
            else:
                return mid
        raise ValueError("id out of range")

    def admits(self, node_id: int, group: str | None) -> bool:
        """Whether a new contact of ``group`` at ``node_id`` fits the diversity limits now."""
        if group is None:
            return True
        if self.max_per_group is not None and self._group_counts.get(group, 0) >= self.max_per_group:
            return False
        if self.max_per_group_per_bucket is not None:
            bucket = self.buckets[self.bucket_index(node_id)]
            same = sum(self._groups.get(p) == group for p in bucket.nodes) + \
                sum(self._groups.get(p) == group for p in bucket.replacements)
            if same >= self.max_per_group_per_bucket:
                return False
        return True

    def _set_group(self, peer_id: PeerID, group: str | None) -> None:
        if group is not None and peer_id not in self._groups:
            self._groups[peer_id] = group
            self._group_counts[group] += 1

    def _drop_group(self, peer_id: PeerID) -> None:
        group = self._groups.pop(peer_id, None)
        if group is not None:
            self._group_counts[group] -= 1
            if self._group_counts[group] <= 0:
                del self._group_counts[group]

    def add_or_update(self, peer_id: PeerID, node_id: DHTID | None = None, group: str | None = None) -> PeerID | None:
        """Record that ``peer_id`` was seen (``group``: where it was reached, for the diversity limits;
        a newcomer over them is not added). Returns a least-recently-seen node to ping when the
        bucket is full (the newcomer waits in the replacement cache), else None."""
        node_id = node_id if node_id is not None else DHTID.of_peer(peer_id)
        if node_id == self.own_id:
            return None
        if not self.knows(peer_id) and not self.admits(node_id, group):
            return None
        while True:
            index = self.bucket_index(node_id)
            bucket = self.buckets[index]
            if peer_id in bucket.nodes:
                bucket.nodes.move_to_end(peer_id)
                return None
            if len(bucket.nodes) < bucket.size:
                bucket.nodes[peer_id] = node_id
                bucket.replacements.pop(peer_id, None)
                self._spares.pop(peer_id, None)
                self._ids[peer_id] = node_id
                self._set_group(peer_id, group)
                return None
            if bucket.covers(self.own_id) or bucket.depth % self.depth_modulo != 0:
                self.buckets[index:index + 1] = bucket.split()
                continue
            bucket.replacements[peer_id] = node_id
            bucket.replacements.move_to_end(peer_id)
            self._spares[peer_id] = node_id
            self._set_group(peer_id, group)
            while len(bucket.replacements) > bucket.size:
                old, _ = bucket.replacements.popitem(last=False)
                self._spares.pop(old, None)
                self._drop_group(old)
            return next(iter(bucket.nodes))

    def remove(self, peer_id: PeerID) -> bool:
        """Drop an unresponsive node; its bucket's most recent replacement takes its place."""
        node_id = self._ids.pop(peer_id, None)
        if node_id is None:
            spare = self._spares.pop(peer_id, None)
            if spare is not None:
                self.buckets[self.bucket_index(spare)].replacements.pop(peer_id, None)
                self._drop_group(peer_id)
            return False
        self._drop_group(peer_id)
        bucket = self.buckets[self.bucket_index(node_id)]
        bucket.nodes.pop(peer_id, None)
        if bucket.replacements:
            new_peer, new_id = bucket.replacements.popitem(last=True)
            self._spares.pop(new_peer, None)
            bucket.nodes[new_peer] = new_id
            self._ids[new_peer] = new_id
        return True

    def get_id(self, peer_id: PeerID) -> DHTID | None:
        return self._ids.get(peer_id)

    def nearest(self, target: int, k: int, exclude: PeerID | None = None) -> list[tuple[PeerID, DHTID]]:
        """Up to ``k`` known nodes closest to ``target`` by XOR distance, closest first."""
        # distances are distinct ints, so the tuples compare on them alone, in C (no key function,
        # no PeerID.__eq__ per contact: this runs for every dht.find served)
        pool: Any = self._ids.items()
        if len(self._ids) > 4 * (k + 1):
            # a big table: only the buckets nearest the target. Buckets are aligned power-of-two id
            # ranges, so XOR maps each onto a disjoint range of distances starting at its lower bound's
            # distance with the low bits cleared; once k + 1 nodes are gathered from the nearest
            # ranges, every node of a farther range is farther than all of them.
            ordered = sorted(self.buckets, key=lambda b: (b.lower ^ target) & ~(b.upper - b.lower - 1))
            pool = []
            for bucket in ordered:
                pool.extend(bucket.nodes.items())
                if len(pool) > k:
                    break
        candidates = heapq.nsmallest(k + 1, [(node_id ^ target, peer_id, node_id) for peer_id, node_id in pool])
        return [(peer_id, node_id) for _, peer_id, node_id in candidates if peer_id != exclude][:k]

    def all_peers(self) -> list[PeerID]:
        return list(self._ids)

    def among_nearest(self, node_id: int, k: int, exclude: PeerID | None = None) -> "Callable[[int], bool]":
        """A test ``key_id -> bool``: would ``node_id`` be among the ``k`` nodes of this table (less
        ``exclude``) closest to ``key_id``? Each test costs O(log n), not O(n): a table node t is
        closer to a key than ``node_id`` exactly when the key's bit at the highest bit where t and
        ``node_id`` differ is set in ``key ^ node_id``, so nodes are counted per such bit."""
        counts: collections.Counter[int] = collections.Counter()
        for peer_id, other in self._ids.items():
            if peer_id != exclude and other != node_id:
                counts[(other ^ node_id).bit_length() - 1] += 1
        levels = sorted(counts.items(), reverse=True)

        def test(key_id: int) -> bool:
            x, closer = key_id ^ node_id, 0
            for bit, count in levels:
                if x >> bit & 1:
                    closer += count
                    if closer >= k:
                        return False
            return True

        return test
