"""Circuit relays over real sockets on loopback: reservations, circuits, limits, ciphertext only, IPv6."""

from __future__ import annotations

import asyncio
import contextlib
import socket

import pytest

from dht import P2P, P2PError, PeerUnreachableError
from dht.peer import relay as relay_module
from dht.peer.addresses import PeerAddress
from dht.peer.nat import NatOptions, NatService
from dht.peer.relay import RelayLimits, RelayRefusedError, is_relayed


def has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@contextlib.asynccontextmanager
async def peers(n: int, host: str = "127.0.0.1", holepunch: bool = False, **limits):
    """The first peer relays (with ``limits``); hole punching off unless asked for."""
    made = []
    for i in range(n):
        p = await P2P.create(host=host)
        NatService(p, NatOptions(check=False, holepunch=holepunch,
                                 relay_limits=RelayLimits(**limits) if i == 0 else None))
        made.append(p)
    try:
        yield made
    finally:
        for p in made:
            await p.nat.close()
        await asyncio.gather(*(p.shutdown() for p in made))


def relayed_address(natted: P2P) -> PeerAddress:
    [address] = [a for a in natted.get_visible_addresses() if a.relay is not None]
    return address


async def echo(request, ctx):
    return request


async def wait_for(condition, seconds: float = 10.0) -> bool:
    for _ in range(int(seconds / 0.02)):
        if condition():
            return True
        await asyncio.sleep(0.02)
    return condition()


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
async def test_call_through_relay_end_to_end_encrypted(host, monkeypatch):
    if host == "::1" and not has_ipv6():
        pytest.skip("no IPv6 loopback here")
    seen: list[bytes] = []
    original = relay_module._Half.data_received

    def spy(self, data):
        seen.append(bytes(data))
        original(self, data)

    monkeypatch.setattr(relay_module._Half, "data_received", spy)
    async with peers(3, host) as (relay, natted, dialer):
        natted.add_unary_handler("test.echo", echo)
        address = await natted.nat.relay_client.reserve(relay.get_visible_addresses()[0])
        assert address.relay == relay.peer_id and str(address).endswith("/relay")
        target = relayed_address(natted)
        assert target.peer_id == natted.peer_id and target.relay == relay.peer_id
        secret = b"plaintext that only the two ends may read " * 2000
        assert await dialer.call(target, "test.echo", {"x": secret}, timeout=10) == {"x": secret}
        [conn] = dialer.connections_to(natted.peer_id)
        assert is_relayed(conn.channel)
        [back] = natted.connections_to(dialer.peer_id)
        assert is_relayed(back.channel) and back.channel.remote_host is None
        # the natted peer can call the dialer back over the same circuit
        dialer.add_unary_handler("test.echo", echo)
        assert await natted.call(dialer.peer_id, "test.echo", 7, timeout=5) == 7
        relayed = b"".join(seen)
        assert len(relayed) > len(secret) and secret[:40] not in relayed  # the relay saw ciphertext only
        assert relay.nat.relay_service.stat()["circuits"] == 1
        dialer.disconnect(natted.peer_id)
        assert await wait_for(lambda: not relay.nat.relay_service.circuits, 2.0)
        assert relay.nat.relay_service.stat()["circuits"] == 0 and relay.nat.relay_service.bytes_relayed > len(secret)


async def test_relay_limits_refuse_with_a_clear_error():
    async with peers(5, max_circuits_per_peer=1, max_reservations=2, circuit_bytes=1 << 20) as (
            relay, a, b, dialer, other):
        a.add_unary_handler("test.echo", echo)
        await a.nat.relay_client.reserve(relay.get_visible_addresses()[0])
        await b.nat.relay_client.reserve(relay.get_visible_addresses()[0])
        with pytest.raises(RelayRefusedError, match="reservation limit reached"):
            await other.nat.relay_client.reserve(relay.get_visible_addresses()[0])
        assert await dialer.call(relayed_address(a), "test.echo", 1, timeout=10) == 1
        with pytest.raises(PeerUnreachableError, match="circuit limit per peer reached"):
            await other.call(relayed_address(a), "test.echo", 1, timeout=10)
        relay_at = relay.get_visible_addresses()[0]
        with pytest.raises(PeerUnreachableError, match="no reservation for peer"):  # the dialer holds none
            await other.connect(PeerAddress(relay_at.protocol, relay_at.host, relay_at.port, dialer.peer_id,
                                            relay.peer_id))
        # the byte limit cuts the circuit: the end-to-end connection is lost, not corrupted
        with pytest.raises(P2PError):
            for _ in range(4):
                await dialer.call(relayed_address(a), "test.echo", b"x" * (400 << 10), timeout=10)
        assert await wait_for(lambda: not relay.nat.relay_service.circuits, 2.0)


