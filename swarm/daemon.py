"""The peer daemon behind ``swarm join``: load a task, join (or create) its run, train until stopped.

Steps, each with a clear message when it fails (exit codes: 2 bad task, 3 run/task mismatch,
4 network, 5 checkpoint, 130 interrupted):

1. load the task (:func:`swarm.task.load_task`) and hash its code;
2. start a DHT peer and join through ``--initial-peers``;
3. find the run's announcement: none -> this peer creates the run and says so; otherwise refuse to go
   on if the announced task hash differs from ours;
4. build the model (seeded by the run id, so all peers start from the same parameters) and the
   :class:`swarm.Optimizer`; resume from the newest checkpoint in ``--checkpoint-dir`` if any; then
   download the swarm's state if the swarm is ahead;
5. train: a live progress line, evaluation every ``task.eval_every`` epochs, checkpoints every
   ``--checkpoint-every`` epochs and on exit; stop on Ctrl-C/SIGTERM, ``--max-epochs``,
   ``--max-seconds`` or (``--stop-at-target``) when the task's target is met.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["run_join", "default_identity_path", "add_join_arguments"]

logger = logging.getLogger("swarm.join")

EXIT_TASK, EXIT_RUN, EXIT_NETWORK, EXIT_CHECKPOINT = 2, 3, 4, 5


def default_identity_path() -> Path:
    """The daemon's persistent identity: ``$SWARM_HOME`` or the user's config directory."""
    if os.environ.get("SWARM_HOME"):
        base = Path(os.environ["SWARM_HOME"])
    elif sys.platform == "win32":
        base = Path(os.environ.get("APPDATA", Path.home())) / "swarm"
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support" / "swarm"
    else:
        base = Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config")) / "swarm"
    return base / "identity.key"


def add_join_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("task", help="task file (attribute `task`), file.py:ATTR, or package.module:ATTR")
    p.add_argument("--run-id", default=None, help="run to join or create (default: the task's name)")
    p.add_argument("--initial-peers", nargs="*", default=[], metavar="ADDR",
                   help="peers already in the swarm, as /ip4/HOST/tcp/PORT/p2p/PEERID (none: start a new swarm)")
    p.add_argument("--identity", default=None, metavar="PATH",
                   help=f"Ed25519 key file (created 0600 if missing; default: {default_identity_path()}, "
                        "or $SWARM_HOME/identity.key)")
    p.add_argument("--checkpoint-dir", default=None, metavar="DIR",
                   help="save checkpoints here and resume from the newest one on restart")
    p.add_argument("--checkpoint-every", type=int, default=5, help="epochs between checkpoints (default 5)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to train (default cpu)")
    p.add_argument("--batch-size", type=int, default=None, help="samples per local step (default: the task's)")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    p.add_argument("--port", type=int, default=0, help="TCP port (default 0: any free port)")
    p.add_argument("--client-mode", action="store_true", help="do not accept inbound connections (behind NAT)")
    p.add_argument("--bandwidth", type=float, default=None, metavar="MBPS",
                   help="announced bandwidth in MB/s for load balancing (default: measured)")
    p.add_argument("--max-epochs", type=int, default=None, help="stop when the swarm reaches this epoch")
    p.add_argument("--max-seconds", type=float, default=None, help="stop after this many seconds")
    p.add_argument("--stop-at-target", action="store_true", help="stop once the task's target metric is met")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="train on data shard I of N (default: a shard picked from this peer's id out of 1)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: min(4, CPU count))")
    p.add_argument("--matchmaking-time", type=float, default=None, help="seconds to wait for a group (default 3)")
    p.add_argument("--metrics-file", default=None, metavar="PATH",
                   help="append one JSON line per epoch (time, epoch, loss, evaluation, bytes) to PATH")
    p.add_argument("--quiet", action="store_true", help="no live progress line")


class _Fatal(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def run_join(args: argparse.Namespace) -> int:
    stop = threading.Event()
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, lambda *_: stop.set())
        except (ValueError, OSError):  # not the main thread, or unsupported
            pass
    try:
        return _join(args, stop)
    except _Fatal as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return e.code
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _join(args: argparse.Namespace, stop: threading.Event) -> int:
    from .task import TaskLoadError, load_task, task_code_hash

    try:
        task = load_task(args.task)
        code_hash = task_code_hash(args.task, task)
    except TaskLoadError as e:
        raise _Fatal(EXIT_TASK, str(e)) from None
    import torch

    threads = args.threads or min(4, os.cpu_count() or 1)
    torch.set_num_threads(threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise _Fatal(EXIT_TASK, "--device cuda was asked for, but torch sees no CUDA device")
    device = torch.device(args.device)
    run_id = args.run_id or task.name
    identity = Path(args.identity or default_identity_path())
    lock = _lock_identity(identity)
    try:
        return _join_with_identity(args, stop, task, code_hash, identity, run_id, device)
    finally:
        lock.unlink(missing_ok=True)


def _lock_identity(identity: Path) -> Path:
    """Two daemons with one identity would be one PeerID twice: refuse while another live process holds it."""
    import psutil

    lock = identity.with_name(identity.name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and pid != os.getpid() and psutil.pid_exists(pid):
                raise _Fatal(EXIT_TASK, f"identity {identity} is in use by another swarm process (PID {pid}); "
                                        "give this peer its own --identity PATH") from None
            lock.unlink(missing_ok=True)  # stale: its process is gone
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return lock
    raise _Fatal(EXIT_TASK, f"cannot lock identity {identity} ({lock})")


def _join_with_identity(args, stop, task, code_hash, identity, run_id, device) -> int:
    import torch

    from dht import DHT, P2PError

    from .checkpoint import CheckpointError, latest_checkpoint, save_checkpoint
    from .optimizer import Optimizer
    from .runs import RunAnnouncement, RunAnnouncer, announce_run, find_run

    try:
        dht = DHT(initial_peers=args.initial_peers, host=args.host, port=args.port, identity_path=identity,
                  client_mode=args.client_mode)
    except (P2PError, OSError, ValueError) as e:
        raise _Fatal(EXIT_NETWORK, f"could not join the swarm: {e}") from None
    announcer = opt = None
    try:
        print(f"peer {dht.peer_id}" + ("" if args.client_mode else " reachable at:"), flush=True)
        for address in dht.get_visible_addresses():
            print(f"  {address}", flush=True)
        announcement = find_run(dht, run_id)
        if announcement is None:
            announcement = RunAnnouncement(run_id, args.task, code_hash, str(dht.peer_id), time.time(),
                                           task.target_batch_size, dict(task.hyperparameters))
            announce_run(dht, announcement)
            announcer = RunAnnouncer(dht, announcement)
            print(f"run {run_id!r} is new: this peer created it (task {args.task}, code {code_hash[:12]})", flush=True)
        elif announcement.task_hash != code_hash:
            raise _Fatal(EXIT_RUN, f"run {run_id!r} was announced with task code {announcement.task_hash[:12]} "
                                   f"(task {announcement.task!r}), but {args.task} hashes to {code_hash[:12]}: "
                                   "refusing to train different code in the same run")
        else:
            print(f"joining run {run_id!r} created by {announcement.creator} (task code {code_hash[:12]} matches)",
                  flush=True)
            if announcement.creator == str(dht.peer_id):
                announcer = RunAnnouncer(dht, announcement)

        seed = int.from_bytes(hashlib.sha256(run_id.encode()).digest()[:4], "little")
        torch.manual_seed(seed)  # every peer of the run starts from the same parameters
        model = task.model().to(device)
        options: dict[str, Any] = dict(task.optimizer_options)
        if args.matchmaking_time is not None:
            options["matchmaking_time"] = args.matchmaking_time
        opt = Optimizer(dht=dht, run_id=run_id, optimizer=task.optimizer, params=model.parameters(),
                        target_batch_size=task.target_batch_size, batch_size_per_step=args.batch_size or task.batch_size,
                        client_mode=args.client_mode, bandwidth=args.bandwidth, **options)

        if args.checkpoint_dir:
            try:
                found = latest_checkpoint(args.checkpoint_dir, run_id)
                if found is not None:
                    opt.load_training_state(found[1])
                    print(f"resumed from checkpoint {found[0]} (epoch {opt.local_epoch})", flush=True)
            except (CheckpointError, ValueError, RuntimeError, KeyError) as e:
                raise _Fatal(EXIT_CHECKPOINT, f"cannot resume from {args.checkpoint_dir}: {e} (move the file away "
                                              "to start without it)") from None
        progress = opt.tracker.refresh()
        if progress.epoch > opt.local_epoch:
            print(f"the swarm is at epoch {progress.epoch}: downloading its state...", flush=True)
            if opt.load_state_from_peers():
                print(f"downloaded the swarm's state; joining at epoch {opt.local_epoch}", flush=True)

        if args.shard:
            try:
                shard, num_shards = (int(v) for v in args.shard.split("/"))
                assert 0 <= shard < num_shards
            except (ValueError, AssertionError):
                raise _Fatal(EXIT_TASK, f"--shard must be I/N with 0 <= I < N, got {args.shard!r}") from None
        else:
            shard, num_shards = 0, 1
        data_seed = int.from_bytes(hashlib.sha256(dht.peer_id.raw).digest()[:4], "little")
        return _train(args, task, model, opt, dht, stop, device, shard, num_shards, data_seed, run_id, save_checkpoint)
    finally:
        if opt is not None:
            opt.shutdown()
        if announcer is not None:
            announcer.shutdown()
        dht.shutdown()


def _train(args, task, model, opt, dht, stop, device, shard, num_shards, data_seed, run_id, save_checkpoint) -> int:
    import torch

    started = time.monotonic()
    metrics_file = open(args.metrics_file, "a", buffering=1) if args.metrics_file else None
    batches = task.batches(shard, num_shards, args.batch_size, data_seed)
    last_line = 0.0
    last_eval: dict = {}
    last_checkpoint_epoch = opt.local_epoch
    reason = "stopped"

    def to_device(batch):
        if isinstance(batch, torch.Tensor):
            return batch.to(device)
        if isinstance(batch, (list, tuple)):
            return type(batch)(to_device(b) for b in batch)
        return batch

    def checkpoint() -> None:
        nonlocal last_checkpoint_epoch
        if args.checkpoint_dir and opt.local_epoch > 0:
            path = save_checkpoint(args.checkpoint_dir, run_id, opt.local_epoch, opt.training_state_blob())
            last_checkpoint_epoch = opt.local_epoch
            logger.info("checkpoint %s", path)

    try:
        while not stop.is_set():
            batch = to_device(next(batches))
            model.train()
            loss = task.loss(model, batch)
            if not torch.isfinite(loss):
                logger.warning("non-finite loss %s at epoch %d: skipping this batch", float(loss), opt.local_epoch)
                opt.zero_grad()
                continue
            loss.backward()
            ended = opt.step(batch_size=task.samples_in(batch), loss=loss)
            opt.zero_grad()
            if ended:
                record = {"time": time.time(), "epoch": opt.local_epoch, "loss": opt.last_loss,
                          "bytes_sent": opt.bytes_sent, "bytes_received": opt.bytes_received,
                          "peers": opt.global_progress.num_peers}
                if task.evaluate is not None and opt.local_epoch % max(task.eval_every, 1) == 0:
                    model.eval()
                    last_eval = task.evaluate(model)
                    record["eval"] = last_eval
                    logger.info("epoch %d: %s", opt.local_epoch, last_eval)
                if metrics_file is not None:
                    metrics_file.write(json.dumps(record) + "\n")
                if opt.local_epoch - last_checkpoint_epoch >= args.checkpoint_every:
                    checkpoint()
                if args.stop_at_target and last_eval and task.target_reached(last_eval):
                    reason = f"target reached ({task.target[0]} {last_eval[task.target[0]]:.4f})"
                    break
                if args.max_epochs is not None and opt.local_epoch >= args.max_epochs:
                    reason = f"reached --max-epochs {args.max_epochs}"
                    break
            if args.max_seconds is not None and time.monotonic() - started > args.max_seconds:
                reason = f"ran --max-seconds {args.max_seconds:g}"
                break
            if not args.quiet and time.monotonic() - last_line > 2.0:
                last_line = time.monotonic()
                g = opt.global_progress
                line = (f"epoch {opt.local_epoch} | loss {opt.last_loss:.4f} | {opt.samples_per_second:.0f} samples/s here, "
                        f"{g.samples_per_second:.0f} in the swarm | {g.num_peers} peers online")
                if last_eval:
                    line += " | " + ", ".join(f"{k} {v:.3f}" for k, v in last_eval.items() if isinstance(v, float))
                print(line, flush=True)
        else:
            reason = "interrupted: leaving the swarm"
    finally:
        try:
            checkpoint()
        finally:
            if metrics_file is not None:
                metrics_file.close()
    print(f"{reason}; epoch {opt.local_epoch}, {(opt.bytes_sent + opt.bytes_received) / 1e6:.1f} MB exchanged", flush=True)
    return 130 if reason.startswith("interrupted") else 0
