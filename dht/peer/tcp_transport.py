"""The real transport: TCP (asyncio streams) + the secure handshake of :mod:`dht.peer.handshake`.

Unauthenticated sockets are bounded on every path (``Limits``): at most ``max_pending_handshakes_per_ip``
(8) pending handshakes per source IP (an IPv6 source counts by its /64) and ``max_pending_handshakes``
(256) in all; a socket that sends nothing for ``first_byte_timeout`` (3 s) is closed, and every accepted
socket is closed within ``handshake_timeout`` (10 s) whatever arrives. A newcomer from an IP at its cap
gets a short "busy" answer (its dialer retries a few times within its timeouts) and is closed; when the
pool is full, the oldest pending socket of the most represented IP makes room for the newcomer, so a
flood from one address cannot lock other peers out.

The first byte of a handshake is always 0 (M1's length is below 4 KiB). A socket that starts with a
byte registered in :attr:`TCPTransport.raw_handlers` is handed to that handler instead (still counted
as a pending handshake until the handler returns, within ``handshake_timeout``): relay circuits
(:mod:`dht.peer.relay`) and hole-punched sockets (:mod:`dht.peer.holepunch`) arrive that way.
:meth:`TCPTransport.dial_raw` and :meth:`TCPTransport.accept_raw` run the normal handshake over a
socket that first sent such a prelude. On Linux the listener uses SO_REUSEPORT, so that hole punching
can connect out from the listening port (a fixed ``port`` is first checked to be free without it).
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import sys
from typing import Awaitable, Callable

from .addresses import PeerAddress, interface_addresses
from .channel import FrameChannel, PeerInfo
from .errors import HandshakeError, P2PError, PeerUnreachableError
from .handshake import (
    MAX_HANDSHAKE_FRAME,
    PeerBusyError,
    SecureChannel,
    initiate,
    observed_host,
    refuse_busy,
    respond,
    within,
)
from .identity import Identity, PeerID
from .multiplex import Limits
from .resources import ip_key
from .transport import Transport
from .untrusted import LogLimiter, brief

__all__ = ["TCPTransport", "raise_fd_limit", "RawHandler", "REUSE_PORT"]

# a listener's handler of sockets that start with a registered byte: (first byte, reader, writer,
# observed source IP) -> True if it kept the socket (else it is closed)
RawHandler = Callable[[int, asyncio.StreamReader, asyncio.StreamWriter, str], Awaitable[bool]]
REUSE_PORT = sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")

logger = logging.getLogger(__name__)
# StreamReader buffer during the handshake (reading pauses at twice this): handshake messages are at
# most 4 KiB, and an unauthenticated peer must not make us buffer megabytes; after the handshake the
# channel's own frame reader takes over
_READ_LIMIT = 64 << 10
_BUSY_RETRIES = 5  # a dial refused as busy is retried this many times, after 50, 100, 200, 400, 800 ms
_REFUSALS_PER_IP = 4  # sockets being refused per IP, in units of the per-IP cap (beyond: closed without a word)
_REFUSAL_LINGER = 0.5  # seconds a refused socket may take to send its hello (read, so closing sends FIN, not RST)
_refusals = LogLimiter(rate=0.2, burst=5.0)  # log lines about refused sockets, per source IP


_fd_limit_raised = False


def raise_fd_limit() -> None:
    """Raise this process's soft limit of open files towards the hard limit (once per process; not on
    Windows; silently keeps the old limit where the system refuses)."""
    global _fd_limit_raised
    if _fd_limit_raised or sys.platform == "win32":
        return
    _fd_limit_raised = True
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = hard if hard != resource.RLIM_INFINITY else 1 << 20
        for value in (target, min(target, 1 << 16), min(target, 10240)):  # macOS caps at OPEN_MAX
            if soft != resource.RLIM_INFINITY and soft >= value:
                return
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (value, hard))
                logger.debug("raised the open files limit from %s to %s", soft, value)
                return
            except (ValueError, OSError):
                continue
    except Exception as e:  # noqa: BLE001 - no resource module, or an exotic platform: keep the limit
        logger.debug("could not raise the open files limit: %s", type(e).__name__)


class _Pending:
    """An accepted socket whose handshake has not finished (or that is being refused)."""

    __slots__ = ("ip", "writer", "task")

    def __init__(self, ip: str, writer: asyncio.StreamWriter):
        self.ip, self.writer = ip, writer
        self.task: asyncio.Task | None = None


class TCPTransport(Transport):
    """Listens on ``host:port`` (port 0 picks a free one) and dials ``/ip4|ip6|dns/.../tcp/...`` addresses.

    ``announce`` overrides the addresses told to other peers (e.g. a public IP behind port forwarding).
    ``client_mode=True`` listens nowhere: the peer can dial out but cannot be dialed.
    """

    def __init__(self, identity: Identity, limits: Limits, host: str = "0.0.0.0", port: int = 0,
                 announce: list[str] | None = None, client_mode: bool = False):
        self.identity = identity
        self.limits = limits
        self.host, self.port = host, port
        self.announce = announce
        self.client_mode = client_mode
        self._server: asyncio.base_events.Server | None = None
        # pending handshakes, oldest first, in all and per source IP; and sockets being refused
        self._pending: dict[_Pending, None] = {}
        self._pending_by_ip: dict[str, dict[_Pending, None]] = {}
        self._refusing: dict[_Pending, None] = {}
        self._refusing_by_ip: dict[str, int] = {}
        self._closing = False
        self._addresses: list[PeerAddress] = []
        self._info = PeerInfo([], limits.stream_window, limits.max_message_size)
        self._extra: list[PeerAddress] = []  # announced besides the listening ones (relay addresses)
        self.raw_handlers: dict[int, RawHandler] = {}  # first byte -> handler (never 0: the handshake's)
        self.bound: list[tuple[str, int]] = []  # (host, port) of each listening socket
        raise_fd_limit()

    # ---- accepting ---------------------------------------------------------------------------
    async def listen(self, on_channel: Callable[[FrameChannel], None]) -> list[PeerAddress]:
        if self.client_mode:
            return []

        def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                self._on_client(reader, writer, on_channel)
            except BaseException:  # never leave an accepted socket behind
                writer.transport.abort()
                raise

        host = None if self.host in ("", "::") else self.host
        if REUSE_PORT and self.port:
            _check_port_free(host, self.port)  # SO_REUSEPORT would let two peers share a port silently
        self._server = await asyncio.start_server(on_client, host, self.port, limit=_READ_LIMIT,
                                                  reuse_port=REUSE_PORT or None)
        bound = [sock.getsockname()[:2] for sock in self._server.sockets]
        self.bound = [(h, p) for h, p in bound]
        port = bound[0][1]
        if self.announce:
            self._addresses = [PeerAddress.parse(a).without_peer_id() for a in self.announce]
        elif self.host in ("0.0.0.0", "", "::"):
            ipv6 = self.host != "0.0.0.0"
            self._addresses = [PeerAddress.from_host_port(ip, port) for ip in interface_addresses(include_ipv6=ipv6)]
        else:
            self._addresses = [PeerAddress.from_host_port(h, p) for h, p in bound]
        self._info.addresses = [str(a) for a in self._addresses]
        return list(self._addresses)

    def set_extra_addresses(self, addresses: list[PeerAddress], direct: bool = True) -> list[PeerAddress]:
        """Announce ``addresses`` (e.g. relay addresses) besides the listening ones (``direct=False``:
        instead of them, unless there are none), in handshakes from now on; returns all those announced."""
        self._extra = [a.without_peer_id() for a in addresses]
        announced = [*self._addresses, *self._extra] if direct or not self._extra else list(self._extra)
        self._info.addresses = [str(a) for a in announced][:32]
        return announced

    @property
    def info(self) -> PeerInfo:
        return self._info

    @property
    def listen_addresses(self) -> list[PeerAddress]:
        """The addresses this transport listens at (or announces with ``announce``), relay addresses aside."""
        return list(self._addresses)

    def pending_handshakes(self, host: str | None = None) -> int:
        """Unauthenticated sockets now held (from ``host``'s IP, or in all), refusals included."""
        if host is None:
            return len(self._pending) + len(self._refusing)
        key = ip_key(host)
        return len(self._pending_by_ip.get(key, ())) + self._refusing_by_ip.get(key, 0)

    def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   on_channel: Callable[[FrameChannel], None]) -> None:
        if self._closing:
            writer.transport.abort()
            return
        host = observed_host(writer)
        ip = ip_key(host) if host else "unknown"
        loop = asyncio.get_running_loop()
        limits = self.limits
        same_ip = self._pending_by_ip.get(ip)
        if same_ip is not None and len(same_ip) >= limits.max_pending_handshakes_per_ip:
            if self._refusing_by_ip.get(ip, 0) >= _REFUSALS_PER_IP * limits.max_pending_handshakes_per_ip or \
                    len(self._refusing) >= limits.max_pending_handshakes:
                writer.transport.abort()  # refusing politely is itself bounded
                return
            entry = _Pending(ip, writer)
            self._refusing[entry] = None
            self._refusing_by_ip[ip] = self._refusing_by_ip.get(ip, 0) + 1
            entry.task = loop.create_task(self._refuse(entry, reader))
            return
        if len(self._pending) >= limits.max_pending_handshakes:
            self._evict()
        entry = _Pending(ip, writer)
        self._pending[entry] = None
        self._pending_by_ip.setdefault(ip, {})[entry] = None
        entry.task = loop.create_task(self._accept(entry, reader, writer, on_channel))

    def _evict(self) -> None:
        """Close the oldest pending socket of the source IP with the most pending sockets."""
        crowd = max(self._pending_by_ip.values(), key=len)
        victim = next(iter(crowd))
        self._forget(victim)
        victim.writer.transport.abort()
        if victim.task is not None:
            victim.task.cancel()
        _refusals.log(logger, logging.INFO, victim.ip, "closed a pending handshake from %s to make room "
                      "(%d pending from there)", victim.ip, len(crowd) + 1)

    def _forget(self, entry: _Pending) -> None:
        if entry in self._pending:
            del self._pending[entry]
            same_ip = self._pending_by_ip[entry.ip]
            del same_ip[entry]
            if not same_ip:
                del self._pending_by_ip[entry.ip]

    async def _refuse(self, entry: _Pending, reader: asyncio.StreamReader) -> None:
        """Tell a socket over its IP's cap that we are busy, read its hello (closing a socket with
        unread data resets the connection, which could drop our answer), then close it."""
        limit = self.limits.max_pending_handshakes_per_ip
        try:
            refuse_busy(entry.writer, f"too many pending handshakes from {entry.ip} (limit {limit}); retry later")
            await within(reader.read(MAX_HANDSHAKE_FRAME + 4), min(self.limits.first_byte_timeout, _REFUSAL_LINGER))
        except (asyncio.TimeoutError, ConnectionError, OSError) as e:  # it is closed either way
            logger.debug("refused socket from %s: %s before its hello was read", entry.ip, type(e).__name__)
        finally:
            entry.writer.transport.abort()
            self._refusing.pop(entry, None)
            left = self._refusing_by_ip.pop(entry.ip, 1) - 1
            if left > 0:
                self._refusing_by_ip[entry.ip] = left
            _refusals.log(logger, logging.INFO, entry.ip, "refused a connection from %s: too many pending "
                          "handshakes from there (limit %d)", entry.ip, limit)

    async def _accept(self, entry: _Pending, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      on_channel: Callable[[FrameChannel], None]) -> None:
        peername = writer.get_extra_info("peername")
        endpoint = f"{peername[0]}:{peername[1]}" if isinstance(peername, tuple) and len(peername) >= 2 else "unknown"
        channel = None
        kept = False
        try:
            prefix = b""
            if self.raw_handlers:
                prefix = await self._first_byte(reader, endpoint)
                handler = self.raw_handlers.get(prefix[0]) if prefix else None
                if handler is not None:
                    kept = await within(handler(prefix[0], reader, writer, entry.ip), self.limits.handshake_timeout)
                    return
            channel = await within(
                respond(reader, writer, self.identity, self._info, endpoint, self.limits.max_frame_size,
                        first_byte_timeout=self.limits.first_byte_timeout, prefix=prefix),
                self.limits.handshake_timeout)
        except asyncio.TimeoutError:
            _refusals.log(logger, logging.INFO, entry.ip, "refused connection from %s: handshake timed out "
                          "after %g s", endpoint, self.limits.handshake_timeout)
        except HandshakeError as e:
            _refusals.log(logger, logging.INFO, entry.ip, "refused connection from %s: %s", endpoint,
                          brief(str(e), 300))
        except (ConnectionError, OSError) as e:
            _refusals.log(logger, logging.INFO, entry.ip, "refused connection from %s: %s", endpoint, type(e).__name__)
        except asyncio.CancelledError:
            raise  # evicted or shutting down: the finally clause closes the socket
        except Exception as e:  # noqa: BLE001 - whatever arrives, the socket is closed (a bug worth a line)
            _refusals.log(logger, logging.WARNING, entry.ip, "refused connection from %s: unexpected %s during "
                          "the handshake", endpoint, type(e).__name__)
        finally:
            self._forget(entry)
            if channel is None and not kept:
                writer.transport.abort()
        if channel is None:
            return
        try:
            on_channel(channel)
        except Exception as e:  # noqa: BLE001 - logged; the connection is dropped, the listener goes on
            channel.close()
            _refusals.log(logger, logging.WARNING, entry.ip, "dropped connection from %s: %s in the connection "
                          "handler", endpoint, type(e).__name__)

    async def _first_byte(self, reader: asyncio.StreamReader, endpoint: str) -> bytes:
        """The socket's first byte (b"" if it closed first), within ``first_byte_timeout``."""
        try:
            return await within(reader.readexactly(1), self.limits.first_byte_timeout)
        except asyncio.TimeoutError:
            raise HandshakeError(f"{endpoint}: nothing received within {self.limits.first_byte_timeout:g} s") from None
        except asyncio.IncompleteReadError:
            return b""

    # ---- raw sockets (relay circuits, hole punching) -------------------------------------------
    async def handshake_raw(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, endpoint: str,
                            initiator: bool, expected: PeerID | None = None) -> SecureChannel:
        """Run the handshake over an already connected socket (after any prelude), as initiator
        (checking ``expected``) or responder, within ``handshake_timeout``; closes the socket on failure."""
        try:
            if initiator:
                coro = initiate(reader, writer, self.identity, self._info, endpoint, expected,
                                self.limits.max_frame_size)
            else:
                coro = respond(reader, writer, self.identity, self._info, endpoint, self.limits.max_frame_size)
            return await within(coro, self.limits.handshake_timeout)
        except asyncio.TimeoutError:
            writer.transport.abort()
            raise HandshakeError(f"handshake with {endpoint} timed out after {self.limits.handshake_timeout} s") \
                from None
        except (ConnectionError, OSError) as e:
            writer.transport.abort()
            raise HandshakeError(f"handshake with {endpoint} failed: {type(e).__name__}") from None
        except BaseException:
            writer.transport.abort()
            raise

    async def open_raw(self, host: str, port: int, prelude: bytes = b"", local_port: int | None = None,
                       timeout: float | None = None, local_host: str | None = None,
                       ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Connect to ``host:port`` (from our listening ``local_port`` with SO_REUSEPORT, for hole
        punching) and send ``prelude``. PeerUnreachableError if it cannot connect."""
        timeout = self.limits.dial_timeout if timeout is None else timeout
        try:
            if local_port is None:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port, limit=_READ_LIMIT), timeout)
            else:
                sock = _bound_socket(host, local_port, local_host)
                try:
                    loop = asyncio.get_running_loop()
                    target = (host, port, 0, 0) if sock.family == socket.AF_INET6 else (host, port)
                    await asyncio.wait_for(loop.sock_connect(sock, target), timeout)
                    reader, writer = await asyncio.open_connection(sock=sock, limit=_READ_LIMIT)
                except BaseException:
                    sock.close()
                    raise
        except (OSError, asyncio.TimeoutError) as e:
            cause = "timed out" if isinstance(e, asyncio.TimeoutError) else (e.strerror or str(e)[:200])
            raise PeerUnreachableError(f"cannot connect to {host}:{port}: {cause}") from None
        if prelude:
            writer.write(prelude)
        return reader, writer

    # ---- dialing -----------------------------------------------------------------------------
    async def dial(self, address: PeerAddress, expected: PeerID | None) -> FrameChannel:
        if address.protocol == "memory":
            raise PeerUnreachableError(f"{address}: the TCP transport cannot dial in-memory addresses")
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.limits.dial_timeout + self.limits.handshake_timeout
        delay, attempt = 0.05, 0
        while True:
            try:
                return await self._dial_once(address, expected)
            except PeerBusyError:
                pause = delay * random.uniform(1.0, 1.5)
                if attempt == _BUSY_RETRIES or loop.time() + pause >= give_up:
                    raise
            await asyncio.sleep(pause)
            delay, attempt = 2 * delay, attempt + 1

    async def _dial_once(self, address: PeerAddress, expected: PeerID | None) -> FrameChannel:
        endpoint = f"[{address.host}]:{address.port}" if address.protocol == "ip6" else f"{address.host}:{address.port}"
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(address.host, address.port, limit=_READ_LIMIT), self.limits.dial_timeout)
        except (OSError, asyncio.TimeoutError) as e:
            cause = "timed out" if isinstance(e, asyncio.TimeoutError) else (e.strerror or str(e)[:200])
            raise PeerUnreachableError(f"cannot connect to {address}: {cause}") from None
        return await self.handshake_raw(reader, writer, endpoint, initiator=True, expected=expected)

    async def close(self) -> None:
        self._closing = True
        if self._server is not None:
            self._server.close()
        entries = [*self._pending, *self._refusing]
        tasks = [e.task for e in entries if e.task is not None]
        for entry in entries:
            entry.writer.transport.abort()  # a task cancelled before it started would not close its socket
            if entry.task is not None:
                entry.task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            try:
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            except (asyncio.TimeoutError, P2PError):
                pass


def _check_port_free(host: str | None, port: int) -> None:
    """OSError (EADDRINUSE) if ``port`` is taken, checked without SO_REUSEPORT."""
    for family, kind, proto, _, address in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE):
        probe = socket.socket(family, kind, proto)
        try:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            probe.bind(address)
        finally:
            probe.close()


def _bound_socket(remote_host: str, local_port: int, local_host: str | None = None) -> socket.socket:
    """A non-blocking TCP socket bound to ``local_host:local_port`` (default: the wildcard address;
    SO_REUSEADDR + SO_REUSEPORT), of the family of ``remote_host``, to connect out from a listening port."""
    family = socket.AF_INET6 if ":" in remote_host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if REUSE_PORT:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setblocking(False)
        sock.bind((local_host or ("::" if family == socket.AF_INET6 else "0.0.0.0"), local_port))
    except BaseException:
        sock.close()
        raise
    return sock
