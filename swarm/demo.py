"""``swarm demo``: a local swarm on loopback that trains a real model, then a summary and a plot.

Starts ``swarm dht`` (the bootstrap peer) and ``--peers`` ``swarm join`` processes on 127.0.0.1, each
on its own data shard (``--shard i/N``) and identity, all writing per-epoch metrics (JSON lines) and
logs into ``--out``. The default task is the packaged ``swarm.examples.digits:task``, so the demo runs
from any directory. Every peer stops when the task's target is met (``--stop-at-target``); the demo
waits for them (at most ``--max-seconds``), stops whatever is left, prints the summary (final
held-out metrics, time, epochs, bytes exchanged) and writes ``loss_curves.png``.

Exit codes: 0 the target was reached (or the task has none and no peer failed), 1 it was not (or a
peer failed), 2 bad arguments, a task that does not load or missing demo extras (matplotlib,
scikit-learn), 130 interrupted (Ctrl-C, SIGTERM or SIGHUP: the peers are stopped, they leave cleanly).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["run_demo", "DEFAULT_TASK", "DEMO_EXTRAS", "missing_demo_modules"]

DEFAULT_TASK = "swarm.examples.digits:task"  # shipped in the package: works from any directory
DEMO_EXTRAS = "install the demo extras: pip install 'swarm-training[demo]'"


def missing_demo_modules(default_task: bool) -> list[str]:
    """The demo extras that are not installed: matplotlib (the plot), scikit-learn (the digits data)."""
    needed = {"matplotlib": "matplotlib"}
    if default_task:
        needed["sklearn"] = "scikit-learn"
    missing = []
    for module, name in needed.items():
        try:
            importlib.import_module(module)  # (not just find_spec: a broken install counts as missing)
        except ImportError:
            missing.append(name)
    return missing


def plural(n: int, word: str) -> str:
    """``1 peer``, ``2 peers``."""
    return f"{n} {word}" + ("" if n == 1 else "s")


class _Interrupted(Exception):
    pass


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
    fig.suptitle("swarm demo: collaborative training on loopback"
                 + (f" (target {target[0]} {target[1]})" if target else ""))
    fig.tight_layout()
    path = out / "loss_curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run_demo(args: argparse.Namespace) -> int:
    if args.peers < 1:
        print(f"error: --peers must be at least 1, got {args.peers}", file=sys.stderr)
        return 2
    if not args.max_seconds > 0:
        print(f"error: --max-seconds must be positive, got {args.max_seconds:g}", file=sys.stderr)
        return 2
    task_ref = args.task or DEFAULT_TASK
    missing = missing_demo_modules(default_task=args.task is None)
    if missing:
        print(f"error: swarm demo needs {' and '.join(missing)}: {DEMO_EXTRAS}", file=sys.stderr)
        return 2
    from .progress_bar import ProgressBar, format_seconds
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
    interrupted: list[str] = []

    def on_signal(signum, _frame) -> None:
        interrupted.append(signal.Signals(signum).name)
        raise _Interrupted

    previous = {}
    for sig in ("SIGINT", "SIGTERM", "SIGHUP"):
        if hasattr(signal, sig):
            try:
                previous[sig] = signal.signal(getattr(signal, sig), on_signal)
            except (ValueError, OSError):  # not the main thread
                pass
    failed: list[int] = []
    peers: list[subprocess.Popen] = []
    try:
        boot_log = out / "bootstrap.log"
        boot = _start(swarm_cmd + ["dht", "--host", "127.0.0.1", "--report-interval", "3600",
                                   "--no-reachability-check"], boot_log)  # loopback: nothing to find out
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
                               "--matchmaking-time", "1.0", "--no-reachability-check"]
            if task.target is not None:
                cmd.append("--stop-at-target")
            peers.append(_start(cmd, out / f"peer{i}.log"))
            procs.append(peers[-1])
            if i == 0:
                time.sleep(2.0)  # the first peer creates the run; the others join it
        print(f"{plural(args.peers, 'peer')} training {task.name} (run {run_id}); logs in {out}/", flush=True)
        # one line redrawn on a terminal, a plain line every 5 s otherwise: bytes exchanged by all peers,
        # their rate, the epochs, the latest evaluation and the time left at most (--max-seconds)
        bar = ProgressBar("  exchanged", stream=sys.stdout, interval=4.0)
        try:
            last_read = 0.0
            while any(p.poll() is None for p in peers) and time.monotonic() - started < args.max_seconds + 30:
                time.sleep(0.5)
                if time.monotonic() - last_read < (1.0 if bar.tty else 5.0):
                    continue
                last_read = time.monotonic()
                metrics = [_read_metrics(out / f"peer{i}.jsonl") for i in range(args.peers)]
                epochs = [m[-1]["epoch"] if m else 0 for m in metrics]
                evals = [r["eval"] for m in metrics for r in m if "eval" in r]
                shown = ", ".join(f"{k} {v:.3f}" for k, v in evals[-1].items()) if evals else "not evaluated yet"
                exchanged = sum(m[-1]["bytes_sent"] + m[-1]["bytes_received"] for m in metrics if m)
                elapsed = time.monotonic() - started
                left = args.max_seconds - elapsed
                bar.update(exchanged, f"{elapsed:.0f} s | epochs {epochs} | latest evaluation: {shown}" +
                           (f" | at most {format_seconds(left)} left" if left >= 1 else ""))
        finally:
            bar.close(ok=not interrupted)
        failed = [i for i, p in enumerate(peers) if p.poll() not in (None, 0)]
        if any(p.poll() in (130, -signal.SIGINT, -signal.SIGTERM) for p in peers):
            interrupted.append("a signal to the peers")  # e.g. Ctrl-C reached the peers' process group first
    except _Interrupted:
        pass
    finally:
        try:
            for sig in previous:  # a second Ctrl-C while the peers leave would not wait for them
                signal.signal(getattr(signal, sig), signal.SIG_IGN)
            _stop(procs)
        finally:
            for sig, handler in previous.items():
                signal.signal(getattr(signal, sig), handler)
    if interrupted:
        print(f"\ninterrupted ({interrupted[0]}): the peers were stopped and left the swarm; logs in {out}/",
              file=sys.stderr, flush=True)
        return 130
    elapsed = time.monotonic() - started
    metrics = [_read_metrics(out / f"peer{i}.jsonl") for i in range(args.peers)]
    final_evals = [next((r["eval"] for r in reversed(m) if "eval" in r), None) for m in metrics]
    reached = [e is not None and task.target_reached(e) for e in final_evals]
    total_bytes = sum((m[-1]["bytes_sent"] + m[-1]["bytes_received"]) for m in metrics if m)
    plot = _plot(out, metrics, t0, task.target)
    print("\nsummary")
    for i, (m, final) in enumerate(zip(metrics, final_evals)):
        shown = ", ".join(f"{k} {v:.4f}" for k, v in (final or {}).items())
        print(f"  peer {i}: epoch {m[-1]['epoch'] if m else 0}, {shown or 'no evaluation'}")
    print(f"  time {elapsed:.1f} s, {total_bytes / 1e6:.2f} MB exchanged by all peers (sent + received)")
    for i in failed:
        print(f"  peer {i} exited with an error (exit code {peers[i].returncode}); see {out}/peer{i}.log")
    print(f"  plot: {plot.resolve()}")
    if task.target is None:
        return 0 if not failed else 1
    ok = any(reached)
    print(f"target {task.target[0]} {'>=' if task.target[0].startswith('acc') else '<='} {task.target[1]}: "
          f"{'reached' if ok else 'NOT reached'}")
    return 0 if ok else 1
