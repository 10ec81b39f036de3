"""Butterfly all-reduce within an agreed group, with exact recovery from failed members.

Phase 0 (the butterfly, algorithms.md §5.2): member ``j`` owns the ranges ``layout.ranges[j]`` of
the flat vector. Every member streams its values for those ranges to ``j`` in chunks (stream
``avg.part``), ``j`` reduces each chunk as soon as every live member delivered it (weighted mean
by default, or any aggregator, computed in member order so the result does not depend on arrival
order, in a worker thread), and streams the *averaged values* back; sending, reducing and
receiving overlap. The owner ends with ``{"done": contributors, "mixed": bool}``: which members'
values are in every chunk, and whether a member was dropped after some chunks already included it.

A member that stops sending for ``sender_timeout``, sends a malformed chunk or NaN/Inf values is
excluded (logged at INFO, naming it: expected under churn); an owner that stops answering for
``reducer_timeout`` has failed (and is excluded from the caller's own part too). Both are timed in
the time this peer's event loop ran (:class:`_RunningClock`): a stall of its own loop, or a chunk
that arrived and is still being decoded, is nobody's silence. A member that an owner excluded has
failed itself: it blames no owner for that. Then members exchange reports of the failures they saw
(``avg.report``, one call per pair of reachable members; client-mode members call the reachable
ones, which relay what the other clients reported) and agree on the survivors F: a report counts
against every member it names, except a report from a member that names itself or that this member
saw fail, which counts only against its sender (an excluded member would blame the good owners). A
member that failed itself makes its calls and waits for no other report. Every part whose owner
failed, that is mixed, or whose contributors are not exactly F is re-reduced among F in a recovery
phase (the same protocol over those ranges, split among the survivors), from the same snapshot. So
every survivor ends with the exact weighted mean over F for the whole vector, bit-identical across
members, or the round fails with :class:`AveragingError` (logged as a WARNING: this peer's round is
lost) and leaves the caller's tensors untouched.

Commitments (``RoundConfig.identity`` set; :mod:`averaging.commitments`): a member's part header
carries its signed SHA-256 digest of all its values for that part (as the owner will decode them),
computed before the first chunk leaves; the owner hashes the chunks as they arrive and excludes a
member whose values do not match (recorded as a :class:`~averaging.transcript.Mismatch`: unsigned
data proves nothing to others), and ends with its signed digest of its averaged part, which every
member checks against what it received (a mismatch, a missing or a forged one: the owner failed).
No extra message and no extra round trip: one signed digest (about 143 bytes) on each part stream
in each direction, and about three SHA-256 passes over the vector per member, off the event loop
for big parts. Each member's :class:`~averaging.transcript.RoundTranscript` (on the result) keeps
what was signed and seen, for checks after the round (:mod:`verification`).

The messages, their fields and limits are in :mod:`averaging.protocol`; a malformed one gets
``bad_request`` and at most the transport's rate-limited one-line log per peer, never a traceback.
One stream per member and phase; a header for a round this peer has not started yet waits
``join_wait`` (10 s) for it, at most ``max_waiting_per_peer`` (8) such streams per peer and
``max_waiting`` (256) in all (beyond: ``overloaded``); the waiting table is emptied however the
stream ends. One ``avg.report`` call per member in flight (a second one gets ``bad_request``).

Time: every duration and timeout is on the running loop's clock (``loop.time()``), so a round runs
on the virtual clock (:mod:`dht.peer.virtual_clock`) as on a real one.
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
from dht.peer.identity import Identity
from dht.peer.p2p import CallContext
from dht.peer.slots import Slots
from dht.peer.untrusted import brief

from . import protocol
from .commitments import ROLE_INPUT, ROLE_RESULT, Commitment, TensorHasher, group_digest
from .compression import Codec, CodecError
from .errors import AveragingError
from .group import GroupInfo
from .load_balancing import part_sizes
from .partition import Layout, chunk_ranges
from .protocol import BadRequestError, PartHeader, refuse
from .transcript import Mismatch, PhaseTranscript, RoundTranscript

__all__ = ["RoundConfig", "AllReduceResult", "Reducer", "weighted_mean", "all_finite", "AllReduceService"]

logger = logging.getLogger(__name__)

MAX_FINISHED_ROUNDS = 256  # group ids of finished rounds remembered, to refuse late streams at once
INLINE_VALUES = 1 << 14  # a reduction of fewer values (members x chunk) runs on the loop: a thread hop costs more

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


@dataclass(frozen=True)
class RoundConfig:
    """One member's settings for one round, fixed for the round.

    - ``group``, ``me``: the group as matchmaking agreed it, this member's index in it.
    - ``weight``: this member's weight (e.g. its number of samples), finite and >= 0.
    - ``codec``: compression of the chunks, both directions.
    - ``reducer`` (:func:`weighted_mean`): what an owner computes over its part.
    - ``chunk_elems`` (2**18): values per chunk on the wire.
    - ``sender_timeout`` (5 s): a member that sends nothing this long (of time this loop ran: its own
      stalls do not count) is excluded from a part.
    - ``reducer_timeout`` (None: 2 x sender_timeout): an owner silent this long has failed
      (:attr:`owner_timeout`).
    - ``banned`` (None): peers whose parts are never accepted and whose results are never used (they
      are excluded at once, like a member that failed).
    - ``identity`` (None: commitments off): sign a digest of every part this member sends and of the
      result of its own part, require them from the others (:mod:`averaging.commitments`), and keep a
      :class:`~averaging.transcript.RoundTranscript`; ``commit_prefix``: the run prefix they bind.
      Every member of a group must agree on it (the averager puts it in the schema hash).
    """

    group: GroupInfo
    me: int
    weight: float
    codec: Codec
    reducer: Reducer = weighted_mean
    chunk_elems: int = 1 << 18
    sender_timeout: float = 5.0
    reducer_timeout: float | None = None
    banned: Callable[[PeerID], bool] | None = None
    identity: Identity | None = None
    commit_prefix: str = ""

    def __post_init__(self) -> None:
        if not 0 <= self.me < len(self.group.members):
            raise ValueError(f"me={self.me} is not a member index of a group of {len(self.group.members)}")
        if not (math.isfinite(self.weight) and self.weight >= 0):
            raise ValueError(f"weight must be finite and >= 0, got {self.weight!r}")
        if self.chunk_elems < 1 or not self.sender_timeout > 0:
            raise ValueError("chunk_elems and sender_timeout must be positive")

    def is_banned(self, member: int) -> bool:
        """Whether member ``member`` is banned (a failing ban check counts as not banned, logged)."""
        if self.banned is None or member == self.me:
            return False
        try:
            return bool(self.banned(self.group.members[member]))
        except Exception as e:  # noqa: BLE001 - a bug in the check must not break the round
            logger.warning("%s: the ban check failed: %s: %s", self.label, type(e).__name__, brief(str(e), 200))
            return False

    def commit(self, phase: int, part: int, role: str, digest: bytes, weight: float = 0.0,
               members: Sequence[int] = (), ranges: Sequence[tuple[int, int]] = ()) -> Commitment:
        """This member's signed ``digest`` of ``part`` (made of ``ranges``; commitments on only)."""
        assert self.identity is not None
        return Commitment.sign(self.identity, self.commit_prefix, self.group.group_id, phase, part, role, digest,
                               weight, members, group_digest(self.group.members), self.codec.name, ranges)

    @property
    def owner_timeout(self) -> float:
        """Seconds without an answer after which an owner has failed."""
        return self.reducer_timeout or 2 * self.sender_timeout

    @property
    def label(self) -> str:
        """The round's name in logs."""
        return f"averaging round {self.group.group_id.hex()[:8]}"


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
    transcript: RoundTranscript | None = None  # commitments on: what this member saw, for checks after the round


