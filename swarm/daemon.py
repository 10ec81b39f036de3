"""The peer daemon behind ``swarm join``: load a task, join (or create) its run, train until stopped.

Steps, each with a clear message when it fails (exit codes, :mod:`swarm.exitcodes`: 2 bad task or
arguments, 3 run/task mismatch, 4 network, 5 checkpoint, 6 local setup: port in use, identity file
unusable or in use, 130 interrupted):

1. load the task (:func:`swarm.task.load_task`), hash its code and check the arguments;
2. build the model (seeded by the run id, so all peers start from the same parameters) and run one
   batch through ``data``, the model, ``loss`` and ``optimizer`` ("task error in loss(): ..."),
   all before any networking;
3. start a DHT peer and join through ``--initial-peers`` (Ctrl-C is honoured at once while waiting);
   serve the dashboard on its event loop (:mod:`swarm.dashboard`: ``--dashboard-port``, URL printed);
4. find the run's announcement: none -> this peer creates the run and says so; otherwise refuse to go
   on (one line per field) if the announced task hash or a pinned setting differs from ours: the
   task attribute, the optimizer mode and options (:data:`swarm.optimizer.PINNED_OPTIONS`), the
   task's ``batch_size`` and ``target_batch_size``, and the hyperparameters;
5. build the :class:`swarm.Optimizer`; resume from the newest checkpoint in ``--checkpoint-dir`` if
   any; then download the swarm's state from a live donor if the swarm is ahead (retried for a while
   rather than starting at epoch 0 while live donors exist);
6. train: a live progress line, evaluation every ``task.eval_every`` epochs, checkpoints every
   ``--checkpoint-every`` epochs and on exit; stop on Ctrl-C/SIGTERM/SIGHUP, ``--max-epochs``,
   ``--max-seconds`` or (``--stop-at-target``) when the task's target is met. Every way out
   announces the departure (progress record, state announcement), so the others do not wait for it.

Without ``--threads``, torch gets ``max(1, cores // local swarm peers)`` threads
(:mod:`swarm.local_peers`), re-checked every ``THREADS_RECHECK`` seconds while training.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

__all__ = ["run_join", "default_identity_path", "add_join_arguments"]

logger = logging.getLogger("swarm.join")

EXIT_TASK, EXIT_RUN, EXIT_NETWORK, EXIT_CHECKPOINT, EXIT_LOCAL = 2, 3, 4, 5, 6
EXIT_INTERRUPTED = 130
THREADS_RECHECK = 10.0  # seconds between two counts of the local peers (default --threads only)
VERIFY_DEFAULT = 1 / 16  # --verify without a value: verification.validator.DEFAULT_PROBABILITY
CATCH_UP_PATIENCE = 30.0  # seconds a joiner keeps trying live donors before it trains from its own epoch
# options the daemon sets itself (a task's optimizer_options must not)
_DAEMON_OPTIONS = ("target_batch_size", "batch_size_per_step", "client_mode", "bandwidth")


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
    from .cli import add_announce_argument
    add_announce_argument(p)
    from .nat_cli import add_nat_arguments
    add_nat_arguments(p)
    p.add_argument("--bandwidth", type=float, default=None, metavar="MB/S",
                   help="announced bandwidth in megabytes per second (MB/s, not Mbit/s) for load balancing "
                        "(default: measured)")
    p.add_argument("--max-epochs", type=int, default=None, help="stop when the swarm reaches this epoch")
    p.add_argument("--max-seconds", type=float, default=None, help="stop after this many seconds")
    p.add_argument("--stop-at-target", action="store_true", help="stop once the task's target metric is met")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="train on data shard I of N (default 0/1: all the data, in an order shuffled by this "
                        "peer's id; give each peer its own I/N to split the data)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: the CPU cores divided among the swarm peers on this machine)")
    p.add_argument("--matchmaking-time", type=float, default=None, help="seconds to wait for a group (default 3)")
    p.add_argument("--metrics-file", default=None, metavar="PATH",
                   help="append one JSON line per epoch (time, epoch, loss, evaluation, bytes) to PATH")
    p.add_argument("--quiet", action="store_true", help="no live progress line")
    p.add_argument("--verify", nargs="?", type=float, const=VERIFY_DEFAULT, default=None, metavar="P",
                   help="verify gradients (sync mode): each round a member is recomputed by another with "
                        f"probability P (default {VERIFY_DEFAULT:g}: 1/16 extra compute); liars are banned. "
                        "Pinned by the run: all its peers must give the same P")
    p.add_argument("--byzantine", default=None, metavar="ATTACK",
                   help="TESTING ONLY: attack the run (an attack of averaging.attacks, label_flip or "
                        "wrong_aggregate)")
    from .dashboard.options import add_dashboard_arguments
    add_dashboard_arguments(p)
    from .pipeline.roles import add_pipeline_arguments  # --role, --stage, --max-memory, --rebalance-period
    add_pipeline_arguments(p)


class _Fatal(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


class _Interrupted(Exception):
    """A signal arrived while the daemon waited on the network before training."""


class _Signals:
    """SIGINT/SIGTERM/SIGHUP set ``stop`` (the training loop ends at the next step); inside
    :meth:`interruptible` (blocking network waits before training) they also raise at once."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self._raise = False

    def handle(self, signum: int, _frame: Any) -> None:
        self.stop.set()
        if self._raise:
            self._raise = False  # once: the cleanup that follows runs undisturbed
            raise _Interrupted(signal.Signals(signum).name)

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        if self.stop.is_set():
            raise _Interrupted("signal")
        self._raise = True
        try:
            yield
        finally:
            self._raise = False


