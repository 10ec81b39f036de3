"""Averager: average a set of tensors with peers that never met, through the DHT.

Two faces of one implementation: :class:`AsyncAverager`, the asyncio core, runs over a
:class:`dht.DHTNode` on the caller's event loop (simulations on :mod:`dht.peer.virtual_clock` and
:mod:`dht.peer.memory_transport` use it directly); :class:`Averager` is its thin synchronous facade
over a :class:`dht.DHT` (the core runs on the DHT's background loop).

>>> from dht import DHT
>>> from averaging import Averager
>>> dht = DHT(initial_peers=[...])
>>> with Averager([model.weight, model.bias], dht, prefix="my-run/params", target_group_size=16) as averager:
...     result = averager.step(weight=batch_size)        # blocks; tensors now hold the group's average
...     handle = averager.step(wait=False)               # a Future: train on while the group averages
...     result = handle.result()

Each step: snapshot the tensors, find a group under ``prefix`` (matchmaking), run the butterfly
all-reduce with exact recovery (:mod:`averaging.allreduce`), then write the result into the tensors.
A round that fails (e.g. a member cancelled its step right after the group formed) is retried with
a new group until the step's deadline. On failure ``step`` raises :class:`AveragingError` and
leaves the tensors unchanged; a cancelled step tells its group at once (part streams for that
round are refused), so the others retry without waiting for timeouts. Hold
``averager.lock`` while you modify the tensors from another thread during a ``wait=False`` step.

>>> averager = AsyncAverager([weights], node, prefix="my-run/params")   # on node's loop (a DHTNode)
>>> result = await averager.step(weight=32)
>>> averager.close()

Time: durations and timeouts come from the running loop's clock (``loop.time()``), record
expirations and matchmaking deadlines from the node's clock (``node.clock()``, DHT time); on the
virtual clock both follow virtual time, so a simulated round takes no wall time waiting.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import hashlib
import logging
import math
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from dht import DHT, DHTNode, PeerID

from . import compression as compression_module
from .allreduce import AllReduceService, Reducer, RoundConfig, weighted_mean
from .errors import AveragingError
from .matchmaking import Matchmaker, next_group_bits
from .partition import flatten, unflatten_into
from .protocol import MAX_INFO_BYTES, packed_size
from .sparse_allgather import SparseAllGatherService
from .transcript import RoundTranscript

__all__ = ["AsyncAverager", "Averager", "StepResult"]

logger = logging.getLogger(__name__)

_live: "weakref.WeakSet[Averager]" = weakref.WeakSet()  # shut down at interpreter exit, before their DHTs


@atexit.register
def _shutdown_at_exit() -> None:
    # registered after dht.facade's hook (this module imports dht first), so it runs before it
    for averager in list(_live):
        try:
            averager.shutdown(timeout=5.0)
        except Exception as e:  # noqa: BLE001 - exiting anyway
            logger.debug("shutting an averager down at exit failed: %s", e)


@dataclass
class StepResult:
    """What one averaging step did."""

    group_id: str  # hex
    members: list[PeerID]  # the group, in part order
    survivors: list[PeerID]  # whose values are in the result (members that failed are excluded)
    parts: list[tuple[int, int, list[PeerID]]]  # (start, end, contributors) of the flat vector
    recovered_ranges: list[tuple[int, int]]  # re-reduced among survivors after a failure
    gathered: dict[PeerID, Any]  # the ``gather`` value of every member
    bytes_sent: int  # on the wire, after compression
    bytes_received: int
    matchmaking_seconds: float
    allreduce_seconds: float
    recovery_seconds: float
    transcript: RoundTranscript | None = None  # commitments on: signed digests and parts seen (averaging.transcript)


def _resolve_reducer(aggregator: str | Callable) -> tuple[str, Reducer]:
    if callable(aggregator):
        return getattr(aggregator, "__name__", "custom"), aggregator
    if aggregator == "mean":
        return "mean", weighted_mean
    try:
        from . import aggregators  # robust aggregators
    except ImportError:
        raise ValueError(f"unknown aggregator {aggregator!r}") from None
    return aggregator, aggregators.as_reducer(aggregators.get(aggregator))


_INLINE_ELEMS = 1 << 16  # vectors up to this many values are copied on the event loop (a thread hop costs more)

_OPTIONS_DOC = """
    - ``target_group_size`` (16): largest group; ``min_group_size`` (2): smallest worth averaging.
    - ``compression``: codec name or instance (:mod:`averaging.compression`), both directions; a
      sparse codec (``sparseloco``, ``demo``) is averaged by all-gather (:mod:`averaging.sparse_allgather`).
    - ``aggregator``: ``"mean"`` (weighted), a name from :mod:`averaging.aggregators`, or a callable
      ``f(x [n, d], weights [n]) -> [d]``.
    - ``client_mode``: cannot accept connections (defaults to the DHT's mode); owns no part.
    - ``bandwidth``: MB/s announced for load balancing; None: measured from previous rounds.
    - ``initial_group_bits``: Moshpit group key bits (e.g. ``"0110"``); groups smaller than the swarm
      mix across rounds because group-mates get distinct keys.
    - ``min_matchmaking_time`` (3 s), ``request_timeout`` (2 s): matchmaking timing.
    - ``sender_timeout`` (5 s): a member silent this long mid-round is excluded;
      ``reducer_timeout`` (2 x sender_timeout, at least 1.5 x): an owner silent this long has failed
      (an owner waits up to sender_timeout for a stalled member before it can answer). A healthy
      member is never excluded for a stalled or frozen one: nothing a member does between the
      group's formation and its all-reduce waits for other peers (the withdrawal of its matchmaking
      declaration runs in the background).
    - ``default_timeout`` (60 s): a step's limit when ``step(timeout=None)``.
    - ``chunk_bytes`` (1 MiB): values per streamed chunk, as float32 bytes.
    - ``banned`` (None): ``f(peer_id) -> bool``; matchmaking never groups with a banned peer (neither
      leads it, nor follows it, nor accepts a group holding it) and the all-reduce never accepts its
      parts or uses its results. Called on the event loop: keep it cheap (e.g. a set lookup).
    - ``commitments`` (False): commit-before-reveal: every part sent and every result returned carries
      a signed SHA-256 digest (the peer's identity; one per part, about 140 bytes), a part that does
      not match its digest is excluded, and ``StepResult.transcript`` holds what was signed and seen
      (:mod:`averaging.transcript`). Peers group only with peers of the same setting.

    Memory: a round holds a snapshot and a result vector (float32, as many values as the tensors);
    after a round that succeeded both are kept for the next one, so an averager holds 2x the
    tensors' float32 size between rounds (re-allocating them cost a page fault per 4 KiB per round).
    """


class AsyncAverager:
    """The asyncio core: averages ``tensors`` with other peers under ``prefix``, over ``node`` (a
    :class:`dht.DHTNode` and its P2P peer). Create, step and close it on the node's event loop::

        averager = AsyncAverager(tensors, node, "my-run/params", target_group_size=16)
        result = await averager.step(weight=32)    # tensors now hold the group's weighted mean
        averager.close()                           # or: async with AsyncAverager(...) as averager

    Options (the same as :class:`Averager`'s):
    """
    __doc__ = (__doc__ or "") + _OPTIONS_DOC

    def __init__(self, tensors: Sequence[torch.Tensor], node: DHTNode, prefix: str, target_group_size: int = 16,
                 min_group_size: int = 2, compression: Any = None, aggregator: str | Callable = "mean",
                 client_mode: bool | None = None, bandwidth: float | None = None, *, initial_group_bits: str = "",
                 min_matchmaking_time: float = 3.0, request_timeout: float = 2.0, sender_timeout: float = 5.0,
                 reducer_timeout: float | None = None, default_timeout: float = 60.0, chunk_bytes: int = 1 << 20,
                 banned: Callable[[PeerID], bool] | None = None, commitments: bool = False):
        if not tensors or not all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in tensors):
            raise ValueError("tensors must be a non-empty sequence of floating-point torch tensors")
        if not 2 <= min_group_size <= target_group_size:
            raise ValueError("need 2 <= min_group_size <= target_group_size")
        if any(c not in "01" for c in initial_group_bits):
            raise ValueError("initial_group_bits must be a string of 0 and 1")
        if not sender_timeout > 0:
            raise ValueError("sender_timeout must be positive")
        if reducer_timeout is not None and not reducer_timeout >= 1.5 * sender_timeout:
            # a healthy owner cannot reduce while it waits (up to sender_timeout) for a stalled member's
            # values: a shorter reducer_timeout would make its senders drop it for the stalled one
            raise ValueError(f"reducer_timeout must be at least 1.5 x sender_timeout ({1.5 * sender_timeout:g} s)")
        self.tensors = list(tensors)
        self.node, self.prefix = node, prefix
        self.codec = compression_module.get(compression)
        self.aggregator_name, self.reducer = _resolve_reducer(aggregator)
        self.client_mode = node.client_mode if client_mode is None else client_mode
        self.announced_bandwidth: float | None = bandwidth
        self.measured_bandwidth: float | None = None
        self.sender_timeout = sender_timeout
        self.reducer_timeout = reducer_timeout or 2 * sender_timeout
        self.default_timeout = default_timeout
        self.chunk_elems = max(chunk_bytes // 4, 1024)
        self.lock = threading.Lock()  # held while the tensors are read or written (other threads may train)
        self.size = sum(t.numel() for t in self.tensors)
        self.banned, self.commitments = banned, bool(commitments)
        schema = repr([(tuple(t.shape), str(t.dtype)) for t in self.tensors] + [self.codec.name, self.aggregator_name]
                      + (["commitments"] if self.commitments else []))
        self.schema_hash = hashlib.sha256(schema.encode()).digest()[:16]
        self.closed = False
        # vectors of self.size float32 kept from rounds that succeeded, for the next snapshot and result:
        # fresh ones cost a page fault per 4 KiB every round (up to 2 kept: 2x the tensors' memory)
        self._buffers: list[torch.Tensor] = []
        self._buffers_lock = threading.Lock()
        self._service: AllReduceService | SparseAllGatherService
        if getattr(self.codec, "sparse", False):  # sparse contributions: all-gather (averaging.sparse_allgather)
            if self.commitments:
                raise ValueError(f"commitments are not supported with the sparse codec {self.codec.name!r}")
            bind = getattr(self.codec, "bind", None)
            if callable(bind):  # the codec tiles each tensor by its shape (demo)
                bind([tuple(t.shape) for t in self.tensors])
            self._service = SparseAllGatherService(node.p2p, prefix, round_timeout=default_timeout * 2)
        else:
            self._service = AllReduceService(node.p2p, prefix, round_timeout=default_timeout * 2)
        self._matchmaker = Matchmaker(node.p2p, node, prefix, self.schema_hash, target_group_size=target_group_size,
                                      min_group_size=min_group_size, min_matchmaking_time=min_matchmaking_time,
                                      request_timeout=request_timeout, client_mode=self.client_mode,
                                      banned=self._is_banned)
        self._matchmaker.group_bits = initial_group_bits

    def _is_banned(self, peer_id: PeerID) -> bool:
        return self.banned is not None and bool(self.banned(peer_id))

    @property
    def target_group_size(self) -> int:
        """Largest group for the next steps; may be changed between steps (e.g. to the number of
        peers known to be ready, so that a group assembles as soon as they all joined)."""
        return self._matchmaker.target_group_size

    @target_group_size.setter
    def target_group_size(self, value: int) -> None:
        if not self._matchmaker.min_group_size <= value:
            raise ValueError(f"target_group_size must be at least min_group_size={self._matchmaker.min_group_size}")
        self._matchmaker.target_group_size = int(value)

    @property
    def group_bits(self) -> str:
        """The Moshpit group key bits of the next step (they move on after every group formed)."""
        return self._matchmaker.group_bits

    @property
    def bandwidth(self) -> float | None:
        """MB/s announced to the group: the configured value, else the measured one, else None."""
        if self.client_mode:
            return 0.0
        return self.announced_bandwidth if self.announced_bandwidth is not None else self.measured_bandwidth

    async def step(self, weight: float = 1.0, timeout: float | None = None, gather: Any = None,
                   matchmaking_timeout: float | None = None, scope: str = "", allow_retries: bool = True) -> StepResult:
        """Average once (the arguments as in :meth:`Averager.step`); the snapshot of the tensors is
        taken now, under ``self.lock``. Raises AveragingError (tensors unchanged) if the round fails."""
        self.check_step(weight, gather)
        loop = asyncio.get_running_loop()
        if self.size <= _INLINE_ELEMS:
            snapshot = self.take_snapshot()
        else:
            snapshot = await loop.run_in_executor(None, self.take_snapshot)
        return await self.run_step(snapshot, float(weight), timeout, gather, matchmaking_timeout, scope, allow_retries)

    def check_step(self, weight: float, gather: Any) -> None:
        """ValueError/AveragingError if a step with these arguments cannot start (any thread)."""
        if self.closed:
            raise AveragingError("the averager is shut down")
        if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight > 0):
            raise ValueError(f"weight must be a positive finite number, got {weight!r}")
        gather_bytes = packed_size(gather)
        if gather_bytes is None or gather_bytes > MAX_INFO_BYTES - 1024:
            raise ValueError(f"gather must be a msgpack value of at most {MAX_INFO_BYTES - 1024} bytes packed")

    def take_snapshot(self) -> torch.Tensor:
        """The tensors as one flat float32 vector, copied under ``self.lock`` (any thread)."""
        with self.lock:
            return flatten(self.tensors, out=self._take_buffer())

    async def run_step(self, snapshot: torch.Tensor, weight: float, timeout: float | None = None, gather: Any = None,
                       matchmaking_timeout: float | None = None, scope: str = "", allow_retries: bool = True
                       ) -> StepResult:
        """The step after its snapshot (from :meth:`take_snapshot`, which this takes over): find a
        group, all-reduce, write the result into the tensors. Retries as :meth:`Averager.step` says."""
        loop = asyncio.get_running_loop()
        timeout = timeout or self.default_timeout
        started = loop.time()  # durations on the loop's clock; DHT time only for the matchmaker's deadline
        deadline = started + timeout
        matchmaking_deadline = deadline if matchmaking_timeout is None else min(deadline, started + matchmaking_timeout)
        info = {"size": self.size, "bandwidth": self.bandwidth, "gather": gather, "min_part": 0}
        self._matchmaker.scope = scope
        while True:
            dht_deadline = self.node.clock() + (matchmaking_deadline - loop.time())
            group, me = await self._matchmaker.look_for_group(dht_deadline, info)
            try:
                # the key moves on as soon as the group is assembled (as every member's does, whatever the
                # round's outcome at each): Moshpit's keys stay balanced, and a retry looks under the new key
                self._matchmaker.group_bits = next_group_bits(self._matchmaker.group_bits, group.group_id, me,
                                                              len(group.members), self._matchmaker.target_group_size)
                matchmaking_seconds = loop.time() - started
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise AveragingError(f"the step's timeout of {timeout} s ran out in matchmaking")
                try:
                    result, outcome = await asyncio.wait_for(
                        self._service.run(RoundConfig(group, me, weight, self.codec, self.reducer, self.chunk_elems,
                                                      self.sender_timeout, self.reducer_timeout, self._is_banned,
                                                      self.node.p2p.identity if self.commitments else None,
                                                      self.prefix),
                                          snapshot, result=self._take_buffer()),
                        remaining)
                except asyncio.TimeoutError:
                    raise AveragingError(
                        f"the all-reduce did not finish within the step's timeout of {timeout} s") from None
                break
            except AveragingError as e:
                # (after a failure the buffers are dropped: a cancelled executor job may still write into them)
                if not allow_retries or loop.time() >= min(deadline, matchmaking_deadline):
                    raise
                logger.info("averaging round %s failed (%s); looking for another group", group.group_id.hex()[:8], e)
            finally:  # also when cancelled before the round started here: the others stop waiting for us at once
                self._service.finish(group.group_id)

        def write_back() -> None:
            with self.lock:
                unflatten_into(result, self.tensors)

        if self.size <= _INLINE_ELEMS:
            write_back()
        else:
            await loop.run_in_executor(None, write_back)
        self._give_back(snapshot, result)
        if outcome.seconds > 0 and not self.client_mode:
            rate = (outcome.bytes_sent + outcome.bytes_received) / 2 / outcome.seconds / 1e6
            previous = self.measured_bandwidth
            self.measured_bandwidth = rate if previous is None else 0.7 * previous + 0.3 * rate
        gathered = {}
        for peer_id, peer_info in zip(group.members, group.gathered):
            gathered[peer_id] = peer_info.get("gather") if isinstance(peer_info, dict) else None
        if outcome.transcript is not None:
            outcome.transcript.aggregator = self.aggregator_name
        return StepResult(group.group_id.hex(), outcome.members, outcome.survivors, outcome.parts,
                          outcome.recovered_ranges, gathered, outcome.bytes_sent, outcome.bytes_received,
                          matchmaking_seconds, outcome.seconds, outcome.recovery_seconds, outcome.transcript)

    def _take_buffer(self) -> torch.Tensor | None:
        with self._buffers_lock:
            return self._buffers.pop() if self._buffers else None

    def _give_back(self, *buffers: torch.Tensor) -> None:
        with self._buffers_lock:
            self._buffers.extend(buffers)
            del self._buffers[2:]

    def close(self) -> None:
        """Stop serving this prefix (idempotent; on the node's loop). The node is left running."""
        if self.closed:
            return
        self.closed = True
        self._service.close()
        self._matchmaker.close()

    async def __aenter__(self) -> "AsyncAverager":
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        self.close()


def _core_attribute(name: str, doc: str) -> property:
    """An attribute of the facade that is the core's (read and written there)."""
    return property(lambda self: getattr(self._core, name), lambda self, value: setattr(self._core, name, value),
                    doc=doc)


class Averager:
    """Averages ``tensors`` with other peers under ``prefix``: the synchronous facade of
    :class:`AsyncAverager`, which runs on ``dht``'s background event loop.
    """
    __doc__ = (__doc__ or "") + _OPTIONS_DOC

    def __init__(self, tensors: Sequence[torch.Tensor], dht: DHT, prefix: str, target_group_size: int = 16,
                 min_group_size: int = 2, compression: Any = None, aggregator: str | Callable = "mean",
                 client_mode: bool | None = None, bandwidth: float | None = None, *, initial_group_bits: str = "",
                 min_matchmaking_time: float = 3.0, request_timeout: float = 2.0, sender_timeout: float = 5.0,
                 reducer_timeout: float | None = None, default_timeout: float = 60.0, chunk_bytes: int = 1 << 20,
                 banned: Callable[[PeerID], bool] | None = None, commitments: bool = False):
        self.dht = dht
        self._shutdown = False

        async def create(_: DHT, node: DHTNode) -> AsyncAverager:
            return AsyncAverager(
                tensors, node, prefix, target_group_size, min_group_size, compression, aggregator, client_mode,
                bandwidth, initial_group_bits=initial_group_bits, min_matchmaking_time=min_matchmaking_time,
                request_timeout=request_timeout, sender_timeout=sender_timeout, reducer_timeout=reducer_timeout,
                default_timeout=default_timeout, chunk_bytes=chunk_bytes, banned=banned, commitments=commitments)

        self._core: AsyncAverager = dht.run_coroutine(create)
        _live.add(self)

    tensors = _core_attribute("tensors", "The averaged tensors (written at the end of each successful round).")
    prefix = _core_attribute("prefix", "The DHT prefix this averager matches under.")
    lock = _core_attribute("lock", "Held while the tensors are read or written by a round.")
    codec = _core_attribute("codec", "The compression codec (both directions).")
    client_mode = _core_attribute("client_mode", "True: accepts no connections, owns no part.")
    size = _core_attribute("size", "Number of values in the tensors.")
    schema_hash = _core_attribute("schema_hash", "Hash of the tensor shapes, dtypes, codec and aggregator.")
    announced_bandwidth = _core_attribute("announced_bandwidth", "MB/s configured (None: measured).")
    measured_bandwidth = _core_attribute("measured_bandwidth", "MB/s measured over previous rounds.")
    sender_timeout = _core_attribute("sender_timeout", "Seconds of silence after which a member is excluded.")
    reducer_timeout = _core_attribute("reducer_timeout", "Seconds of silence after which an owner has failed.")
    default_timeout = _core_attribute("default_timeout", "A step's limit in seconds when step(timeout=None).")
    target_group_size = _core_attribute("target_group_size", AsyncAverager.target_group_size.__doc__ or "")
    banned = _core_attribute("banned", "f(peer_id) -> bool: peers never grouped with (None: nobody).")

    @property
    def commitments(self) -> bool:
        """True: signed digests of every part and result (fixed at creation: it is in the schema hash)."""
        return self._core.commitments
    _matchmaker = _core_attribute("_matchmaker", "The core's Matchmaker (tests inject faults through it).")

    @property
    def core(self) -> AsyncAverager:
        """The asyncio core (use it on ``self.dht.loop`` only)."""
        return self._core

    @property
    def group_bits(self) -> str:
        return self._core.group_bits

    @property
    def bandwidth(self) -> float | None:
        """MB/s announced to the group: the configured value, else the measured one, else None."""
        return self._core.bandwidth

    def step(self, weight: float = 1.0, timeout: float | None = None, wait: bool = True,
             gather: Any = None, matchmaking_timeout: float | None = None,
             scope: str = "", allow_retries: bool = True) -> StepResult | concurrent.futures.Future:
        """Average once. ``weight`` (e.g. the number of samples) weighs this peer's values; ``gather``
        (any msgpack value, at most about 16 KiB packed: leaders refuse bigger join requests) is
        shared with the group and returned in ``StepResult.gathered``.
        ``matchmaking_timeout`` (default: the whole ``timeout``) bounds the search for a group.
        ``scope`` (e.g. ``"epoch12"``): only peers that step with the same scope are grouped together.
        ``allow_retries`` (True): when a group's round fails (a member cancelled, died or froze and
        too few were left), look for another group, while the matchmaking time and the step's
        ``timeout`` last; the round's key still moved on (Moshpit), so the retry looks under the new one.
        With ``wait=False`` returns a Future at once (training can go on; the tensors change only
        at the end of the round, under ``self.lock``); the snapshot is taken before this returns."""
        if self._shutdown:
            raise AveragingError("the averager is shut down")
        self._core.check_step(weight, gather)
        snapshot = self._core.take_snapshot()
        future = asyncio.run_coroutine_threadsafe(
            self._core.run_step(snapshot, float(weight), timeout, gather, matchmaking_timeout, scope, allow_retries),
            self.dht.loop)
        return future.result() if wait else future

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop serving this prefix (idempotent; waits at most ``timeout`` seconds for the DHT's loop).
        The DHT is left running. An averager left running is shut down at interpreter exit."""
        if self._shutdown:
            return
        self._shutdown = True
        _live.discard(self)

        async def teardown(_: DHT, node: DHTNode) -> None:
            self._core.close()

        try:
            self.dht.run_coroutine(teardown, return_future=True).result(timeout)
        except (RuntimeError, concurrent.futures.TimeoutError):
            pass  # the DHT's loop is already gone (or stopped)

    def __enter__(self) -> "Averager":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.shutdown()
