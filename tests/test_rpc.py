"""The RPC surface shared by every upper layer, on real sockets and on the in-memory transport."""

import asyncio

import pytest

from dht import (ConnectionLostError, DeadlineExceededError, Limits, MessageTooLargeError, PeerUnreachableError,
                 RemoteError, StreamClosedError)


async def echo(request, ctx):
    return request


async def test_unary_roundtrip_of_msgpack_values(make_peer):
    a, b = await make_peer(), await make_peer()
    b.add_unary_handler("echo", echo)
    address = b.get_visible_addresses()[0]
    for value in [None, 1, -2**63, 3.5, "text", b"\x00\xff" * 100, [1, [2, {"k": b"v"}]], {"nested": {"a": [None]}}]:
        assert await a.call(address, "echo", value, timeout=10) == value


async def test_handler_sees_authenticated_caller(make_peer):
    a, b = await make_peer(), await make_peer()
    seen = []

    async def who(request, ctx):
        seen.append(ctx.peer_id)
        return str(ctx.peer_id)

    b.add_unary_handler("who", who)
    assert await a.call(b.get_visible_addresses()[0], "who", None, timeout=10) == str(a.peer_id)
    assert seen == [a.peer_id]


async def test_concurrent_calls_share_one_connection(make_peer):
    a, b = await make_peer(), await make_peer()

    async def slow_echo(request, ctx):
        await asyncio.sleep(0.01 * (request % 5))
        return request * 2

    b.add_unary_handler("slow_echo", slow_echo)
    await a.connect(b.get_visible_addresses()[0])
    results = await asyncio.gather(*(a.call(b.peer_id, "slow_echo", i, timeout=30) for i in range(300)))
    assert results == [2 * i for i in range(300)]
    assert len(a._connections[b.peer_id]) == 1 and len(b._connections[a.peer_id]) == 1


async def test_connection_is_reused_in_the_other_direction(make_peer):
    a, b = await make_peer(), await make_peer()
    a.add_unary_handler("echo", echo)
    b.add_unary_handler("echo", echo)
    await a.call(b.get_visible_addresses()[0], "echo", 1, timeout=10)
    # b never dialed a, yet can call it by PeerID over the connection a opened
    assert await b.call(a.peer_id, "echo", "back", timeout=10) == "back"
    assert len(b._connections[a.peer_id]) == 1


async def test_bidirectional_stream_interleaves_messages(make_peer):
    a, b = await make_peer(), await make_peer()

    async def doubler(stream, ctx):
        async for message in stream:
            await stream.send(message * 2)
        await stream.send("done", end=True)

    b.add_stream_handler("doubler", doubler)
    async with await a.open_stream(b.get_visible_addresses()[0], "doubler", timeout=30) as stream:
        for i in range(100):
            await stream.send(i)
            assert await stream.recv() == 2 * i
        await stream.end()
        assert await stream.recv() == "done"
        with pytest.raises(StreamClosedError):
            await stream.recv()


async def test_server_streams_many_messages(make_peer):
    a, b = await make_peer(), await make_peer()

    async def countdown(stream, ctx):
        n = await stream.recv()
        for i in range(n):
            await stream.send(i)

    b.add_stream_handler("countdown", countdown)
    async with await a.open_stream(b.get_visible_addresses()[0], "countdown", timeout=30) as stream:
        await stream.send(1000, end=True)
        assert [m async for m in stream] == list(range(1000))


async def test_large_message_is_fragmented_and_reassembled(make_peer):
    a, b = await make_peer(), await make_peer()
    b.add_unary_handler("echo", echo)
    blob = bytes(range(256)) * (5 * 4096 + 7)  # ~5 MB: several frames
    assert await a.call(b.get_visible_addresses()[0], "echo", blob, timeout=30) == blob


async def test_deadline_reaches_the_server(make_peer):
    a, b = await make_peer(), await make_peer()
    cancelled = asyncio.Event()

    async def forever(request, ctx):
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    b.add_unary_handler("forever", forever)
    with pytest.raises(DeadlineExceededError) as info:
        await a.call(b.get_visible_addresses()[0], "forever", None, timeout=0.3)
    assert "forever" in str(info.value)
    await asyncio.wait_for(cancelled.wait(), 5)  # the handler was stopped, not left running


async def test_caller_cancellation_reaches_the_server(make_peer):
    a, b = await make_peer(), await make_peer()
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def forever(request, ctx):
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    b.add_unary_handler("forever", forever)
    call = asyncio.ensure_future(a.call(b.get_visible_addresses()[0], "forever", None))
    await asyncio.wait_for(started.wait(), 5)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    await asyncio.wait_for(cancelled.wait(), 5)
    assert b._connections[a.peer_id][0].num_streams == 0


