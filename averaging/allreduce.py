"""Butterfly all-reduce within an agreed group, with exact recovery from failed members.

Phase 0 (the butterfly, algorithms.md §5.2): member ``j`` owns the ranges ``layout.ranges[j]`` of
the flat vector. Every member streams its values for those ranges to ``j`` in chunks (stream
``avg.part``), ``j`` reduces each chunk as soon as every live member delivered it (weighted mean
by default, or any aggregator, computed in member order so the result does not depend on arrival
order), and streams the *averaged values* back; sending, reducing and receiving overlap. The owner
ends with ``{"done": contributors, "mixed": bool}``: which members' values are in every chunk, and
whether a member was dropped after some chunks already included it.

A member that stops sending for ``sender_timeout``, sends a malformed chunk or NaN/Inf values is
excluded (with a logged reason naming it); an owner that stops answering for ``reducer_timeout``
has failed. Then members exchange reports of the failures they saw (``avg.report``, one call per
pair) and agree on the survivors F. Every part whose owner failed, that is mixed, or whose
contributors are not exactly F is re-reduced among F in a recovery phase (the same protocol over
those ranges, split among the survivors), from the same snapshot. So every survivor ends with the
exact weighted mean over F for the whole vector, bit-identical across members, or the round fails
with :class:`AveragingError` and leaves the caller's tensors untouched.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from dht import P2P, P2PError, PeerID, RemoteError, Stream
from dht.p2p import CallContext

from .compression import Codec, CodecError
from .errors import AveragingError
from .partition import Layout, chunk_ranges

__all__ = ["GroupInfo", "AllReduceResult", "Reducer", "weighted_mean", "all_finite", "AllReduceService"]

logger = logging.getLogger(__name__)

# (x [n, len], weights [n]) -> [len]; a reducer with ``chunkwise = True`` may be applied to pieces of a
# part (pipelined); any other sees each part whole, once every live member delivered all of it.
Reducer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def weighted_mean(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``Σ w_i x_i / Σ w_i`` over rows (one matrix-vector product: a single pass over ``x``)."""
    weights = weights.to(x.dtype)
    return (weights / weights.sum()) @ x


def all_finite(x: torch.Tensor) -> bool:
    """True if ``x`` holds no NaN or ±Inf (a float sum first: ~25x cheaper than ``isfinite().all()``;
    only a sum that overflowed from finite values needs the element-wise check)."""
    return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())


weighted_mean.chunkwise = True  # type: ignore[attr-defined]  # may be applied chunk by chunk (pipelined)


@dataclass
class GroupInfo:
    """A group as agreed in matchmaking: the same at every member."""

    group_id: bytes
    members: list[PeerID]  # ordered; the order decides who owns which part
    part_sizes: list[int]  # values each member reduces (0: client-mode or slow peers)
    bandwidths: list[float | None] = field(default_factory=list)
    client_mode: list[bool] = field(default_factory=list)  # cannot be dialed: it calls the others
    gathered: list[Any] = field(default_factory=list)  # metadata each member contributed


@dataclass
class AllReduceResult:
    members: list[PeerID]
    survivors: list[PeerID]
    parts: list[tuple[int, int, list[PeerID]]]  # (start, end, contributors) covering the vector
    recovered_ranges: list[tuple[int, int]]
    bytes_sent: int
    bytes_received: int
    seconds: float
    recovery_seconds: float


