"""A trainer's pipeline client: microbatches through the stages by stochastic wiring (algorithms.md 1.2-1.3).

:class:`PipelineClient` keeps one :class:`~.wiring.StageBalancer` per stage, fed from the stage
records in the DHT (:func:`.registry.fetch_stages`, every ``update_period`` seconds, and at once when
a stage has no usable server). ``train_microbatch(batch, loss_fn)``:

1. forward: stage by stage, each to the server the stage's balancer chooses (task size = the batch
   size); the trainer keeps every stage's inputs (on CPU) until the microbatch is done;
2. the loss ``loss_fn(output, batch)`` at the trainer, and its gradient w.r.t. the last output;
3. backward in reverse order (task size 2.5x), each call carrying the stage's inputs and the
   gradient of its outputs, to any server of that stage (servers are stateless).

A failed or timed-out call is retried on another server of the *same* stage only (the stages before
it are not re-run), at most ``max_retries_per_stage`` (5) times; then the microbatch fails with
:class:`PipelineError` (counted in ``microbatches_failed``; never silently lost). A timeout or an
``overloaded`` answer only re-routes; any other error (connection lost, bad reply, refused request)
bans the server until it re-announces with a later expiration. ``overloaded`` answers (every server
of the stage busy, e.g. while the stage steps) are retried after a growing pause without counting
as failures, for at most the call's timeout.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import random
import time
from typing import Any, Callable

import torch

from dht import DHTNode, PeerID
from dht.peer.errors import DeadlineExceededError, ErrorCode, P2PError, RemoteError

from . import protocol
from .registry import fetch_stages
from .wiring import BACKWARD_TASK_MULTIPLIER, NoServersError, PerformanceEMA, StageBalancer

__all__ = ["PipelineClient", "PipelineError"]

logger = logging.getLogger(__name__)


class PipelineError(RuntimeError):
    """A microbatch could not complete: a stage failed ``max_retries_per_stage`` retries (the message
    names the stage and the last error)."""


def _first_item(batch: Any) -> Any:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


class PipelineClient:
    """Drive microbatches through the ``num_stages`` stages of run ``run_id`` (see the module docstring).

    ``codec``: how inputs and gradients are sent (:data:`.protocol.CODECS`); ``forward_timeout`` (30 s)
    and ``backward_timeout`` (75 s) per call; ``max_retries_per_stage`` (5); ``update_period`` (30 s)
    between refreshes of the stage records; ``max_elements``: values per reply tensor accepted;
    ``stage_input``: the first stage's input from a batch (default ``batch[0]``); ``no_server_wait``
    (s): how long a call waits for a stage with no known server (refreshing) before it counts as a
    failed attempt; ``overload_pause`` (0.1 s): the base of the (growing, jittered) pause after an
    ``overloaded`` answer; ``duplicate_fraction`` (0.0): the share of forwards also sent to a second
    server of the stage, in the background, whose output is compared with the first's
    (:func:`verification.duplicates.compare_outputs`: ``duplicates`` counts checks, mismatches and
    failed duplicates; ``mismatches`` keeps the latest 64 disagreements, stage, both servers, cosine
    and magnitude ratio). Backwards are never duplicated (the second server would count the
    gradients twice).

    Counters: ``microbatches_ok``, ``microbatches_failed``, ``retries``; ``samples_per_s`` (an EMA
    of this trainer's completed samples per second); ``requests[peer_id]``: calls sent per server.
    """

    def __init__(self, node: DHTNode, run_id: str, num_stages: int, codec: str = protocol.DEFAULT_CODEC, *,
                 forward_timeout: float = 30.0, backward_timeout: float = 75.0, max_retries_per_stage: int = 5,
                 update_period: float = 30.0, max_elements: int = 1 << 24,
                 stage_input: Callable[[Any], Any] = _first_item, no_server_wait: float = 5.0,
                 overload_pause: float = 0.1, duplicate_fraction: float = 0.0):
        if codec not in protocol.CODECS:
            raise ValueError(f"unknown codec {codec!r}; choose from {', '.join(protocol.CODECS)}")
        if num_stages < 1:
            raise ValueError("num_stages must be at least 1")
        self.node, self.run_id, self.num_stages, self.codec = node, run_id, num_stages, codec
        self.forward_timeout, self.backward_timeout = forward_timeout, backward_timeout
        self.max_retries_per_stage, self.update_period = max_retries_per_stage, update_period
        self.max_elements, self.stage_input, self.no_server_wait = max_elements, stage_input, no_server_wait
        self.overload_pause = overload_pause
        if not 0.0 <= duplicate_fraction <= 1.0:
            raise ValueError(f"duplicate_fraction must lie in [0, 1], got {duplicate_fraction}")
        self.duplicate_fraction = duplicate_fraction
        self.duplicates = {"checked": 0, "mismatched": 0, "failed": 0}
        self.mismatches: collections.deque[dict] = collections.deque(maxlen=64)
        self._checks: set[asyncio.Task] = set()
        self.balancers = [StageBalancer() for _ in range(num_stages)]
        self.microbatches_ok = self.microbatches_failed = self.retries = 0
        self.requests: dict[str, int] = {}
        self._throughput = PerformanceEMA()
        self._refreshed_at = -float("inf")
        self._refreshing: asyncio.Future | None = None
        self._methods = {name: protocol.method(name, run_id) for name in (protocol.FORWARD, protocol.BACKWARD)}

    @classmethod
    def for_task(cls, node: DHTNode, run_id: str, task: Any, **kwargs: Any) -> "PipelineClient":
        """A client for pipeline ``task`` (a :class:`swarm.Task` with ``stages``): its number of stages
        and its ``stage_input``; ``kwargs`` as for the constructor."""
        if not getattr(task, "is_pipeline", False):
            raise ValueError(f"task {getattr(task, 'name', task)!r} is not a pipeline task (no Task.stages)")
        return cls(node, run_id, task.num_stages, stage_input=task.stage_input, **kwargs)

    @property
    def samples_per_s(self) -> float:
        """This trainer's completed samples per second (EMA over microbatches; overlapping ones counted once)."""
        return self._throughput.samples_per_second

    # ---- server discovery

    async def refresh(self) -> None:
        """Read the stage records now (one refresh at a time; concurrent callers share it)."""
        if self._refreshing is not None and not self._refreshing.done():
            await asyncio.shield(self._refreshing)
            return
        self._refreshing = asyncio.ensure_future(self._refresh())
        await asyncio.shield(self._refreshing)

    async def _refresh(self) -> None:
        try:
            stages = await fetch_stages(self.node, self.run_id, self.num_stages)
        except Exception as e:  # noqa: BLE001 - the DHT may be briefly unreachable: keep the servers known
            logger.debug("reading the stage records failed: %s", e)
            self._refreshed_at = time.monotonic() - max(self.update_period - 1.0, 0.0)  # retry in about 1 s
            return
        self._refreshed_at = time.monotonic()
        for k, records in stages.items():
            usable = []
            for record in records:
                try:
                    self.node.p2p.add_addresses(PeerID.from_base58(record.peer_id), record.addrs)
                except ValueError:  # a malformed address (or id) in a record: skip that server
                    continue
                usable.append((record.peer_id, record.expiration_time, record.time))
            self.balancers[k].update_peers(usable)

    async def _choose(self, stage: int, task_size: float) -> str:
        if time.monotonic() - self._refreshed_at >= self.update_period:
            await self.refresh()
        deadline = time.monotonic() + self.no_server_wait
        while True:
            try:
                return self.balancers[stage].choose(task_size)
            except NoServersError:
                if time.monotonic() >= deadline:
                    raise NoServersError(f"no usable server of stage {stage} in run {self.run_id[:64]!r}") from None
                await self.refresh()
                if not self.balancers[stage].peers:
                    await asyncio.sleep(min(0.5, max(deadline - time.monotonic(), 0.0)))

    # ---- calls

    async def _call(self, stage: int, name: str, request: dict, task_size: float, timeout: float,
                    parse: Callable[[Any], Any]) -> Any:
        """The parsed reply of :meth:`_call_on`."""
        return (await self._call_on(stage, name, request, task_size, timeout, parse))[0]

    async def _call_on(self, stage: int, name: str, request: dict, task_size: float, timeout: float,
                       parse: Callable[[Any], Any]) -> tuple[Any, str]:
        """One stage's call with retries on other servers of the stage; the parsed reply. Failures
        count against ``max_retries_per_stage``; ``overloaded`` answers do not (the servers are busy,
        e.g. stepping), but they stop being retried once ``timeout`` seconds passed since the first."""
        balancer = self.balancers[stage]
        last: BaseException | None = None
        loop = asyncio.get_running_loop()
        failures = overloaded = 0
        busy_until = time.monotonic() + timeout
        while failures <= self.max_retries_per_stage:
            if failures or overloaded:
                self.retries += 1
            try:
                peer = await self._choose(stage, task_size)
            except NoServersError as e:
                last, failures = e, failures + 1
                continue
            self.requests[peer] = self.requests.get(peer, 0) + 1
            start = time.monotonic()
            try:
                reply = await self.node.p2p.call(PeerID.from_base58(peer), self._methods[name], request,
                                                 timeout=timeout)
                result = await loop.run_in_executor(None, parse, reply)
            except (DeadlineExceededError, asyncio.TimeoutError) as e:
                last, failures = e, failures + 1  # slow, not broken: re-route without a ban
                logger.debug("stage %d %s on %s timed out", stage, name, peer[-8:])
                continue
            except RemoteError as e:
                last = e
                logger.debug("stage %d %s on %s failed: %s", stage, name, peer[-8:], e)
                if e.code == ErrorCode.OVERLOADED and time.monotonic() < busy_until:
                    overloaded += 1  # busy, not broken: no ban, a pause growing with the refusals
                    pause = self.overload_pause * min(overloaded, 20) * (0.5 + random.random())
                    await asyncio.sleep(min(pause, max(busy_until - time.monotonic(), 0.0)))
                    continue
                failures += 1
                if e.code != ErrorCode.OVERLOADED:
                    balancer.ban(peer)
                continue
            except (P2PError, OSError) as e:
                last, failures = e, failures + 1
                balancer.ban(peer)
                logger.debug("stage %d %s on %s failed: %s", stage, name, peer[-8:], e)
                continue
            balancer.on_success(peer, task_size, start, time.monotonic())
            return result, peer
        more = f" ({overloaded} more answered overloaded)" if overloaded else ""
        raise PipelineError(f"stage {stage} {name}: {failures} attempts failed{more}; "
                            f"last error: {type(last).__name__}: {str(last)[:300]}")

    async def _forward_stage(self, stage: int, inputs: torch.Tensor, microbatch: bytes) -> torch.Tensor:
        loop = asyncio.get_running_loop()
        request = await loop.run_in_executor(None, protocol.forward_request, stage, microbatch, inputs, self.codec)
        size = float(_batch_size(inputs))
        outputs, peer = await self._call_on(stage, protocol.FORWARD, request, size, self.forward_timeout,
                                            self._parse_forward)
        if self.duplicate_fraction and random.random() < self.duplicate_fraction:
            check = asyncio.ensure_future(self._duplicate(stage, request, size, peer, outputs))
            self._checks.add(check)
            check.add_done_callback(self._checks.discard)
        return outputs

    def _parse_forward(self, reply: Any) -> torch.Tensor:
        return protocol.parse_forward_reply(reply, self.max_elements)

    async def _duplicate(self, stage: int, request: dict, size: float, first: str, outputs: torch.Tensor) -> None:
        """Send a forward again to another usable server of the stage, chosen uniformly at random, and
        compare the outputs (one attempt)."""
        from verification.duplicates import compare_outputs

        balancer = self.balancers[stage]
        others = [p for p in balancer.peers if p != first]
        if not others:
            return
        other = random.choice(others)  # uniformly, not by the queue: a server cannot tell it is checked
        self.requests[other] = self.requests.get(other, 0) + 1
        loop = asyncio.get_running_loop()
        try:
            start = time.monotonic()
            reply = await self.node.p2p.call(PeerID.from_base58(other), self._methods[protocol.FORWARD], request,
                                             timeout=self.forward_timeout)
            second = await loop.run_in_executor(None, self._parse_forward, reply)
            balancer.on_success(other, size, start, time.monotonic())
        except (P2PError, OSError, asyncio.TimeoutError) as e:
            self.duplicates["failed"] += 1
            logger.debug("duplicate forward of stage %d on %s failed: %s", stage, other[-8:], e)
            return
        check = await loop.run_in_executor(None, compare_outputs, outputs, second)
        self.duplicates["checked"] += 1
        if not check.ok:
            self.duplicates["mismatched"] += 1
            self.mismatches.append({"stage": stage, "peers": [first, other], "cosine": check.cosine,
                                    "ratio": check.ratio, "time": time.time()})
            logger.warning("stage %d: servers %s and %s disagree on one input (cosine %.4f, magnitude ratio %.3f)",
                           stage, first[-8:], other[-8:], check.cosine, check.ratio)

    async def _backward_stage(self, stage: int, inputs: torch.Tensor, grad: torch.Tensor,
                              microbatch: bytes) -> torch.Tensor | None:
        loop = asyncio.get_running_loop()
        request = await loop.run_in_executor(None, protocol.backward_request, stage, microbatch, inputs, grad,
                                             self.codec, stage > 0)  # the first stage's input gradient is unused
        return await self._call(stage, protocol.BACKWARD, request,
                                BACKWARD_TASK_MULTIPLIER * _batch_size(inputs), self.backward_timeout,
                                lambda reply: protocol.parse_backward_reply(reply, self.max_elements))

    # ---- public API

    async def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The pipeline's output for input ``x`` (forward only, e.g. held-out evaluation)."""
        microbatch = os.urandom(16)
        for stage in range(self.num_stages):
            x = await self._forward_stage(stage, x, microbatch)
        return x

    async def train_microbatch(self, batch: Any, loss_fn: Callable[[torch.Tensor, Any], torch.Tensor]
                               ) -> tuple[float, int]:
        """Forward ``batch`` through every stage, ``loss_fn(output, batch)`` here, backward through every
        stage (the servers accumulate the parameter gradients); returns (loss, samples).
        PipelineError if a stage failed all its retries."""
        started = time.monotonic()
        microbatch = os.urandom(16)
        loop = asyncio.get_running_loop()
        try:
            inputs = [self.stage_input(batch)]
            for stage in range(self.num_stages):
                inputs.append(await self._forward_stage(stage, inputs[stage], microbatch))

            def loss_and_grad() -> tuple[float, torch.Tensor]:
                output = inputs[-1].detach().requires_grad_(True)
                loss = loss_fn(output, batch)
                loss.backward()
                grad = output.grad if output.grad is not None else torch.zeros_like(output)
                return float(loss.detach()), grad

            loss, grad = await loop.run_in_executor(None, loss_and_grad)
            for stage in reversed(range(self.num_stages)):
                grad_inputs = await self._backward_stage(stage, inputs[stage], grad, microbatch)
                if stage > 0:
                    if grad_inputs is None:
                        raise PipelineError(f"stage {stage} returned no input gradient for floating inputs")
                    grad = grad_inputs
        except Exception:
            self.microbatches_failed += 1
            raise
        samples = _batch_size(inputs[0])
        self.microbatches_ok += 1
        self._throughput.update_span(samples, started, time.monotonic())
        return loss, samples

    def stats(self) -> dict:
        """Counters and the known servers' measured throughput per stage."""
        return {"microbatches_ok": self.microbatches_ok, "microbatches_failed": self.microbatches_failed,
                "retries": self.retries, "samples_per_s": self.samples_per_s, "duplicates": dict(self.duplicates),
                "stages": [{peer: b.throughput(peer) for peer in b.peers} for b in self.balancers]}


def _batch_size(inputs: torch.Tensor) -> int:
    return int(inputs.shape[0]) if inputs.dim() > 0 else 1