async def test_unknown_method_and_handler_errors_are_reported(make_peer):
    a, b = await make_peer(), await make_peer()

    async def broken(request, ctx):
        raise ValueError("boom")

    b.add_unary_handler("broken", broken)
    b.add_unary_handler("echo", echo)
    address = b.get_visible_addresses()[0]
    with pytest.raises(RemoteError) as info:
        await a.call(address, "no.such.method", 1, timeout=10)
    assert info.value.code == "unknown_method" and "no.such.method" in str(info.value)
    assert b.peer_id.short() in str(info.value)
    with pytest.raises(RemoteError) as info:
        await a.call(address, "broken", 1, timeout=10)
    assert info.value.code == "handler_error" and "ValueError: boom" in str(info.value)
    assert await a.call(address, "echo", "still serving", timeout=10) == "still serving"


async def test_oversized_messages_are_refused_on_both_sides(make_peer):
    small = Limits(max_message_size=1 << 20)
    a, b = await make_peer(), await make_peer(small)
    b.add_unary_handler("echo", echo)
    address = b.get_visible_addresses()[0]
    big = b"x" * (2 << 20)
    with pytest.raises(MessageTooLargeError):  # refused locally: b announced its limit in the handshake
        await a.call(address, "echo", big, timeout=10)
    # a sender that ignores the announced limit is cut off by the receiver, which keeps serving
    conn = a._connections[b.peer_id][0]
    conn.channel.remote_info.max_message_size = 1 << 30
    with pytest.raises(MessageTooLargeError) as info:
        await a.call(address, "echo", big, timeout=10)
    assert "limit" in str(info.value)
    assert await a.call(address, "echo", b"ok", timeout=10) == b"ok"


async def test_backpressure_bounds_the_receivers_buffer(make_peer):
    limits = Limits(stream_window=256 << 10)
    a, b = await make_peer(limits), await make_peer(limits)
    release, total = asyncio.Event(), []

    async def slow_sink(stream, ctx):
        await release.wait()
        n = 0
        async for message in stream:
            n += len(message)
        total.append(n)
        await stream.send(n)

    b.add_stream_handler("sink", slow_sink)
    chunk = b"z" * (64 << 10)
    sent = 0
    async with await a.open_stream(b.get_visible_addresses()[0], "sink", timeout=60) as stream:
        async def producer():
            nonlocal sent
            for _ in range(64):
                await stream.send(chunk)
                sent += 1

        task = asyncio.ensure_future(producer())
        await asyncio.sleep(0.5)
        # the window (256 KiB) plus one message: the sender is blocked, not buffering 4 MiB
        assert sent <= 256 // 64 + 1, sent
        assert not task.done()
        release.set()
        await asyncio.wait_for(task, 30)
        await stream.end()
        assert await stream.recv() == 64 * len(chunk)


async def test_shutdown_fails_calls_in_flight_with_a_clear_error(make_peer):
    a, b = await make_peer(), await make_peer()
    started = asyncio.Event()

    async def forever(request, ctx):
        started.set()
        await asyncio.sleep(3600)

    b.add_unary_handler("forever", forever)
    call = asyncio.ensure_future(a.call(b.get_visible_addresses()[0], "forever", None, timeout=60))
    await asyncio.wait_for(started.wait(), 5)
    await b.shutdown()
    with pytest.raises(ConnectionLostError) as info:
        await asyncio.wait_for(call, 10)
    assert "shutting down" in str(info.value)
    assert not a.is_connected(b.peer_id)


async def test_unreachable_peer_is_named(make_peer):
    a, b = await make_peer(), await make_peer()
    address = b.get_visible_addresses()[0]
    await b.shutdown()
    with pytest.raises(PeerUnreachableError) as info:
        await a.call(address, "p2p.ping", b"", timeout=10)
    assert str(b.peer_id) in str(info.value) or address.host in str(info.value)


async def test_calling_by_peer_id_without_any_address_fails_clearly(make_peer):
    a, b = await make_peer(), await make_peer()
    with pytest.raises(PeerUnreachableError) as info:
        await a.call(b.peer_id, "p2p.ping", b"", timeout=5)
    assert "no known address" in str(info.value)


async def test_ping_and_many_peers(make_peer):
    peers = [await make_peer() for _ in range(6)]
    for x in peers:
        for y in peers:
            if x is not y:
                assert await x.ping(y.get_visible_addresses()[0]) >= 0
    assert all(len(p.connected_peers()) == 5 for p in peers)
