#!/usr/bin/env python3
"""DHT simulation: the real DHTNode / P2P / multiplexer code on the in-memory transport, N nodes in one process.

Run from the repo root::

    .venv/bin/python benchmarks/dht_sim.py [--sizes 100,1000,3000,10000] [--keys 200] [--lookups 500]
                                           [--dead-fraction 0.2] [--loss 0.01] [--seed 0]
                                           [--join {prefill,bootstrap}] [--concurrency 32] [--profile]

Everything runs on :mod:`dht.peer.virtual_clock` (idle waits are skipped, so latencies and the 2 s RPC
timeouts of dead peers cost virtual time, not wall time) over a :class:`dht.peer.memory_transport.MemoryNetwork`
with a per-frame latency uniform in [10, 100] ms and ``--loss`` (default 1%) of calls dropped
(the caller waits for its deadline). Per size N:

1. build: N peers (``network.create_peer``; seeded Ed25519 keys) and N ``DHTNode.create(p2p=...)``
   with rpc_timeout 2 s and refresh/republish intervals of a virtual year (maintenance idle).
   Joining, ``--join prefill`` (default): every node's routing table is filled as a long-running
   Kademlia network would have filled it, through the real ``RoutingTable.add_or_update`` (bucket
   splits, depth_modulo, replacement caches all apply): for every prefix length d, the node is
   offered up to ``--prefill-per-subtree`` (default 2k = 40) random nodes of the subtree that shares
   d bits with its id and differs in bit d (all of them when that subtree is small, so its nearest
   neighbours are all known), in random order; the address of every contact goes into its P2P
   address book. ``--join bootstrap``: each node joins with a real ``DHTNode.create(initial_peers=
   3 random earlier nodes)`` (ping + lookup of its own id + refresh of 4 buckets, all real RPCs),
   ``--join-batch`` nodes at a time. Real joins cost ~200 RPCs per node and keep every connection
   they open (see the report), so they are for small N and for validating the prefill (compare
   the rows of both modes at N=1000).
2. store: 2 x ``--keys`` keys with the real ``node.store`` from random nodes (``--concurrency`` at a time).
3. lookups, 0% dead: ``--lookups`` ``node.get`` of random keys of the first half, each from a random
   node (a node runs one get at a time, so its ``last_lookup`` / ``rpcs_sent`` belong to that get).
4. ``--dead-fraction`` of the nodes are killed silently (``network.kill``: no FIN, no answers, dials
   hang), then ``--lookups`` gets of the second half of the keys from random surviving nodes.
   Separate key halves: values cached by the first phase's gets do not help the second.

Per lookup: success (the value that was stored came back), hops (``LookupResult.rounds``: the
longest chain of dependent queries; 0 if the issuer held the value itself) and messages (every
DHT RPC the issuing node sent during the get: dht.find queries, the cache store on the path, pings
of stale contacts). Printed per N and phase: success %, median and p95 of hops and messages,
log2(N), wall seconds (build / store / lookups), RSS. ``--profile`` prints the top cProfile entries
of the largest size.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import cProfile
import gc
import io
import math
import os
import pstats
import random
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import psutil  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from dht.peer import virtual_clock  # noqa: E402
from dht.peer.addresses import PeerAddress  # noqa: E402
from dht.peer.identity import Identity  # noqa: E402
from dht.peer.memory_transport import MemoryNetwork  # noqa: E402
from dht.peer.multiplex import Limits  # noqa: E402
from dht.node import DHTNode  # noqa: E402
from dht.routing import ID_BITS  # noqa: E402

EPOCH = 1.7e9  # DHT time at virtual time 0
YEAR = 365 * 86400.0
BUCKET_SIZE = 20


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2 ** 20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


@dataclass
class PhaseResult:
    n: int
    alive: int
    success: int = 0
    attempts: int = 0
    hops: list[int] = field(default_factory=list)
    messages: list[int] = field(default_factory=list)
    wall: float = 0.0
    virtual: float = 0.0


@dataclass
class SizeResult:
    n: int
    build_wall: float = 0.0
    store_wall: float = 0.0
    stored: int = 0
    store_attempts: int = 0
    rss_after_build: float = 0.0
    phases: list[PhaseResult] = field(default_factory=list)
    rpcs_by_phase: dict[str, int] = field(default_factory=dict)


class Simulation:
    def __init__(self, n: int, args: argparse.Namespace):
        self.n, self.args = n, args
        self.rng = random.Random(args.seed * 1_000_003 + n)
        self.network = MemoryNetwork(latency=lambda rng: rng.uniform(0.01, 0.1), loss=args.loss,
                                     seed=args.seed * 7919 + n)
        self.nodes: list[DHTNode] = []
        self.names: list[str] = []
        self.addresses: list[PeerAddress] = []
        self.dead: set[int] = set()
        self.loop = asyncio.get_running_loop()

    def clock(self) -> float:
        return EPOCH + self.loop.time()

    def _node_kwargs(self, index: int) -> dict:
        return dict(bucket_size=BUCKET_SIZE, rpc_timeout=self.args.rpc_timeout, refresh_interval=YEAR,
                    republish_interval=YEAR, clock=self.clock, rng=random.Random(self.rng.random()))

    def _identity(self) -> Identity:
        return Identity(Ed25519PrivateKey.from_private_bytes(self.rng.randbytes(32)))

    async def build(self) -> None:
        limits = Limits()  # one shared (read-only) instance
        p2ps = []
        for index in range(self.n):
            name = f"n{index}"
            p2p = await self.network.create_peer(identity=self._identity(), limits=limits, name=name)
            self.names.append(name)
            self.addresses.append(p2p.get_visible_addresses()[0])
            p2ps.append(p2p)
        if self.args.join == "prefill":
            for index, p2p in enumerate(p2ps):
                self.nodes.append(await DHTNode.create(p2p=p2p, **self._node_kwargs(index)))
            self._prefill()
            return
        self.nodes.append(await DHTNode.create(p2p=p2ps[0], **self._node_kwargs(0)))
        while len(self.nodes) < self.n:
            chunk = range(len(self.nodes), min(self.n, len(self.nodes) + self.args.join_batch))

            async def join(i: int) -> DHTNode:
                seeds = self.rng.sample(range(chunk.start), min(3, chunk.start))
                return await DHTNode.create([self.addresses[s] for s in seeds], p2p=p2ps[i], **self._node_kwargs(i))

            self.nodes.extend(await asyncio.gather(*(join(i) for i in chunk)))
            if len(self.nodes) % 1000 < self.args.join_batch:
                log(f"  joined {len(self.nodes)}/{self.n} (rss {rss_mb():.0f} MB)")

    def _prefill(self) -> None:
        """Fill routing tables like a converged network: see the module docstring."""
        per_subtree = self.args.prefill_per_subtree
        ids = [node.node_id for node in self.nodes]
        order = sorted(range(self.n), key=lambda i: ids[i])
        sorted_ids = [ids[i] for i in order]
        bare = [PeerAddress("memory", name) for name in self.names]

        def count(lower: int, width: int) -> tuple[int, int]:
            return bisect.bisect_left(sorted_ids, lower), bisect.bisect_left(sorted_ids, lower + width)

        for index, node in enumerate(self.nodes):
            own = ids[index]
            offered: list[int] = []
            for depth in range(ID_BITS):
                shift = ID_BITS - depth - 1
                width = 1 << shift
                own_lower = (own >> shift) << shift  # our subtree at depth + 1
                lo, hi = count(own_lower ^ width, width)  # its sibling: shares exactly `depth` bits with us
                if hi - lo <= per_subtree:
                    offered.extend(order[lo:hi])
                else:
                    offered.extend(order[lo + j] for j in self.rng.sample(range(hi - lo), per_subtree))
                lo, hi = count(own_lower, width)
                if hi - lo <= 1:
                    break  # nobody else shares depth + 1 bits with us
            self.rng.shuffle(offered)
            table, p2p = node.routing_table, node.p2p
            for other in offered:
                peer_id = self.nodes[other].peer_id
                table.add_or_update(peer_id, ids[other])
                p2p.add_addresses(peer_id, [bare[other]])

    def alive_indices(self) -> list[int]:
        return [i for i in range(self.n) if i not in self.dead]

    async def store_keys(self, keys: list[str]) -> tuple[int, int]:
        semaphore = asyncio.Semaphore(self.args.concurrency)
        alive = self.alive_indices()
        ok = 0

        async def one(key: str) -> None:
            nonlocal ok
            async with semaphore:
                node = self.nodes[self.rng.choice(alive)]
                if await node.store(key, {"key": key}, expiration_time=self.clock() + 86400):
                    ok += 1

        await asyncio.gather(*(one(key) for key in keys))
        return ok, len(keys)

    async def lookups(self, keys: list[str], count: int) -> PhaseResult:
        alive = self.alive_indices()
        result = PhaseResult(self.n, len(alive))
        busy: set[int] = set()
        jobs = [self.rng.choice(keys) for _ in range(count)]
        started = self.loop.time()

        async def worker() -> None:
            while jobs:
                key = jobs.pop()
                issuer = self.rng.choice(alive)
                while issuer in busy:
                    issuer = self.rng.choice(alive)
                busy.add(issuer)
                node = self.nodes[issuer]
                node.last_lookup = None
                sent = node.rpcs_sent
                try:
                    found = await node.get(key)
                    await asyncio.sleep(0)  # let the spawned cache store start, so it is counted
                finally:
                    busy.discard(issuer)
                result.attempts += 1
                if found is not None and found.value == {"key": key}:
                    result.success += 1
                result.hops.append(node.last_lookup.rounds if node.last_lookup is not None else 0)
                result.messages.append(node.rpcs_sent - sent)

        await asyncio.gather(*(worker() for _ in range(self.args.concurrency)))
        result.virtual = self.loop.time() - started
        return result

    def kill(self, fraction: float) -> None:
        victims = self.rng.sample(range(self.n), round(fraction * self.n))
        for index in victims:
            self.network.kill(self.nodes[index].peer_id)
            self.dead.add(index)

    def total_rpcs(self) -> int:
        return sum(node.rpcs_sent for node in self.nodes)


async def simulate(n: int, args: argparse.Namespace) -> SizeResult:
    sim = Simulation(n, args)
    out = SizeResult(n)
    wall = time.perf_counter()
    await sim.build()
    gc.collect()
    gc.freeze()  # the built network is long-lived: keep the cyclic GC from rescanning it every collection
    out.build_wall = time.perf_counter() - wall
    out.rss_after_build = rss_mb()
    out.rpcs_by_phase["build"] = sim.total_rpcs()
    log(f"N={n}: built in {out.build_wall:.1f} s, rss {out.rss_after_build:.0f} MB, "
        f"mean routing table {statistics.mean(len(x.routing_table) for x in sim.nodes):.0f} contacts")

    keys_a = [f"key-a-{j}" for j in range(args.keys)]
    keys_b = [f"key-b-{j}" for j in range(args.keys)]
    wall = time.perf_counter()
    before = sim.total_rpcs()
    out.stored, out.store_attempts = await sim.store_keys(keys_a + keys_b)
    out.store_wall = time.perf_counter() - wall
    out.rpcs_by_phase["store"] = sim.total_rpcs() - before
    log(f"N={n}: stored {out.stored}/{out.store_attempts} in {out.store_wall:.1f} s")

    for label, fraction, keys in (("0%", 0.0, keys_a), (f"{args.dead_fraction:.0%}", args.dead_fraction, keys_b)):
        if fraction:
            sim.kill(fraction)
        wall = time.perf_counter()
        before = sim.total_rpcs()
        phase = await sim.lookups(keys, args.lookups)
        phase.wall = time.perf_counter() - wall
        out.rpcs_by_phase[f"lookups {label} dead"] = sim.total_rpcs() - before
        out.phases.append(phase)
        log(f"N={n}: {label} dead: {phase.success}/{phase.attempts} in {phase.wall:.1f} s "
            f"(virtual {phase.virtual:.0f} s)")
    return out


def print_table(results: list[SizeResult], args: argparse.Namespace) -> None:
    header = (f"{'N':>6} {'log2N':>6} {'alive':>6} {'success':>8} {'hops med':>8} {'p95':>4} "
              f"{'msgs med':>8} {'p95':>4} {'build s':>8} {'store s':>8} {'lookup s':>8} {'RSS MB':>7}")
    print(header)
    print("-" * len(header))
    for res in results:
        for phase in res.phases:
            print(f"{res.n:>6} {math.log2(res.n):>6.1f} {phase.alive / res.n:>6.0%} "
                  f"{100 * phase.success / max(1, phase.attempts):>7.1f}% "
                  f"{statistics.median(phase.hops):>8.1f} {percentile(phase.hops, 0.95):>4} "
                  f"{statistics.median(phase.messages):>8.1f} {percentile(phase.messages, 0.95):>4} "
                  f"{res.build_wall:>8.1f} {res.store_wall:>8.1f} {phase.wall:>8.1f} {res.rss_after_build:>7.0f}")
    print()
    for res in results:
        per = ", ".join(f"{k}: {v}" for k, v in res.rpcs_by_phase.items())
        print(f"N={res.n}: stores ok {res.stored}/{res.store_attempts}; DHT RPCs sent per phase: {per}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="100,1000,3000,10000")
    parser.add_argument("--keys", type=int, default=200, help="keys stored per phase")
    parser.add_argument("--lookups", type=int, default=500, help="gets per phase")
    parser.add_argument("--dead-fraction", type=float, default=0.2)
    parser.add_argument("--loss", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rpc-timeout", type=float, default=2.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--join", choices=("prefill", "bootstrap"), default="prefill")
    parser.add_argument("--join-batch", type=int, default=20)
    parser.add_argument("--prefill-per-subtree", type=int, default=2 * BUCKET_SIZE)
    parser.add_argument("--profile", action="store_true", help="cProfile the largest size")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    started = time.perf_counter()
    results = []
    for n in sizes:
        profiler = cProfile.Profile() if args.profile and n == max(sizes) else None
        if profiler:
            profiler.enable()
        results.append(virtual_clock.run(simulate(n, args)))
        gc.unfreeze()
        if profiler:
            profiler.disable()
            stream = io.StringIO()
            pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(25)
            log(stream.getvalue())
        gc.collect()
    print(f"\nDHT simulation: join={args.join}, latency U(10, 100) ms per frame, loss {args.loss:.0%}, "
          f"rpc timeout {args.rpc_timeout} s, k={BUCKET_SIZE}, alpha=3, {args.keys} keys per phase, "
          f"{args.lookups} gets per phase, seed {args.seed}")
    print_table(results, args)
    print(f"\npeak RSS {peak_rss_mb():.0f} MB; total wall {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
