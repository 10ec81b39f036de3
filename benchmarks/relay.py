#!/usr/bin/env python3
"""Relayed vs direct throughput and RTT between two peers behind NAT, and the time to go direct (issue 17).

    sudo .venv/bin/python benchmarks/relay.py [--json] [--mb 128] [--repeats 3] [--pings 50]
                                              [--delay-ms 1] [--time-limit 300]

Needs root (the network lab, tests/netlab.py, with NAT boxes). Layout: the relay R (``dht.P2P`` with
``NatService(relay="on")``, ``dht.peer.relay.RelayService`` with its default limits) on a public lab
host; the target B behind one port-restricted NAT box, holding a reservation on R
(``--use-relay R``); the dialer A behind another port-restricted box. Links unthrottled (no tbf),
``--delay-ms`` one-way to the core each (so a direct A-B round trip is ``4 x delay`` plus
forwarding, a relayed one twice that). Every peer is its own OS process in its own lab host.

1. **Relayed** (hole punching off on both sides): A dials B's relay address
   ``/ip4/R/tcp/P/p2p/R/relay/p2p/B``; the connection is checked to run through the relay
   (``dht.peer.relay.is_relayed``). ``relay_rtt_ms``: median of ``--pings`` ``p2p.ping`` after 10
   warm-up ones. ``relay_mb_s``: ``--mb`` MB (10**6 bytes) sent on one stream in 1 MiB messages to a
   handler that counts them and answers; the sender's time from opening the stream to the answer;
   median of ``--repeats`` after one warm-up. The end-to-end encryption is the normal one (the relay
   splices ciphertext). ``relay_cpu_cores``: the relay process's CPU seconds (``time.process_time``,
   asked over RPC before and after) per wall second of those transfers: a relay uses one event loop,
   so this is its share of one core.
2. **Upgrade** (hole punching on, ``dht.peer.holepunch``): a fresh pair of peers; A dials B's relay
   address again and the peers coordinate a simultaneous open. ``upgrade_s``: from the relayed
   connection being up (``connect`` returned) to the first direct (not relayed) connection between
   them. ``direct_rtt_ms`` and ``direct_mb_s``: as above, over that direct connection (the relay
   circuit is released by then; checked).

The JSON line (``--json``): ``relay_mb_s``, ``direct_mb_s``, ``relay_rtt_ms``, ``direct_rtt_ms``,
``upgrade_s``, plus ``relay_cpu_cores``, the samples and the configuration. A figure that could not
be measured is ``null`` with the reason in ``errors``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SINK, CPU = "bench.sink", "bench.cpu"
CHUNK = 1 << 20
PORT = 4000


def log(msg: str) -> None:
    print(f"[relay-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ peers (in lab hosts)

async def _wait_stdin_eof() -> None:
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)


async def _sink(stream: Any, ctx: Any) -> None:
    received = 0
    async for message in stream:
        received += len(message)
    await stream.send({"bytes": received}, end=True)


async def _cpu(request: Any, ctx: Any) -> dict:
    return {"cpu": time.process_time()}


async def role_relay(args: argparse.Namespace) -> None:
    from dht.peer.nat import NatOptions, NatService
    from dht.peer.p2p import P2P

    p2p = await P2P.create(host=args.host, port=PORT)
    p2p.add_unary_handler(CPU, _cpu)
    await NatService(p2p, NatOptions(check=False, relay="on", use_relay="off", holepunch=False)).start()
    print(json.dumps({"addr": str(p2p.get_visible_addresses()[0])}), flush=True)
    await _wait_stdin_eof()
    await p2p.nat.close()
    await p2p.shutdown()


async def role_target(args: argparse.Namespace) -> None:
    """Two peers (ports PORT and PORT + 1): without and with hole punching; prints their relay addresses."""
    from dht.peer.nat import NatOptions, NatService
    from dht.peer.p2p import P2P

    peers, out = [], {}
    for name, port, holepunch in (("relayed", PORT, False), ("punch", PORT + 1, True)):
        p2p = await P2P.create(host=args.host, port=port)
        p2p.add_stream_handler(SINK, _sink)
        nat = await NatService(p2p, NatOptions(check=False, relay="off", use_relay=[args.relay],
                                               holepunch=holepunch)).start()
        held = list(nat.relay_client.held.values())
        if not held:
            raise SystemExit(f"the relay {args.relay} gave {name} no reservation")
        out[name] = str(held[0].with_peer_id(p2p.peer_id))
        peers.append(p2p)
    print(json.dumps(out), flush=True)
    await _wait_stdin_eof()
    for p2p in peers:
        await p2p.nat.close()
        await p2p.shutdown()


def _relayed(conn: Any) -> bool:
    from dht.peer.relay import is_relayed

    return is_relayed(conn.channel)


async def _rtts(p2p: Any, peer: Any, n: int) -> list[float]:
    for _ in range(10):
        await p2p.ping(peer, timeout=10)
    return [1e3 * await p2p.ping(peer, timeout=10) for _ in range(n)]


async def _transfer(p2p: Any, peer: Any, nbytes: int) -> float:
    """Seconds to send ``nbytes`` on one stream and get the receiver's count back."""
    chunk = bytes(CHUNK)
    start = time.perf_counter()
    stream = await p2p.open_stream(peer, SINK, timeout=30)
    async with stream:
        sent = 0
        while sent < nbytes:
            size = min(CHUNK, nbytes - sent)
            await stream.send(chunk if size == CHUNK else chunk[:size])
            sent += size
        await stream.end()
        reply = await stream.recv()
    seconds = time.perf_counter() - start
    if reply != {"bytes": nbytes}:
        raise RuntimeError(f"the receiver counted {reply}, not {nbytes} bytes")
    return seconds


