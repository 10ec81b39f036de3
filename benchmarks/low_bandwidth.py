#!/usr/bin/env python3
"""Issue 16: DiLoCo's low-bandwidth modes over emulated home links (tests/netlab.py).

    sudo .venv/bin/python benchmarks/low_bandwidth.py [--json] [--modes diloco_float16,sparseloco,demo,streaming]
        [--mbit 20,100] [--samples 4096] [--inner-steps 16] [--time-limit 1500] [--logs DIR]

``examples/charlm.py`` (0.47 M parameters, local batch 16) trained by 4 peers, one OS process with
one torch thread per lab host, every host at ``--mbit`` each way and 15 ms one-way to the core (60
ms RTT between two hosts), one lab per rate. Every mode is DiLoCo (``swarm.Optimizer(mode="diloco")``,
``--inner-steps`` AdamW steps per outer round, outer Nesterov lr 0.7, momentum 0.9), from the same
initial model (seed 0), peer i on shard i of 4 with the same batches (seed 1000 + i) in every mode,
``--samples`` samples in all (``samples / (16 * 4)`` inner steps per peer). Modes:

- ``diloco_float16``: the dense baseline, float16 pseudo-gradients (butterfly all-reduce);
- ``diloco_CODEC``: any codec of :data:`averaging.compression.CODECS` (e.g. ``diloco_uint8``);
- ``sparseloco``, ``demo``, ...: a codec name alone (issue 16's compressed modes, error feedback and
  the sparse all-gather come with the codec), with their outer step (:data:`RECIPES`: plain SGD, lr 3
  for sparseloco and 2 for demo, the error feedback in the outer momentum's place, as SparseLoCo does);
- ``streaming`` (or ``streaming_CODEC``): Streaming DiLoCo, 4 fragments, overlap on (the default
  ``fragment_overlap = (H - 1) // 4`` inner steps, merge alpha 0.5), the 4-bit default codec.

Figures per mode: ``bytes_per_step``: payload bytes sent per peer per outer step (all of a step's
fragments for streaming), as the optimizer counts them (``Optimizer.bytes_sent`` / outer steps, mean
over peers and rates); ``float32_bytes_per_step``: what dense float32 would send, the butterfly's
``2 (N - 1) / N * P * 4`` bytes for N peers and P parameters; ``heldout_loss``: ``task.evaluate``
(nats per byte, fixed held-out windows) of the global parameters after the run at the highest rate
(``heldout_loss_MBITmbit`` per rate); ``wall_s_MBITmbit``: from the common start to the final model
(the last step, then the last background round awaited), the slowest peer; ``utilisation_MBITmbit``:
per peer, the wall seconds in forward, backward and the inner optimizer's ``step`` over the wall time
to its last step (as benchmarks/wan.py), mean over peers; ``utilisation_cpu_MBITmbit``: the same with
the compute sections shrunk to their thread CPU seconds (what a peer with a core of its own would
see; this machine has 2 cores for 4 peers and the lab's forwarder).

``--json`` prints one line on stdout (the table goes to stderr): ``{"float32_bytes_per_step": N,
"modes": [{"mode", "bytes_per_step", "heldout_loss", "wall_s_20mbit", "wall_s_100mbit",
"utilisation_100mbit", ...}, ...], "config": ...}``. Needs root (the lab); every process started here
dies with the script, and the whole run is bounded by ``--time-limit``.

Measured (docs/low_bandwidth.md has the tables): at 8192 samples sparseloco sent 24.7 KB per peer
per outer step, 114x below float32's 2.82 MB, with a held-out loss of 2.3367 against dense float16
DiLoCo's 2.2877 (+2.1 %), and took 63 s against 160 s at 20 Mbit/s; at 4096 samples Streaming
DiLoCo (4-bit, 4 fragments) matched dense DiLoCo's loss (2.337 against 2.361) at 96.3 % utilisation
on 100 Mbit/s, and the sparse modes had not caught up yet after 4 outer steps.

The peers are this file too (``python benchmarks/low_bandwidth.py peer ...``, see :func:`peer_main`):
one process per host runs every mode in turn, starting each when the driver writes its start file.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PEERS, ONE_WAY_MS, BATCH = 4, 15.0, 16
DEFAULT_MODES = ("diloco_float16", "sparseloco", "demo", "streaming")
STREAMING_FRAGMENTS = 4
OUTER_LR, OUTER_MOMENTUM = 0.7, 0.9  # DiLoCo's outer Nesterov SGD
# the sparse modes' outer step, as SparseLoCo does it: plain SGD, the error feedback in momentum's place
# (an outer momentum on top of it overshoots); the learning rates found best on an in-process simulation
# of this benchmark at 8192 samples (averaging/sparse_codecs.py: sparseloco lr 3 within 2.1 % of dense
# DiLoCo's held-out loss, demo lr 2 within 3.1 %); diloco_CODEC modes keep DiLoCo's outer step
RECIPES: dict[str, dict[str, Any]] = {"sparseloco": {"outer_lr": 3.0, "outer_momentum": 0.0},
                                      "demo": {"outer_lr": 2.0, "outer_momentum": 0.0}}


def mode_options(mode: str) -> dict[str, Any]:
    """The ``swarm.Optimizer`` options of a mode name (ValueError naming the known codecs if unknown)."""
    from averaging.compression import CODECS

    def codec(name: str) -> str:
        if name not in CODECS:
            raise ValueError(f"mode {mode!r}: unknown codec {name!r} (known: {', '.join(CODECS)})")
        return name

    if mode == "streaming":
        return {"fragments": STREAMING_FRAGMENTS, "overlap": True}
    if mode.startswith("streaming_"):
        return {"fragments": STREAMING_FRAGMENTS, "overlap": True, "compression": codec(mode[len("streaming_"):])}
    if mode.startswith("diloco_"):
        return {"compression": codec(mode[len("diloco_"):])}
    return {"compression": codec(mode), **RECIPES.get(mode, {})}


def float32_bytes_per_step(num_params: int, peers: int = PEERS) -> int:
    """Payload bytes a peer sends per outer step averaging ``num_params`` float32 values in a
    butterfly of ``peers``: its contribution to the other owners and its part's result back."""
    return int(2 * (peers - 1) / peers * num_params * 4)


