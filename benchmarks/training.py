#!/usr/bin/env python3
"""Training throughput of 1 vs 2 vs 4 peers on this machine, and the share of time spent communicating.

    .venv/bin/python benchmarks/training.py [--peers 1,2,4] [--tasks examples/charlm.py,examples/charlm.py:diloco]
        [--warmup 6] [--measure 15]

For every task and peer count: a bootstrap peer (``swarm dht``) and N peer processes on 127.0.0.1,
each a separate Python process with one torch thread, its own DHT node and its own
:class:`swarm.Optimizer` built from the task (target batch size, local batch, optimizer options)
and its own data shard, running the same training loop as ``swarm join``. The peers are this
script in ``--worker`` mode rather than ``swarm join`` itself because the figures need timings that
the daemon does not expose: per step, the time in forward/backward (compute), in ``opt.step()``
calls that only accumulate or take an inner step, and in those that end an epoch (averaging:
matchmaking, which includes waiting for the slowest peer, plus all-reduce).

All peers start together, train ``--warmup`` seconds, then are measured for ``--measure`` seconds
(and train on a few seconds more, so nobody leaves during another's window). Printed per run:
samples/s of the swarm (sum over peers) and per peer, speedup over 1 peer, epochs per minute, the
fraction of wall time in averaging rounds (and its matchmaking / all-reduce parts, from the
averager's ``StepResult``), averaging traffic per peer, and CPU use. This machine has
``os.cpu_count()`` cores shared by all peers (and by whatever else runs on it): N peers compete for
them, so samples/s cannot grow beyond the core count, and the communication fraction includes the
waits that CPU contention causes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


# ---------------------------------------------------------------------------------------- worker


def worker(args: argparse.Namespace) -> None:
    """One peer: train like ``swarm join`` and write timings of the measured window to ``--out``."""
    import torch

    from dht import DHT
    from swarm.optimizer import Optimizer
    from swarm.task import load_task

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.ERROR)
    task = load_task(args.task)
    shard, num_shards = (int(v) for v in args.shard.split("/"))
    dht = DHT(initial_peers=[args.initial_peers], host="127.0.0.1")
    torch.manual_seed(int.from_bytes(hashlib.sha256(args.run_id.encode()).digest()[:4], "little"))
    model = task.model()
    opt = Optimizer(dht=dht, run_id=args.run_id, optimizer=task.optimizer, params=model.parameters(),
                    target_batch_size=task.target_batch_size, batch_size_per_step=task.batch_size,
                    matchmaking_time=1.0, **task.optimizer_options)
    batches = task.batches(shard, num_shards, task.batch_size, seed=1000 + shard)
    next(batches)  # load the data before the clock starts
    print("ready", flush=True)
    start_file = Path(args.out).with_suffix(".start")
    deadline = time.monotonic() + 120
    while not start_file.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    start = float(start_file.read_text())
    while time.time() < start:
        time.sleep(0.005)
    begin, end, stop = start + args.warmup, start + args.warmup + args.measure, start + args.warmup + args.measure + args.linger
    stats = dict(samples=0, steps=0, epochs=0, compute=0.0, step=0.0, averaging=0.0, matchmaking=0.0, allreduce=0.0,
                 failed_rounds=0, catch_ups=0)
    measuring = False
    bytes0 = cpu0 = 0.0
    last_result = opt.last_averaging
    peers_seen = 0
    try:
        while time.time() < stop:
            now = time.time()
            if not measuring and begin <= now < end:
                measuring, bytes0, cpu0, wall0 = True, opt.bytes_sent + opt.bytes_received, time.process_time(), now
            elif measuring and now >= end:
                measuring = False
                stats.update(bytes=opt.bytes_sent + opt.bytes_received - bytes0, cpu=time.process_time() - cpu0,
                             wall=now - wall0)
            t0 = time.perf_counter()
            batch = next(batches)
            loss = task.loss(model, batch)
            loss.backward()
            t1 = time.perf_counter()
            ended = opt.step(batch_size=task.samples_in(batch), loss=loss)
            opt.zero_grad()
            t2 = time.perf_counter()
            result, fresh = opt.last_averaging, opt.last_averaging is not last_result
            last_result = result
            if not measuring:
                continue
            stats["samples"] += task.samples_in(batch)
            stats["steps"] += 1
            stats["compute"] += t1 - t0
            peers_seen = max(peers_seen, opt.global_progress.num_peers)
            if ended:
                stats["epochs"] += 1
                stats["averaging"] += t2 - t1
                if fresh and hasattr(result, "matchmaking_seconds"):
                    stats["matchmaking"] += result.matchmaking_seconds
                    stats["allreduce"] += result.allreduce_seconds + result.recovery_seconds
                elif fresh:
                    stats["failed_rounds"] += 1
                elif num_shards > 1:
                    stats["catch_ups"] += 1  # the epoch ended by downloading the swarm's state
            else:
                stats["step"] += t2 - t1
        if measuring:  # the last step ran past the window's end
            stats.update(bytes=opt.bytes_sent + opt.bytes_received - bytes0, cpu=time.process_time() - cpu0,
                         wall=time.time() - wall0)
        stats["peers_seen"] = peers_seen
        Path(args.out).write_text(json.dumps(stats))
    finally:
        opt.shutdown()
        dht.shutdown()


# ---------------------------------------------------------------------------------------- driver


def _spawn(cmd: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, *cmd], stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, env=env, cwd=ROOT)


def _wait_for(log: Path, proc: subprocess.Popen, pattern: str, timeout: float) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = re.search(pattern, log.read_text(errors="replace"), re.MULTILINE)
        if match:
            return match
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise RuntimeError(f"{log.name}: no {pattern!r} (exit code {proc.poll()}):\n{log.read_text(errors='replace')[-2000:]}")


def _stop(procs: list[subprocess.Popen]) -> None:
    """Stop the processes this script started, by PID: SIGTERM, then SIGKILL after 10 s."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + 10
    for p in procs:
        try:
            p.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def run_config(task_ref: str, peers: int, args: argparse.Namespace, directory: Path) -> list[dict]:
    """Start a bootstrap peer and ``peers`` workers; returns their measurements."""
    tag = re.sub(r"\W+", "-", Path(task_ref).name) + f"-{peers}"
    run_id = f"bench-training-{tag}-{time.time_ns()}"
    procs: list[subprocess.Popen] = []
    try:
        boot_log = directory / f"{tag}-bootstrap.log"
        procs.append(_spawn(["-m", "swarm", "dht", "--host", "127.0.0.1", "--report-interval", "3600"], boot_log))
        address = _wait_for(boot_log, procs[0], r"--initial-peers (/ip4/127\.0\.0\.1/\S+)", 30).group(1)
        outs, logs = [], []
        for i in range(peers):
            outs.append(directory / f"{tag}-peer{i}.json")
            logs.append(directory / f"{tag}-peer{i}.log")
            procs.append(_spawn([__file__, "--worker", "--task", task_ref, "--initial-peers", address,
                                 "--run-id", run_id, "--shard", f"{i}/{peers}", "--out", str(outs[-1]),
                                 "--warmup", str(args.warmup), "--measure", str(args.measure),
                                 "--linger", str(args.linger)], logs[-1]))
        for proc, log in zip(procs[1:], logs):
            _wait_for(log, proc, r"^ready", 120)
        start = time.time() + 1.0
        for out in outs:
            out.with_suffix(".start").write_text(repr(start))
        limit = time.monotonic() + args.warmup + args.measure + args.linger + 60
        for proc in procs[1:]:
            proc.wait(max(limit - time.monotonic(), 1))
        results = []
        for out, log in zip(outs, logs):
            if not out.exists():
                raise RuntimeError(f"{log.name} wrote no result:\n{log.read_text(errors='replace')[-2000:]}")
            results.append(json.loads(out.read_text()))
        return results
    finally:
        _stop(procs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", default="1,2,4", help="peer counts to run (default 1,2,4)")
    parser.add_argument("--tasks", default="examples/charlm.py,examples/charlm.py:diloco",
                        help="task references, comma-separated (default: charlm in sync and in DiLoCo mode)")
    parser.add_argument("--warmup", type=float, default=6.0, help="seconds before measuring (default 6)")
    parser.add_argument("--measure", type=float, default=15.0, help="seconds measured (default 15)")
    parser.add_argument("--linger", type=float, default=3.0, help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--task", help=argparse.SUPPRESS)
    parser.add_argument("--initial-peers", help=argparse.SUPPRESS)
    parser.add_argument("--run-id", help=argparse.SUPPRESS)
    parser.add_argument("--shard", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    sys.path.insert(0, str(ROOT))
    from swarm.task import load_task

    peer_counts = [int(p) for p in args.peers.split(",")]
    task_refs = args.tasks.split(",")
    cores = os.cpu_count() or 1
    print(f"{cores} CPU cores; every peer is a process with 1 torch thread; warm-up {args.warmup:g} s, "
          f"measured {args.measure:g} s", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="swarm-bench-training-") as tmp:
        for ref in task_refs:
            task = load_task(str(ROOT / ref) if not Path(ref).is_absolute() else ref)
            mode = task.optimizer_options.get("mode", "sync")
            print(f"\n{ref}: {task.name}, mode {mode}, target batch {task.target_batch_size}, local batch "
                  f"{task.batch_size}", flush=True)
            base = None
            for n in peer_counts:
                results = run_config(ref, n, args, Path(tmp))
                wall = statistics.fmean(r["wall"] for r in results)
                samples_per_second = sum(r["samples"] / r["wall"] for r in results)
                base = base or (samples_per_second if n == 1 else None)
                averaging = statistics.fmean(r["averaging"] / r["wall"] for r in results)
                matchmaking = statistics.fmean(r["matchmaking"] / r["wall"] for r in results)
                allreduce = statistics.fmean(r["allreduce"] / r["wall"] for r in results)
                compute = statistics.fmean(r["compute"] / r["wall"] for r in results)
                row = dict(task=task.name, mode=mode, peers=n, samples_per_second=samples_per_second,
                           per_peer=samples_per_second / n, speedup=samples_per_second / base if base else float("nan"),
                           epochs_per_minute=statistics.fmean(r["epochs"] for r in results) / wall * 60,
                           compute=compute, averaging=averaging, matchmaking=matchmaking, allreduce=allreduce,
                           mb_per_peer_second=statistics.fmean(r["bytes"] / r["wall"] for r in results) / 1e6,
                           cpu=sum(r["cpu"] for r in results) / wall,
                           ms_per_step=1000 * statistics.fmean(r["compute"] / max(r["steps"], 1) for r in results),
                           failed=sum(r["failed_rounds"] for r in results), catch_ups=sum(r["catch_ups"] for r in results),
                           peers_seen=min(r["peers_seen"] for r in results))
                rows.append(row)
                print(f"  {n} peer(s): {samples_per_second:7.1f} samples/s ({row['speedup']:.2f}x), "
                      f"averaging {100 * averaging:4.1f}% of the time, {row['epochs_per_minute']:.0f} epochs/min, "
                      f"compute {row['ms_per_step']:.1f} ms/step", flush=True)

    print()
    print(f"{'task':14} {'mode':6} {'peers':>5} {'samples/s':>10} {'per peer':>9} {'speedup':>8} {'epochs/min':>11} "
          f"{'compute':>8} {'averaging':>10} {'(match':>7} {'reduce)':>8} {'MB/s/peer':>10} {'CPU cores':>10} "
          f"{'ms/step':>8} {'failed':>7} {'catch-ups':>9}")
    for r in rows:
        print(f"{r['task']:14} {r['mode']:6} {r['peers']:5d} {r['samples_per_second']:10.1f} {r['per_peer']:9.1f} "
              f"{r['speedup']:7.2f}x {r['epochs_per_minute']:11.1f} {100 * r['compute']:7.1f}% "
              f"{100 * r['averaging']:9.1f}% {100 * r['matchmaking']:6.1f}% {100 * r['allreduce']:7.1f}% "
              f"{r['mb_per_peer_second']:10.3f} {r['cpu']:10.2f} {r['ms_per_step']:8.1f} {r['failed']:7d} "
              f"{r['catch_ups']:9d}")
    print("\ncompute: forward + backward (+ data) share of wall time; averaging: share of wall time in opt.step() "
          "calls that ended an epoch (matchmaking incl. waiting for the slowest peer, all-reduce, applying); "
          "CPU cores: CPU seconds of all peers per wall second; ms/step: forward + backward per local step.")


if __name__ == "__main__":
    main()
