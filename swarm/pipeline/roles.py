"""``swarm join`` for pipeline tasks: the ``server`` and ``trainer`` roles (SWARM parallelism).

- ``--role server --stage K|auto``: host one stage of the task (:class:`swarm.pipeline.server.StageServer`),
  step it with the stage's other servers (:class:`swarm.pipeline.stage_training.StageStepper`),
  and rebalance every ``--rebalance-period`` seconds (:class:`swarm.pipeline.rebalance.Rebalancer`).
  ``auto`` picks the stage where this server raises the pipeline's throughput most (an empty stage
  first). ``--max-memory`` (e.g. ``2GB``, ``512MB``) caps what the server may hold: a stage whose
  parameters + gradients + optimizer state exceed it is refused with a clear error (exit 2), and
  neither ``auto`` nor rebalancing moves the server to such a stage.
- ``--role trainer``: owns the data; drives microbatches through the stages
  (:class:`swarm.pipeline.client.PipelineClient`), a few in flight at once, and back-propagates the
  summed per-sample loss; evaluates ``task.evaluate`` through the pipeline's forward every
  ``eval_every`` stage steps and writes ``--metrics-file`` lines. It publishes its progress under
  ``{run_id}.progress`` (what ``swarm runs`` counts as the run's peers and samples/s).

Both join (or create) the run as the ordinary daemon does; the run's pinned settings also hold the
number of stages (``"pipeline stages"``). The pipeline's epoch is the smallest step count of its
stages (``{run_id}.stage{K}.progress``); ``--max-epochs`` compares against it.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import copy
import json
import logging
import math
import re
import time
from pathlib import Path
from typing import Any

__all__ = ["add_pipeline_arguments", "parse_memory", "stage_memory_bytes", "run_pipeline_role", "pipeline_epoch",
           "DEFAULT_REBALANCE_PERIOD", "TRAINER_IN_FLIGHT"]

logger = logging.getLogger("swarm.pipeline")

DEFAULT_REBALANCE_PERIOD = 300.0
TRAINER_IN_FLIGHT = 2  # microbatches a trainer keeps in the pipeline at once
SPEED_WINDOW = 20.0  # s of completed microbatches a trainer's samples/s counts
ANNOUNCE_EVERY = 2.0  # s between two refreshes of the trainer's progress line
_UNITS = {"": 1, "b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12,
          "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}


def add_pipeline_arguments(p: argparse.ArgumentParser) -> None:
    """The pipeline options of ``swarm join`` (ignored by tasks without stages, except ``--role server``)."""
    g = p.add_argument_group("pipeline tasks (Task(stages=[...]))")
    g.add_argument("--role", choices=["trainer", "server"], default="trainer",
                   help="server: host one stage; trainer: own data and drive microbatches (default trainer)")
    g.add_argument("--stage", default="auto", metavar="K|auto",
                   help="the stage a server hosts (default auto: where it raises the throughput most)")
    g.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="most memory a server holds for its stage: parameters + gradients + optimizer state "
                        "(e.g. 2GB, 512MB, 1.5GiB; default: no limit)")
    g.add_argument("--rebalance-period", type=float, default=DEFAULT_REBALANCE_PERIOD, metavar="S",
                   help=f"seconds between two rebalancing decisions of a server (default {DEFAULT_REBALANCE_PERIOD:g})")


def parse_memory(text: str) -> int:
    """``"2GB"``, ``"512MB"``, ``"1.5GiB"``, ``"1000000"`` -> bytes (ValueError with the reason)."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([a-zA-Z]{0,3})\s*", str(text)[:64])
    if match is None or match.group(2).lower() not in _UNITS:
        raise ValueError(f"--max-memory must be a size such as 2GB, 512MB or 1.5GiB, got {str(text)[:64]!r}")
    value = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if not (math.isfinite(value) and value >= 1):
        raise ValueError(f"--max-memory must be at least 1 byte, got {str(text)[:64]!r}")
    return int(value)


