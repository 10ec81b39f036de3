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
has failed (and is excluded from the caller's own part too). Then members exchange reports of the
failures they saw (``avg.report``, one call per pair of reachable members; client-mode members
call the reachable ones, which relay what the other clients reported) and agree on the survivors F. Every part whose owner failed, that is mixed, or whose
contributors are not exactly F is re-reduced among F in a recovery phase (the same protocol over
those ranges, split among the survivors), from the same snapshot. So every survivor ends with the
exact weighted mean over F for the whole vector, bit-identical across members, or the round fails
with :class:`AveragingError` and leaves the caller's tensors untouched.

Messages (validated on receipt; a malformed one gets ``bad_request`` and at most the transport's
rate-limited one-line log per peer, never a traceback):

==============  ==================================================================================
``avg.part``    stream, member -> owner. First message, the header: ``{"g": group id (bytes, 1 to
                MAX_GROUP_ID_BYTES=64), "p": phase (int 0 or 1), "t": recovery tag (bytes, at most
                MAX_TAG_BYTES=32; b"" in phase 0), "i": the caller's index in the group (int, 0 <= i <
                members; must be the caller's PeerID), "w": weight (int or float, finite, >= 0)}``.
                Then one codec map per chunk of the owner's ranges (sizes checked by the codec, NaN/Inf
                excluded). Owner -> member: one averaged codec map per chunk, then ``{"done":
                [member indices], "mixed": bool}``. One stream per member and phase. A header for a
                round this peer has not started yet waits ``join_wait`` (10 s) for it, at most
                ``max_waiting_per_peer`` (8) such streams per peer and ``max_waiting`` (256) in all
                (beyond: ``overloaded``); the waiting table is emptied however the stream ends.
``avg.report``  unary, member -> member: ``{"g": group id (bytes, as above), "i": the caller's index
                (int, its PeerID), "failed": [member indices] (ints in range, at most members)}``;
                reply ``{"failed": [member indices]}`` once this peer's own report is ready. One
                call per member in flight (a second one gets ``bad_request``). Reachable members
                call each other (the lower index calls); a client-mode member calls every reachable
                one and gets two more fields in the reply, for the other clients it cannot reach:
                ``"heard"`` (the client members whose reports this peer has, waited for up to half
                the agreement timeout) and ``"relayed"`` (the union of their reports), each a list
                of member indices checked like ``failed``.
==============  ==================================================================================
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from dht import P2P, P2PError, PeerID, RemoteError, Stream
from dht.peer.errors import BadRequestError
from dht.peer.p2p import CallContext
from dht.peer.slots import Slots
from dht.peer.untrusted import brief

from .compression import Codec, CodecError
from .errors import AveragingError
from .partition import Layout, chunk_ranges

__all__ = ["GroupInfo", "AllReduceResult", "Reducer", "weighted_mean", "all_finite", "AllReduceService"]

logger = logging.getLogger(__name__)

MAX_GROUP_ID_BYTES = 64  # matchmaking makes 20-byte ids
MAX_TAG_BYTES = 32  # recovery tags are 16 bytes
MAX_REPORT_BYTES = 64 << 10  # an avg.report request (at most 4096 member indices)
MAX_FINISHED_ROUNDS = 256  # group ids of finished rounds remembered, to refuse late streams at once


def _now() -> float:
    """Seconds on the running loop's clock (virtual on dht.peer.virtual_clock): durations and timeouts."""
    return asyncio.get_running_loop().time()

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


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _indices(value: Any, n: int) -> list[int] | None:
    """``value`` as a sorted list of distinct member indices in ``[0, n)``, or None if it is not one."""
    if not isinstance(value, list) or len(value) > n or not all(_is_int(v) and 0 <= v < n for v in value):
        return None
    return sorted(set(value))


def _is_client(group: "GroupInfo", member: int) -> bool:
    """Whether ``member`` of ``group`` is in client mode (accepts no connections)."""
    return member < len(group.client_mode) and bool(group.client_mode[member])


def _refuse(ctx: CallContext, what: str, value: Any = None) -> BadRequestError:
    """A BadRequestError for ``ctx``'s caller naming what is wrong (``value`` described by ``brief``);
    the transport answers ``bad_request`` and logs one rate-limited line per peer, no traceback."""
    return BadRequestError(what if value is None else f"{what} (got {brief(value)})")


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
        self.last_progress = {i: _now() for i in run.active}
        self.encoded: list[dict | None] = [None] * len(self.chunks)
        self.reduced = 0
        self.mixed = False
        self.changed = asyncio.Event()
        self.finished = asyncio.Event()
        self.serving: set[int] = set()  # members whose part stream is being served (one each)
        self.aborted = False  # the phase is over here: nothing more is delivered or excluded
        if not self.chunks:
            self.finished.set()

    def abort(self) -> None:
        """The phase is over (or was cancelled): every stream still served here ends now."""
        self.aborted = True
        self.finished.set()
        self.changed.set()

    def exclude(self, member: int, reason: str) -> None:
        if member not in self.alive or self.aborted:
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
        if member not in self.alive or self.aborted:
            return
        if not (all_finite(values) if finite is None else finite):
            self.exclude(member, "sent NaN or Inf values")
            return
        self.weights[member] = weight
        self.pending[index][member] = values
        self.delivered[member] = index + 1
        self.last_progress[member] = _now()
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
            self._publish(self.reduced, self._reduce(x, order), x)
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
            self._publish(index, averaged[offset:offset + hi - lo], x[:, offset:offset + hi - lo])
            offset += hi - lo
        self.pending = [{} for _ in self.chunks]
        self.reduced = len(self.chunks)

    def _reduce(self, x: torch.Tensor, order: list[int]) -> torch.Tensor:
        w = torch.tensor([self.weights[m] for m in order], dtype=torch.float32)
        return self.run.reducer(x, w).to(torch.float32).contiguous()

    def _publish(self, index: int, averaged: torch.Tensor, inputs: torch.Tensor) -> None:
        """Encode chunk ``index``'s result once for every member; ``inputs``: the contributions it
        reduced (the codec may send the result relative to them: see Codec.encode_result)."""
        lo, hi = self.chunks[index]
        message = self.run.codec.encode_result(averaged.contiguous(), lo, inputs)
        self.encoded[index] = message
        # exactly what the others get (each decodes it with its own values, as this owner does here)
        self.run.result[lo:hi] = self.run.codec.decode_result(message, hi - lo, self.run.flat[lo:hi])

    @property
    def contributors(self) -> list[int]:
        return sorted(self.alive)

    async def watchdog(self) -> None:
        period = min(0.25, self.run.sender_timeout / 4)
        while not self.finished.is_set():
            await asyncio.sleep(period)
            now = _now()
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

        def receiver_done(task: asyncio.Future) -> None:  # e.g. a codec that raised on a hostile chunk
            if not task.cancelled() and task.exception() is not None:
                self.exclude(member, f"its chunks could not be read: {type(task.exception()).__name__}")

        self.serving.add(member)
        receiver = asyncio.ensure_future(receive())
        receiver.add_done_callback(receiver_done)
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
            self.serving.discard(member)
            receiver.cancel()
            await asyncio.gather(receiver, return_exceptions=True)


async def _run(loop: asyncio.AbstractEventLoop, codec: Codec, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in the default executor, or right here for codecs that do no per-value work (a
    thread hop costs more than checking and copying one chunk)."""
    if codec.inline:
        return fn(*args)
    return await loop.run_in_executor(None, fn, *args)


def _decode_checked(codec: Codec, message: Any, length: int) -> tuple[torch.Tensor, bool]:
    values = codec.decode(message, length)
    return values, all_finite(values)


def _decode_into(codec: Codec, message: Any, result: torch.Tensor, lo: int, hi: int, flat: torch.Tensor) -> bool:
    """Decode an owner's averaged chunk into ``result[lo:hi]`` (``flat``: this member's own values);
    False (and nothing written) if not finite."""
    values = codec.decode_result(message, hi - lo, flat[lo:hi])
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
                if not await _run(loop, self.codec, _decode_into, self.codec, message, self.result, lo, hi, self.flat):
                    raise AveragingError("the owner returned NaN/Inf")
            done = await asyncio.wait_for(stream.recv(), self.reducer_timeout)
            contributors, mixed = done["done"], done["mixed"]
            contributors = _indices(contributors, len(self.members))
            if contributors is None or not isinstance(mixed, bool):
                raise AveragingError("malformed final message")
            self.part_reports[owner] = (contributors, mixed)
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
        # it is no survivor now (our report names it): waiting for its values to my part would only
        # delay the round by sender_timeout. Only before my part is done: the contributors announced in
        # my final messages must be what I report for it myself.
        if self.owner is not None and not self.owner.finished.is_set():
            self.owner.exclude(owner, f"failed as a part owner: {reason}")


class AllReduceService:
    """Serves ``avg.part`` and ``avg.report`` on a P2P peer and runs rounds for one averager.

    ``round_timeout`` (120 s): limit of one part stream; ``join_wait`` (10 s): how long an ``avg.part``
    header for a round not started here yet waits for it; ``max_waiting_per_peer`` (8) and
    ``max_waiting`` (256): such waiting streams per calling peer and in all (``overloaded`` beyond);
    ``header_timeout`` (10 s): a part stream must send its header this soon. The messages and
    their limits are in the module docstring.
    """

    def __init__(self, p2p: P2P, prefix: str, round_timeout: float = 120.0, *, join_wait: float = 10.0,
                 max_waiting_per_peer: int = 8, max_waiting: int = 256, header_timeout: float = 10.0):
        self.p2p = p2p
        self.round_timeout, self.join_wait, self.header_timeout = round_timeout, join_wait, header_timeout
        self.part_method, self.report_method = f"avg.part.{prefix}", f"avg.report.{prefix}"
        self._phases: dict[tuple[bytes, int], _Phase] = {}
        # (group id, phase) -> [event set when the phase starts, streams waiting for it]
        self._phase_ready: dict[tuple[bytes, int], list] = {}
        self._waiting = Slots(max_waiting_per_peer, max_waiting, "avg.part streams waiting for a round")
        self._finished: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self._groups: dict[bytes, GroupInfo] = {}
        self._reports: dict[bytes, dict[int, asyncio.Future]] = {}
        self._my_reports: dict[bytes, asyncio.Future] = {}
        self._report_calls: set[tuple[bytes, int]] = set()  # (group id, member) with a report call in flight
        self._relay_wait: dict[bytes, float] = {}  # group id -> how long a client's report call waits for the others'
        p2p.add_stream_handler(self.part_method, self._serve_part)
        p2p.add_unary_handler(self.report_method, self._serve_report, max_message_size=MAX_REPORT_BYTES)

    def close(self) -> None:
        self.p2p.remove_handler(self.part_method)
        self.p2p.remove_handler(self.report_method)

    def finish(self, group_id: bytes) -> None:
        """This peer takes no (further) part in round ``group_id`` (e.g. its step was cancelled right
        after matchmaking): part streams for it, waiting or new, are refused at once instead of after
        ``join_wait``, so the others give up on this peer and retry without delay."""
        if group_id in self._groups:
            return  # the round runs here: it cleans up itself
        self._finished[group_id] = None
        while len(self._finished) > MAX_FINISHED_ROUNDS:
            self._finished.popitem(last=False)
        for phase_no in (0, 1):
            entry = self._phase_ready.get((group_id, phase_no))
            if entry is not None:
                entry[0].set()  # the waiting streams find no phase: "the averaging round is over"

    def table_sizes(self) -> dict[str, int]:
        """Entries in every table keyed by what peers send (for tests: back to 0 between rounds)."""
        return {"phases": len(self._phases), "phase_ready": len(self._phase_ready), "waiting": len(self._waiting),
                "waiting_peers": self._waiting.keys, "groups": len(self._groups), "reports": len(self._reports),
                "my_reports": len(self._my_reports), "report_calls": len(self._report_calls),
                "relay_wait": len(self._relay_wait)}

    # ---- serving ---------------------------------------------------------------------------
    def _parse_header(self, header: Any, ctx: CallContext) -> tuple[tuple[bytes, int], bytes, int, Any]:
        """(key, tag, member index, weight) of a part header, checked for types and lengths."""
        if not isinstance(header, dict):
            raise _refuse(ctx, "the part header must be a map", header)
        group_id, phase, tag, member, weight = (header.get(k) for k in ("g", "p", "t", "i", "w"))
        if not isinstance(group_id, bytes) or not 0 < len(group_id) <= MAX_GROUP_ID_BYTES:
            raise _refuse(ctx, f"'g' must be a group id of 1 to {MAX_GROUP_ID_BYTES} bytes", group_id)
        if not _is_int(phase) or phase not in (0, 1):
            raise _refuse(ctx, "'p' must be the phase, 0 or 1", phase)
        if not isinstance(tag, bytes) or len(tag) > MAX_TAG_BYTES:
            raise _refuse(ctx, f"'t' must be a tag of at most {MAX_TAG_BYTES} bytes", tag)
        if not _is_int(member) or not 0 <= member < (1 << 16):
            raise _refuse(ctx, "'i' must be a member index", member)
        if not (_is_int(weight) or isinstance(weight, float)):
            raise _refuse(ctx, "'w' must be a number", weight)
        return (group_id, phase), tag, member, weight

    async def _wait_for_phase(self, key: tuple[bytes, int], ctx: CallContext) -> "_Phase":
        """The phase ``key`` once it starts here (the caller may have learned of the group a moment
        before we did); waits at most ``join_wait`` within the waiting budgets."""
        with self._waiting.hold(ctx.peer_id):  # OverloadedError: the caller gets "overloaded"
            entry = self._phase_ready.get(key)
            if entry is None:
                entry = self._phase_ready[key] = [asyncio.Event(), 0]
            entry[1] += 1
            try:
                await asyncio.wait_for(entry[0].wait(), self.join_wait)
            except asyncio.TimeoutError:
                raise P2PError("unknown averaging group") from None
            finally:  # however the wait ends (cancelled, timed out, disconnected): the table shrinks back
                entry[1] -= 1
                if entry[1] <= 0 and self._phase_ready.get(key) is entry:
                    del self._phase_ready[key]
        phase = self._phases.get(key)
        if phase is None:
            raise P2PError("the averaging round is over")
        return phase

    async def _serve_part(self, stream: Stream, ctx: CallContext) -> None:
        try:
            header = await asyncio.wait_for(stream.recv(), self.header_timeout)
        except asyncio.TimeoutError:
            raise _refuse(ctx, f"no part header within {self.header_timeout:.3g} s") from None
        key, tag, member, weight = self._parse_header(header, ctx)
        del header
        phase = self._phases.get(key)
        if phase is None:
            if key[0] in self._finished:
                raise P2PError("the averaging round is over")
            phase = await self._wait_for_phase(key, ctx)
        owner = phase.owner
        if owner is None:
            raise P2PError("the averaging round is over")
        if member >= len(phase.members) or phase.members[member] != ctx.peer_id:
            raise _refuse(ctx, "not a member of this group at that index", member)
        if member in owner.serving:
            raise _refuse(ctx, "a second part stream for the same phase")
        if member not in owner.alive:
            raise P2PError("not an active member of this phase (or already excluded)")
        if tag != phase.tag:
            owner.exclude(member, "disagrees on the recovery plan")
            raise P2PError("recovery plan mismatch")
        if not (math.isfinite(weight) and weight >= 0):
            owner.exclude(member, f"sent an invalid weight {brief(weight)}")
            raise BadRequestError("invalid weight")
        await owner.serve(stream, member, float(weight))

    async def _serve_report(self, request: Any, ctx: CallContext) -> Any:
        if not isinstance(request, dict):
            raise _refuse(ctx, "a report must be a map", request)
        group_id, member = request.get("g"), request.get("i")
        if not isinstance(group_id, bytes) or not 0 < len(group_id) <= MAX_GROUP_ID_BYTES:
            raise _refuse(ctx, f"'g' must be a group id of 1 to {MAX_GROUP_ID_BYTES} bytes", group_id)
        if not _is_int(member):
            raise _refuse(ctx, "'i' must be a member index", member)
        group, futures, mine = self._groups.get(group_id), self._reports.get(group_id), self._my_reports.get(group_id)
        if group is None or futures is None or mine is None:
            raise P2PError("unknown averaging group")
        if member not in futures or group.members[member] != ctx.peer_id:
            raise _refuse(ctx, "not a member of this group at that index", member)
        failed = _indices(request.get("failed"), len(group.members))
        if failed is None:
            raise _refuse(ctx, "'failed' must be a list of member indices", request.get("failed"))
        if (group_id, member) in self._report_calls:
            raise _refuse(ctx, "a second report for the same round")
        self._report_calls.add((group_id, member))
        try:
            if not futures[member].done():
                futures[member].set_result(set(failed))
            reply: dict[str, Any] = {"failed": sorted(await asyncio.shield(mine))}
            if _is_client(group, member):  # it cannot reach the other clients: relay what they reported
                others = [c for c in futures if c != member and _is_client(group, c)]
                pending = [futures[c] for c in others if not futures[c].done()]
                if pending:  # they report at about the same time; a missing one is waited for a while only
                    await asyncio.wait(pending, timeout=self._relay_wait.get(group_id, 0.0))
                heard = [c for c in others if futures[c].done() and futures[c].result() is not None]
                reply["heard"] = heard
                reply["relayed"] = sorted(set().union(*(futures[c].result() for c in heard)))
            return reply
        finally:
            self._report_calls.discard((group_id, member))

    # ---- running ---------------------------------------------------------------------------
    async def run(self, group: GroupInfo, me: int, flat: torch.Tensor, weight: float, codec: Codec,
                  reducer: Reducer = weighted_mean, chunk_elems: int = 1 << 18, sender_timeout: float = 5.0,
                  reducer_timeout: float | None = None, result: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, AllReduceResult]:
        """Average ``flat`` with the group; returns (result vector, what happened) or raises AveragingError.

        ``result``: where to put the averages (a vector like ``flat``; default: a new one)."""
        reducer_timeout = reducer_timeout or 2 * sender_timeout
        n = len(group.members)
        start = _now()
        result = torch.empty_like(flat) if result is None else result
        layout = Layout.contiguous(group.part_sizes)
        everyone = list(range(n))
        self._groups[group.group_id] = group
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
            recovery_start = _now()
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
                                           _now() - start, _now() - recovery_start if spans else 0.0)
        finally:
            self._groups.pop(group.group_id, None)
            self._reports.pop(group.group_id, None)
            self._relay_wait.pop(group.group_id, None)
            mine = self._my_reports.pop(group.group_id, None)
            if mine is not None and not mine.done():
                mine.set_result(set(range(n)))
            self._finished[group.group_id] = None
            while len(self._finished) > MAX_FINISHED_ROUNDS:
                self._finished.popitem(last=False)

    async def _run_phase(self, group: GroupInfo, me: int, phase_no: int, tag: bytes, layout: Layout,
                         active: Sequence[int], flat: torch.Tensor, result: torch.Tensor, weight: float, codec: Codec,
                         reducer: Reducer, chunk_elems: int, sender_timeout: float, reducer_timeout: float) -> _Phase:
        phase = _Phase(self, group, me, phase_no, tag, layout, active, flat, result, weight, codec, reducer,
                       chunk_elems, sender_timeout, reducer_timeout)
        key = (group.group_id, phase_no)
        self._phases[key] = phase
        waiting = self._phase_ready.get(key)
        if waiting is not None:
            waiting[0].set()  # the streams waiting for it go on (and leave the table themselves)
        try:
            await phase.run()
        finally:
            self._phases.pop(key, None)
            phase.owner.abort()  # streams still served here end now, also when the round was cancelled
            # the phase and its owner referred to each other: every round's snapshot, result and encoded
            # part stayed alive until the cyclic GC happened to run (memory grew round after round)
            phase.owner = phase.flat = phase.result = None
        return phase

    async def _agree(self, group: GroupInfo, me: int, failed: set[int], timeout: float) -> list[int]:
        """Exchange failure reports with every member; returns the survivors everyone should agree on.

        One call per pair of reachable members (the lower index calls); a client-mode member calls
        every reachable one, and learns what the other clients reported (they cannot reach each
        other) from those replies: which clients each reachable member heard from, and the union of
        their reports. A member heard from nowhere is dropped."""
        self._relay_wait[group.group_id] = timeout / 2
        mine = self._my_reports[group.group_id]
        mine.set_result(set(failed))
        futures = self._reports[group.group_id]
        n = len(group.members)
        relayed: set[int] = set()  # failures the other clients reported, as relayed to this client

        async def call(peer: int) -> None:
            try:
                response = await self.p2p.call(group.members[peer], self.report_method,
                                               {"g": group.group_id, "i": me, "failed": sorted(failed)}, timeout=timeout)
                report = _indices(response["failed"], n)
                if report is None:
                    raise ValueError("malformed report")
                if not futures[peer].done():
                    futures[peer].set_result(set(report))
                if _is_client(group, me):
                    heard, through = _indices(response.get("heard", []), n), _indices(response.get("relayed", []), n)
                    if heard is None or through is None:
                        raise ValueError("malformed relayed reports")
                    relayed.update(through)
                    for c in heard:
                        if c in futures and _is_client(group, c) and not futures[c].done():
                            futures[c].set_result(set())  # its failures are in ``relayed``
            except (P2PError, asyncio.TimeoutError, KeyError, TypeError, ValueError, AttributeError):
                if not futures[peer].done():
                    futures[peer].set_result(None)

        async def call_all(peers: list[int]) -> None:
            await asyncio.gather(*(call(peer) for peer in peers))
            if _is_client(group, me):  # clients that no reachable member heard from are dropped
                for c, future in futures.items():
                    if _is_client(group, c) and not future.done():
                        future.set_result(None)

        peers = []
        for peer in futures:
            if peer in failed:
                futures[peer].set_result(None)
            elif not _is_client(group, peer) and (_is_client(group, me) or me < peer):
                peers.append(peer)  # clients call me (or reach me through the reachable members)
        calls = asyncio.ensure_future(call_all(peers))
        try:
            await asyncio.wait(list(futures.values()), timeout=timeout)
        finally:
            calls.cancel()
            await asyncio.gather(calls, return_exceptions=True)
        survivors = set(range(n))
        for peer, future in futures.items():
            report = future.result() if future.done() else None
            if report is None:
                survivors.discard(peer)
            else:
                survivors -= report
        survivors -= failed | relayed
        return sorted(survivors)
