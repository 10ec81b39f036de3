#!/usr/bin/env python3
"""Baseline worker: one hivemind 1.1.12 peer (DHT + DecentralizedAverager) for benchmarks/allreduce.py.

Runs ONLY inside the benchmark venv (``bash benchmarks/bench_venv.sh``); swarm never imports
hivemind. benchmarks/allreduce.py starts N of these as subprocesses; each holds one float32
tensor of ``--size`` values (standard normal, seeded by ``--index``) and averages it with the
others under one prefix (``target_group_size = min_group_size = --peers``). Loopback only: every
p2pd listens on /ip4/127.0.0.1/tcp/0 with NAT port mapping, AutoNAT and relays off.

Protocol: one JSON object per stdout line (logs go to stderr). First
``{"ready": true, "addr": MADDR, "baseline_mb": PSS before the DHT/averager existed}``; then
per stdin command:

    {"op": "step"}  -> starts ``averager.step(wait=False, require_trigger=True)`` and answers
                       {"matched": true, "t_cmd", "t_matched"} once the group is assembled
                       (stage AWAITING_TRIGGER): matchmaking is over, the all-reduce waits
    {"op": "go"}    -> ``allow_allreduce()``, waits for the result:
                       {"ok": true, "t_go", "t_end", "in": [...], "out": [...], "sha": HEX}
                       (``in``/``out``: the tensor at the sampled positions before/after)
    {"op": "mem"}   -> {"peak_mb", "baseline_mb"}: PSS of this peer's process tree (this process,
                       the DHT and averager processes and their p2pd daemons), sampled every 0.1 s
                       from the start until this command (the driver sends it after the warm-up)
    {"op": "quit"}

A hard time limit (``--lifetime``) ends the process regardless.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/: procmem
from procmem import tree_pss_mb  # noqa: E402


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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--peers", type=int, required=True)
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--min-matchmaking-time", type=float, default=2.0)
    parser.add_argument("--request-timeout", type=float, default=1.0)
    parser.add_argument("--step-timeout", type=float, default=120.0)
    parser.add_argument("--lifetime", type=float, default=1800.0)
    parser.add_argument("initial_peers", nargs="*")
    args = parser.parse_args()
    timer = threading.Timer(args.lifetime, os._exit, (3,))
    timer.daemon = True
    timer.start()

    import torch

    torch.set_num_threads(1)
    tensor = torch.randn(args.size, generator=torch.Generator().manual_seed(args.index))
    positions = torch.randint(0, args.size, (args.samples,), generator=torch.Generator().manual_seed(12345))
    baseline = tree_pss_mb(os.getpid())
    sampler = MemorySampler()
    sampler.start()

    import hivemind
    from hivemind.averaging.control import AveragingStage

    dht = hivemind.DHT(initial_peers=args.initial_peers or None, start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                       auto_nat=False, nat_port_map=False, use_relay=False, use_auto_relay=False)
    averager = hivemind.averaging.DecentralizedAverager(
        [tensor], dht, start=True, prefix="bench", target_group_size=args.peers, min_group_size=args.peers,
        min_matchmaking_time=args.min_matchmaking_time, request_timeout=args.request_timeout)
    addrs = [str(a) for a in dht.get_visible_maddrs()]
    emit({"ready": True, "addr": addrs[0] if addrs else "", "baseline_mb": baseline, "pid": os.getpid()})

    control = None
    for line in sys.stdin:
        if not line.strip():
            continue
        command = json.loads(line)
        op = command.get("op")
        try:
            if op == "step":
                with averager.get_tensors() as (current,):
                    current.neg_().add_(args.index)  # distinct inputs every round (they are equal after a round)
                t_cmd = time.time()
                control = averager.step(weight=1.0, timeout=args.step_timeout, allow_retries=False,
                                        require_trigger=True, wait=False)
                deadline = time.monotonic() + args.step_timeout
                while control.stage != AveragingStage.AWAITING_TRIGGER and not control.done():
                    if time.monotonic() > deadline:
                        raise TimeoutError("no group")
                    time.sleep(0.002)
                if control.done():
                    control.result()  # raises the failure
                emit({"matched": True, "t_cmd": t_cmd, "t_matched": time.time()})
            elif op == "go":
                with averager.get_tensors() as (current,):
                    before = current[positions].tolist()
                t_go = time.time()
                control.allow_allreduce()
                control.result(timeout=args.step_timeout)
                t_end = time.time()
                with averager.get_tensors() as (current,):
                    after = current[positions].tolist()
                    sha = hashlib.sha256(current.numpy().data).hexdigest()
                emit({"ok": True, "t_go": t_go, "t_end": t_end, "in": before, "out": after, "sha": sha})
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
    try:
        averager.shutdown()
        dht.shutdown()
    finally:
        os._exit(0)


if __name__ == "__main__":
    main()
