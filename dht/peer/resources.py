"""Resource budgets after the handshake: memory and inbound streams per stream, connection, peer,
source IP and the whole process (modelled on libp2p's resource manager).

Every inbound buffer is reserved before it is allocated, against each scope from the stream up to the
system; a reservation that would take any scope past its limit changes nothing and raises
:class:`~dht.peer.errors.ResourceLimitError` naming that scope. Reservations are returned when the stream
or the connection closes, however that happens (end, cancel, error, connection loss, handler crash).

==========  ==========================================  =============================================
scope       memory limit (``Limits`` field, default)    inbound streams limit (field, default)
==========  ==========================================  =============================================
stream      ``stream_memory`` (16 MiB)                  -
connection  ``connection_memory`` (32 MiB)              ``max_streams_per_connection`` (1024)
peer        ``peer_memory`` (64 MiB), all connections   ``max_inbound_streams_per_peer`` (256)
ip          ``ip_memory`` (128 MiB), all identities     ``max_inbound_streams_per_ip`` (1024)
system      ``system_memory`` (1 GiB)                   ``max_inbound_streams`` (8192)
==========  ==========================================  =============================================

An IPv6 source counts by its /64 prefix (one host usually owns a whole /64). Peer and IP scopes exist
only while one of their connections is open, so the bookkeeping is bounded by the connections.

>>> manager = ResourceManager(Limits())
>>> conn = manager.open_connection(peer_id, "127.0.0.1")
>>> stream = conn.open_stream(inbound=True)       # ResourceLimitError: too many streams
>>> stream.reserve(65536)                          # ResourceLimitError: over a memory budget
>>> stream.release(65536); stream.close(); conn.close()
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING, Any, Hashable

from .errors import ResourceLimitError

if TYPE_CHECKING:
    from .multiplex import Limits

__all__ = ["Scope", "StreamScope", "ConnectionScope", "ResourceManager", "ip_key"]


class Scope:
    """Usage and limits of one scope: ``memory`` bytes reserved, inbound/outbound streams, connections."""

    __slots__ = ("kind", "memory", "memory_limit", "inbound", "inbound_limit", "outbound", "connections")

    def __init__(self, kind: str, memory_limit: int, inbound_limit: int | None):
        self.kind = kind
        self.memory = 0
        self.memory_limit = memory_limit
        self.inbound = 0
        self.inbound_limit = inbound_limit
        self.outbound = 0
        self.connections = 0

    @property
    def idle(self) -> bool:
        return not (self.memory or self.inbound or self.outbound or self.connections)

    def stat(self) -> dict[str, int]:
        return {"memory": self.memory, "inbound_streams": self.inbound, "outbound_streams": self.outbound,
                "connections": self.connections}


def _reserve(chain: tuple[Scope, ...], n: int) -> None:
    for scope in chain:
        if scope.memory + n > scope.memory_limit:
            raise ResourceLimitError(scope.kind, f"{n} more bytes would exceed the {scope.kind} memory budget "
                                                 f"({scope.memory} of {scope.memory_limit} bytes in use)")
    for scope in chain:
        scope.memory += n


class StreamScope:
    """The budget of one stream (inbound: opened by the other side, counted against the stream caps).

    ``reserve(n)`` before buffering ``n`` bytes, ``release(n)`` when they are consumed; ``close()``
    returns everything (idempotent; later reserves raise, later releases are no-ops).
    """

    # one of these per call: the parents (connection, peer, ip, system) are unrolled, not looped over
    __slots__ = ("_conn", "_c", "_p", "_i", "_s", "memory", "memory_limit", "inbound", "closed")

    def __init__(self, conn: "ConnectionScope", inbound: bool, memory_limit: int):
        self._conn = conn
        self._c, self._p, self._i, self._s = conn._chain
        self.memory = 0  # bytes reserved by this stream now
        self.memory_limit = memory_limit
        self.inbound = inbound
        self.closed = False

    @property
    def available(self) -> int:
        """Bytes this stream may still reserve by its own budget (its parents may allow less)."""
        return 0 if self.closed else max(self.memory_limit - self.memory, 0)

    def reserve(self, n: int) -> None:
        """Reserve ``n`` bytes in every scope up to the system, or raise ResourceLimitError (nothing reserved)."""
        if self.closed:
            raise ResourceLimitError("stream", "the stream is closed")
        c, p, i, s = self._c, self._p, self._i, self._s
        if (self.memory + n > self.memory_limit or c.memory + n > c.memory_limit or p.memory + n > p.memory_limit
                or i.memory + n > i.memory_limit or s.memory + n > s.memory_limit):
            if self.memory + n > self.memory_limit:
                raise ResourceLimitError("stream", f"{n} more bytes would exceed the stream memory budget "
                                                   f"({self.memory} of {self.memory_limit} bytes in use)")
            _reserve((c, p, i, s), n)  # raises, naming the scope
        self.memory += n
        c.memory += n
        p.memory += n
        i.memory += n
        s.memory += n

    def release(self, n: int) -> None:
        """Give back ``n`` of this stream's reserved bytes (at most what it holds)."""
        if n > self.memory:
            n = self.memory
        if n <= 0 or self.closed:
            return
        self.memory -= n
        self._c.memory -= n
        self._p.memory -= n
        self._i.memory -= n
        self._s.memory -= n

    def release_memory(self) -> None:
        """Give back all the memory of this stream (its buffers are dropped); the stream stays counted."""
        self.release(self.memory)

    def close(self) -> None:
        """Give back the memory and the stream slot (idempotent)."""
        if self.closed:
            return
        self.release(self.memory)
        self.closed = True
        c, p, i, s = self._c, self._p, self._i, self._s
        if self.inbound:
            c.inbound -= 1
            p.inbound -= 1
            i.inbound -= 1
            s.inbound -= 1
        else:
            c.outbound -= 1
            p.outbound -= 1
            i.outbound -= 1
            s.outbound -= 1
        self._conn._streams.discard(self)