def _format_bytes(n: float) -> str:
    return f"{n / 1e6:.1f} MB" if n < 1e9 else f"{n / 1e9:.2f} GB"


def stage_memory_bytes(task: Any, k: int) -> int:
    """Bytes stage ``k`` of ``task`` holds on a server: parameters + gradients + the task optimizer's
    state after a step, measured on the meta device (nothing is allocated; a stage or optimizer that
    cannot run there is measured on a real copy)."""
    import torch

    def measure(module: Any) -> int:
        params = [p for p in module.parameters() if p.requires_grad]
        for p in params:
            p.grad = torch.zeros_like(p)
        opt = task.optimizer(params)
        opt.step()
        state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                    if isinstance(t, torch.Tensor) and t.dim() > 0)
        return 2 * sum(p.numel() * p.element_size() for p in params) + state

    try:
        with torch.device("meta"):
            module = task._stage_factory(k)()
        return measure(module)
    except Exception:  # noqa: BLE001 - measured for real instead
        return measure(copy.deepcopy(task.build_stage(k)))


def _fatal(code: int, message: str) -> Exception:
    from ..daemon import _Fatal

    return _Fatal(code, message)


async def _all_records(node: Any, run_id: str, num_stages: int) -> list[Any]:
    from .registry import fetch_stages

    stages = await fetch_stages(node, run_id, num_stages)
    return [r for k in range(num_stages) for r in stages.get(k, [])]


async def _stage_epochs(node: Any, run_id: str, num_stages: int) -> list[int]:
    """The newest step count any server of each stage reports (0 for a stage without records)."""
    from ..progress import fetch_records
    from .stage_training import stage_run_id

    found = await asyncio.gather(*(fetch_records(node, stage_run_id(run_id, k)) for k in range(num_stages)))
    return [max((r.epoch for r in records if not r.left), default=0) for records in found]


def pipeline_epoch(dht: Any, run_id: str, num_stages: int, timeout: float = 10.0) -> int:
    """The pipeline's epoch: the smallest step count of its stages."""
    async def go(_dht: Any, node: Any) -> list[int]:
        return await _stage_epochs(node, run_id, num_stages)

    return min(dht.run_coroutine(go, return_future=True).result(timeout))


def run_pipeline_role(args: argparse.Namespace, signals: Any, task: Any, code_hash: str, run_id: str,
                      options: dict, pinned: dict, shard: int, num_shards: int) -> int:
    """``swarm join`` of a pipeline task (or ``--role server``): check, join the run, serve or train."""
    from ..daemon import EXIT_TASK

    if not task.is_pipeline:
        raise _fatal(EXIT_TASK, f"--role server needs a pipeline task (Task(stages=[...])); task {task.name!r} "
                                "has a single model: join it without --role")
    if pinned.get("mode") != "sync":
        raise _fatal(EXIT_TASK, "a pipeline task's stages step in mode 'sync' (optimizer_options mode "
                                f"{pinned.get('mode')!r} is not supported)")
    if not args.rebalance_period > 0:
        raise _fatal(EXIT_TASK, f"--rebalance-period must be positive, got {args.rebalance_period:g}")
    cap = 0
    if args.max_memory is not None:
        try:
            cap = parse_memory(args.max_memory)
        except ValueError as e:
            raise _fatal(EXIT_TASK, str(e)) from None
    stage: int | None = None
    if args.role == "server" and args.stage != "auto":
        try:
            stage = int(args.stage)
        except ValueError:
            raise _fatal(EXIT_TASK, f"--stage must be a stage number or auto, got {str(args.stage)[:40]!r}") from None
        if not 0 <= stage < task.num_stages:
            raise _fatal(EXIT_TASK, f"--stage must be in 0..{task.num_stages - 1} (task {task.name!r} has "
                                    f"{task.num_stages} stages), got {stage}")
    needs: list[int] = []
    if args.role == "server":
        needs = [stage_memory_bytes(task, k) for k in range(task.num_stages)]
        if cap and stage is not None and needs[stage] > cap:
            raise _fatal(EXIT_TASK, f"stage {stage} needs {_format_bytes(needs[stage])} (parameters + gradients + "
                                    f"optimizer state), more than --max-memory {_format_bytes(cap)}; give more "
                                    "memory or serve a smaller stage")
        if cap and not any(n <= cap for n in needs):
            raise _fatal(EXIT_TASK, f"no stage fits --max-memory {_format_bytes(cap)}: the stages need "
                                    + ", ".join(_format_bytes(n) for n in needs))
    import torch

    _check_pipeline(task, shard, num_shards, args.batch_size)
    settings = {"task attribute": _task_attribute(args.task), "batch_size": task.batch_size,
                "target_batch_size": task.target_batch_size, "pipeline stages": task.num_stages,
                **{f"optimizer {name}": value for name, value in pinned.items()}}
    torch.set_num_threads(args.threads or 1)
    with _Joined(args, signals, task, code_hash, run_id, settings) as joined:
        if args.role == "server":
            return _Server(args, signals, task, joined.dht, run_id, options, cap, needs, stage).run()
        return _Trainer(args, signals, task, joined.dht, run_id, shard, num_shards).run()