# ---------------------------------------------------------------------------------------- the peer


def _wait_for_file(path: Path, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout:g} s")
        time.sleep(0.02)
    time.sleep(0.01)
    return path.read_text()


def run_mode(dht: Any, mode: str, index: int, peers: int, samples: int, inner_steps: int, run_id: str,
             directory: Path, matchmaking_time: float) -> tuple[dict, Any]:
    """Train one mode from the common start (``directory/MODE.start`` holds its unix time): (the
    result dict, the optimizer, still in the run)."""
    import torch

    from swarm.examples.charlm import task
    from swarm.optimizer import Optimizer
    from tests.netlab_peers.train_peer import _Timer  # the lab training peer's compute timer

    torch.manual_seed(0)
    model = task.model()
    options = {"outer_lr": OUTER_LR, "outer_momentum": OUTER_MOMENTUM, **mode_options(mode)}
    opt = Optimizer(dht=dht, run_id=run_id, optimizer=task.optimizer, params=model.parameters(),
                    batch_size_per_step=BATCH, matchmaking_time=matchmaking_time, target_group_size=peers,
                    mode="diloco", target_batch_size=None, inner_steps=inner_steps, averaging_timeout=120,
                    **options)
    timer = _Timer()
    inner_step = opt.opt.step

    @functools.wraps(inner_step)
    def timed_step(*a: Any, **k: Any) -> Any:
        with timer:
            return inner_step(*a, **k)

    opt.opt.step = timed_step  # type: ignore[method-assign]  # the inner steps count as compute
    batches = task.batches(index, peers, BATCH, seed=1000 + index)
    steps_wanted = samples // (BATCH * peers)
    first = next(batches)  # data loaded before the clock starts
    deadline = time.monotonic() + 120
    while opt.tracker.refresh().num_peers < peers:  # every peer in the view: the first round counts them all
        if time.monotonic() > deadline:
            raise RuntimeError(f"{mode}: only {opt.tracker.global_progress.num_peers} of {peers} peers in the "
                               "progress view after 120 s")
        time.sleep(0.1)
    print(f"ready {mode}", flush=True)
    start = float(_wait_for_file(directory / f"{mode}.start", 600))
    while time.time() < start:
        time.sleep(0.005)
    begin = time.perf_counter()
    data = first
    for step in range(steps_wanted):
        if step:
            data = next(batches)
        with timer:
            loss = task.loss(model, data)
            loss.backward()
        opt.step(batch_size=BATCH, loss=loss)
        opt.zero_grad()
    wall = time.perf_counter() - begin
    opt.flush(timeout=120)  # the round still in the background (streaming's last fragment)
    total = time.perf_counter() - begin
    with torch.no_grad():
        for param, value in zip(opt.params, opt.global_params):
            param.copy_(value)
    heldout = task.evaluate(model)["loss"]
    return {"mode": mode, "index": index, "steps": steps_wanted, "epochs": opt.local_epoch, "wall": wall,
            "total": total, "compute": timer.wall, "compute_cpu": timer.cpu, "heldout_loss": heldout,
            "rounds_ok": opt.round_counts["ok"],
            "failures": [r["cause"] for r in opt.rounds if r["result"] == "failed"][:8],
            "rounds_failed": opt.round_counts["failed"], "bytes_sent": opt.bytes_sent,
            "bytes_received": opt.bytes_received, "num_params": sum(p.numel() for p in opt.params),
            "compression": opt.averager.codec.name, "codec": repr(opt.averager.codec)[:200],
            "fragments": len(opt.fragment_indices),
            "outer_lr": options["outer_lr"], "outer_momentum": options["outer_momentum"],
            "fragment_overlap": opt.fragment_overlap}, opt


