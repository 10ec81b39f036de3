#!/usr/bin/env python3
"""DHT speed and memory: 32 real peers of ours vs 32 of hivemind 1.1.12, on loopback, side by side.

    .venv/bin/python benchmarks/dht.py                                 # 32 peers, 2 rounds (~2-3 minutes)
    .venv/bin/python benchmarks/dht.py --rounds 3 --keys-per-peer 40   # more samples
    .venv/bin/python benchmarks/dht.py --skip hivemind                 # ours only
    .venv/bin/python benchmarks/dht.py --replicas 5                    # ours with hivemind's replica count
    .venv/bin/python benchmarks/dht.py --one-at-a-time                 # each swarm without the other's idle load

Both swarms have ``--processes`` (8) OS processes of ``--peers-per-process`` (4) peers each, all on
127.0.0.1, and use each library's defaults:

* ours: ``dht.DHTNode`` (k = 20, alpha = 3, every record replicated to the 20 closest nodes), the
  peers of a process sharing one event loop (uvloop if importable); this file with ``--role worker``;
* hivemind: ``hivemind.DHT`` (k = 20, 5 replicas, caching on), each peer its own DHT process and p2pd
  daemon, as hivemind runs them: ``.bench-venv/bin/python benchmarks/hivemind_side/dht_hm.py``
  (``make bench-venv``). Both workers speak the JSON-lines protocol described there.

Peer 0 of process 0 starts the DHT; every other process joins through it, and the other peers of a
process through it and their process's peer 0. Both swarms are up at the same time; then, per round,
the phases alternate between them (ours store, hivemind store, ours get, hivemind get) so that load
from other users of this machine hits both alike (each also pays for the other's idle background
work: hivemind's 32 DHT processes and p2pd daemons cost ours ~15% of its store rate;
``--one-at-a-time`` runs each swarm alone instead, one after the other):

* store: every peer stores ``--keys-per-peer`` fresh keys (a ~100-byte dict value, TTL 10 min), at
  most ``--concurrency`` (4) at once per peer; stores/s = successful stores / phase wall time (the
  first peer starting to the last one finishing, over all processes);
* get: every key of the round is read once by a random peer in another process, ``--concurrency`` at
  once per peer; gets/s = gets / phase wall time; latency = one get, as seen by the issuing peer
  (a reader that holds a replica itself answers locally: with 32 peers and 20 replicas that is common
  for ours, hence "remote" figures too, over gets whose issuer does not store the key: not measurable
  for hivemind from the outside, so its figures cover all its gets);
* lost keys: keys whose get came back empty (or wrong) and that 3 more peers, in other processes,
  could not find either; store failures (no replica accepted) are counted separately.

Then: routing table sizes (min / median over peers), join time per peer (creating the peer and
bootstrapping, after the process started), memory per peer: the proportional set size of each
process tree (hivemind's DHT processes and p2pd daemons included) divided by its peers, the largest
over the processes, sampled every 0.5 s during the whole run (peak) and at the end; RSS alike.
Every figure is printed for both, with the ratio and the target from the issue.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import queue
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/: procmem
from procmem import tree_memory_mb  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
HM_PYTHON = ROOT / ".bench-venv" / "bin" / "python"
HM_WORKER = ROOT / "benchmarks" / "hivemind_side" / "dht_hm.py"
REPLICAS: int | None = None  # --replicas, for our workers (set by the driver)
SYSTEMS = ("ours", "hivemind")


def log(msg: str) -> None:
    print(f"[dht-bench] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------ worker: ours


def ours_worker(args: argparse.Namespace) -> None:
    """``--peers`` DHTNodes in one event loop, driven over stdin/stdout (see hivemind_side/dht_hm.py)."""
    here = Path(__file__).resolve().parent  # this file is benchmarks/dht.py: keep it from shadowing the dht package
    sys.path[:] = [str(ROOT)] + [p for p in sys.path if p and Path(p).resolve() != here]
    timer = threading.Timer(args.lifetime, os._exit, (3,))
    timer.daemon = True
    timer.start()

    from dht import DHTNode, get_dht_time

    def emit(obj: dict) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    async def bounded(jobs: list, concurrency: int) -> list:
        semaphore = asyncio.Semaphore(concurrency)

        async def one(job):
            async with semaphore:
                return await job()

        return await asyncio.gather(*(one(job) for job in jobs))

    async def main() -> None:
        nodes: list[DHTNode] = []
        join_s: list[float] = []
        initial = list(args.initial_peers)
        try:
            for index in range(args.peers):
                started = time.perf_counter()
                nodes.append(await DHTNode.create(initial, host="127.0.0.1", num_replicas=args.replicas))
                join_s.append(time.perf_counter() - started)
                if index == 0:
                    initial.append(str(nodes[0].p2p.get_visible_addresses()[0]))
            emit({"ready": True, "addresses": [str(n.p2p.get_visible_addresses()[0]) for n in nodes],
                  "join_s": join_s, "pid": os.getpid()})

            async def store(node: DHTNode, key: str, value: Any, ttl: float):
                started = time.perf_counter()
                try:
                    ok = await node.store(key, value, get_dht_time() + ttl)
                except Exception as e:  # noqa: BLE001 -- a failed store is a result
                    print(f"store {key!r}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
                    ok = False
                return ok, time.perf_counter() - started

            async def get(node: DHTNode, key: str):
                local = node.storage.get(_key_id(key), get_dht_time()) is not None  # the issuer holds a replica
                started = time.perf_counter()
                try:
                    found = await node.get(key)
                except Exception as e:  # noqa: BLE001
                    print(f"get {key!r}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
                    found = None
                return (None if found is None else found.value), time.perf_counter() - started, local

            loop = asyncio.get_running_loop()
            lines: asyncio.Queue[str] = asyncio.Queue()

            def read_stdin() -> None:
                for line in sys.stdin:
                    loop.call_soon_threadsafe(lines.put_nowait, line)
                loop.call_soon_threadsafe(lines.put_nowait, "")

            threading.Thread(target=read_stdin, daemon=True).start()
            while line := await lines.get():
                if not line.strip():
                    continue
                try:
                    command = json.loads(line)
                    op = command.get("op")
                    if op in ("store", "get"):
                        items = command["items"]
                        by_peer: list[list[tuple[int, list]]] = [[] for _ in nodes]
                        for position, item in enumerate(items):
                            by_peer[item[0]].append((position, item))
                        c = int(command["concurrency"])

                        async def run_peer(peer: int, batch: list):
                            node = nodes[peer]
                            if op == "store":
                                jobs = [lambda it=it: store(node, it[1], it[2], float(command["ttl"])) for _, it in batch]
                            else:
                                jobs = [lambda it=it: get(node, it[1]) for _, it in batch]
                            return await bounded(jobs, c)

                        t0 = time.time()
                        results = await asyncio.gather(*(run_peer(p, b) for p, b in enumerate(by_peer) if b))
                        t1 = time.time()
                        flat: list = [None] * len(items)
                        for batch, res in zip([b for b in by_peer if b], results):
                            for (position, _), r in zip(batch, res):
                                flat[position] = r
                        if op == "store":
                            emit({"t0": t0, "t1": t1, "ok": [r[0] for r in flat], "lat": [r[1] for r in flat]})
                        else:
                            emit({"t0": t0, "t1": t1, "values": [r[0] for r in flat], "lat": [r[1] for r in flat],
                                  "local": [r[2] for r in flat]})
                    elif op == "routing":
                        emit({"sizes": [len(n.routing_table) for n in nodes]})
                    elif op == "quit":
                        emit({"ok": True})
                        break
                    else:
                        emit({"error": f"unknown op {op!r}"})
                except Exception as e:  # noqa: BLE001 -- reported to the driver
                    emit({"error": f"{type(e).__name__}: {e}"})
        finally:
            await asyncio.wait_for(asyncio.gather(*(n.shutdown() for n in nodes), return_exceptions=True), 10)

    try:
        import uvloop
    except ImportError:
        asyncio.run(main())
    else:
        uvloop.run(main())
    os._exit(0)


def _key_id(key: str) -> int:
    import msgpack

    from dht.routing import DHTID

    return DHTID.of_key(msgpack.packb(key, use_bin_type=True))


# ------------------------------------------------------------------------------------ memory






class MemorySampler(threading.Thread):
    """Peak per-peer PSS and RSS of each worker's process tree, sampled every ``period`` seconds."""

    def __init__(self, period: float = 0.5):
        super().__init__(daemon=True)
        self.period = period
        self.workers: list[tuple[str, int, int]] = []  # (system, pid, peers)
        self.peak: dict[str, list[float]] = {s: [0.0, 0.0] for s in SYSTEMS}
        self.stopped = threading.Event()

    def sample(self) -> dict[str, list[float]]:
        now: dict[str, list[float]] = {s: [0.0, 0.0] for s in SYSTEMS}
        for system, pid, peers in list(self.workers):
            pss, rss = tree_memory_mb(pid)
            now[system] = [max(now[system][0], pss / peers), max(now[system][1], rss / peers)]
            self.peak[system] = [max(self.peak[system][0], now[system][0]), max(self.peak[system][1], now[system][1])]
        return now

    def run(self) -> None:
        while not self.stopped.wait(self.period):
            self.sample()


