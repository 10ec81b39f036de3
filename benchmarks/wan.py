#!/usr/bin/env python3
"""The all-reduce over emulated internet links (tests/netlab.py), against the bandwidth bound.

    sudo .venv/bin/python benchmarks/wan.py [--size 25000000] [--rounds 2] [--codecs none,float16,uint8]
                                            [--json] [--time-limit 1200]

Workload 1 of issue 13: 8 peers, each one OS process in its own lab host (one torch thread), average
``--size`` float32 values with ``averaging.Averager`` (butterfly all-reduce, groups of exactly 8)
over heterogeneous symmetric links: 2 hosts at 1 Gbit/s, 4 at 200 Mbit/s, 2 at 50 Mbit/s, each with
a 10 ms one-way delay to the core (40 ms RTT between any two). Every peer announces its link rate
(``--bandwidth``, MB/s) for load balancing. A DHT bootstrap (``swarm dht``) runs on host 0.

Per codec (an Averager under its own prefix; ``uint8`` is the 8-bit row), ``--rounds`` rounds after one
untimed warm-up round. A round's seconds: from the first peer's all-reduce start (its step start plus
``StepResult.matchmaking_seconds``) to the last peer's step return, matchmaking excluded (as in
benchmarks/allreduce.py). The table shows the median round.

The bound: the optimal butterfly for these link rates. Peer i sends and receives
``V (1 + (N - 2) f_i)`` bytes when it reduces a fraction ``f_i`` of a vector of ``V`` wire bytes
(4 bytes a value for none, 2 for float16, 1 for uint8), so a round takes at least
``max_i V (1 + (N - 2) f_i) / b_i`` with ``b_i`` the link rate in bytes/s (the lab's tbf rate of
Ethernet frames); the fractions minimising it are the load-balancing LP's optimum,
:func:`averaging.load_balancing.optimal_fractions` (the 50 Mbit/s peers own nothing and the bound is
``V / b_min``). TCP/IP headers take 4.4% of a frame, so even a perfect implementation is at 1.046x.

hivemind 1.1.12 does the same job but its virtualenv (``make bench-venv``) cannot be built on this
machine; its column is ``null`` here. Needs root (the lab); one JSON line with ``--json``:
``{"allreduce": [{"codec", "ours_s", "hivemind_s", "bound_s", "rounds_s"}], "config": {...}}``.
Every process started here dies with it (tests/netlab.py); the run is bounded by ``--time-limit``.

Measured here (2 shared cores, 8 peers and the lab's forwarder on them; 2 min 33 s wall):

    codec        ours s  hivemind s  bound s  ours/bound
    none          18.85         n/a    16.00       1.18x
    float16       14.10         n/a     8.00       1.76x
    uint8          6.17         n/a     4.00       1.54x
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from averaging.load_balancing import optimal_fractions  # noqa: E402
from tests.netlab import Lab, Link, unavailable  # noqa: E402

LINKS_MBIT = [1000, 1000, 200, 200, 200, 200, 50, 50]
ONE_WAY_MS = 10.0
WIRE_BYTES = {"none": 4, "float16": 2, "uint8": 1, "blockwise8": 1, "quantile8": 1}
PEER = str(ROOT / "tests" / "netlab_peers" / "allreduce_peer.py")


def bound_seconds(size: int, codec: str, mbit: list[float]) -> float:
    """The optimal butterfly's round time for ``size`` values with ``codec`` over links of ``mbit``."""
    rates = [m * 1e6 / 8 for m in mbit]
    fractions = optimal_fractions(rates)
    n = len(rates)
    volume = size * WIRE_BYTES[codec]
    return max(volume * (1 + (n - 2) * f) / b for f, b in zip(fractions, rates))


def _wait(log: Path, pattern: str, proc: subprocess.Popen, timeout: float) -> re.Match:
    deadline = time.monotonic() + timeout
    while True:
        text = log.read_text(errors="replace") if log.exists() else ""
        match = re.search(pattern, text, re.MULTILINE)
        if match:
            return match
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{log.name}: no {pattern!r} (exit {proc.poll()}):\n{text[-3000:]}")
        time.sleep(0.2)