def peer_main(argv: list[str]) -> int:
    """``peer --host IP --index I --peers N --modes M1,M2 --samples S --inner-steps H --dir DIR
    [--print-address] [INITIAL_PEER ...]``: one peer running every mode in turn. Per mode it prints
    ``ready MODE``, starts at the time in ``DIR/MODE.start``, prints ``RESULT {json}``, and leaves the
    mode's run once ``DIR/MODE.done`` exists (the others may still need it until then)."""
    p = argparse.ArgumentParser(prog="low_bandwidth.py peer")
    p.add_argument("initial_peers", nargs="*")
    p.add_argument("--host", required=True)
    p.add_argument("--index", type=int, required=True)
    p.add_argument("--peers", type=int, required=True)
    p.add_argument("--modes", required=True)
    p.add_argument("--samples", type=int, required=True)
    p.add_argument("--inner-steps", type=int, default=16)
    p.add_argument("--dir", required=True)
    p.add_argument("--run-prefix", default="lowbw")
    p.add_argument("--matchmaking-time", type=float, default=3.0)
    p.add_argument("--print-address", action="store_true", help="print ADDR <multiaddr> (a bootstrap for the rest)")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from dht import DHT

    dht = DHT(initial_peers=args.initial_peers, host=args.host)
    if args.print_address:
        print(f"ADDR {dht.get_visible_addresses()[0]}", flush=True)
    directory = Path(args.dir)
    try:
        for mode in [m for m in args.modes.split(",") if m]:
            result, opt = run_mode(dht, mode, args.index, args.peers, args.samples, args.inner_steps,
                                   f"{args.run_prefix}-{mode}", directory, args.matchmaking_time)
            print("RESULT " + json.dumps(result), flush=True)
            _wait_for_file(directory / f"{mode}.done", 600)
            opt.shutdown(timeout=10)
    finally:
        dht.shutdown()
    return 0