def run_join(args: argparse.Namespace) -> int:
    signals = _Signals()
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is None:
            continue
        try:
            previous[sig] = signal.signal(sig, signals.handle)
        except (ValueError, OSError):  # not the main thread, or unsupported
            pass
    try:
        return _join(args, signals)
    except _Fatal as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return e.code
    except _Interrupted:
        print("interrupted: left before training started", flush=True)
        return EXIT_INTERRUPTED
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _parse_arguments(args: argparse.Namespace) -> tuple[int, int]:
    """Check the numeric arguments before anything else happens; returns (shard, num_shards)."""
    def bad(message: str) -> _Fatal:
        return _Fatal(EXIT_TASK, message)

    if args.shard:
        try:
            shard, num_shards = (int(v) for v in args.shard.split("/"))
        except ValueError:
            raise bad(f"--shard must be I/N with 0 <= I < N, got {args.shard!r}") from None
        if not 0 <= shard < num_shards:
            raise bad(f"--shard must be I/N with 0 <= I < N, got {args.shard!r}")
    else:
        shard, num_shards = 0, 1
    for name, minimum in (("batch_size", 1), ("threads", 1), ("checkpoint_every", 1), ("max_epochs", 0)):
        value = getattr(args, name, None)
        if value is not None and value < minimum:
            raise bad(f"--{name.replace('_', '-')} must be at least {minimum}, got {value}")
    verify = getattr(args, "verify", None)
    if verify is not None and not 0.0 <= verify <= 1.0:
        raise bad(f"--verify must be a probability in [0, 1], got {verify:g}")
    if getattr(args, "byzantine", None) is not None:
        from verification.byzantine import attack_names

        if args.byzantine not in attack_names():
            raise bad(f"--byzantine: unknown attack {args.byzantine!r}; known: {', '.join(attack_names())}")
    for name in ("max_seconds", "matchmaking_time", "bandwidth"):
        value = getattr(args, name, None)
        if value is not None and not value > 0:
            raise bad(f"--{name.replace('_', '-')} must be positive, got {value:g}")
    return shard, num_shards


def _optimizer_options(task: Any, args: argparse.Namespace) -> tuple[dict, dict]:
    """(options for :class:`swarm.Optimizer`, the pinned ones) from the task and the arguments."""
    from .optimizer import pinned_options

    options: dict[str, Any] = dict(task.optimizer_options)
    reserved = sorted(set(options) & set(_DAEMON_OPTIONS))
    if reserved:
        raise _Fatal(EXIT_TASK, f"task error in optimizer_options: {', '.join(map(repr, reserved))} is set by "
                                "swarm join itself (from the Task's fields and the command line)")
    if args.matchmaking_time is not None:
        options["matchmaking_time"] = args.matchmaking_time
    if getattr(task, "scheduler", None) is not None:
        options["scheduler"] = task.scheduler  # Task.__post_init__ refuses it in optimizer_options too
    try:
        pinned = pinned_options(options)
    except TypeError as e:
        raise _Fatal(EXIT_TASK, f"task error in optimizer_options: {e}") from None
    if pinned["mode"] not in ("sync", "diloco"):
        raise _Fatal(EXIT_TASK, f"task error in optimizer_options: mode must be 'sync' or 'diloco', "
                                f"got {pinned['mode']!r}")
    return options, pinned


