"""P2P: a peer's RPC endpoint. Every upper layer (DHT, averaging, pipelines) talks through it.

>>> p2p = await P2P.create(host="127.0.0.1")                    # real sockets, encrypted
>>> async def echo(request, ctx): return request
>>> p2p.add_unary_handler("demo.echo", echo)
>>> await other.call(p2p.get_visible_addresses()[0], "demo.echo", {"x": 1}, timeout=5)
{'x': 1}

Calls address a peer by PeerID (dialed through addresses learned before: ``add_addresses``, the
handshake's announcements, or the DHT) or by a full address ``/ip4/.../tcp/.../p2p/...``.
One connection per peer pair is reused by all calls in both directions; a call may stream many
messages each way (``open_stream``). Deadlines (``timeout=`` seconds) reach the other side, and
so does cancellation of the calling task.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Sequence, Union

import msgpack

from .addresses import PeerAddress
from .channel import FrameChannel
from .errors import HandshakeError, P2PError, PeerUnreachableError
from .identity import Identity, PeerID
from .multiplex import GOAWAY, HEADER, Connection, Limits, Stream
from .resources import ResourceManager, ip_key
from .rpc_stats import RpcStats, enabled
from .transport import Transport
from .untrusted import LogLimiter

__all__ = ["P2P", "CallContext", "PeerLike"]

logger = logging.getLogger(__name__)
_refusals = LogLimiter(rate=0.2, burst=5.0)  # log lines about refused connections, per source IP
_GOAWAY_GRACE = 10.0  # seconds a connection may stay open after the peer's GOAWAY before we close it

PeerLike = Union[PeerID, PeerAddress, str]


@dataclass(frozen=True)
class CallContext:
    """What a handler knows about the call it serves."""

    peer_id: PeerID  # authenticated caller
    endpoint: str  # where the caller's connection comes from
    method: str
    deadline: float | None  # event-loop time by which the caller gives up, or None


UnaryHandler = Callable[[Any, CallContext], Awaitable[Any]]
StreamHandler = Callable[[Stream, CallContext], Awaitable[None]]


class P2P:
    """A peer: identity + transport + connection pool + RPC handlers. Create with :meth:`create`."""

    def __init__(self, identity: Identity, transport: Transport, limits: Limits):
        self.identity = identity
        self.peer_id: PeerID = identity.peer_id
        self.limits = limits
        self._transport = transport
        self._handlers: dict[str, tuple[bool, Callable, int | None]] = {}
        self.resources = ResourceManager(limits)  # memory and stream budgets of every connection
        self.stats: RpcStats | None = RpcStats() if enabled() else None  # per-method bytes and call times
        self._connections: dict[PeerID, list[Connection]] = {}
        self._dialing: dict[PeerID, asyncio.Future] = {}
        # address book: peer -> {address: rank} (newest last), least recently used peer first; bounded
        self._address_book: collections.OrderedDict[PeerID, _Book] = collections.OrderedDict()
        self._address_texts: dict[PeerID, list[str]] = {}  # printed form of each book, made on demand
        self._dialed: collections.OrderedDict[PeerID, PeerAddress] = collections.OrderedDict()  # our dials that worked
        self._visible: list[PeerAddress] = []
        self._closed = False
        # every open connection (those past a GOAWAY too) -> (inbound, source IP key or None)
        self._live: dict[Connection, tuple[bool, str | None]] = {}
        self._per_peer: dict[PeerID, int] = {}  # open connections per PeerID, both directions
        self._inbound_per_ip: dict[str, int] = {}  # open inbound connections per observed source IP
        self._num_inbound = 0
        # dials /.../p2p/RELAY/relay/p2p/PEER addresses (set by dht.peer.relay.RelayClient); None: not supported
        self.relay_dialer: Callable[[PeerAddress], Awaitable[FrameChannel]] | None = None
        self.nat: Any = None  # the dht.peer.nat.NatService of this peer, once started (verdict, relays, hole punching)
        self.add_unary_handler("p2p.ping", _ping_handler)

    @classmethod
    async def create(cls, *, host: str = "0.0.0.0", port: int = 0, identity: Identity | None = None,
                     identity_path: str | os.PathLike | None = None, announce: list[str] | None = None,
                     client_mode: bool = False, limits: Limits | None = None,
                     initial_peers: list[str] | tuple[str, ...] = ()) -> "P2P":
        """Start a peer on real sockets. ``identity_path`` loads (or creates, mode 0600) a key file;
        with neither it nor ``identity`` the peer uses an ephemeral key. ``initial_peers`` are dialed
        once (failures are logged, not raised: see :meth:`connect` to insist)."""
        from .tcp_transport import TCPTransport

        if identity is None:
            identity = Identity.load_or_create(identity_path) if identity_path else Identity()
        limits = limits or Limits()
        p2p = cls(identity, TCPTransport(identity, limits, host, port, announce, client_mode), limits)
        await p2p.start()
        for address in initial_peers:
            try:
                await p2p.connect(address)
            except P2PError as e:
                logger.warning("initial peer %s: %s", address, e)
        return p2p

    async def start(self) -> None:
        """Start listening (done by :meth:`create`)."""
        self._visible = await self._transport.listen(self._on_inbound)

    # ---- handlers --------------------------------------------------------------------------
    def add_unary_handler(self, method: str, handler: UnaryHandler, *, max_message_size: int | None = None) -> None:
        """Serve ``method`` with ``async handler(request, ctx) -> response``. ``max_message_size``
        (bytes; default: ``Limits.max_message_size``) refuses a bigger request with ``too_large``
        while it arrives, before it is buffered past the limit."""
        self._handlers[method] = (False, handler, max_message_size)

    def add_stream_handler(self, method: str, handler: StreamHandler, *, max_message_size: int | None = None) -> None:
        """Serve ``method`` with ``async handler(stream, ctx)``: it may recv and send any number of messages.
        ``max_message_size``: as for :meth:`add_unary_handler`, for each message the caller sends."""
        self._handlers[method] = (True, handler, max_message_size)

    def remove_handler(self, method: str) -> None:
        self._handlers.pop(method, None)

    def _dispatch(self, stream: Stream) -> Callable[[], Awaitable[None]]:
        is_stream, handler, max_message_size = self._handlers[stream.method]  # KeyError (a LookupError): unknown
        if max_message_size is not None:
            stream.max_message_size = min(stream.max_message_size, max_message_size)
        ctx = CallContext(stream.peer_id, stream._conn.channel.endpoint, stream.method, stream.deadline)
        if is_stream:
            return functools.partial(handler, stream, ctx)
        return functools.partial(_serve_unary, handler, stream, ctx)

    # ---- calls -----------------------------------------------------------------------------
    async def call(self, peer: PeerLike, method: str, request: Any, *, timeout: float | None = None) -> Any:
        """Unary call: send ``request`` (msgpack-serializable), return the response.

        Raises RemoteError (the handler failed or the method is unknown), DeadlineExceededError,
        PeerUnreachableError, ConnectionLostError or MessageTooLargeError; each names the peer.
        """
        stream = await self.open_stream(peer, method, timeout=timeout)
        try:
            await stream.send(request, end=True)
            return await stream.recv()
        except BaseException:
            stream.cancel()
            raise
        finally:
            await stream.aclose()

    async def open_stream(self, peer: PeerLike, method: str, *, timeout: float | None = None) -> Stream:
        """Open a bidirectional stream to ``method`` at ``peer``; use it as ``async with``."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        conn = self._usable_connection(peer)
        if conn is not None and conn.stream_slot_free:  # the common case: no dial, so no timer task either
            return conn.open_stream(method, timeout)
        if conn is None:
            try:
                conn = await asyncio.wait_for(self._connection_to(peer), timeout)
            except asyncio.TimeoutError:
                raise PeerUnreachableError(f"could not connect to {peer} within {timeout} s") from None
        await conn.wait_for_stream_slot(deadline)  # the other side refuses more concurrent calls from us
        remaining = None if deadline is None else max(deadline - loop.time(), 1e-3)
        return conn.open_stream(method, remaining)

    async def ping(self, peer: PeerLike, timeout: float | None = 5.0) -> float:
        """Round-trip time of a ping to ``peer`` in seconds."""
        start = time.perf_counter()  # not loop.time(): uvloop's clock ticks in whole milliseconds
        await self.call(peer, "p2p.ping", b"", timeout=timeout)
        return time.perf_counter() - start

    async def connect(self, address: PeerAddress | str) -> PeerID:
        """Dial ``address`` (unless connected already) and return the authenticated PeerID there."""
        conn = await self._connection_to(address)
        return conn.peer_id

    # ---- peers and addresses ---------------------------------------------------------------
    def add_addresses(self, peer_id: PeerID, addresses: Sequence[PeerAddress | str], *,
                      third_party: bool = False) -> None:
        """Remember where ``peer_id`` listens. Addresses we dialled successfully are tried first, then
        those the peer announced itself (its handshake) or the local program gave, then those
        ``third_party`` peers told us (e.g. DHT replies; at most 4 per peer), newest first within each
        rank. At most 16 addresses per peer and ``Limits.max_known_peers`` peers are kept (least
        recently used dropped first, connected peers last). ValueError for a malformed address."""
        rank = _THIRD_PARTY if third_party else _ANNOUNCED
        book = self._address_book.get(peer_id)
        if third_party and book is not None and all(a in book.texts for a in addresses):
            book.touched = _now()  # the common case: the DHT relearns known contacts
            self._address_book.move_to_end(peer_id)
            return
        parsed = []
        for address in addresses:
            address = PeerAddress.parse(address) if isinstance(address, str) else address
            if address.peer_id is not None:
                if address.peer_id != peer_id:
                    continue  # an address of some other peer
                address = address.without_peer_id()
            parsed.append(address)
        if book is None:
            if not parsed:
                return
            book = self._address_book[peer_id] = _Book()
            self._trim_address_book()
        else:
            self._address_book.move_to_end(peer_id)
        book.touched = _now()
        if book.add(parsed, rank):
            self._address_texts.pop(peer_id, None)
        texts = [a for a in addresses if isinstance(a, str)]
        if len(texts) == len(addresses) and all(a in book.addresses for a in parsed):
            book.texts.update(texts)

    def get_addresses(self, peer_id: PeerID) -> list[PeerAddress]:
        """Where ``peer_id`` listens, in the order they are dialled (see :meth:`add_addresses`)."""
        book = self._address_book.get(peer_id)
        return [] if book is None else [a.with_peer_id(peer_id) for a, _ in book.ranked()]

    def get_address_texts(self, peer_id: PeerID) -> list[str]:
        """Where ``peer_id`` listens, printed without ``/p2p/...`` (as the DHT tells others; cached):
        third-party addresses only if there is no better one, so hearsay is not passed on."""
        texts = self._address_texts.get(peer_id)
        if texts is None:
            book = self._address_book.get(peer_id)
            ranked = [] if book is None else book.ranked()
            if ranked and ranked[0][1] < _THIRD_PARTY:
                ranked = [(a, r) for a, r in ranked if r < _THIRD_PARTY]
            texts = self._address_texts[peer_id] = [str(a) for a, _ in ranked]
        return texts

    def best_address(self, peer_id: PeerID) -> PeerAddress | None:
        """The address of ``peer_id`` that would be dialled first (without ``/p2p``), or None."""
        book = self._address_book.get(peer_id)
        if not book or not book.addresses:
            return None
        best = min(book.addresses.values())
        return next(a for a in reversed(book.addresses) if book.addresses[a] == best)

    def dialed_address(self, peer_id: PeerID) -> PeerAddress | None:
        """The address at which our latest successful dial (or dial-back) of ``peer_id`` found it."""
        return self._dialed.get(peer_id)

    def observed_host(self, peer_id: PeerID) -> str | None:
        """The IP address of ``peer_id``'s newest usable connection as seen on the socket, or None."""
        from .admission import host_of

        for conn in reversed(self._connections.get(peer_id, ())):
            if conn.usable:
                return getattr(conn.channel, "remote_host", None) or host_of(conn.channel.endpoint)
        return None

    async def dial_back(self, peer_id: PeerID, timeout: float) -> PeerAddress | None:
        """Check that ``peer_id`` listens where it says: dial the addresses it announced itself (up to
        4, never third-party ones) on fresh connections until a handshake proves ``peer_id`` there.
        That connection is then retired: a GOAWAY tells the peer not to start calls on it, calls it
        started meanwhile (it was its newest connection) are still served, and it closes after the
        GOAWAY grace period. Returns the address, or None (after ``timeout`` seconds at most)."""
        book = self._address_book.get(peer_id)
        candidates = [] if book is None else [a for a, r in book.ranked() if r < _THIRD_PARTY and a.relay is None][:4]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        for address in candidates:
            remaining = deadline - loop.time()
            if remaining <= 0 or self._closed:
                break
            try:
                channel = await asyncio.wait_for(self._transport.dial(address, peer_id), remaining)
            except asyncio.TimeoutError:
                break
            except HandshakeError as e:
                self._drop_address(peer_id, address, e)
                continue
            except P2PError as e:  # unreachable there: try its next address
                logger.debug("dial-back of %s at %s failed: %s", peer_id.short(), address, e)
                continue
            self._confirm(peer_id, address)
            try:
                conn = self._adopt(channel, initiator=True)
                conn.write_frame(GOAWAY, 0, 0, msgpack.packb({"m": "dial-back check done"}))
            except P2PError:  # shut down meanwhile, or the connection broke already
                return address.with_peer_id(peer_id)
            self._on_connection_closed(conn)  # out of the pool now, closed after the grace period
            return address.with_peer_id(peer_id)
        return None

    async def probe(self, address: PeerAddress, peer_id: PeerID, timeout: float) -> None:
        """Dial ``address`` on a fresh connection, check that ``peer_id`` answers the handshake there,
        then close it (telling the peer with a GOAWAY). Raises P2PError or asyncio.TimeoutError."""
        channel = await asyncio.wait_for(self._transport.dial(address.without_peer_id(), peer_id), timeout)
        _refuse(channel, "dial-back check done")

    @property
    def transport(self) -> Transport:
        return self._transport

    def accept_channel(self, channel: FrameChannel) -> None:
        """Take an authenticated inbound channel that did not come through the listener (a relayed
        circuit, a hole-punched socket): adopted, or refused with a GOAWAY as any inbound connection."""
        self._on_inbound(channel)

    def adopt_channel(self, channel: FrameChannel, initiator: bool) -> Connection:
        """Take an authenticated channel this peer opened itself (e.g. a hole-punched socket) into the pool."""
        return self._adopt(channel, initiator)

    def retire(self, conn: Connection, reason: str, grace: float | None = None) -> None:
        """Stop using ``conn`` for new calls (a GOAWAY tells the peer); it closes after ``grace`` seconds
        (default: the GOAWAY grace period, 10 s), calls in flight on it go on until then."""
        try:
            conn.write_frame(GOAWAY, 0, 0, msgpack.packb({"m": reason[:200]}))
        except P2PError:
            pass
        self._on_connection_closed(conn)
        if grace is not None:
            asyncio.get_running_loop().call_later(grace, conn.close, reason)

    def connections_to(self, peer_id: PeerID) -> list[Connection]:
        """The usable connections with ``peer_id``, oldest first."""
        return [c for c in self._connections.get(peer_id, ()) if c.usable]

    def forget_peers(self, keep: Callable[[PeerID], bool], idle: float = 0.0) -> int:
        """Drop the addresses (and dial records) of peers that are not connected, not ``keep(peer)``,
        and not mentioned for ``idle`` seconds; returns how many peers were forgotten."""
        now = _now()
        gone = [pid for pid, book in self._address_book.items()
                if now - book.touched >= idle and not self.is_connected(pid) and not keep(pid)]
        for pid in gone:
            del self._address_book[pid]
            self._address_texts.pop(pid, None)
            self._dialed.pop(pid, None)
        for pid in [p for p in self._dialed
                    if p not in self._address_book and not self.is_connected(p) and not keep(p)]:
            del self._dialed[pid]
        return len(gone)

    def known_peers(self) -> int:
        """Peers in the address book."""
        return len(self._address_book)

    def _trim_address_book(self) -> None:
        limit = self.limits.max_known_peers
        while len(self._address_book) > limit:
            victim = next(iter(self._address_book))
            for index, pid in enumerate(self._address_book):  # prefer a peer we are not connected to
                if index >= 64:
                    break
                if not self.is_connected(pid):
                    victim = pid
                    break
            del self._address_book[victim]
            self._address_texts.pop(victim, None)
            self._dialed.pop(victim, None)

    def _confirm(self, peer_id: PeerID, address: PeerAddress) -> None:
        """Our dial of ``address`` found ``peer_id``: rank the address first and remember the dial."""
        address = address.without_peer_id()
        book = self._address_book.get(peer_id)
        if book is None:
            book = self._address_book[peer_id] = _Book()
            self._trim_address_book()
        book.touched = _now()
        book.add([address], _CONFIRMED)
        self._address_texts.pop(peer_id, None)
        self._dialed[peer_id] = address
        self._dialed.move_to_end(peer_id)
        while len(self._dialed) > self.limits.max_known_peers:
            self._dialed.popitem(last=False)

    def _drop_address(self, peer_id: PeerID, address: PeerAddress, error: HandshakeError) -> None:
        """A handshake at ``address`` failed: the peer there is someone else (a stale or poisoned
        address) or could not prove its key. A third-party address is forgotten on any such failure,
        the peer's own only when another peer answered there."""
        book = self._address_book.get(peer_id)
        if book is None:
            return
        address = address.without_peer_id()
        rank = book.addresses.get(address)
        if rank is None or not (rank == _THIRD_PARTY or "expected peer" in str(error)):
            return
        del book.addresses[address]
        book.texts.clear()
        self._address_texts.pop(peer_id, None)
        if self._dialed.get(peer_id) == address:
            del self._dialed[peer_id]

    def set_extra_addresses(self, addresses: Sequence[PeerAddress], direct: bool = True) -> None:
        """Announce ``addresses`` (relay addresses) besides the listening ones (``direct=False``: instead
        of them, for a peer found unreachable), in handshakes from now on and in get_visible_addresses."""
        setter = getattr(self._transport, "set_extra_addresses", None)
        if setter is not None:
            self._visible = setter(list(addresses), direct)

    def get_visible_addresses(self) -> list[PeerAddress]:
        """Addresses others can dial to reach this peer, with ``/p2p/<our PeerID>``."""
        return [a.with_peer_id(self.peer_id) for a in self._visible]

    @property
    def num_connections(self) -> tuple[int, int]:
        """Open connections (inbound, outbound), those past a GOAWAY included."""
        return self._num_inbound, len(self._live) - self._num_inbound

    def connected_peers(self) -> list[PeerID]:
        return [pid for pid, conns in self._connections.items() if any(c.usable for c in conns)]

    def is_connected(self, peer_id: PeerID) -> bool:
        return any(c.usable for c in self._connections.get(peer_id, ()))

    def disconnect(self, peer_id: PeerID, reason: str = "disconnected") -> None:
        for conn in list(self._connections.get(peer_id, ())):
            conn.close(reason)

    def _usable_connection(self, peer: PeerLike) -> Connection | None:
        """An open connection to ``peer`` if there is one (identified by PeerID), else None."""
        peer_id = peer.peer_id if isinstance(peer, PeerAddress) else peer if isinstance(peer, PeerID) else None
        if peer_id is None or self._closed:
            return None
        for conn in reversed(self._connections.get(peer_id, ())):
            if conn.usable:
                return conn
        return None

    async def _connection_to(self, peer: PeerLike) -> Connection:
        if self._closed:
            raise P2PError("this peer is shut down")
        if isinstance(peer, str):
            peer = PeerAddress.parse(peer) if peer.startswith("/") else PeerID.from_base58(peer)
        if isinstance(peer, PeerAddress):
            peer_id, addresses = peer.peer_id, [peer]
        else:
            peer_id, addresses = peer, self.get_addresses(peer)
        if peer_id == self.peer_id:
            raise P2PError("a peer cannot call itself over the network")
        if peer_id is not None:
            for conn in reversed(self._connections.get(peer_id, ())):
                if conn.usable:
                    return conn
            pending = self._dialing.get(peer_id)
            if pending is not None:
                return await asyncio.shield(pending)
            if not addresses:
                raise PeerUnreachableError(f"no known address for peer {peer_id}")
        future = asyncio.get_running_loop().create_future()
        if peer_id is not None:
            self._dialing[peer_id] = future
        try:
            conn = await self._dial_any(peer_id, addresses)
            future.set_result(conn)
            return conn
        except BaseException as e:
            future.set_exception(e if isinstance(e, Exception) else P2PError("dial cancelled"))
            future.exception()  # mark as retrieved: the waiters (if any) get it through shield
            raise
        finally:
            if peer_id is not None and self._dialing.get(peer_id) is future:
                del self._dialing[peer_id]

    async def _dial_any(self, peer_id: PeerID | None, addresses: list[PeerAddress]) -> Connection:
        """Dial ``addresses`` in order (at most 8) until one works. An address where the handshake
        fails (someone else is there: stale, or poisoned by a third party) is dropped from the book
        and the next one is tried, so nobody can make a peer unreachable by advertising a wrong
        address for it. HandshakeError if every attempt failed that way, else PeerUnreachableError."""
        failures: list[str] = []
        handshake_errors: list[HandshakeError] = []
        addresses = sorted(addresses, key=lambda a: a.relay is not None)  # direct addresses first, then relays
        for address in addresses[:_MAX_DIAL_ATTEMPTS]:
            try:
                if address.relay is None:
                    channel = await self._transport.dial(address, peer_id)
                elif self.relay_dialer is None:
                    raise PeerUnreachableError(f"{address}: this peer does not dial through relays")
                else:
                    channel = await self.relay_dialer(address)
            except HandshakeError as e:
                if peer_id is not None:
                    self._drop_address(peer_id, address, e)
                failures.append(str(e))
                handshake_errors.append(e)
                continue
            except P2PError as e:
                failures.append(str(e))
                continue
            if address.relay is None:
                self._confirm(channel.remote_peer_id, address)
            return self._adopt(channel, initiator=True)
        if handshake_errors and len(handshake_errors) == len(failures):
            if len(handshake_errors) == 1:
                raise handshake_errors[0]
            raise HandshakeError("; ".join(failures))
        who = f"peer {peer_id}" if peer_id else str(addresses[0])
        raise PeerUnreachableError(f"could not reach {who}: " + "; ".join(failures))

    def _on_inbound(self, channel: FrameChannel) -> None:
        """An authenticated inbound channel: adopted, or refused with a GOAWAY saying which limit."""
        limits = self.limits
        ip = ip_key(channel.remote_host) if channel.remote_host else None
        if self._closed:
            reason = "peer shutting down"
        elif self._num_inbound >= limits.max_connections:
            reason = f"too many connections (limit {limits.max_connections})"
        elif self._per_peer.get(channel.remote_peer_id, 0) >= limits.max_connections_per_peer:
            reason = (f"too many connections with peer {channel.remote_peer_id} "
                      f"(limit {limits.max_connections_per_peer})")
        elif ip is not None and self._inbound_per_ip.get(ip, 0) >= limits.max_connections_per_ip:
            reason = f"too many connections from {ip} (limit {limits.max_connections_per_ip})"
        else:
            self._adopt(channel, initiator=False)
            return
        _refusals.log(logger, logging.INFO, ip, "refused connection from %s: %s", channel.describe(), reason)
        _refuse(channel, reason)

    def _adopt(self, channel: FrameChannel, initiator: bool) -> Connection:
        if self._closed:
            channel.close()
            raise P2PError("this peer is shut down")
        conn = Connection(channel, self.limits, initiator, self._dispatch, self._on_connection_closed,
                          resources=self.resources, stats=self.stats)
        ip = ip_key(channel.remote_host) if channel.remote_host and not initiator else None
        self._live[conn] = (not initiator, ip)
        self._per_peer[conn.peer_id] = self._per_peer.get(conn.peer_id, 0) + 1
        if not initiator:
            self._num_inbound += 1
            if ip is not None:
                self._inbound_per_ip[ip] = self._inbound_per_ip.get(ip, 0) + 1
        self._connections.setdefault(conn.peer_id, []).append(conn)
        if channel.remote_info.addresses:
            try:
                self.add_addresses(conn.peer_id, channel.remote_info.addresses)
            except ValueError:
                logger.debug("%s announced malformed addresses", channel.describe())
        return conn

    def _on_connection_closed(self, conn: Connection) -> None:
        conns = self._connections.get(conn.peer_id)
        if conns and conn in conns:
            conns.remove(conn)
            if not conns:
                del self._connections[conn.peer_id]
        if not conn.closed:  # a GOAWAY came: the peer closes it at once; make sure it does not linger
            asyncio.get_running_loop().call_later(_GOAWAY_GRACE, conn.close, "closed after the peer's GOAWAY")
            return
        entry = self._live.pop(conn, None)
        if entry is None:
            return
        inbound, ip = entry
        _decrement(self._per_peer, conn.peer_id)
        if inbound:
            self._num_inbound -= 1
            if ip is not None:
                _decrement(self._inbound_per_ip, ip)

    async def shutdown(self) -> None:
        """Stop listening, tell connected peers (GOAWAY), fail calls in flight, close every connection."""
        if self._closed:
            return
        self._closed = True
        await self._transport.close()
        conns = list(self._live)
        for conn in conns:
            conn.close("peer shutting down")
        await asyncio.gather(*(c.wait_closed() for c in conns), return_exceptions=True)
        self._connections.clear()

    async def __aenter__(self) -> "P2P":
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.shutdown()

    def __repr__(self) -> str:
        return f"P2P({self.peer_id}, {len(self._connections)} peers connected)"


