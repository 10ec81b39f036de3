"""Attacks after the handshake, over real sockets on loopback: one identity (one IP) trying to pin the
victim's memory with unfinished messages, to hold thousands of never-fed handlers over many
connections, and to fill the victim's log with its mistakes (issue 11, root cause 7).

The attacker is a real P2P peer whose extra connections come from its own transport (real handshakes,
same identity) and whose frames are written straight onto the multiplexed connection, bypassing the
sender-side checks a well-behaved peer applies to itself.
"""

from __future__ import annotations

import asyncio
import logging
import time

import psutil
import pytest

from dht import P2P, DeadlineExceededError, Limits, MessageTooLargeError, P2PError, RemoteError
from dht.peer.errors import BadRequestError
from dht.peer.multiplex import DATA, FLAG_MORE, Connection

MiB = 1 << 20


async def echo(request, ctx):
    return request


async def _extra_connections(attacker: P2P, victim: P2P, n: int) -> list[Connection]:
    """``n`` more authenticated connections from ``attacker``'s identity to ``victim`` (not pooled)."""
    address = victim.get_visible_addresses()[0]
    conns = []
    for _ in range(n):
        channel = await attacker._transport.dial(address, victim.peer_id)
        conns.append(Connection(channel, attacker.limits, True, attacker._dispatch, lambda conn: None))
    return conns


async def _close_all(conns: list[Connection]) -> None:
    for conn in conns:
        conn.close("test over")
    await asyncio.gather(*(c.wait_closed() for c in conns), return_exceptions=True)


async def _sync(conn: Connection) -> None:
    """Wait until the victim processed every frame sent on ``conn`` so far (frames are ordered): its
    reply to a ping, or its refusal when the attacker's own budget is spent."""
    stream = conn.open_stream("p2p.ping", 30)
    async with stream:
        await stream.send(b"", end=True)
        try:
            await stream.recv()
        except RemoteError as e:
            if e.code != "overloaded":
                raise


def _rss() -> int:
    return psutil.Process().memory_info().rss


async def test_unfinished_messages_on_many_streams_stay_within_the_budgets():
    """6 connections x 4 streams, each sending 1 MiB fragments of a message that never ends (17 MiB
    each, 408 MiB in all; the old code kept all of it): the victim's reserved memory never exceeds
    the peer budget (64 MiB), its RSS grows far less than what was sent, each stream over budget is
    failed (too_large / overloaded) while the connections keep serving, and everything is given back."""
    victim = await P2P.create(host="127.0.0.1")
    attacker = await P2P.create(host="127.0.0.1")
    conns: list[Connection] = []
    try:
        victim.add_unary_handler("echo", echo)
        await attacker.call(victim.get_visible_addresses()[0], "echo", b"warm-up", timeout=10)
        conns = await _extra_connections(attacker, victim, 6)
        streams = [conn.open_stream("echo", None) for conn in conns for _ in range(4)]
        for conn in conns:
            await _sync(conn)
        chunk = b"\xc6" + (16 * MiB).to_bytes(4, "big") + b"\0" * (MiB - 5)  # bin 32 header announcing 16 MiB
        rest = b"\0" * MiB
        rss_before, rss_peak, reserved_peak = _rss(), 0, 0
        for round_ in range(17):  # past the 16 MiB stream budget: no stream survives
            for stream in streams:
                stream._conn.write_frame(DATA, FLAG_MORE, stream.id, chunk if round_ == 0 else rest)
                await stream._conn.drain()
            for conn in conns:
                await _sync(conn)
            rss_peak = max(rss_peak, _rss())
            reserved_peak = max(reserved_peak, victim.resources.stat()["system"]["memory"])
        sent = 17 * len(streams) * MiB
        assert rss_peak - rss_before < sent // 2, (rss_peak - rss_before) / MiB
        limits = victim.limits
        assert 0 < reserved_peak <= limits.peer_memory
        # every attacking stream was failed by the victim with a budget code, the connections still serve
        for stream in streams:
            assert stream._error is not None
        codes = {getattr(s._error, "code", "too_large" if isinstance(s._error, MessageTooLargeError) else None)
                 for s in streams}
        assert codes <= {"too_large", "overloaded"}, codes
        for conn in conns:
            call = conn.open_stream("echo", 10)
            async with call:
                await call.send(b"still serving", end=True)
                assert await call.recv() == b"still serving"
        assert victim.resources.stat()["system"]["memory"] == 0
        await _close_all(conns)
        conns = []
        await asyncio.sleep(0.2)
        assert await attacker.call(victim.peer_id, "echo", b"ok", timeout=10) == b"ok"
        stat = victim.resources.stat()
        assert stat["system"]["memory"] == 0 and stat["system"]["inbound_streams"] == 0
    finally:
        await _close_all(conns)
        await attacker.shutdown()
        await victim.shutdown()


