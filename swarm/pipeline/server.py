"""A stage server: serves one stage of a pipeline run to trainers (algorithms.md 1.3).

:class:`StageServer` registers ``pipe.forward.{run_id}``, ``pipe.backward.{run_id}`` and
``pipe.info.{run_id}`` (:mod:`.protocol`) on its node's P2P and announces a :class:`StageRecord`
under ``{run_id}.stage_load.{stage}`` every ``announce_period`` seconds.

- **forward**: inputs -> outputs under ``torch.no_grad()``; nothing is kept.
- **backward** (stateless): the request carries the stage's inputs and the gradient of its outputs;
  the server re-runs the forward with autograd, computes the parameter gradients and the inputs'
  gradient, and *adds* the parameter gradients to ``module``'s ``.grad`` (``samples_accumulated`` +=
  the batch size, the inputs' first dimension) just before it replies. A backward whose caller gave
  up before its gradients were added adds nothing; one the same caller repeats for the same
  microbatch id (a retry) is answered without adding again. So a backward may go to any server of
  the stage, and a retried one is counted once per server.
- All tensor work runs on one compute thread per server (never on the event loop), in arrival
  order; ``queue`` is the number of requests waiting for or running on it.
- Hostile callers: at most ``max_requests_per_peer`` (4) requests per caller and ``max_requests``
  (32) in all, from arrival until their compute job is over (``overloaded`` beyond; a caller that
  gives up does not free its place before its job is skipped or done); requests larger than the derived limit
  (:func:`.protocol.max_request_bytes` of ``max_elements`` values per tensor) are refused by the
  transport while they arrive (``too_large``); malformed ones, tensors of more than ``max_elements``
  values, non-finite values, inputs the stage cannot run on, and requests for another stage get
  ``bad_request`` with the reason. Nothing a caller sends changes the server's state except a valid
  backward.
- ``samples_per_s`` (announced): the training samples/s this server can sustain on this stage:
  ``1 / (1/tau_forward + 1/tau_backward)`` from two :class:`~.wiring.PerformanceEMA` of its compute
  time per sample (before a backward is measured, ``tau_backward = tau_forward / 2.5``).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import threading
import time
from typing import Any, AsyncIterator, Callable

import torch

from dht import DHTNode, get_dht_time
from dht.peer.errors import BadRequestError, OverloadedError
from dht.peer.slots import Slots
from dht.peer.untrusted import LogLimiter

from . import protocol
from .registry import MAX_ADDRS, MAX_STAGES, StageRecord, announce
from .wiring import BACKWARD_TASK_MULTIPLIER, PerformanceEMA

__all__ = ["StageServer"]

logger = logging.getLogger(__name__)
_bad_requests = LogLimiter(rate=0.2, burst=5.0)
_RECENT_BACKWARDS = 4096  # (caller, microbatch id) pairs remembered to count a retried backward once


class StageServer:
    """Serve stage ``stage`` of run ``run_id`` with ``module`` on ``node``'s P2P.

    ``codec``: how outputs and input gradients are sent (:data:`.protocol.CODECS`; ``"blockwise8"``
    by default, ``"none"`` for exact results); ``max_elements``: values per tensor accepted (bounds
    the request size); ``max_requests_per_peer`` / ``max_requests``: concurrent requests per caller /
    in all; ``announce_period`` (s) and ``expiration`` (s) of the stage record; ``mem_bytes``: the
    memory it offers (announced for the rebalancer); ``relayed``: reachable only through a relay;
    ``device``: where the stage's tensors live (default: the module's parameters' device).

    Use ``await start()`` / ``await stop(drain_timeout=...)``; ``async with paused():`` holds
    backwards off (the stage's optimizer step runs there); ``await switch(stage, module)`` moves it.
    """

    def __init__(self, node: DHTNode, run_id: str, stage: int, module: torch.nn.Module,
                 codec: str = protocol.DEFAULT_CODEC, *, max_elements: int = protocol.DEFAULT_MAX_ELEMENTS,
                 max_requests_per_peer: int = 4, max_requests: int = 32, announce_period: float = 5.0,
                 expiration: float = 30.0, mem_bytes: int = 0, relayed: bool = False,
                 device: torch.device | str | None = None):
        if not 0 <= stage < MAX_STAGES:
            raise ValueError(f"stage must be in 0..{MAX_STAGES - 1}, got {stage}")
        if codec not in protocol.CODECS:
            raise ValueError(f"unknown codec {codec!r}; choose from {', '.join(protocol.CODECS)}")
        if max_elements < 1:
            raise ValueError("max_elements must be at least 1")
        self.max_request_bytes = protocol.max_request_bytes(max_elements)
        limits = node.p2p.limits
        transport_limit = min(limits.max_message_size, limits.stream_memory)
        if self.max_request_bytes > transport_limit:
            raise ValueError(f"max_elements={max_elements} needs requests of up to {self.max_request_bytes} bytes, "
                             f"over this peer's message limit of {transport_limit} bytes (Limits.max_message_size "
                             "and stream_memory): lower max_elements or raise the limits")
        self.node, self.run_id, self.codec, self.max_elements = node, run_id, codec, max_elements
        self.stage, self.module = stage, module
        self.device = torch.device(device) if device is not None else _module_device(module)
        self.announce_period, self.expiration = announce_period, expiration
        self.mem_bytes, self.relayed = int(mem_bytes), relayed
        self.last_moved_at = 0.0
        self.samples_accumulated = 0
        self.forward_ema, self.backward_ema = PerformanceEMA(), PerformanceEMA()
        # forward, backward, bad_request, repeated, abandoned
        self.counters: collections.Counter[str] = collections.Counter()
        self._slots = Slots(max_requests_per_peer, max_requests, "pipeline requests")
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"stage{stage}")
        self._executor_closed = False
        self._expirations: dict[int, float] = {}  # stage -> DHT expiration of this peer's latest record of it
        self._grad_lock = threading.Lock()  # .grad and samples_accumulated change together
        self._recent: collections.OrderedDict[tuple[bytes, bytes], None] = collections.OrderedDict()
        self._queue = 0
        self._pauses = 0
        self._backwards = 0  # backwards admitted and not finished
        self._changed = asyncio.Event()  # set whenever _pauses, _backwards or _queue drops
        self._accepting = False
        self._started = False
        self._announcer: asyncio.Task | None = None
        self._methods = {name: protocol.method(name, run_id)
                         for name in (protocol.FORWARD, protocol.BACKWARD, protocol.INFO)}

    # ---- life cycle

    async def start(self) -> None:
        """Register the handlers and start announcing the stage."""
        if self._started:
            return
        if self._executor_closed:  # started again after stop()
            self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"stage{self.stage}")
            self._executor_closed = False
        p2p = self.node.p2p
        p2p.add_unary_handler(self._methods[protocol.FORWARD], self._serve_forward,
                              max_message_size=self.max_request_bytes)
        p2p.add_unary_handler(self._methods[protocol.BACKWARD], self._serve_backward,
                              max_message_size=self.max_request_bytes)
        p2p.add_unary_handler(self._methods[protocol.INFO], self._serve_info, max_message_size=1024)
        self._started = self._accepting = True
        await self._announce_once()
        self._announcer = asyncio.ensure_future(self._announce_loop())

    async def stop(self, drain_timeout: float = 75.0) -> None:
        """Stop serving: refuse new requests, announce that it left, let the requests in flight finish
        (at most ``drain_timeout`` seconds), then deregister the handlers."""
        if not self._started:
            return
        self._accepting = False
        if self._announcer is not None:
            self._announcer.cancel()
            await asyncio.gather(self._announcer, return_exceptions=True)
            self._announcer = None
        await self._announce_left(self.stage)
        await self._drain(drain_timeout)
        for name in self._methods.values():
            self.node.p2p.remove_handler(name)
        self._started = False
        self._executor.shutdown(wait=False)
        self._executor_closed = True

    async def switch(self, stage: int, module: torch.nn.Module, drain_timeout: float = 75.0) -> None:
        """Serve ``stage`` with ``module`` instead (a migration): stop taking requests for the old
        stage, finish those in flight, announce having left it, then serve and announce the new one;
        the throughput measurements and the accumulated sample count start over."""
        if not 0 <= stage < MAX_STAGES:
            raise ValueError(f"stage must be in 0..{MAX_STAGES - 1}, got {stage}")
        old = self.stage
        self._accepting = False
        await self._drain(drain_timeout)
        self.stage, self.module = stage, module
        self.device = _module_device(module)
        self.forward_ema.reset()
        self.backward_ema.reset()
        with self._grad_lock:
            self.samples_accumulated = 0
            self._recent.clear()
        if old != stage and self._started:
            await self._announce_left(old)
        self._accepting = self._started
        if self._started:
            await self._announce_once()

    async def _drain(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self._queue > 0 and time.monotonic() < deadline:
            self._changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), max(deadline - time.monotonic(), 0.0))

    # ---- what the stage's training uses

    @contextlib.asynccontextmanager
    async def paused(self) -> AsyncIterator[None]:
        """No backward runs inside (those in flight finish first; new ones wait): the stage's
        gradients and parameters can be read and changed. Forwards go on."""
        self._pauses += 1
        try:
            while self._backwards > 0:
                self._changed.clear()
                await self._changed.wait()
            yield
        finally:
            self._pauses -= 1
            self._changed.set()

    def reset_accumulated(self) -> None:
        """Forget the accumulated gradients: ``samples_accumulated = 0`` and every parameter's
        ``.grad = None`` (call it inside :meth:`paused`)."""
        with self._grad_lock:
            self.samples_accumulated = 0
            for p in self.module.parameters():
                p.grad = None

    async def run_exclusive(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` on the compute thread, between requests (nothing else touches the module then)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    @property
    def samples_per_s(self) -> float:
        """Training samples/s this server sustains on its stage (forward + backward), 0.0 unmeasured."""
        forward = self.forward_ema.samples_per_second
        backward = self.backward_ema.samples_per_second
        if forward <= 0 and backward <= 0:
            return 0.0
        if forward <= 0:
            forward = backward * BACKWARD_TASK_MULTIPLIER
        if backward <= 0:
            backward = forward / BACKWARD_TASK_MULTIPLIER
        return 1.0 / (1.0 / forward + 1.0 / backward)

    @property
    def queue(self) -> int:
        """Requests waiting for or running on the compute thread now."""
        return self._queue

    def stats(self) -> dict:
        """Counters and measurements (for ``swarm status``, metrics and tests)."""
        return {"stage": self.stage, "samples_per_s": self.samples_per_s, "queue": self._queue,
                "samples_accumulated": self.samples_accumulated, "paused": self._pauses > 0,
                "forward": self.counters["forward"], "backward": self.counters["backward"],
                "bad_request": self.counters["bad_request"], "repeated": self.counters["repeated"],
                "abandoned": self.counters["abandoned"], "overloaded": self._slots.refused,
                "accepting": self._accepting}

    # ---- announcements

    def record(self) -> StageRecord:
        """This server's current :class:`StageRecord`."""
        addrs = [str(a) for a in self.node.p2p.get_visible_addresses()][:MAX_ADDRS]
        return StageRecord(self.node.peer_id.to_base58(), addrs, self.stage, self.samples_per_s, self._queue,
                           self.mem_bytes, self.last_moved_at, self.relayed)

    def _lifetime(self, stage: int, at_least: float) -> float:
        """Seconds from now for this peer's next record of ``stage``: at least ``at_least``, and
        expiring after every earlier one (the newest expiration wins in the DHT)."""
        now = get_dht_time()
        lifetime = max(at_least, self._expirations.get(stage, 0.0) - now + 0.01)
        self._expirations[stage] = now + lifetime
        return lifetime

    async def _announce_once(self) -> None:
        try:
            await announce(self.node, self.run_id, self.record(), self._lifetime(self.stage, self.expiration))
        except Exception as e:  # noqa: BLE001 - the DHT may be briefly unreachable: the next period retries
            logger.debug("stage %d announcement failed: %s", self.stage, e)

    async def _announce_left(self, stage: int) -> None:
        record = self.record()
        record.stage, record.left = stage, True
        try:  # it expires after the live record, so it wins
            await announce(self.node, self.run_id, record, self._lifetime(stage, self.expiration))
        except Exception as e:  # noqa: BLE001 - then the live record expires on its own
            logger.debug("stage %d leave announcement failed: %s", stage, e)

    async def _announce_loop(self) -> None:
        while True:
            await asyncio.sleep(self.announce_period)
            if self._accepting:
                await self._announce_once()

    # ---- handlers

    def _admit(self, request: Any) -> None:
        if not self._accepting:
            raise OverloadedError(f"this server is not serving stage {self.stage} now (stopping or moving)")
        stage = request.get("s") if isinstance(request, dict) else None
        if isinstance(stage, int) and stage != self.stage:
            raise BadRequestError(f"this server serves stage {self.stage} of run {self.run_id[:64]!r}, not {stage}")

    def _take_slot(self, key: Any) -> None:
        if not self._slots.try_acquire(key):
            per_peer = self._slots.held(key) >= self._slots.per_key
            limit = self._slots.per_key if per_peer else self._slots.total
            scope = "from this peer" if per_peer else "in total"
            raise OverloadedError(f"too many concurrent pipeline requests {scope} (limit {limit}); retry later "
                                  "or ask another server of the stage")

    def _submit(self, job: Callable[[], Any], key: Any, backward: bool) -> "asyncio.Future[Any]":
        """Run ``job`` on the compute thread. The caller's slot (and the queue place) is given back
        when the job is over, not when the handler ends: a caller that gives up cannot pile up jobs."""
        loop = asyncio.get_running_loop()
        self._queue += 1
        if backward:
            self._backwards += 1

        def over(_: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nothing left to account
                loop.call_soon_threadsafe(self._job_over, key, backward)

        future = self._executor.submit(job)
        future.add_done_callback(over)
        return asyncio.wrap_future(future)

    def _job_over(self, key: Any, backward: bool) -> None:
        self._queue -= 1
        if backward:
            self._backwards -= 1
        self._slots.release(key)
        self._changed.set()

    def _refused(self, ctx: Any, e: BadRequestError) -> None:
        self.counters["bad_request"] += 1
        _bad_requests.log(logger, logging.INFO, ctx.peer_id, "pipeline request from %s refused: %s",
                          ctx.peer_id.short(), e)

    async def _await_job(self, job: Callable[[], tuple[dict, float, int]], ctx: Any, wanted: threading.Event,
                         backward: bool) -> tuple[dict, float, int]:
        """The result of ``job`` run by :meth:`_submit` under the caller's slot; a refused request is
        counted and logged, and a caller that gives up clears ``wanted`` (a job not yet done adds nothing)."""
        try:
            return await self._submit(job, ctx.peer_id, backward)
        except BadRequestError as e:
            self._refused(ctx, e)
            raise
        except asyncio.CancelledError:
            wanted.clear()
            raise

    async def _serve_forward(self, request: Any, ctx: Any) -> dict:
        key = ctx.peer_id
        self._take_slot(key)
        try:
            self._admit(request)
        except BaseException:
            self._slots.release(key)
            raise
        module, codec, wanted = self.module, self.codec, threading.Event()
        wanted.set()

        def job() -> tuple[dict, float, int]:
            if not wanted.is_set():
                return {}, 0.0, 0  # the caller gave up while it waited: skip the work
            parsed = protocol.parse_forward_request(request, self.max_elements)
            start = time.perf_counter()
            with torch.no_grad():
                outputs = _call_stage(module, parsed.inputs.to(self.device), self.stage, self.max_elements)
            elapsed = time.perf_counter() - start
            return protocol.forward_reply(outputs, codec), elapsed, _batch_size(parsed.inputs)

        reply, elapsed, size = await self._await_job(job, ctx, wanted, backward=False)
        if module is self.module:
            self.forward_ema.update(size, elapsed)
        self.counters["forward"] += 1
        return reply

    async def _serve_backward(self, request: Any, ctx: Any) -> dict:
        key = ctx.peer_id
        self._take_slot(key)
        try:
            self._admit(request)
            while self._pauses > 0:  # the stage is stepping: wait (the caller's deadline still runs)
                self._changed.clear()
                await self._changed.wait()
            self._admit(request)
        except BaseException:
            self._slots.release(key)
            raise
        module, codec, caller, wanted = self.module, self.codec, ctx.peer_id.raw, threading.Event()
        wanted.set()

        def job() -> tuple[dict, float, int]:
            if not wanted.is_set():
                return {}, 0.0, 0
            parsed = protocol.parse_backward_request(request, self.max_elements)
            assert parsed.grad is not None
            start = time.perf_counter()
            grad_inputs, grads = _stage_backward(module, parsed.inputs.to(self.device), parsed.grad.to(self.device),
                                                 self.stage, self.max_elements, parsed.want_grad_inputs)
            elapsed = time.perf_counter() - start
            size = _batch_size(parsed.inputs)
            with self._grad_lock:  # added only if the reply is still wanted, and once per (caller, microbatch)
                if not wanted.is_set() or module is not self.module:
                    self.counters["abandoned"] += 1
                elif parsed.microbatch and (caller, parsed.microbatch) in self._recent:
                    self.counters["repeated"] += 1
                else:
                    _accumulate(grads)
                    self.samples_accumulated += size
                    if parsed.microbatch:
                        self._recent[(caller, parsed.microbatch)] = None
                        while len(self._recent) > _RECENT_BACKWARDS:
                            self._recent.popitem(last=False)
            return protocol.backward_reply(grad_inputs, codec), elapsed, size

        reply, elapsed, size = await self._await_job(job, ctx, wanted, backward=True)
        if module is self.module and size:
            self.backward_ema.update(size, elapsed)
        self.counters["backward"] += 1
        return reply

    async def _serve_info(self, request: Any, ctx: Any) -> dict:
        protocol.parse_info_request(request)
        return protocol.info_reply(self.stage, self.samples_per_s, self._queue, self.max_elements, self.codec)


def _module_device(module: torch.nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def _batch_size(inputs: torch.Tensor) -> int:
    return int(inputs.shape[0]) if inputs.dim() > 0 else 1


def _call_stage(module: torch.nn.Module, inputs: torch.Tensor, stage: int, max_elements: int) -> torch.Tensor:
    """``module(inputs)``; BadRequestError naming the input if the stage cannot run on it or its
    output has more than ``max_elements`` values (a reply is bounded like a request)."""
    try:
        outputs = module(inputs)
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        raise BadRequestError(f"stage {stage} cannot run on a {str(inputs.dtype).removeprefix('torch.')} input "
                              f"of shape {list(inputs.shape)}: {type(e).__name__}: {str(e)[:200]}") from None
    if not isinstance(outputs, torch.Tensor):
        raise RuntimeError(f"stage {stage} returned {type(outputs).__name__}, not a tensor")
    if outputs.numel() > max_elements:
        raise BadRequestError(f"stage {stage}'s output for an input of shape {list(inputs.shape)} has "
                              f"{outputs.numel()} values, over this server's limit of {max_elements}: send less")
    return outputs


def _stage_backward(module: torch.nn.Module, inputs: torch.Tensor, grad_outputs: torch.Tensor, stage: int,
                    max_elements: int, want_grad_inputs: bool = True
                    ) -> tuple[torch.Tensor | None, list[tuple[torch.nn.Parameter, torch.Tensor]]]:
    """Re-run the forward with autograd; (gradient w.r.t. the inputs, or None for integer inputs or
    when not wanted, [(parameter, its gradient)]), nothing accumulated yet."""
    floating = inputs.is_floating_point() and want_grad_inputs
    if floating:
        inputs = inputs.detach().requires_grad_(True)
    with torch.enable_grad():
        outputs = _call_stage(module, inputs, stage, max_elements)
        if tuple(outputs.shape) != tuple(grad_outputs.shape):
            raise BadRequestError(f"'g' has shape {list(grad_outputs.shape)}, but stage {stage}'s outputs for "
                                  f"these inputs have shape {list(outputs.shape)}")
        params = [p for p in module.parameters() if p.requires_grad]
        wrt = ([inputs] if floating else []) + params
        if not outputs.requires_grad or not wrt:
            return (torch.zeros_like(inputs) if floating else None), []
        grads = torch.autograd.grad(outputs, wrt, grad_outputs.to(outputs.dtype), allow_unused=True)
    grad_inputs = None
    if floating:
        grad_inputs = grads[0] if grads[0] is not None else torch.zeros_like(inputs)
        grads = grads[1:]
    return grad_inputs, [(p, g) for p, g in zip(params, grads) if g is not None]


def _accumulate(grads: list[tuple[torch.nn.Parameter, torch.Tensor]]) -> None:
    with torch.no_grad():
        for p, g in grads:
            if p.grad is None:
                p.grad = g.detach().clone()
            else:
                p.grad.add_(g)
