#!/usr/bin/env python3
"""All-reduce speed and memory: our Averager vs hivemind 1.1.12's DecentralizedAverager vs plain TCP.

    .venv/bin/python benchmarks/allreduce.py                      # bounded default (a few minutes)
    .venv/bin/python benchmarks/allreduce.py --configs 4x1M,8x1M,4x25M,8x25M --rounds 5   # full matrix
    .venv/bin/python benchmarks/allreduce.py --configs 8x25M --skip hivemind              # one cell, ours only
    .venv/bin/python benchmarks/allreduce.py --configs 8x25M --one-at-a-time              # no idle neighbours

For every configuration ``NxS`` (N peers, S float32 values; ``M`` = 10^6) three systems run side by
side in one run, all on 127.0.0.1, every peer a separate OS process with one torch thread:

* ``ours``: ``dht.DHT`` + ``averaging.Averager`` (encrypted transport, butterfly all-reduce, no
  compression, ``target_group_size = min_group_size = N``);
* ``hivemind``: ``hivemind.DHT`` + ``DecentralizedAverager`` with the same settings, run by
  ``.bench-venv/bin/python benchmarks/hivemind_side/allreduce_hm.py`` (``make bench-venv``);
* ``tcp``: the physical bound: N processes on plain unencrypted asyncio sockets (uvloop, the loop
  our DHT runs on), one connection per pair, moving exactly the bytes a butterfly must move: every
  peer sends ``S/N`` values to each other peer and gets ``S/N`` back from each (``2(N-1)/N x S x 4``
  bytes out and in per peer), with no computation.

The three systems' peers are all started first; then rounds alternate between the systems
(warm-up rounds first, untimed), so that load from others on this shared machine hits all of them
alike. Per round:

* all-reduce seconds: from the first peer starting its all-reduce to the last one finishing it,
  matchmaking excluded. Ours: a peer's all-reduce starts when its matchmaking ends (step start +
  ``StepResult.matchmaking_seconds``) and ends when ``step`` returns, so the snapshot copy and the
  write-back into the tensor are counted as all-reduce.
  hivemind: ``step(require_trigger=True)`` stops every peer after matchmaking (stage
  AWAITING_TRIGGER); when all are there the driver triggers them at once (``allow_allreduce``).
* with matchmaking: from the first peer being told to step to the last one finishing.

Printed per configuration and system: median of the timed rounds (and min/max), MB/s per peer
against the butterfly's ``2(N-1)/N x S x 4`` bytes sent per peer, the ratio to ours, peak memory
per peer (the largest, over the peers, of the peak proportional set size of the peer's process
tree: hivemind's DHT/averager processes and p2pd daemons included, sampled every 0.1 s during the
start and the warm-up rounds only, since reading it costs CPU) and its
extra over the peer holding just its tensor (in multiples of the tensor's size), and the accuracy:
every peer's result at 1024 sampled positions against the float64 mean of the inputs there, and
whether the peers' results are bit-identical (sha256 of the whole vector). Before each round every
peer sets its tensor to ``index - tensor`` (untimed), so the inputs differ in every round.

This machine has few cores shared by all peers (and other users): with 8 peers the figures are CPU
bound and noisy; compare ratios within one run, not absolute numbers across runs. With all systems
alive, each pays for the others' idle background work (hivemind's 2N DHT/averager processes and N
p2pd daemons cost ours about a quarter of its 8x25M time); ``--one-at-a-time`` starts, times and
stops one system after the other instead (same configurations, same run).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/: procmem
from procmem import children, tree_pss_mb  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
HM_PYTHON = ROOT / ".bench-venv" / "bin" / "python"
HM_WORKER = ROOT / "benchmarks" / "hivemind_side" / "allreduce_hm.py"
SYSTEMS = ("ours", "hivemind", "tcp")


# ------------------------------------------------------------------------------------ memory






class MemorySampler(threading.Thread):
    """Keeps the peak of :func:`tree_pss_mb` of this process while ``on`` (reading smaps_rollup of a
    large process costs milliseconds of CPU: the driver samples during warm-up rounds only)."""

    def __init__(self, period: float = 0.1):
        super().__init__(daemon=True)
        self.period, self.peak, self.on = period, 0.0, True

    def run(self) -> None:
        while True:
            if self.on:
                self.peak = max(self.peak, tree_pss_mb(os.getpid()))
            time.sleep(self.period)


def emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


# ------------------------------------------------------------------------------ worker: ours


def ours_worker(args: argparse.Namespace) -> None:
    """One peer of ours; the same protocol as hivemind_side/allreduce_hm.py (``step`` answers at the end)."""
    import torch

    sys.path.insert(0, str(ROOT))
    torch.set_num_threads(1)
    tensor = torch.randn(args.size, generator=torch.Generator().manual_seed(args.index))
    positions = torch.randint(0, args.size, (args.samples,), generator=torch.Generator().manual_seed(12345))
    baseline = tree_pss_mb(os.getpid())
    sampler = MemorySampler()
    sampler.start()

    from averaging import Averager
    from dht import DHT

    dht = DHT(initial_peers=args.initial_peers, host="127.0.0.1")
    averager = Averager([tensor], dht, prefix="bench", target_group_size=args.peers, min_group_size=args.peers,
                        min_matchmaking_time=args.min_matchmaking_time, request_timeout=args.request_timeout,
                        sender_timeout=30.0, default_timeout=args.step_timeout)
    addrs = dht.get_visible_addresses()
    emit({"ready": True, "addr": addrs[0] if addrs else "", "baseline_mb": baseline, "pid": os.getpid()})
    for line in sys.stdin:
        if not line.strip():
            continue
        op = json.loads(line).get("op")
        try:
            if op == "step":
                tensor.neg_().add_(args.index)  # distinct inputs every round (they are equal after a round)
                before = tensor[positions].tolist()
                t_cmd = time.time()
                result = averager.step(weight=1.0, timeout=args.step_timeout)
                t_end = time.time()
                # all-reduce from the end of matchmaking to the step's return: the snapshot copy taken before
                # matchmaking and the write-back into the tensor count as all-reduce (hivemind's do too)
                emit({"ok": True, "t_cmd": t_cmd, "t_start": t_cmd + result.matchmaking_seconds, "t_end": t_end,
                      "in": before, "out": tensor[positions].tolist(),
                      "sha": hashlib.sha256(tensor.numpy().data).hexdigest(),
                      "bytes_sent": result.bytes_sent, "survivors": len(result.survivors)})
            elif op == "mem":  # the peak so far; sampling stops
                sampler.on = False
                emit({"peak_mb": max(sampler.peak, tree_pss_mb(os.getpid())), "baseline_mb": baseline})
            elif op == "quit":
                emit({"ok": True})
                break
            else:
                emit({"error": f"unknown op {op!r}"})
        except Exception as e:  # noqa: BLE001 -- reported to the driver
            emit({"error": f"{type(e).__name__}: {e}"})
    averager.shutdown()
    dht.shutdown()
    os._exit(0)


# ------------------------------------------------------------------------------- worker: tcp


def tcp_worker(args: argparse.Namespace) -> None:
    """One peer of the plain-TCP bound: full mesh, each pair exchanges 2 x S/N float32 each way."""
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    n, me = args.peers, args.index
    part = 4 * (args.size // n)  # bytes per part (the butterfly's parts; the remainder is immaterial)
    payload = memoryview(bytearray(os.urandom(1024) * (2 * part // 1024 + 1)))[:2 * part]
    baseline = tree_pss_mb(os.getpid())
    sampler = MemorySampler()
    sampler.start()
    connections: dict[int, tuple[asyncio.StreamReader, asyncio.StreamWriter]] = {}
    accepted = asyncio.Event()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = int.from_bytes(await reader.readexactly(4), "big")
        connections[peer] = (reader, writer)
        if len(connections) == n - 1:
            accepted.set()

    async def exchange(peer: int) -> None:
        reader, writer = connections[peer]
        writer.write(payload)
        drain = asyncio.ensure_future(writer.drain())
        remaining = 2 * part
        while remaining:
            chunk = await reader.read(min(remaining, 1 << 20))
            if not chunk:
                raise ConnectionError(f"peer {peer} closed the connection")
            remaining -= len(chunk)
        await drain

    async def serve() -> None:
        server = await asyncio.start_server(on_connect, "127.0.0.1", 0, limit=1 << 22)
        port = server.sockets[0].getsockname()[1]
        emit({"ready": True, "addr": str(port), "baseline_mb": baseline, "pid": os.getpid()})
        stdin = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
        while line := await stdin.readline():
            command = json.loads(line)
            op = command.get("op")
            if op == "connect":
                for peer, peer_port in enumerate(command["ports"]):
                    if peer > me:
                        reader, writer = await asyncio.open_connection("127.0.0.1", int(peer_port), limit=1 << 22)
                        writer.write(me.to_bytes(4, "big"))
                        connections[peer] = (reader, writer)
                if len(connections) == n - 1:
                    accepted.set()
                emit({"ok": True})
            elif op == "wait_mesh":
                await asyncio.wait_for(accepted.wait(), 30)
                emit({"ok": True})
            elif op == "step":
                t_start = time.time()
                await asyncio.gather(*(exchange(peer) for peer in connections))
                emit({"ok": True, "t_cmd": t_start, "t_start": t_start, "t_end": time.time()})
            elif op == "mem":  # the peak so far; sampling stops
                sampler.on = False
                emit({"peak_mb": max(sampler.peak, tree_pss_mb(os.getpid())), "baseline_mb": baseline})
            elif op == "quit":
                emit({"ok": True})
                break
        server.close()

    loop.run_until_complete(serve())
    os._exit(0)


# ------------------------------------------------------------------------------------ driver


class Worker:
    """A worker process driven over stdin/stdout; stderr goes to a log file. Killed by PID on close."""

    def __init__(self, command: list[str], log_path: Path):
        self._log = open(log_path, "w")
        self.log_path = log_path
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                     text=True, cwd=ROOT, env=env)
        self._lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.ready = self.read(120)
        if not self.ready.get("ready"):
            raise RuntimeError(f"worker did not start: {self.ready}")

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith("{"):
                self._lines.put(json.loads(line))
        self._lines.put(None)

    def send(self, op: str, **fields: Any) -> None:
        self.proc.stdin.write(json.dumps({"op": op, **fields}) + "\n")
        self.proc.stdin.flush()

    def read(self, timeout: float) -> dict:
        try:
            message = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"no answer within {timeout} s; see {self.log_path}") from None
        if message is None:
            raise RuntimeError(f"worker exited: {self.log_path.read_text()[-2000:]}")
        if "error" in message:
            raise RuntimeError(f"worker failed: {message['error']}")
        return message

    def close(self) -> None:
        # hivemind peers fork DHT/averager processes and p2pd daemons: whatever of that tree outlives
        # a clean quit is killed by PID
        tree = _descendants(self.proc.pid)
        if self.proc.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                self.send("quit")
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
        for pid in [self.proc.pid, *tree]:
            with contextlib.suppress(ProcessLookupError):
                if pid != self.proc.pid or self.proc.poll() is None:
                    os.kill(pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        self._log.close()


def _descendants(pid: int) -> list[int]:
    found, stack = [], children(pid)
    while stack:
        child = stack.pop()
        found.append(child)
        stack += children(child)
    return found


def start_system(system: str, n: int, size: int, directory: Path, args: argparse.Namespace) -> list[Worker]:
    common = ["--peers", str(n), "--size", str(size)]
    timing = ["--min-matchmaking-time", str(args.min_matchmaking_time), "--request-timeout",
              str(args.request_timeout), "--step-timeout", str(args.step_timeout)]
    me = [sys.executable, str(Path(__file__).resolve())]
    workers: list[Worker] = []
    try:
        for i in range(n):
            if system == "ours":
                command = [*me, "--role", "ours", "--index", str(i), *common, *timing]
            elif system == "hivemind":
                command = [str(HM_PYTHON), str(HM_WORKER), "--index", str(i), *common, *timing]
            else:
                command = [*me, "--role", "tcp", "--index", str(i), *common]
            if system != "tcp" and workers:
                command.append(workers[0].ready["addr"])
            workers.append(Worker(command, directory / f"{system}-{n}x{size}-{i}.log"))
        if system == "tcp":
            ports = [w.ready["addr"] for w in workers]
            for w in workers:
                w.send("connect", ports=ports)
                w.read(30)
            for w in workers:
                w.send("wait_mesh")
                w.read(60)
        return workers
    except BaseException:
        for w in workers:
            w.close()
        raise


def run_round(system: str, workers: list[Worker], timeout: float) -> dict:
    """One round at all peers; the timings and the answers."""
    if system == "hivemind":
        for w in workers:
            w.send("step")
        matched = [w.read(timeout) for w in workers]
        for w in workers:
            w.send("go")
        answers = [w.read(timeout) for w in workers]
        return {"allreduce": max(a["t_end"] for a in answers) - min(a["t_go"] for a in answers),
                "with_mm": max(m["t_matched"] for m in matched) - min(m["t_cmd"] for m in matched)
                + max(a["t_end"] for a in answers) - min(a["t_go"] for a in answers), "answers": answers}
    for w in workers:
        w.send("step")
    answers = [w.read(timeout) for w in workers]
    return {"allreduce": max(a["t_end"] for a in answers) - min(a["t_start"] for a in answers),
            "with_mm": max(a["t_end"] for a in answers) - min(a["t_cmd"] for a in answers), "answers": answers}


def check_accuracy(answers: list[dict]) -> tuple[float, bool]:
    """(largest |result - float64 mean of the inputs| at the sampled positions, bit-identical results?)"""
    n = len(answers)
    samples = len(answers[0]["in"])
    worst = 0.0
    for k in range(samples):
        mean = sum(a["in"][k] for a in answers) / n
        worst = max(worst, max(abs(a["out"][k] - mean) for a in answers))
    return worst, len({a["sha"] for a in answers}) == 1


def parse_size(text: str) -> int:
    text = text.strip().upper()
    factor = {"K": 10 ** 3, "M": 10 ** 6, "G": 10 ** 9}.get(text[-1:], 1)
    return int(float(text.rstrip("KMG")) * factor)


def bench_config(n: int, size: int, systems: list[str], args: argparse.Namespace, directory: Path) -> dict:
    started: dict[str, list[Worker]] = {}
    rows: dict[str, dict] = {}
    try:
        for system in systems:
            started[system] = start_system(system, n, size, directory, args)
        timings: dict[str, list[dict]] = {s: [] for s in systems}
        memory: dict[str, list[dict]] = {}
        for round_ in range(args.warmup + args.rounds):
            if round_ == args.warmup:  # memory is sampled up to here: sampling costs CPU, timed rounds go without
                for system in systems:
                    for w in started[system]:
                        w.send("mem")
                    memory[system] = [w.read(30) for w in started[system]]
            for system in systems:
                outcome = run_round(system, started[system], args.step_timeout + 60)
                if round_ >= args.warmup:
                    timings[system].append(outcome)
                print(f"  {n}x{size} {system:8s} round {round_ + 1 - args.warmup if round_ >= args.warmup else 'warm-up'}:"
                      f" all-reduce {outcome['allreduce']:.3f} s, with matchmaking {outcome['with_mm']:.3f} s",
                      flush=True)
        for system in systems:
            allreduce = [t["allreduce"] for t in timings[system]]
            with_mm = [t["with_mm"] for t in timings[system]]
            row = {"allreduce": statistics.median(allreduce), "min": min(allreduce), "max": max(allreduce),
                   "with_mm": statistics.median(with_mm), "peak_mb": max(m["peak_mb"] for m in memory[system]),
                   "extra_mb": max(m["peak_mb"] - m["baseline_mb"] for m in memory[system])}
            if system != "tcp":
                errors, identical = zip(*(check_accuracy(t["answers"]) for t in timings[system]))
                row.update(error=max(errors), identical=all(identical))
            rows[system] = row
    finally:
        for workers in started.values():
            for w in workers:
                w.close()
    return rows


def print_table(results: dict[tuple[int, int], dict], systems: list[str]) -> None:
    print()
    header = (f"{'config':>9s} {'system':>8s} {'all-reduce s':>12s} {'(min-max)':>15s} {'+matchmaking s':>14s} "
              f"{'MB/s/peer':>9s} {'vs ours':>8s} {'peak MB':>8s} {'extra MB':>8s} {'extra/size':>10s} "
              f"{'max error':>9s} {'identical':>9s}")
    print(header)
    print("-" * len(header))
    for (n, size), rows in results.items():
        bound_mb = 2 * (n - 1) / n * size * 4 / 1e6  # sent per peer by a butterfly, MB
        tensor_mb = size * 4 / 2 ** 20
        ours = rows.get("ours")
        for system in systems:
            r = rows[system]
            ratio = f"{r['allreduce'] / ours['allreduce']:.2f}x" if ours else "-"
            error = f"{r['error']:.1e}" if "error" in r else "-"
            identical = ("yes" if r["identical"] else "no") if "identical" in r else "-"
            print(f"{n}x{size / 1e6:g}M".rjust(9) + f" {system:>8s} {r['allreduce']:12.3f} "
                  f"{'(%.3f-%.3f)' % (r['min'], r['max']):>15s} {r['with_mm']:14.3f} "
                  f"{bound_mb / r['allreduce']:9.1f} {ratio:>8s} {r['peak_mb']:8.0f} {r['extra_mb']:8.0f} "
                  f"{r['extra_mb'] / tensor_mb:9.2f}x {error:>9s} {identical:>9s}")
    print("\n'vs ours': all-reduce seconds relative to ours (hivemind 3.0x = ours is 3x faster; tcp 0.5x = ours "
          "takes 2x the plain-TCP bound). MB/s/peer: 2(N-1)/N x size x 4 bytes (what a butterfly sends per peer) "
          "/ all-reduce seconds. peak MB: peak PSS of one peer's process tree; extra: above the peer holding only "
          "its tensor; extra/size: in tensor sizes. max error: vs the float64 mean at 1024 sampled positions.")
    for (n, size), rows in results.items():
        if "ours" in rows and "hivemind" in rows and "tcp" in rows:
            o, h, t = rows["ours"], rows["hivemind"], rows["tcp"]
            print(f"{n}x{size / 1e6:g}M: ours is {h['allreduce'] / o['allreduce']:.2f}x faster than hivemind "
                  f"(target >= 3x at 8x25M), takes {o['allreduce'] / t['allreduce']:.2f}x the plain-TCP bound "
                  f"(target <= 2x), extra memory {o['extra_mb'] / h['extra_mb']:.2f}x hivemind's "
                  f"(target <= 2x; {o['extra_mb'] / (size * 4 / 2 ** 20):.2f}x the tensor, target <= 2x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--role", choices=["driver", "ours", "tcp"], default="driver", help=argparse.SUPPRESS)
    parser.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--peers", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--samples", type=int, default=1024, help=argparse.SUPPRESS)
    parser.add_argument("initial_peers", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--configs", default="4x1M,8x1M,4x25M",
                        help="comma-separated PEERSxVALUES (default: 4x1M,8x1M,4x25M; full matrix: "
                             "4x1M,8x1M,4x25M,8x25M)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per system (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (memory is measured in them)")
    parser.add_argument("--skip", default="", help="comma-separated systems to leave out: ours, hivemind, tcp")
    parser.add_argument("--min-matchmaking-time", type=float, default=2.0)
    parser.add_argument("--request-timeout", type=float, default=1.0)
    parser.add_argument("--step-timeout", type=float, default=180.0)
    parser.add_argument("--one-at-a-time", action="store_true",
                        help="run each system's peers alone (the others stopped) instead of all alive, alternating")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    if args.role == "ours":
        return ours_worker(args)
    if args.role == "tcp":
        return tcp_worker(args)

    systems = [s for s in SYSTEMS if s not in args.skip.split(",")]
    if "hivemind" in systems and not HM_PYTHON.exists():
        sys.exit(f"{HM_PYTHON} is missing: run `make bench-venv` (bash benchmarks/bench_venv.sh) or pass --skip hivemind")
    configs = []
    for item in args.configs.split(","):
        peers, values = item.lower().split("x")
        configs.append((int(peers), parse_size(values)))
    print(f"all-reduce on 127.0.0.1, {os.cpu_count()} CPU cores; systems: {', '.join(systems)}; "
          f"{args.warmup} warm-up + {args.rounds} timed rounds each, "
          f"{'one system at a time' if args.one_at_a_time else 'alternating'}", flush=True)
    results = {}
    logs = Path(tempfile.mkdtemp(prefix="bench-allreduce-"))
    print(f"worker logs: {logs}", flush=True)
    for n, size in configs:
        started = time.monotonic()
        if args.one_at_a_time:
            results[(n, size)] = {}
            for system in systems:
                results[(n, size)].update(bench_config(n, size, [system], args, logs))
        else:
            results[(n, size)] = bench_config(n, size, systems, args, logs)
        print(f"  {n}x{size} done in {time.monotonic() - started:.0f} s", flush=True)
    print_table(results, systems)
    if args.json:
        Path(args.json).write_text(json.dumps({f"{n}x{s}": rows for (n, s), rows in results.items()}, indent=1))


if __name__ == "__main__":
    main()