def _task_attribute(ref: str) -> str:
    from ..task import split_task_ref

    return split_task_ref(ref)[1]


def _check_pipeline(task: Any, shard: int, num_shards: int, batch_size: int | None) -> None:
    """One batch through ``data``, every stage (in order) and ``loss`` with a backward pass, before
    any networking: a task error shows here ("task error in stages[2](): ...")."""
    import torch

    from ..daemon import EXIT_TASK, _describe_error

    size = batch_size or task.batch_size
    try:
        batches = iter(task.data(shard, num_shards, size, 0))
        batch = next(batches)
    except StopIteration:
        raise _fatal(EXIT_TASK, f"task error in data(): data({shard}, {num_shards}, {size}, seed) yielded no batch"
                     ) from None
    except Exception as e:  # noqa: BLE001 - the user's code
        raise _fatal(EXIT_TASK, f"task error in data(): {_describe_error(e)}") from None
    try:
        x = task.stage_input(batch)
    except Exception as e:  # noqa: BLE001
        raise _fatal(EXIT_TASK, f"task error in stage_input(): {_describe_error(e)}") from None
    for k in range(task.num_stages):
        try:
            x = task.build_stage(k)(x)
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"a stage must return a tensor, got {type(x).__name__}")
        except Exception as e:  # noqa: BLE001
            raise _fatal(EXIT_TASK, f"task error in stages[{k}](): {_describe_error(e)}") from None
    try:
        loss = task.loss(x, batch)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.requires_grad:
            raise TypeError("loss(output, batch) must return a scalar tensor that depends on the stages' output")
        loss.backward()
    except Exception as e:  # noqa: BLE001
        raise _fatal(EXIT_TASK, f"task error in loss(): {_describe_error(e)}") from None