# ------------------------------------------------------------------------------------ driver


class Worker:
    """One worker process (ours or hivemind) and its JSON-lines channel; killed by PID in close()."""

    def __init__(self, system: str, name: str, peers: int, initial: list[str], lifetime: float):
        self.system, self.name, self.peers = system, name, peers
        if system == "ours":
            cmd = [sys.executable, str(Path(__file__).resolve()), "--role", "worker"]
        else:
            cmd = [str(HM_PYTHON), str(HM_WORKER)]
        cmd += ["--peers", str(peers), "--lifetime", str(lifetime)]
        if system == "ours" and REPLICAS is not None:
            cmd += ["--replicas", str(REPLICAS)]
        cmd += initial
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.stderr_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"swarm-dht-bench-{os.getpid()}-{name}.log"
        with open(self.stderr_path, "w") as err:  # a file: a chatty worker never blocks on a full pipe
            self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True,
                                         env=env, cwd=ROOT)
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.addresses: list[str] = []
        self.join_s: list[float] = []

    def _read(self) -> None:
        with contextlib.suppress(ValueError, OSError):
            for line in self.proc.stdout:
                if line.startswith("{"):
                    self._lines.put(line)
        self._lines.put(None)

    def stderr_tail(self) -> str:
        try:
            return self.stderr_path.read_text()[-1500:]
        except OSError:
            return ""

    def answer(self, timeout: float) -> dict:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"{self.name} did not answer in {timeout:.0f} s:\n{self.stderr_tail()}") from None
        if line is None:
            self._lines.put(None)
            raise RuntimeError(f"{self.name} exited (code {self.proc.poll()}):\n{self.stderr_tail()}")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"{self.name}: {answer['error']}")
        return answer

    def wait_ready(self, timeout: float) -> None:
        ready = self.answer(timeout)
        self.addresses, self.join_s = ready["addresses"], ready["join_s"]

    def send(self, command: dict) -> None:
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                self.send({"op": "quit"})
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                log(f"{self.name} (pid {self.proc.pid}) did not exit; killing it")
                self.proc.kill()
                self.proc.wait()
        with contextlib.suppress(OSError):
            self.stderr_path.unlink()