# ---------------------------------------------------------------------------------------- the driver


class PeerSet:
    """The peer processes of one lab (or of loopback, for tests): starts modes, collects results."""

    def __init__(self, procs: list[subprocess.Popen], logs: list[Path], directory: Path):
        self.procs, self.logs, self.directory = procs, logs, directory

    def _wait(self, pattern: str, timeout: float) -> list[re.Match]:
        found: list[re.Match | None] = [None] * len(self.procs)
        deadline = time.monotonic() + timeout
        while True:
            for i, (proc, log) in enumerate(zip(self.procs, self.logs)):
                if found[i] is None:
                    found[i] = re.search(pattern, log.read_text(errors="replace") if log.exists() else "",
                                         re.MULTILINE)
                    if found[i] is None and proc.poll() is not None:
                        raise RuntimeError(f"{log.name}: exited ({proc.returncode}) before {pattern!r}:\n"
                                           f"{log.read_text(errors='replace')[-3000:]}")
            if all(found):
                return [m for m in found if m is not None]
            if time.monotonic() > deadline:
                missing = [self.logs[i].name for i, m in enumerate(found) if m is None]
                raise TimeoutError(f"no {pattern!r} from {missing} within {timeout:g} s")
            time.sleep(0.1)

    def run(self, mode: str, timeout: float) -> list[dict]:
        """Start ``mode`` on every peer at once; their result dicts."""
        self._wait(rf"^ready {re.escape(mode)}$", 300)
        (self.directory / f"{mode}.start").write_text(repr(time.time() + 2.0))  # DHT records settle
        results = [json.loads(m.group(1)) for m in self._wait(rf"^RESULT (\{{.*\"mode\": \"{re.escape(mode)}\".*)$",
                                                              timeout)]
        (self.directory / f"{mode}.done").write_text("1")
        return results


def summarise(results: list[dict]) -> dict:
    """One mode at one rate: the figures of its peers' results."""
    epochs = max(r["epochs"] for r in results)
    return {"bytes_per_step": statistics.fmean(r["bytes_sent"] / max(r["epochs"], 1) for r in results),
            "heldout_loss": statistics.fmean(r["heldout_loss"] for r in results),
            "heldout_loss_spread": max(r["heldout_loss"] for r in results) - min(r["heldout_loss"] for r in results),
            "wall_s": max(r["total"] for r in results),
            "utilisation": statistics.fmean(r["compute"] / r["wall"] for r in results),
            "utilisation_cpu": statistics.fmean(r["compute_cpu"] / (r["wall"] - r["compute"] + r["compute_cpu"])
                                                for r in results),
            "epochs": epochs, "failed_rounds": sum(r["rounds_failed"] for r in results),
            "compression": results[0]["compression"], "fragments": results[0]["fragments"],
            "fragment_overlap": results[0]["fragment_overlap"], "num_params": results[0]["num_params"],
            "outer_lr": results[0]["outer_lr"], "outer_momentum": results[0]["outer_momentum"],
            "codec": results[0].get("codec"),
            "bytes_per_peer": statistics.fmean(r["bytes_sent"] for r in results)}