class _Joined:
    """The identity lock, the DHT and the run (found or created), released on exit."""

    def __init__(self, args: argparse.Namespace, signals: Any, task: Any, code_hash: str, run_id: str,
                 settings: dict):
        self.args, self.signals, self.task, self.code_hash, self.run_id = args, signals, task, code_hash, run_id
        self.settings = settings
        self.dht: Any = None
        self._lock: Path | None = None
        self._announcer: Any = None

    def __enter__(self) -> "_Joined":
        from dht import DHT, P2PError

        from ..cli import parse_announce
        from ..daemon import EXIT_RUN, _lock_identity, default_identity_path
        from ..exitcodes import startup_error
        from ..nat_cli import nat_options
        from ..runs import RunAnnouncement, RunAnnouncer, announce_run, find_run, settings_differences

        args = self.args
        identity = Path(args.identity or default_identity_path())
        self._lock = _lock_identity(identity)
        try:
            try:
                with self.signals.interruptible():
                    self.dht = DHT(initial_peers=args.initial_peers, host=args.host, port=args.port,
                                   identity_path=identity, client_mode=args.client_mode,
                                   announce=parse_announce(args.announce_addr), nat=nat_options(args))
            except (P2PError, OSError, ValueError) as e:
                raise _fatal(*startup_error(e, args.host, args.port, identity)) from None
            dht = self.dht
            print(f"peer {dht.peer_id}" + ("" if args.client_mode else " reachable at:"), flush=True)
            for address in dht.get_visible_addresses():
                print(f"  {address}", flush=True)
            with self.signals.interruptible():
                announcement = find_run(dht, self.run_id)
            hyper = dict(self.task.hyperparameters)
            if announcement is None:
                announcement = RunAnnouncement(self.run_id, args.task, self.code_hash, str(dht.peer_id), time.time(),
                                               self.task.target_batch_size, hyper, dict(self.settings))
                with self.signals.interruptible():
                    announce_run(dht, announcement)
                self._announcer = RunAnnouncer(dht, announcement)
                print(f"run {self.run_id!r} is new: this peer created it (pipeline of {self.task.num_stages} stages, "
                      f"task {args.task}, code {self.code_hash[:12]})", flush=True)
            else:
                differences = settings_differences(announcement, args.task, self.code_hash, self.settings, hyper)
                if differences:
                    raise _fatal(EXIT_RUN, f"refusing to join run {self.run_id!r}: it differs from this peer in "
                                           f"{len(differences)} field{'s' if len(differences) != 1 else ''}:\n  "
                                           + "\n  ".join(differences))
                print(f"joining run {self.run_id!r} created by {announcement.creator} (task code "
                      f"{self.code_hash[:12]} matches)", flush=True)
                if announcement.creator == str(dht.peer_id):
                    self._announcer = RunAnnouncer(dht, announcement)
            return self
        except BaseException:
            self.__exit__()
            raise

    def __exit__(self, *exc_info: Any) -> None:
        if self._announcer is not None:
            self._announcer.shutdown()
        if self.dht is not None:
            self.dht.shutdown()
        if self._lock is not None:
            self._lock.unlink(missing_ok=True)


