#!/usr/bin/env python3
"""What the dashboard's instrumentation costs: CPU per training step with counting on vs off, and how
fast a peer that knows 64 peers answers a scrape.

    .venv/bin/python benchmarks/metrics.py [--steps 150] [--repeats 3] [--scrapes 1000] [--peers 64] [--json]

(a) Overhead. Two peers (each its own DHT node and :class:`swarm.Optimizer`, in threads of this
process, joined through a bootstrap DHT on 127.0.0.1) train ``swarm.examples.digits:task`` (one torch
thread, sync mode) for ``--steps`` steps each. With counting on, the peer layer counts bytes and call
times per RPC method (``dht.peer.rpc_stats``) and each peer's :class:`swarm.metrics.Metrics` is
rendered once a second (a scrape; Prometheus scrapes every 15 s by default); with counting off
(``SWARM_METRICS=0``, read when a P2P starts) nothing is counted nor rendered. The process's CPU
seconds (all threads) over the training window, divided by the steps of both peers, are CPU seconds
per step. Modes alternate (off, on, off, on, ...) ``--repeats`` times; the ratio is the median "on"
over the median "off" (its spread: the extreme ratios of the individual pairs). On a shared machine
that ratio's noise is several percent, more than the effect, so the script also estimates the
overhead from its parts: the CPU time of the counting operations per RPC (timed over 200,000
iterations) times the RPCs per training step (counted in the "on" runs), plus the scrapes' CPU time
per step, over the CPU time per step with counting off.

(b) Scrape latency. A DHT node in this process (bucket size 64, so that its routing table holds them
all) and ``--peers`` DHT nodes on 127.0.0.1 in 4 worker processes (so that this process holds the
sockets a real peer holds, not all of theirs), each storing its progress record of one announced run:
``Metrics.render()`` of the first node (``--scrapes`` times) and :func:`swarm.status.collect_status`
of that run (a twentieth as many; it reads the records from the DHT over loopback), p50/p99 ms.

Targets (issue 18): <= 2 % overhead, <= 10 ms p99 for a scrape.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _train_once(steps: int, counting: bool) -> dict:
    """One run of two peers; CPU seconds per step (both peers' steps) over the training window."""
    import torch

    from dht import DHT
    from swarm.metrics import Metrics
    from swarm.optimizer import Optimizer
    from swarm.status import PeerView
    from swarm.task import load_task

    os.environ["SWARM_METRICS"] = "1" if counting else "0"
    task = load_task("swarm.examples.digits:task")
    dhts = [DHT(host="127.0.0.1")]
    dhts += [DHT(initial_peers=dhts[0].get_visible_addresses(), host="127.0.0.1") for _ in range(2)]
    assert all((d.node.p2p.stats is not None) == counting for d in dhts)
    opts, models = [], []
    run_id = f"bench-metrics-{counting}-{time.time_ns()}"
    for d in dhts[1:]:
        torch.manual_seed(0)
        model = task.model()
        opts.append(Optimizer(dht=d, run_id=run_id, optimizer=task.optimizer,
                              params=model.parameters(), target_batch_size=task.target_batch_size,
                              batch_size_per_step=task.batch_size, matchmaking_time=1.0))
        models.append(model)
    deadline = time.monotonic() + 30
    while min(o.tracker.refresh().num_peers for o in opts) < 2 and time.monotonic() < deadline:
        for o in opts:  # a first report, so that each sees the other before the measured window
            o.tracker.report(0, 0, 0.0)
        time.sleep(0.2)
    views = [PeerView(role="trainer", run_id=o.run_id, state="training", optimizer=o) for o in opts]
    metrics = [Metrics(d.node, v) for d, v in zip(dhts[1:], views)] if counting else []
    start = threading.Barrier(3)
    finished = threading.Event()
    errors: list[BaseException] = []

    def peer(i: int) -> None:
        try:
            batches = task.batches(i, 2, task.batch_size, i)
            start.wait()
            for _ in range(steps):
                batch = next(batches)
                loss = task.loss(models[i], batch)
                loss.backward()
                opts[i].step(batch_size=task.samples_in(batch), loss=loss)
                opts[i].zero_grad()
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=peer, args=(i,)) for i in range(2)]
    scrapes, render_seconds = 0, 0.0
    try:
        for t in threads:
            t.start()
        start.wait()
        cpu0, wall0 = time.process_time(), time.monotonic()
        while any(t.is_alive() for t in threads):
            finished.wait(1.0)
            for m in metrics:  # a scrape of each peer per second
                t0 = time.perf_counter()
                m.render()
                render_seconds += time.perf_counter() - t0
                scrapes += 1
        cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
        if errors:
            raise errors[0]
        rounds = sum(o.round_counts["ok"] for o in opts)
        epochs = [o.local_epoch for o in opts]
        calls = 0
        for d in dhts[1:]:
            stats = d.node.p2p.stats
            if stats is not None:
                calls += sum(m.calls for table in (stats.outbound, stats.inbound) for m in table.values())
    finally:
        for o in opts:
            o.shutdown()
        for d in dhts:
            d.shutdown()
    return {"counting": counting, "cpu_per_step_ms": 1e3 * cpu / (2 * steps), "wall_s": wall, "epochs": epochs,
            "rounds_ok": rounds, "scrapes": scrapes, "render_ms_mean": 1e3 * render_seconds / max(scrapes, 1),
            "rpc_calls_per_step": calls / (2 * steps), "render_ms_per_step": 1e3 * render_seconds / (2 * steps)}