def _describe_error(e: BaseException) -> str:
    text = str(e)
    return f"{type(e).__name__}: {text[:500]}{'...' if len(text) > 500 else ''}"


def _to_device(batch: Any, device: Any) -> Any:
    from verification.recompute import to_device  # imports torch: not at module level (--help stays light)

    return to_device(batch, device)


def _check_task(task: Any, model: Any, device: Any, batch_size: int | None, shard: int, num_shards: int) -> None:
    """Run one batch through ``data``, the model, ``loss`` (with a backward pass) and ``optimizer``, on
    a copy of the model (the real one stays untouched): a task error shows before any networking."""
    import torch

    def fail(where: str, e: BaseException) -> _Fatal:
        return _Fatal(EXIT_TASK, f"task error in {where}: {_describe_error(e)}")

    try:
        trial = copy.deepcopy(model)
    except Exception:  # noqa: BLE001 - a model that cannot be copied: build another
        try:
            trial = task.model().to(device)
        except Exception as e:  # noqa: BLE001
            raise fail("model()", e) from None
    size = batch_size or task.batch_size
    batches = None
    try:
        batches = iter(task.data(shard, num_shards, size, 0))
        batch = next(batches)
    except StopIteration:
        raise _Fatal(EXIT_TASK, f"task error in data(): data({shard}, {num_shards}, {size}, seed) yielded no "
                                "batch") from None
    except Exception as e:  # noqa: BLE001 - the user's code: any error is reported
        raise fail("data()", e) from None
    finally:
        close = getattr(batches, "close", None)
        if callable(close):
            try:
                close()
            except Exception:  # the trial batch is in hand: a generator that fails to close is not fatal
                logger.debug("closing the trial data iterator failed", exc_info=True)
    batch = _to_device(batch, device)
    try:
        samples = task.samples_in(batch)
        if samples <= 0:
            raise ValueError(f"a batch holds {samples} samples")
    except Exception as e:  # noqa: BLE001
        raise fail("count_samples()" if task.count_samples is not None else "data() (counting a batch's samples)",
                   e) from None
    trial.train()
    try:
        loss = task.loss(trial, batch)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            got = f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise TypeError(f"loss() must return a scalar tensor, got {got}")
        if not loss.requires_grad:
            raise TypeError("the loss does not depend on the model's parameters (it has no gradient)")
        loss.backward()
    except Exception as e:  # noqa: BLE001
        raise fail("loss()", e) from None
    try:
        optimizer = task.optimizer(list(trial.parameters()))
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer() must return a torch.optim.Optimizer, got {type(optimizer).__name__}")
    except Exception as e:  # noqa: BLE001
        raise fail("optimizer()", e) from None
    del trial, optimizer, loss


def _choose_threads(args: argparse.Namespace, local: Any) -> int:
    import torch

    from .local_peers import available_cores, default_threads

    if args.threads is not None:
        threads = args.threads
        print(f"torch threads: {threads} (--threads)", flush=True)
    else:
        peers = local.count()
        threads = default_threads(peers)
        print(f"torch threads: {threads} ({available_cores()} CPU cores shared by {peers} local swarm "
              f"peer{'s' if peers != 1 else ''}; --threads N to choose)", flush=True)
    torch.set_num_threads(threads)
    return threads