async def test_direct_addresses_are_dialled_before_relays():
    async with peers(3) as (relay, natted, dialer):
        await natted.nat.relay_client.reserve(relay.get_visible_addresses()[0])
        dialer.add_addresses(natted.peer_id, [relayed_address(natted), *natted.get_visible_addresses()[:1]])
        await dialer.connect(natted.peer_id)
        [conn] = dialer.connections_to(natted.peer_id)
        assert not is_relayed(conn.channel)


async def test_relay_disabled_refuses_and_reservation_ends_with_the_connection():
    async with peers(2) as (relay, natted):
        relay.nat.relay_service.enabled = False
        with pytest.raises(RelayRefusedError, match="does not relay"):
            await natted.nat.relay_client.reserve(relay.get_visible_addresses()[0])
        relay.nat.relay_service.enabled = True
        await natted.nat.relay_client.reserve(relay.get_visible_addresses()[0])
        assert natted.peer_id in relay.nat.relay_service.reservations
        relay.disconnect(natted.peer_id)
        assert await wait_for(lambda: natted.peer_id not in relay.nat.relay_service.reservations, 2.0)


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
async def test_hole_punch_upgrades_to_direct_and_releases_the_circuit(host):
    if host == "::1" and not has_ipv6():
        pytest.skip("no IPv6 loopback here")
    async with peers(3, host, holepunch=True) as (relay, natted, dialer):
        natted.add_unary_handler("test.echo", echo)
        await natted.nat.relay_client.reserve(relay.get_visible_addresses()[0])
        assert await dialer.call(relayed_address(natted), "test.echo", 1, timeout=10) == 1
        puncher = dialer.nat.holepuncher

        def direct() -> bool:
            conns = dialer.connections_to(natted.peer_id)
            return bool(conns) and all(not is_relayed(c.channel) for c in conns)

        assert await wait_for(direct), dialer.nat.status()
        assert puncher.stats.successes == 1 and puncher.stats.first_try == 1 and puncher.stats.attempts == 1
        assert natted.nat.holepuncher.stats.served == 1
        assert await dialer.call(natted.peer_id, "test.echo", 2, timeout=5) == 2
        [conn] = dialer.connections_to(natted.peer_id)
        assert not is_relayed(conn.channel) and conn.channel.remote_host == host
        assert await wait_for(lambda: not relay.nat.relay_service.circuits)  # the circuit is released
        assert dialer.nat.status()["holepunch_successes"] == 1


async def test_without_hole_punching_traffic_stays_on_the_relay():
    async with peers(2, holepunch=True) as (relay, natted):
        dialer = await P2P.create(host="127.0.0.1")
        NatService(dialer, NatOptions(check=False, holepunch=False))
        try:
            natted.add_unary_handler("test.echo", echo)
            await natted.nat.relay_client.reserve(relay.get_visible_addresses()[0])
            assert await dialer.call(relayed_address(natted), "test.echo", 1, timeout=10) == 1
            await asyncio.sleep(0.3)
            [conn] = dialer.connections_to(natted.peer_id)
            assert is_relayed(conn.channel) and dialer.nat.holepuncher is None
        finally:
            await dialer.nat.close()
            await dialer.shutdown()


async def test_circuit_buffers_are_charged_to_the_peer_layers_memory_budgets():
    from dht import Limits

    relay = await P2P.create(host="127.0.0.1", limits=Limits(peer_memory=3 << 20))  # room for one circuit (2 MiB)
    NatService(relay, NatOptions(check=False, holepunch=False))
    async with peers(2) as (natted, dialer):
        try:
            natted.add_unary_handler("test.echo", echo)
            await natted.nat.relay_client.reserve(relay.get_visible_addresses()[0])
            target = relayed_address(natted)
            assert await dialer.call(target, "test.echo", 1, timeout=10) == 1
            assert relay.resources.peer_stat(dialer.peer_id)["memory"] == 2 << 20
            dialer.disconnect(natted.peer_id)
            assert await wait_for(lambda: not relay.nat.relay_service.circuits)
            # a second circuit at once would exceed the dialer's peer budget on the relay
            assert await dialer.call(target, "test.echo", 2, timeout=10) == 2
            with pytest.raises(PeerUnreachableError, match="relay memory budget spent"):
                await dialer.nat.relay_client.dial(target)
        finally:
            await relay.nat.close()
            await relay.shutdown()