class ConnectionScope:
    """The budget of one connection, inside the scopes of its peer, its source IP and the system.

    Its own ``reserve``/``release`` are for connection-level buffers (e.g. frame buffers); streams
    come from :meth:`open_stream`. :meth:`close` returns everything the connection and its streams hold.
    """

    def __init__(self, manager: "ResourceManager", peer_key: Hashable, ip: str, peer: Scope, ip_scope: Scope):
        limits = manager.limits
        self._manager = manager
        self.peer_key, self.ip = peer_key, ip
        self._scope = Scope("connection", limits.connection_memory, limits.max_streams_per_connection)
        self._chain = (self._scope, peer, ip_scope, manager.system)
        self._streams: set[StreamScope] = set()
        self._stream_memory = limits.stream_memory
        self.closed = False

    @property
    def memory(self) -> int:
        return self._scope.memory

    def stat(self) -> dict[str, int]:
        return self._scope.stat()

    def open_stream(self, inbound: bool) -> StreamScope:
        """A new stream's scope. Inbound streams are refused (ResourceLimitError, nothing allocated)
        when the connection, the peer, the IP or the system has its maximum of inbound streams."""
        if self.closed:
            raise ResourceLimitError("connection", "the connection is closed")
        if inbound:
            for scope in self._chain:
                if scope.inbound_limit is not None and scope.inbound >= scope.inbound_limit:
                    raise ResourceLimitError(scope.kind, f"too many concurrent calls from this {scope.kind} "
                                                         f"(limit {scope.inbound_limit})")
            for scope in self._chain:
                scope.inbound += 1
        else:
            for scope in self._chain:
                scope.outbound += 1
        stream = StreamScope(self, inbound, self._stream_memory)
        self._streams.add(stream)
        return stream

    def reserve(self, n: int) -> None:
        """Reserve ``n`` bytes of connection-level buffers (or raise ResourceLimitError)."""
        if self.closed:
            raise ResourceLimitError("connection", "the connection is closed")
        _reserve(self._chain, n)

    def release(self, n: int) -> None:
        """Give back ``n`` bytes reserved with :meth:`reserve`."""
        if self.closed:
            return
        n = min(n, self._scope.memory - sum(s.memory for s in self._streams))
        if n <= 0:
            return
        for scope in self._chain:
            scope.memory -= n

    def close(self) -> None:
        """Close every stream scope, give back all memory, drop idle peer and IP scopes (idempotent)."""
        if self.closed:
            return
        for stream in list(self._streams):
            stream.close()
        rest = self._scope.memory
        for scope in self._chain:
            scope.memory -= rest
            scope.connections -= 1
        self.closed = True
        self._manager._drop_if_idle(self.peer_key, self.ip)


