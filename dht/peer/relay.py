"""Circuit relay (in the spirit of libp2p relay v2): a reachable peer forwards bytes for peers behind NAT.

Roles: the relay R, a NATed peer A holding a reservation on R, a dialer B that reaches A through R at
``/ip4/R_HOST/tcp/R_PORT/p2p/R/relay/p2p/A``.

Control, over ordinary authenticated connections to R (msgpack, version 1, requests <= 1 KiB)::

    relay.reserve  (stream, A -> R)  {"v": 1}  ->  {"v": 1, "ok": true, "ttl": s, "limits": {...}, "observed": IP}
                                     then, per circuit: {"connect": TOKEN_A (hex)}; ends with the reservation
    relay.connect  (unary, B -> R)   {"v": 1, "target": A}  ->  {"v": 1, "ok": true, "token": TOKEN_B (hex),
                                                                 "observed": IP}
    refusals:      RemoteError code "relay_refused" naming the limit (or "no reservation for ...")

(``observed``: the requester's IP as the relay sees it, which hole punching uses when no reachability
check told it; an IPv6 address may come as its /64.)

Circuit: R tells A (on its reservation stream), A opens a new TCP connection to R and sends the
prelude ``0xF1 0x02 TOKEN_A``; R then answers B, B opens a new TCP connection to R and sends
``0xF1 0x01 TOKEN_B``; R splices the two sockets. B and A then run the normal handshake end to end
through the splice (B initiates, expecting A's PeerID): R forwards ciphertext only, as raw bytes
(no re-framing, reads of up to 256 KiB, backpressure from each side's write buffer to the other's reads).

Limits (:class:`RelayLimits`, enforced by R; defaults: libp2p's relay v2 shape, raised for training
traffic as hivemind does): reservations in total and per source IP, their lifetime; circuits in
total, per peer (either end) and per dialer IP; bytes (both directions) and seconds per circuit,
after which R closes the circuit (the end-to-end connection then fails like any lost connection).
Each circuit's buffers (2 x ``buffer_bytes``) are reserved against R's resource budgets
(:mod:`dht.peer.resources`: the dialer's peer and IP memory budgets and the whole peer's), so
circuits cannot take more memory than inbound traffic may.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import secrets
import struct
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Callable

from .addresses import PeerAddress
from .channel import FrameChannel
from .errors import BadRequestError, P2PError, PeerUnreachableError, RemoteError, ResourceLimitError
from .identity import IdentityError, PeerID
from .resources import ip_key
from .untrusted import LogLimiter, brief

if TYPE_CHECKING:
    from .multiplex import Stream
    from .p2p import P2P, CallContext
    from .tcp_transport import TCPTransport

__all__ = ["RelayLimits", "RelayService", "RelayClient", "RelayRefusedError", "RESERVE_METHOD", "CONNECT_METHOD",
           "RAW_MAGIC", "is_relayed"]

logger = logging.getLogger(__name__)
RESERVE_METHOD, CONNECT_METHOD = "relay.reserve", "relay.connect"
VERSION = 1
RAW_MAGIC = 0xF1  # first byte of a circuit socket (a handshake's first byte is always 0)
DIAL, ACCEPT = 1, 2
TOKEN_BYTES = 16
_PRELUDE = struct.Struct(f"!BB{TOKEN_BYTES}s")
_refusals = LogLimiter(rate=0.2, burst=5.0)


class RelayRefusedError(P2PError):
    """The relay refuses a reservation or a circuit; the message names the limit."""

    code = "relay_refused"


@dataclass(frozen=True)
class RelayLimits:
    """What a relay allows (counts, bytes, seconds)."""

    max_reservations: int = 128
    max_reservations_per_ip: int = 8
    reservation_seconds: float = 3600.0  # then the NATed peer reserves again
    max_circuits: int = 256
    max_circuits_per_peer: int = 16  # open circuits of one PeerID, at either end
    max_circuits_per_ip: int = 64  # open circuits from one dialer's source IP (IPv6: its /64)
    circuit_bytes: int = 4 << 30  # both directions together (libp2p's default: 128 KiB; hivemind: 4 GiB)
    circuit_seconds: float = 1800.0  # (libp2p: 2 min; hivemind: 30 min)
    connect_timeout: float = 10.0  # seconds for the NATed peer to open its side of a circuit
    buffer_bytes: int = 1 << 20  # write-buffer high-water mark per direction


def is_relayed(channel: FrameChannel) -> bool:
    """Whether ``channel`` runs through a relay."""
    return getattr(channel, "relayed_via", None) is not None


def _mark(channel: FrameChannel, relay: PeerID) -> FrameChannel:
    channel.remote_host = None  # the socket's IP is the relay's: no per-IP budget of the peer's own
    channel.relayed_via = relay  # type: ignore[attr-defined]
    return channel


class _Reservation:
    __slots__ = ("peer_id", "ip", "queue", "expires", "circuits")

    def __init__(self, peer_id: PeerID, ip: str, expires: float):
        self.peer_id, self.ip, self.expires = peer_id, ip, expires
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()
        self.circuits = 0


class _Circuit:
    """A circuit from ``src`` (dialer) to ``dst`` (reserved peer) and the bytes it forwarded."""

    def __init__(self, service: "RelayService", src: PeerID, dst: PeerID, src_ip: str):
        self.service, self.src, self.dst, self.src_ip = service, src, dst, src_ip
        self.dial_token, self.accept_token = secrets.token_bytes(TOKEN_BYTES), secrets.token_bytes(TOKEN_BYTES)
        self.accepted = asyncio.Event()
        self.sides: dict[int, tuple[asyncio.StreamReader, asyncio.StreamWriter]] = {}
        self.halves: list[_Half] = []
        self.bytes = 0
        self.scope: Any = None  # the dialer's ConnectionScope holding the circuit's buffer budget
        self.started = time.monotonic()
        self.closed = False
        self.reason = ""
        self._timer: asyncio.TimerHandle | None = None

    def splice(self) -> None:
        limits = self.service.limits
        (dial_reader, dial_writer), (acc_reader, acc_writer) = self.sides[DIAL], self.sides[ACCEPT]
        dial_t, acc_t = dial_writer.transport, acc_writer.transport
        a, b = _Half(self, dial_t), _Half(self, acc_t)
        a.other, b.other = b, a
        self.halves = [a, b]
        for half, reader in ((a, dial_reader), (b, acc_reader)):
            half.transport.set_write_buffer_limits(high=limits.buffer_bytes)
            leftover = getattr(reader, "_buffer", None)
            data = bytes(leftover) if isinstance(leftover, bytearray) else b""
            if isinstance(leftover, bytearray):
                leftover.clear()
            half.transport.set_protocol(half)
            if data:
                half.data_received(data)
            if reader.at_eof():
                self.close("closed before the circuit started")
                return
            half.transport.resume_reading()
        self._timer = asyncio.get_running_loop().call_later(limits.circuit_seconds, self.close,
                                                            f"circuit duration limit ({limits.circuit_seconds:g} s)")

    def close(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.reason = reason
        if self._timer is not None:
            self._timer.cancel()
        for _, writer in self.sides.values():
            writer.transport.close()  # flushes what is buffered, then closes
        self.service._circuit_closed(self)


class _Half(asyncio.Protocol):
    """One socket of a spliced circuit: what it receives goes to the other one, as it is."""

    def __init__(self, circuit: _Circuit, transport: Any):
        self.circuit, self.transport = circuit, transport
        self.other: _Half = self

    def data_received(self, data: bytes) -> None:
        circuit = self.circuit
        circuit.bytes += len(data)
        if circuit.bytes > circuit.service.limits.circuit_bytes:
            circuit.close(f"circuit byte limit ({circuit.service.limits.circuit_bytes} bytes)")
            return
        self.other.transport.write(data)

    def eof_received(self) -> bool:
        self.circuit.close("one side closed")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.circuit.close("one side closed")

    def pause_writing(self) -> None:  # this socket's write buffer is full: stop reading the other one
        self.other.transport.pause_reading()

    def resume_writing(self) -> None:
        if not self.circuit.closed:
            self.other.transport.resume_reading()


class RelayService:
    """Serves ``relay.reserve`` and ``relay.connect`` on ``p2p`` and splices circuit sockets.
    ``enabled`` may be switched off (e.g. when this peer is found unreachable): requests are refused."""

    def __init__(self, p2p: "P2P", limits: RelayLimits | None = None):
        self.p2p = p2p
        self.limits = limits or RelayLimits()
        self.enabled = True
        self.reservations: dict[PeerID, _Reservation] = {}
        self._reservations_per_ip: dict[str, int] = {}
        self._tokens: dict[bytes, tuple[_Circuit, int]] = {}  # token -> (circuit, role) until it arrives
        self.circuits: set[_Circuit] = set()
        self._per_peer: dict[PeerID, int] = {}
        self._per_ip: dict[str, int] = {}
        self.circuits_total = self.refused = 0
        self.bytes_relayed = 0
        p2p.add_stream_handler(RESERVE_METHOD, self._reserve, max_message_size=1024)
        p2p.add_unary_handler(CONNECT_METHOD, self._connect, max_message_size=1024)
        transport = p2p.transport
        if hasattr(transport, "raw_handlers"):
            transport.raw_handlers[RAW_MAGIC] = self._on_raw

    def stat(self) -> dict[str, int]:
        return {"reservations": len(self.reservations), "circuits": len(self.circuits),
                "circuits_total": self.circuits_total, "bytes_relayed": self.bytes_relayed, "refused": self.refused}

    def _refuse(self, message: str, peer: PeerID) -> RelayRefusedError:
        self.refused += 1
        _refusals.log(logger, logging.INFO, peer, "relay refused %s: %s", peer.short(), message)
        return RelayRefusedError(message)

    def _ip(self, ctx: "CallContext") -> str:
        from .admission import host_of

        host = self.p2p.observed_host(ctx.peer_id) or host_of(ctx.endpoint) or ctx.endpoint[:100]
        return ip_key(host)

    # ---- reservations ------------------------------------------------------------------------
    async def _reserve(self, stream: "Stream", ctx: "CallContext") -> None:
        request = await stream.recv()
        if not isinstance(request, dict) or request.get("v") != VERSION:
            raise BadRequestError(f"relay.reserve request must be a map with v={VERSION}, got {brief(request)}")
        peer, ip, limits = ctx.peer_id, self._ip(ctx), self.limits
        if not self.enabled:
            raise self._refuse("this peer does not relay (not reachable, or --relay off)", peer)
        if peer in self.reservations:
            self._drop_reservation(self.reservations[peer])  # the newest reservation of a peer wins
        if len(self.reservations) >= limits.max_reservations:
            raise self._refuse(f"reservation limit reached ({limits.max_reservations} reservations)", peer)
        if self._reservations_per_ip.get(ip, 0) >= limits.max_reservations_per_ip:
            raise self._refuse(f"reservation limit per IP reached ({limits.max_reservations_per_ip} from {ip})", peer)
        loop = asyncio.get_running_loop()
        reservation = _Reservation(peer, ip, loop.time() + limits.reservation_seconds)
        self.reservations[peer] = reservation
        self._reservations_per_ip[ip] = self._reservations_per_ip.get(ip, 0) + 1
        try:
            await stream.send({"v": VERSION, "ok": True, "ttl": limits.reservation_seconds, "observed": ip[:64],
                               "limits": {k: v for k, v in asdict(limits).items() if k != "buffer_bytes"}})
            ended = asyncio.ensure_future(_until_end(stream))
            try:
                while True:
                    getter = asyncio.ensure_future(reservation.queue.get())
                    remaining = reservation.expires - loop.time()
                    done, _ = await asyncio.wait({getter, ended}, timeout=max(remaining, 0.0),
                                                 return_when=asyncio.FIRST_COMPLETED)
                    if getter not in done:
                        getter.cancel()
                        return  # the peer left, or the reservation expired (the peer reserves again)
                    await stream.send({"connect": getter.result().hex()})
            finally:
                ended.cancel()
        finally:
            if self.reservations.get(peer) is reservation:
                self._drop_reservation(reservation)

    def _drop_reservation(self, reservation: _Reservation) -> None:
        if self.reservations.get(reservation.peer_id) is reservation:
            del self.reservations[reservation.peer_id]
            left = self._reservations_per_ip.pop(reservation.ip, 1) - 1
            if left > 0:
                self._reservations_per_ip[reservation.ip] = left

    # ---- circuits ------------------------------------------------------------------------------
    async def _connect(self, request: Any, ctx: "CallContext") -> dict:
        if not isinstance(request, dict) or request.get("v") != VERSION or not isinstance(request.get("target"), str):
            raise BadRequestError(f"relay.connect request must be {{'v': {VERSION}, 'target': PEERID}}, "
                                  f"got {brief(request)}")
        try:
            target = PeerID.from_base58(request["target"][:100])
        except IdentityError as e:
            raise BadRequestError(f"relay.connect target: {e}") from None
        src, ip, limits = ctx.peer_id, self._ip(ctx), self.limits
        if not self.enabled:
            raise self._refuse("this peer does not relay (not reachable, or --relay off)", src)
        reservation = self.reservations.get(target)
        if reservation is None:
            raise self._refuse(f"no reservation for peer {target} on this relay", src)
        if len(self.circuits) + len(self._tokens) // 2 >= limits.max_circuits:
            raise self._refuse(f"circuit limit reached ({limits.max_circuits} circuits)", src)
        for who in (src, target):
            if self._per_peer.get(who, 0) >= limits.max_circuits_per_peer:
                raise self._refuse(f"circuit limit per peer reached ({limits.max_circuits_per_peer} circuits "
                                   f"of {who})", src)
        if self._per_ip.get(ip, 0) >= limits.max_circuits_per_ip:
            raise self._refuse(f"circuit limit per IP reached ({limits.max_circuits_per_ip} from {ip})", src)
        scope = self.p2p.resources.open_connection(src, ip)  # the peer layer's budgets, per peer / IP / in all
        try:
            scope.reserve(2 * limits.buffer_bytes)  # both directions' write buffers, at most
        except ResourceLimitError as e:
            scope.close()
            raise self._refuse(f"relay memory budget spent: {e}", src) from None
        circuit = _Circuit(self, src, target, ip)
        circuit.scope = scope
        self._count(circuit, +1)
        self._tokens[circuit.accept_token] = (circuit, ACCEPT)
        self._tokens[circuit.dial_token] = (circuit, DIAL)
        reservation.queue.put_nowait(circuit.accept_token)
        try:
            await asyncio.wait_for(circuit.accepted.wait(), limits.connect_timeout)
        except asyncio.TimeoutError:
            circuit.close("the reserved peer did not connect")
            raise self._refuse(f"peer {target} did not open its side of the circuit within "
                               f"{limits.connect_timeout:g} s", src) from None
        except BaseException:
            circuit.close("cancelled")
            raise

        def expire() -> None:  # the dialer never came
            if DIAL not in circuit.sides:
                circuit.close("the dialer did not connect")

        asyncio.get_running_loop().call_later(limits.connect_timeout, expire)
        return {"v": VERSION, "ok": True, "token": circuit.dial_token.hex(), "observed": ip[:64]}

    def _count(self, circuit: _Circuit, delta: int) -> None:
        keys: tuple[tuple[dict[Any, int], Any], ...] = (
            (self._per_peer, circuit.src), (self._per_peer, circuit.dst), (self._per_ip, circuit.src_ip))
        for counts, key in keys:
            value = counts.get(key, 0) + delta
            if value > 0:
                counts[key] = value
            else:
                counts.pop(key, None)

    async def _on_raw(self, first: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ip: str) -> bool:
        """A socket that starts with RAW_MAGIC: one side of a circuit (kept) or junk (closed)."""
        data = await reader.readexactly(_PRELUDE.size - 1)
        role, token = data[0], data[1:]
        entry = self._tokens.get(token)
        if entry is None or entry[1] != role:
            return False
        circuit = entry[0]
        del self._tokens[token]
        circuit.sides[role] = (reader, writer)
        if role == ACCEPT:
            circuit.accepted.set()
            return True
        if ACCEPT not in circuit.sides or circuit.closed:
            return False
        self.circuits.add(circuit)
        self.circuits_total += 1
        circuit.splice()
        return True

    def _circuit_closed(self, circuit: _Circuit) -> None:
        if circuit.scope is not None:
            circuit.scope.close()
        self._tokens.pop(circuit.accept_token, None)
        self._tokens.pop(circuit.dial_token, None)
        self.bytes_relayed += circuit.bytes
        self._count(circuit, -1)
        self.circuits.discard(circuit)
        logger.debug("relay circuit %s -> %s closed (%s) after %d bytes", circuit.src.short(), circuit.dst.short(),
                     circuit.reason, circuit.bytes)

    def close(self) -> None:
        self.enabled = False
        for circuit in list(self.circuits):
            circuit.close("relay shutting down")
        for circuit, _ in list(self._tokens.values()):
            circuit.close("relay shutting down")


async def _until_end(stream: "Stream") -> None:
    """Wait until the other side ends or cancels ``stream`` (it sends nothing more on a reservation)."""
    try:
        while True:
            await stream.recv()
    except P2PError:
        return


class RelayClient:
    """The NATed side and the dialer side: holds reservations, opens circuits, dials through relays.
    Sets ``p2p.relay_dialer``; :attr:`addresses` are the relay addresses this peer is reachable at."""

    def __init__(self, p2p: "P2P", *, connect_timeout: float = 10.0):
        self.p2p = p2p
        self.connect_timeout = connect_timeout
        self.held: dict[PeerID, PeerAddress] = {}  # relay -> our relayed address through it
        self._tasks: dict[PeerID, asyncio.Task] = {}
        self._accepting: set[asyncio.Task] = set()
        self.circuits_dialed = self.circuits_accepted = 0
        self.announce_direct = True  # False: announce only relay addresses (once there are some)
        self.observed_ip: str | None = None  # our IP as the last relay that answered saw it
        self.on_dialed: Callable[[PeerID], None] | None = None  # called soon after each circuit we dial
        self._closed = False
        p2p.relay_dialer = self.dial

    @property
    def _transport(self) -> "TCPTransport":
        transport = self.p2p.transport
        if not hasattr(transport, "open_raw"):
            raise PeerUnreachableError("relays need the TCP transport")
        return transport  # type: ignore[return-value]

    # ---- dialer --------------------------------------------------------------------------------
    async def dial(self, address: PeerAddress) -> FrameChannel:
        """Reach ``address.peer_id`` through the relay of ``address``; PeerUnreachableError names why not."""
        target = address.peer_id
        if target is None:
            raise PeerUnreachableError(f"{address}: a relayed address needs the target's /p2p/PEERID")
        relay = address.relay_address()
        try:
            reply = await self.p2p.call(relay, CONNECT_METHOD, {"v": VERSION, "target": str(target)},
                                        timeout=self.connect_timeout + 5.0)
        except RemoteError as e:
            raise PeerUnreachableError(f"relay {relay.host}:{relay.port} refused a circuit to {target}: {e}") from None
        except asyncio.TimeoutError:
            raise PeerUnreachableError(f"relay {relay.host}:{relay.port} did not answer") from None
        token = _token(reply)
        self._observed(reply)
        transport = self._transport
        reader, writer = await transport.open_raw(relay.host, relay.port, _PRELUDE.pack(RAW_MAGIC, DIAL, token))
        channel = await transport.handshake_raw(reader, writer, f"{target.short()} via relay {relay.host}:{relay.port}",
                                                initiator=True, expected=target)
        self.circuits_dialed += 1
        if self.on_dialed is not None:  # after P2P adopted the connection (it does so before its next await)
            asyncio.get_running_loop().call_soon(self.on_dialed, target)
        return _mark(channel, relay.peer_id)  # type: ignore[arg-type]

    # ---- reservations ------------------------------------------------------------------------
    async def reserve(self, relay: PeerAddress, timeout: float = 10.0) -> PeerAddress:
        """Reserve a slot on ``relay`` (a direct address with /p2p) and keep it (re-reserving when it
        expires); returns our relayed address. RelayRefusedError / P2PError if refused or unreachable."""
        if relay.peer_id is None:
            raise ValueError(f"{relay}: a relay address needs /p2p/PEERID")
        # the relay serves the reservation for at most this long (then we reserve again)
        stream = await self.p2p.open_stream(relay, RESERVE_METHOD, timeout=self.p2p.limits.max_handler_timeout)
        try:
            await stream.send({"v": VERSION})
            reply = await asyncio.wait_for(stream.recv(), timeout)
        except RemoteError as e:
            await stream.aclose()
            raise RelayRefusedError(f"relay {relay}: {e}") from None
        except BaseException:
            await stream.aclose()
            raise
        if not isinstance(reply, dict) or reply.get("ok") is not True:
            await stream.aclose()
            raise RelayRefusedError(f"relay {relay}: malformed answer {brief(reply)}")
        self._observed(reply)
        address = PeerAddress(relay.protocol, relay.host, relay.port, None, relay.peer_id)
        self.held[relay.peer_id] = address
        self._publish()
        old = self._tasks.pop(relay.peer_id, None)
        if old is not None:
            old.cancel()
        self._tasks[relay.peer_id] = asyncio.ensure_future(self._hold(relay, stream))
        return address

    async def _hold(self, relay: PeerAddress, stream: "Stream") -> None:
        try:
            async for message in stream:
                if isinstance(message, dict) and isinstance(message.get("connect"), str):
                    try:
                        token = bytes.fromhex(message["connect"][:2 * TOKEN_BYTES])
                    except ValueError:
                        continue
                    if len(token) == TOKEN_BYTES:
                        task = asyncio.ensure_future(self._accept(relay, token))
                        self._accepting.add(task)
                        task.add_done_callback(self._accepting.discard)
        except P2PError as e:
            logger.info("reservation on relay %s ended: %s", relay, e)
        finally:
            await stream.aclose()
            assert relay.peer_id is not None
            if self._tasks.get(relay.peer_id) is asyncio.current_task():
                del self._tasks[relay.peer_id]
                self.held.pop(relay.peer_id, None)
                self._publish()
                if not self._closed:
                    self._tasks[relay.peer_id] = asyncio.ensure_future(self._renew(relay))

    async def _renew(self, relay: PeerAddress) -> None:
        delay = 1.0
        while not self._closed:
            await asyncio.sleep(delay)
            try:
                self._tasks.pop(relay.peer_id, None)  # type: ignore[arg-type]
                await self.reserve(relay)
                return
            except (P2PError, asyncio.TimeoutError, OSError) as e:
                logger.info("re-reserving on relay %s failed: %s", relay, e)
                delay = min(2 * delay, 60.0)
                if delay >= 60.0:
                    return  # gave up on this relay; NatService picks another one

    async def _accept(self, relay: PeerAddress, token: bytes) -> None:
        transport = self._transport
        try:
            reader, writer = await transport.open_raw(relay.host, relay.port, _PRELUDE.pack(RAW_MAGIC, ACCEPT, token))
            channel = await transport.handshake_raw(reader, writer, f"a peer via relay {relay.host}:{relay.port}",
                                                    initiator=False)
        except P2PError as e:
            logger.info("circuit through relay %s failed: %s", relay, e)
            return
        assert relay.peer_id is not None
        channel.endpoint = f"{channel.remote_peer_id.short()} via relay {relay.host}:{relay.port}"
        self.circuits_accepted += 1
        self.p2p.accept_channel(_mark(channel, relay.peer_id))

    def _observed(self, reply: dict) -> None:
        observed = reply.get("observed")
        if isinstance(observed, str) and "/" not in observed:
            try:
                self.observed_ip = str(ipaddress.ip_address(observed))
            except ValueError:
                pass

    def _publish(self) -> None:
        self.p2p.set_extra_addresses(list(self.held.values()), self.announce_direct)

    async def close(self) -> None:
        self._closed = True
        tasks = [*self._tasks.values(), *self._accepting]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.held.clear()


def _token(reply: Any) -> bytes:
    if not isinstance(reply, dict) or reply.get("ok") is not True or not isinstance(reply.get("token"), str):
        raise PeerUnreachableError(f"relay: malformed circuit answer {brief(reply)}")
    try:
        token = bytes.fromhex(reply["token"][:2 * TOKEN_BYTES])
    except ValueError:
        raise PeerUnreachableError("relay: malformed circuit token") from None
    if len(token) != TOKEN_BYTES:
        raise PeerUnreachableError("relay: malformed circuit token")
    return token