class _Owner:
    """The reducing side of one member in one phase."""

    def __init__(self, run: "_Phase"):
        self.run = run
        self.chunks = chunk_ranges(run.layout.ranges[run.me], run.chunk_elems)
        self.pending: list[dict[int, torch.Tensor]] = [{} for _ in self.chunks]
        self.weights: dict[int, float] = {}
        self.delivered = {i: 0 for i in run.active}
        self.alive = set(run.active)
        self.last_progress = {i: time.monotonic() for i in run.active}
        self.encoded: list[dict | None] = [None] * len(self.chunks)
        self.reduced = 0
        self.mixed = False
        self.changed = asyncio.Event()
        self.finished = asyncio.Event()
        if not self.chunks:
            self.finished.set()

    def exclude(self, member: int, reason: str) -> None:
        if member not in self.alive:
            return
        logger.warning("averaging round %s: excluding %s: %s", self.run.group_id.hex()[:8],
                       self.run.members[member], reason)
        self.alive.discard(member)
        self.run.failed.add(member)
        if self.reduced > 0:
            self.mixed = True
        for pending in self.pending:
            pending.pop(member, None)
        self._advance()

    def deliver(self, member: int, index: int, values: torch.Tensor, weight: float, finite: bool | None = None) -> None:
        """``member``'s values for chunk ``index``; ``finite``: already checked (off the event loop)."""
        if member not in self.alive:
            return
        if not (all_finite(values) if finite is None else finite):
            self.exclude(member, "sent NaN or Inf values")
            return
        self.weights[member] = weight
        self.pending[index][member] = values
        self.delivered[member] = index + 1
        self.last_progress[member] = time.monotonic()
        self._advance()

    def _advance(self) -> None:
        if getattr(self.run.reducer, "chunkwise", False):
            self._reduce_chunks()
        else:
            self._reduce_whole_part()
        if not self.alive and self.reduced < len(self.chunks):
            self.finished.set()  # nobody left to reduce for: the part fails
        if self.reduced == len(self.chunks):
            self.finished.set()
        self.changed.set()

    def _reduce_chunks(self) -> None:
        """Chunk-wise reducers (the weighted mean): each chunk as soon as every live member sent it."""
        while self.reduced < len(self.chunks) and self.alive and all(m in self.pending[self.reduced] for m in self.alive):
            order = sorted(self.alive)
            x = torch.stack([self.pending[self.reduced][m] for m in order])
            self._publish(self.reduced, self._reduce(x, order))
            self.pending[self.reduced] = {}
            self.reduced += 1

    def _reduce_whole_part(self) -> None:
        """Other aggregators see the whole part at once, x of shape [members, part length]."""
        if self.reduced or not self.alive or not all(self.delivered[m] == len(self.chunks) for m in self.alive):
            return
        order = sorted(self.alive)
        x = torch.stack([torch.cat([pending[m] for pending in self.pending]) for m in order])
        averaged = self._reduce(x, order)
        offset = 0
        for index, (lo, hi) in enumerate(self.chunks):
            self._publish(index, averaged[offset:offset + hi - lo])
            offset += hi - lo
        self.pending = [{} for _ in self.chunks]
        self.reduced = len(self.chunks)

    def _reduce(self, x: torch.Tensor, order: list[int]) -> torch.Tensor:
        w = torch.tensor([self.weights[m] for m in order], dtype=torch.float32)
        return self.run.reducer(x, w).to(torch.float32).contiguous()

    def _publish(self, index: int, averaged: torch.Tensor) -> None:
        lo, hi = self.chunks[index]
        message = self.run.codec.encode(averaged.contiguous(), lo, result=True)
        self.encoded[index] = message
        self.run.result[lo:hi] = self.run.codec.decode(message, hi - lo)  # exactly what the others get

    @property
    def contributors(self) -> list[int]:
        return sorted(self.alive)

    async def watchdog(self) -> None:
        period = min(0.25, self.run.sender_timeout / 4)
        while not self.finished.is_set():
            await asyncio.sleep(period)
            now = time.monotonic()
            for member in list(self.alive):
                if self.delivered[member] < len(self.chunks) and now - self.last_progress[member] > self.run.sender_timeout:
                    self.exclude(member, f"sent nothing for {self.run.sender_timeout:.1f} s")

    async def serve(self, stream: Stream, member: int, weight: float) -> None:
        """Receive ``member``'s chunks on ``stream`` and send back averaged chunks as they are ready."""
        loop = asyncio.get_running_loop()

        async def receive() -> None:
            for index, (lo, hi) in enumerate(self.chunks):
                message = await stream.recv()
                self.run.bytes_received += _size(message)
                try:
                    values, finite = await _run(loop, self.run.codec, _decode_checked, self.run.codec, message, hi - lo)
                except CodecError as e:
                    self.exclude(member, f"sent a malformed chunk ({e})")
                    return
                self.deliver(member, index, values, weight, finite)
                if member not in self.alive:
                    return

        receiver = asyncio.ensure_future(receive())
        try:
            sent = 0
            while True:
                while sent < self.reduced and member in self.alive:
                    message = self.encoded[sent]
                    await stream.send(message)
                    self.run.bytes_sent += _size(message)
                    sent += 1
                if member not in self.alive:
                    stream.fail_remote("excluded", "you were excluded from this part")
                    return
                if sent == len(self.chunks):
                    await stream.send({"done": self.contributors, "mixed": self.mixed}, end=True)
                    return
                if self.finished.is_set() and self.reduced < len(self.chunks):
                    stream.fail_remote("failed", "the part could not be reduced")
                    return
                self.changed.clear()
                await self.changed.wait()
        except (P2PError, asyncio.TimeoutError) as e:
            self.exclude(member, f"stream failed: {e}")
        finally:
            receiver.cancel()
            await asyncio.gather(receiver, return_exceptions=True)
            if receiver.done() and not receiver.cancelled() and receiver.exception() is not None:
                self.exclude(member, f"stream failed: {receiver.exception()}")