def run(size: int, rounds: int, codecs: list[str], directory: Path) -> dict:
    links = [Link(up_mbit=m, down_mbit=m, delay_ms=ONE_WAY_MS, queue_ms=50) for m in LINKS_MBIT]
    files = []
    with Lab(links) as lab:
        def spawn(name: str, host, args: list[str]) -> tuple[subprocess.Popen, Path]:
            path = directory / f"{name}.log"
            f = open(path, "w")
            files.append(f)
            return host.python(args, stdout=f, stderr=subprocess.STDOUT, text=True), path

        boot, boot_log = spawn("bootstrap", lab.hosts[0], ["-m", "swarm", "dht", "--host", lab.hosts[0].ip,
                                                            "--report-interval", "3600"])
        first = _wait(boot_log, r"--initial-peers (/ip4/\S+)", boot, 60).group(1)
        peers = []
        for i, host in enumerate(lab.hosts):
            peers.append(spawn(f"peer{i}", host, [
                PEER, "--host", host.ip, "--index", str(i), "--peers", str(len(lab.hosts)), "--size", str(size),
                "--rounds", str(rounds + 1), "--compression", ",".join(codecs), "--matchmaking-time", "3",
                "--bandwidth", str(LINKS_MBIT[i] / 8), "--timeout", "600", "--linger", "10", first]))
        for proc, log in peers:
            _wait(log, r"^DONE", proc, 600 * (rounds + 1) * len(codecs))
        records = []
        for _, log in peers:
            records.append([json.loads(line) for line in log.read_text().splitlines() if line.startswith('{"codec"')])
        stats = lab.close()
    for f in files:
        f.close()
    rows = []
    for codec in codecs:
        per_round = []
        for r in range(1, rounds + 1):  # round 0 is the warm-up
            mine = [rec for recs in records for rec in recs if rec["codec"] == codec and rec["round"] == r]
            if len(mine) != len(LINKS_MBIT) or any("error" in rec for rec in mine):
                per_round.append(None)
                continue
            start = min(rec["t_start"] + rec["matchmaking_seconds"] for rec in mine)
            per_round.append(max(rec["t_end"] for rec in mine) - start)
        ok = [s for s in per_round if s is not None]
        rows.append({"codec": codec, "ours_s": statistics.median(ok) if ok else None, "hivemind_s": None,
                     "bound_s": bound_seconds(size, codec, LINKS_MBIT), "rounds_s": per_round})
    return {"allreduce": rows, "forwarder": stats,
            "config": {"peers": len(LINKS_MBIT), "size": size, "links_mbit": LINKS_MBIT, "rtt_ms": 4 * ONE_WAY_MS,
                       "rounds": rounds}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=25_000_000, help="float32 values per peer (default 25M)")
    p.add_argument("--rounds", type=int, default=2, help="timed rounds per codec after one warm-up (default 2)")
    p.add_argument("--codecs", default="none,float16,uint8", help="comma-separated (default none,float16,uint8)")
    p.add_argument("--json", action="store_true", help="print one JSON line with every figure")
    p.add_argument("--time-limit", type=float, default=1200, help="seconds for the whole run (default 1200)")
    args = p.parse_args()
    reason = unavailable()
    if reason:
        print(f"error: {reason}", file=sys.stderr)
        return 2
    codecs = [c for c in args.codecs.split(",") if c]
    unknown = [c for c in codecs if c not in WIRE_BYTES]
    if unknown:
        print(f"error: unknown codecs {unknown}; known: {sorted(WIRE_BYTES)}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGALRM, lambda *_: sys.exit("error: --time-limit reached"))
    signal.alarm(int(args.time_limit))
    with tempfile.TemporaryDirectory(prefix="wan-") as tmp:
        result = run(args.size, args.rounds, codecs, Path(tmp))
    cfg = result["config"]
    print(f"all-reduce, {cfg['peers']} peers x {cfg['size'] / 1e6:g}M float32, links {cfg['links_mbit']} Mbit/s "
          f"(symmetric), {cfg['rtt_ms']:g} ms RTT; median of {cfg['rounds']} rounds, matchmaking excluded")
    print(f"{'codec':<10} {'ours s':>8} {'hivemind s':>11} {'bound s':>8} {'ours/bound':>11}")
    for row in result["allreduce"]:
        ours = f"{row['ours_s']:.2f}" if row["ours_s"] is not None else "failed"
        ratio = f"{row['ours_s'] / row['bound_s']:.2f}x" if row["ours_s"] is not None else "-"
        print(f"{row['codec']:<10} {ours:>8} {'n/a':>11} {row['bound_s']:>8.2f} {ratio:>11}")
    print("hivemind: n/a (its virtualenv cannot be built on this machine); forwarder:", result["forwarder"])
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
