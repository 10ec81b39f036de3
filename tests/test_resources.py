"""dht.peer.resources: budgets per stream, connection, peer, IP and system, and that every reservation of a
real connection is given back however a stream ends (cancel, disconnect, handler crash)."""

from __future__ import annotations

import asyncio

import pytest

from dht import DeadlineExceededError, Identity, Limits, MessageTooLargeError
from dht.peer.errors import ResourceLimitError
from dht.peer.multiplex import DATA, FLAG_MORE
from dht.peer.resources import ResourceManager, ip_key

KiB, MiB = 1 << 10, 1 << 20
SMALL = Limits(stream_memory=256 * KiB, connection_memory=512 * KiB, peer_memory=768 * KiB, ip_memory=1 * MiB,
               system_memory=2 * MiB, max_streams_per_connection=3, max_inbound_streams_per_peer=4,
               max_inbound_streams_per_ip=6, max_inbound_streams=8)


def _peer(n: int):
    return Identity().peer_id if n == 0 else f"peer{n}"  # real PeerIDs and plain keys alike


# ---- the manager alone -----------------------------------------------------------------------


def test_a_reservation_is_refused_by_the_first_scope_it_would_overflow_and_changes_nothing():
    manager = ResourceManager(SMALL)  # stream 256 KiB, connection 512 KiB, peer 768 KiB, IP 1 MiB, system 2 MiB
    conn = manager.open_connection("a", "10.0.0.1")
    stream = conn.open_stream(inbound=True)
    stream.reserve(200 * KiB)
    with pytest.raises(ResourceLimitError) as info:
        stream.reserve(100 * KiB)  # 300 KiB > the stream's 256 KiB
    assert info.value.scope == "stream" and info.value.code == "too_large"
    assert stream.memory == 200 * KiB and manager.stat()["system"]["memory"] == 200 * KiB
    other = conn.open_stream(inbound=True)
    other.reserve(250 * KiB)
    with pytest.raises(ResourceLimitError) as info:
        conn.open_stream(inbound=True).reserve(100 * KiB)  # the connection: 550 KiB > 512 KiB
    assert info.value.scope == "connection" and info.value.code == "overloaded"
    assert conn.memory == 450 * KiB
    conn2 = manager.open_connection("a", "10.0.0.1")  # the same identity again
    conn2.open_stream(inbound=False).reserve(200 * KiB)
    with pytest.raises(ResourceLimitError) as info:
        conn2.open_stream(inbound=False).reserve(150 * KiB)  # the peer: 800 KiB > 768 KiB, two connections
    assert info.value.scope == "peer"
    conn3 = manager.open_connection("b", "10.0.0.1")  # another identity from the same IP
    conn3.open_stream(inbound=False).reserve(250 * KiB)
    s4 = conn3.open_stream(inbound=False)
    with pytest.raises(ResourceLimitError) as info:
        s4.reserve(150 * KiB)  # the IP: 900 + 150 KiB > 1 MiB
    assert info.value.scope == "ip"
    s4.reserve(100 * KiB)
    conn4 = manager.open_connection("c", "10.0.0.2")
    for _ in range(2):
        conn4.open_stream(inbound=False).reserve(250 * KiB)
    conn5 = manager.open_connection("d", "10.0.0.3")
    conn5.open_stream(inbound=False).reserve(200 * KiB)
    conn5.open_stream(inbound=False).reserve(250 * KiB)
    conn6 = manager.open_connection("e", "10.0.0.4")
    with pytest.raises(ResourceLimitError) as info:
        conn6.open_stream(inbound=False).reserve(150 * KiB)  # the system: 1000 + 500 + 450 + 150 KiB > 2 MiB
    assert info.value.scope == "system"
    stat = manager.stat()
    assert stat["system"]["memory"] == (1000 + 500 + 450) * KiB
    assert stat["ips"]["10.0.0.1"]["memory"] == 1000 * KiB and stat["peers"]["a"]["memory"] == 650 * KiB
    for c in (conn, conn2, conn3, conn4, conn5, conn6):
        c.close()
    assert manager.stat() == {"system": {"memory": 0, "inbound_streams": 0, "outbound_streams": 0, "connections": 0},
                              "ips": {}, "peers": {}}