class Swarm:
    def __init__(self, system: str, args: argparse.Namespace):
        self.system, self.args = system, args
        self.workers: list[Worker] = []
        self.wall_to_ready = 0.0

    def start(self, sampler: MemorySampler) -> None:
        a = self.args
        started = time.perf_counter()
        first = Worker(self.system, f"{self.system}0", a.peers_per_process, [], a.time_limit + 60)
        self.workers.append(first)
        first.wait_ready(a.start_timeout)
        initial = first.addresses[:1]
        for i in range(1, a.processes):
            self.workers.append(Worker(self.system, f"{self.system}{i}", a.peers_per_process, initial,
                                       a.time_limit + 60))
        for w in self.workers[1:]:
            w.wait_ready(a.start_timeout)
        self.wall_to_ready = time.perf_counter() - started
        sampler.workers += [(self.system, w.proc.pid, w.peers) for w in self.workers]

    @property
    def peers(self) -> list[tuple[int, int]]:
        """(worker index, peer index in the worker) of every peer."""
        return [(w, p) for w in range(len(self.workers)) for p in range(self.workers[w].peers)]

    def run(self, op: str, items: list[tuple[tuple[int, int], list]], extra: dict, timeout: float) -> tuple[float, list]:
        """Run ``items`` ((worker, peer), rest) on their workers at once; (phase seconds, answers in order)."""
        per_worker: list[list[tuple[int, list]]] = [[] for _ in self.workers]
        for position, ((w, p), rest) in enumerate(items):
            per_worker[w].append((position, [p, *rest]))
        active = [w for w in range(len(self.workers)) if per_worker[w]]
        for w in active:
            self.workers[w].send({"op": op, "items": [it for _, it in per_worker[w]], **extra})
        out: list = [None] * len(items)
        t0, t1 = [], []
        for w in active:
            answer = self.workers[w].answer(timeout)
            t0.append(answer["t0"])
            t1.append(answer["t1"])
            field = "ok" if op == "store" else "values"
            local = answer.get("local") or [None] * len(per_worker[w])
            for (position, _), value, lat, loc in zip(per_worker[w], answer[field], answer["lat"], local):
                out[position] = (value, lat, loc)
        return (max(t1) - min(t0)) if active else 0.0, out

    def routing_sizes(self) -> list[int]:
        sizes = []
        for w in self.workers:
            w.send({"op": "routing"})
        for w in self.workers:
            sizes += w.answer(60)["sizes"]
        return sizes

    def close(self) -> None:
        for w in self.workers:
            w.close()


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(q * len(ordered))) - 1))]


