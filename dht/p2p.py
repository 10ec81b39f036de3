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
import functools
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Union

from .addresses import PeerAddress
from .channel import FrameChannel
from .errors import HandshakeError, P2PError, PeerUnreachableError
from .identity import Identity, PeerID
from .multiplex import Connection, Limits, Stream
from .resources import ResourceManager
from .transport import Transport

__all__ = ["P2P", "CallContext", "PeerLike"]

logger = logging.getLogger(__name__)

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
        self._connections: dict[PeerID, list[Connection]] = {}
        self._dialing: dict[PeerID, asyncio.Future] = {}
        self._address_book: dict[PeerID, list[PeerAddress]] = {}
        self._address_texts: dict[PeerID, list[str]] = {}  # printed form of each book, made on demand
        self._visible: list[PeerAddress] = []
        self._closed = False
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
    def add_addresses(self, peer_id: PeerID, addresses: list[PeerAddress | str]) -> None:
        """Remember where ``peer_id`` listens (the newest addresses are tried first)."""
        book = self._address_book.setdefault(peer_id, [])
        for address in addresses:
            address = PeerAddress.parse(address) if isinstance(address, str) else address
            if address.peer_id is not None:
                address = address.without_peer_id()
            if book and book[0] == address:
                continue  # already the newest (the common case: the DHT relearns known contacts)
            if address in book:
                book.remove(address)
            book.insert(0, address)
            self._address_texts.pop(peer_id, None)
        del book[16:]

    def get_addresses(self, peer_id: PeerID) -> list[PeerAddress]:
        return [a.with_peer_id(peer_id) for a in self._address_book.get(peer_id, [])]

    def get_address_texts(self, peer_id: PeerID) -> list[str]:
        """Where ``peer_id`` listens, printed without ``/p2p/...`` (as the DHT tells others; cached)."""
        texts = self._address_texts.get(peer_id)
        if texts is None:
            texts = self._address_texts[peer_id] = [str(a) for a in self._address_book.get(peer_id, [])]
        return texts

    def get_visible_addresses(self) -> list[PeerAddress]:
        """Addresses others can dial to reach this peer, with ``/p2p/<our PeerID>``."""
        return [a.with_peer_id(self.peer_id) for a in self._visible]

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
        failures = []
        for address in addresses:
            try:
                channel = await self._transport.dial(address, peer_id)
            except HandshakeError:
                raise  # a peer that cannot prove its identity is not retried at another address
            except P2PError as e:
                failures.append(str(e))
                continue
            return self._adopt(channel, initiator=True)
        who = f"peer {peer_id}" if peer_id else str(addresses[0])
        raise PeerUnreachableError(f"could not reach {who}: " + "; ".join(failures))

    def _on_inbound(self, channel: FrameChannel) -> None:
        if self._closed or sum(len(c) for c in self._connections.values()) >= self.limits.max_connections:
            channel.close()
            return
        self._adopt(channel, initiator=False)

    def _adopt(self, channel: FrameChannel, initiator: bool) -> Connection:
        conn = Connection(channel, self.limits, initiator, self._dispatch, self._on_connection_closed,
                          resources=self.resources)
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

    async def shutdown(self) -> None:
        """Stop listening, tell connected peers (GOAWAY), fail calls in flight, close every connection."""
        if self._closed:
            return
        self._closed = True
        await self._transport.close()
        conns = [c for cs in self._connections.values() for c in cs]
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


async def _serve_unary(handler: UnaryHandler, stream: Stream, ctx: CallContext) -> None:
    request = await stream.recv()
    response = await handler(request, ctx)
    await stream.send(response, end=True)


async def _ping_handler(request: Any, ctx: CallContext) -> bytes:
    return b""