def _per_call_cost(iterations: int = 200_000) -> dict:
    """CPU microseconds that counting adds to one RPC, both ends together: the operations the
    multiplexer runs per call when counting is on (the method's entry looked up, a message sent and
    one received counted, the call's duration observed; on each side), timed over many iterations."""
    from dht.peer.rpc_stats import RpcStats

    client, server = RpcStats(), RpcStats()
    for i in range(20):  # a realistic table: a few methods on each side
        client.entry(f"method.{i}", False)
        server.entry(f"method.{i}", True)
    clock = time.monotonic
    t0 = time.process_time()
    for _ in range(iterations):
        for stats, inbound in ((client, False), (server, True)):
            opened = clock()
            entry = stats.entry("method.7", inbound)
            if entry is not None:
                entry.bytes_sent += 300
            if entry is not None:
                entry.bytes_received += 300
            if entry is not None:
                entry.observe(clock() - opened, False)
    return {"counting_us_per_call": 1e6 * (time.process_time() - t0) / iterations}


def overhead(steps: int, repeats: int) -> dict:
    import torch

    torch.set_num_threads(1)
    runs = []
    for _ in range(repeats):
        for counting in (False, True):
            runs.append(_train_once(steps, counting))
    off = [r["cpu_per_step_ms"] for r in runs if not r["counting"]]
    on = [r["cpu_per_step_ms"] for r in runs if r["counting"]]
    pairs = [b / a for a, b in zip(off, on)]
    cost = _per_call_cost()
    counted = [r for r in runs if r["counting"]]
    calls_per_step = statistics.median(r["rpc_calls_per_step"] for r in counted)
    render_per_step = statistics.median(r["render_ms_per_step"] for r in counted)
    # the estimate: what counting adds to each call, times the calls per step, plus the scrapes' share
    estimate = (cost["counting_us_per_call"] * calls_per_step / 1e3 + render_per_step) / statistics.median(off)
    return {"steps_per_peer": steps, "repeats": repeats, "cpu_per_step_ms_off": statistics.median(off),
            "cpu_per_step_ms_on": statistics.median(on), "ratio": statistics.median(on) / statistics.median(off),
            "ratio_min": min(pairs), "ratio_max": max(pairs), "rpc_calls_per_step": calls_per_step,
            "render_ms_per_step": render_per_step, **cost, "estimated_overhead": estimate, "runs": runs}


