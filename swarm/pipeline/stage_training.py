"""The collaborative step of one pipeline stage (algorithms.md 1.4), run by each of its servers.

The servers of stage ``K`` form a data-parallel swarm of their own, named ``{run_id}.stage{K}``:
:class:`StageStepper` wraps a :class:`swarm.Optimizer` (mode ``sync``) over the stage module's
parameters under that name, so the stage gets, from the existing machinery,

- progress records under ``{run_id}.stage{K}.progress`` (samples accumulated, samples/s, epoch);
- when the stage's samples (all its servers together) reach ``target_batch_size``: the servers of
  the stage average their **mean** gradients, weighted by samples, with :class:`averaging.Averager`
  under ``{run_id}.stage{K}.grads`` (robust ``aggregator`` allowed), and every one applies the
  task's optimizer to the average: replicas stay identical;
- the stage's state (parameters + optimizer state + epoch) offered under ``{run_id}.stage{K}.state``
  and downloaded by a server that joins late, moves to the stage, or finds the stage ahead
  (:meth:`catch_up`).

The server (:class:`swarm.pipeline.server.StageServer`) accumulates the parameter gradients of the
backward calls it serves into ``module``'s ``.grad`` and counts ``samples_accumulated``. Trainers
send the gradient of the **summed** per-sample loss (:func:`summed_loss`), so ``.grad`` holds the
sum of per-sample gradients whatever the microbatch sizes; every ``poll`` seconds the stepper, inside
``server.paused()`` (no backward runs meanwhile), divides it by the samples, hands it to the
optimizer (which keeps the sum weighted by samples and steps when the stage is ready), and resets
the server's gradients and count.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from typing import Any, Callable

import torch

from dht import DHT

__all__ = ["StageStepper", "stage_run_id", "summed_loss"]

logger = logging.getLogger(__name__)


def stage_run_id(run_id: str, stage: int) -> str:
    """The name of stage ``stage``'s own swarm (its DHT keys start with it)."""
    return f"{run_id}.stage{int(stage)}"


def summed_loss(loss: Callable[[Any, Any], torch.Tensor], count: Callable[[Any], int]
                ) -> Callable[[Any, Any], torch.Tensor]:
    """``loss(output, batch) * samples(batch)``: the summed per-sample loss a trainer back-propagates,
    so that gradients accumulated by a stage's servers are sums of per-sample gradients."""

    def summed(output: Any, batch: Any) -> torch.Tensor:
        return loss(output, batch) * float(count(batch))

    return summed


