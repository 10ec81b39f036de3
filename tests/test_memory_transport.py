"""The in-memory transport: latency, loss, silent death, the virtual clock, and the optional real handshake."""

import asyncio
import time

import pytest

from dht import ConnectionLostError, DeadlineExceededError, HandshakeError, Identity, Limits, PeerUnreachableError
from dht.peer import virtual_clock
from dht.peer.memory_transport import MemoryNetwork


async def echo(request, ctx):
    return request


def test_virtual_clock_skips_idle_time():
    async def main():
        loop = asyncio.get_running_loop()
        start = loop.time()
        await asyncio.sleep(3600)
        return loop.time() - start

    wall = time.monotonic()
    assert virtual_clock.run(main()) == pytest.approx(3600)
    assert time.monotonic() - wall < 5


def test_latency_is_applied_per_frame_in_virtual_time():
    async def main():
        network = MemoryNetwork(latency=0.5)
        a, b = await network.create_peer(), await network.create_peer()
        b.add_unary_handler("echo", echo)
        loop = asyncio.get_running_loop()
        start = loop.time()
        await a.connect(b.get_visible_addresses()[0])
        connected = loop.time()
        assert await a.call(b.peer_id, "echo", "x", timeout=30) == "x"
        done = loop.time()
        await a.shutdown()
        await b.shutdown()
        return connected - start, done - connected

    handshake, call = virtual_clock.run(main())
    assert handshake == pytest.approx(1.0)  # one round trip
    assert call == pytest.approx(1.0)  # request there, response back


def test_loss_drops_whole_calls_deterministically():
    async def main(seed):
        network = MemoryNetwork(latency=0.01, loss=0.3, seed=seed)
        a, b = await network.create_peer(), await network.create_peer()
        b.add_unary_handler("echo", echo)
        await a.connect(b.get_visible_addresses()[0])
        outcomes = []
        for i in range(100):
            try:
                outcomes.append(await a.call(b.peer_id, "echo", i, timeout=1.0) == i)
            except DeadlineExceededError:
                outcomes.append(False)
        await a.shutdown()
        await b.shutdown()
        return outcomes

    first = virtual_clock.run(main(seed=1))
    assert 15 <= first.count(False) <= 45  # about 30% lost
    assert virtual_clock.run(main(seed=1)) == first  # same seed, same run
    assert virtual_clock.run(main(seed=2)) != first


def test_silently_dead_peer_times_out_instead_of_refusing():
    async def main():
        network = MemoryNetwork(latency=0.01)
        limits = Limits(dial_timeout=3.0)
        a, b, c = [await network.create_peer(limits=limits) for _ in range(3)]
        b.add_unary_handler("echo", echo)
        await a.connect(b.get_visible_addresses()[0])
        network.kill(b.peer_id)
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(DeadlineExceededError):
            await a.call(b.peer_id, "echo", 1, timeout=2.0)
        assert loop.time() - start == pytest.approx(2.0, abs=0.05)
        start = loop.time()
        with pytest.raises(PeerUnreachableError):
            await c.call(b.get_visible_addresses()[0], "echo", 1, timeout=10)
        assert loop.time() - start == pytest.approx(3.0, abs=0.05)  # the dial timeout, not at once
        for p in (a, c):
            await p.shutdown()

    virtual_clock.run(main())


def test_keepalive_closes_connections_to_vanished_peers():
    async def main():
        network = MemoryNetwork(latency=0.01)
        limits = Limits(keepalive_interval=10.0)
        a, b = await network.create_peer(limits=limits), await network.create_peer(limits=limits)
        await a.connect(b.get_visible_addresses()[0])
        network.kill(b.peer_id)
        await asyncio.sleep(25)
        still = a.is_connected(b.peer_id)
        await asyncio.sleep(30)
        gone = not a.is_connected(b.peer_id)
        await a.shutdown()
        return still, gone

    assert virtual_clock.run(main()) == (True, True)


def test_a_thousand_peers_simulate_quickly():
    async def main():
        network = MemoryNetwork(latency=lambda rng: rng.uniform(0.01, 0.1), seed=3)
        peers = [await network.create_peer() for _ in range(1000)]
        for p in peers:
            p.add_unary_handler("echo", echo)
        calls = [peers[i].call(peers[(i * 7 + 1) % 1000].get_visible_addresses()[0], "echo", i, timeout=5)
                 for i in range(1000)]
        results = await asyncio.gather(*calls)
        await asyncio.gather(*(p.shutdown() for p in peers))
        return results

    wall = time.monotonic()
    assert virtual_clock.run(main()) == list(range(1000))
    assert time.monotonic() - wall < 60


# ---- secure=True: the real handshake over the in-memory link -----------------------------------------


def _liar() -> Identity:
    """An identity that signs with another key: it cannot prove the PeerID it claims."""
    liar, other = Identity(), Identity()
    liar.sign = other.sign
    return liar


def test_secure_network_authenticates_peers_with_the_real_handshake():
    async def main():
        network = MemoryNetwork(latency=0.5, secure=True)
        a, b = await network.create_peer(), await network.create_peer()
        callers = []

        async def who(request, ctx):
            callers.append(ctx.peer_id)
            return request

        b.add_unary_handler("who", who)
        loop = asyncio.get_running_loop()
        start = loop.time()
        assert await a.connect(b.get_visible_addresses()[0]) == b.peer_id
        connected = loop.time() - start
        assert await a.call(b.peer_id, "who", "x", timeout=30) == "x"
        assert callers == [a.peer_id]  # the responder learnt the dialer's PeerID from its proof

        # the peer at the address is not the one expected: refused with both PeerIDs in the message
        c = await network.create_peer()
        stranger = Identity().peer_id
        with pytest.raises(HandshakeError) as info:
            await c.connect(b.get_visible_addresses()[0].with_peer_id(stranger))
        assert str(stranger) in str(info.value) and str(b.peer_id) in str(info.value)
        assert not c.is_connected(b.peer_id)
        await asyncio.gather(a.shutdown(), b.shutdown(), c.shutdown())
        return connected

    assert virtual_clock.run(main()) == pytest.approx(1.0)  # M1 there, M2 + M3 back, then M4 goes with the call


@pytest.mark.parametrize("secure", [False, True])
def test_secure_network_refuses_peers_that_cannot_prove_their_key(secure):
    async def main():
        network = MemoryNetwork(latency=0.01, secure=secure)
        honest = await network.create_peer()
        lying_listener = await network.create_peer(identity=_liar())
        lying_dialer = await network.create_peer(identity=_liar())
        for p in (honest, lying_listener):
            p.add_unary_handler("echo", echo)
        outcomes = []
        for caller, callee in ((honest, lying_listener), (lying_dialer, honest)):
            try:
                outcomes.append(await caller.call(callee.get_visible_addresses()[0], "echo", 1, timeout=5))
            except (HandshakeError, ConnectionLostError, DeadlineExceededError) as e:
                outcomes.append(type(e).__name__ + (": bad signature" if "bad signature" in str(e) else ""))
        await asyncio.gather(honest.shutdown(), lying_listener.shutdown(), lying_dialer.shutdown())
        return outcomes

    outcomes = virtual_clock.run(main())
    if secure:
        assert outcomes[0] == "HandshakeError: bad signature"
        assert outcomes[1] == "ConnectionLostError"  # the listener closes the connection instead of serving it
    else:
        assert outcomes == [1, 1]  # trusted identities: nothing is checked
