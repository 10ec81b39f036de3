"""In-memory transport: the same P2P interface, without sockets, with injectable latency and loss.

>>> network = MemoryNetwork(latency=0.05, loss=0.01, seed=0)
>>> a, b = await network.create_peer(), await network.create_peer()
>>> await a.call(b.get_visible_addresses()[0], "p2p.ping", b"")

Frames between two peers arrive in order after ``latency`` seconds (a number, or a function of the
random generator returning one, e.g. ``lambda rng: rng.uniform(0.01, 0.2)``). ``loss`` is the
probability that a new call (its OPEN frame, hence everything on that stream) is dropped, so the
caller sees its deadline pass, like a lost datagram. ``kill(peer_id)`` makes a peer vanish silently:
frames to and from it are dropped and dialing it hangs until the dial timeout, as with a host that
lost power. By default identities are trusted (the network is one process) and a connection costs
one round trip; with ``secure=True`` each connection runs the real handshake
(:mod:`dht.peer.handshake_state`, M1-M4 over the link: one and a half round trips, Ed25519 and
X25519 work per side), so a peer must prove its PeerID as over TCP. Frames are never encrypted.
Run on :mod:`dht.peer.virtual_clock` for simulations that take virtual hours in seconds.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import random
from typing import Callable, Union

from .addresses import PeerAddress
from .channel import FrameChannel, PeerInfo
from .errors import ConnectionLostError, HandshakeError, PeerUnreachableError
from .handshake import within
from .handshake_state import HandshakeResult, InitiatorHandshake, ResponderHandshake
from .identity import Identity, PeerID
from .multiplex import OPEN, Limits
from .p2p import P2P
from .transport import Transport

__all__ = ["MemoryNetwork", "MemoryTransport", "MemoryChannel"]

logger = logging.getLogger(__name__)

Latency = Union[float, Callable[[random.Random], float]]


class MemoryChannel(FrameChannel):
    """One end of an in-memory connection."""

    def __init__(self, network: "MemoryNetwork", local: "MemoryTransport", remote: "MemoryTransport"):
        super().__init__(remote.identity.peer_id, remote.info, f"memory:{remote.name}")
        self._network, self._local, self._remote = network, local, remote
        self._peer: MemoryChannel | None = None
        self._inbox: collections.deque[bytes | None] = collections.deque()
        self._readable = asyncio.Event()
        self._closed = False
        self._in_flight: collections.deque[tuple[float, bytes | None]] = collections.deque()
        self._pump: asyncio.TimerHandle | None = None

    def write_frame(self, data: bytes | bytearray | memoryview, head: bytes = b"") -> None:
        if self._closed:
            raise ConnectionLostError(f"connection to {self.describe()} is closed")
        data = head + bytes(data) if head else data
        if data[0] == OPEN and self._network.loss and self._network.rng.random() < self._network.loss:
            return
        self._send(bytes(data))

    def _send(self, item: bytes | None) -> None:
        if not (self._local.alive and self._remote.alive) or self._peer is None:
            return  # a silently dead host neither sends nor receives
        loop = asyncio.get_running_loop()
        when = loop.time() + self._network.sample_latency()
        if self._in_flight:
            when = max(when, self._in_flight[-1][0])  # a link delivers in order
        self._in_flight.append((when, item))
        if self._pump is None:
            self._pump = loop.call_at(when, self._deliver_due)

    def _deliver_due(self) -> None:
        # one timer per link, not per frame: the loop's timer heap does not keep equal times in order
        loop = asyncio.get_running_loop()
        self._pump = None
        now = loop.time()
        peer = self._peer
        assert peer is not None  # set before anything is sent
        while self._in_flight and self._in_flight[0][0] <= now:
            peer._deliver(self._in_flight.popleft()[1])
        if self._in_flight:
            self._pump = loop.call_at(self._in_flight[0][0], self._deliver_due)

    def _deliver(self, item: bytes | None) -> None:
        if not self._closed and self._local.alive:
            self._inbox.append(item)
            self._readable.set()

    async def drain(self) -> None:
        if self._closed:
            raise ConnectionLostError(f"connection to {self.describe()} is closed")

    async def read_frame(self) -> bytes:
        while not self._inbox:
            if self._closed:
                raise ConnectionLostError(f"connection to {self.describe()} closed")
            self._readable.clear()
            await self._readable.wait()
        item = self._inbox.popleft()
        if item is None:
            self._closed = True
            raise ConnectionLostError(f"connection to {self.describe()} closed by the peer")
        return item

    def close(self) -> None:
        if not self._closed:
            self._send(None)  # EOF reaches the other side after the link latency
            self._closed = True
            self._readable.set()

    async def wait_closed(self) -> None:
        return None

    async def handshake(self, machine: InitiatorHandshake | ResponderHandshake, timeout: float) -> None:
        """Run ``machine`` over this link (the initiator's M1 already sent) for at most ``timeout``
        seconds; then this channel's remote PeerID and info are the ones the other side proved.
        Raises the HandshakeError that ended it (the channel is closed then)."""
        try:
            result = await within(self._run(machine), timeout)
        except asyncio.TimeoutError:
            self.close()
            raise HandshakeError(f"{machine.what} timed out after {timeout:g} s") from None
        except BaseException:
            self.close()
            raise
        self.remote_peer_id, self.remote_info = result.remote_peer_id, result.remote_info

    async def _run(self, machine: InitiatorHandshake | ResponderHandshake) -> HandshakeResult:
        while machine.outcome is None:
            try:
                data = await self.read_frame()
            except ConnectionLostError as e:
                machine.receive_eof(type(e).__name__)
                break
            out = machine.receive_data(data)
            if out:
                self._send(out)  # handshake messages are never lost (loss drops calls)
        if isinstance(machine.outcome, HandshakeError):
            raise machine.outcome
        assert isinstance(machine.outcome, HandshakeResult)
        return machine.outcome


class MemoryTransport(Transport):
    """A peer's attachment to a MemoryNetwork, addressed as ``/memory/NAME``."""

    def __init__(self, network: "MemoryNetwork", identity: Identity, limits: Limits, name: str):
        self.network, self.identity, self.limits, self.name = network, identity, limits, name
        self.info = PeerInfo([f"/memory/{name}"], limits.stream_window, limits.max_message_size)
        self.alive = True
        self.listening = False
        self._on_channel: Callable[[FrameChannel], None] | None = None
        self._handshakes: set[asyncio.Task] = set()  # responder sides of secure connections in progress

    async def listen(self, on_channel: Callable[[FrameChannel], None]) -> list[PeerAddress]:
        self._on_channel = on_channel
        self.listening = True
        return [PeerAddress("memory", self.name)]

    async def dial(self, address: PeerAddress, expected: PeerID | None) -> FrameChannel:
        if not self.alive:
            raise PeerUnreachableError("this peer is dead")
        target = self.network._transports.get(address.host) if address.protocol == "memory" else None
        if target is None or not target.listening:
            await asyncio.sleep(self.network.sample_latency())
            raise PeerUnreachableError(f"cannot connect to {address}: connection refused")
        if not target.alive:
            await asyncio.sleep(self.limits.dial_timeout)
            raise PeerUnreachableError(f"cannot connect to {address}: timed out")
        if self.network.secure:
            return await self._dial_secure(target, expected)
        await asyncio.sleep(2 * self.network.sample_latency())  # one round trip for the handshake
        if expected is not None and target.identity.peer_id != expected:
            raise HandshakeError(f"handshake with memory:{target.name}: expected peer {expected}, "
                                 f"but the peer there is {target.identity.peer_id}")
        if not (target.alive and target.listening and self.alive) or target._on_channel is None:
            raise PeerUnreachableError(f"cannot connect to {address}: the peer went away")
        ours, theirs = self._link(target)
        target._on_channel(theirs)
        return ours

    def _link(self, target: "MemoryTransport") -> tuple[MemoryChannel, MemoryChannel]:
        ours, theirs = MemoryChannel(self.network, self, target), MemoryChannel(self.network, target, self)
        ours._peer, theirs._peer = theirs, ours
        return ours, theirs

    async def _dial_secure(self, target: "MemoryTransport", expected: PeerID | None) -> FrameChannel:
        ours, theirs = self._link(target)
        task = asyncio.get_running_loop().create_task(target._respond(theirs))
        target._handshakes.add(task)
        task.add_done_callback(target._handshakes.discard)
        machine = InitiatorHandshake(self.identity, self.info, f"memory:{target.name}", expected)
        ours._send(machine.initial_bytes)
        await ours.handshake(machine, self.limits.handshake_timeout)
        return ours

    async def _respond(self, channel: MemoryChannel) -> None:
        """The listener's side of a secure connection: hand the channel over once the dialer proved its key."""
        machine = ResponderHandshake(self.identity, self.info, channel.endpoint)
        try:
            await channel.handshake(machine, self.limits.handshake_timeout)
        except HandshakeError as e:
            logger.debug("memory:%s refused a connection: %s", self.name, e)
            return
        if not (self.alive and self.listening) or self._on_channel is None:
            channel.close()
            return
        self._on_channel(channel)

    async def close(self) -> None:
        self.listening = False
        for task in list(self._handshakes):
            task.cancel()


class MemoryNetwork:
    """A simulated network of in-process peers."""

    def __init__(self, latency: Latency = 0.0, loss: float = 0.0, seed: int | None = None, secure: bool = False):
        """``latency`` in seconds per frame, ``loss`` the probability that a call is dropped, ``seed``
        for the random generator; ``secure`` runs the real handshake on each connection (default off:
        identities are trusted)."""
        if not 0.0 <= loss < 1.0:
            raise ValueError("loss must lie in [0, 1)")
        self.latency, self.loss, self.secure = latency, loss, secure
        self.rng = random.Random(seed)
        self._transports: dict[str, MemoryTransport] = {}
        self._by_peer: dict[PeerID, list[MemoryTransport]] = {}
        self._names = itertools.count()

    def sample_latency(self) -> float:
        return self.latency(self.rng) if callable(self.latency) else self.latency

    async def create_peer(self, identity: Identity | None = None, limits: Limits | None = None,
                          name: str | None = None) -> P2P:
        """A started P2P peer on this network (``identity`` defaults to a fresh key)."""
        identity = identity or Identity()
        name = name or f"n{next(self._names)}"
        if name in self._transports:
            raise ValueError(f"a peer named {name!r} exists already")
        limits = limits or Limits()
        transport = MemoryTransport(self, identity, limits, name)
        self._transports[name] = transport
        self._by_peer.setdefault(identity.peer_id, []).append(transport)
        p2p = P2P(identity, transport, limits)
        await p2p.start()
        return p2p

    def kill(self, peer_id: PeerID) -> None:
        """Make a peer vanish silently (no FIN, no reply, dials to it hang until their timeout)."""
        for transport in self._by_peer.get(peer_id, ()):
            transport.alive = False
