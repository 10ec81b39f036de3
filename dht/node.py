"""DHTNode: the asyncio-native Kademlia node (see :class:`dht.DHT` for the synchronous facade).

>>> node = await DHTNode.create(initial_peers=["/ip4/127.0.0.1/tcp/31337/p2p/Qm..."], host="127.0.0.1")
>>> await node.store("key", {"any": "msgpack value"}, expiration_time=get_dht_time() + 60)
True
>>> await node.get("key")
ValueWithExpiration(value={'any': 'msgpack value'}, expiration_time=...)

Stores go to the ``num_replicas`` (default k = 20) nodes closest to the key (a store of one key is
its own lookup: each store reply names contacts nearer the key, so nodes asked on the way before
closer ones turned up keep a spare copy until it expires); gets walk towards the
key and stop at the first live value (``latest=True``: ask all k closest and merge: the newest version
of each subkey wins, and a plain value never hides a dictionary's signed subkeys),
then cache the value at the closest node on the path that lacked it (and, a regular value, in this
node's own cache: ``cache_size`` entries, ``limits.max_cache_bytes`` bytes, least recently used
evicted first; a remote peer's cache stores may take a quarter of it). Nodes republish what they hold
every ``republish_interval``, hand records to newcomers that are closer to them, refresh their
buckets every ``refresh_interval``, and drop peers that stop answering.

Against Sybils (:mod:`dht.peer.admission`): a peer enters the routing table only once we reached it at an
address of its own (our dial, or a dial-back of a caller that claims to be a server), charged to
that address's IP prefix (a few slots per /24 or /48 per bucket and in total; lookups consider a
few contacts per prefix). Hand-overs to newcomers are queued, rate-limited and incremental; finds
draw on per-peer and per-prefix token buckets; per-identity bookkeeping is bounded and swept
(:meth:`DHTNode.forget_departed`). Knobs: :class:`dht.protocol.DHTLimits`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import random
import time
from typing import Any, Callable, Iterable, Sequence

import msgpack

from .peer.addresses import PeerAddress
from .peer.admission import BoundedLRU, DialBacks, KeyedBuckets, TokenBucket, host_of, prefix_of
from .peer.errors import ErrorCode, OverloadedError, P2PError, RemoteError
from .peer.identity import Identity, PeerID
from .peer.multiplex import Limits
from .peer.nat import NatOptions, NatService
from .peer.p2p import P2P, CallContext
from .peer.untrusted import LogLimiter
from .peer.virtual_clock import VirtualClockLoop
from .protocol import (
    MAX_CONTACTS,
    DHTLimits,
    StoreItem,
    encode_entry_within,
    find_request,
    find_response,
    parse_find,
    parse_find_response,
    parse_ping,
    parse_ping_response,
    parse_store,
    parse_store_contacts,
    parse_store_near,
    parse_store_response,
    ping_request,
    ping_response,
    store_request,
    store_response,
)
from .routing import DHTID, RoutingTable
from .storage import Entry, Storage, StoreRefused, ValueWithExpiration
from .traverse import LookupResult, Query, iterative_lookup
from .validation import CompositeValidator, DHTRecord, RecordValidator, SignatureValidator, ValidationError

__all__ = ["DHTNode", "get_dht_time", "MAX_CLOCK_SKEW"]

logger = logging.getLogger(__name__)
STORE_NEAR = 6  # contacts near the key that each store reply brings back (a find brings k)
MAX_FIND_CONTACTS = MAX_CONTACTS  # contacts one find may ask for per key (the protocol's limit)
MAX_CLOCK_SKEW = 3.0  # seconds; peers further off than this are warned about
_dropped_log = LogLimiter()  # lines about invalid records that peers returned


def get_dht_time() -> float:
    """DHT time: wall-clock seconds since the epoch (peers must agree within a few seconds)."""
    return time.time()


def _default_clock() -> Callable[[], float]:
    """get_dht_time, or the running loop's ``dht_time`` on dht.peer.virtual_clock (follows virtual time)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return get_dht_time
    return loop.dht_time if isinstance(loop, VirtualClockLoop) else get_dht_time


def _loop_time() -> float:
    """The running event loop's clock (virtual on dht.peer.virtual_clock), else time.monotonic()."""
    try:
        return asyncio.get_running_loop().time()
    except RuntimeError:
        return time.monotonic()