def test_inbound_streams_are_counted_per_connection_per_peer_over_all_connections_per_ip_and_in_total():
    manager = ResourceManager(SMALL)
    c1 = manager.open_connection("a", "10.0.0.1")
    streams = [c1.open_stream(inbound=True) for _ in range(3)]
    with pytest.raises(ResourceLimitError) as info:
        c1.open_stream(inbound=True)
    assert info.value.scope == "connection"
    c1.open_stream(inbound=False)  # our own calls are not capped
    c2 = manager.open_connection("a", "10.0.0.1")
    c2.open_stream(inbound=True)
    with pytest.raises(ResourceLimitError) as info:
        c2.open_stream(inbound=True)  # 4 for peer a over its two connections
    assert info.value.scope == "peer"
    streams[0].close()
    c2.open_stream(inbound=True)  # a slot was given back
    c3 = manager.open_connection("b", "10.0.0.1")
    c3.open_stream(inbound=True)
    c3.open_stream(inbound=True)
    with pytest.raises(ResourceLimitError) as info:
        c3.open_stream(inbound=True)  # 6 from 10.0.0.1
    assert info.value.scope == "ip"
    c4 = manager.open_connection("c", "10.0.0.2")
    c4.open_stream(inbound=True)
    c4.open_stream(inbound=True)
    with pytest.raises(ResourceLimitError) as info:
        c4.open_stream(inbound=True)  # 8 in total
    assert info.value.scope == "system"
    stat = manager.stat()
    assert stat["system"]["inbound_streams"] == 8 and stat["system"]["outbound_streams"] == 1
    assert stat["peers"]["a"]["inbound_streams"] == 4 and stat["ips"]["10.0.0.1"]["connections"] == 3
    for c in (c1, c2, c3, c4):
        c.close()
    assert manager.stat()["system"] == {"memory": 0, "inbound_streams": 0, "outbound_streams": 0, "connections": 0}


def test_idle_peer_and_ip_scopes_are_dropped():
    manager = ResourceManager(Limits())
    conns = [manager.open_connection(_peer(i), f"10.0.{i // 250}.{i % 250}") for i in range(1000)]
    assert len(manager.stat()["peers"]) == 1000
    for conn in conns:
        conn.open_stream(inbound=True).reserve(10)
        conn.close()
    stat = manager.stat()
    assert stat["peers"] == {} and stat["ips"] == {} and stat["system"]["memory"] == 0
    assert manager.peer_stat("peer1")["connections"] == 0


def test_closed_scopes_release_once_and_refuse_new_reservations():
    manager = ResourceManager(Limits())
    conn = manager.open_connection("a", "127.0.0.1")
    stream = conn.open_stream(inbound=True)
    stream.reserve(1000)
    stream.release(400)
    stream.release(10_000)  # at most what it holds
    assert stream.memory == 0 and conn.memory == 0
    stream.reserve(500)
    conn.reserve(100)  # a connection-level buffer
    stream.close()
    stream.close()
    assert conn.memory == 100 and manager.system.inbound == 0
    with pytest.raises(ResourceLimitError):
        stream.reserve(1)
    stream.release(5)  # no-op
    conn.close()
    assert manager.system.memory == 0 and manager.system.connections == 0
    with pytest.raises(ResourceLimitError):
        conn.open_stream(inbound=False)


def test_ip_keys_group_ipv6_by_64_and_unwrap_mapped_ipv4():
    assert ip_key("127.0.0.1") == "127.0.0.1"
    assert ip_key("2001:db8:1:2:3:4:5:6") == ip_key("2001:db8:1:2:ffff::1") == "2001:db8:1:2::/64"
    assert ip_key("2001:db8:1:3::1") != ip_key("2001:db8:1:2::1")
    assert ip_key("::ffff:10.1.2.3") == "10.1.2.3"
    assert ip_key("[::1]") == "::/64"
    assert ip_key("memory:peer7") == "memory:peer7"
    manager = ResourceManager(Limits())
    conn = manager.open_connection("a", None, "10.9.8.7:4001")
    assert "10.9.8.7" in manager.stat()["ips"]
    conn.close()