def ip_key(host: str) -> str:
    """The key of a source address for per-IP budgets: the IPv4 address, or the /64 of an IPv6 one
    (IPv4-mapped IPv6 as IPv4); anything unparsable as given (cut to 100 characters)."""
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return host[:100]
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def _host_of(endpoint: str) -> str:
    """``"1.2.3.4:5"`` -> ``"1.2.3.4"``, ``"[::1]:5"`` -> ``"::1"``, anything else unchanged."""
    if endpoint.startswith("["):
        return endpoint[1:endpoint.find("]")] if "]" in endpoint else endpoint
    if endpoint.count(":") == 1:
        return endpoint.rsplit(":", 1)[0]
    return endpoint


class ResourceManager:
    """The budgets of one peer (one per :class:`~dht.peer.p2p.P2P`, shared by all its connections)."""

    def __init__(self, limits: "Limits"):
        self.limits = limits
        self.system = Scope("system", limits.system_memory, limits.max_inbound_streams)
        self._peers: dict[Hashable, Scope] = {}
        self._ips: dict[str, Scope] = {}

    def open_connection(self, peer_id: Hashable, host: str | None, endpoint: str = "") -> ConnectionScope:
        """The scope of a new connection with ``peer_id`` from ``host`` (the observed source IP; if None,
        taken from ``endpoint`` ``"host:port"``). Never refuses: admission is the transport's job."""
        ip = ip_key(host if host is not None else _host_of(endpoint))
        limits = self.limits
        peer = self._peers.get(peer_id)
        if peer is None:
            peer = self._peers[peer_id] = Scope("peer", limits.peer_memory, limits.max_inbound_streams_per_peer)
        ip_scope = self._ips.get(ip)
        if ip_scope is None:
            ip_scope = self._ips[ip] = Scope("ip", limits.ip_memory, limits.max_inbound_streams_per_ip)
        conn = ConnectionScope(self, peer_id, ip, peer, ip_scope)
        for scope in conn._chain:
            scope.connections += 1
        return conn

    def _drop_if_idle(self, peer_key: Hashable, ip: str) -> None:
        peer = self._peers.get(peer_key)
        if peer is not None and peer.idle:
            del self._peers[peer_key]
        ip_scope = self._ips.get(ip)
        if ip_scope is not None and ip_scope.idle:
            del self._ips[ip]

    def peer_stat(self, peer_id: Hashable) -> dict[str, int]:
        """Usage of one peer (zeros if it has no open connection)."""
        scope = self._peers.get(peer_id)
        return scope.stat() if scope is not None else Scope("peer", 0, None).stat()

    def ip_stat(self, host: str) -> dict[str, int]:
        """Usage of one source address (zeros if it has no open connection)."""
        scope = self._ips.get(ip_key(host))
        return scope.stat() if scope is not None else Scope("ip", 0, None).stat()

    def stat(self) -> dict[str, Any]:
        """Usage per scope: ``{"system": {...}, "ips": {ip: {...}}, "peers": {peer: {...}}}``, each with
        ``memory`` (bytes reserved), ``inbound_streams``, ``outbound_streams`` and ``connections``."""
        return {"system": self.system.stat(),
                "ips": {ip: scope.stat() for ip, scope in self._ips.items()},
                "peers": {str(peer): scope.stat() for peer, scope in self._peers.items()}}