class Stats:
    def __init__(self) -> None:
        self.store_ok = self.store_total = 0
        self.store_s = self.get_s = 0.0
        self.gets = 0
        self.get_lat: list[float] = []
        self.remote_lat: list[float] = []
        self.store_lat: list[float] = []
        self.missed = 0
        self.lost: list[str] = []


def run_round(r: int, swarms: dict[str, Swarm], stats: dict[str, Stats], args: argparse.Namespace,
              rng: random.Random) -> None:
    stored: dict[str, list[tuple[tuple[int, int], str, dict]]] = {}
    for system, swarm in swarms.items():  # store phase, one system after the other
        items = []
        for peer in swarm.peers:
            for j in range(args.keys_per_peer):
                key = f"bench/{r}/{peer[0]}.{peer[1]}/{j}"
                items.append((peer, key, {"writer": f"{peer[0]}.{peer[1]}", "j": j, "pad": "x" * 64}))
        rng.shuffle(items)
        seconds, answers = swarm.run("store", [(peer, [key, value]) for peer, key, value in items],
                                     {"ttl": 600.0, "concurrency": args.concurrency}, args.phase_timeout)
        s = stats[system]
        s.store_s += seconds
        s.store_total += len(items)
        s.store_ok += sum(bool(a[0]) for a in answers)
        s.store_lat += [a[1] for a in answers]
        stored[system] = [it for it, a in zip(items, answers) if a[0]]
        log(f"round {r} {system}: {sum(bool(a[0]) for a in answers)}/{len(items)} stores in {seconds:.2f} s "
            f"({len(items) / seconds:.0f}/s)")
    for system, swarm in swarms.items():  # get phase
        peers = swarm.peers
        gets = []
        for writer, key, value in stored[system]:
            reader = rng.choice([p for p in peers if p[0] != writer[0]])
            gets.append((reader, key, value))
        seconds, answers = swarm.run("get", [(reader, [key]) for reader, key, _ in gets],
                                     {"concurrency": args.concurrency}, args.phase_timeout)
        s = stats[system]
        s.get_s += seconds
        s.gets += len(gets)
        s.get_lat += [a[1] for a in answers]
        s.remote_lat += [a[1] for a in answers if a[2] is False]
        missing = [(reader, key, value) for (reader, key, value), a in zip(gets, answers) if a[0] != value]
        s.missed += len(missing)
        log(f"round {r} {system}: {len(gets) - len(missing)}/{len(gets)} gets found in {seconds:.2f} s "
            f"({len(gets) / seconds:.0f}/s)")
        for reader, key, value in missing:  # ask 3 more peers in other processes before calling it lost
            others = rng.sample([p for p in peers if p[0] != reader[0]], 3)
            _, again = swarm.run("get", [(p, [key]) for p in others], {"concurrency": 1}, args.phase_timeout)
            if all(a[0] != value for a in again):
                s.lost.append(key)


