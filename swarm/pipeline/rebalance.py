"""Adaptive rebalancing between pipeline stages (algorithms.md 1.5): the leximin decision and its loop.

The decision is pure (:func:`plan_move`, :func:`choose_stage`): from every stage server's record
(stage, throughput ``tau`` in samples/s, queue length, memory, when it last moved) and the stages'
relative costs ``F_s`` (FLOPs per sample, ``Task.stage_cost``), a peer's effective speed is
``rho_i = tau_i * F_s(i)``, a stage's capacity ``c_s = sum rho_i / F_s`` samples/s and the pipeline's
throughput ``min_s c_s``. A candidate move of peer ``i`` from stage ``a`` (which keeps more than
``min_peers_per_stage`` servers; ``i`` not moved in the last ``3 T``; ``i`` can hold stage ``b``)
gives ``c'_a = c_a - rho_i / F_a``, ``c'_b = c_b + rho_i / F_b``. It is accepted iff the sorted new
capacities beat the sorted old ones at the first index where they differ by more than
``h * min(c)`` (hysteresis ``h = 0.05``): "leximin". Among accepted moves the lexicographically best
wins, ties broken by ``sha256(peer_id | period)``, so every peer computing from the same snapshot
picks the same mover. A period is skipped when no stage is backlogged (mean queue < 1), unless a
stage has no server at all (a refill never waits).

:class:`Rebalancer` runs the decision every ``period`` seconds (jittered +-10 %) on a server: when
this peer is the chosen mover it writes a claim under ``{run_id}.rebalance_claim.{period index}``
(its own signed subkey), re-reads it after ``claim_wait`` seconds and moves only if its id is the
lowest among the claimants, through the caller's ``move(stage)`` coroutine (which migrates the
server: :meth:`swarm.pipeline.server.StageServer.switch` plus the stage's state download).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import random
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterable, Protocol, Sequence

__all__ = ["LoadView", "Move", "capacities", "speeds", "leximin_better", "plan_move", "choose_stage", "Rebalancer",
           "claim_key", "HYSTERESIS", "compute_to_comm_ratio"]

logger = logging.getLogger(__name__)

HYSTERESIS = 0.05  # h of the accept rule
COOLDOWN_PERIODS = 3  # a peer that moved within 3 T does not move again


class LoadView(Protocol):
    """What the decision reads of a server's record (:class:`swarm.pipeline.registry.StageRecord` has it)."""

    peer_id: str
    stage: int
    samples_per_s: float
    queue: int
    last_moved_at: float


@dataclass(frozen=True)
class Move:
    """The decision of one period: ``peer_id`` leaves stage ``source`` for stage ``target``."""

    peer_id: str
    source: int
    target: int
    before: tuple[float, ...]  # capacities per stage (samples/s), in stage order
    after: tuple[float, ...]


def _speed(record: LoadView, costs: Sequence[float]) -> float:
    """rho_i = tau_i * F_s(i): the peer's speed in cost units per second (0 unmeasured or a bad value)."""
    tau = float(record.samples_per_s)
    return tau * costs[record.stage] if math.isfinite(tau) and tau > 0 else 0.0


def speeds(records: Sequence[LoadView], costs: Sequence[float]) -> list[float]:
    """rho of every record; a server not measured yet (it just joined or moved: tau 0) counts at the
    mean speed of the measured ones (1.0 if none is), so that it is neither ignored nor chased."""
    measured = [_speed(r, costs) for r in records]
    known = [v for v in measured if v > 0]
    default = sum(known) / len(known) if known else 1.0
    return [v if v > 0 else default for v in measured]


def capacities(records: Iterable[LoadView], costs: Sequence[float], impute: bool = False) -> list[float]:
    """``c_s = sum_{i in s} rho_i / F_s`` in samples/s for every stage (0 for an empty one);
    ``impute``: unmeasured servers count as in :func:`speeds`."""
    records = [r for r in records if 0 <= r.stage < len(costs)]
    rho = speeds(records, costs) if impute else [_speed(r, costs) for r in records]
    caps = [0.0] * len(costs)
    for r, v in zip(records, rho):
        caps[r.stage] += v / costs[r.stage]
    return caps


def leximin_better(new: Sequence[float], old: Sequence[float], hysteresis: float = HYSTERESIS) -> bool:
    """Whether capacities ``new`` beat ``old``: sorted ascending, at the first index where they differ
    by more than ``hysteresis * min(old)`` the new one is larger (equal within that margin: False)."""
    a, b = sorted(new), sorted(old)
    margin = hysteresis * (b[0] if b else 0.0)
    for x, y in zip(a, b):
        if abs(x - y) > margin:
            return x > y
    return False