async def _throughputs(p2p: Any, peer: Any, args: argparse.Namespace, check: Any) -> list[float]:
    nbytes = int(args.mb * 1e6)
    rates = []
    for i in range(args.repeats + 1):
        seconds = await _transfer(p2p, peer, nbytes)
        check()
        if i:  # 0: warm-up
            rates.append(nbytes / 1e6 / seconds)
    return rates


async def role_dialer(args: argparse.Namespace) -> None:
    from dht.peer.addresses import PeerAddress
    from dht.peer.errors import P2PError
    from dht.peer.nat import NatOptions, NatService
    from dht.peer.p2p import P2P

    targets = json.loads(args.targets)
    relay = PeerAddress.parse(args.relay)
    result: dict[str, Any] = {"errors": {}}

    # ---- 1. relayed
    p2p = await P2P.create(host=args.host, port=PORT)
    await NatService(p2p, NatOptions(check=False, relay="off", use_relay="off", holepunch=False)).start()
    peer = await p2p.connect(targets["relayed"])
    conns = p2p.connections_to(peer)

    def only_relayed() -> None:
        if not conns or not all(_relayed(c) for c in p2p.connections_to(peer)):
            raise RuntimeError("the connection to the target is not (only) relayed")

    only_relayed()
    result["relay_rtt_samples_ms"] = await _rtts(p2p, peer, args.pings)
    before = (await p2p.call(relay, CPU, None, timeout=10))["cpu"]
    wall = time.perf_counter()
    result["relay_mb_s_samples"] = await _throughputs(p2p, peer, args, only_relayed)
    wall = time.perf_counter() - wall
    after = (await p2p.call(relay, CPU, None, timeout=10))["cpu"]
    result["relay_cpu_cores"] = round((after - before) / wall, 3)
    result["relay_rtt_ms"] = round(statistics.median(result["relay_rtt_samples_ms"]), 3)
    result["relay_mb_s"] = round(statistics.median(result["relay_mb_s_samples"]), 1)
    await p2p.nat.close()
    await p2p.shutdown()

    # ---- 2. upgrade to direct
    result.update(upgrade_s=None, direct_rtt_ms=None, direct_mb_s=None)
    p2p = await P2P.create(host=args.host, port=PORT + 1)
    await NatService(p2p, NatOptions(check=False, relay="off", use_relay="off", holepunch=True)).start()
    try:
        peer = await p2p.connect(targets["punch"])
        up = time.perf_counter()
        deadline = up + args.upgrade_timeout
        while time.perf_counter() < deadline and not any(not _relayed(c) for c in p2p.connections_to(peer)):
            await asyncio.sleep(0.002)
        if not any(not _relayed(c) for c in p2p.connections_to(peer)):
            raise RuntimeError(f"no direct connection within {args.upgrade_timeout} s "
                               f"(hole punching: {p2p.nat.status()})")
        result["upgrade_s"] = round(time.perf_counter() - up, 4)
        # the relayed connection is retired: new streams (pings, transfers) take the direct one
        deadline = time.perf_counter() + 10
        while any(_relayed(c) for c in p2p.connections_to(peer)) and time.perf_counter() < deadline:
            await asyncio.sleep(0.01)

        def only_direct() -> None:
            if any(_relayed(c) for c in p2p.connections_to(peer)):
                raise RuntimeError("a relayed connection to the target is still in use")

        only_direct()
        result["direct_rtt_samples_ms"] = await _rtts(p2p, peer, args.pings)
        result["direct_mb_s_samples"] = await _throughputs(p2p, peer, args, only_direct)
        result["direct_rtt_ms"] = round(statistics.median(result["direct_rtt_samples_ms"]), 3)
        result["direct_mb_s"] = round(statistics.median(result["direct_mb_s_samples"]), 1)
    except (RuntimeError, OSError, asyncio.TimeoutError, P2PError) as e:  # report what was measured and why
        result["errors"]["upgrade"] = f"{type(e).__name__}: {str(e)[:500]}"
    finally:
        await p2p.nat.close()
        await p2p.shutdown()
    print(json.dumps(result), flush=True)


