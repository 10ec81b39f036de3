"""One peer of a lab all-reduce: a DHT peer on ``--host`` and an Averager over one float32 vector.

    python tests/netlab_peers/allreduce_peer.py --host IP --index I --peers N [--size ELEMS] [--rounds R]
        [--compression CODEC[,CODEC...]] [--bandwidth MB/S] [--out DIR] [INITIAL_PEER ...]

Prints ``ADDR /ip4/...`` once its DHT listens; stores ``I -> IP`` under the DHT key ``netlab-hosts``
and prints ``{"dht": {index: ip}}`` once it sees all N peers' entries (the DHT works across hosts).
Then, for each codec in turn (``none``, ``float16``, ``uint8``, ...: an Averager under its own
prefix), runs R averaging rounds in groups of exactly N (round r only with peers at their round r:
scope ``round{r}``); before each its vector is ``randn(ELEMS)`` from
``torch.Generator().manual_seed(I)`` again, its weight ``I + 1``; after each it prints a JSON line
``{"codec", "round", "seconds", "t_start", "t_end" (unix time around the step), "cpu_s" (this
process's CPU seconds in the step, all threads), "matchmaking_seconds", "allreduce_seconds",
"members", "bytes_sent", "bytes_received"}`` (or ``{"codec", "round", "error"}``). With
``--profile``, a stack sampler runs during each codec's rounds and prints ``{"profile": codec,
"threads": [...]}`` (per thread, the share of samples per innermost frame). With ``--out`` the result
of the last round is ``torch.save``'d to ``DIR/peerI.pt``. Exits ``--linger`` seconds after the
rounds (slower peers finish their reads meanwhile).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch

from averaging import Averager, AveragingError
from dht import DHT, get_dht_time


def vector(index: int, size: int) -> torch.Tensor:
    """Peer ``index``'s input: standard normal values, seeded by the index."""
    return torch.randn(size, generator=torch.Generator().manual_seed(index), dtype=torch.float32)


class StackSampler:
    """A sampling profiler: every ``period`` s, the innermost frames of every other thread's stack.
    :meth:`stop` returns, per thread (named by its busiest frames), the share of samples per frame
    (``file:function``: the innermost frame, and the innermost one of this repository)."""

    def __init__(self, period: float = 0.005):
        self.period = period
        self._running = threading.Event()
        self._counts: dict = {}
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._counts = {}
        self._running.set()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        me = threading.get_ident()
        repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        while self._running.is_set():
            for ident, frame in sys._current_frames().items():
                if ident == me:
                    continue
                inner = f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_code.co_name}"
                ours, f = None, frame
                while f is not None and ours is None:
                    if f.f_code.co_filename.startswith(repo) and "site-packages" not in f.f_code.co_filename:
                        ours = f"{os.path.relpath(f.f_code.co_filename, repo)}:{f.f_code.co_name}"
                    f = f.f_back
                key = inner if ours is None or ours.endswith(inner) else f"{inner} <- {ours}"
                counts = self._counts.setdefault(ident, {})
                counts[key] = counts.get(key, 0) + 1
            time.sleep(self.period)

    def stop(self, top: int = 12) -> list:
        self._running.clear()
        self._thread.join()
        out = []
        for counts in self._counts.values():
            total = sum(counts.values())
            frames = sorted(counts.items(), key=lambda kv: -kv[1])[:top]
            out.append({"samples": total, "frames": [[k, round(v / total, 3)] for k, v in frames]})
        return sorted(out, key=lambda t: -t["samples"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("initial_peers", nargs="*")
    p.add_argument("--host", required=True)
    p.add_argument("--index", type=int, required=True)
    p.add_argument("--peers", type=int, required=True)
    p.add_argument("--size", type=int, default=100_000)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--compression", default="none")
    p.add_argument("--bandwidth", type=float, default=None, help="MB/s announced for load balancing")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per round")
    p.add_argument("--matchmaking-time", type=float, default=2.0)
    p.add_argument("--sender-timeout", type=float, default=5.0, help="the Averager's (default 5 s)")
    p.add_argument("--no-retries", action="store_true", help="one attempt per round: a failed round is "
                   "reported and the peers go on to the next (else retried until --timeout)")
    p.add_argument("--out", default=None)
    p.add_argument("--linger", type=float, default=5.0)
    p.add_argument("--profile", action="store_true", help="sample every thread's stack every 5 ms during the rounds")
    args = p.parse_args()
    torch.set_num_threads(1)
    profiler = StackSampler() if args.profile else None

    dht = DHT(initial_peers=args.initial_peers, host=args.host)
    print("ADDR", dht.get_visible_addresses()[0], flush=True)
    dht.store("netlab-hosts", args.host, get_dht_time() + 600, subkey=str(args.index))
    deadline = time.monotonic() + 60
    seen: dict = {}
    while time.monotonic() < deadline:
        found = dht.get("netlab-hosts", latest=True)
        seen = {k: v.value for k, v in found.value.items()} if found is not None else {}
        if len(seen) >= args.peers:
            break
        time.sleep(0.5)
    print(json.dumps({"dht": seen}), flush=True)

    tensor = vector(args.index, args.size)
    original = tensor.clone()
    for codec in args.compression.split(","):
        averager = Averager([tensor], dht, prefix=f"netlab-avg-{codec}", target_group_size=args.peers,
                            min_group_size=args.peers, compression=codec, bandwidth=args.bandwidth,
                            min_matchmaking_time=args.matchmaking_time, default_timeout=args.timeout,
                            sender_timeout=args.sender_timeout)
        if profiler is not None:
            profiler.start()
        for r in range(args.rounds):
            with averager.lock:
                tensor.copy_(original)
            started, t_start, cpu = time.monotonic(), time.time(), time.process_time()
            try:
                result = averager.step(weight=args.index + 1.0, timeout=args.timeout, scope=f"round{r}",
                                       allow_retries=not args.no_retries)
            except AveragingError as e:
                print(json.dumps({"codec": codec, "round": r, "error": str(e)[:500]}), flush=True)
                continue
            print(json.dumps({"codec": codec, "round": r, "seconds": time.monotonic() - started,
                              "t_start": t_start, "t_end": time.time(), "cpu_s": time.process_time() - cpu,
                              "matchmaking_seconds": result.matchmaking_seconds,
                              "allreduce_seconds": result.allreduce_seconds, "members": len(result.members),
                              "bytes_sent": result.bytes_sent, "bytes_received": result.bytes_received}), flush=True)
        if profiler is not None:
            print(json.dumps({"profile": codec, "threads": profiler.stop()}), flush=True)
        averager.shutdown()
    if args.out:
        torch.save(tensor.clone(), os.path.join(args.out, f"peer{args.index}.pt"))
    print("DONE", flush=True)
    time.sleep(args.linger)
    dht.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
