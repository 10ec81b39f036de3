"""Start a few peers as separate processes on loopback; they connect, authenticate and ping each other.

    python -m swarm.examples.loopback_ping --peers 4      (in a clone: python examples/loopback_ping.py)

Each peer is a ``swarm peer`` process; peer k is given the addresses of peers 0..k-1 as initial
peers, so together they form a full mesh of authenticated, encrypted connections. The script prints
every ping and a matrix of who reached whom, and exits 0 only if every pair succeeded.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2, help="ping rounds per peer (default 2)")
    args = parser.parse_args()

    procs: list[subprocess.Popen] = []
    addresses: list[str] = []
    ids: list[str] = []
    try:
        for k in range(args.peers):
            cmd = [sys.executable, "-m", "swarm", "peer", "--host", "127.0.0.1", "--ping-interval", "1.5",
                   "--ping-rounds", str(args.rounds), "--linger", "3"]
            if addresses:
                cmd += ["--initial-peers", *addresses]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
            procs.append(proc)
            assert proc.stdout is not None  # stdout=PIPE
            header = proc.stdout.readline()
            address = proc.stdout.readline().strip()
            if not address.startswith("/ip4/"):
                raise RuntimeError(f"peer {k} did not start: {header!r}")
            ids.append(address.rsplit("/", 1)[1])
            addresses.append(address)
            print(f"started peer {k}: {address}", flush=True)
        outputs = []
        for proc in procs:
            out, _ = proc.communicate(timeout=60)
            outputs.append(out)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    ok = {(i, j): False for i in range(args.peers) for j in range(args.peers) if i != j}
    for i, out in enumerate(outputs):
        for line in out.splitlines():
            print(f"[peer {i}] {line}")
            match = re.match(r"ping (\S+) ok ([\d.]+) ms", line)
            if match and match.group(1) in ids:
                ok[(i, ids.index(match.group(1)))] = True
    print("\nwho reached whom (row pinged column; every link mutually authenticated and encrypted):")
    print("      " + " ".join(f"p{j:<3}" for j in range(args.peers)))
    for i in range(args.peers):
        row = " ".join(" -- " if i == j else (" ok " if ok[(i, j)] else "FAIL") for j in range(args.peers))
        print(f"  p{i:<3} {row}")
    reached = sum(ok.values())
    print(f"\n{reached}/{len(ok)} peer pairs exchanged pings")
    return 0 if reached == len(ok) else 1


if __name__ == "__main__":
    start = time.monotonic()
    code = main()
    print(f"done in {time.monotonic() - start:.1f} s")
    sys.exit(code)