def report(args: argparse.Namespace, swarms: dict[str, Swarm], stats: dict[str, Stats], routing: dict[str, list[int]],
           memory_end: dict[str, list[float]], memory_peak: dict[str, list[float]], notes: dict[str, str]) -> dict:
    def fig(system: str) -> dict:
        s, sw = stats[system], swarms[system]
        join = [x for w in sw.workers for x in w.join_s]
        return {
            "stores_per_s": s.store_ok / s.store_s if s.store_s else None,
            "store_p50_ms": percentile(s.store_lat, 0.5) * 1e3,
            "store_p95_ms": percentile(s.store_lat, 0.95) * 1e3,
            "store_failed": s.store_total - s.store_ok,
            "gets_per_s": s.gets / s.get_s if s.get_s else None,
            "get_p50_ms": percentile(s.get_lat, 0.5) * 1e3,
            "get_p95_ms": percentile(s.get_lat, 0.95) * 1e3,
            "remote_get_p50_ms": percentile(s.remote_lat, 0.5) * 1e3 if s.remote_lat else None,
            "remote_get_p95_ms": percentile(s.remote_lat, 0.95) * 1e3 if s.remote_lat else None,
            "remote_gets": len(s.remote_lat) if system == "ours" else None,
            "gets": s.gets,
            "missed_gets": s.missed,
            "lost_keys": len(s.lost),
            "keys": s.store_total,
            "join_median_s": statistics.median(join),
            "join_max_s": max(join),
            "all_ready_s": sw.wall_to_ready,
            "routing_min": min(routing[system]),
            "routing_median": statistics.median(routing[system]),
            "pss_per_peer_mb": memory_end[system][0],
            "rss_per_peer_mb": memory_end[system][1],
            "peak_pss_per_peer_mb": memory_peak[system][0],
            "peak_rss_per_peer_mb": memory_peak[system][1],
        }

    figures = {system: fig(system) for system in swarms}
    n = args.processes * args.peers_per_process
    print()
    print(f"=== DHT benchmark: {n} peers per system ({args.processes} processes x {args.peers_per_process}), "
          f"127.0.0.1, {args.rounds} round(s) x {args.keys_per_peer} keys per peer, concurrency "
          f"{args.concurrency} per peer; {os.cpu_count()} CPUs ===")
    for system in SYSTEMS:
        print(f"{system}: {notes.get(system, '')}")
    has_hm = "hivemind" in figures
    rows = [
        # label, key, format, target (text), ratio fn (ours, hm) -> value, ok(ratio)
        ("stores/s (successful)", "stores_per_s", ".0f", ">= 5x", lambda o, h: o / h, lambda x: x >= 5),
        ("store latency p50 (ms)", "store_p50_ms", ".1f", "", lambda o, h: h / o, None),
        ("store latency p95 (ms)", "store_p95_ms", ".1f", "", lambda o, h: h / o, None),
        ("stores failed (no replica)", "store_failed", "d", "0", None, None),
        ("gets/s", "gets_per_s", ".0f", ">= 3x", lambda o, h: o / h, lambda x: x >= 3),
        ("get latency p50 (ms)", "get_p50_ms", ".2f", "", lambda o, h: h / o, None),
        ("get latency p95 (ms)", "get_p95_ms", ".2f", "<= 1/3", lambda o, h: o / h, lambda x: x <= 1 / 3),
        ("  remote gets only: p50 (ms)", "remote_get_p50_ms", ".2f", "", None, None),
        ("  remote gets only: p95 (ms)", "remote_get_p95_ms", ".2f", "", None, None),
        ("  remote gets (count)", "remote_gets", "d", "", None, None),
        ("gets", "gets", "d", "", None, None),
        ("gets that missed (1st try)", "missed_gets", "d", "", None, None),
        ("lost keys (also missed by 3 more peers)", "lost_keys", "d", "0", None, None),
        ("join per peer, median (s)", "join_median_s", ".3f", "", lambda o, h: h / o, None),
        ("join per peer, max (s)", "join_max_s", ".3f", "", lambda o, h: h / o, None),
        ("swarm start to all ready (s)", "all_ready_s", ".1f", "", lambda o, h: h / o, None),
        ("routing table size, min", "routing_min", "d", "", None, None),
        ("routing table size, median", "routing_median", ".0f", "", None, None),
        ("PSS per peer at end (MB)", "pss_per_peer_mb", ".1f", "< 50", lambda o, h: o / h, None),
        ("peak PSS per peer (MB)", "peak_pss_per_peer_mb", ".1f", "< 50", lambda o, h: o / h, None),
        ("peak RSS per peer (MB)", "peak_rss_per_peer_mb", ".1f", "", lambda o, h: o / h, None),
    ]
    head = f"{'':42}{'ours':>11}{'hivemind':>11}{'ratio':>9}{'target':>9}"
    print(head)
    print("-" * len(head))
    ratios = {}
    for label, key, spec, target, ratio_fn, ok in rows:
        o = figures.get("ours", {}).get(key)
        h = figures.get("hivemind", {}).get(key) if has_hm else None

        def cell(v):
            if v is None:
                return "-"
            return format(int(v), "d") if spec == "d" else format(v, spec)

        ratio_txt = ""
        if ratio_fn and o is not None and h is not None and o and h:
            value = ratio_fn(o, h)
            ratios[key] = value
            ratio_txt = f"{value:.2f}" + (" !" if ok and not ok(value) else "")
        print(f"{label:42}{cell(o):>11}{cell(h):>11}{ratio_txt:>9}{target:>9}")
    print("(ratio: ours/hivemind for throughput and memory, hivemind/ours for latency and time, except the p95 "
          "row (ours/hivemind, target <= 0.33); '!' marks a missed target; memory per peer: the largest "
          "over the processes of the process tree's PSS (RSS) divided by its peers)")
    for system in swarms:
        if "ours" == system and figures[system]["pss_per_peer_mb"] >= 50:
            print("! ours exceeds 50 MB per peer")
        if stats[system].lost:
            print(f"{system} lost keys: {stats[system].lost[:10]}{' ...' if len(stats[system].lost) > 10 else ''}")
    return {"bench": "dht", "peers": n, "processes": args.processes, "rounds": args.rounds,
            "keys_per_peer": args.keys_per_peer, "concurrency": args.concurrency, "figures": figures,
            "ratios": ratios, "notes": notes}