def _pack(obj: Any) -> bytes:
    try:
        return msgpack.packb(obj, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as e:
        raise TypeError(f"DHT keys and values must be msgpack-serializable: {e}") from None


def _unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


class DHTNode:
    """A Kademlia node over a :class:`dht.P2P` peer. Create with :meth:`create`."""

    def __init__(self, p2p: P2P, *, bucket_size: int = 20, alpha: int = 3, num_replicas: int | None = None,
                 depth_modulo: int = 5, client_mode: bool = False, record_validators: Iterable[RecordValidator] = (),
                 limits: DHTLimits | None = None, rpc_timeout: float = 3.0, refresh_interval: float = 60.0,
                 republish_interval: float = 600.0, cache_size: int = 10_000,
                 clock: Callable[[], float] | None = None, rng: random.Random | None = None):
        self.p2p = p2p
        self.peer_id = p2p.peer_id
        self.node_id = DHTID.of_peer(p2p.peer_id)
        self.k, self.alpha = bucket_size, alpha
        self.num_replicas = num_replicas or bucket_size
        self.client_mode = client_mode
        self.limits = limits or DHTLimits()
        self.rpc_timeout = rpc_timeout
        self.refresh_interval, self.republish_interval = refresh_interval, republish_interval
        self.clock = clock or _default_clock()  # DHT time; on a virtual-clock loop, its virtual wall clock
        self.rng = rng or random.Random()
        lim = self.limits
        self.routing_table = RoutingTable(self.node_id, bucket_size, depth_modulo,
                                          lim.max_peers_per_prefix_per_bucket, lim.max_peers_per_prefix)
        self.storage = Storage(lim.max_entries, lim.max_entries_per_peer, max_bytes=lim.max_bytes,
                               max_bytes_per_peer=lim.max_bytes_per_peer, max_bytes_per_ip=lim.max_bytes_per_ip,
                               max_subkeys_per_key=lim.max_subkeys_per_key, own_id=self.node_id,
                               is_foreign=self._is_foreign)
        # a cache evicts (least recently used first), never refuses: our own lookups may fill it all,
        # a remote peer a quarter of it, an address range half
        self.cache = Storage(cache_size, max(cache_size // 4, 1), max_bytes=lim.max_cache_bytes,
                             max_bytes_per_peer=lim.max_cache_bytes // 4, max_bytes_per_ip=lim.max_cache_bytes // 2,
                             max_subkeys_per_key=lim.max_subkeys_per_key, cache=True)
        self.signature_validator = SignatureValidator(p2p.identity)
        self.validator = CompositeValidator([self.signature_validator, *record_validators])
        # per-identity bookkeeping, all bounded (LRU) and swept by forget_departed()
        self._buckets: BoundedLRU[PeerID, TokenBucket] = BoundedLRU(lim.max_tracked_peers)
        # (excluded until, failures)
        self._backoff: BoundedLRU[PeerID, tuple[float, int]] = BoundedLRU(lim.max_tracked_peers)
        self._skew_warned: BoundedLRU[PeerID, bool] = BoundedLRU(lim.max_tracked_peers)
        self._find_rates = KeyedBuckets(lim.find_rate, lim.find_burst, lim.max_tracked_peers)
        self._find_rates_per_prefix = KeyedBuckets(lim.find_rate_per_prefix, lim.find_burst_per_prefix,
                                                   lim.max_tracked_peers)
        self._dial_backs = DialBacks(self._verify, self._admit_verified, concurrency=lim.dial_back_concurrency,
                                     max_pending=lim.max_pending_dial_backs, rate=lim.dial_back_rate,
                                     burst=lim.dial_back_burst, rate_total=lim.dial_back_rate_total,
                                     retry_after=lim.dial_back_retry_after,
                                     max_remembered=lim.max_tracked_peers)
        self._handovers: collections.OrderedDict[PeerID, float] = collections.OrderedDict()  # newcomer -> admitted at
        self._handover_bucket: TokenBucket | None = None
        self._handover_running = False
        self._stale_checks: set[PeerID] = set()  # least-recently-seen nodes being pinged
        self._store_filters: dict[str, Callable[[PeerID], bool]] = {}  # key prefix -> refuse(peer_id)
        self._prefixes: dict[str, str | None] = {}  # host -> prefix_of(host), memoized (bounded)
        self._sources: dict[str, str | None] = {}  # endpoint -> its prefix, memoized (bounded)
        self._tasks: set[asyncio.Task] = set()
        self._background: list[asyncio.Task] = []
        self.is_alive = True
        self.rpcs_sent = 0  # DHT RPCs this node has sent (diagnostics, benchmarks/dht_sim.py)
        self.last_lookup: LookupResult | None = None  # stats of this node's latest iterative lookup
        p2p.add_unary_handler("dht.ping", self._rpc_ping)
        p2p.add_unary_handler("dht.store", self._rpc_store)
        p2p.add_unary_handler("dht.find", self._rpc_find)

    @classmethod
    async def create(cls, initial_peers: Sequence[str | PeerAddress] = (), *, p2p: P2P | None = None,
                     host: str = "0.0.0.0", port: int = 0, identity: Identity | None = None,
                     identity_path: str | None = None, client_mode: bool = False, p2p_limits: Limits | None = None,
                     ensure_bootstrap_success: bool = True, announce: Sequence[str] | None = None,
                     nat: NatOptions | None = None, **kwargs: Any) -> "DHTNode":
        """Start a node (and its P2P peer unless ``p2p`` is given) and join via ``initial_peers``.
        ``announce``: the addresses told to others instead of the listening ones (port forwarding).
        ``nat``: check reachability after joining, use relays, punch holes (:mod:`dht.peer.nat`; default:
        no check, but the node helps others check theirs and relays for them); a peer found behind NAT
        or firewalled switches to client mode.

        Raises PeerUnreachableError naming every initial peer that failed if none could be reached
        (with ``ensure_bootstrap_success``, the default)."""
        if p2p is None:
            p2p = await P2P.create(host=host, port=port, identity=identity, identity_path=identity_path,
                                   client_mode=client_mode, limits=p2p_limits,
                                   announce=None if announce is None else list(announce))
        node = cls(p2p, client_mode=client_mode, **kwargs)
        try:
            await node.bootstrap(initial_peers, ensure_success=ensure_bootstrap_success)
            service = p2p.nat if isinstance(p2p.nat, NatService) else NatService(p2p, nat or NatOptions(check=False))
            service.on_unreachable.append(node._become_client)
            await service.start(helpers=node._nat_helpers)
        except BaseException:
            await node.shutdown()
            raise
        node._background = [asyncio.ensure_future(node._refresh_loop()), asyncio.ensure_future(node._republish_loop()),
                            asyncio.ensure_future(node._forget_loop())]
        return node

    # ---- joining ---------------------------------------------------------------------------
    async def bootstrap(self, initial_peers: Sequence[str | PeerAddress], ensure_success: bool = True) -> None:
        """Contact ``initial_peers``, then look up our own id to fill the routing table."""
        from .peer.errors import PeerUnreachableError

        failures = []

        async def contact(address: str | PeerAddress) -> None:
            try:
                address = PeerAddress.parse(address) if isinstance(address, str) else address
                peer_id = await asyncio.wait_for(self.p2p.connect(address), self.rpc_timeout * 2)
                if not await self.ping(peer_id):
                    raise P2PError("no answer to the DHT ping")
            except (P2PError, ValueError) as e:
                failures.append(f"{address}: {str(e) or type(e).__name__}")
            except asyncio.TimeoutError:  # it accepted TCP (a refused dial fails at once) but never answered
                failures.append(f"{address}: timed out after {self.rpc_timeout * 2:g} s waiting for the handshake "
                                "(is this a swarm peer? is the port right?)")

        await asyncio.gather(*(contact(a) for a in initial_peers))
        if initial_peers and failures and len(failures) == len(initial_peers) and ensure_success:
            raise PeerUnreachableError("could not join the DHT: no initial peer answered: " + "; ".join(failures))
        for failure in failures:
            logger.warning("initial peer %s", failure)
        if len(self.routing_table):
            await self.find_nearest_nodes(self.node_id)
            await self._refresh_buckets(max_buckets=4)

    def _become_client(self, _reachability: Any) -> None:
        """Found unreachable: outbound-only from now on (not announced as a server, not routed to)."""
        if not self.client_mode:
            logger.info("switching to client mode: other peers cannot dial this one directly")
            self.client_mode = True

    def _nat_helpers(self) -> list[PeerID]:
        """Peers to ask for a dial-back: connected ones first, then routing-table servers."""
        connected = self.p2p.connected_peers()
        seen = set(connected)
        return [*connected, *(p for p in self.routing_table.all_peers() if p not in seen)][:16]

    # ---- RPC client side -------------------------------------------------------------------
    @property
    def _serving(self) -> bool:
        """What our messages say in ``server``: whether we accept inbound calls."""
        return not self.client_mode

    def _excluded(self, peer_id: PeerID) -> bool:
        until = self._backoff.get(peer_id, (0.0, 0))[0]
        return until > _loop_time()

    def _on_failure(self, peer_id: PeerID, error: BaseException) -> None:
        logger.debug("DHT peer %s failed: %s", peer_id.short(), error)
        self.routing_table.remove(peer_id)
        _, failures = self._backoff.get(peer_id, (0.0, 0))
        self._backoff[peer_id] = (_loop_time() + min(5.0 * 2 ** failures, 300.0), failures + 1)

    def _on_success(self, peer_id: PeerID, server: bool) -> None:
        """A call of ours to ``peer_id`` was answered (``server``: it says it accepts calls)."""
        self._backoff.pop(peer_id, None)
        if not server:
            return
        if peer_id in self.routing_table:
            self.routing_table.add_or_update(peer_id)
        elif self.p2p.dialed_address(peer_id) is not None:
            self._add_contact(peer_id)  # we dialled it ourselves and it answered: admitted
        else:  # it answered over a connection it opened: check that it can be dialled first
            self._dial_backs.request(peer_id, self._prefix(self.p2p.observed_host(peer_id)))

    def _on_inbound_call(self, ctx: CallContext, server: bool) -> None:
        """``ctx.peer_id`` called us. A caller claiming to be a server enters the routing table only
        after a dial-back (:meth:`_verify`); callers from a prefix whose table slots are all taken
        are not even dialled back."""
        peer_id = ctx.peer_id
        if not server:
            return
        if peer_id in self.routing_table:
            self.routing_table.add_or_update(peer_id)
            return
        if self.p2p.dialed_address(peer_id) is not None:
            self._add_contact(peer_id)  # we reached it at an address of its own before
            return
        source = self._source(ctx)
        if source is not None and not self.routing_table.knows(peer_id) and \
                not self.routing_table.admits(DHTID.of_peer(peer_id), source):
            return
        self._dial_backs.request(peer_id, source)

    def _source(self, ctx: CallContext) -> str | None:
        """The IP prefix a call comes from, as observed on its connection (None: not an IP, or an
        exempt local one); memoized per endpoint."""
        host = getattr(ctx, "remote_host", None)
        if host is not None:
            return self._prefix(host)
        endpoint = ctx.endpoint
        try:
            return self._sources[endpoint]
        except KeyError:
            if len(self._sources) >= 4096:
                self._sources.clear()
            source = self._sources[endpoint] = self._prefix(host_of(endpoint) or self.p2p.observed_host(ctx.peer_id))
            return source

    def _prefix(self, host: str | None) -> str | None:
        if host is None:
            return None
        try:
            return self._prefixes[host]
        except KeyError:
            if len(self._prefixes) >= 4096:
                self._prefixes.clear()
            prefix = self._prefixes[host] = prefix_of(host, self.limits.diversity_for_local_addresses)
            return prefix

    def _lookup_group(self, peer_id: PeerID) -> str | None:
        """The prefix of the address a lookup would dial ``peer_id`` at (diversity within lookups)."""
        address = self.p2p.best_address(peer_id)
        return self._prefix(address.host) if address is not None and address.protocol in ("ip4", "ip6") else None

    def _group(self, peer_id: PeerID) -> str | None:
        """The IP prefix a peer's table slot is charged to: where we reached it (dial or dial-back)."""
        address = self.p2p.dialed_address(peer_id)
        if address is not None and address.protocol in ("ip4", "ip6"):
            return self._prefix(address.host)
        return self._prefix(self.p2p.observed_host(peer_id))

    async def _verify(self, peer_id: PeerID) -> bool:
        """Dial-back of a caller: a fresh connection to one of the addresses it announced must reach it
        (its handshake answers as the same PeerID), unless we dialled it before."""
        if not self.is_alive:
            return False
        return self.p2p.dialed_address(peer_id) is not None or \
            await self.p2p.dial_back(peer_id, self.rpc_timeout) is not None

    def _admit_verified(self, peer_id: PeerID) -> None:
        if self.is_alive:
            self._add_contact(peer_id)

    def _add_contact(self, peer_id: PeerID) -> None:
        """Put a verified server in the routing table (diversity limits permitting); a newcomer gets
        the records it is now responsible for (queued, see :meth:`_handover_loop`)."""
        is_new = peer_id not in self.routing_table
        stale = self.routing_table.add_or_update(peer_id, group=self._group(peer_id))
        if stale is not None:
            if stale not in self._stale_checks:  # one ping per stale node at a time, however many knock
                self._stale_checks.add(stale)
                self._spawn(self._check_stale(stale))
        elif is_new and peer_id in self.routing_table and len(self.storage):
            self._queue_handover(peer_id)

    async def _call(self, peer_id: PeerID, method: str, request: dict) -> Any:
        self.rpcs_sent += 1
        try:
            response = await self.p2p.call(peer_id, method, request, timeout=self.rpc_timeout)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            if not (isinstance(e, RemoteError) and e.code == ErrorCode.OVERLOADED):  # busy is not dead
                self._on_failure(peer_id, e)
            raise
        return response

    async def ping(self, peer_id: PeerID) -> bool:
        """Ping over the DHT protocol (adds a server peer to the routing table, checks its clock)."""
        sent = self.clock()
        try:
            response = await self._call(peer_id, "dht.ping", ping_request(self._serving, sent))
            server, their_time = parse_ping_response(response)
        except (P2PError, asyncio.TimeoutError):  # (a malformed answer: ProtocolError, a P2PError)
            return False
        if their_time is not None:
            skew = their_time - (sent + self.clock()) / 2
            if abs(skew) > MAX_CLOCK_SKEW and peer_id not in self._skew_warned:
                self._skew_warned[peer_id] = True
                logger.warning("the clock of peer %s is %.1f s off ours: expirations will be inaccurate; "
                               "check that NTP is running (here or there)", peer_id, skew)
        self._on_success(peer_id, server)
        return True

    async def _check_stale(self, peer_id: PeerID) -> None:
        try:
            if not await self.ping(peer_id):
                self.routing_table.remove(peer_id)  # its bucket's newest replacement takes its place
        finally:
            self._stale_checks.discard(peer_id)

    async def _find(self, peer_id: PeerID, key_ids: list[int],
                    k: int | None = None) -> list[tuple[Entry | None, list[tuple[PeerID, int]]]] | None:
        """One dht.find RPC asking for ``k`` contacts per key (default: bucket size; at most
        MAX_FIND_CONTACTS); None if the peer failed. Learns the contacts' addresses."""
        try:
            response = await self._call(peer_id, "dht.find", find_request(
                self._serving, [DHTID(key).to_bytes20() for key in key_ids], min(k or self.k, MAX_FIND_CONTACTS)))
        except (P2PError, asyncio.TimeoutError):
            return None  # _call recorded the failure
        try:
            results = parse_find_response(response, len(key_ids))
        except P2PError as e:
            self._on_failure(peer_id, e)
            return None
        self._on_success(peer_id, True)
        return [(entry, self._learn(peers)) for entry, peers in results]

    def _learn(self, peers: list[tuple[PeerID, list[str]]]) -> list[tuple[PeerID, int]]:
        """Remember where the contacts of a reply listen; returns them as (peer, node id), ours left out."""
        contacts: list[tuple[PeerID, int]] = []
        for contact, addresses in peers:
            if contact == self.peer_id:
                continue
            try:
                self.p2p.add_addresses(contact, addresses, third_party=True)
            except ValueError as e:  # a malformed address in a peer's reply
                _dropped_log.log(logger, logging.DEBUG, "bad contact", "skipped contact %s: %s", contact.short(),
                                 str(e)[:200])
                continue
            contacts.append((contact, DHTID.of_peer(contact)))
        return contacts

    def _initial_contacts(self, target: int, k: int | None = None) -> list[tuple[PeerID, int]]:
        """The ``k`` (default: bucket size) known contacts nearest ``target`` that are not backed off."""
        k = k or self.k
        contacts: list[tuple[PeerID, int]] = [(p, i) for p, i in self.routing_table.nearest(target, k * 2)
                                              if not self._excluded(p)]
        return contacts[:k]

    async def find_nearest_nodes(self, target: int, k: int | None = None) -> list[tuple[PeerID, int]]:
        """The ``k`` (default: bucket size) responsive nodes closest to ``target``, closest first
        (fewer if the lookup found fewer, or ran into ``limits.max_lookup_queries``). With ``k`` above
        the bucket size the lookup starts from ``k`` contacts and asks each node for ``k`` (at most
        MAX_FIND_CONTACTS), so it can find more nodes than one bucket holds."""
        k = max(k or self.k, 1)

        async def query(peer_id: PeerID):
            found = await self._find(peer_id, [target], k=max(k, self.k))
            return None if found is None else found[0][1]

        return (await self._lookup(target, self._initial_contacts(target, max(k, self.k)), query, k)).nearest

    async def _lookup(self, target: int, initial: list[tuple[PeerID, int]], query: Query, k: int,
                      done: Callable[[], bool] = lambda: False) -> LookupResult:
        """An iterative lookup from this node (alpha queries in flight, the per-prefix diversity and
        query limits of ``self.limits``); kept as :attr:`last_lookup`."""
        result = await iterative_lookup(target, initial, query, k=k, alpha=self.alpha, done=done, exclude=self.peer_id,
                                        group_of=self._lookup_group,
                                        max_per_group=self.limits.max_lookup_peers_per_prefix,
                                        max_queries=self.limits.max_lookup_queries)
        self.last_lookup = result
        return result

    # ---- store -----------------------------------------------------------------------------
    async def store(self, key: Any, value: Any, expiration_time: float, subkey: Any = None) -> bool:
        """Store ``value`` under ``key`` (and ``subkey``) until ``expiration_time`` (DHT time).

        True if at least one replica accepted it. Raises ValidationError (a ValueError) if a local
        validator rejects the record (e.g. schema violation, or a key owned by someone else)."""
        return (await self.store_many([(key, value, expiration_time, subkey)]))[0]

    async def store_many(self, items: Sequence[tuple[Any, Any, float, Any]]) -> list[bool]:
        """Store many ``(key, value, expiration_time, subkey)`` at once: one lookup per distinct key,
        then one batched dht.store per replica node. Returns one bool per item."""
        prepared: list[tuple[int, StoreItem]] = []
        for key, value, expiration_time, subkey in items:
            if not (isinstance(expiration_time, (int, float)) and math.isfinite(expiration_time)):
                raise ValueError(f"expiration_time must be a finite number, got {expiration_time!r}")
            record = DHTRecord(_pack(key), None if subkey is None else _pack(subkey), _pack(value),
                               float(expiration_time))
            signed = self.validator.sign_value(record)
            record = DHTRecord(record.key, record.subkey, signed, record.expiration_time)
            self.validator.validate(record)  # ValidationError: the caller's mistake, said clearly
            if len(signed) > self.limits.max_value_size:
                raise ValueError(f"value of {len(signed)} bytes exceeds the DHT limit of "
                                 f"{self.limits.max_value_size} bytes")
            prepared.append((DHTID.of_key(record.key), StoreItem(record.key, record.subkey, signed,
                                                                record.expiration_time, False)))
        return await self._store_prepared(prepared)

    def _request_budget(self) -> int:
        """Bytes of items one dht.store request may carry: half the P2P message limit (the rest of
        the request and msgpack framing fit in the other half)."""
        limits = self.p2p.limits
        return min(limits.max_message_size, getattr(limits, "stream_memory", limits.max_message_size)) // 2

    @staticmethod
    def _item_size(item: StoreItem) -> int:
        return len(item.key) + len(item.subkey or b"") + len(item.value) + 32

    async def _store_prepared(self, prepared: list[tuple[int, StoreItem]], exclude: PeerID | None = None) -> list[bool]:
        key_ids = sorted({key_id for key_id, _ in prepared})
        budget = self._request_budget()
        if len(key_ids) == 1 and exclude is None and len(prepared) <= self.limits.max_items_per_store and \
                sum(self._item_size(item) for _, item in prepared) <= budget:
            return await self._store_while_looking_up(key_ids[0], prepared)
        nearest: dict[int, list[tuple[PeerID, int]]] = {}
        semaphore = asyncio.Semaphore(64)

        async def locate(key_id: int) -> None:
            async with semaphore:
                nearest[key_id] = await self.find_nearest_nodes(key_id, self.num_replicas)

        await asyncio.gather(*(locate(key_id) for key_id in key_ids))
        now = self.clock()
        outcome = [False] * len(prepared)
        per_peer: dict[PeerID, list[int]] = {}
        for index, (key_id, item) in enumerate(prepared):
            replicas = [(p, node_id) for p, node_id in nearest[key_id] if p != exclude]
            if not self.client_mode:
                replicas.append((self.peer_id, self.node_id))
                replicas.sort(key=lambda r: r[1] ^ key_id)
            for peer_id, _ in replicas[:self.num_replicas]:
                if peer_id == self.peer_id:
                    outcome[index] |= self._store_locally(key_id, item, now, origin=self.peer_id) is True
                else:
                    per_peer.setdefault(peer_id, []).append(index)

        def chunks(indices: list[int]) -> Iterable[list[int]]:
            """``indices`` in requests of at most ``max_items_per_store`` items and ``budget`` bytes."""
            chunk: list[int] = []
            size = 0
            for i in indices:
                item_size = self._item_size(prepared[i][1])
                if chunk and (len(chunk) >= self.limits.max_items_per_store or size + item_size > budget):
                    yield chunk
                    chunk, size = [], 0
                chunk.append(i)
                size += item_size
            if chunk:
                yield chunk

        async def send(peer_id: PeerID, indices: list[int]) -> None:
            for chunk in chunks(indices):
                request = store_request(self._serving, [prepared[i][1] for i in chunk])
                try:
                    answers = parse_store_response(await self._call(peer_id, "dht.store", request), len(chunk))
                except (P2PError, asyncio.TimeoutError):  # _call logged it; these items count as not stored there
                    return
                for i, answer in zip(chunk, answers):
                    outcome[i] |= answer is True

        await asyncio.gather(*(send(p, idx) for p, idx in per_peer.items()))
        return outcome

    async def _store_while_looking_up(self, key_id: int, prepared: list[tuple[int, StoreItem]]) -> list[bool]:
        """Store items of one key on the ``num_replicas`` nodes closest to it, with the store RPCs as the
        queries of the iterative lookup (each reply also names the replier's contacts near the key):
        with a good routing table the first candidates are the closest nodes already, so a store costs
        about ``num_replicas`` RPCs instead of a lookup's and as many stores again. Nodes the lookup
        queried beyond the closest ones keep a spare replica."""
        outcome = [False] * len(prepared)
        request = store_request(self._serving, [item for _, item in prepared], near=STORE_NEAR)

        async def query(peer_id: PeerID) -> list[tuple[PeerID, int]] | None:
            try:
                response = await self._call(peer_id, "dht.store", request)
            except (P2PError, asyncio.TimeoutError):
                return None  # _call recorded the failure
            try:
                answers = parse_store_response(response, len(prepared))
                contacts = parse_store_contacts(response)
            except P2PError as e:
                self._on_failure(peer_id, e)
                return None
            self._on_success(peer_id, True)
            for i, answer in enumerate(answers):
                outcome[i] |= answer is True
            return self._learn(contacts)

        nearest = (await self._lookup(key_id, self._initial_contacts(key_id), query, self.num_replicas)).nearest
        if not self.client_mode and (len(nearest) < self.num_replicas or
                                     self.node_id ^ key_id < nearest[-1][1] ^ key_id):
            now = self.clock()
            for i, (_, item) in enumerate(prepared):
                outcome[i] |= self._store_locally(key_id, item, now, origin=self.peer_id) is True
        return outcome

    def _is_foreign(self, key_id: int) -> bool:
        """Whether ``num_replicas`` known peers are closer to ``key_id`` than we are (storage evicts such
        keys first when full: their closest nodes hold them)."""
        nearest = self.routing_table.nearest(key_id, self.num_replicas)
        return len(nearest) >= self.num_replicas and self.node_id ^ key_id > nearest[-1][1] ^ key_id

    def set_store_filter(self, prefix: str, refuse: Callable[[PeerID], bool] | None) -> None:
        """Refuse stores of keys that start with ``prefix`` (string keys) from every peer for which
        ``refuse(peer_id)`` is true: the calling peer, and the owner of a signed (``[owner:...]``)
        record (e.g. a run's ban list: ``node.set_store_filter(run_id, banlist.is_banned)``). None
        removes the filter. ``refuse`` runs on the event loop for every such store: keep it cheap.
        Stores by this node itself are never refused."""
        if refuse is None:
            self._store_filters.pop(prefix, None)
        else:
            self._store_filters[prefix] = refuse

    def _filtered(self, item: StoreItem, origin: Any) -> str | None:
        """Why a store filter refuses ``item`` from ``origin`` (None: it does not)."""
        try:
            key = msgpack.unpackb(item.key, raw=False)
        except Exception:  # noqa: BLE001 - not a msgpack key: no string prefix to match
            return None
        if not isinstance(key, str):
            return None
        for prefix, refuse in list(self._store_filters.items()):
            if not key.startswith(prefix):
                continue
            peers = [origin] if isinstance(origin, PeerID) and origin != self.peer_id else []
            for owner in SignatureValidator.owners(DHTRecord(item.key, item.subkey, item.value, item.expiration_time)):
                try:
                    peers.append(PeerID.from_public_key(owner))
                except ValueError:
                    pass
            try:
                if any(refuse(peer) for peer in peers if peer != self.peer_id):
                    return f"stores under {prefix!r} from this peer are refused (banned)"
            except Exception as e:  # noqa: BLE001 - a failing filter refuses nothing, and says so
                logger.warning("store filter for %r failed: %s: %s", prefix, type(e).__name__, e)
        return None

    def _store_locally(self, key_id: int, item: StoreItem, now: float, origin: Any,
                       source: str | None = None) -> bool | str:
        """Validate and store one incoming item; True, False (older than ours) or a refusal reason.
        ``origin``: the storing peer, ``source``: its address range (per-peer and per-range budgets)."""
        if self._store_filters:
            refused = self._filtered(item, origin)
            if refused is not None:
                return refused
        if len(item.value) > self.limits.max_value_size:
            return f"value of {len(item.value)} bytes exceeds the limit of {self.limits.max_value_size}"
        if item.expiration_time > now + self.limits.max_ttl:
            return f"expiration is more than {self.limits.max_ttl:.0f} s in the future"
        if item.expiration_time <= now:
            return "already expired"
        try:
            self.validator.validate(DHTRecord(item.key, item.subkey, item.value, item.expiration_time))
        except ValidationError as e:
            return f"invalid record: {e}"
        target = self.cache if item.in_cache else self.storage
        try:
            return target.store(key_id, item.key, item.subkey, item.value, item.expiration_time, now, origin, source)
        except StoreRefused as e:
            return str(e)

    # ---- get -------------------------------------------------------------------------------
    async def get(self, key: Any, latest: bool = False) -> ValueWithExpiration | None:
        """The value under ``key`` (None if absent or expired). For a dictionary key, ``.value`` maps
        each subkey to a ValueWithExpiration. ``latest=True`` asks all k closest nodes and merges."""
        return (await self.get_many([key], latest=latest))[key]

    async def get_many(self, keys: Sequence[Any], latest: bool = False) -> dict[Any, ValueWithExpiration | None]:
        """Get several keys at once (lookups run concurrently)."""
        results = await asyncio.gather(*(self._get_one(_pack(key), latest) for key in keys))
        return dict(zip(keys, results))

    async def _get_one(self, key_bytes: bytes, latest: bool) -> ValueWithExpiration | None:
        key_id = DHTID.of_key(key_bytes)
        now = self.clock()
        best: Entry | None = None
        cached = self.cache.get(key_id, now)
        if cached is not None:
            self.cache.touch(key_id)  # least recently used goes first
        for local in (self.storage.get(key_id, now), cached):
            best = self._merge(best, local, key_bytes)
        lacking: list[tuple[int, PeerID]] = []  # (distance, peer) of nodes on the path without the value
        if best is None or latest:
            found_any = best is not None

            async def query(peer_id: PeerID):
                nonlocal best, found_any
                found = await self._find(peer_id, [key_id])
                if found is None:
                    return None
                entry, contacts = found[0]
                if entry is None:
                    lacking.append((DHTID.of_peer(peer_id) ^ key_id, peer_id))
                best = self._merge(best, entry, key_bytes)
                found_any = best is not None
                return contacts

            await self._lookup(key_id, self._initial_contacts(key_id), query, self.k,
                               done=lambda: found_any and not latest)
            if best is not None and lacking:
                self._spawn(self._cache_at(min(lacking)[1], key_id, best))
        if best is None:
            return None
        if best.regular is not None:  # dictionaries grow across peers: a cached copy would hide new subkeys
            try:
                self.cache.store(key_id, key_bytes, None, *best.regular, now, origin=None)
            except StoreRefused as e:  # larger than the cache, or a plain value under signed subkeys
                logger.debug("not cached: %s", e)
        return self._to_user_value(best)

    def _merge(self, best: Entry | None, entry: Entry | None, key_bytes: bytes) -> Entry | None:
        """Merge a (validated) entry into the best so far: the newest version of each subkey wins; a
        regular value wins over a dictionary only if newer than every subkey and if the dictionary has
        no signed subkey (so a replica's fake "newer" value cannot hide signed subkeys)."""
        if entry is None:
            return best
        now = self.clock()
        if entry.key_bytes != key_bytes:
            return best
        valid = Entry(key_bytes)
        if entry.regular is not None:
            if self._valid(key_bytes, None, *entry.regular, now):
                valid.regular = entry.regular
        for subkey, (value, exp) in entry.subkeys.items():
            if self._valid(key_bytes, subkey, value, exp, now):
                valid.subkeys[subkey] = (value, exp)
        if valid.empty:
            return best
        if best is None:
            return valid
        if valid.regular is not None or best.regular is not None:
            if valid.has_signed_subkeys:
                return valid
            if best.has_signed_subkeys:
                return best
            return valid if valid.expiration_time > best.expiration_time else best
        merged = Entry(key_bytes, subkeys=dict(best.subkeys))
        for subkey, (value, exp) in valid.subkeys.items():
            if subkey not in merged.subkeys or exp > merged.subkeys[subkey][1]:
                merged.subkeys[subkey] = (value, exp)
        return merged

    def _valid(self, key: bytes, subkey: bytes | None, value: bytes, exp: float, now: float) -> bool:
        if exp <= now:
            return False
        try:
            self.validator.validate(DHTRecord(key, subkey, value, exp))
            return True
        except ValidationError as e:
            _dropped_log.log(logger, logging.INFO, "invalid record", "dropped an invalid record returned by a peer: %s",
                             str(e)[:300])
            return False

    def _to_user_value(self, entry: Entry) -> ValueWithExpiration | None:
        def decode(subkey: bytes | None, value: bytes, exp: float) -> Any:
            return _unpack(self.validator.strip_value(DHTRecord(entry.key_bytes, subkey, value, exp)))

        undecodable = (ValueError, TypeError, msgpack.UnpackException)
        if entry.regular is not None:
            value, exp = entry.regular
            try:
                return ValueWithExpiration(decode(None, value, exp), exp)
            except undecodable as e:
                logger.info("dropped an undecodable value (%s)", type(e).__name__)
                return None
        # each subkey on its own: one peer's garbage subkey must not hide the others' (signed) ones
        subkeys, dropped = {}, 0
        for s, (v, exp) in entry.subkeys.items():
            try:
                subkeys[_unpack(s)] = ValueWithExpiration(decode(s, v, exp), exp)
            except undecodable:
                dropped += 1
        if dropped:
            logger.info("dropped %d undecodable subkeys", dropped)
        if not subkeys:
            return None
        return ValueWithExpiration(subkeys, max(item.expiration_time for item in subkeys.values()))

    async def _cache_at(self, peer_id: PeerID, key_id: int, entry: Entry) -> None:
        """Store ``entry`` (found by a lookup for ``key_id``) in the cache of ``peer_id``, as much of it as
        one request carries; a failure only costs the cached copy."""
        items = [StoreItem(entry.key_bytes, None, *entry.regular, True)] if entry.regular else \
            [StoreItem(entry.key_bytes, s, v, e, True) for s, (v, e) in entry.subkeys.items()]
        budget, size = min(self.limits.max_find_reply_bytes, self._request_budget()), 0  # within the message limit
        for count, item in enumerate(items):
            size += self._item_size(item)
            if size > budget:
                items = items[:count]
                break
        try:
            items = items[:self.limits.max_items_per_store]
            response = await self._call(peer_id, "dht.store", store_request(self._serving, items))
            parse_store_response(response, len(items))
        except (P2PError, asyncio.TimeoutError) as e:
            logger.debug("caching key %s at %s failed: %s", DHTID(key_id), peer_id.short(), e)

    # ---- RPC server side -------------------------------------------------------------------
    async def _rpc_ping(self, request: Any, ctx: CallContext) -> dict:
        server, _ = parse_ping(request)
        self._on_inbound_call(ctx, server)
        return ping_response(self._serving, self.clock())

    async def _rpc_store(self, request: Any, ctx: CallContext) -> dict:
        server, items = parse_store(request, self.limits)
        near = parse_store_near(request)  # (all checked before anything is stored)
        now = self.clock()
        bucket = self._buckets.get(ctx.peer_id)
        if bucket is None:  # (a bounded LRU: _buckets)
            bucket = self._buckets[ctx.peer_id] = TokenBucket(self.limits.store_rate, self.limits.store_burst,
                                                              _loop_time())
        allowed = bucket.take_up_to(len(items), _loop_time())
        answers: list[bool | str] = []
        # storage budgets count every address range, loopback and private ones included
        source = prefix_of(getattr(ctx, "remote_host", None) or host_of(ctx.endpoint), local_too=True)
        for index, item in enumerate(items):
            if index >= allowed:
                answers.append("rate limit: too many stores from this peer, retry later")
                continue
            if index and index % 256 == 0:  # a full request takes ~0.2 s: others get served in between
                await asyncio.sleep(0)
            answers.append(self._store_locally(DHTID.of_key(item.key), item, now, origin=ctx.peer_id, source=source))
        self._on_inbound_call(ctx, server)
        if near is not None and items:
            return store_response(answers, self._contacts_near(DHTID.of_key(items[0].key), near, ctx.peer_id))
        return store_response(answers)

    def _contacts_near(self, key_id: int, k: int, exclude: PeerID) -> list[tuple[PeerID, list[str]]]:
        """The ``k`` contacts nearest to ``key_id`` and their addresses (``exclude``: the asker)."""
        return [(p, self.p2p.get_address_texts(p)) for p, _ in self.routing_table.nearest(key_id, k, exclude=exclude)]

    async def _rpc_find(self, request: Any, ctx: CallContext) -> dict:
        server, keys, k = parse_find(request, self.limits)
        self._charge_finds(ctx, len(keys))
        now = self.clock()
        results: list[tuple[list | None, list[tuple[PeerID, list[str]]]]] = []
        # the reply stays far below the message limit whatever we hold: contacts and entries share a
        # byte budget (a dictionary sends its smallest subkeys first, see protocol.encode_entry_within)
        budget = min(self.limits.max_find_reply_bytes, self._request_budget())
        for raw in keys:
            key_id = DHTID.from_bytes20(raw)
            contacts = self._contacts_near(key_id, k, ctx.peer_id)
            budget -= sum(40 + sum(len(a) + 3 for a in addresses) for _, addresses in contacts)
            if budget < 0:
                results.append((None, []))  # (only with hostile address books or k x 512 keys)
                continue
            entry = self.storage.get(key_id, now) or self.cache.get(key_id, now)
            encoded, used = encode_entry_within(entry, budget)
            budget -= used
            results.append((encoded, contacts))
        self._on_inbound_call(ctx, server)
        return find_response(results)

    # ---- maintenance -----------------------------------------------------------------------
    def _charge_finds(self, ctx: CallContext, num_keys: int) -> None:
        """Per-peer and per-prefix token buckets of looked-up keys; OverloadedError when spent."""
        now = asyncio.get_running_loop().time()
        cost = max(num_keys, 1)
        if not self._find_rates.take(ctx.peer_id, cost, now):
            raise OverloadedError(f"too many lookups from this peer (limit {self.limits.find_rate:g} keys/s)")
        source = self._source(ctx)
        if source is not None and not self._find_rates_per_prefix.take(source, cost, now):
            raise OverloadedError(f"too many lookups from {source} (limit {self.limits.find_rate_per_prefix:g} keys/s)")

    def _queue_handover(self, newcomer: PeerID) -> None:
        if newcomer in self._handovers or len(self._handovers) >= self.limits.max_queued_handovers:
            return  # a skipped newcomer gets its records at the next republish
        self._handovers[newcomer] = self.clock()  # records stored from then on went through lookups that saw it
        if not self._handover_running:
            self._handover_running = True
            self._spawn(self._handover_loop())

    async def _handover_loop(self) -> None:
        """Hand records to queued newcomers one at a time, at most ``handover_rate`` per second."""
        loop = asyncio.get_running_loop()
        rate = max(self.limits.handover_rate, 1e-3)
        if self._handover_bucket is None:
            self._handover_bucket = TokenBucket(rate, max(self.limits.handover_burst, 1.0), loop.time())
        try:
            while self._handovers and self.is_alive:
                while not self._handover_bucket.take(1.0, loop.time()):
                    await asyncio.sleep(1.0 / rate)
                newcomer, admitted_at = self._handovers.popitem(last=False)
                if newcomer in self.routing_table:
                    await self._hand_over_records(newcomer, admitted_at)
        finally:
            self._handover_running = False

    async def _hand_over_records(self, newcomer: PeerID, admitted_at: float = float("inf")) -> None:
        """Give a new neighbour the records it is now among the ``num_replicas`` closest nodes for (one
        request: at most ``max_items_per_store`` items within the request byte budget), of those stored
        before ``admitted_at`` (later stores looked the newcomer up themselves, with a wider view). Scans
        ``handover_chunk`` records between yields to the event loop, with an O(log n) test per record
        (:meth:`RoutingTable.among_nearest`)."""
        now = self.clock()
        among = self.routing_table.among_nearest(DHTID.of_peer(newcomer), self.num_replicas, exclude=newcomer)
        chunk = max(self.limits.handover_chunk, 1)
        budget, size = self._request_budget(), 0
        items: list[StoreItem] = []
        for scanned, (key_id, entry) in enumerate(self.storage.items(now), 1):
            if scanned % chunk == 0:
                await asyncio.sleep(0)
                if newcomer not in self.routing_table or not self.is_alive:
                    return
            if not among(key_id) or self.storage.stored_at.get(key_id, now) >= admitted_at:
                continue
            records = [(None, *entry.regular)] if entry.regular is not None else \
                [(s, v, e) for s, (v, e) in entry.subkeys.items()]
            for subkey, value, expiration in records:
                size += len(entry.key_bytes) + len(subkey or b"") + len(value) + 32
                if size > budget or len(items) >= self.limits.max_items_per_store:
                    break
                items.append(StoreItem(entry.key_bytes, subkey, value, expiration, False))
            if size > budget or len(items) >= self.limits.max_items_per_store:
                break
        if items:
            try:
                parse_store_response(await self._call(newcomer, "dht.store", store_request(self._serving, items)),
                                     len(items))
            except (P2PError, asyncio.TimeoutError) as e:  # its next republish or lookup fills the gap
                logger.debug("handing %d records to %s failed: %s", len(items), newcomer.short(), e)

    def forget_departed(self) -> int:
        """Drop the bookkeeping of peers that are neither connected nor in the routing table (nor a
        spare): addresses not mentioned for ``limits.forget_after`` seconds, refilled rate buckets,
        expired backoffs and dial-back failures, clock warnings. Returns how many peers' addresses
        went. Runs every ``forget_after / 2`` seconds (at most 30 s) in nodes made by :meth:`create`."""
        table = self.routing_table

        def keep(peer_id: PeerID) -> bool:
            return table.knows(peer_id) or self.p2p.is_connected(peer_id)

        forgotten = self.p2p.forget_peers(table.knows, self.limits.forget_after)
        now = _loop_time()  # backoffs, buckets and dial-backs all run on the loop's clock
        for peer_id, bucket in self._buckets.items():
            refilled = bucket.tokens + (now - bucket.updated) * bucket.rate >= bucket.burst
            if refilled and not keep(peer_id):
                self._buckets.pop(peer_id)
        for peer_id, (until, _) in self._backoff.items():
            if until + 300.0 < now and not table.knows(peer_id):
                self._backoff.pop(peer_id)
        for peer_id in self._skew_warned.keys():
            if not keep(peer_id):
                self._skew_warned.pop(peer_id)
        for rates in (self._find_rates, self._find_rates_per_prefix):
            rates.forget_refilled(now)
        self._dial_backs.forget_expired()
        return forgotten

    async def _forget_loop(self) -> None:
        interval = min(max(self.limits.forget_after / 2, 0.05), 30.0)
        while self.is_alive:
            await asyncio.sleep(interval)
            try:
                self.forget_departed()
            except Exception:
                logger.exception("forgetting departed peers failed")

    async def _refresh_buckets(self, max_buckets: int = 8) -> None:
        buckets = [b for b in self.routing_table.buckets if not b.covers(self.node_id)]
        self.rng.shuffle(buckets)
        await asyncio.gather(*(self.find_nearest_nodes(DHTID.random(self.rng, b.lower, b.upper))
                               for b in buckets[:max_buckets]), return_exceptions=True)

    async def _refresh_loop(self) -> None:
        while self.is_alive:
            await asyncio.sleep(self.refresh_interval * self.rng.uniform(0.8, 1.2))
            try:
                await self._refresh_buckets()
                if not len(self.routing_table):
                    for peer_id in self.p2p.connected_peers():
                        await self.ping(peer_id)
            except Exception:
                logger.exception("bucket refresh failed")

    async def republish(self) -> int:
        """Store every record this node holds again at the current closest nodes; returns the count."""
        now = self.clock()
        prepared = []
        for key_id, entry in self.storage.items(now):
            if entry.regular is not None:
                prepared.append((key_id, StoreItem(entry.key_bytes, None, *entry.regular, False)))
            else:
                prepared.extend((key_id, StoreItem(entry.key_bytes, s, v, e, False))
                                for s, (v, e) in entry.subkeys.items())
        if prepared:
            await self._store_prepared(prepared)
        return len(prepared)

    async def _republish_loop(self) -> None:
        while self.is_alive:
            await asyncio.sleep(self.republish_interval * self.rng.uniform(0.9, 1.1))
            try:
                await self.republish()
            except Exception:
                logger.exception("republishing failed")

    def _spawn(self, coro: Any) -> None:
        if not self.is_alive:
            coro.close()
            return
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def shutdown(self) -> None:
        """Stop maintenance and shut the P2P peer down."""
        if not self.is_alive:
            return
        self.is_alive = False
        for task in [*self._background, *self._tasks]:
            task.cancel()
        await self._dial_backs.close()
        await asyncio.gather(*self._background, *self._tasks, return_exceptions=True)
        if isinstance(self.p2p.nat, NatService):
            await self.p2p.nat.close()
        await self.p2p.shutdown()