class _Server:
    """A stage server: serve, step with the stage, rebalance; until stopped."""

    def __init__(self, args: argparse.Namespace, signals: Any, task: Any, dht: Any, run_id: str, options: dict,
                 cap: int, needs: list[int], stage: int | None):
        self.args, self.signals, self.task, self.dht, self.run_id = args, signals, task, dht, run_id
        self.options, self.cap, self.needs, self.fixed_stage = options, cap, needs, stage
        self.costs = [task.stage_cost(k) for k in range(task.num_stages)]
        self.server: Any = None
        self.stepper: Any = None
        self.rebalancer: Any = None

    def fits(self, stage: int) -> bool:
        return not self.cap or self.needs[stage] <= self.cap

    def can_host(self, record: Any, stage: int) -> bool:
        """Whether the server behind ``record`` has the memory for ``stage`` (0 offered: no limit)."""
        return not record.mem_bytes or self.needs[stage] <= record.mem_bytes

    def _choose(self) -> int:
        from .rebalance import choose_stage

        if self.fixed_stage is not None:
            return self.fixed_stage

        async def records(_dht: Any, node: Any) -> list[Any]:
            return await _all_records(node, self.run_id, self.task.num_stages)

        found = self.dht.run_coroutine(records, return_future=True).result(30)
        stage = choose_stage(found, self.costs, can_host=self.fits)
        print(f"--stage auto: stage {stage} (servers per stage now: "
              f"{[sum(r.stage == k for r in found) for k in range(self.task.num_stages)]})", flush=True)
        return stage

    def _new_stepper(self, stage: int, module: Any) -> Any:
        from .stage_training import StageStepper

        holder = _StageView(stage, module, self)
        stepper = StageStepper(self.dht, self.run_id, holder, self.task.optimizer, self.task.target_batch_size,
                               scheduler=self.task.scheduler, client_mode=self.args.client_mode,
                               bandwidth=self.args.bandwidth, **self.options)
        stepper.opt.sharing.show_progress = not self.args.quiet
        return stepper

    def run(self) -> int:
        from .server import StageServer

        stop = self.signals.stop
        stage = self._choose()
        module = self.task.build_stage(stage)
        self.stepper = self._new_stepper(stage, module)
        with self.signals.interruptible():
            if self.stepper.catch_up():
                print(f"downloaded stage {stage}'s state (step {self.stepper.epoch})", flush=True)

        async def start(_dht: Any, node: Any) -> Any:
            server = StageServer(node, self.run_id, stage, module, mem_bytes=self.cap)
            await server.start()
            return server

        self.server = self.dht.run_coroutine(start, return_future=True).result(60)
        self.stepper.start()
        print(f"serving stage {stage} of {self.task.num_stages} ({_format_bytes(self.needs[stage])} with "
              f"gradients and optimizer state)", flush=True)
        self._start_rebalancer()
        started = time.monotonic()
        reason = "interrupted: leaving the swarm"
        last_line = 0.0
        try:
            while not stop.wait(0.5):
                if self.args.max_seconds is not None and time.monotonic() - started > self.args.max_seconds:
                    reason = f"ran --max-seconds {self.args.max_seconds:g}"
                    break
                if self.args.max_epochs is not None and self.stepper.epoch >= self.args.max_epochs:
                    reason = f"reached --max-epochs {self.args.max_epochs}"
                    break
                if not self.args.quiet and time.monotonic() - last_line > 5.0:
                    last_line = time.monotonic()
                    stats = self.server.stats() if self.server is not None else {}
                    print(f"stage {self.server.stage} | step {self.stepper.epoch} | "
                          f"{float(stats.get('samples_per_s', 0.0)):.1f} samples/s | queue {stats.get('queue', 0)}",
                          flush=True)
        finally:
            self._shutdown()
        print(f"{reason}; stage {self.server.stage}, step {self.stepper.epoch}, "
              f"{self.rebalancer.moves if self.rebalancer else 0} migration(s)", flush=True)
        from ..daemon import EXIT_INTERRUPTED

        return EXIT_INTERRUPTED if reason.startswith("interrupted") else 0

    def _start_rebalancer(self) -> None:
        from .rebalance import Rebalancer

        async def fetch() -> list[Any]:
            return await _all_records(self.dht.node, self.run_id, self.task.num_stages)

        def me() -> tuple[str, int]:
            return str(self.dht.peer_id), int(self.server.stage)

        async def create(_dht: Any, node: Any) -> Any:
            period = self.args.rebalance_period
            rebalancer = Rebalancer(node, self.run_id, self.costs, fetch, me, self._move, period=period,
                                    claim_wait=min(10.0, period / 3), can_host=self.can_host)
            rebalancer.start()
            return rebalancer

        self.rebalancer = self.dht.run_coroutine(create, return_future=True).result(30)

    async def _move(self, stage: int) -> None:
        """Migrate to ``stage`` (algorithms.md 1.5 item 8): stop stepping the old stage (its accumulated
        gradients are discarded), build the new stage, download its state from its servers, then
        switch the server over (it deregisters from the old stage after finishing what is in flight)."""
        loop = asyncio.get_running_loop()
        old = self.stepper
        module = self.task.build_stage(stage)
        await loop.run_in_executor(None, old.shutdown)
        stepper = await loop.run_in_executor(None, self._new_stepper, stage, module)
        await loop.run_in_executor(None, stepper.catch_up)
        self.server.last_moved_at = _dht_time()  # announced with the new stage: no move again for 3 periods
        await self.server.switch(stage, module)
        self.stepper = stepper
        stepper.start()
        print(f"rebalancing: moved to stage {stage} (step {stepper.epoch})", flush=True)

    def _shutdown(self) -> None:
        if self.rebalancer is not None:
            self.dht.run_coroutine(lambda _d, _n: self.rebalancer.stop(), return_future=True).result(30)
        if self.server is not None:
            try:
                self.dht.run_coroutine(lambda _d, _n: self.server.stop(drain_timeout=5.0),
                                       return_future=True).result(30)
            except Exception as e:  # noqa: BLE001 - leaving anyway
                logger.warning("stopping the stage server: %s", e)
        if self.stepper is not None:
            self.stepper.shutdown()