@dataclass(frozen=True)
class _PhasePlan:
    """What one phase reduces: 0, the butterfly over the whole vector among every member; 1,
    recovery, over the ranges of the parts to redo, among the survivors."""

    number: int
    tag: bytes  # the recovery plan's hash (b"" in phase 0): members that disagree on the plan are refused
    layout: Layout
    active: tuple[int, ...]  # sorted


@dataclass
class _Traffic:
    sent: int = 0
    received: int = 0


@dataclass
class _PhaseOutcome:
    failed: set[int]  # members this member saw fail (itself included if its own part or values failed)
    part_reports: dict[int, tuple[list[int], bool]]  # owner -> (contributors, mixed)
    traffic: _Traffic = field(default_factory=_Traffic)


def _size(message: Any) -> int:
    """Bytes a codec map carries (its payload fields)."""
    if isinstance(message, dict):
        return sum(v.nbytes if isinstance(v, memoryview) else len(v) if isinstance(v, (bytes, bytearray)) else 8
                   for v in message.values())
    return 8


async def _in_worker(values: int, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in the default executor, or right here when it handles fewer than INLINE_VALUES
    ``values`` (a thread hop costs more)."""
    if values < INLINE_VALUES:
        return fn(*args)
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


async def _codec_work(codec: Codec, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in the default executor, or right here for codecs that do no per-value work (a
    thread hop costs more than checking and copying one chunk)."""
    if codec.inline:
        return fn(*args)
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


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


def _hash_ranges(vector: torch.Tensor, chunks: Sequence[tuple[int, int]]) -> bytes:
    """The digest of ``vector`` over ``chunks`` concatenated (as :func:`~averaging.commitments.tensor_digest`
    of that concatenation)."""
    hasher = TensorHasher(vector.dtype, (sum(hi - lo for lo, hi in chunks),))
    for lo, hi in chunks:
        hasher.update(vector[lo:hi])
    return hasher.digest()


def _encode_committed(codec: Codec, flat: torch.Tensor, chunks: Sequence[tuple[int, int]],
                      decoded: torch.Tensor | None) -> tuple[list[Any], bytes]:
    """Every chunk's message, and the digest of the values as the owner will decode them (written
    into ``decoded`` at the same positions, unless None)."""
    hasher = TensorHasher(torch.float32, (sum(hi - lo for lo, hi in chunks),))
    messages = []
    for lo, hi in chunks:
        message = codec.encode(flat[lo:hi], lo, False)
        values = codec.decode(message, hi - lo).to(torch.float32)
        hasher.update(values)
        if decoded is not None and not codec.lossless:
            decoded[lo:hi] = values
        messages.append(message)
    return messages, hasher.digest()


def _decode_recorded(codec: Codec, message: Any, length: int, buffer: torch.Tensor, offset: int,
                     hasher: TensorHasher) -> tuple[torch.Tensor, bool]:
    """Decode a member's chunk into ``buffer[offset:offset + length]`` (kept for the transcript) and
    feed it to the member's digest."""
    values = buffer[offset:offset + length]
    values.copy_(codec.decode(message, length))
    hasher.update(values)
    return values, all_finite(values)


class _RunningClock:
    """Time in which this member's event loop ran, for one phase: ``loop.time()`` minus the stalls
    of the loop (a synchronous call, a GC pause, an overloaded machine), seen as the lateness of a
    tick every ``tick`` seconds (:meth:`run`). A member's silence and an owner's answer are timed
    on it, so that this member blames nobody for its own stall: bytes that arrived meanwhile wait
    in the transport until the loop reads them, after the stall."""

    def __init__(self, tick: float):
        self.tick, self.loop = tick, asyncio.get_running_loop()
        self.last = self.loop.time()  # when the last tick ran
        self.stalled = 0.0  # seconds the ticks so far came late

    def now(self) -> float:
        """Running seconds (the lateness of a tick that is due now counts as stalled too)."""
        now = self.loop.time()
        return now - self.stalled - max(0.0, now - self.last - self.tick)

    async def run(self, on_tick: Callable[[float], None]) -> None:
        """Tick until cancelled, calling ``on_tick(running seconds)`` at every tick."""
        while True:
            await asyncio.sleep(self.tick)
            now = self.loop.time()
            self.stalled += max(0.0, now - self.last - self.tick)
            self.last = now
            try:
                on_tick(now - self.stalled)
            except Exception as e:  # noqa: BLE001 - a bug there must not stop the clock (nothing would time out)
                logger.warning("running clock: %s: %s", type(e).__name__, brief(str(e), 200))


class _LocalError(AveragingError):
    """This member could not send its own values (e.g. its codec failed): it, not the owner, failed."""


class _Owner:
    """The reducing side of one member in one phase: takes every active member's values for this
    member's ``ranges``, reduces them in member order (in a worker thread: :meth:`reduce`) and serves
    the encoded averages to every member's part stream (:meth:`serve`)."""

    def __init__(self, config: RoundConfig, ranges: Sequence[tuple[int, int]], active: Sequence[int],
                 flat: torch.Tensor, result: torch.Tensor, failed: set[int], traffic: _Traffic,
                 clock: _RunningClock, record: PhaseTranscript | None = None):
        self.clock = clock  # the phase's: members' silences are measured in time this loop ran
        self.record = record  # commitments on: the phase's transcript (inputs and received values go there)
        self._result_digest: asyncio.Future | None = None
        self._result_commitments: dict[tuple[int, ...], Commitment] = {}
        now = clock.now()
        self.config, self.flat, self.result = config, flat, result
        self.failed, self.traffic = failed, traffic  # shared with the phase: members excluded here are failed there
        self.chunks = chunk_ranges(ranges, config.chunk_elems)
        self.part_length = sum(hi - lo for lo, hi in self.chunks)
        self.pending: list[dict[int, torch.Tensor]] = [{} for _ in self.chunks]
        self.weights: dict[int, float] = {}
        self.delivered = {i: 0 for i in active}
        self.alive = set(active)
        self.last_progress = {i: now for i in active}  # running time (self.clock) of its last chunk
        self.decoding: set[int] = set()  # members with a chunk taken from their stream, being decoded
        self.encoded: list[dict | None] = [None] * len(self.chunks)
        self.reduced = 0
        self.reducing = False  # a reduction is in flight: the values of the live members are in it
        self.mixed = False
        self.arrived = asyncio.Event()  # for the reducer: values arrived or a member was dropped
        self.changed = asyncio.Event()  # for the part streams: chunks were reduced or a member was dropped
        self.finished = asyncio.Event()
        self.serving: set[int] = set()  # members whose part stream is being served (one each)
        self.aborted = False  # the phase is over here: nothing more is delivered or excluded
        if not self.chunks:
            self.finished.set()

    def abort(self) -> None:
        """The phase is over (or was cancelled): every stream still waiting for a chunk ends now."""
        self.aborted = True
        self.finished.set()
        self.changed.set()

    def exclude(self, member: int, reason: str) -> None:
        if member not in self.alive or self.aborted:
            return
        logger.info("%s: excluding %s: %s", self.config.label, self.config.group.members[member], reason)
        self.alive.discard(member)
        self.failed.add(member)
        if self.reduced > 0 or self.reducing:
            self.mixed = True
        for pending in self.pending:
            pending.pop(member, None)
        self.arrived.set()
        self.changed.set()

    def deliver(self, member: int, index: int, values: torch.Tensor, weight: float, finite: bool) -> None:
        """``member``'s values for chunk ``index``; ``finite``: checked off the event loop."""
        if member not in self.alive or self.aborted:
            return
        if not finite:
            self.exclude(member, "sent NaN or Inf values")
            return
        self.weights[member] = weight
        self.pending[index][member] = values
        self.delivered[member] = index + 1
        self.last_progress[member] = self.clock.now()
        self.arrived.set()

    @property
    def contributors(self) -> list[int]:
        return sorted(self.alive)

    # ---- reducing ----------------------------------------------------------------------------------
    def _next_job(self) -> tuple[int, list[int], list[float], list[list[torch.Tensor]]] | None:
        """(first chunk, member order, their weights, each one's values for the chunks from the first
        on) ready to reduce, or None: a chunk-wise reducer takes each chunk once every live member
        sent it, any other the whole part once every live member sent all of it."""
        order = sorted(self.alive)
        if getattr(self.config.reducer, "chunkwise", False):
            chunk = self.pending[self.reduced]
            if not all(m in chunk for m in order):
                return None
            rows = [[chunk[m]] for m in order]
            self.pending[self.reduced] = {}
        else:
            if self.reduced or not all(self.delivered[m] == len(self.chunks) for m in order):
                return None
            rows = [[pending[m] for pending in self.pending] for m in order]
            self.pending = [{} for _ in self.chunks]
        return self.reduced, order, [self.weights[m] for m in order], rows

    def _reduce(self, first: int, weights: list[float], rows: list[list[torch.Tensor]]) -> list[dict]:
        """Reduce chunks ``first, first + 1, ...`` (``rows``: the members' values for them, in member
        order, with their ``weights``), write the results into ``result`` and return their encoded
        messages (one for every member: each decodes it with its own values, as done here). Runs in
        a worker thread (small ones on the loop)."""
        x = torch.stack([row[0] if len(row) == 1 else torch.cat(row) for row in rows])
        w = torch.tensor(weights, dtype=torch.float32)
        averaged = self.config.reducer(x, w).to(torch.float32).contiguous()
        codec, messages, offset = self.config.codec, [], 0
        for lo, hi in self.chunks[first:first + len(rows[0])]:
            # the codec may send the result relative to the contributions it reduced: see Codec.encode_result
            message = codec.encode_result(averaged[offset:offset + hi - lo].contiguous(), lo,
                                          x[:, offset:offset + hi - lo])
            self.result[lo:hi] = codec.decode_result(message, hi - lo, self.flat[lo:hi])
            messages.append(message)
            offset += hi - lo
        return messages

    async def reduce(self) -> None:
        """Reduce the part as its values arrive, until it is done, fails (nobody left) or the phase
        ends; the reductions and encodings run in a worker thread (small ones on the loop)."""
        try:
            while self.reduced < len(self.chunks) and self.alive and not self.aborted:
                job = self._next_job()
                if job is None:
                    self.arrived.clear()
                    await self.arrived.wait()
                    continue
                first, order, weights, rows = job
                self.reducing = True
                try:
                    values = len(order) * sum(t.numel() for t in rows[0])
                    messages = await _in_worker(values, self._reduce, first, weights, rows)
                finally:
                    self.reducing = False
                if self.aborted:
                    return
                self.encoded[first:first + len(messages)] = messages
                self.reduced += len(messages)
                self.changed.set()
        except Exception as e:  # noqa: BLE001 - e.g. a custom reducer that raised: this member's part fails
            logger.warning("%s: reducing my part failed: %s: %s", self.config.label, type(e).__name__,
                           brief(str(e), 200))
        finally:
            self.finished.set()  # done, or failed: nobody left to reduce for
            self.changed.set()

    def _check_input(self, member: int, commitment: Commitment, digest: bytes, values: torch.Tensor) -> bool:
        """Whether ``member``'s whole part (``values``, digest ``digest``) is what it committed to; if not,
        it is excluded and the mismatch recorded."""
        assert self.record is not None
        if digest != commitment.digest:
            self.record.mismatches.append(Mismatch(member, commitment, digest))
            self.exclude(member, "its values do not match its signed digest")
            return False
        self.record.received[member] = values
        return True

    async def result_commitment(self, contributors: Sequence[int]) -> Commitment:
        """The signed digest of this owner's averaged part, binding ``contributors`` (once all of it is
        reduced; the digest is computed once, off the loop for a big part)."""
        assert self.record is not None and self.reduced == len(self.chunks)
        if self._result_digest is None:
            self._result_digest = asyncio.ensure_future(
                _in_worker(self.part_length, _hash_ranges, self.result, self.chunks))
        digest = await asyncio.shield(self._result_digest)
        key = tuple(contributors)
        if key not in self._result_commitments:
            self._result_commitments[key] = self.config.commit(self.record.number, self.config.me, ROLE_RESULT,
                                                               digest, 0.0, key, self.record.ranges[self.config.me])
        return self._result_commitments[key]

    def check_senders(self, now: float) -> None:
        """Exclude every member whose next chunk did not arrive for ``sender_timeout`` of running time
        ``now`` (the phase clock's: this loop's own stalls do not count); one whose chunk is being
        decoded is not silent (its bytes are here)."""
        if self.finished.is_set():
            return
        timeout = self.config.sender_timeout
        for member in list(self.alive):
            if (self.delivered[member] < len(self.chunks) and member not in self.decoding
                    and now - self.last_progress[member] > timeout):
                self.exclude(member, f"sent nothing for {timeout:.1f} s")

    # ---- serving -----------------------------------------------------------------------------------
    async def serve(self, stream: Stream, member: int, weight: float) -> None:
        """Receive ``member``'s chunks on ``stream`` and send back averaged chunks as they are ready."""
        codec = self.config.codec
        commitment = self.record.inputs.get(member) if self.record is not None else None
        length = self.part_length if commitment is not None else 0
        buffer = torch.empty(length, dtype=torch.float32)  # its values, kept for the transcript (commitments on)
        hasher = TensorHasher(torch.float32, (length,))

        async def receive() -> None:
            offset = 0
            for index, (lo, hi) in enumerate(self.chunks):
                message = await stream.recv()
                self.traffic.received += _size(message)
                self.last_progress[member] = self.clock.now()  # its bytes are here, however long decoding takes
                self.decoding.add(member)
                try:
                    if commitment is None:
                        values, finite = await _codec_work(codec, _decode_checked, codec, message, hi - lo)
                    else:  # kept and hashed as it arrives; checked against the commitment before the last chunk counts
                        values, finite = await _in_worker(hi - lo, _decode_recorded, codec, message, hi - lo, buffer,
                                                          offset, hasher)
                        offset += hi - lo
                        if offset == buffer.numel() and not self._check_input(member, commitment, hasher.digest(),
                                                                              buffer):
                            return
                except CodecError as e:
                    self.exclude(member, f"sent a malformed chunk ({e})")
                    return
                finally:
                    self.decoding.discard(member)
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
                    self.traffic.sent += _size(message)
                    sent += 1
                if member not in self.alive:
                    stream.fail_remote("excluded", "you were excluded from this part")
                    return
                if sent == len(self.chunks):
                    contributors = self.contributors
                    signed = None if self.record is None else (await self.result_commitment(contributors)).compact()
                    await stream.send(protocol.part_done(contributors, self.mixed, signed), end=True)
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


class _Phase:
    """One phase of a round at one member: sends this member's values to every other owner and
    receives their averages into ``result``, while its :class:`_Owner` reduces its own ranges."""

    def __init__(self, service: "AllReduceService", config: RoundConfig, plan: _PhasePlan, flat: torch.Tensor,
                 result: torch.Tensor, contribution: torch.Tensor | None = None):
        self.service, self.config, self.plan, self.flat, self.result = service, config, plan, flat, result
        self.contribution = contribution  # commitments on: my values as the owners decode them (the transcript's)
        self.outcome = _PhaseOutcome(set(), {})
        self.clock = _RunningClock(min(0.25, config.sender_timeout / 4))
        self.record = None if config.identity is None else PhaseTranscript(
            plan.number, plan.tag, [list(r) for r in plan.layout.ranges], plan.active)
        self.owner = _Owner(config, plan.layout.ranges[config.me], plan.active, flat, result, self.outcome.failed,
                            self.outcome.traffic, self.clock, self.record)

    async def exchange(self) -> _PhaseOutcome:
        """Run the phase to its end here: every part this member takes part in is done or failed."""
        owner, me = self.owner, self.config.me
        tasks = [asyncio.ensure_future(self.clock.run(owner.check_senders)), asyncio.ensure_future(owner.reduce())]
        try:
            for member in self.plan.active:
                if self.config.is_banned(member):
                    owner.exclude(member, "banned")
            if owner.chunks:
                finite = await _in_worker(owner.part_length,
                                          lambda: [all_finite(self.flat[lo:hi]) for lo, hi in owner.chunks])
                for index, (lo, hi) in enumerate(owner.chunks):
                    owner.deliver(me, index, self.flat[lo:hi], self.config.weight, finite[index])
            exchanges = asyncio.gather(*(self._exchange_with(j) for j in self.plan.layout.owners() if j != me))
            try:
                if owner.chunks and self.record is not None:  # my own values for my part: committed and kept too
                    mine = await _in_worker(owner.part_length, self.record.part_values, self.flat, me)
                    digest = await _in_worker(mine.numel(), _hash_ranges, mine, [(0, mine.numel())])
                    self.record.sent[me] = self.record.inputs[me] = self.config.commit(
                        self.plan.number, me, ROLE_INPUT, digest, self.config.weight,
                        ranges=self.plan.layout.ranges[me])
                    self.record.received[me] = mine
            except BaseException:
                exchanges.cancel()
                await asyncio.gather(exchanges, return_exceptions=True)
                raise
            await exchanges
            await owner.finished.wait()
            if owner.chunks:
                self.outcome.part_reports[me] = (owner.contributors, owner.mixed)
                if owner.reduced < len(owner.chunks):
                    self.outcome.failed.add(me)
                elif self.record is not None:
                    self.record.contributors[me] = owner.contributors
                    self.record.results[me] = await owner.result_commitment(owner.contributors)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return self.outcome

    async def _exchange_with(self, owner: int) -> None:
        """Send my values for ``owner``'s ranges, receive the averages into ``result``."""
        config, traffic, codec = self.config, self.outcome.traffic, self.config.codec
        chunks = chunk_ranges(self.plan.layout.ranges[owner], config.chunk_elems)
        if config.is_banned(owner):
            self._owner_failed(owner, "banned")
            return
        try:
            stream = await self.service.p2p.open_stream(config.group.members[owner], self.service.part_method,
                                                        timeout=self.service.round_timeout)
        except (P2PError, asyncio.TimeoutError) as e:
            self._owner_failed(owner, f"cannot reach it: {e}")
            return

        async def send() -> None:
            if self.record is not None:  # commit first: every chunk encoded, the digest of what the owner decodes
                messages, digest = await _in_worker(sum(hi - lo for lo, hi in chunks), _encode_committed, codec,
                                                    self.flat, chunks, self.contribution)
                mine = self.record.sent[owner] = config.commit(self.plan.number, owner, ROLE_INPUT, digest,
                                                               config.weight, ranges=self.plan.layout.ranges[owner])
                header = PartHeader(config.group.group_id, self.plan.number, self.plan.tag, config.me, config.weight,
                                    mine.compact())
                await stream.send(protocol.part_header(header))
                for message in messages:
                    await stream.send(message)
                    traffic.sent += _size(message)
                return
            header = PartHeader(config.group.group_id, self.plan.number, self.plan.tag, config.me, config.weight)
            await stream.send(protocol.part_header(header))
            for lo, hi in chunks:
                message = await _codec_work(codec, codec.encode, self.flat[lo:hi], lo, False)
                await stream.send(message)
                traffic.sent += _size(message)

        sender = asyncio.ensure_future(send())

        def sender_done(task: asyncio.Future) -> None:  # a local error (not the stream's) fails the exchange now
            error = None if task.cancelled() else task.exception()
            if error is not None and not isinstance(error, P2PError):
                stream.cancel(_LocalError(f"sending my values failed: {type(error).__name__}: {error}"))

        sender.add_done_callback(sender_done)
        try:
            for lo, hi in chunks:
                message = await self._answer(stream)
                traffic.received += _size(message)
                if not await _codec_work(codec, _decode_into, codec, message, self.result, lo, hi, self.flat):
                    raise AveragingError("the owner returned NaN/Inf")
            done = await self._answer(stream)
            contributors, mixed = protocol.parse_part_done(done, len(config.group.members))
            if self.record is not None:
                await self._check_result(owner, done, contributors, chunks)
            self.outcome.part_reports[owner] = (contributors, mixed)
            if config.me not in contributors:
                self.outcome.failed.add(config.me)
        except _LocalError as e:
            logger.warning("%s: %s", config.label, e)  # this member's own values are lost: so is its round
            self.outcome.failed.add(config.me)
            stream.cancel()
        except RemoteError as e:
            if e.code == "excluded":
                # the owner refused my values: I failed (to it), not it. Reporting it, or excluding it
                # from my own part, would make the members that it serves well drop it, and the
                # honest owners that excluded a faulty member would be failed by that member's report
                logger.info("%s: excluded from the part of %s", config.label, config.group.members[owner])
                self.outcome.failed.add(config.me)
            else:
                self._owner_failed(owner, str(e))
            stream.cancel()
        except (P2PError, asyncio.TimeoutError, CodecError, AveragingError, TypeError) as e:  # TypeError: a codec
            reason = f"no answer for {config.owner_timeout:.1f} s" if isinstance(e, asyncio.TimeoutError) else str(e)
            self._owner_failed(owner, reason)
            stream.cancel()
        finally:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
            await stream.aclose()

    async def _check_result(self, owner: int, done: Any, contributors: list[int],
                            chunks: Sequence[tuple[int, int]]) -> None:
        """The owner's signed digest of its result (in its final message) against the averages received;
        AveragingError (the owner failed) if missing, not its signature, or not what it sent."""
        assert self.record is not None
        compact = protocol.parse_part_commitment(done)
        if compact is None:
            raise AveragingError("the owner sent no signed digest of its result")
        signed = Commitment.from_compact(compact, self.config.commit_prefix, self.config.group.group_id,
                                         self.plan.number, owner, ROLE_RESULT, 0.0, contributors,
                                         group_digest(self.config.group.members),
                                         sender=self.config.group.members[owner], codec=self.config.codec.name,
                                         ranges=self.plan.layout.ranges[owner])
        if not signed.verify():
            raise AveragingError("the owner's result digest is not signed by it")
        digest = await _in_worker(sum(hi - lo for lo, hi in chunks), _hash_ranges, self.result, chunks)
        if digest != signed.digest:
            raise AveragingError("the owner's averages do not match its signed digest")
        self.record.results[owner] = signed
        self.record.contributors[owner] = contributors

    async def _answer(self, stream: Stream) -> Any:
        """The owner's next message on ``stream``; asyncio.TimeoutError after ``owner_timeout`` of
        running time (this member's own stalls do not count: what arrived meanwhile is read first)."""
        deadline = self.clock.now() + self.config.owner_timeout
        while True:
            remaining = deadline - self.clock.now()
            if remaining <= 0:
                raise asyncio.TimeoutError
            try:
                return await asyncio.wait_for(stream.recv(), remaining)
            except asyncio.TimeoutError:
                continue  # the loop may have stalled meanwhile: the deadline is checked again

    def _owner_failed(self, owner: int, reason: str) -> None:
        if owner not in self.outcome.failed:
            logger.info("%s: part owner %s failed: %s", self.config.label, self.config.group.members[owner], reason)
        self.outcome.failed.add(owner)
        # it is no survivor now (our report names it): waiting for its values to my part would only
        # delay the round by sender_timeout. Only before my part is done: the contributors announced in
        # my final messages must be what I report for it myself.
        if not self.owner.finished.is_set():
            self.owner.exclude(owner, f"failed as a part owner: {reason}")


class AllReduceService:
    """Serves ``avg.part`` and ``avg.report`` on a P2P peer and runs rounds for one averager.

    ``round_timeout`` (120 s): limit of one part stream; ``join_wait`` (10 s): how long an ``avg.part``
    header for a round not started here yet waits for it; ``max_waiting_per_peer`` (8) and
    ``max_waiting`` (256): such waiting streams per calling peer and in all (``overloaded`` beyond);
    ``header_timeout`` (10 s): a part stream must send its header this soon. The messages and
    their limits are in :mod:`averaging.protocol`.
    """

    def __init__(self, p2p: P2P, prefix: str, round_timeout: float = 120.0, *, join_wait: float = 10.0,
                 max_waiting_per_peer: int = 8, max_waiting: int = 256, header_timeout: float = 10.0):
        self.p2p = p2p
        self.round_timeout, self.join_wait, self.header_timeout = round_timeout, join_wait, header_timeout
        self.part_method = protocol.method(protocol.PART_METHOD, prefix)
        self.report_method = protocol.method(protocol.REPORT_METHOD, prefix)
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
        p2p.add_unary_handler(self.report_method, self._serve_report, max_message_size=protocol.MAX_REPORT_BYTES)

    def close(self) -> None:
        self.p2p.remove_handler(self.part_method)
        self.p2p.remove_handler(self.report_method)

    def finish(self, group_id: bytes) -> None:
        """This peer takes no (further) part in round ``group_id`` (e.g. its step was cancelled right
        after matchmaking): part streams for it, waiting or new, are refused at once instead of after
        ``join_wait``, so the others give up on this peer and retry without delay."""
        if group_id in self._groups:
            return  # the round runs here: it cleans up itself
        self._remember_finished(group_id)
        for phase_no in (0, 1):
            entry = self._phase_ready.get((group_id, phase_no))
            if entry is not None:
                entry[0].set()  # the waiting streams find no phase: "the averaging round is over"

    def _remember_finished(self, group_id: bytes) -> None:
        self._finished[group_id] = None
        while len(self._finished) > MAX_FINISHED_ROUNDS:
            self._finished.popitem(last=False)

    def table_sizes(self) -> dict[str, int]:
        """Entries in every table keyed by what peers send (for tests: back to 0 between rounds)."""
        return {"phases": len(self._phases), "phase_ready": len(self._phase_ready), "waiting": len(self._waiting),
                "waiting_peers": self._waiting.keys, "groups": len(self._groups), "reports": len(self._reports),
                "my_reports": len(self._my_reports), "report_calls": len(self._report_calls),
                "relay_wait": len(self._relay_wait)}

    # ---- serving ---------------------------------------------------------------------------
    async def _wait_for_phase(self, key: tuple[bytes, int], ctx: CallContext) -> _Phase:
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
            message = await asyncio.wait_for(stream.recv(), self.header_timeout)
        except asyncio.TimeoutError:
            raise refuse(f"no part header within {self.header_timeout:.3g} s") from None
        header = protocol.parse_part_header(message)
        del message
        key = (header.group_id, header.phase)
        phase = self._phases.get(key)
        if phase is None:
            if header.group_id in self._finished:
                raise P2PError("the averaging round is over")
            phase = await self._wait_for_phase(key, ctx)
        owner, members, member = phase.owner, phase.config.group.members, header.member
        if member >= len(members) or members[member] != ctx.peer_id:
            raise refuse("not a member of this group at that index", member)
        if member in owner.serving:
            raise refuse("a second part stream for the same phase")
        if phase.config.is_banned(member):
            owner.exclude(member, "banned")
            raise P2PError("banned from this run")
        if member not in owner.alive:
            raise P2PError("not an active member of this phase (or already excluded)")
        if header.tag != phase.plan.tag:
            owner.exclude(member, "disagrees on the recovery plan")
            raise P2PError("recovery plan mismatch")
        if not (math.isfinite(header.weight) and header.weight >= 0):
            owner.exclude(member, f"sent an invalid weight {brief(header.weight)}")
            raise BadRequestError("invalid weight")
        if phase.record is not None:
            if header.commitment is None:
                owner.exclude(member, "sent no signed digest of its values")
                raise refuse("commitments are required in this round")
            try:
                signed = Commitment.from_compact(header.commitment, phase.config.commit_prefix, header.group_id,
                                                 header.phase, phase.config.me, ROLE_INPUT, float(header.weight),
                                                 group=group_digest(phase.config.group.members), sender=ctx.peer_id,
                                                 codec=phase.config.codec.name,
                                                 ranges=phase.plan.layout.ranges[phase.config.me])
            except BadRequestError as e:
                owner.exclude(member, f"sent a malformed commitment ({e})")
                raise
            if not signed.verify():
                owner.exclude(member, "its digest is not signed by it")
                raise refuse("bad signature on the commitment")
            phase.record.inputs[member] = signed
        await owner.serve(stream, member, float(header.weight))

    async def _serve_report(self, message: Any, ctx: CallContext) -> Any:
        request = protocol.parse_report_request(message)
        group_id, member = request.group_id, request.member
        group, futures, mine = self._groups.get(group_id), self._reports.get(group_id), self._my_reports.get(group_id)
        if group is None or futures is None or mine is None:
            raise P2PError("unknown averaging group")
        if member not in futures or group.members[member] != ctx.peer_id:
            raise refuse("not a member of this group at that index", member)
        failed = protocol.member_indices(request.failed, len(group.members))
        if (group_id, member) in self._report_calls:
            raise refuse("a second report for the same round")
        self._report_calls.add((group_id, member))
        try:
            if not futures[member].done():
                futures[member].set_result(set(failed))
            mine_failed = sorted(await asyncio.shield(mine))
            if not group.is_client(member):
                return protocol.report_reply(mine_failed)
            # it cannot reach the other clients: relay what they reported
            others = [c for c in futures if c != member and group.is_client(c)]
            pending = [futures[c] for c in others if not futures[c].done()]
            if pending:  # they report at about the same time; a missing one is waited for a while only
                await asyncio.wait(pending, timeout=self._relay_wait.get(group_id, 0.0))
            heard = [c for c in others if futures[c].done() and futures[c].result() is not None]
            # a client failed here, or that failed itself, is relayed as failed, what it says of others not
            relayed = sorted(set().union(*({c} if c in mine_failed or c in futures[c].result()
                                           else futures[c].result() for c in heard)))
            return protocol.report_reply(mine_failed, heard, relayed)
        finally:
            self._report_calls.discard((group_id, member))

    # ---- a round ---------------------------------------------------------------------------
    async def run(self, config: RoundConfig, flat: torch.Tensor, result: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, AllReduceResult]:
        """Average ``flat`` with the group; returns (result vector, what happened) or raises
        AveragingError. ``result``: where to put the averages (a vector like ``flat``; default: a new one)."""
        group, me, n = config.group, config.me, len(config.group.members)
        loop = asyncio.get_running_loop()
        start = loop.time()
        result = torch.empty_like(flat) if result is None else result
        layout = Layout.contiguous(group.part_sizes)
        transcript = None if config.identity is None else RoundTranscript(
            config.commit_prefix, group.group_id, list(group.members), me, config.weight,
            "mean" if config.reducer is weighted_mean else getattr(config.reducer, "__name__", "custom"))
        if transcript is not None:
            transcript.contribution = await _in_worker(flat.numel(), flat.clone)
        self._groups[group.group_id] = group
        self._reports[group.group_id] = {i: loop.create_future() for i in range(n) if i != me}
        self._my_reports[group.group_id] = loop.create_future()
        try:
            phase0 = await self._butterfly(config, _PhasePlan(0, b"", layout, tuple(range(n))), flat, result,
                                           transcript)
            survivors = await self._agree(config, phase0.failed, config.owner_timeout + config.sender_timeout)
            if me in phase0.failed:
                raise AveragingError("this peer failed in this round (an owner excluded it, or its own part failed)")
            if me not in survivors:
                raise AveragingError(f"this peer was excluded from the group ({len(survivors)} of {n} survived)")
            if len(survivors) < max(2, n // 2 + 1):  # an isolated minority must not 'average' with itself
                raise AveragingError(f"lost contact with most of the group: only {len(survivors)} of {n} members "
                                     f"(this one included) are reachable")
            affected = [j for j in layout.owners()
                        if j not in survivors or phase0.part_reports.get(j, ([], True)) != (survivors, False)]
            spans = [r for j in affected for r in layout.ranges[j]]
            traffic = phase0.traffic
            recovery_start = loop.time()
            if spans:
                phase1 = await self._butterfly(config, _recovery_plan(group, survivors, spans), flat, result,
                                               transcript)
                traffic = _Traffic(traffic.sent + phase1.traffic.sent, traffic.received + phase1.traffic.received)
                if phase1.failed:
                    raise AveragingError("a member failed during recovery: " +
                                         ", ".join(str(group.members[i]) for i in sorted(phase1.failed)))
            survivor_ids = [group.members[i] for i in survivors]
            parts = [(s, e, survivor_ids) for j in layout.owners() for s, e in layout.ranges[j]]
            if transcript is not None:
                transcript.survivors = survivor_ids
                transcript.result = await _in_worker(result.numel(), result.clone)
            end = loop.time()
            return result, AllReduceResult(group.members, survivor_ids, parts, spans, traffic.sent, traffic.received,
                                           end - start, end - recovery_start if spans else 0.0, transcript)
        except AveragingError as e:
            logger.warning("%s lost here: %s", config.label, e)
            raise
        finally:
            self._groups.pop(group.group_id, None)
            self._reports.pop(group.group_id, None)
            self._relay_wait.pop(group.group_id, None)
            mine = self._my_reports.pop(group.group_id, None)
            if mine is not None and not mine.done():
                mine.set_result(set(range(n)))
            self._remember_finished(group.group_id)

    async def _butterfly(self, config: RoundConfig, plan: _PhasePlan, flat: torch.Tensor,
                         result: torch.Tensor, transcript: RoundTranscript | None = None) -> _PhaseOutcome:
        """One phase of the round, registered so that the other members' part streams find it."""
        phase = _Phase(self, config, plan, flat, result, None if transcript is None else transcript.contribution)
        if transcript is not None and phase.record is not None:
            transcript.phases.append(phase.record)
        key = (config.group.group_id, plan.number)
        self._phases[key] = phase
        waiting = self._phase_ready.get(key)
        if waiting is not None:
            waiting[0].set()  # the streams waiting for it go on (and leave the table themselves)
        try:
            return await phase.exchange()
        finally:
            self._phases.pop(key, None)
            phase.owner.abort()  # streams still served here end now, also when the round was cancelled

    async def _agree(self, config: RoundConfig, failed: set[int], timeout: float) -> list[int]:
        """Exchange failure reports with every member; returns the survivors everyone should agree on.

        One call per pair of reachable members (the lower index calls); a client-mode member calls
        every reachable one, and learns what the other clients reported (they cannot reach each
        other) from those replies: which clients each reachable member heard from, and the union of
        their reports. A member heard from nowhere is dropped."""
        group, me, n = config.group, config.me, len(config.group.members)
        self._relay_wait[group.group_id] = timeout / 2
        self._my_reports[group.group_id].set_result(set(failed))
        futures = self._reports[group.group_id]
        relayed: set[int] = set()  # failures the other clients reported, as relayed to this client
        request = protocol.report_request(group.group_id, me, sorted(failed))

        async def call(peer: int) -> None:
            try:
                response = await self.p2p.call(group.members[peer], self.report_method, request, timeout=timeout)
                report, heard, through = protocol.parse_report_reply(response, n, client=group.is_client(me))
                if not futures[peer].done():
                    futures[peer].set_result(set(report))
                if peer in report:
                    return  # it failed itself: it is dropped, and what it relays does not count either
                relayed.update(through)
                for c in heard:
                    if c in futures and group.is_client(c) and not futures[c].done():
                        futures[c].set_result(set())  # its failures are in ``relayed``
            except (P2PError, asyncio.TimeoutError):
                if not futures[peer].done():
                    futures[peer].set_result(None)

        async def call_all(peers: list[int]) -> None:
            await asyncio.gather(*(call(peer) for peer in peers))
            if group.is_client(me):  # clients that no reachable member heard from are dropped
                for c, future in futures.items():
                    if group.is_client(c) and not future.done():
                        future.set_result(None)

        peers = []
        for peer in futures:
            if peer in failed:
                if not futures[peer].done():  # its report may have come already: it does not count (below)
                    futures[peer].set_result(None)
            elif not group.is_client(peer) and (group.is_client(me) or me < peer):
                peers.append(peer)  # clients call me (or reach me through the reachable members)
        calls = asyncio.ensure_future(call_all(peers))
        # failed here (e.g. excluded), this round is lost: the members I call learn it at once, the
        # others need not be waited for
        awaited = [futures[p] for p in peers] if me in failed else list(futures.values())
        try:
            if awaited:
                await asyncio.wait(awaited, timeout=timeout)
        finally:
            calls.cancel()
            await asyncio.gather(calls, return_exceptions=True)
        survivors = set(range(n)) - failed - relayed
        for peer, future in futures.items():
            report = future.result() if future.done() else None
            if report is None or peer in failed or peer in report:
                # unreachable, failed here, or it failed itself (e.g. excluded): what it says of the
                # others does not count (an excluded member would blame the owners that excluded it)
                survivors.discard(peer)
            else:
                survivors -= report
        return sorted(survivors)


def _recovery_plan(group: GroupInfo, survivors: list[int], spans: list[tuple[int, int]]) -> _PhasePlan:
    """Phase 1: ``spans`` (the parts to redo) split among the ``survivors`` by bandwidth; client-mode
    survivors reduce nothing. Its tag (a hash of the plan) lets members that disagree refuse each other."""
    total = sum(e - s for s, e in spans)
    bandwidths = [group.bandwidth(i) for i in survivors]
    if not any(b is None or b > 0 for b in bandwidths):
        raise AveragingError("every survivor is in client mode: nobody can reduce the failed parts")
    sizes = [0] * len(group.members)
    for i, size in zip(survivors, part_sizes(total, [b if b is None or b > 0 else 0.0 for b in bandwidths])):
        sizes[i] = size
    tag = hashlib.sha256(repr((group.group_id, survivors, spans)).encode()).digest()[:16]
    return _PhasePlan(1, tag, Layout.over(spans, sizes), tuple(survivors))
