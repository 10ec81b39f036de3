"""Attacks on the transport before and at authentication, over real sockets on loopback.

Each test reproduces an attack of issue 11 with bounded counts and checks the guarantee that fixes
it: every accepted socket is closed within the handshake timeout whatever arrives, a few pending
handshakes per source IP with a short first-byte deadline, the most represented IP makes room when
the pending pool is full, frame buffers grow with the bytes that arrived, and connections per PeerID
and per source IP are capped with a clear reason.

The victim listens on 127.0.0.1 and legitimate peers dial from 127.0.0.1; attack sockets come from
127.0.0.2 (and 127.0.0.3), which Linux routes over the loopback interface like 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import sys
import time
import tracemalloc

import msgpack
import psutil
import pytest

from dht import P2P, ConnectionLostError, Limits, P2PError
from dht.peer import tcp_transport
from dht.peer.handshake import CIPHERS, PROTOCOL_NAME, PeerInfo, _nonce, _LEN, initiate
from dht.peer.identity import Identity
from dht.peer.multiplex import GOAWAY, HEADER

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs 127.0.0.2 on loopback")

ATTACKER, OTHER_ATTACKER = "127.0.0.2", "127.0.0.3"


@contextlib.asynccontextmanager
async def victim(**limits):
    peer = await P2P.create(host="127.0.0.1", limits=Limits(**limits))

    async def echo(request, ctx):
        return request

    peer.add_unary_handler("echo", echo)
    try:
        yield peer
    finally:
        await peer.shutdown()


class Sockets:
    """Attack sockets from one source IP; all closed at the end, whatever happens."""

    def __init__(self, ip: str, port: int):
        self.ip, self.port = ip, port
        self.open: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.opened = 0

    async def connect(self, payload: bytes = b"") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port, local_addr=(self.ip, 0))
        self.opened += 1
        if payload:
            writer.write(payload)
        self.open.append((reader, writer))
        return reader, writer

    def close(self) -> None:
        for _, writer in self.open:
            writer.transport.abort()
        self.open.clear()

    async def __aenter__(self) -> "Sockets":
        return self

    async def __aexit__(self, *exc_info) -> None:
        self.close()
        await asyncio.sleep(0)


def victim_sockets(port: int, ip: str) -> int:
    """Sockets of this process (the victim's end) on the listening port, connected to ``ip``."""
    return sum(1 for c in psutil.Process().net_connections("tcp")
               if c.laddr and c.laddr.port == port and c.raddr and c.raddr.ip == ip)


async def wait_until(condition, timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        await asyncio.sleep(step)
    return condition()


async def legit_tries(address, n: int = 20, timeout: float = 5.0) -> int:
    """How many of ``n`` fresh peers (one after the other, from 127.0.0.1) connect and call."""
    successes = 0
    for i in range(n):
        client = await P2P.create(host="127.0.0.1", client_mode=True)
        try:
            assert await asyncio.wait_for(client.call(address, "echo", i, timeout=timeout), timeout) == i
            successes += 1
        except (P2PError, asyncio.TimeoutError):
            pass
        finally:
            await client.shutdown()
    return successes


def hello(protocol=PROTOCOL_NAME) -> bytes:
    body = msgpack.packb({"p": protocol, "versions": [1], "ciphers": list(CIPHERS), "e": b"\x09" * 32},
                         use_bin_type=True)
    return _LEN.pack(len(body)) + body


def victim_port(peer: P2P) -> int:
    return peer.get_visible_addresses()[0].port


async def eof_within(reader: asyncio.StreamReader, timeout: float) -> bool:
    """Whether the other side closes this socket within ``timeout`` (whatever it sends first)."""
    async def drain():
        while await reader.read(65536):
            pass

    try:
        await asyncio.wait_for(drain(), timeout)
        return True
    except asyncio.TimeoutError:  # (a subclass of OSError on Python >= 3.11: first)
        return False
    except (ConnectionError, OSError):
        return True


# ---- root cause 1: whatever arrives, the socket is closed ------------------------------------


async def test_nested_list_hello_closes_the_socket_and_new_peers_connect():
    # a ~1 KB hello whose protocol field is a list nested 1000 deep: str() of it raised
    # RecursionError on the accept path, which left the socket open and uncounted for ever
    nested: list = []
    for _ in range(1000):
        nested = [nested]
    packet = hello(protocol=nested)
    assert len(packet) < 1100
    async with victim() as peer:
        port = victim_port(peer)
        async with Sockets(ATTACKER, port) as attack:
            for _ in range(120):
                await attack.connect(packet)
                await asyncio.sleep(0.005)
            # the attacker keeps its ends open: the victim alone must close its own
            closed = await wait_until(lambda: victim_sockets(port, ATTACKER) == 0, timeout=5.0)
            assert closed, f"the victim still holds {victim_sockets(port, ATTACKER)} sockets of the attack"
            assert all([await eof_within(r, 2.0) for r, _ in attack.open[:10]])
            assert len(peer._transport._pending) == 0
            assert await legit_tries(peer.get_visible_addresses()[0], n=3) == 3


async def test_nested_values_in_every_handshake_field_are_refused_quietly(caplog):
    deep: list = []
    for _ in range(1000):
        deep = [deep]
    fields = [{"p": PROTOCOL_NAME, "versions": deep, "ciphers": list(CIPHERS), "e": b"\x09" * 32},
              {"p": PROTOCOL_NAME, "versions": [1], "ciphers": deep, "e": b"\x09" * 32},
              {"p": PROTOCOL_NAME, "versions": [1], "ciphers": list(CIPHERS), "e": deep},
              {"p": {"x": deep}, "versions": [1]}]
    async with victim() as peer:
        port = victim_port(peer)
        async with Sockets(ATTACKER, port) as attack:
            for message in fields:
                body = msgpack.packb(message)
                reader, _ = await attack.connect(_LEN.pack(len(body)) + body)
                assert await eof_within(reader, 3.0)
            assert await wait_until(lambda: victim_sockets(port, ATTACKER) == 0, timeout=3.0)
        assert await legit_tries(peer.get_visible_addresses()[0], n=1) == 1
    assert all(len(r.getMessage()) < 1000 for r in caplog.records)


async def test_a_responder_sending_nested_values_gives_the_dialer_a_bounded_error():
    deep: list = []
    for _ in range(900):
        deep = [deep]

    async def hostile(reader, writer):
        await reader.read(4100)
        body = msgpack.packb({"error": deep, "versions": deep})
        writer.write(_LEN.pack(len(body)) + body)

    server = await asyncio.start_server(hostile, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = await P2P.create(host="127.0.0.1", client_mode=True)
    try:
        with pytest.raises(P2PError) as error:
            await client.connect(f"/ip4/127.0.0.1/tcp/{port}/p2p/{Identity().peer_id}")
        assert len(str(error.value)) < 1000
    finally:
        await client.shutdown()
        server.close()


# ---- root cause 6: pending-handshake slots ---------------------------------------------------


async def test_idle_socket_flood_from_one_ip_does_not_lock_other_peers_out(caplog):
    # 2,000 idle sockets held all 256 pending slots; here a sustained flood of up to 500 from one IP
    caplog.set_level(logging.INFO, logger="dht")
    async with victim() as peer:
        port = victim_port(peer)
        async with Sockets(ATTACKER, port) as attack:
            for _ in range(300):
                await attack.connect()

            async def keep_flooding():  # reopen what the victim closed, 500 sockets at most
                while attack.opened < 500:
                    attack.open = [(r, w) for r, w in attack.open if not r.at_eof()]
                    while len(attack.open) < 300 and attack.opened < 500:
                        await attack.connect()
                    await asyncio.sleep(0.2)

            flood = asyncio.create_task(keep_flooding())
            try:
                held = victim_sockets(port, ATTACKER)
                limit = Limits().max_pending_handshakes_per_ip * (1 + tcp_transport._REFUSALS_PER_IP)
                assert held <= limit, f"the victim holds {held} sockets of one IP"
                successes = await legit_tries(peer.get_visible_addresses()[0], n=20)
                assert successes >= 18, f"only {successes} of 20 new peers connected during the flood"
            finally:
                flood.cancel()
                await asyncio.gather(flood, return_exceptions=True)
    # hundreds of refused sockets, a few log lines (rate-limited per source IP)
    lines = [r for r in caplog.records if r.name == "dht.peer.tcp_transport"]
    assert len(lines) <= 20, f"{len(lines)} log lines about one attacker"


async def test_slowloris_hello_flood_from_one_ip_does_not_lock_other_peers_out():
    # 300 hellos sent one byte at a time from one IP
    packet = hello()
    async with victim() as peer:
        port = victim_port(peer)
        async with Sockets(ATTACKER, port) as attack:
            for _ in range(300):
                await attack.connect(packet[:1])

            async def drip():  # one more byte on every socket every 0.5 s, for 20 s at most
                for i in range(1, 40):
                    for reader, writer in attack.open:
                        if not writer.is_closing() and i < len(packet) - 1:
                            writer.write(packet[i:i + 1])
                    await asyncio.sleep(0.5)

            dripping = asyncio.create_task(drip())
            try:
                await asyncio.sleep(0.5)
                held = victim_sockets(port, ATTACKER)
                limit = Limits().max_pending_handshakes_per_ip * (1 + tcp_transport._REFUSALS_PER_IP)
                assert held <= limit, f"the victim holds {held} slow sockets of one IP"
                successes = await legit_tries(peer.get_visible_addresses()[0], n=20)
                assert successes >= 18, f"only {successes} of 20 new peers connected during the flood"
            finally:
                dripping.cancel()
                await asyncio.gather(dripping, return_exceptions=True)


async def test_pending_handshakes_per_ip_are_capped_and_the_rest_told_busy():
    async with victim(max_pending_handshakes_per_ip=4, first_byte_timeout=8.0) as peer:
        port = victim_port(peer)
        async with Sockets(ATTACKER, port) as attack:
            for _ in range(20):
                await attack.connect()
            assert victim_sockets(port, ATTACKER) <= 20  # 4 pending, the others being told "busy"
            # the refused ones get a short "busy" answer and are closed at once (the 4 first stay pending)
            answers = []
            for reader, _ in attack.open[4:8]:
                (n,) = struct.unpack("!I", await asyncio.wait_for(reader.readexactly(4), 3.0))
                answers.append(msgpack.unpackb(await asyncio.wait_for(reader.readexactly(n), 3.0)))
            assert all(a.get("busy") is True and "too many pending handshakes" in a["error"] for a in answers)
            assert all([await eof_within(r, 3.0) for r, _ in attack.open[4:]])
            assert await wait_until(lambda: victim_sockets(port, ATTACKER) == 4, timeout=3.0)
            # peers from another IP are not affected
            assert await legit_tries(peer.get_visible_addresses()[0], n=3) == 3


async def test_a_burst_of_honest_dials_from_one_ip_all_connect_through_busy_retries():
    # test swarms put every peer on 127.0.0.1: more simultaneous dials than the per-IP cap all get in
    async with victim(max_pending_handshakes_per_ip=1) as peer:  # 1 pending, 4 told busy, the rest closed
        address = peer.get_visible_addresses()[0]
        clients = [await P2P.create(host="127.0.0.1", client_mode=True) for _ in range(12)]
        try:
            results = await asyncio.gather(*(c.call(address, "echo", i, timeout=10) for i, c in enumerate(clients)))
            assert results == list(range(12))
        finally:
            await asyncio.gather(*(c.shutdown() for c in clients), return_exceptions=True)


async def test_first_byte_timeout_closes_silent_sockets_early():
    async with victim(first_byte_timeout=0.5, handshake_timeout=10.0) as peer:
        port = victim_port(peer)
        async with Sockets(ATTACKER, port) as attack:
            start = time.monotonic()
            for _ in range(3):
                await attack.connect()
            assert all([await eof_within(r, 4.0) for r, _ in attack.open])
            assert time.monotonic() - start < 4.0  # not the 10 s of the handshake timeout
            assert victim_sockets(port, ATTACKER) == 0
            # a socket that sent something is not cut by the first-byte deadline
            reader, writer = await attack.connect(hello()[:3])
            assert not await eof_within(reader, 1.5)


async def test_full_pool_evicts_the_oldest_socket_of_the_most_represented_ip():
    limits = dict(max_pending_handshakes=16, max_pending_handshakes_per_ip=16, first_byte_timeout=8.0)
    async with victim(**limits) as peer:
        port = victim_port(peer)
        async with Sockets(ATTACKER, port) as crowd, Sockets(OTHER_ATTACKER, port) as few:
            for _ in range(12):
                await crowd.connect()
                await asyncio.sleep(0.01)
            for _ in range(4):
                await few.connect()
            assert await wait_until(lambda: victim_sockets(port, ATTACKER) + victim_sockets(port, OTHER_ATTACKER) == 16,
                                    timeout=2.0)
            # the pool is full: a newcomer from 127.0.0.1 still connects (one after the other, so that
            # only the first needs room), and the oldest socket of the biggest crowd made room for it
            assert await legit_tries(peer.get_visible_addresses()[0], n=3) == 3
            assert await eof_within(crowd.open[0][0], 1.0)
            assert not any([await eof_within(r, 0.1) for r, _ in crowd.open[1:]])
            assert not any([await eof_within(r, 0.1) for r, _ in few.open])  # the smaller crowd keeps its slots
            assert (victim_sockets(port, ATTACKER), victim_sockets(port, OTHER_ATTACKER)) == (11, 4)
            # more newcomers from the smaller crowd: each takes the oldest slot of whichever IP is then the
            # most represented, so the two end up sharing the pool (8 + 8, or 7 + 9 after a tie)
            for _ in range(10):
                await few.connect()
                await asyncio.sleep(0.01)
            counts = lambda: (victim_sockets(port, ATTACKER), victim_sockets(port, OTHER_ATTACKER))  # noqa: E731
            assert await wait_until(lambda: sum(counts()) == 16, timeout=2.0)
            assert counts() in ((8, 8), (7, 9)), counts()


# ---- root cause 7 (part): frame buffers and connection caps ---------------------------------


async def _authenticated(port: int, ip: str, identity: Identity | None = None):
    """A raw authenticated channel from ``ip`` (handshake only; no multiplexer)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(ip, 0))
    channel = await initiate(reader, writer, identity or Identity(), PeerInfo(), f"127.0.0.1:{port}", None,
                             Limits().max_frame_size)
    return channel, writer


async def _goaway_within(channel, timeout: float) -> str | None:
    """The reason of a GOAWAY the other side sends within ``timeout``, else None."""
    async def first_goaway():
        while True:
            frame = await channel.read_frame()
            if HEADER.unpack_from(frame)[0] == GOAWAY:
                return msgpack.unpackb(frame[HEADER.size:])["m"]

    try:
        return await asyncio.wait_for(first_goaway(), timeout)
    except (asyncio.TimeoutError, P2PError):
        return None


async def test_frame_reader_grows_with_bytes_received_not_announced_lengths():
    # each connection announces a frame of the largest size and sends 200 bytes of it: the old
    # reader allocated twice the announced size at once (200 connections: +405 MB)
    n = 40
    async with victim(max_connections_per_ip=n + 4) as peer:
        port = victim_port(peer)
        channels, writers = [], []
        try:
            for _ in range(n):
                channel, writer = await _authenticated(port, ATTACKER)
                channels.append(channel)
                writers.append(writer)
            assert await wait_until(lambda: len(peer.connected_peers()) == n, timeout=5.0)
            tracemalloc.start()
            try:
                before = tracemalloc.get_traced_memory()[0]
                announced = channel._max_ciphertext
                for writer in writers:
                    writer.write(_LEN.pack(announced) + b"\0" * 100)
                await asyncio.sleep(0.2)
                for writer in writers:  # the reader makes room for the frame when more of it arrives
                    writer.write(b"\0" * 100)
                await asyncio.sleep(0.3)
                grown = tracemalloc.get_traced_memory()[0] - before
            finally:
                tracemalloc.stop()
            assert grown < 4 << 20, f"{n} connections announcing {announced}-byte frames cost {grown} bytes"
            buffers = [len(c.channel._frames._buf) for cs in peer._connections.values() for c in cs]
            assert len(buffers) == n and max(buffers) <= 64 << 10
            assert await legit_tries(peer.get_visible_addresses()[0], n=1) == 1
        finally:
            for writer in writers:
                writer.transport.abort()


async def test_frame_reader_still_carries_large_frames():
    async with victim() as peer:
        client = await P2P.create(host="127.0.0.1", client_mode=True)
        try:
            blob = bytes(range(256)) * (12 << 12)  # 12 MiB: many full-size frames
            address = peer.get_visible_addresses()[0]
            assert await client.call(address, "echo", blob, timeout=30) == blob
            assert await client.call(address, "echo", b"small", timeout=30) == b"small"
        finally:
            await client.shutdown()


async def test_connections_per_peer_are_capped_with_a_clear_reason():
    async with victim(max_connections_per_peer=3) as peer:
        address = peer.get_visible_addresses()[0]
        identity = Identity()  # one identity, many connections
        clients = [await P2P.create(host="127.0.0.1", client_mode=True, identity=identity) for _ in range(5)]
        try:
            for i, client in enumerate(clients[:3]):
                assert await client.call(address, "echo", i, timeout=5) == i
            for client in clients[3:]:
                with pytest.raises(ConnectionLostError, match="too many connections with peer"):
                    await client.call(address, "echo", 0, timeout=5)
            assert len(peer._connections[identity.peer_id]) == 3
            # a closed connection frees its slot
            await clients[0].shutdown()
            assert await wait_until(lambda: len(peer._connections.get(identity.peer_id, ())) == 2, timeout=3.0)
            assert await clients[3].call(address, "echo", 7, timeout=5) == 7
        finally:
            await asyncio.gather(*(c.shutdown() for c in clients), return_exceptions=True)


async def test_connections_per_ip_are_capped_on_the_observed_address():
    async with victim(max_connections_per_ip=4) as peer:
        port = victim_port(peer)
        channels = []
        try:
            for _ in range(6):  # six identities from one IP
                channel, _ = await _authenticated(port, ATTACKER)
                channels.append(channel)
            reasons = [await _goaway_within(c, 0.5) for c in channels]
            assert reasons[:4] == [None] * 4
            assert all(r is not None and f"too many connections from {ATTACKER}" in r for r in reasons[4:])
            assert victim_sockets(port, ATTACKER) == 4
            # another IP is not affected, and the attacker's announced addresses do not matter
            assert await legit_tries(peer.get_visible_addresses()[0], n=2) == 2
        finally:
            for channel in channels:
                channel.close()
        assert await wait_until(lambda: victim_sockets(port, ATTACKER) == 0, timeout=3.0)
        assert ATTACKER not in peer._inbound_per_ip


async def test_soft_fd_limit_is_raised_at_start_up(monkeypatch):
    import resource  # not on Windows

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard < 2048:
        pytest.skip("needs a finite hard limit of open files above 2048")
    monkeypatch.setattr(tcp_transport, "_fd_limit_raised", False, raising=False)
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    try:
        peer = await P2P.create(host="127.0.0.1")
        await peer.shutdown()
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == hard
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, resource.getrlimit(resource.RLIMIT_NOFILE)[0]), hard))