def lab_run(mbit: float, modes: list[str], samples: int, inner_steps: int, directory: Path,
            matchmaking_time: float) -> dict[str, dict]:
    """Every mode over a lab of PEERS hosts at ``mbit``; {mode: summary}."""
    from tests.netlab import Lab, Link

    links = [Link(up_mbit=mbit, down_mbit=mbit, delay_ms=ONE_WAY_MS)] * PEERS
    sub = directory / f"{mbit:g}mbit"
    sub.mkdir(exist_ok=True)
    for stale in sub.glob("*.start"):  # (a kept log directory from an earlier run)
        stale.unlink()
    for stale in sub.glob("*.done"):
        stale.unlink()
    files = []
    try:
        with Lab(links) as lab:
            def spawn(name: str, host: Any, args: list[str]) -> tuple[subprocess.Popen, Path]:
                path = sub / f"{name}.log"
                f = open(path, "w")
                files.append(f)
                return host.python(args, stdout=f, stderr=subprocess.STDOUT, text=True), path

            boot, boot_log = spawn("bootstrap", lab.hosts[0], ["-m", "swarm", "dht", "--host", lab.hosts[0].ip,
                                                                "--report-interval", "3600"])
            deadline = time.monotonic() + 60
            while not (match := re.search(r"--initial-peers (/ip4/\S+)", boot_log.read_text(errors="replace"))):
                if boot.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the bootstrap did not start:\n{boot_log.read_text()[-2000:]}")
                time.sleep(0.2)
            procs, logs = [], []
            run_prefix = f"lowbw-{mbit:g}-{time.time_ns()}"  # the same run ids on every peer
            for i in range(PEERS):
                proc, log = spawn(f"peer{i}", lab.hosts[i], [
                    str(Path(__file__).resolve()), "peer", "--host", lab.hosts[i].ip, "--index", str(i), "--peers",
                    str(PEERS), "--modes", ",".join(modes), "--samples", str(samples), "--inner-steps",
                    str(inner_steps), "--dir", str(sub), "--run-prefix", run_prefix,
                    "--matchmaking-time", str(matchmaking_time), match.group(1)])
                procs.append(proc)
                logs.append(log)
            peers = PeerSet(procs, logs, sub)
            summaries = {}
            for mode in modes:
                summaries[mode] = summarise(peers.run(mode, 900))
                print(f"  {mbit:g} Mbit/s {mode}: {json.dumps(summaries[mode])}", file=sys.stderr, flush=True)
            return summaries
    finally:
        for f in files:
            f.close()


def build_result(per_rate: dict[float, dict[str, dict]], modes: list[str], config: dict) -> dict:
    """The issue's JSON from {mbit: {mode: summary}}."""
    rates = sorted(per_rate)
    top = rates[-1]
    num_params = next(iter(per_rate[top].values()))["num_params"]
    rows = []
    for mode in modes:
        row: dict[str, Any] = {"mode": mode,
                               "bytes_per_step": statistics.fmean(per_rate[m][mode]["bytes_per_step"] for m in rates),
                               "heldout_loss": per_rate[top][mode]["heldout_loss"]}
        for m in rates:
            s = per_rate[m][mode]
            tag = f"{m:g}mbit"
            row.update({f"wall_s_{tag}": s["wall_s"], f"utilisation_{tag}": s["utilisation"],
                        f"utilisation_cpu_{tag}": s["utilisation_cpu"], f"heldout_loss_{tag}": s["heldout_loss"],
                        f"failed_rounds_{tag}": s["failed_rounds"], f"epochs_{tag}": s["epochs"]})
        first = per_rate[top][mode]
        row.update(compression=first["compression"], fragments=first["fragments"],
                   fragment_overlap=first["fragment_overlap"], outer_lr=first["outer_lr"],
                   outer_momentum=first["outer_momentum"], bytes_per_peer=first["bytes_per_peer"],
                   codec=first["codec"])
        rows.append(row)
    float32 = float32_bytes_per_step(num_params)
    for row in rows:
        row["reduction_vs_float32"] = float32 / row["bytes_per_step"] if row["bytes_per_step"] else None
    return {"float32_bytes_per_step": float32, "modes": rows, "config": dict(config, num_params=num_params)}