async def _run(loop: asyncio.AbstractEventLoop, codec: Codec, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in the default executor, or right here for codecs that do no per-value work (a
    thread hop costs more than checking and copying one chunk)."""
    if codec.inline:
        return fn(*args)
    return await loop.run_in_executor(None, fn, *args)


def _decode_checked(codec: Codec, message: Any, length: int) -> tuple[torch.Tensor, bool]:
    values = codec.decode(message, length)
    return values, all_finite(values)


def _decode_into(codec: Codec, message: Any, result: torch.Tensor, lo: int, hi: int) -> bool:
    """Decode an owner's averaged chunk into ``result[lo:hi]``; False (and nothing written) if not finite."""
    values = codec.decode(message, hi - lo)
    if not all_finite(values):
        return False
    result[lo:hi] = values
    return True


class _LocalError(AveragingError):
    """This member could not send its own values (e.g. its codec failed): it, not the owner, failed."""


def _size(message: Any) -> int:
    if isinstance(message, dict):
        return sum(v.nbytes if isinstance(v, memoryview) else len(v) if isinstance(v, (bytes, bytearray)) else 8
                   for v in message.values())
    return 8


class _Phase:
    """One phase (0: the butterfly, 1: recovery) of a round, at one member."""

    def __init__(self, service: "AllReduceService", group: GroupInfo, me: int, phase: int, tag: bytes,
                 layout: Layout, active: Sequence[int], flat: torch.Tensor, result: torch.Tensor, weight: float,
                 codec: Codec, reducer: Reducer, chunk_elems: int, sender_timeout: float, reducer_timeout: float):
        self.service, self.group, self.me, self.phase, self.tag = service, group, me, phase, tag
        self.group_id, self.members = group.group_id, group.members
        self.layout, self.active = layout, sorted(active)
        self.flat, self.result, self.weight = flat, result, weight
        self.codec, self.reducer, self.chunk_elems = codec, reducer, chunk_elems
        self.sender_timeout, self.reducer_timeout = sender_timeout, reducer_timeout
        self.failed: set[int] = set()
        self.part_reports: dict[int, tuple[list[int], bool]] = {}  # owner -> (contributors, mixed)
        self.bytes_sent = self.bytes_received = 0
        self.owner = _Owner(self)

    def header(self) -> dict:
        return {"g": self.group_id, "p": self.phase, "t": self.tag, "i": self.me, "w": self.weight}

    async def run(self) -> None:
        watchdog = asyncio.ensure_future(self.owner.watchdog())
        try:
            if self.owner.chunks:
                for index, (lo, hi) in enumerate(self.owner.chunks):
                    self.owner.deliver(self.me, index, self.flat[lo:hi], self.weight)
            await asyncio.gather(*(self._exchange_with(owner) for owner in self.layout.owners() if owner != self.me))
            await self.owner.finished.wait()
            if self.owner.chunks:
                self.part_reports[self.me] = (self.owner.contributors, self.owner.mixed)
                if self.owner.reduced < len(self.owner.chunks):
                    self.failed.add(self.me)
        finally:
            watchdog.cancel()

    async def _exchange_with(self, owner: int) -> None:
        """Send my values for ``owner``'s ranges, receive the averages into ``result``."""
        chunks = chunk_ranges(self.layout.ranges[owner], self.chunk_elems)
        loop = asyncio.get_running_loop()
        peer = self.members[owner]
        try:
            stream = await self.service.p2p.open_stream(peer, self.service.part_method, timeout=self.service.round_timeout)
        except (P2PError, asyncio.TimeoutError) as e:
            self._owner_failed(owner, f"cannot reach it: {e}")
            return

        async def send() -> None:
            await stream.send(self.header())
            for lo, hi in chunks:
                message = await _run(loop, self.codec, self.codec.encode, self.flat[lo:hi], lo, False)
                await stream.send(message)
                self.bytes_sent += _size(message)

        sender = asyncio.ensure_future(send())

        def sender_done(task: asyncio.Future) -> None:  # a local error (not the stream's) fails the exchange now
            error = None if task.cancelled() else task.exception()
            if error is not None and not isinstance(error, P2PError):
                stream.cancel(_LocalError(f"sending my values failed: {type(error).__name__}: {error}"))

        sender.add_done_callback(sender_done)
        try:
            for lo, hi in chunks:
                message = await asyncio.wait_for(stream.recv(), self.reducer_timeout)
                self.bytes_received += _size(message)
                if not await _run(loop, self.codec, _decode_into, self.codec, message, self.result, lo, hi):
                    raise AveragingError("the owner returned NaN/Inf")
            done = await asyncio.wait_for(stream.recv(), self.reducer_timeout)
            contributors, mixed = done["done"], done["mixed"]
            if not (isinstance(contributors, list) and all(isinstance(c, int) for c in contributors)
                    and isinstance(mixed, bool)):
                raise AveragingError("malformed final message")
            self.part_reports[owner] = (sorted(contributors), mixed)
            if self.me not in contributors:
                self.failed.add(self.me)
        except _LocalError as e:
            logger.warning("averaging round %s: %s", self.group_id.hex()[:8], e)
            self.failed.add(self.me)
            stream.cancel()
        except (P2PError, asyncio.TimeoutError, CodecError, AveragingError, KeyError, TypeError) as e:
            reason = "no answer for %.1f s" % self.reducer_timeout if isinstance(e, asyncio.TimeoutError) else str(e)
            if isinstance(e, RemoteError) and e.code == "excluded":
                self.failed.add(self.me)
            self._owner_failed(owner, reason)
            stream.cancel()
        finally:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
            await stream.aclose()

    def _owner_failed(self, owner: int, reason: str) -> None:
        if owner not in self.failed:
            logger.warning("averaging round %s: part owner %s failed: %s", self.group_id.hex()[:8],
                           self.members[owner], reason)
        self.failed.add(owner)


class AllReduceService:
    """Serves ``avg.part`` and ``avg.report`` on a P2P peer and runs rounds for one averager."""

    def __init__(self, p2p: P2P, prefix: str, round_timeout: float = 120.0):
        self.p2p = p2p
        self.round_timeout = round_timeout
        self.part_method, self.report_method = f"avg.part.{prefix}", f"avg.report.{prefix}"
        self._phases: dict[tuple[bytes, int], _Phase] = {}
        self._phase_ready: dict[tuple[bytes, int], asyncio.Event] = {}
        self._reports: dict[bytes, dict[int, asyncio.Future]] = {}
        self._my_reports: dict[bytes, asyncio.Future] = {}
        p2p.add_stream_handler(self.part_method, self._serve_part)
        p2p.add_unary_handler(self.report_method, self._serve_report)

    def close(self) -> None:
        self.p2p.remove_handler(self.part_method)
        self.p2p.remove_handler(self.report_method)

    # ---- serving ---------------------------------------------------------------------------
    def _ready_event(self, key: tuple[bytes, int]) -> asyncio.Event:
        return self._phase_ready.setdefault(key, asyncio.Event())

    async def _serve_part(self, stream: Stream, ctx: CallContext) -> None:
        header = await stream.recv()
        if not isinstance(header, dict) or not isinstance(header.get("g"), bytes) or header.get("p") not in (0, 1):
            raise P2PError("malformed part header")
        key = (header["g"], header["p"])
        try:  # the caller may have learned of the group a moment before we did
            await asyncio.wait_for(self._ready_event(key).wait(), 10.0)
        except asyncio.TimeoutError:
            self._phase_ready.pop(key, None)
            raise P2PError("unknown averaging group") from None
        phase = self._phases.get(key)
        if phase is None:
            raise P2PError("the averaging round is over")
        member, weight = header.get("i"), header.get("w")
        if (not isinstance(member, int) or not 0 <= member < len(phase.members)
                or phase.members[member] != ctx.peer_id or member not in phase.owner.alive):
            raise P2PError("not a member of this group (or already excluded)")
        if header.get("t") != phase.tag:
            phase.owner.exclude(member, "disagrees on the recovery plan")
            raise P2PError("recovery plan mismatch")
        if not isinstance(weight, (int, float)) or not weight >= 0 or weight == float("inf"):
            phase.owner.exclude(member, f"sent an invalid weight {weight!r}")
            raise P2PError("invalid weight")
        await phase.owner.serve(stream, member, float(weight))

    async def _serve_report(self, request: Any, ctx: CallContext) -> Any:
        group_id, member, failed = request.get("g"), request.get("i"), request.get("failed")
        futures = self._reports.get(group_id)
        mine = self._my_reports.get(group_id)
        if futures is None or mine is None or member not in futures:
            raise P2PError("unknown averaging group or member")
        if not isinstance(failed, list) or not all(isinstance(f, int) for f in failed):
            raise P2PError("malformed report")
        if not futures[member].done():
            futures[member].set_result(set(failed))
        return {"failed": sorted(await asyncio.shield(mine))}

    # ---- running ---------------------------------------------------------------------------
    async def run(self, group: GroupInfo, me: int, flat: torch.Tensor, weight: float, codec: Codec,
                  reducer: Reducer = weighted_mean, chunk_elems: int = 1 << 18, sender_timeout: float = 5.0,
                  reducer_timeout: float | None = None, result: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, AllReduceResult]:
        """Average ``flat`` with the group; returns (result vector, what happened) or raises AveragingError.

        ``result``: where to put the averages (a vector like ``flat``; default: a new one)."""
        reducer_timeout = reducer_timeout or 2 * sender_timeout
        n = len(group.members)
        start = time.monotonic()
        result = torch.empty_like(flat) if result is None else result
        layout = Layout.contiguous(group.part_sizes)
        everyone = list(range(n))
        self._reports[group.group_id] = {i: asyncio.get_running_loop().create_future() for i in everyone if i != me}
        self._my_reports[group.group_id] = asyncio.get_running_loop().create_future()
        try:
            phase0 = await self._run_phase(group, me, 0, b"", layout, everyone, flat, result, weight, codec, reducer,
                                           chunk_elems, sender_timeout, reducer_timeout)
            survivors = await self._agree(group, me, phase0.failed, reducer_timeout + sender_timeout)
            if me not in survivors:
                raise AveragingError(f"this peer was excluded from the group ({len(survivors)} of {n} survived)")
            if len(survivors) < max(2, n // 2 + 1):  # an isolated minority must not 'average' with itself
                raise AveragingError(f"lost contact with most of the group: only {len(survivors)} of {n} members "
                                     f"(this one included) are reachable")
            affected = [j for j in layout.owners()
                        if j not in survivors or phase0.part_reports.get(j, ([], True))[1]
                        or phase0.part_reports.get(j, ([], True))[0] != survivors]
            spans = [r for j in affected for r in layout.ranges[j]]
            sent, received = phase0.bytes_sent, phase0.bytes_received
            recovery_start = time.monotonic()
            if spans:
                if len(survivors) < 1:
                    raise AveragingError("no survivors")
                total = sum(e - s for s, e in spans)
                bandwidths = [group.bandwidths[i] if i < len(group.bandwidths) else None for i in survivors]
                from .load_balancing import part_sizes

                sizes_among = part_sizes(total, [b if b is None or b > 0 else 0.0 for b in bandwidths]) \
                    if any(b is None or b > 0 for b in bandwidths) else None
                if sizes_among is None:
                    raise AveragingError("every survivor is in client mode: nobody can reduce the failed parts")
                sizes = [0] * n
                for i, size in zip(survivors, sizes_among):
                    sizes[i] = size
                tag = hashlib.sha256(repr((group.group_id, survivors, spans)).encode()).digest()[:16]
                phase1 = await self._run_phase(group, me, 1, tag, Layout.over(spans, sizes), survivors, flat, result,
                                               weight, codec, reducer, chunk_elems, sender_timeout, reducer_timeout)
                sent, received = sent + phase1.bytes_sent, received + phase1.bytes_received
                if phase1.failed:
                    raise AveragingError("a member failed during recovery: " +
                                         ", ".join(str(group.members[i]) for i in sorted(phase1.failed)))
            survivor_ids = [group.members[i] for i in survivors]
            parts = [(s, e, survivor_ids) for j in layout.owners() for s, e in layout.ranges[j]]
            return result, AllReduceResult(group.members, survivor_ids, parts, spans, sent, received,
                                           time.monotonic() - start, time.monotonic() - recovery_start if spans else 0.0)
        finally:
            self._reports.pop(group.group_id, None)
            mine = self._my_reports.pop(group.group_id, None)
            if mine is not None and not mine.done():
                mine.set_result(set(range(n)))

    async def _run_phase(self, group: GroupInfo, me: int, phase_no: int, tag: bytes, layout: Layout,
                         active: Sequence[int], flat: torch.Tensor, result: torch.Tensor, weight: float, codec: Codec,
                         reducer: Reducer, chunk_elems: int, sender_timeout: float, reducer_timeout: float) -> _Phase:
        phase = _Phase(self, group, me, phase_no, tag, layout, active, flat, result, weight, codec, reducer,
                       chunk_elems, sender_timeout, reducer_timeout)
        key = (group.group_id, phase_no)
        self._phases[key] = phase
        self._ready_event(key).set()
        try:
            await phase.run()
        finally:
            self._phases.pop(key, None)
            self._phase_ready.pop(key, None)
            # the phase and its owner referred to each other: every round's snapshot, result and encoded
            # part stayed alive until the cyclic GC happened to run (memory grew round after round)
            phase.owner = phase.flat = phase.result = None
        return phase

    async def _agree(self, group: GroupInfo, me: int, failed: set[int], timeout: float) -> list[int]:
        """Exchange failure reports with every member; returns the survivors everyone should agree on."""
        mine = self._my_reports[group.group_id]
        mine.set_result(set(failed))
        futures = self._reports[group.group_id]
        client = [i < len(group.client_mode) and group.client_mode[i] for i in range(len(group.members))]

        async def call(peer: int) -> None:  # one call per pair: the client-mode side (or lower index) calls
            try:
                response = await self.p2p.call(group.members[peer], self.report_method,
                                               {"g": group.group_id, "i": me, "failed": sorted(failed)}, timeout=timeout)
                report = response["failed"]
                if not futures[peer].done():
                    futures[peer].set_result(set(int(x) for x in report))
            except (P2PError, asyncio.TimeoutError, KeyError, TypeError, ValueError):
                if not futures[peer].done():
                    futures[peer].set_result(None)

        calls = []
        for peer in futures:
            if peer in failed:
                futures[peer].set_result(None)
                continue
            if (client[me] != client[peer] and client[me]) or (client[me] == client[peer] and me < peer):
                calls.append(asyncio.ensure_future(call(peer)))
        try:
            done, _ = await asyncio.wait(list(futures.values()), timeout=timeout)
        finally:
            for task in calls:
                task.cancel()
        survivors = set(range(len(group.members)))
        for peer, future in futures.items():
            report = future.result() if future.done() else None
            if report is None:
                survivors.discard(peer)
            else:
                survivors -= report
        survivors -= failed
        return sorted(survivors)