def _tiebreak(peer_id: str, period: int) -> bytes:
    return hashlib.sha256(f"{peer_id}|{period}".encode()).digest()


def plan_move(records: Sequence[LoadView], costs: Sequence[float], *, period: int, now: float,
              period_seconds: float, min_peers_per_stage: int = 1, hysteresis: float = HYSTERESIS,
              can_host: Callable[[LoadView, int], bool] | None = None,
              require_backlog: bool = True) -> Move | None:
    """The move of period ``period`` (an integer every peer agrees on, e.g. ``floor(dht_time / T)``),
    or None. ``records``: one per live server (stage in ``[0, len(costs))``; others are ignored);
    ``costs``: ``F_s`` > 0 per stage; ``now`` and ``last_moved_at`` on the same (DHT) clock;
    ``can_host(record, stage)``: whether that peer has the memory for the stage (default: all can);
    ``require_backlog``: skip the period when every stage's mean queue is below 1 (a stage with no
    server is refilled regardless)."""
    if not costs or any(not (c > 0 and math.isfinite(c)) for c in costs):
        raise ValueError(f"stage costs must be positive and finite, got {list(costs)}")
    records = [r for r in records if 0 <= r.stage < len(costs)]
    rho_of = dict(zip((id(r) for r in records), speeds(records, costs)))
    caps = capacities(records, costs, impute=True)
    members: list[list[LoadView]] = [[] for _ in costs]
    for r in records:
        members[r.stage].append(r)
    empty = any(not m for m in members)
    if require_backlog and not empty:
        queues = [sum(max(float(r.queue), 0.0) for r in m) / len(m) for m in members]
        if max(queues) < 1:
            return None
    best: tuple[tuple[float, ...], bytes, Move] | None = None
    for r in records:
        a = r.stage
        if len(members[a]) <= min_peers_per_stage:
            continue
        if now - float(r.last_moved_at) < COOLDOWN_PERIODS * period_seconds:
            continue
        rho = rho_of[id(r)]
        for b in range(len(costs)):
            if b == a or (can_host is not None and not can_host(r, b)):
                continue
            new = list(caps)
            new[a] = max(new[a] - rho / costs[a], 0.0)
            new[b] += rho / costs[b]
            if not leximin_better(new, caps, hysteresis):
                continue
            key = (tuple(sorted(new)), _tiebreak(r.peer_id, period))
            # the lexicographically best sorted vector; among equal ones the smallest hash
            if best is None or key[0] > best[0] or (key[0] == best[0] and key[1] < best[1]):
                best = (key[0], key[1], Move(r.peer_id, a, b, tuple(caps), tuple(new)))
    return best[2] if best is not None else None


def choose_stage(records: Sequence[LoadView], costs: Sequence[float], speed: float | None = None,
                 can_host: Callable[[int], bool] | None = None) -> int:
    """``--stage auto``: the stage where a new server raises the pipeline's throughput most. An empty
    stage first (the lowest index); else the leximin-best capacities after adding ``speed`` (its
    ``rho`` in cost units/s; default: the mean of the known servers', 1.0 if none) to each stage in
    turn (unmeasured servers counted as in :func:`speeds`), ties to the stage with the fewest
    servers, then the lowest index. ``can_host(stage)``: whether this peer's memory holds the stage.
    Raises ValueError if no stage fits."""
    allowed = [s for s in range(len(costs)) if can_host is None or can_host(s)]
    if not allowed:
        raise ValueError("no stage fits this peer's memory")
    records = [r for r in records if 0 <= r.stage < len(costs)]
    caps = capacities(records, costs, impute=True)
    count = [sum(r.stage == s for r in records) for s in range(len(costs))]
    for s in allowed:
        if not count[s]:
            return s
    if speed is None:
        rho = speeds(records, costs)
        speed = sum(rho) / len(rho) if rho else 1.0
    best_stage, best_key = allowed[0], None
    for s in allowed:
        new = list(caps)
        new[s] += speed / costs[s]
        key = (tuple(sorted(new)), -count[s])
        if best_key is None or key > best_key:
            best_stage, best_key = s, key
    return best_stage


def compute_to_comm_ratio(hidden: int, layers: int, bandwidth: float, flops: float) -> float:
    """The square-cube law (algorithms.md 1.6): compute time over communication time of one stage of
    ``layers`` transformer blocks of width ``hidden`` on a device of ``flops`` FLOP/s behind a link of
    ``bandwidth`` bytes/s, with 8-bit activations and gradients (``2 T d`` bytes per boundary):
    ``48 L d B / F``, independent of the tokens per microbatch. >= 1: the stage need not wait for
    the network. E.g. ``compute_to_comm_ratio(4096, 1, 62.5e6, 25e12)`` = 0.4915."""
    if hidden <= 0 or layers <= 0 or bandwidth <= 0 or flops <= 0:
        raise ValueError("hidden, layers, bandwidth and flops must be positive")
    return 48.0 * layers * hidden * bandwidth / flops


