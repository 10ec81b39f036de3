#!/usr/bin/env python3
"""Baseline worker for benchmarks/dht.py: one OS process hosting ``--peers`` hivemind 1.1.12 DHT peers.

Runs ONLY inside the benchmark venv (``bash benchmarks/bench_venv.sh``); swarm never imports
hivemind. Each peer is a ``hivemind.DHT`` (its own process and p2pd daemon, as hivemind runs it),
with hivemind's defaults (k = 20, num_replicas = 5, cache on) and loopback-only networking
(/ip4/127.0.0.1/tcp/0; NAT port mapping, AutoNAT and relays off). Peer 0 joins through the
addresses on the command line (none: it starts the DHT), the others through those and peer 0.
The workload runs inside each DHT process (``DHT.run_coroutine``) against its ``DHTNode``, so the
timings are the DHT's, not the pipe between this process and the DHT process.

The protocol is the same as benchmarks/dht.py's own worker: one JSON object per stdout line
(logs go to stderr). First ``{"ready": true, "addresses": [per peer], "join_s": [per peer], "pid"}``
(``join_s``: seconds from creating the peer to its DHT being ready), then one answer per stdin
command, in order:

    {"op": "store", "items": [[peer, key, value], ...], "ttl": s, "concurrency": c}
        -> {"t0", "t1", "ok": [bool per item], "lat": [seconds per item]}
    {"op": "get", "items": [[peer, key], ...], "concurrency": c}
        -> {"t0", "t1", "values": [value or null per item], "lat": [seconds per item]}
    {"op": "routing"} -> {"sizes": [routing table size per peer (bucket members, not replacements)]}
    {"op": "quit"}

``t0``/``t1`` are wall-clock (``time.time()``) instants at which this process's peers started the
first operation and finished the last one; each peer runs at most ``c`` operations at once.
A failed command answers ``{"error": "..."}``; end of stdin or ``--lifetime`` ends the process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading
import time
from functools import partial


def emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def log(msg: str) -> None:
    print(f"[dht_hm pid={os.getpid()}] {msg}", file=sys.stderr, flush=True)


# These run inside the DHT processes (forked from this one, so they resolve as __main__.*).


async def _bounded(jobs, concurrency: int):
    semaphore = asyncio.Semaphore(concurrency)

    async def one(job):
        async with semaphore:
            return await job()

    return await asyncio.gather(*(one(job) for job in jobs))


async def run_stores(dht, node, items: list, ttl: float, concurrency: int) -> dict:
    from hivemind.utils import get_dht_time

    async def job(key, value):
        started = time.perf_counter()
        try:
            ok = bool(await node.store(key, value, get_dht_time() + ttl))
        except Exception as e:  # noqa: BLE001 -- a failed store is a result, not a crash
            log(f"store {key!r} failed: {type(e).__name__}: {e}")
            ok = False
        return ok, time.perf_counter() - started

    t0 = time.time()
    results = await _bounded([partial(job, k, v) for k, v in items], concurrency)
    return {"t0": t0, "t1": time.time(), "ok": [r[0] for r in results], "lat": [r[1] for r in results]}


async def run_gets(dht, node, keys: list, concurrency: int) -> dict:
    async def job(key):
        started = time.perf_counter()
        try:
            found = await node.get(key, latest=False)
        except Exception as e:  # noqa: BLE001
            log(f"get {key!r} failed: {type(e).__name__}: {e}")
            found = None
        return (None if found is None else found.value), time.perf_counter() - started

    t0 = time.time()
    results = await _bounded([partial(job, k) for k in keys], concurrency)
    return {"t0": t0, "t1": time.time(), "values": [r[0] for r in results], "lat": [r[1] for r in results]}


async def routing_size(dht, node) -> int:
    return sum(len(bucket.nodes_to_peer_id) for bucket in node.protocol.routing_table.buckets)


def per_peer(items: list, peers: int) -> list[list[tuple[int, list]]]:
    """Split ``[[peer, ...], ...]`` by peer, remembering each item's position."""
    split: list[list[tuple[int, list]]] = [[] for _ in range(peers)]
    for position, item in enumerate(items):
        split[item[0]].append((position, item))
    return split


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--lifetime", type=float, default=900.0, help="exit after this many seconds regardless")
    parser.add_argument("initial_peers", nargs="*")
    args = parser.parse_args()
    timer = threading.Timer(args.lifetime, os._exit, (3,))
    timer.daemon = True
    timer.start()

    import hivemind

    net = dict(host_maddrs=["/ip4/127.0.0.1/tcp/0"], auto_nat=False, nat_port_map=False, use_relay=False,
               use_auto_relay=False)
    dhts, join_s = [], []
    initial = list(args.initial_peers)
    try:
        for index in range(args.peers):
            started = time.perf_counter()
            dht = hivemind.DHT(initial_peers=initial or None, start=True, **net)
            join_s.append(time.perf_counter() - started)
            dhts.append(dht)
            if index == 0:
                initial = initial + [str(a) for a in dht.get_visible_maddrs() if "127.0.0.1" in str(a)][:1]
        addresses = []
        for dht in dhts:
            maddrs = [str(a) for a in dht.get_visible_maddrs()]
            addresses.append(next((a for a in maddrs if "/ip4/127.0.0.1/" in a), maddrs[0] if maddrs else ""))
        emit({"ready": True, "addresses": addresses, "join_s": join_s, "pid": os.getpid()})

        for line in sys.stdin:
            if not line.strip():
                continue
            try:
                command = json.loads(line)
                op = command.get("op")
                if op in ("store", "get"):
                    futures = []
                    positions = []
                    for peer, batch in enumerate(per_peer(command["items"], len(dhts))):
                        if not batch:
                            continue
                        positions.append([p for p, _ in batch])
                        if op == "store":
                            fn = partial(run_stores, items=[(item[1], item[2]) for _, item in batch],
                                         ttl=float(command["ttl"]), concurrency=int(command["concurrency"]))
                        else:
                            fn = partial(run_gets, keys=[item[1] for _, item in batch],
                                         concurrency=int(command["concurrency"]))
                        futures.append(dhts[peer].run_coroutine(fn, return_future=True))
                    field = "ok" if op == "store" else "values"
                    merged: list = [None] * len(command["items"])
                    lat: list = [None] * len(command["items"])
                    t0, t1 = [], []
                    for future, where in zip(futures, positions):
                        result = future.result(timeout=600)
                        t0.append(result["t0"])
                        t1.append(result["t1"])
                        for p, value, seconds in zip(where, result[field], result["lat"]):
                            merged[p], lat[p] = value, seconds
                    emit({"t0": min(t0, default=time.time()), "t1": max(t1, default=time.time()), field: merged,
                          "lat": lat})
                elif op == "routing":
                    emit({"sizes": [dht.run_coroutine(routing_size) for dht in dhts]})
                elif op == "quit":
                    emit({"ok": True})
                    break
                else:
                    emit({"error": f"unknown op {op!r}"})
            except Exception as e:  # noqa: BLE001 -- reported to the driver
                emit({"error": f"{type(e).__name__}: {e}"})
    finally:
        for dht in dhts:
            try:
                dht.shutdown()
            except Exception as e:  # noqa: BLE001
                log(f"shutdown: {e}")
        os._exit(0)


if __name__ == "__main__":
    main()
