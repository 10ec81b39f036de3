#!/usr/bin/env python3
"""SWARM pipeline vs a fixed pipeline: throughput, churn, rebalancing (issue 14).

    sudo .venv/bin/python benchmarks/swarm_pipeline.py [--servers 12] [--trainers 6] [--phase-seconds 30]
        [--churn 0.25] [--rebalance-period 15] [--loopback] [--json]

Every stage server is one ``swarm join benchmarks/swarm_pipeline.py --role server --stage K`` process
(one torch thread); the trainers are one process (``trainers`` sub-command) holding ``--trainers``
trainer peers (a DHT and a :class:`swarm.pipeline.client.PipelineClient` each, 2 microbatches in
flight per trainer). With the network lab (tests/netlab.py, root) every process sits in its own lab
host behind a 200 Mbit/s link each way, 5 ms one-way to the core; otherwise (``--loopback``, or no
lab) all run on 127.0.0.1. The model: 4 stages of ``Linear(64, 64) + tanh`` whose forward also
sleeps ``SWARM_BENCH_DELAY`` seconds per sample (the server's artificial compute speed: sleeping
leaves the CPU to the others, so 12 servers run on a 2-core machine); a backward re-runs the
forward (SWARM's stateless backward), so a server spends ``2 * delay`` s per trained sample.

Phases, one after another in one run, on the same servers (heterogeneous: per stage one server at
``delay`` 0.04, 0.06 and 0.12 s/sample for 12 servers, round-robin for other counts):

1. ``fixed``: the GPipe-like baseline: trainer ``i`` sends every microbatch through the fixed chain
   ``i mod R`` (stage k's ``j``-th server), no rerouting (a failed call loses the microbatch);
2. ``swarm``: stochastic wiring (the virtual-time queue) over every server, retries on another server
   of the failed stage;
3. ``swarm_churn`` and 4. ``fixed_churn``: the same while ``--churn`` (25 %) of the servers are
   killed (``kill -9``) and restarted (same identity and stage) per minute.

Then 5. ``rebalance``: a fresh set of 10 servers, all at 0.06 s/sample, 2/2/2/4 per stage, with
``--rebalance-period T``; SWARM trainers run, one of stage 0's two servers is killed for good, and
the throughput is read just before, in the first period after, and in the period that follows two
periods after the kill. The best achievable for the 9 left is 2 servers' worth on the bottleneck
(2/2/2/3), what the pipeline had before the kill.

Reported (``--json``: one line): samples/s per phase (completed microbatches, forward and backward
through every stage, after a warm-up), microbatches lost (failed), the SWARM churn ratio
(swarm_churn / swarm), the rebalanced throughput relative to the pre-kill one and to the model
(``1 / (2 delay)`` per server), and the compute utilisation of the bottleneck stage's servers in
the ``swarm`` phase (seconds of stage compute they were asked for / wall seconds, from the trainers'
request counts). Samples/s over time (5 s bins) are printed per phase. Figures measured here (a
shared 2-core machine; the default run took 491 s): docs/pipelines.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # before benchmarks/ (its dht.py is not the dht package)

from swarm import Task  # noqa: E402

WIDTH = 64
MICROBATCH = 8
NUM_STAGES = 4
IN_FLIGHT = 2  # microbatches per trainer at once (a server serves at most 2 requests per caller at once)
HETEROGENEOUS = (0.04, 0.06, 0.12)  # s/sample of the servers of one stage
HOMOGENEOUS = 0.06


class SlowStage(torch.nn.Module):
    """``tanh(Linear(x))`` that also sleeps ``SWARM_BENCH_DELAY`` seconds per sample (read when built)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(WIDTH, WIDTH)
        self.delay = float(os.environ.get("SWARM_BENCH_DELAY", "0") or 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.delay > 0 and x.device.type != "meta":
            time.sleep(self.delay * x.shape[0])
        return torch.tanh(self.linear(x))


def _batches(shard: int, num_shards: int, batch_size: int, seed: int):
    g = torch.Generator().manual_seed(seed * 1000 + shard)
    for _ in range(1000):
        x = torch.randn(batch_size, WIDTH, generator=g)
        yield x, torch.tanh(x.flip(1))


task = Task(
    name="bench-pipeline",
    stages=[SlowStage] * NUM_STAGES,
    stage_costs=[1.0] * NUM_STAGES,
    optimizer=lambda params: torch.optim.SGD(params, lr=0.05),
    data=_batches,
    loss=lambda output, batch: torch.nn.functional.mse_loss(output, batch[1]),
    batch_size=MICROBATCH,
    target_batch_size=4096,
)


# ---------------------------------------------------------------- the trainers' process

def _trainers(args: argparse.Namespace) -> int:
    """``trainers``: ``--count`` trainer peers for ``--seconds``; prints one JSON line (completions)."""
    import asyncio

    from dht import DHT
    from swarm.pipeline.client import PipelineClient, PipelineError
    from swarm.pipeline.stage_training import summed_loss

    torch.set_num_threads(1)
    chains = [c.split(",") for c in args.chains.split(";")] if args.chains else []

    class FixedClient(PipelineClient):
        """A fixed pipeline: stage k always goes to ``chain[k]``; no retry elsewhere."""

        def __init__(self, *a: Any, chain: list[str], **kw: Any):
            super().__init__(*a, max_retries_per_stage=0, **kw)
            self.chain = chain

        async def _choose(self, stage: int, task_size: float) -> str:  # (the client's server choice)
            return self.chain[stage]

    dhts = [DHT(initial_peers=[args.initial_peers], host=args.host) for _ in range(args.count)]
    loss_fn = summed_loss(task.loss, task.samples_in)
    completions: list[tuple[float, int]] = []
    failures: list[float] = []
    requests: dict[str, int] = {}
    retries = [0]
    start = time.monotonic() + args.warmup
    stop_at = start + args.seconds
    print("trainers ready", flush=True)

    async def trainer(index: int, node: Any) -> None:
        if args.mode == "fixed":
            client: PipelineClient = FixedClient(node, task.name, NUM_STAGES, chain=chains[index % len(chains)],
                                                 forward_timeout=10, backward_timeout=20)
            await client.refresh()  # the servers' addresses
        else:
            client = PipelineClient(node, task.name, NUM_STAGES, forward_timeout=10, backward_timeout=20,
                                    update_period=5.0)
        batches = task.batches(index, args.count, MICROBATCH, index)

        async def one_lane() -> None:
            while time.monotonic() < stop_at:
                try:
                    _, samples = await client.train_microbatch(next(batches), loss_fn)
                    completions.append((time.monotonic(), samples))
                except (PipelineError, Exception):  # noqa: BLE001 - counted: a lost microbatch
                    failures.append(time.monotonic())
                    if args.mode == "fixed":
                        await asyncio.sleep(0.5)  # the chain is broken until its server is back
        await asyncio.gather(*(one_lane() for _ in range(IN_FLIGHT)))
        for peer, n in client.requests.items():
            requests[peer] = requests.get(peer, 0) + n
        retries[0] += client.retries

    futures = [d.run_coroutine(lambda _d, node, i=i: trainer(i, node), return_future=True)
               for i, d in enumerate(dhts)]
    for f in futures:
        f.result(args.seconds + args.warmup + 120)
    for d in dhts:
        d.shutdown()
    measured = [(t - start, n) for t, n in completions if start <= t < stop_at]
    print(json.dumps({"completions": measured, "failed": sum(start <= t < stop_at for t in failures),
                      "failed_total": len(failures), "requests": requests, "retries": retries[0],
                      "seconds": args.seconds, "warmup": args.warmup}), flush=True)
    return 0


# ---------------------------------------------------------------- the driver

class _Peers:
    """Bootstrap, servers and trainer runs: in lab hosts or on loopback; all killed by PID at the end."""

    def __init__(self, out: Path, lab_hosts: int, loopback: bool):
        self.out = out
        self.procs: dict[str, subprocess.Popen] = {}
        self.lab: Any = None
        if not loopback:
            from tests import netlab

            reason = netlab.unavailable()
            if reason is None:
                self.lab = netlab.Lab([netlab.Link(up_mbit=200, down_mbit=200, delay_ms=5)] * lab_hosts)
            else:
                print(f"network lab unavailable ({reason}): loopback", flush=True)
        self.next_host = 0
        self.host_of: dict[str, Any] = {}

    @property
    def links(self) -> str:
        return "lab: 200 Mbit/s each way, 5 ms one-way" if self.lab is not None else "loopback"

    def ip(self, name: str) -> str:
        host = self.host_of.get(name)
        return host.ip if host is not None else "127.0.0.1"

    def spawn(self, name: str, argv: list[str], env: dict | None = None) -> subprocess.Popen:
        log = open(self.out / f"{name}.log", "a")
        full_env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT), **(env or {}))
        if self.lab is not None:
            if name not in self.host_of:
                self.host_of[name] = self.lab.hosts[self.next_host]
                self.next_host += 1
            proc = self.host_of[name].popen([sys.executable, *argv], stdout=log, stderr=subprocess.STDOUT,
                                            env=full_env)
        else:
            proc = subprocess.Popen([sys.executable, *argv], stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, cwd=ROOT, env=full_env)
        log.close()
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        path = self.out / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_for(self, name: str, pattern: str, timeout: float, start: int = 0) -> re.Match:
        deadline = time.monotonic() + timeout
        while True:
            match = re.search(pattern, self.log(name)[start:], re.MULTILINE)
            if match:
                return match
            if self.procs[name].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not print {pattern!r}:\n{self.log(name)[-2000:]}")
            time.sleep(0.2)

    def kill(self, name: str) -> None:
        proc = self.procs[name]
        if proc.poll() is None:
            try:
                os.kill(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(10)

    def close(self) -> None:
        for name in list(self.procs):
            self.kill(name)
        if self.lab is not None:
            self.lab.close()


def _server_args(address: str, ip: str, stage: int, identity: Path, period: float) -> list[str]:
    return ["-m", "swarm", "join", str(ROOT / "benchmarks" / "swarm_pipeline.py"), "--role", "server", "--stage",
            str(stage), "--initial-peers", address, "--host", ip, "--identity", str(identity), "--threads", "1",
            "--dashboard-port", "off", "--quiet", "--rebalance-period", str(period), "--matchmaking-time", "1"]


def _start_servers(peers: _Peers, address: str, prefix: str, plan: list[tuple[int, float]], period: float
                   ) -> dict[str, tuple[int, float, str]]:
    """Start one server per (stage, delay); returns {name: (stage, delay, peer id)} once all serve."""
    names = {}
    for i, (stage, delay) in enumerate(plan):
        name = f"{prefix}{i}"
        peers.spawn(name, _server_args(address, "0.0.0.0", stage, peers.out / f"{name}.key", period),
                    env={"SWARM_BENCH_DELAY": str(delay)})
        names[name] = (stage, delay)
    result = {}
    for name, (stage, delay) in names.items():
        peer_id = peers.wait_for(name, r"^peer (Qm\w+)", 900).group(1)
        peers.wait_for(name, r"serving stage", 900)
        result[name] = (stage, delay, peer_id)
    return result


def _run_trainers(peers: _Peers, address: str, name: str, mode: str, count: int, seconds: float, warmup: float,
                  chains: list[list[str]] | None = None, during: Any = None) -> dict:
    argv = [str(ROOT / "benchmarks" / "swarm_pipeline.py"), "trainers", "--initial-peers", address, "--host",
            "0.0.0.0", "--count", str(count), "--mode", mode, "--seconds", str(seconds), "--warmup", str(warmup)]
    if chains:
        argv += ["--chains", ";".join(",".join(c) for c in chains)]
    mark = len(peers.log(name))
    proc = peers.spawn(name, argv)
    peers.wait_for(name, "trainers ready", 600, mark)
    if during is not None:  # (on this thread: lab processes die with the thread that started them)
        during(time.monotonic() + warmup, seconds)
    proc.wait(seconds + warmup + 240)
    line = [ln for ln in peers.log(name)[mark:].splitlines() if ln.startswith("{")]
    if not line:
        raise RuntimeError(f"{name} printed no result:\n{peers.log(name)[-3000:]}")
    return json.loads(line[-1])


def _rate(result: dict, t0: float = 0.0, t1: float | None = None) -> float:
    t1 = result["seconds"] if t1 is None else t1
    return sum(n for t, n in result["completions"] if t0 <= t < t1) / max(t1 - t0, 1e-9)


def _timeline(result: dict, step: float = 5.0) -> list[float]:
    bins = int(result["seconds"] // step)
    return [round(_rate(result, i * step, (i + 1) * step), 1) for i in range(bins)]


def _churn(peers: _Peers, address: str, servers: dict, per_minute: float, period: float, rng: random.Random,
           restarted: dict[str, int], count: list[int]) -> Any:
    """A ``during`` callback: kill -9 and restart one random server every 60 / (per_minute * N) s
    (``restarted``: name -> its log's length at the restart)."""
    def during(start: float, seconds: float) -> None:
        gap = 60.0 / max(per_minute * len(servers), 1e-9)
        t = start + gap / 2
        while t < start + seconds:
            time.sleep(max(t - time.monotonic(), 0))
            name = rng.choice(sorted(n for n in servers if n not in restarted or _back(peers, n, restarted)))
            stage, delay, _ = servers[name]
            peers.kill(name)
            restarted[name] = len(peers.log(name))
            count[0] += 1
            peers.spawn(name, _server_args(address, "0.0.0.0", stage, peers.out / f"{name}.key", period),
                        env={"SWARM_BENCH_DELAY": str(delay)})
            t += gap
    return during


def _back(peers: _Peers, name: str, restarted: dict[str, int]) -> bool:
    return "serving stage" in peers.log(name)[restarted[name]:]


def _utilisation(result: dict, servers: dict, stage: int) -> float:
    """Compute seconds asked of ``stage``'s servers (each request: MICROBATCH * delay) per server-second."""
    wall = result["seconds"] + result.get("warmup", 0.0)  # the request counts cover the warm-up too
    busy = [result["requests"].get(peer_id, 0) * MICROBATCH * delay / wall
            for s, delay, peer_id in servers.values() if s == stage]
    return sum(busy) / max(len(busy), 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command")
    t = sub.add_parser("trainers")
    t.add_argument("--initial-peers", required=True)
    t.add_argument("--host", default="127.0.0.1")
    t.add_argument("--count", type=int, default=6)
    t.add_argument("--mode", choices=["swarm", "fixed"], default="swarm")
    t.add_argument("--chains", default="")
    t.add_argument("--seconds", type=float, default=30)
    t.add_argument("--warmup", type=float, default=8)
    p.add_argument("--servers", type=int, default=12, help="stage servers in phases 1-4 (8-12; default 12)")
    p.add_argument("--trainers", type=int, default=8, help="trainer peers (default 8)")
    p.add_argument("--phase-seconds", type=float, default=30.0, help="measured seconds per phase (default 30)")
    p.add_argument("--warmup", type=float, default=8.0, help="unmeasured seconds at a phase's start (default 8)")
    p.add_argument("--churn", type=float, default=0.25, help="fraction of servers killed+restarted per minute")
    p.add_argument("--rebalance-period", type=float, default=15.0, help="T of the rebalance phase (default 15 s)")
    p.add_argument("--loopback", action="store_true", help="no network lab: every process on 127.0.0.1")
    p.add_argument("--json", action="store_true", help="print one JSON line with the figures at the end")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only-rebalance", action="store_true", help="run phase 5 only")
    args = p.parse_args(argv)
    if args.command == "trainers":
        return _trainers(args)
    if not 8 <= args.servers <= 12 or args.servers % NUM_STAGES:
        p.error("--servers must be 8 or 12 (a multiple of the 4 stages)")
    rng = random.Random(args.seed)
    out = Path(tempfile.mkdtemp(prefix="swarm-pipeline-bench-"))
    peers = _Peers(out, lab_hosts=args.servers + 10 + 6, loopback=args.loopback)  # + bootstrap, 5 trainer runs
    figures: dict[str, Any] = {"links": peers.links, "servers": args.servers, "trainers": args.trainers,
                               "microbatch": MICROBATCH, "phase_seconds": args.phase_seconds, "logs": str(out)}
    started = time.monotonic()
    try:
        peers.spawn("bootstrap", ["-m", "swarm", "dht", "--host", "0.0.0.0", "--report-interval", "3600",
                                  "--dashboard-port", "off", "--identity", str(out / "bootstrap.key")])
        found = peers.wait_for("bootstrap", r"--initial-peers (/ip4/\S+)", 60).group(1)
        address = re.sub(r"/ip4/[^/]+/", f"/ip4/{peers.ip('bootstrap')}/", found)
        if not args.only_rebalance:
            _phases_1_to_4(args, peers, address, rng, figures)
        _phase_5(args, peers, address, figures)
        figures["wall_s"] = round(time.monotonic() - started, 1)
        if args.json:
            print(json.dumps(figures), flush=True)
        return 0
    finally:
        peers.close()


def _phases_1_to_4(args: argparse.Namespace, peers: _Peers, address: str, rng: random.Random, figures: dict) -> None:
    """fixed, swarm, swarm_churn, fixed_churn on one set of heterogeneous servers."""
    replicas = args.servers // NUM_STAGES
    delays = [HETEROGENEOUS[j % len(HETEROGENEOUS)] for j in range(replicas)]
    plan = [(k, delays[(j + k) % replicas]) for j in range(replicas) for k in range(NUM_STAGES)]
    servers = _start_servers(peers, address, "server", plan, 1e6)
    chains = [[next(pid for name, (s, _, pid) in servers.items() if s == k and int(name[6:]) // NUM_STAGES == j)
               for k in range(NUM_STAGES)] for j in range(replicas)]
    model = [sum(1 / (2 * d) for s, d, _ in servers.values() if s == k) for k in range(NUM_STAGES)]
    chain_model = sum(1 / (2 * max(servers[n][1] for n in servers if servers[n][2] in c)) for c in chains)
    figures["model_samples_per_s"] = {"swarm": round(min(model), 1), "fixed": round(chain_model, 1)}
    print(f"{args.servers} servers ({peers.links}); model: swarm {min(model):.1f}, fixed {chain_model:.1f} "
          f"samples/s", flush=True)
    results: dict[str, dict] = {}
    killed: dict[str, dict[str, int]] = {"swarm_churn": {}, "fixed_churn": {}}
    kills = {"swarm_churn": [0], "fixed_churn": [0]}
    for i, (phase, mode, churn) in enumerate((("fixed", "fixed", False), ("swarm", "swarm", False),
                                              ("swarm_churn", "swarm", True), ("fixed_churn", "fixed", True))):
        during = _churn(peers, address, servers, args.churn, 1e6, rng, killed[phase], kills[phase]) \
            if churn else None
        warmup = args.warmup * (3 if i == 0 else 1)  # the first phase also warms the servers up
        results[phase] = _run_trainers(peers, address, f"trainers-{phase}", mode, args.trainers,
                                       args.phase_seconds, warmup, chains if mode == "fixed" else None, during)
        r = results[phase]
        print(f"{phase:12s} {_rate(r):6.1f} samples/s, {r['failed']} microbatches lost, {r['retries']} retries; "
              f"per 5 s: {_timeline(r)}", flush=True)
        if churn:  # let the restarted servers come back before the next phase
            for name, mark in killed[phase].items():
                peers.wait_for(name, "serving stage", 900, mark)
    for phase, r in results.items():
        figures[phase] = {"samples_per_s": round(_rate(r), 2), "lost_microbatches": r["failed"],
                          "retries": r["retries"], "timeline_5s": _timeline(r)}
    figures["swarm_churn_ratio"] = round(_rate(results["swarm_churn"]) / max(_rate(results["swarm"]), 1e-9), 3)
    figures["fixed_churn_ratio"] = round(_rate(results["fixed_churn"]) / max(_rate(results["fixed"]), 1e-9), 3)
    figures["churn_kills"] = {k: v[0] for k, v in kills.items()}
    bottleneck = min(range(NUM_STAGES), key=lambda k: model[k])
    figures["bottleneck_utilisation"] = round(_utilisation(results["swarm"], servers, bottleneck), 3)
    for name in servers:
        peers.kill(name)
    print(f"SWARM keeps {figures['swarm_churn_ratio']:.0%} of its churn-free throughput under churn "
          f"({figures['swarm_churn']['lost_microbatches']} lost); fixed: {figures['fixed_churn_ratio']:.0%} "
          f"({figures['fixed_churn']['lost_microbatches']} lost); bottleneck utilisation "
          f"{figures['bottleneck_utilisation']:.0%}", flush=True)


def _phase_5(args: argparse.Namespace, peers: _Peers, address: str, figures: dict) -> None:
    """Rebalancing after a stage loses half its servers (a fresh, homogeneous set)."""
    # 5. rebalancing after a stage loses half its servers
    period = args.rebalance_period
    plan5 = [(k, HOMOGENEOUS) for k in (0, 0, 1, 1, 2, 2, 3, 3, 3, 3)]
    fresh = _start_servers(peers, address, "rb", plan5, period)
    victim = next(name for name, (s, _, _) in fresh.items() if s == 0)
    before, kill_at = 20.0, [0.0]
    marks = {name: len(peers.log(name)) for name in fresh}

    def kill_later(start: float, _seconds: float) -> None:
        time.sleep(max(start + before - time.monotonic(), 0))
        peers.kill(victim)
        kill_at[0] = time.monotonic() - start

    seconds5 = before + 3 * period + 5
    r5 = _run_trainers(peers, address, "trainers-rebalance", "swarm", args.trainers, seconds5, args.warmup,
                       None, kill_later)
    k = kill_at[0]
    moves = [name for name in fresh if name != victim and "moved to stage" in peers.log(name)[marks[name]:]]
    pre, hit, restored = _rate(r5, 5, k), _rate(r5, k, k + period), _rate(r5, k + 2 * period, k + 3 * period)
    best_model = 2 / (2 * HOMOGENEOUS)
    figures["rebalance"] = {"period_s": period, "before": round(pre, 2), "first_period_after_kill": round(hit, 2),
                            "after_two_periods": round(restored, 2), "restored_vs_before": round(restored / pre, 3)
                            if pre else None, "restored_vs_model_best": round(restored / best_model, 3),
                            "model_best": best_model, "migrations": len(moves), "lost_microbatches": r5["failed"],
                            "timeline_5s": _timeline(r5)}
    print(f"rebalance    before {pre:.1f}, first period after the kill {hit:.1f}, after two periods "
          f"{restored:.1f} samples/s ({len(moves)} migration(s)); per 5 s: {_timeline(r5)}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