def test_limits_reject_nonsense_budgets():
    with pytest.raises(ValueError):
        Limits(stream_memory=0)
    with pytest.raises(ValueError):
        Limits(max_inbound_streams_per_peer=0)
    with pytest.raises(ValueError):
        Limits(default_handler_timeout=100.0, max_handler_timeout=10.0)


# ---- a real connection: every exit path gives the budget back ------------------------------


async def _wait_for(predicate, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        if loop.time() > end:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


async def _partial_message(conn, method: str, fragments: int, size: int = 64 * KiB):
    """Open a call of ``method`` and send ``fragments`` fragments of a message that does not end."""
    stream = conn.open_stream(method, 60)
    head = b"\xc6" + (fragments * size * 4).to_bytes(4, "big") + b"\0" * (size - 5)
    for i in range(fragments):
        conn.write_frame(DATA, FLAG_MORE, stream.id, head if i == 0 else b"\0" * size)
    await conn.drain()
    return stream


async def test_budget_is_given_back_on_cancel_and_on_disconnect(make_peer):
    victim, attacker = await make_peer(), await make_peer()
    victim.add_unary_handler("echo", lambda request, ctx: asyncio.sleep(0, request))
    await attacker.call(victim.get_visible_addresses()[0], "echo", b"x", timeout=10)
    conn = attacker._connections[victim.peer_id][0]
    streams = [await _partial_message(conn, "echo", 8) for _ in range(3)]
    stat = victim.resources.peer_stat(attacker.peer_id)
    await _wait_for(lambda: victim.resources.peer_stat(attacker.peer_id)["memory"] == 3 * 8 * 64 * KiB)
    assert victim.resources.peer_stat(attacker.peer_id)["inbound_streams"] == 3
    streams[0].cancel()  # CANCEL: the handler is stopped and its reservation returned
    await _wait_for(lambda: victim.resources.peer_stat(attacker.peer_id)["memory"] == 2 * 8 * 64 * KiB)
    await _wait_for(lambda: victim.resources.peer_stat(attacker.peer_id)["inbound_streams"] == 2)
    stat = victim.resources.stat()
    assert stat["system"]["memory"] == 2 * 8 * 64 * KiB
    attacker.disconnect(victim.peer_id)  # the connection goes: everything is returned, scopes dropped
    await _wait_for(lambda: victim.resources.stat()["system"]["connections"] == 0)
    stat = victim.resources.stat()
    assert stat["system"] == {"memory": 0, "inbound_streams": 0, "outbound_streams": 0, "connections": 0}
    assert stat["peers"] == {} and stat["ips"] == {}
    await _wait_for(lambda: attacker.resources.stat()["system"]["connections"] == 0)
    assert attacker.resources.stat()["system"]["outbound_streams"] == 0


async def test_budget_is_given_back_when_a_handler_crashes_with_unread_messages(make_peer):
    victim, caller = await make_peer(), await make_peer()
    got_first = asyncio.Event()

    async def crash_after_one(stream, ctx):
        await stream.recv()
        got_first.set()
        await asyncio.sleep(0.2)  # more messages arrive and wait unread in the inbox
        raise RuntimeError("crash with unread messages")

    victim.add_stream_handler("crash", crash_after_one)
    stream = await caller.open_stream(victim.get_visible_addresses()[0], "crash", timeout=30)
    async with stream:
        for _ in range(6):
            await stream.send(b"\0" * (100 * KiB))
        await got_first.wait()
        await _wait_for(lambda: victim.resources.stat()["system"]["memory"] >= 5 * 100 * KiB)
        with pytest.raises(Exception):
            await stream.recv()
    await _wait_for(lambda: victim.resources.stat()["system"]["memory"] == 0)
    assert victim.resources.stat()["system"]["inbound_streams"] == 0
    assert await caller.ping(victim.get_visible_addresses()[0]) >= 0


async def test_unread_replies_count_against_the_callers_budget(make_peer):
    """The caller side is budgeted too: replies it has not read are reserved, and given back."""
    caller, server = await make_peer(), await make_peer()

    async def flood(stream, ctx):
        for _ in range(4):
            await stream.send(b"\0" * (200 * KiB))
        await stream.send("done", end=True)

    server.add_stream_handler("flood", flood)
    async with await caller.open_stream(server.get_visible_addresses()[0], "flood", timeout=30) as stream:
        await _wait_for(lambda: caller.resources.stat()["system"]["memory"] >= 4 * 200 * KiB)
        assert caller.resources.peer_stat(server.peer_id)["outbound_streams"] == 1
        assert [len(m) for m in [await stream.recv() for _ in range(4)]] == [200 * KiB] * 4
        assert caller.resources.stat()["system"]["memory"] < 100
        assert await stream.recv() == "done"
    assert caller.resources.stat()["system"]["memory"] == 0
    assert caller.resources.stat()["system"]["outbound_streams"] == 0


async def test_a_stream_over_its_budget_fails_alone(make_peer):
    limits = Limits(stream_memory=1 * MiB, stream_window=256 * KiB)
    victim, caller = await make_peer(limits), await make_peer()
    victim.add_unary_handler("echo", lambda request, ctx: asyncio.sleep(0, request))
    address = victim.get_visible_addresses()[0]
    with pytest.raises(MessageTooLargeError):  # announced: 16 MiB (max_message_size); accepted: stream_memory
        await caller.call(address, "echo", b"\0" * (2 * MiB), timeout=10)
    assert await caller.call(address, "echo", b"\0" * (512 * KiB), timeout=10) == b"\0" * (512 * KiB)
    assert victim.resources.stat()["system"]["memory"] == 0


async def test_callers_wait_for_a_stream_slot_instead_of_being_refused(make_peer):
    """With 2 inbound streams per peer on both sides, a third concurrent call waits for a slot (and
    runs when one is free); one whose deadline passes while waiting fails with DeadlineExceededError."""
    limits = Limits(max_inbound_streams_per_peer=2)
    caller, server = await make_peer(limits), await make_peer(limits)
    gate, running, peak = asyncio.Event(), [], []

    async def slow(request, ctx):
        running.append(request)
        peak.append(len(running))
        await gate.wait()
        running.remove(request)
        return request

    server.add_unary_handler("slow", slow)
    address = server.get_visible_addresses()[0]
    await caller.connect(address)
    calls = [asyncio.ensure_future(caller.call(server.peer_id, "slow", i, timeout=30)) for i in range(5)]
    await _wait_for(lambda: len(running) == 2)
    with pytest.raises(DeadlineExceededError):
        await caller.call(server.peer_id, "slow", 99, timeout=0.3)
    gate.set()
    assert sorted(await asyncio.gather(*calls)) == list(range(5))
    assert max(peak) == 2


async def test_a_stream_refused_before_its_handler_started_gives_its_slot_back(make_peer):
    """OPEN and an oversized request in one burst: the handler task is cancelled before it ever
    runs, and the inbound stream slot is still given back (a leak would fill the caps for good)."""
    victim, caller = await make_peer(), await make_peer()
    ran = []

    async def small(request, ctx):
        ran.append(request)
        return b""

    victim.add_unary_handler("small", small, max_message_size=1024)
    await caller.connect(victim.get_visible_addresses()[0])
    conn = caller._connections[victim.peer_id][0]
    for _ in range(2):  # 2 x 200 > max_inbound_streams_per_peer (256): leaked slots would refuse the second
        streams = []
        for _ in range(200):
            stream = conn.open_stream("small", 10)
            conn.write_frame(DATA, 0, stream.id, b"\xc5\x08\x00" + b"\0" * 2048)  # bin 16 of 2 KiB, one frame
            streams.append(stream)
        await conn.drain()
        for stream in streams:
            with pytest.raises(MessageTooLargeError):
                await stream.recv()
        await _wait_for(lambda: victim.resources.stat()["system"]["inbound_streams"] == 0)
    assert ran == []
    victim_conn = victim._connections[caller.peer_id][0]
    await _wait_for(lambda: not victim_conn._handlers)
    assert victim.resources.stat()["system"]["memory"] == 0
    assert await caller.call(victim.peer_id, "small", b"ok", timeout=10) == b""
