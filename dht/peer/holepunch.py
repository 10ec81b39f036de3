"""Hole punching (DCUtR-like): turn a relayed connection into a direct one by a timed TCP simultaneous open.

Over the relayed connection, the peer that dialed through the relay (D) opens ``nat.holepunch``
(version 1, messages <= 2 KiB) with the other one (L)::

    D -> L  {"v": 1, "addrs": [D's addresses], "token": 16 random bytes (hex)}     (D starts its clock)
    L -> D  {"v": 1, "addrs": [L's addresses]}                                     (D: RTT measured)
    D -> L  {"sync": attempt}        L connects at once; D connects RTT/2 later, so the SYNs cross
    L -> D  {"ok": bool}             at the end of the attempt

Addresses are each side's public IP as the reachability helpers saw it, with its listening port (a
port-preserving NAT maps the listening port to the same public port), then its listening addresses.
Both sides connect *from their listening port* (SO_REUSEADDR + SO_REUSEPORT) to every address of the
other. Whatever socket comes up (a simultaneous open, or one side's SYN accepted by the other's
listener), both ends first send the prelude ``0xF2 TOKEN`` (a listener recognises it by the first
byte) and check the other's, then run the normal handshake: D initiates (and checks L's PeerID), L
responds. On success the direct connection is used for everything new and the relayed one is retired
(closed once idle, which releases the relay circuit); up to ``attempts`` (3) tries, then the peers keep
the relay (symmetric NATs). Outcomes are counted in :class:`HolePunchStats`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from .addresses import PeerAddress
from .admission import KeyedBuckets
from .channel import FrameChannel
from .errors import BadRequestError, OverloadedError, P2PError
from .identity import PeerID
from .reachability import parse_address_list
from .relay import is_relayed

if TYPE_CHECKING:
    from .multiplex import Connection, Stream
    from .p2p import P2P, CallContext
    from .tcp_transport import TCPTransport

__all__ = ["HOLEPUNCH_METHOD", "HolePuncher", "HolePunchStats", "PUNCH_MAGIC"]

logger = logging.getLogger(__name__)
HOLEPUNCH_METHOD = "nat.holepunch"
VERSION = 1
PUNCH_MAGIC = 0xF2
TOKEN_BYTES = 16
MAX_ADDRS = 8


@dataclass
class HolePunchStats:
    """Outcomes: upgrades tried (per peer), attempts (simultaneous opens), successes, on the first attempt."""

    upgrades: int = 0
    attempts: int = 0
    successes: int = 0
    first_try: int = 0
    failures: int = 0
    served: int = 0  # attempts where the other peer started the upgrade


class _Session:
    def __init__(self, peer_id: PeerID, initiator: bool):
        self.peer_id, self.initiator = peer_id, initiator
        self.done: asyncio.Future[FrameChannel] = asyncio.get_running_loop().create_future()


class HolePuncher:
    """Upgrades relayed connections of ``p2p`` (``attempts`` tries each, ``attempt_timeout`` seconds at least per
    try); ``observed_ip`` gives this peer's public IP as others see it (None: unknown)."""

    def __init__(self, p2p: "P2P", observed_ip: Callable[[], str | None] = lambda: None, *, attempts: int = 3,
                 attempt_timeout: float = 2.0, retry_after: float = 300.0):
        self.p2p = p2p
        self.observed_ip = observed_ip
        self.attempts, self.attempt_timeout, self.retry_after = attempts, attempt_timeout, retry_after
        self.stats = HolePunchStats()
        self._sessions: dict[bytes, _Session] = {}
        self._running: set[PeerID] = set()
        self._failed: dict[PeerID, float] = {}
        self._tasks: set[asyncio.Task] = set()
        self.upgrade_seconds: list[float] = []  # relayed -> direct, per success (bounded)
        self._serve_rate = KeyedBuckets(0.2, 2.0 * attempts)  # attempts served per peer: at once, per second
        p2p.add_stream_handler(HOLEPUNCH_METHOD, self._serve, max_message_size=2048)
        transport = p2p.transport
        if hasattr(transport, "raw_handlers"):
            transport.raw_handlers[PUNCH_MAGIC] = self._on_raw

    @property
    def _transport(self) -> "TCPTransport":
        return self.p2p.transport  # type: ignore[return-value]

    def _addresses(self) -> list[str]:
        own = [a for a in getattr(self._transport, "listen_addresses", []) if a.protocol in ("ip4", "ip6")]
        out = []
        ip = self.observed_ip()
        if ip is not None and own:
            port = next((a.port for a in own if (":" in a.host) == (":" in ip)), own[0].port)
            out.append(str(PeerAddress.from_host_port(ip, port)))
        out += [str(a) for a in own]
        return list(dict.fromkeys(out))[:MAX_ADDRS]

    def schedule(self, peer_id: PeerID) -> None:
        """Try to upgrade our relayed connection with ``peer_id`` in the background (once at a time;
        not again for ``retry_after`` seconds after it failed)."""
        now = time.monotonic()
        if peer_id in self._running or self._failed.get(peer_id, 0.0) > now:
            return
        self._spawn(self.upgrade(peer_id))

    def _relayed(self, peer_id: PeerID) -> "Connection | None":
        for conn in reversed(self.p2p.connections_to(peer_id)):
            if is_relayed(conn.channel):
                return conn
        return None

    async def upgrade(self, peer_id: PeerID) -> bool:
        """Hole-punch a direct connection to ``peer_id`` (which we reach through a relay); True on success."""
        if peer_id in self._running:
            return False
        self._running.add(peer_id)
        self.stats.upgrades += 1
        start = time.perf_counter()
        try:
            for attempt in range(self.attempts):
                relayed = self._relayed(peer_id)
                if relayed is None:
                    return False
                self.stats.attempts += 1
                try:
                    ok = await self._attempt(peer_id, attempt)
                except (P2PError, asyncio.TimeoutError, OSError) as e:
                    logger.debug("hole punch to %s, attempt %d: %s", peer_id.short(), attempt + 1, e)
                    ok = False
                if ok:
                    self.stats.successes += 1
                    self.stats.first_try += attempt == 0
                    self.upgrade_seconds = [*self.upgrade_seconds[-99:], time.perf_counter() - start]
                    logger.info("nat: hole punch to %s succeeded (attempt %d, %.2f s): direct connection",
                                peer_id.short(), attempt + 1, time.perf_counter() - start)
                    self._retire(relayed)
                    return True
            self.stats.failures += 1
            self._failed[peer_id] = time.monotonic() + self.retry_after
            if len(self._failed) > 4096:
                self._failed.pop(next(iter(self._failed)))
            logger.info("nat: hole punch to %s failed after %d attempts: staying on the relay", peer_id.short(),
                        self.attempts)
            return False
        finally:
            self._running.discard(peer_id)

    async def _attempt(self, peer_id: PeerID, attempt: int) -> bool:
        token = secrets.token_bytes(TOKEN_BYTES)
        session = self._sessions[token] = _Session(peer_id, initiator=True)
        try:
            stream = await self.p2p.open_stream(peer_id, HOLEPUNCH_METHOD, timeout=self.attempt_timeout + 10.0)
            async with stream:
                t0 = time.perf_counter()
                await stream.send({"v": VERSION, "addrs": self._addresses(), "token": token.hex()})
                reply = await stream.recv()
                rtt = time.perf_counter() - t0
                targets = _parse_addrs(reply)
                await stream.send({"sync": attempt})
                await asyncio.sleep(rtt / 2)
                dials = [asyncio.ensure_future(self._dial(a, token, session)) for a in targets]
                try:
                    channel = await asyncio.wait_for(asyncio.shield(session.done), max(self.attempt_timeout, 4 * rtt))
                except asyncio.TimeoutError:
                    return False
                finally:
                    await _settle(dials)
                outcome = await stream.recv()
                ok = isinstance(outcome, dict) and outcome.get("ok") is True
                if not ok:
                    channel.close()
                return ok
        finally:
            self._sessions.pop(token, None)
            if not session.done.done():
                session.done.cancel()

    async def _serve(self, stream: "Stream", ctx: "CallContext") -> None:
        """The other side of :meth:`_attempt`."""
        request = await stream.recv()
        targets = _parse_addrs(request)
        if self._relayed(ctx.peer_id) is None:
            raise BadRequestError("hole punch: only over a relayed connection")
        if not self._serve_rate.take(ctx.peer_id):
            raise OverloadedError("hole punch: too many attempts from this peer; retry later")
        try:
            token = bytes.fromhex(request.get("token", "")[:2 * TOKEN_BYTES])
        except (ValueError, AttributeError):
            token = b""
        if len(token) != TOKEN_BYTES or token in self._sessions:
            raise BadRequestError("hole punch: 'token' must be 16 fresh bytes in hex")
        session = self._sessions[token] = _Session(ctx.peer_id, initiator=False)
        self.stats.served += 1
        try:
            await stream.send({"v": VERSION, "addrs": self._addresses()})
            await stream.recv()  # sync: connect now
            start = time.perf_counter()
            dials = [asyncio.ensure_future(self._dial(a, token, session)) for a in targets]
            try:
                await asyncio.wait_for(asyncio.shield(session.done), self.attempt_timeout + 1.0)
                ok = True
            except asyncio.TimeoutError:
                ok = False
            finally:
                await _settle(dials)
            await stream.send({"ok": ok}, end=True)
            if ok:
                logger.info("nat: hole punch from %s succeeded (%.2f s): direct connection", ctx.peer_id.short(),
                            time.perf_counter() - start)
                relayed = self._relayed(ctx.peer_id)
                if relayed is not None:
                    self._retire(relayed)
        finally:
            self._sessions.pop(token, None)
            if not session.done.done():
                session.done.cancel()

    # ---- sockets -------------------------------------------------------------------------------
    async def _dial(self, address: PeerAddress, token: bytes, session: _Session) -> None:
        transport = self._transport
        bound = [(h, p) for h, p in getattr(transport, "bound", []) if (":" in h) == (":" in address.host)]
        if not bound:
            return
        local_host, local_port = bound[0]
        if local_host in ("0.0.0.0", "::"):
            local_host = None
        deadline = time.monotonic() + self.attempt_timeout
        for _ in range(20):  # connection attempts (a refused SYN is retried shortly)
            if session.done.done() or time.monotonic() >= deadline:
                return
            try:
                reader, writer = await transport.open_raw(address.host, address.port, bytes([PUNCH_MAGIC]) + token,
                                                          local_port=local_port, local_host=local_host,
                                                          timeout=max(deadline - time.monotonic(), 0.1))
            except P2PError:
                await asyncio.sleep(0.05)  # e.g. refused before the other side's SYN went out: try again
                continue
            try:
                first = await asyncio.wait_for(reader.readexactly(1 + TOKEN_BYTES), self.attempt_timeout)
            except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError, OSError):
                writer.transport.abort()
                continue
            if first != bytes([PUNCH_MAGIC]) + token:
                writer.transport.abort()
                return
            await self._handshake(reader, writer, session, f"{address.host}:{address.port}")
            return

    async def _on_raw(self, first: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ip: str) -> bool:
        """A socket at our listener that starts with PUNCH_MAGIC: the other side's SYN got here first."""
        token = await reader.readexactly(TOKEN_BYTES)
        session = self._sessions.get(token)
        if session is None or session.done.done():
            return False
        writer.write(bytes([PUNCH_MAGIC]) + token)
        self._spawn(self._handshake(reader, writer, session, ip))  # beyond the pending budget
        return True

    async def _handshake(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, session: _Session,
                         endpoint: str) -> None:
        try:
            channel = await self._transport.handshake_raw(reader, writer, endpoint, initiator=session.initiator,
                                                          expected=session.peer_id if session.initiator else None)
        except P2PError as e:
            logger.debug("hole-punched socket to %s: %s", endpoint, e)
            return
        if channel.remote_peer_id != session.peer_id:
            channel.close()
            return
        if session.initiator:
            self.p2p.adopt_channel(channel, initiator=True)
        else:
            self.p2p.accept_channel(channel)
        if not session.done.done():
            session.done.set_result(channel)

    def _retire(self, conn: "Connection") -> None:
        """Stop new calls on the relayed connection and close it once its calls are over (<= 30 s)."""
        self.p2p.retire(conn, "upgraded to a direct connection")
        self._spawn(_close_when_idle(conn))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def status(self) -> dict[str, Any]:
        return {"holepunch_upgrades": self.stats.upgrades, "holepunch_attempts": self.stats.attempts,
                "holepunch_successes": self.stats.successes, "holepunch_first_try": self.stats.first_try}

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def _close_when_idle(conn: "Connection", longest: float = 30.0) -> None:
    give_up = time.monotonic() + longest
    while conn.num_streams and time.monotonic() < give_up and not conn.closed:
        await asyncio.sleep(0.1)
    conn.close("upgraded to a direct connection")


async def _settle(tasks: list[asyncio.Task]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _parse_addrs(message: Any) -> list[PeerAddress]:
    out = []
    for address in parse_address_list(message, "hole punch message", VERSION, 0, MAX_ADDRS, 128):
        if address.protocol not in ("ip4", "ip6") or address.relay is not None or address.port == 0:
            continue
        ip = ipaddress.ip_address(address.host)
        if ip.is_multicast or ip.is_unspecified:
            continue
        out.append(address.without_peer_id())
    return list(dict.fromkeys(out))