def claim_key(run_id: str, period: int) -> str:
    """The DHT key under which the movers of one period claim (subkey: each claimant's own marker)."""
    return f"{run_id}.rebalance_claim.{period}"


@dataclass
class _Self:
    peer_id: str
    stage: int


class Rebalancer:
    """The periodic rebalancing loop of one stage server (asyncio, on the node's loop).

    - ``fetch()``: coroutine returning every live server's record (a sequence of :class:`LoadView`;
      e.g. ``registry.fetch_stages`` flattened) including this peer's own;
    - ``me()``: this peer's ``(peer_id, stage)`` now; ``move(stage)``: coroutine that migrates this
      server to ``stage`` (it returns once it serves there);
    - ``costs``: ``F_s`` per stage; ``period`` (300 s) +-``jitter`` (10 %); ``claim_wait`` (10 s);
      ``can_host(record, stage)`` as in :func:`plan_move`; ``clock``: DHT time (``dht.get_dht_time``).
    Counters: ``periods``, ``moves`` (this peer's), ``last_plan`` (the latest decision, or None)."""

    def __init__(self, node: Any, run_id: str, costs: Sequence[float], fetch: Callable[[], Awaitable[Sequence[Any]]],
                 me: Callable[[], tuple[str, int]], move: Callable[[int], Awaitable[None]], *,
                 period: float = 300.0, jitter: float = 0.1, claim_wait: float = 10.0,
                 min_peers_per_stage: int = 1, can_host: Callable[[LoadView, int], bool] | None = None,
                 clock: Callable[[], float] | None = None, require_backlog: bool = True):
        if not period > 0:
            raise ValueError(f"the rebalance period must be positive, got {period}")
        from dht import get_dht_time

        self.node, self.run_id, self.costs = node, run_id, list(costs)
        self.fetch, self.me, self.move = fetch, me, move
        self.period, self.jitter, self.claim_wait = float(period), float(jitter), float(claim_wait)
        self.min_peers_per_stage, self.can_host = min_peers_per_stage, can_host
        self.require_backlog = require_backlog
        self.clock = clock or get_dht_time
        self.periods = self.moves = 0
        self.last_plan: Move | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        """Start the loop on the running event loop."""
        if self._task is None:
            self._task = asyncio.ensure_future(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.period * (1 + random.uniform(-self.jitter, self.jitter)))
            try:
                await self.run_period()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - a failed period (DHT unreachable, move failed) is retried next time
                logger.warning("rebalancing period failed: %s", e)

    async def run_period(self) -> Move | None:
        """One period: decide, and if this peer is the mover, claim and move. Returns the move this
        peer made (None: no move, or another peer's)."""
        self.periods += 1
        now = self.clock()
        period = int(now // self.period)
        records = list(await self.fetch())
        peer_id, stage = self.me()
        if not any(r.peer_id == peer_id for r in records):
            return None  # this peer is not announced yet (or is migrating): its view is incomplete
        plan = plan_move(records, self.costs, period=period, now=now, period_seconds=self.period,
                         min_peers_per_stage=self.min_peers_per_stage, can_host=self.can_host,
                         require_backlog=self.require_backlog)
        self.last_plan = plan
        if plan is None or plan.peer_id != peer_id or plan.source != stage:
            return None
        if not await self._claim(period, peer_id):
            logger.info("rebalancing: another peer claimed period %d first", period)
            return None
        logger.info("rebalancing: moving from stage %d to stage %d (capacities %s -> %s)", plan.source, plan.target,
                    [round(c, 2) for c in plan.before], [round(c, 2) for c in plan.after])
        await self.move(plan.target)
        self.moves += 1
        return plan

    async def _claim(self, period: int, peer_id: str) -> bool:
        """Write this peer's claim for ``period``, wait ``claim_wait``, proceed iff it has the lowest id."""
        key = claim_key(self.run_id, period)
        subkey = self.node.signature_validator.ownership_marker
        expiration = self.clock() + 3 * self.period
        await self.node.store(key, {"peer_id": peer_id}, expiration, subkey=subkey)
        await asyncio.sleep(self.claim_wait)
        found = await self.node.get(key, latest=True)
        claimants = {peer_id}
        if found is not None and isinstance(found.value, dict):
            for item in found.value.values():
                value = getattr(item, "value", None)
                if isinstance(value, dict) and isinstance(value.get("peer_id"), str) and len(value["peer_id"]) <= 128:
                    claimants.add(value["peer_id"])
        return min(claimants) == peer_id