class _StageView:
    """What :class:`StageStepper` steps: the stage's module, and the live server's gradient count."""

    def __init__(self, stage: int, module: Any, owner: _Server):
        self.stage, self.module, self._owner = stage, module, owner

    @property
    def _server(self) -> Any:
        server = self._owner.server
        return server if server is not None and server.stage == self.stage and server.module is self.module else None

    @property
    def samples_accumulated(self) -> int:
        server = self._server
        return int(server.samples_accumulated) if server is not None else 0

    def reset_accumulated(self) -> None:
        server = self._server
        if server is not None:
            server.reset_accumulated()

    def paused(self) -> Any:
        server = self._server
        if server is None:
            raise RuntimeError("the server no longer serves this stage")
        return server.paused()


def _dht_time() -> float:
    from dht import get_dht_time

    return get_dht_time()


class _Trainer:
    """A trainer: microbatches through the pipeline, evaluation, progress, until stopped."""

    def __init__(self, args: argparse.Namespace, signals: Any, task: Any, dht: Any, run_id: str, shard: int,
                 num_shards: int):
        self.args, self.signals, self.task, self.dht, self.run_id = args, signals, task, dht, run_id
        self.shard, self.num_shards = shard, num_shards
        self.client: Any = None

    def _forward(self, x: Any) -> Any:
        """The pipeline's forward (for ``task.evaluate``), from this thread."""
        return self.dht.run_coroutine(lambda _d, _n: self.client.forward(x), return_future=True).result(600)

    def run(self) -> int:
        import hashlib

        from ..progress import ProgressTracker
        from .client import PipelineClient
        from .stage_training import summed_loss

        args, task, stop = self.args, self.task, self.signals.stop

        async def create(_dht: Any, node: Any) -> Any:
            return PipelineClient(node, self.run_id, task.num_stages)

        self.client = self.dht.run_coroutine(create, return_future=True).result(30)
        tracker = ProgressTracker(self.dht, self.run_id, task.target_batch_size, client_mode=True, expiration=600.0)
        seed = int.from_bytes(hashlib.sha256(self.dht.peer_id.raw).digest()[:4], "little")
        batches = task.batches(self.shard, self.num_shards, args.batch_size, seed)
        loss_fn = summed_loss(task.loss, task.samples_in)
        metrics = open(args.metrics_file, "a", buffering=1) if args.metrics_file else None
        started = time.monotonic()
        in_flight: list[tuple[concurrent.futures.Future, int, float]] = []
        samples_done = ok = failed = 0
        losses: list[float] = []
        speed = 0.0
        window: collections.deque[tuple[float, int]] = collections.deque()  # (completed at, samples)
        last_line = last_epoch_check = 0.0
        epoch, evaluated_epoch = 0, -1
        reason = "interrupted: leaving the swarm"

        def evaluate(at_epoch: int) -> dict:
            if task.evaluate is None:
                return {}
            result = task.evaluate(self._forward)
            record = {"time": time.time(), "epoch": at_epoch, "samples": samples_done, "eval": result}
            if metrics is not None:
                metrics.write(json.dumps(record) + "\n")
            print(f"pipeline epoch {at_epoch}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()
                                                              if isinstance(v, float)), flush=True)
            return result

        try:
            if task.evaluate is not None and args.metrics_file:
                evaluate(0)
                evaluated_epoch = 0
            while not stop.is_set():
                while len(in_flight) < TRAINER_IN_FLIGHT:
                    batch = next(batches)
                    n = task.samples_in(batch)
                    future = self.dht.run_coroutine(
                        lambda _d, _n, b=batch: self.client.train_microbatch(b, loss_fn), return_future=True)
                    in_flight.append((future, n, time.monotonic()))
                done, _ = concurrent.futures.wait([f for f, _, _ in in_flight], timeout=0.5,
                                                  return_when=concurrent.futures.FIRST_COMPLETED)
                for entry in [e for e in in_flight if e[0] in done]:
                    in_flight.remove(entry)
                    future = entry[0]
                    try:
                        total, samples = future.result()
                        ok += 1
                        samples_done += samples
                        losses = (losses + [total / max(samples, 1)])[-20:]
                        window.append((time.monotonic(), samples))
                    except Exception as e:  # noqa: BLE001 - counted and logged; the trainer goes on
                        failed += 1
                        logger.warning("microbatch failed: %s", e)
                while window and window[0][0] < time.monotonic() - SPEED_WINDOW:
                    window.popleft()
                if window:
                    speed = sum(n for _, n in window) / max(time.monotonic() - max(window[0][0] - 1.0, started), 1e-3)
                loss = sum(losses) / len(losses) if losses else None
                tracker.report(epoch, samples_done, speed, loss)
                if time.monotonic() - last_epoch_check > 1.0:
                    last_epoch_check = time.monotonic()
                    try:
                        epoch = pipeline_epoch(self.dht, self.run_id, task.num_stages)
                    except Exception as e:  # noqa: BLE001 - the DHT may be briefly unreachable
                        logger.debug("pipeline epoch: %s", e)
                if task.evaluate is not None and epoch > evaluated_epoch and epoch % max(task.eval_every, 1) == 0:
                    evaluated_epoch = epoch
                    result = evaluate(epoch)
                    if args.stop_at_target and task.target_reached(result):
                        reason = f"target reached ({task.target[0]} {result[task.target[0]]:.4f})"
                        break
                if args.max_epochs is not None and epoch >= args.max_epochs:
                    reason = f"reached --max-epochs {args.max_epochs}"
                    break
                if args.max_seconds is not None and time.monotonic() - started > args.max_seconds:
                    reason = f"ran --max-seconds {args.max_seconds:g}"
                    break
                if not args.quiet and time.monotonic() - last_line > ANNOUNCE_EVERY:
                    last_line = time.monotonic()
                    print(f"pipeline epoch {epoch} | loss {loss if loss is not None else float('nan'):.4f} | "
                          f"{speed:.1f} samples/s here | {ok} microbatches ok, {failed} failed, "
                          f"{getattr(self.client, 'retries', 0)} retries", flush=True)
            for future, _, _ in in_flight:  # let what is in the pipeline finish (bounded)
                _wait_done(future, 30.0)
            if task.evaluate is not None and args.metrics_file and not reason.startswith("interrupted"):
                evaluate(epoch)
        finally:
            if metrics is not None:
                metrics.close()
            tracker.shutdown()
        print(f"{reason}; pipeline epoch {epoch}, {ok} microbatches ok, {failed} failed, {samples_done} samples",
              flush=True)
        from ..daemon import EXIT_INTERRUPTED

        return EXIT_INTERRUPTED if reason.startswith("interrupted") else 0


def _wait_done(future: concurrent.futures.Future, timeout: float) -> None:
    try:
        future.result(timeout)
    except Exception:  # noqa: BLE001 - counted before; leaving
        future.cancel()