def print_table(result: dict, out: Any) -> None:
    cfg = result["config"]
    rates = cfg["mbit"]
    print(f"charlm, {cfg['peers']} peers, {cfg['samples']} samples per mode, H = {cfg['inner_steps']}, "
          f"{cfg['rtt_ms']:g} ms RTT; float32 would send {result['float32_bytes_per_step'] / 1e6:.3f} MB "
          f"per peer per outer step", file=out)
    head = f"{'mode':<18} {'codec':<11} {'bytes/step':>11} {'vs fp32':>8} {'held-out':>9}"
    for m in rates:
        head += f" {'wall ' + format(m, 'g') + 'M':>9} {'util':>6} {'cpu':>6}"
    print(head, file=out)
    for r in result["modes"]:
        line = (f"{r['mode']:<18} {r['compression']:<11} {r['bytes_per_step']:>11.0f} "
                f"{r['reduction_vs_float32'] or 0:>7.1f}x {r['heldout_loss']:>9.4f}")
        for m in rates:
            tag = f"{m:g}mbit"
            line += (f" {r['wall_s_' + tag]:>8.1f}s {100 * r['utilisation_' + tag]:>5.1f}% "
                     f"{100 * r['utilisation_cpu_' + tag]:>5.1f}%")
        print(line, file=out)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["peer"]:
        return peer_main(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--modes", default=None, help=f"comma-separated (default: those of {','.join(DEFAULT_MODES)} "
                   "whose codec is available)")
    p.add_argument("--mbit", default="20,100", help="link rates in Mbit/s, one lab each (default 20,100)")
    p.add_argument("--samples", type=int, default=4096, help="samples per mode, all peers (default 4096)")
    p.add_argument("--inner-steps", type=int, default=16, help="H, inner steps per outer step (default 16)")
    p.add_argument("--matchmaking-time", type=float, default=10.0,
                   help="the Optimizer's (default 10 s): how long a round waits for the whole group (on a "
                   "loaded machine a peer can be seconds late; a group that starts without it costs it a round)")
    p.add_argument("--logs", default=None, help="keep the peers' logs in this directory (default: deleted)")
    p.add_argument("--json", action="store_true", help="print one JSON line with every figure")
    p.add_argument("--time-limit", type=float, default=1500, help="seconds for the whole run (default 1500)")
    args = p.parse_args(argv)
    from tests.netlab import unavailable

    reason = unavailable()
    if reason:
        print(f"error: {reason}", file=sys.stderr)
        return 2
    if args.modes is None:
        modes = []
        for mode in DEFAULT_MODES:
            try:
                mode_options(mode)
                modes.append(mode)
            except ValueError:
                print(f"note: mode {mode} skipped: its codec is not registered", file=sys.stderr)
    else:
        modes = [m for m in args.modes.split(",") if m]
    try:
        for mode in modes:
            mode_options(mode)
        rates = sorted({float(m) for m in args.mbit.split(",") if m})
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    per_peer_steps = args.samples // (BATCH * PEERS)
    if not modes or not rates or per_peer_steps < args.inner_steps or per_peer_steps % args.inner_steps:
        print(f"error: need modes, rates and --samples a positive multiple of {BATCH * PEERS * args.inner_steps} "
              "(whole outer steps)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGALRM, lambda *_: sys.exit("error: --time-limit reached"))
    signal.alarm(int(args.time_limit))
    started, load = time.monotonic(), os.getloadavg()
    per_rate = {}
    with tempfile.TemporaryDirectory(prefix="lowbw-") as tmp:
        logs = Path(args.logs) if args.logs else Path(tmp)
        logs.mkdir(parents=True, exist_ok=True)
        for mbit in rates:
            per_rate[mbit] = lab_run(mbit, modes, args.samples, args.inner_steps, logs, args.matchmaking_time)
    config = {"peers": PEERS, "samples": args.samples, "inner_steps": args.inner_steps, "batch": BATCH,
              "mbit": rates, "rtt_ms": 4 * ONE_WAY_MS, "outer_lr": OUTER_LR, "outer_momentum": OUTER_MOMENTUM,
              "streaming_fragments": STREAMING_FRAGMENTS, "wall_s": time.monotonic() - started,
              "loadavg": {"start": load, "end": os.getloadavg()}}
    result = build_result(per_rate, modes, config)
    print_table(result, sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