class TimeLimit(Exception):
    pass


def main_driver(args: argparse.Namespace) -> int:
    global REPLICAS
    REPLICAS = args.replicas

    def on_alarm(signum, frame):
        raise TimeLimit(f"time limit of {args.time_limit:g} s exceeded")

    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(int(args.time_limit))
    systems = [s for s in SYSTEMS if s not in args.skip]
    replicas = "20 replicas" if args.replicas is None else f"{args.replicas} replicas (--replicas)"
    notes = {"ours": f"dht.DHTNode defaults (k=20, alpha=3, {replicas}), uvloop if importable"}
    if "hivemind" in systems and not os.access(HM_PYTHON, os.X_OK):
        notes["hivemind"] = "skipped: .bench-venv is missing (bash benchmarks/bench_venv.sh)"
        systems.remove("hivemind")
    elif "hivemind" in systems:
        notes["hivemind"] = "1.1.12 hivemind.DHT defaults (k=20, 5 replicas, cache on), a process + p2pd per peer"
    else:
        notes["hivemind"] = "skipped (--skip hivemind)"
    sampler = MemorySampler()
    swarms: dict[str, Swarm] = {}
    rc = 0
    try:
        if args.one_at_a_time:  # each swarm alone: started, measured and stopped before the next one
            sampler.start()
            stats, routing, memory_end = {}, {}, {s: [0.0, 0.0] for s in SYSTEMS}
            for system in systems:
                swarm = swarms[system] = Swarm(system, args)
                swarm.start(sampler)
                log(f"{system}: {len(swarm.peers)} peers ready in {swarm.wall_to_ready:.1f} s")
                time.sleep(args.settle)
                stats[system] = Stats()
                rng = random.Random(args.seed)
                for r in range(args.rounds):
                    run_round(r, {system: swarm}, stats, args, rng)
                routing[system] = swarm.routing_sizes()
                memory_end[system] = sampler.sample()[system]
                swarm.close()
        else:
            for system in systems:
                swarm = swarms[system] = Swarm(system, args)
                swarm.start(sampler)
                log(f"{system}: {len(swarm.peers)} peers ready in {swarm.wall_to_ready:.1f} s")
            sampler.start()
            time.sleep(args.settle)  # let both swarms finish their joins' follow-up traffic
            stats = {system: Stats() for system in swarms}
            rng = random.Random(args.seed)
            for r in range(args.rounds):
                run_round(r, swarms, stats, args, rng)
            routing = {system: swarm.routing_sizes() for system, swarm in swarms.items()}
            memory_end = sampler.sample()
        sampler.stopped.set()
        signal.alarm(0)
        figures = report(args, swarms, stats, routing, memory_end, sampler.peak, notes)
        print()
        print(json.dumps(figures, default=str), flush=True)
    except (TimeLimit, TimeoutError, RuntimeError) as e:
        log(f"FAILED: {e}")
        rc = 2
    finally:
        signal.alarm(0)
        sampler.stopped.set()
        for swarm in swarms.values():
            swarm.close()
    return rc


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=8, help="OS processes per system")
    parser.add_argument("--peers-per-process", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2, help="store + get rounds (fresh keys each)")
    parser.add_argument("--keys-per-peer", type=int, default=20, help="keys stored by each peer per round")
    parser.add_argument("--concurrency", type=int, default=4, help="operations in flight per peer")
    parser.add_argument("--replicas", type=int, default=None,
                        help="ours: replicas per record (default: DHTNode's, k = 20; hivemind's default is 5)")
    parser.add_argument("--skip", nargs="*", default=[], choices=SYSTEMS)
    parser.add_argument("--one-at-a-time", action="store_true",
                        help="run each swarm alone (the other stopped) instead of both alive, alternating")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--settle", type=float, default=3.0, help="seconds of rest after both swarms started")
    parser.add_argument("--start-timeout", type=float, default=180.0, help="seconds for one process to be ready")
    parser.add_argument("--phase-timeout", type=float, default=300.0, help="seconds for one phase of one process")
    parser.add_argument("--time-limit", type=float, default=900.0, help="global wall-clock limit, seconds")
    parser.add_argument("--role", choices=["driver", "worker"], default="driver", help=argparse.SUPPRESS)
    parser.add_argument("--peers", type=int, default=4, help=argparse.SUPPRESS)  # worker: peers in it
    parser.add_argument("--lifetime", type=float, default=900.0, help=argparse.SUPPRESS)
    parser.add_argument("initial_peers", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "worker":
        ours_worker(args)
        return 0
    if args.processes < 2 or args.peers_per_process < 1:
        parser.error("need at least 2 processes (gets are issued from another process than the writer's)")
    return main_driver(args)


if __name__ == "__main__":
    sys.exit(main())