class StageStepper:
    """The stage step of one server: accumulate, average within the stage, step together.

    - ``dht``: the server's :class:`dht.DHT` (the server runs on its loop); ``run_id``: the run;
      ``server``: what serves the stage (``stage``, ``module``, ``samples_accumulated``,
      ``reset_accumulated()``, ``async with paused()``);
    - ``optimizer``: the task's factory ``params -> torch.optim.Optimizer``; ``target_batch_size``:
      samples per step of the stage (all its servers together); ``scheduler``: optional factory;
    - ``poll`` (1 s): how often accumulated gradients are handed to the optimizer (each handover
      pauses the backwards briefly);
    - ``options``: more keyword arguments of :class:`swarm.Optimizer` (``matchmaking_time``,
      ``averaging_timeout``, ``aggregator``, ``compression``, ``target_group_size``, ...).
    Counters: ``steps`` (stage steps this server took), ``samples`` (handed to the optimizer)."""

    def __init__(self, dht: DHT, run_id: str, server: Any, optimizer: Callable, target_batch_size: int, *,
                 poll: float = 1.0, scheduler: Callable | None = None, **options: Any):
        from ..optimizer import Optimizer

        if not poll > 0:
            raise ValueError("poll must be positive")
        self.dht, self.run_id, self.server, self.poll = dht, run_id, server, poll
        self.stage = int(server.stage)
        self.steps = self.samples = 0
        self.opt = Optimizer(dht=dht, run_id=stage_run_id(run_id, self.stage), optimizer=optimizer,
                             params=list(server.module.parameters()), target_batch_size=target_batch_size,
                             batch_size_per_step=1, scheduler=scheduler, **options)
        self._lock = threading.Lock()  # one handover at a time (the thread and a migration)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def epoch(self) -> int:
        """The stage's step count as this server knows it (the optimizer's epoch)."""
        return self.opt.local_epoch

    def catch_up(self, patience: float = 30.0) -> bool:
        """If the stage's swarm is ahead of this server (it joined late or moved here), download the
        stage's state from its peers (retried up to ``patience`` s while live donors exist). True if
        a state was adopted."""
        import time

        deadline = time.monotonic() + patience
        while True:
            progress = self.opt.tracker.refresh()
            if progress.epoch <= self.opt.local_epoch:
                return False
            if self.opt.load_state_from_peers():
                logger.info("stage %d: downloaded the stage's state (epoch %d)", self.stage, self.opt.local_epoch)
                return True
            if time.monotonic() > deadline or not self.opt.live_donors():
                return False
            time.sleep(0.5)

    def start(self) -> None:
        """Hand gradients over every ``poll`` seconds in a background thread until :meth:`shutdown`."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"stage{self.stage}-step", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.poll):
            try:
                self.handover()
            except Exception as e:  # noqa: BLE001 - a failed step is logged; the next poll retries
                if self._stop.is_set():
                    return
                logger.warning("stage %d step failed: %s", self.stage, e)

    def handover(self, timeout: float = 600.0) -> bool:
        """Once: if the server accumulated samples, pause it, give its mean gradients to the optimizer
        (which averages within the stage and steps if the stage is ready) and reset; a server with
        nothing new still joins the stage's step when the stage is ready (or downloads the state
        when the stage moved on). Returns True if this call ended a stage step. Call from a thread,
        not from the DHT's loop."""
        with self._lock:
            if self.server.samples_accumulated <= 0 and not self._stage_ready():
                return False
            with self._paused(timeout):
                samples = int(self.server.samples_accumulated)
                if samples > 0:
                    with torch.no_grad():
                        for p in self.server.module.parameters():
                            if p.grad is not None:
                                p.grad.div_(samples)
                    stepped = self.opt.step(batch_size=samples)
                    self.samples += samples
                else:
                    stepped = self._step_without_samples()
                self.opt.zero_grad()
                self.server.reset_accumulated()
                if stepped:
                    self.steps += 1
                return bool(stepped)

    # swarm.Optimizer.step() needs new samples to look at the swarm; a server whose trainers sent
    # nothing since its last handover uses the same checks through the optimizer's internals
    def _stage_ready(self) -> bool:
        opt = self.opt
        progress = opt.tracker.global_progress
        if progress.epoch > opt.local_epoch:
            return True
        return opt.local_samples > 0 and opt._ready(progress)

    def _step_without_samples(self) -> bool:
        opt = self.opt
        progress = opt.tracker.global_progress
        if progress.epoch > opt.local_epoch:
            return bool(opt._catch_up(progress))
        if opt.local_samples > 0 and opt._ready(progress):
            opt._sync_epoch(progress)
            return True
        return False

    def _paused(self, timeout: float) -> Any:
        """``async with server.paused()`` held on the DHT's loop while this thread works."""
        import contextlib

        entered: concurrent.futures.Future = concurrent.futures.Future()

        async def hold(_dht: DHT, _node: Any) -> None:
            release = asyncio.Event()
            async with self.server.paused():
                entered.set_result(release)
                await release.wait()

        @contextlib.contextmanager
        def held() -> Any:
            held_future = self.dht.run_coroutine(hold, return_future=True)
            try:
                release = entered.result(timeout)
            except BaseException:
                held_future.cancel()
                raise
            try:
                yield
            finally:
                self.dht.loop.call_soon_threadsafe(release.set)
                try:
                    held_future.result(timeout)
                except concurrent.futures.TimeoutError:
                    logger.warning("stage %d: the server did not resume within %s s", self.stage, timeout)

        return held()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the thread and leave the stage's swarm (progress record, state announcement)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self.opt.shutdown()
