"""The real transport: TCP (asyncio streams) + the secure handshake of :mod:`dht.handshake`."""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

from .addresses import PeerAddress, interface_addresses
from .channel import FrameChannel
from .errors import HandshakeError, P2PError, PeerUnreachableError
from .handshake import PeerInfo, initiate, respond
from .identity import Identity, PeerID
from .multiplex import Limits
from .transport import Transport

__all__ = ["TCPTransport"]

logger = logging.getLogger(__name__)
_READ_LIMIT = 4 << 20  # asyncio.StreamReader buffer (reading pauses at twice this)


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
        self._pending: set[asyncio.Task] = set()
        self._addresses: list[PeerAddress] = []
        self._info = PeerInfo([], limits.stream_window, limits.max_message_size)

    async def listen(self, on_channel: Callable[[FrameChannel], None]) -> list[PeerAddress]:
        if self.client_mode:
            return []

        def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if len(self._pending) >= self.limits.max_pending_handshakes:
                writer.close()
                return
            task = asyncio.get_running_loop().create_task(self._accept(reader, writer, on_channel))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

        host = None if self.host in ("", "::") else self.host
        self._server = await asyncio.start_server(on_client, host, self.port, limit=_READ_LIMIT)
        bound = [sock.getsockname()[:2] for sock in self._server.sockets]
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

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      on_channel: Callable[[FrameChannel], None]) -> None:
        peername = writer.get_extra_info("peername")
        endpoint = f"{peername[0]}:{peername[1]}" if peername else "unknown"
        try:
            channel = await asyncio.wait_for(
                respond(reader, writer, self.identity, self._info, endpoint, self.limits.max_frame_size),
                self.limits.handshake_timeout)
        except (HandshakeError, asyncio.TimeoutError, ConnectionError, OSError) as e:
            logger.info("refused connection from %s: %s", endpoint,
                        e if not isinstance(e, asyncio.TimeoutError) else "handshake timed out")
            writer.close()
            return
        on_channel(channel)

    async def dial(self, address: PeerAddress, expected: PeerID | None) -> FrameChannel:
        if address.protocol == "memory":
            raise PeerUnreachableError(f"{address}: the TCP transport cannot dial in-memory addresses")
        endpoint = f"[{address.host}]:{address.port}" if address.protocol == "ip6" else f"{address.host}:{address.port}"
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(address.host, address.port, limit=_READ_LIMIT), self.limits.dial_timeout)
        except (OSError, asyncio.TimeoutError) as e:
            cause = "timed out" if isinstance(e, asyncio.TimeoutError) else (e.strerror or str(e))
            raise PeerUnreachableError(f"cannot connect to {address}: {cause}") from None
        try:
            return await asyncio.wait_for(
                initiate(reader, writer, self.identity, self._info, endpoint, expected, self.limits.max_frame_size),
                self.limits.handshake_timeout)
        except asyncio.TimeoutError:
            writer.close()
            raise HandshakeError(f"handshake with {endpoint} timed out after {self.limits.handshake_timeout} s") from None
        except BaseException:
            writer.close()
            raise

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._pending):
            task.cancel()
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
        if self._server is not None:
            try:
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            except (asyncio.TimeoutError, P2PError):
                pass