# ------------------------------------------------------------------------------ the parent

def _read_json_line(proc: subprocess.Popen, what: str, timeout: float) -> dict:
    import select

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"{what} printed no JSON line (exit {proc.poll()}): {proc.stderr.read()[-3000:]}")


def run(args: argparse.Namespace) -> dict:
    from tests.netlab import Lab, Link, Nat, nat_unavailable

    reason = nat_unavailable()
    if reason:
        raise SystemExit(reason)
    link = Link(delay_ms=args.delay_ms)
    me = str(Path(__file__).resolve())
    with Lab([link], nats=[Nat("port-restricted", link), Nat("port-restricted", link)]) as lab:
        relay_host, target_host, dialer_host = lab.hosts[0], lab.nats[0].inner[0], lab.nats[1].inner[0]
        pipes = dict(stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        relay = relay_host.python([me, "--role", "relay", "--host", relay_host.ip], **pipes)
        relay_addr = _read_json_line(relay, "the relay", 60)["addr"]
        log(f"relay at {relay_addr}")
        target = target_host.python([me, "--role", "target", "--host", target_host.ip, "--relay", relay_addr], **pipes)
        targets = _read_json_line(target, "the target", 60)
        log(f"target reachable at {targets}")
        dialer = dialer_host.python([me, "--role", "dialer", "--host", dialer_host.ip, "--relay", relay_addr,
                                     "--targets", json.dumps(targets), "--mb", str(args.mb),
                                     "--repeats", str(args.repeats), "--pings", str(args.pings),
                                     "--upgrade-timeout", str(args.upgrade_timeout)], **pipes)
        result = _read_json_line(dialer, "the dialer", args.time_limit)
        for proc in (relay, target):
            proc.stdin.close()
        for proc in (relay, target, dialer):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        result["config"] = {"mb": args.mb, "repeats": args.repeats, "pings": args.pings,
                            "delay_ms": args.delay_ms, "configured_direct_rtt_ms": 4 * args.delay_ms,
                            "nat": "port-restricted x 2", "links": "unthrottled"}
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON line only")
    parser.add_argument("--mb", type=float, default=128.0, help="MB (10**6 bytes) per transfer (default 128)")
    parser.add_argument("--repeats", type=int, default=3, help="timed transfers after one warm-up (default 3)")
    parser.add_argument("--pings", type=int, default=50, help="timed pings (default 50)")
    parser.add_argument("--delay-ms", type=float, default=1.0, help="one-way delay of every lab link (default 1)")
    parser.add_argument("--upgrade-timeout", type=float, default=20.0, help="seconds to wait for a direct connection")
    parser.add_argument("--time-limit", type=float, default=300.0, help="seconds for the whole run (default 300)")
    parser.add_argument("--role", choices=("relay", "target", "dialer"), help=argparse.SUPPRESS)
    parser.add_argument("--host", help=argparse.SUPPRESS)
    parser.add_argument("--relay", help=argparse.SUPPRESS)
    parser.add_argument("--targets", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        coro = {"relay": role_relay, "target": role_target, "dialer": role_dialer}[args.role](args)
        asyncio.run(asyncio.wait_for(coro, args.time_limit + 60))
        return 0
    result = run(args)
    figures = ("relay_mb_s", "direct_mb_s", "relay_rtt_ms", "direct_rtt_ms", "upgrade_s", "relay_cpu_cores")
    if args.json:
        print(json.dumps(result))
    else:
        for key in figures:
            print(f"{key:>16}: {result.get(key)}")
        for what, error in result.get("errors", {}).items():
            print(f"{what}: {error}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