def _join(args: argparse.Namespace, signals: _Signals) -> int:
    from .local_peers import LocalPeers
    from .task import TaskLoadError, load_task, split_task_ref, task_code_hash

    try:
        task = load_task(args.task)
        code_hash = task_code_hash(args.task, task)
    except TaskLoadError as e:
        raise _Fatal(EXIT_TASK, str(e)) from None
    shard, num_shards = _parse_arguments(args)
    if getattr(args, "byzantine", None) is not None:  # loudly, first thing: this daemon attacks its run
        from verification.byzantine import Byzantine

        Byzantine(args.byzantine).announce()
    options, pinned = _optimizer_options(task, args)
    if task.is_pipeline or getattr(args, "role", "trainer") == "server":  # swarm.pipeline.roles
        from .pipeline.roles import run_pipeline_role
        return run_pipeline_role(args, signals, task, code_hash, args.run_id or task.name, options, pinned, shard,
                                 num_shards)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise _Fatal(EXIT_TASK, "--device cuda was asked for, but torch sees no CUDA device")
    device = torch.device(args.device)
    run_id = args.run_id or task.name
    local = LocalPeers(default_identity_path().parent / "peers")
    try:
        _choose_threads(args, local)
        seed = int.from_bytes(hashlib.sha256(run_id.encode()).digest()[:4], "little")
        torch.manual_seed(seed)  # every peer of the run starts from the same parameters
        try:
            model = task.build_model().to(device)
        except Exception as e:  # noqa: BLE001 - the user's code
            raise _Fatal(EXIT_TASK, f"task error in model(): {_describe_error(e)}") from None
        _check_task(task, model, device, args.batch_size, shard, num_shards)
        settings = {"task attribute": split_task_ref(args.task)[1], "batch_size": task.batch_size,
                    "target_batch_size": task.target_batch_size,
                    **{f"optimizer {name}": value for name, value in pinned.items()}}
        if getattr(args, "verify", None) is not None:
            if pinned["mode"] != "sync" or pinned["compression"] not in (None, "none"):
                raise _Fatal(EXIT_TASK, "--verify needs a sync-mode task with exact averaging (compression None): "
                                        "it recomputes and hashes the gradients as sent")
            settings["verification"] = float(args.verify)  # pinned: every peer of the run verifies alike
        identity = Path(args.identity or default_identity_path())
        lock = _lock_identity(identity)
        try:
            return _join_with_identity(args, signals, task, code_hash, identity, run_id, device, model, options,
                                       settings, shard, num_shards, local)
        finally:
            lock.unlink(missing_ok=True)
    finally:
        local.close()


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
                raise _Fatal(EXIT_LOCAL, f"identity {identity} is in use by another swarm process (PID {pid}); "
                                        "give this peer its own --identity PATH") from None
            lock.unlink(missing_ok=True)  # stale: its process is gone
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return lock
    raise _Fatal(EXIT_LOCAL, f"cannot lock identity {identity} ({lock})")