async def test_messages_that_decode_to_millions_of_objects_are_refused():
    """8 streams, each one 1 MiB message of a million empty arrays, to a handler that does not read
    yet (the old code decoded each into 64 MiB of Python lists, kept in the stream's inbox): the
    decoded objects are budgeted, so each is refused with too_large and the victim's RSS stays low."""
    victim = await P2P.create(host="127.0.0.1")
    attacker = await P2P.create(host="127.0.0.1")
    release = asyncio.Event()

    async def slow_reader(stream, ctx):
        await release.wait()
        async for _ in stream:
            pass
        await stream.send("read")

    try:
        victim.add_stream_handler("slow", slow_reader)
        victim.add_unary_handler("echo", echo)
        address = victim.get_visible_addresses()[0]
        await attacker.call(address, "echo", b"warm-up", timeout=10)
        conn = attacker._connections[victim.peer_id][0]
        n = MiB - 16
        bomb = b"\xdd" + n.to_bytes(4, "big") + b"\x90" * n  # array 32 of n empty fixarrays
        rss_before = _rss()
        streams = []
        for _ in range(8):
            stream = conn.open_stream("slow", 30)
            conn.write_frame(DATA, 0, stream.id, bomb)
            await conn.drain()
            streams.append(stream)
        await _sync(conn)
        grown = _rss() - rss_before
        assert grown < 128 * MiB, grown / MiB
        for stream in streams:
            with pytest.raises(MessageTooLargeError) as info:
                await asyncio.wait_for(stream.recv(), 5)
            assert "objects" in str(info.value)
        # an ordinary structured message of a few thousand objects is fine
        release.set()
        async with await attacker.open_stream(address, "slow", timeout=30) as stream:
            await stream.send({"items": [[b"key", None, b"value" * 10, 1.5, False] for _ in range(2000)]})
            await stream.end()
            assert await stream.recv() == "read"
        assert victim.resources.stat()["system"]["memory"] == 0
    finally:
        release.set()
        await attacker.shutdown()
        await victim.shutdown()


async def test_one_identity_cannot_hold_thousands_of_never_fed_handlers():
    """12 connections x 300 streams to a handler that waits for a request that never comes (3,600 from
    one identity; the old code started all of them): at most ``max_inbound_streams_per_peer`` (256)
    handlers run over all the connections, the rest are refused with 'overloaded' at once, and a
    legitimate peer is still served meanwhile."""
    victim = await P2P.create(host="127.0.0.1")
    attacker = await P2P.create(host="127.0.0.1")
    legit = await P2P.create(host="127.0.0.1")
    conns: list[Connection] = []
    running = 0

    async def wait_for_request(stream, ctx):
        nonlocal running
        running += 1
        try:
            await stream.recv()
        finally:
            running -= 1

    try:
        victim.add_stream_handler("wait", wait_for_request)
        victim.add_unary_handler("echo", echo)
        conns = await _extra_connections(attacker, victim, 12)
        await asyncio.sleep(0.2)  # connections over the victim's per-peer cap (if any) are told so
        streams = [conn.open_stream("wait", None) for conn in conns if conn.usable for _ in range(300)]
        for conn in conns:
            try:
                await _sync(conn)
            except P2PError:
                pass  # a connection the victim refused
        await asyncio.sleep(0.3)
        cap = victim.limits.max_inbound_streams_per_peer
        assert running <= cap, running
        assert victim.resources.peer_stat(attacker.peer_id)["inbound_streams"] <= cap
        alive = [s for s in streams if s._conn.usable]
        assert len(alive) > cap  # the attack did try more than the cap
        refused = [s for s in alive if isinstance(s._error, RemoteError) and s._error.code == "overloaded"]
        assert len(refused) >= len(alive) - cap
        # a legitimate peer (its own identity) is served during the attack
        start = time.monotonic()
        assert await legit.call(victim.get_visible_addresses()[0], "echo", b"hello", timeout=10) == b"hello"
        assert time.monotonic() - start < 5
        await _close_all(conns)
        conns = []
        for _ in range(50):
            if running == 0:
                break
            await asyncio.sleep(0.1)
        assert running == 0
        assert victim.resources.peer_stat(attacker.peer_id)["inbound_streams"] == 0
    finally:
        await _close_all(conns)
        for p in (legit, attacker, victim):
            await p.shutdown()