def _now() -> float:
    """The running loop's clock (virtual on dht.peer.virtual_clock), else time.monotonic()."""
    try:
        return asyncio.get_running_loop().time()
    except RuntimeError:
        return time.monotonic()


def _refuse(channel: FrameChannel, reason: str) -> None:
    """Close an authenticated channel at once, telling the other side why (a GOAWAY frame)."""
    try:
        channel.write_frame(HEADER.pack(GOAWAY, 0, 0) + msgpack.packb({"m": reason[:500]}))
    except P2PError:  # the channel broke already: closing it is all there is left to do
        pass
    channel.close()


def _decrement(counts: dict, key: Any) -> None:
    left = counts.pop(key, 1) - 1
    if left > 0:
        counts[key] = left


_CONFIRMED, _ANNOUNCED, _THIRD_PARTY = 0, 1, 2  # address ranks: our dial worked / the peer's own / hearsay
_MAX_ADDRESSES_PER_PEER = 16
_MAX_THIRD_PARTY_PER_PEER = 4
_MAX_DIAL_ATTEMPTS = 8


class _Book:
    """One peer's addresses: ``{address: rank}`` in insertion order (newest last)."""

    __slots__ = ("addresses", "touched", "texts")

    def __init__(self) -> None:
        self.addresses: dict[PeerAddress, int] = {}
        self.touched = 0.0
        self.texts: set[str] = set()  # strings known to be in ``addresses`` (cleared when one is removed)

    def add(self, addresses: list[PeerAddress], rank: int) -> bool:
        """Add or refresh; an address keeps its best rank. Returns whether the book changed."""
        changed = False
        for address in addresses:
            old = self.addresses.get(address)
            if old is not None and (rank == _THIRD_PARTY or next(reversed(self.addresses)) == address) and old <= rank:
                continue  # known already (the common case: the DHT relearns known contacts)
            self.addresses.pop(address, None)
            self.addresses[address] = rank if old is None else min(old, rank)
            changed = True
        if changed:
            third = [a for a, r in self.addresses.items() if r == _THIRD_PARTY]
            for address in third[:max(len(third) - _MAX_THIRD_PARTY_PER_PEER, 0)]:
                del self.addresses[address]
                self.texts.clear()
            while len(self.addresses) > _MAX_ADDRESSES_PER_PEER:
                worst = max(self.addresses.values())
                del self.addresses[next(a for a, r in self.addresses.items() if r == worst)]
                self.texts.clear()
        return changed

    def ranked(self) -> list[tuple[PeerAddress, int]]:
        """Best rank first, newest first within a rank."""
        items = list(self.addresses.items())
        return [items[i] for i in sorted(range(len(items)), key=lambda i: (items[i][1], -i))]


async def _serve_unary(handler: UnaryHandler, stream: Stream, ctx: CallContext) -> None:
    request = await stream.recv()
    response = await handler(request, ctx)
    await stream.send(response, end=True)


async def _ping_handler(request: Any, ctx: CallContext) -> bytes:
    return b""