def _join_with_identity(args, signals, task, code_hash, identity, run_id, device, model, options, settings,
                        shard, num_shards, local) -> int:
    from dht import DHT, P2PError

    from .checkpoint import CheckpointError, latest_checkpoint, save_checkpoint
    from .cli import parse_announce
    from .dashboard.server import close_for
    from .exitcodes import startup_error
    from .nat_cli import nat_options
    from .optimizer import Optimizer
    from .runs import RunAnnouncement, RunAnnouncer, announce_run, find_run, settings_differences
    from .status import PeerView

    try:
        with signals.interruptible():
            dht = DHT(initial_peers=args.initial_peers, host=args.host, port=args.port, identity_path=identity,
                      client_mode=args.client_mode, announce=parse_announce(args.announce_addr),
                      nat=nat_options(args))
    except (P2PError, OSError, ValueError) as e:
        raise _Fatal(*startup_error(e, args.host, args.port, identity)) from None
    announcer = opt = dashboard = None
    try:
        print(f"peer {dht.peer_id}" + ("" if args.client_mode else " reachable at:"), flush=True)
        for address in dht.get_visible_addresses():
            print(f"  {address}", flush=True)
        view = PeerView(role="trainer", run_id=run_id, target_batch_size=task.target_batch_size)
        dashboard = _start_dashboard(args, dht, view)
        with signals.interruptible():
            announcement = find_run(dht, run_id)
        if announcement is None:
            announcement = RunAnnouncement(run_id, args.task, code_hash, str(dht.peer_id), time.time(),
                                           task.target_batch_size, dict(task.hyperparameters), dict(settings))
            with signals.interruptible():
                announce_run(dht, announcement)
            announcer = RunAnnouncer(dht, announcement)
            print(f"run {run_id!r} is new: this peer created it (task {args.task}, code {code_hash[:12]})", flush=True)
        else:
            differences = settings_differences(announcement, args.task, code_hash, settings,
                                               dict(task.hyperparameters))
            if differences:
                raise _Fatal(EXIT_RUN, f"refusing to join run {run_id!r}: it differs from this peer in "
                                       f"{len(differences)} field{'s' if len(differences) != 1 else ''} (give this "
                                       "peer the run's task and settings, or another --run-id):\n  " +
                                       "\n  ".join(differences))
            print(f"joining run {run_id!r} created by {announcement.creator} (task code {code_hash[:12]} matches)",
                  flush=True)
            if announcement.settings:
                print(f"  and so do the run's {len(announcement.settings)} pinned settings", flush=True)
            if announcement.creator == str(dht.peer_id):
                announcer = RunAnnouncer(dht, announcement)

        byzantine = source = None
        common = dict(dht=dht, run_id=run_id, optimizer=task.optimizer, params=model.parameters(),
                      target_batch_size=task.target_batch_size, batch_size_per_step=args.batch_size or task.batch_size,
                      client_mode=args.client_mode, bandwidth=args.bandwidth, **options)
        if getattr(args, "byzantine", None) is not None:
            from verification.byzantine import Byzantine

            byzantine = Byzantine(args.byzantine, seed=int.from_bytes(dht.peer_id.raw[-4:], "little"))
            print(f"attacking with {args.byzantine!r} (--byzantine)", file=sys.stderr, flush=True)
        if getattr(args, "verify", None) is not None:
            from verification.recompute import EpochBatches

            from .verified import VerifiedOptimizer

            source = EpochBatches(task, run_id, dht.peer_id, shard, num_shards, args.batch_size or task.batch_size)
            made: Optimizer = VerifiedOptimizer(task=task, model=model, source=source, probability=args.verify,
                                                byzantine=byzantine, **common)
            print(f"verification on: each round a member is recomputed with probability {args.verify:g}", flush=True)
        elif byzantine is not None:
            from .verified import AttackingOptimizer

            made = AttackingOptimizer(byzantine=byzantine, **common)
        else:
            made = Optimizer(**common)
        opt = made
        view.optimizer = opt
        opt.sharing.show_progress = not args.quiet  # state downloads show their progress on stderr

        if args.checkpoint_dir:
            try:
                found = latest_checkpoint(args.checkpoint_dir, run_id, progress=not args.quiet)
                if found is not None:
                    opt.load_training_state(found[1])
                    view.checkpoint_loads += 1
                    print(f"resumed from checkpoint {found[0]} (epoch {opt.local_epoch})", flush=True)
            except (CheckpointError, ValueError, RuntimeError, KeyError) as e:
                raise _Fatal(EXIT_CHECKPOINT, f"cannot resume from {args.checkpoint_dir}: {e} (move the file away "
                                              "to start without it)") from None
        view.set_state("downloading")
        with signals.interruptible():
            _catch_up_at_start(opt)
        view.set_state("training")

        data_seed = int.from_bytes(hashlib.sha256(dht.peer_id.raw).digest()[:4], "little")
        return _train(args, task, model, opt, dht, signals.stop, device, shard, num_shards, data_seed, run_id,
                      save_checkpoint, local, view, source=source, byzantine=byzantine)
    finally:
        if dashboard is not None:
            close_for(dht, dashboard)
        if opt is not None:
            opt.shutdown()
        if announcer is not None:
            announcer.shutdown()
        dht.shutdown()


def _start_dashboard(args: argparse.Namespace, dht: Any, view: Any) -> Any:
    """Serve the dashboard on the DHT's loop (``--dashboard-port off``: None); prints its URL."""
    from .dashboard.options import OFF
    from .dashboard.server import DashboardError, serve_for
    from .metrics import Metrics

    if args.dashboard_port == OFF:
        return None
    try:
        server = serve_for(dht, view, Metrics(dht.node, view), args.dashboard_host, args.dashboard_port)
    except (DashboardError, OSError) as e:
        raise _Fatal(EXIT_LOCAL, str(e)) from None
    print(f"dashboard: {server.url}", flush=True)
    return server