async def _host_peers(count: int, address: str, run_id: str) -> None:
    """Worker: ``count`` DHT nodes joined through ``address``, each storing its progress record of
    ``run_id``; prints ``ready`` and serves until stdin closes."""
    from dht import get_dht_time
    from dht.node import DHTNode
    from swarm.progress import progress_key, progress_schema

    nodes = []
    try:
        for _ in range(count):
            nodes.append(await DHTNode.create([address], host="127.0.0.1"))
        now = get_dht_time()
        for i, n in enumerate(nodes):
            n.validator.extend([progress_schema(run_id)])
            assert await n.store(progress_key(run_id), {"peer_id": str(n.peer_id), "epoch": 5, "samples": 100 + i,
                                                         "samples_per_second": 50.0, "loss": 1.0 / (i + 1),
                                                         "time": now}, now + 600,
                                 subkey=n.signature_validator.ownership_marker)
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    finally:
        await asyncio.gather(*(n.shutdown() for n in nodes), return_exceptions=True)


async def _scrape_latency(peers: int, scrapes: int, workers: int = 4) -> dict:
    """The known peers live in ``workers`` other processes, so that this process holds what a real
    peer holds (its connections), not every node's sockets."""
    import subprocess

    from dht import get_dht_time
    from dht.node import DHTNode
    from swarm.metrics import Metrics
    from swarm.progress import progress_key, progress_schema
    from swarm.runs import RUNS_KEY, RUNS_SCHEMA, RunAnnouncement
    from swarm.status import PeerView, collect_status

    run_id = "bench-scrape"
    started = time.monotonic()
    first = await DHTNode.create([], host="127.0.0.1", bucket_size=64)  # room for all of them in its table
    procs: list[subprocess.Popen] = []
    try:
        first.validator.extend([RUNS_SCHEMA, progress_schema(run_id)])
        address = str(first.p2p.get_visible_addresses()[0])
        shares = [peers // workers + (1 if i < peers % workers else 0) for i in range(workers)]
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        for share in shares:
            procs.append(subprocess.Popen([sys.executable, __file__, "--host-peers", str(share), address, run_id],
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env))
        loop = asyncio.get_running_loop()
        for p in procs:
            line = await loop.run_in_executor(None, p.stdout.readline)
            if line.strip() != "ready":
                raise RuntimeError(f"a worker did not start: {line!r}")
        now = get_dht_time()
        announcement = RunAnnouncement(run_id, "task.py", "ab" * 32, str(first.peer_id), now, 4096)
        assert await first.store(RUNS_KEY, asdict(announcement), now + 600,
                                 subkey=f"{run_id} {first.signature_validator.ownership_marker}")
        print(f"{peers} peers up in {time.monotonic() - started:.1f} s; measuring", file=sys.stderr, flush=True)
        view = PeerView(role="dht")
        metrics = Metrics(first, view)
        for _ in range(20):  # warm up
            metrics.render()
        render, render_cpu = [], []
        for _ in range(scrapes):
            t0, c0 = time.perf_counter(), time.thread_time()
            metrics.render()
            render.append(1e3 * (time.perf_counter() - t0))
            render_cpu.append(1e3 * (time.thread_time() - c0))
        status_ms = []
        seen = 0
        for _ in range(max(scrapes // 20, 10)):
            t0 = time.perf_counter()
            status = await collect_status(first, run_id=run_id, local=view)
            status_ms.append(1e3 * (time.perf_counter() - t0))
            seen = len(status["peers"])
        get_ms = []  # for comparison: one DHT lookup of the run's progress records
        for _ in range(len(status_ms)):
            t0 = time.perf_counter()
            await first.get(progress_key(run_id), latest=True)
            get_ms.append(1e3 * (time.perf_counter() - t0))
        return {"known_peers": len(first.routing_table), "connections": sum(first.p2p.num_connections),
                "open_fds": len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None,
                "progress_records": seen, "scrapes": scrapes,
                "render_p50_ms": _pct(render, 50), "render_p99_ms": _pct(render, 99),
                "render_cpu_p50_ms": _pct(render_cpu, 50), "render_cpu_p99_ms": _pct(render_cpu, 99),
                "metrics_bytes": len(metrics.render()), "status_calls": len(status_ms),
                "status_p50_ms": _pct(status_ms, 50), "status_p99_ms": _pct(status_ms, 99),
                "get_p50_ms": _pct(get_ms, 50), "get_p99_ms": _pct(get_ms, 99)}
    finally:
        for p in procs:
            if p.stdin is not None:
                p.stdin.close()
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        await first.shutdown()


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(round(q / 100 * (len(ordered) - 1))), len(ordered) - 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150, help="training steps per peer and run (default 150)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each mode, alternating (default 3)")
    parser.add_argument("--scrapes", type=int, default=1000, help="metrics renders to time (default 1000)")
    parser.add_argument("--peers", type=int, default=64, help="peers the scraped node knows (default 64)")
    parser.add_argument("--skip-overhead", action="store_true", help="only the scrape latency")
    parser.add_argument("--json", action="store_true", help="one JSON line instead of the tables")
    parser.add_argument("--host-peers", nargs=3, metavar=("COUNT", "ADDRESS", "RUN_ID"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    if args.host_peers:  # a worker of the scrape measurement
        asyncio.run(_host_peers(int(args.host_peers[0]), args.host_peers[1], args.host_peers[2]))
        return
    result: dict = {"cpus": os.cpu_count()}
    result["scrape"] = asyncio.run(_scrape_latency(args.peers, args.scrapes))
    if not args.skip_overhead:
        result["overhead"] = overhead(args.steps, args.repeats)
    if args.json:
        print(json.dumps(result))
        return
    s = result["scrape"]
    print(f"scrape with {s['known_peers']} routing-table peers, {s['connections']} connections and "
          f"{s['progress_records']} progress records ({os.cpu_count()} CPUs):")
    print(f"  {'what':34} {'calls':>6} {'p50 ms':>8} {'p99 ms':>8}")
    print(f"  {'Metrics.render() (/metrics)':34} {s['scrapes']:>6} {s['render_p50_ms']:>8.2f} "
          f"{s['render_p99_ms']:>8.2f}   (CPU {s['render_cpu_p50_ms']:.2f} / {s['render_cpu_p99_ms']:.2f})"
          f"   ({s['metrics_bytes']} bytes)")
    print(f"  {'collect_status() (/api/status)':34} {s['status_calls']:>6} {s['status_p50_ms']:>8.2f} "
          f"{s['status_p99_ms']:>8.2f}")
    print(f"  {'  for comparison: one DHT get':34} {s['status_calls']:>6} {s['get_p50_ms']:>8.2f} "
          f"{s['get_p99_ms']:>8.2f}")
    if "overhead" in result:
        o = result["overhead"]
        print(f"\ninstrumentation overhead: 2 peers x {o['steps_per_peer']} steps of digits, "
              f"{o['repeats']} runs a mode:")
        print(f"  {'mode':10} {'CPU ms/step':>12} {'wall s':>8} {'epochs':>10} {'rounds ok':>9} {'scrapes':>8} "
              f"{'calls/step':>10}")
        for r in o["runs"]:
            print(f"  {'on' if r['counting'] else 'off':10} {r['cpu_per_step_ms']:>12.2f} {r['wall_s']:>8.1f} "
                  f"{str(r['epochs']):>10} {r['rounds_ok']:>9} {r['scrapes']:>8} {r['rpc_calls_per_step']:>10.2f}")
        print(f"  median on / median off = {o['ratio']:.4f} ({100 * (o['ratio'] - 1):+.2f} %; pairs "
              f"{o['ratio_min']:.3f}..{o['ratio_max']:.3f}: the noise of this machine)")
        print(f"  counting costs {o['counting_us_per_call']:.2f} us of CPU per RPC (both ends); "
              f"{o['rpc_calls_per_step']:.1f} RPCs and {o['render_ms_per_step']:.3f} ms of scrapes per step")
        print(f"  estimated overhead = (counting x calls + scrapes) per step / CPU per step = "
              f"{100 * o['estimated_overhead']:.2f} %")


if __name__ == "__main__":
    main()