async def test_handler_without_a_caller_deadline_is_reaped():
    """A call opened with no timeout and never fed is stopped at the server's default deadline."""
    victim = await P2P.create(host="127.0.0.1", limits=Limits(default_handler_timeout=1.0))
    attacker = await P2P.create(host="127.0.0.1")
    cancelled = asyncio.Event()

    async def wait_for_request(stream, ctx):
        assert ctx.deadline is not None
        try:
            await stream.recv()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    try:
        victim.add_stream_handler("wait", wait_for_request)
        stream = await attacker.open_stream(victim.get_visible_addresses()[0], "wait", timeout=None)
        start = time.monotonic()
        async with stream:
            with pytest.raises(DeadlineExceededError):
                await asyncio.wait_for(stream.recv(), 10)
        assert time.monotonic() - start >= 0.9
        await asyncio.wait_for(cancelled.wait(), 5)
        await asyncio.sleep(0.05)
        assert victim.resources.peer_stat(attacker.peer_id)["inbound_streams"] == 0
    finally:
        await attacker.shutdown()
        await victim.shutdown()


async def test_a_callers_long_deadline_is_cut_to_the_servers_maximum():
    victim = await P2P.create(host="127.0.0.1", limits=Limits(default_handler_timeout=0.5, max_handler_timeout=1.0))
    attacker = await P2P.create(host="127.0.0.1")

    async def wait_for_request(stream, ctx):
        await stream.recv()

    try:
        victim.add_stream_handler("wait", wait_for_request)
        stream = await attacker.open_stream(victim.get_visible_addresses()[0], "wait", timeout=1e6)
        async with stream:
            with pytest.raises(DeadlineExceededError):
                await asyncio.wait_for(stream.recv(), 10)
    finally:
        await attacker.shutdown()
        await victim.shutdown()