def _catch_up_at_start(opt: Any) -> None:
    """If the swarm is ahead, download its state from a live donor; while live donors exist, keep
    trying (up to ``CATCH_UP_PATIENCE`` s) rather than train from this peer's own epoch."""
    deadline = time.monotonic() + CATCH_UP_PATIENCE
    progress = opt.tracker.refresh()
    if progress.epoch <= opt.local_epoch:
        return
    print(f"the swarm is at epoch {progress.epoch}: downloading its state...", flush=True)
    while True:
        if opt.load_state_from_peers():
            print(f"downloaded the swarm's state; joining at epoch {opt.local_epoch}", flush=True)
            return
        progress = opt.tracker.refresh()
        if progress.epoch <= opt.local_epoch or time.monotonic() > deadline or not opt.live_donors():
            break
        time.sleep(1.0)  # the donors were busy or just died: the view drops dead ones within seconds
    print(f"no live peer could give the swarm's state yet: training from epoch {opt.local_epoch}, "
          "catching up later", flush=True)


def _observe(view: Any, task: Any, opt: Any, evaluation: dict) -> None:
    """An epoch's loss and held-out metric (the task's target metric, else its loss) into the
    dashboard's view, with a history point (at most one per second)."""
    view.loss = opt.last_loss
    if evaluation:
        name = task.target[0] if task.target is not None and task.target[0] in evaluation else "loss"
        value = evaluation.get(name)
        if isinstance(value, (int, float)):
            view.heldout, view.heldout_name = float(value), name
    g = opt.global_progress
    view.add_point(opt.local_epoch, g.loss if g.loss is not None else opt.last_loss, view.heldout, g.samples_per_second)


def _train(args, task, model, opt, dht, stop, device, shard, num_shards, data_seed, run_id, save_checkpoint,
           local, view=None, source=None, byzantine=None) -> int:
    """The training loop. ``source`` (verification): named batches, restarted whenever the optimizer's
    accumulated gradient is empty (a new epoch, a downloaded state), counted as they are accumulated;
    ``byzantine``: this peer's attack (label flipping happens here)."""
    import torch

    from .local_peers import default_threads

    started = time.monotonic()
    threads_checked = started
    metrics_file = open(args.metrics_file, "a", buffering=1) if args.metrics_file else None
    batches = task.batches(shard, num_shards, args.batch_size, data_seed)
    last_line = 0.0
    last_eval: dict = {}
    last_checkpoint_epoch = opt.local_epoch
    reason = "stopped"

    def checkpoint() -> None:
        nonlocal last_checkpoint_epoch
        if args.checkpoint_dir and opt.local_epoch > 0:
            path = save_checkpoint(args.checkpoint_dir, run_id, opt.local_epoch, opt.training_state_blob())
            last_checkpoint_epoch = opt.local_epoch
            logger.info("checkpoint %s", path)

    try:
        while not stop.is_set():
            if args.threads is None and time.monotonic() - threads_checked > THREADS_RECHECK:
                threads_checked = time.monotonic()
                peers, threads = local.count(), torch.get_num_threads()
                if default_threads(peers) != threads:
                    torch.set_num_threads(default_threads(peers))
                    logger.info("torch threads: %d -> %d (%d local swarm peers now)", threads, default_threads(peers),
                                peers)
            if source is not None:
                if opt.local_samples == 0:
                    source.reset(opt.local_epoch)
                batch = source.next(opt.local_epoch)
            else:
                batch = next(batches)
            if byzantine is not None:
                if byzantine.name == "label_flip" and byzantine.num_classes is None:
                    byzantine.learn_classes(model, _to_device(batch, device))
                batch = byzantine.flip(batch)
            batch = _to_device(batch, device)
            model.train()
            loss = task.loss(model, batch)
            if not torch.isfinite(loss):
                logger.warning("non-finite loss %s at epoch %d: skipping this batch", float(loss), opt.local_epoch)
                opt.zero_grad()
                continue
            loss.backward()
            if source is not None:
                source.count(task.samples_in(batch))  # before step(): a round may start in it
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
                if view is not None:
                    _observe(view, task, opt, last_eval)
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
                line = (f"epoch {opt.local_epoch} | loss {opt.last_loss:.4f} | "
                        f"{opt.samples_per_second:.0f} samples/s here, {g.samples_per_second:.0f} in the swarm | "
                        f"{g.num_peers} peer{'' if g.num_peers == 1 else 's'} online")
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
    exchanged = (opt.bytes_sent + opt.bytes_received) / 1e6
    print(f"{reason}; epoch {opt.local_epoch}, {exchanged:.1f} MB exchanged", flush=True)
    return EXIT_INTERRUPTED if reason.startswith("interrupted") else 0
