"""``swarm demo``: a local swarm on loopback that trains a real model, then a summary and a plot.

Starts ``swarm dht`` (the bootstrap peer) and ``--peers`` ``swarm join`` processes on 127.0.0.1, each
on its own data shard and identity, all writing per-epoch metrics (JSON lines) and logs into
``--out``. Every peer stops when the task's target is met (``--stop-at-target``); the demo waits for
them (at most ``--max-seconds``), stops whatever is left, prints the summary (final held-out
metrics, time, epochs, bytes exchanged) and writes ``loss_curves.png``. Exit code 0 only if the
target was reached.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["run_demo", "find_default_task"]


def find_default_task() -> Path | None:
    """``examples/digits.py`` next to the working directory or next to this source checkout."""
    for base in (Path.cwd(), Path(__file__).resolve().parent.parent):
        candidate = base / "examples" / "digits.py"
        if candidate.is_file():
            return candidate
    return None


def _start(cmd: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)


def _wait_for_line(log: Path, prefix: str, proc: subprocess.Popen, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in log.read_text().splitlines():
            if line.strip().startswith(prefix):
                return line.strip()[len(prefix):].strip()
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    raise RuntimeError(f"the bootstrap peer did not start (see {log}):\n{log.read_text()[-2000:]}")


def _read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line being written right now
    return records


def _stop(procs: list[subprocess.Popen], grace: float = 15.0) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _plot(out: Path, metrics: list[list[dict]], t0: float, target: tuple[str, float] | None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for i, records in enumerate(metrics):
        train = [(r["time"] - t0, r["loss"]) for r in records if r.get("loss") is not None]
        if train:
            left.plot(*zip(*train), label=f"peer {i}", linewidth=1)
        evals = [(r["time"] - t0, r["eval"]["loss"]) for r in records if "eval" in r and "loss" in r["eval"]]
        if evals:
            right.plot(*zip(*evals), marker=".", label=f"peer {i}", linewidth=1)
    left.set(xlabel="seconds", ylabel="training loss (latest batch)", title="training loss per peer", yscale="log")
    right.set(xlabel="seconds", ylabel="held-out loss", title="held-out loss per peer", yscale="log")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("swarm demo: collaborative training on loopback" + (f" (target {target[0]} {target[1]})" if target else ""))
    fig.tight_layout()
    path = out / "loss_curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run_demo(args: argparse.Namespace) -> int:
    task_ref = args.task or (str(find_default_task()) if find_default_task() else None)
    if task_ref is None:
        print("error: no --task given and examples/digits.py not found (run from the repository root)", file=sys.stderr)
        return 2
    from .task import TaskLoadError, load_task

    try:
        task = load_task(task_ref)
    except TaskLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for old in list(out.glob("peer*.jsonl")) + list(out.glob("*.log")):
        old.unlink()
    run_id = f"demo-{task.name}-{int(time.time())}"
    swarm_cmd = [sys.executable, "-m", "swarm"]
    procs: list[subprocess.Popen] = []
    t0 = time.time()
    started = time.monotonic()
    try:
        boot_log = out / "bootstrap.log"
        boot = _start(swarm_cmd + ["dht", "--host", "127.0.0.1", "--report-interval", "3600"], boot_log)
        procs.append(boot)
        address = _wait_for_line(boot_log, "--initial-peers", boot, timeout=30)
        print(f"bootstrap peer: {address}", flush=True)
        threads = max(1, (os.cpu_count() or 1) // args.peers)
        peers = []
        for i in range(args.peers):
            cmd = swarm_cmd + ["--log-level", "INFO", "join", task_ref, "--run-id", run_id, "--initial-peers", address,
                               "--host", "127.0.0.1", "--identity", str(out / f"peer{i}.key"), "--shard",
                               f"{i}/{args.peers}", "--threads", str(threads), "--metrics-file",
                               str(out / f"peer{i}.jsonl"), "--max-seconds", str(args.max_seconds), "--quiet",
                               "--matchmaking-time", "1.0"]
            if task.target is not None:
                cmd.append("--stop-at-target")
            peers.append(_start(cmd, out / f"peer{i}.log"))
            procs.append(peers[-1])
            if i == 0:
                time.sleep(2.0)  # the first peer creates the run; the others join it
        print(f"{args.peers} peers training {task.name} (run {run_id}); logs in {out}/", flush=True)
        last_print = 0.0
        while any(p.poll() is None for p in peers) and time.monotonic() - started < args.max_seconds + 30:
            time.sleep(0.5)
            if time.monotonic() - last_print > 5:
                last_print = time.monotonic()
                metrics = [_read_metrics(out / f"peer{i}.jsonl") for i in range(args.peers)]
                epochs = [m[-1]["epoch"] if m else 0 for m in metrics]
                evals = [r["eval"] for m in metrics for r in m if "eval" in r]
                shown = ", ".join(f"{k} {v:.3f}" for k, v in evals[-1].items()) if evals else "not evaluated yet"
                print(f"  {time.monotonic() - started:5.0f} s | epochs {epochs} | latest evaluation: {shown}", flush=True)
        failed = [i for i, p in enumerate(peers) if p.poll() not in (None, 0)]
    finally:
        _stop(procs)
    elapsed = time.monotonic() - started
    metrics = [_read_metrics(out / f"peer{i}.jsonl") for i in range(args.peers)]
    final_evals = [next((r["eval"] for r in reversed(m) if "eval" in r), None) for m in metrics]
    reached = [e is not None and task.target_reached(e) for e in final_evals]
    total_bytes = sum((m[-1]["bytes_sent"] + m[-1]["bytes_received"]) for m in metrics if m)
    plot = _plot(out, metrics, t0, task.target)
    print("\nsummary")
    for i, (m, e) in enumerate(zip(metrics, final_evals)):
        shown = ", ".join(f"{k} {v:.4f}" for k, v in (e or {}).items())
        print(f"  peer {i}: epoch {m[-1]['epoch'] if m else 0}, {shown or 'no evaluation'}")
    print(f"  time {elapsed:.1f} s, {total_bytes / 1e6:.2f} MB exchanged by all peers (sent + received)")
    for i in failed:
        print(f"  peer {i} exited with an error; see {out}/peer{i}.log")
    print(f"  plot: {plot.resolve()}")
    if task.target is None:
        return 0 if not failed else 1
    ok = any(reached)
    print(f"target {task.target[0]} {'>=' if task.target[0].startswith('acc') else '<='} {task.target[1]}: "
          f"{'reached' if ok else 'NOT reached'}")
    return 0 if ok else 1