async def test_per_method_message_limit_refuses_before_buffering():
    """A method registered with max_message_size=64 KiB: a 4 MiB request (sent in 64 KiB fragments)
    is refused with too_large after at most the limit was buffered; the handler never runs; the
    connection goes on serving, and a request under the limit works."""
    victim = await P2P.create(host="127.0.0.1")
    attacker = await P2P.create(host="127.0.0.1")
    ran = []

    async def small(request, ctx):
        ran.append(len(request))
        return len(request)

    try:
        victim.add_unary_handler("small", small, max_message_size=64 << 10)
        victim.add_unary_handler("echo", echo)
        address = victim.get_visible_addresses()[0]
        assert await attacker.call(address, "small", b"x" * 1000, timeout=10) == 1000
        conn = attacker._connections[victim.peer_id][0]
        stream = conn.open_stream("small", 10)
        fragment = b"\xc6" + (4 * MiB).to_bytes(4, "big") + b"\0" * ((16 << 10) - 5)
        peak = 0
        for i in range(4 * MiB // (16 << 10)):
            conn.write_frame(DATA, FLAG_MORE, stream.id, fragment if i == 0 else b"\0" * (16 << 10))
            await conn.drain()
            if i % 16 == 0:
                await _sync(conn)
                peak = max(peak, victim.resources.stat()["system"]["memory"])
        with pytest.raises(MessageTooLargeError):
            await stream.recv()
        assert peak <= 64 << 10
        assert ran == [1000]
        assert await attacker.call(address, "echo", b"fine", timeout=10) == b"fine"
        with pytest.raises(MessageTooLargeError):  # a well-behaved caller gets the same answer
            await attacker.call(address, "small", b"y" * (100 << 10), timeout=10)
        assert ran == [1000]
    finally:
        await attacker.shutdown()
        await victim.shutdown()


async def test_remote_mistakes_log_a_few_lines_without_tracebacks(caplog):
    """200 malformed requests (handlers raising BadRequestError, ValueError, TypeError, KeyError):
    the caller gets bad_request / handler_error with a bounded text, and the victim logs a few
    one-line messages, no traceback (the old code logged a traceback per request)."""
    victim = await P2P.create(host="127.0.0.1")
    attacker = await P2P.create(host="127.0.0.1")

    async def strict(request, ctx):
        kind = request.get("kind") if isinstance(request, dict) else None
        if kind == "bad":
            raise BadRequestError("field 'x' must be an int")
        if kind == "value":
            raise ValueError(request["payload"])
        if kind == "type":
            raise TypeError("x" * 100_000)
        raise KeyError(request["missing"])

    nested: list = []
    for _ in range(5000):  # str() of it raises RecursionError
        nested = [nested]
    try:
        victim.add_unary_handler("strict", strict)
        victim.add_unary_handler("echo", echo)
        address = victim.get_visible_addresses()[0]
        caplog.set_level(logging.DEBUG, logger="dht")
        kinds = ["bad", "value", "type", "key"]
        for i in range(200):
            kind = kinds[i % 4]
            with pytest.raises(RemoteError) as info:
                await attacker.call(address, "strict", {"kind": kind, "payload": [1, [2]], "missing": "m"}, timeout=10)
            assert info.value.code == ("bad_request" if kind == "bad" else "handler_error")
            assert len(str(info.value)) < 1500
        # an exception whose argument cannot even be printed: still answered, bounded
        victim.add_unary_handler("nested", lambda request, ctx: _raise(ValueError(nested)))
        with pytest.raises(RemoteError) as info:
            await attacker.call(address, "nested", None, timeout=10)
        assert info.value.code == "handler_error" and "ValueError" in str(info.value)
        assert await attacker.call(address, "echo", 1, timeout=10) == 1
        lines = [r for r in caplog.records if r.name.startswith("dht.peer.multiplex")]
        assert len(lines) <= 12, [r.getMessage()[:100] for r in lines]
        assert not any(r.exc_info for r in lines)
        assert all(len(r.getMessage()) < 2000 for r in lines)
    finally:
        await attacker.shutdown()
        await victim.shutdown()


async def _raise(error: BaseException):
    raise error


async def test_genuine_handler_bugs_log_rate_limited_tracebacks(caplog):
    victim = await P2P.create(host="127.0.0.1")
    attacker = await P2P.create(host="127.0.0.1")

    async def buggy(request, ctx):
        raise RuntimeError("a bug")

    try:
        victim.add_unary_handler("buggy.rate_limited", buggy)
        address = victim.get_visible_addresses()[0]
        caplog.set_level(logging.ERROR, logger="dht")
        for _ in range(50):
            with pytest.raises(RemoteError) as info:
                await attacker.call(address, "buggy.rate_limited", None, timeout=10)
            assert info.value.code == "handler_error" and "RuntimeError: a bug" in str(info.value)
        tracebacks = [r for r in caplog.records if r.exc_info and "buggy.rate_limited" in r.getMessage()]
        assert 1 <= len(tracebacks) <= 3
    finally:
        await attacker.shutdown()
        await victim.shutdown()
