"""All-gather of sparse contributions: every member decodes every contribution, in the same order.

Sparse codecs (``codec.sparse = True``: :mod:`averaging.sparse_codecs`) do not split into butterfly
parts (the indices a member keeps are its own), so :class:`~averaging.averager.AsyncAverager` uses
this collective for them. A round at member ``me`` of a group:

1. **Encode** its vector once (the codec's ``chunk_ranges``; error feedback updated; in a worker
   thread) and decode its own messages as the others will.
2. **Gather**: one ``avg.gather`` stream per pair of members (a client-mode member dials the
   others, otherwise the lower index dials; clients are relayed, below), both sides send their
   weight and chunks, and check
   what they receive in a worker thread: a malformed chunk (wrong length, out-of-range or duplicated
   indices, bad tiling: the codec's CodecError), NaN/Inf values, a bad weight, or silence for
   ``sender_timeout`` excludes the sender, logged at INFO with its name. A SHA-256 digest of each
   contribution as received is kept.
3. **Agree**: members exchange ``have`` reports (member -> digest of the contribution they hold
   valid). The contributors F are the members whose contribution this member holds, that reported
   (or are this member), and that every report names with the same digest (a sender that sent
   different bytes to different members is excluded, named). So a member that vanished mid-transfer,
   or before reporting, is excluded everywhere alike.
4. **Check and aggregate**: members exchange F; one that averaged other contributors than this
   member (while its own contribution is in F) makes the round fail here (AveragingError, tensors
   untouched) rather than diverge. Then every member decodes the contributions of F in member
   order and aggregates them: the weighted mean in float64, element-wise (IEEE-exact, so the
   result is bit-identical on every member, whatever its CPU), or a robust aggregator of
   :mod:`averaging.aggregators` (the RoundConfig's reducer; chunk by chunk when it is coordinate-wise).
   Determinism assumes the same decoding arithmetic (``demo`` decodes through matrix products).

A round needs a majority of the group reachable (``max(2, n // 2 + 1)`` members, this one
included) and this member's own contribution in F, else AveragingError; a failed round restores the
codec's error-feedback residual (what was encoded for it was not applied). Bytes: each member sends
its contribution to each of the ``n - 1`` others (and receives theirs); nothing else but ~100-byte
reports.

Client-mode members (they accept no connections) dial the others; two of them cannot reach each
other, so the lowest-index member that is not a client relays: it forwards to each client the other
clients' contributions as they arrived (only those valid here) and, after the reports, their
``have`` reports. A relay that fails is excluded by the clients, which then lack each other's
contributions: the others average without those clients, and the clients fail their round. (A
relay could drop or forge what it forwards: it is trusted like any reporter.)

The messages, their fields and limits are in :mod:`averaging.protocol` (``avg.gather``, version 1).
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import msgpack
import torch

from dht import P2P, P2PError, Stream
from dht.peer.p2p import CallContext
from dht.peer.slots import Slots
from dht.peer.untrusted import brief

from . import protocol
from .allreduce import AllReduceResult, RoundConfig, all_finite, weighted_mean
from .compression import Codec, CodecError
from .error_feedback import ErrorFeedback
from .errors import AveragingError
from .partition import chunk_ranges
from .protocol import BadRequestError, refuse

__all__ = ["SparseAllGatherService", "gather_chunks", "deterministic_mean"]

logger = logging.getLogger(__name__)

MAX_FINISHED_ROUNDS = 256


def gather_chunks(codec: Codec, total: int, chunk_elems: int) -> list[tuple[int, int]]:
    """The chunks of a vector of ``total`` values on the wire: the codec's ``chunk_ranges`` if it
    has one (aligned to its tiles), else ranges of ``chunk_elems``."""
    ranges = getattr(codec, "chunk_ranges", None)
    if callable(ranges):
        return list(ranges(total, chunk_elems))
    return chunk_ranges([(0, total)], chunk_elems)


def deterministic_mean(rows: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """``Σ w_i x_i / Σ w_i`` accumulated in float64 in the given order with separate element-wise
    multiplications and additions (no BLAS, no fused multiply-add): bit-identical on every CPU."""
    total = sum(weights)
    acc = torch.zeros(rows[0].numel(), dtype=torch.float64)
    for row, weight in zip(rows, weights):
        acc += row.double() * (weight / total)
    return acc.to(torch.float32)


def _packed(message: Any) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


@dataclass
class _Contribution:
    weight: float
    messages: list[Any]
    digest: bytes
    head: Any = None  # its weight message as it arrived (a relay forwards it as it is)


@dataclass
class _Traffic:
    sent: int = 0
    received: int = 0


@dataclass
class _Pair:
    """This member's exchange with one other member."""

    member: int
    stream: Stream | None = None
    have: dict[int, bytes] | None = None  # its report (None: none came)
    final: list[int] | None = None
    released: asyncio.Event = field(default_factory=asyncio.Event)  # the handler may return (acceptor side)


class _Round:
    """One round at one member (see the module docstring)."""

    def __init__(self, service: "SparseAllGatherService", config: RoundConfig, flat: torch.Tensor):
        self.service, self.config, self.flat = service, config, flat
        self.codec = config.codec
        self.n = len(config.group.members)
        self.chunks = gather_chunks(self.codec, flat.numel(), config.chunk_elems)
        group, me = config.group, config.me
        self.clients = [i for i in range(self.n) if group.is_client(i)]
        servers = [i for i in range(self.n) if not group.is_client(i)]
        self.relay = servers[0] if servers else -1  # relays between clients (they cannot reach each other)
        self.relaying = len(self.clients) >= 2 and self.relay >= 0
        self.pairs = {j: _Pair(j) for j in range(self.n) if j != me and self.linked(me, j)}
        loop = asyncio.get_running_loop()
        self.incoming: dict[int, asyncio.Future] = {j: loop.create_future() for j in self.pairs
                                                    if not self.dials(me, j)}
        self.received = {j: asyncio.Event() for j in range(self.n)}  # j's contribution arrived or failed here
        self.reported = {j: asyncio.Event() for j in range(self.n)}  # j's report arrived or failed here
        self.relayed_have: dict[int, dict[int, bytes] | None] = {}  # other clients' reports (at a client)
        self.valid: dict[int, _Contribution] = {}
        self.excluded: dict[int, str] = {}
        self.traffic = _Traffic()
        self.own_packed: list[bytes] = []
        for j in self.pairs:
            if config.is_banned(j):
                self.exclude(j, "banned")

    def dials(self, i: int, j: int) -> bool:
        """Whether member ``i`` opens the stream to ``j``."""
        group = self.config.group
        if group.is_client(j):
            return False
        return group.is_client(i) or i < j

    def linked(self, i: int, j: int) -> bool:
        """Whether ``i`` and ``j`` exchange directly (not two client-mode members)."""
        return self.dials(i, j) or self.dials(j, i)

    def relays_to(self, j: int) -> bool:
        """Whether this member relays the other clients' contributions and reports to ``j``."""
        return self.relaying and self.config.me == self.relay and j in self.clients

    def relayed_from(self, j: int) -> bool:
        """Whether ``j`` relays the other clients' contributions and reports to this member."""
        return self.relaying and j == self.relay and self.config.me in self.clients

    def exclude(self, member: int, reason: str) -> None:
        if member in self.excluded:
            return
        self.excluded[member] = reason
        self.valid.pop(member, None)
        logger.info("%s: excluding %s: %s", self.config.label, self.config.group.members[member], reason)

    # ---- 1: encode --------------------------------------------------------------------------
    def _encode_own(self) -> tuple[_Contribution, bool]:
        codec, flat = self.codec, self.flat
        messages = [codec.encode(flat[lo:hi].contiguous(), lo, False) for lo, hi in self.chunks]
        weight = protocol.gather_weight(self.config.weight)
        self.own_packed = [_packed(weight)] + [_packed(m) for m in messages]
        digest = hashlib.sha256(b"".join(self.own_packed)).digest()[:protocol.GATHER_DIGEST_BYTES]
        try:
            finite = all(all_finite(codec.decode(m, hi - lo)) for m, (lo, hi) in zip(messages, self.chunks))
        except CodecError:  # its own values do not decode either (e.g. NaN scales): the others exclude it
            finite = False
        return _Contribution(float(self.config.weight), messages, digest), finite

    # ---- 2: gather --------------------------------------------------------------------------
    async def _connect(self, j: int) -> Stream | None:
        config, service = self.config, self.service
        try:
            if self.dials(config.me, j):
                stream = await service.p2p.open_stream(config.group.members[j], service.method,
                                                       timeout=service.round_timeout)
                await stream.send(protocol.gather_header(config.group.group_id, config.me))
                return stream
            return await asyncio.wait_for(asyncio.shield(self.incoming[j]), config.owner_timeout)
        except (P2PError, asyncio.TimeoutError) as e:
            self.exclude(j, f"cannot reach it: {e or 'no stream within the timeout'}")
            return None

    async def _send_own(self, stream: Stream) -> None:
        for payload in self.own_packed:
            await stream.send_packed(payload)
            self.traffic.sent += len(payload)

    async def _recv(self, stream: Stream, timeout: float) -> Any:
        message = await asyncio.wait_for(stream.recv(), timeout)
        self.traffic.received += len(_packed(message))
        return message

    def _check(self, message: Any, length: int) -> str | None:
        """Why a received chunk is excluded (None: it is valid). In a worker thread."""
        try:
            values = self.codec.decode(message, length)
        except CodecError as e:
            return f"sent a malformed contribution ({str(e)[:200]})"
        except Exception as e:  # noqa: BLE001 - a codec that fails on hostile input in another way
            return f"sent a contribution that cannot be decoded ({type(e).__name__})"
        return None if all_finite(values) else "sent NaN or Inf values"

    async def _receive(self, j: int, stream: Stream, via: int | None = None) -> bool:
        """Receive ``j``'s contribution (relayed by ``via``, or from ``j`` itself); False if the
        stream is unusable now (silence, failure: its peer is excluded). A contribution excluded
        for its content is read to its end (the reports follow)."""
        timeout = self.config.sender_timeout
        loop = asyncio.get_running_loop()
        problem = None
        peer = j if via is None else via
        try:
            first = await self._recv(stream, timeout)
            try:
                weight = protocol.parse_gather_weight(first)
            except BadRequestError as e:
                weight, problem = 0.0, f"sent an invalid weight ({str(e)[:200]})"
            messages, parts = [], [_packed(first)]
            for lo, hi in self.chunks:
                message = await self._recv(stream, timeout)
                if problem is not None:
                    continue
                parts.append(_packed(message))
                problem = await loop.run_in_executor(None, self._check, message, hi - lo)
                messages.append(message)
        except asyncio.TimeoutError:
            self.exclude(peer, f"sent nothing for {timeout:.1f} s")
            return False
        except P2PError as e:
            self.exclude(peer, f"stream failed: {brief(str(e), 200)}")
            return False
        if problem is not None:
            self.exclude(j, problem if via is None else f"{problem} (relayed by {self.config.group.members[via]})")
        elif j not in self.excluded:
            digest = hashlib.sha256(b"".join(parts)).digest()[:protocol.GATHER_DIGEST_BYTES]
            self.valid[j] = _Contribution(weight, messages, digest, first)
        return True

    async def _forward(self, j: int, stream: Stream) -> None:
        """As the relay, send client ``j`` the other clients' contributions as they arrived here."""
        for c in self.clients:
            if c == j:
                continue
            await self.received[c].wait()
            contribution = self.valid.get(c)
            messages = [] if contribution is None else [contribution.head, *contribution.messages]
            for message in [protocol.gather_relay(c, contribution is not None), *messages]:
                payload = _packed(message)
                await stream.send_packed(payload)
                self.traffic.sent += len(payload)

    async def _receive_relayed(self, stream: Stream) -> bool:
        """As a client, receive the other clients' contributions from the relay."""
        relay = self.relay
        wait = self.config.owner_timeout + self.config.sender_timeout  # the relay waits for their uploads
        for c in self.clients:
            if c == self.config.me:
                continue
            try:
                member, present = protocol.parse_gather_relay(await self._recv(stream, wait), self.n)
            except (asyncio.TimeoutError, P2PError, BadRequestError) as e:
                self.exclude(relay, f"did not relay: {brief(str(e) or type(e).__name__, 200)}")
                return False
            if member != c:
                self.exclude(relay, f"relayed member {member} instead of {c}")
                return False
            if present and not await self._receive(c, stream, via=relay):
                return False
            self.received[c].set()
        return True

    async def _gather_with(self, j: int) -> None:
        try:
            if j not in self.excluded:  # (banned)
                await self._exchange_contributions(j)
        finally:
            self.received[j].set()

    async def _exchange_contributions(self, j: int) -> None:
        stream = await self._connect(j)
        if stream is None:
            return
        self.pairs[j].stream = stream

        async def send() -> None:
            await self._send_own(stream)
            if self.relays_to(j):
                await self._forward(j, stream)

        sender = asyncio.ensure_future(send())
        try:
            usable = await self._receive(j, stream)
            self.received[j].set()
            if usable and self.relayed_from(j):
                usable = await self._receive_relayed(stream)
            if usable:  # (a relay's sending waits for the other clients' uploads)
                forwards = len(self.clients) if self.relays_to(j) else 0
                await asyncio.wait_for(sender, self.config.owner_timeout * (1 + forwards))
            else:
                self.pairs[j].stream = None
                stream.cancel()
        except (P2PError, asyncio.TimeoutError) as e:
            self.exclude(j, f"stream failed: {brief(str(e) or type(e).__name__, 200)}")
            self.pairs[j].stream = None
            stream.cancel()
        finally:
            if not sender.done():
                sender.cancel()
                await asyncio.gather(sender, return_exceptions=True)

    # ---- 3, 4: agree, check -------------------------------------------------------------------
    async def _exchange(self, j: int, message: dict, parse: Callable[[Any], Any], end: bool = False) -> Any:
        """Send ``message`` to ``j`` and return its parsed answer (None: none came, or malformed)."""
        stream = self.pairs[j].stream
        if stream is None:
            return None
        try:
            await stream.send(message, end=end)
            self.traffic.sent += len(_packed(message))
            return parse(await self._recv(stream, self.config.owner_timeout))
        except (P2PError, asyncio.TimeoutError, BadRequestError) as e:
            logger.info("%s: no %s from %s: %s", self.config.label, next(iter(message)),
                        self.config.group.members[j], brief(str(e) or type(e).__name__, 200))
            return None

    def contributors(self) -> list[int]:
        """F: see the module docstring (rule 3)."""
        me, mine = self.config.me, {m: c.digest for m, c in self.valid.items()}
        reporters = self.reporters()
        chosen = []
        for m, digest in sorted(mine.items()):
            if m != me and m not in reporters:
                continue
            differing = [r for r, have in reporters.items() if m in have and have[m] != digest]
            if differing:
                self.exclude(m, "sent different contributions to different members")
                continue
            if all(m in have for have in reporters.values()):
                chosen.append(m)
        return chosen

    def reporters(self) -> dict[int, dict[int, bytes]]:
        """The reports this member has: directly, and (at a client) the other clients' via the relay."""
        reports = {j: have for j, have in self.relayed_have.items() if have is not None and j not in self.pairs}
        reports.update({j: p.have for j, p in self.pairs.items() if p.have is not None})
        return reports

    async def _report(self, j: int, mine: dict[int, bytes]) -> None:
        """Exchange ``have`` reports with ``j``; the relay then sends a client the other clients' reports."""
        pair = self.pairs[j]
        try:
            pair.have = await self._exchange(j, protocol.gather_have(mine),
                                             lambda m: protocol.parse_gather_have(m, self.n))
        finally:
            self.reported[j].set()
        if pair.stream is None or pair.have is None:
            return
        try:
            if self.relays_to(j):
                others = [c for c in self.clients if c != j]
                for c in others:
                    await self.reported[c].wait()
                message = protocol.gather_relayed_have({c: self.pairs[c].have for c in others})
                await pair.stream.send(message)
                self.traffic.sent += len(_packed(message))
            elif self.relayed_from(j):
                wait = 2 * self.config.owner_timeout  # the relay waits for the other clients' reports
                self.relayed_have = protocol.parse_gather_relayed_have(await self._recv(pair.stream, wait), self.n)
        except (P2PError, asyncio.TimeoutError, BadRequestError) as e:
            logger.info("%s: relayed reports with %s failed: %s", self.config.label, self.config.group.members[j],
                        brief(str(e) or type(e).__name__, 200))

    def _aggregate(self, contributors: list[int], result: torch.Tensor) -> None:
        reducer = self.config.reducer
        weights = [self.valid[m].weight for m in contributors]
        if not sum(weights) > 0:
            raise AveragingError("the contributors' weights sum to 0")

        def rows(index: int, lo: int, hi: int) -> list[torch.Tensor]:
            return [self.codec.decode(self.valid[m].messages[index], hi - lo) for m in contributors]

        if reducer is weighted_mean:
            for index, (lo, hi) in enumerate(self.chunks):
                result[lo:hi] = deterministic_mean(rows(index, lo, hi), weights)
            return
        w = torch.tensor(weights, dtype=torch.float32)
        if getattr(reducer, "chunkwise", False):
            for index, (lo, hi) in enumerate(self.chunks):
                result[lo:hi] = reducer(torch.stack(rows(index, lo, hi)), w).to(torch.float32)
            return
        full = torch.stack([torch.cat([self.codec.decode(self.valid[m].messages[i], hi - lo)
                                       for i, (lo, hi) in enumerate(self.chunks)]) for m in contributors])
        result.copy_(reducer(full, w).to(torch.float32))

    async def run(self, result: torch.Tensor) -> tuple[torch.Tensor, AllReduceResult]:
        config, me, group = self.config, self.config.me, self.config.group
        loop = asyncio.get_running_loop()
        started = loop.time()
        own, finite = await loop.run_in_executor(None, self._encode_own)
        if finite:
            self.valid[me] = own
        else:
            logger.warning("%s: this peer's own values are not finite: the others will exclude it", config.label)
        self.service.ready(group.group_id)
        await asyncio.gather(*(self._gather_with(j) for j in self.pairs))
        mine = {m: c.digest for m, c in self.valid.items()}

        await asyncio.gather(*(self._report(j, mine) for j in self.pairs))
        reached = 1 + len(self.reporters())
        if reached < max(2, self.n // 2 + 1):
            raise AveragingError(f"lost contact with most of the group: only {reached} of {self.n} members "
                                 f"(this one included) reported")
        contributors = self.contributors()

        async def final(j: int) -> None:
            self.pairs[j].final = await self._exchange(j, protocol.gather_final(contributors),
                                                       lambda m: protocol.parse_gather_final(m, self.n), end=True)

        await asyncio.gather(*(final(j) for j in self.pairs))
        disagreeing = [j for j, p in self.pairs.items()
                       if p.final is not None and j in contributors and p.final != contributors]
        if disagreeing:
            raise AveragingError("members disagree on the contributors: " +
                                 ", ".join(str(group.members[j]) for j in disagreeing))
        if me not in contributors:
            raise AveragingError("this peer's contribution was excluded from the round")
        if len(contributors) < 2:
            raise AveragingError("no other member's contribution could be averaged")
        await loop.run_in_executor(None, self._aggregate, contributors, result)
        ids = [group.members[m] for m in contributors]
        seconds = loop.time() - started
        return result, AllReduceResult(group.members, ids, [(0, self.flat.numel(), ids)], [], self.traffic.sent,
                                       self.traffic.received, seconds, 0.0)

    async def close(self) -> None:
        """Release every stream: the handlers of accepted ones return, dialed ones are closed
        (cleanly when both sides ended them, else cancelled)."""
        for pair in self.pairs.values():
            pair.released.set()
            if pair.stream is not None and pair.member not in self.incoming:
                await pair.stream.aclose()
        for future in self.incoming.values():
            if not future.done():
                future.cancel()


class SparseAllGatherService:
    """Serves ``avg.gather`` on a P2P peer and runs all-gather rounds for one averager (the
    interface of :class:`~averaging.allreduce.AllReduceService`: ``run``, ``finish``, ``close``).

    ``round_timeout`` (120 s): limit of one stream; ``join_wait`` (10 s): how long a stream for a
    round not started here yet waits for it; ``max_waiting_per_peer`` (8), ``max_waiting`` (256):
    such waiting streams per calling peer and in all (``overloaded`` beyond); ``header_timeout``
    (10 s): a stream must send its header this soon.
    """

    def __init__(self, p2p: P2P, prefix: str, round_timeout: float = 120.0, *, join_wait: float = 10.0,
                 max_waiting_per_peer: int = 8, max_waiting: int = 256, header_timeout: float = 10.0):
        self.p2p = p2p
        self.round_timeout, self.join_wait, self.header_timeout = round_timeout, join_wait, header_timeout
        self.method = protocol.method(protocol.GATHER_METHOD, prefix)
        self._rounds: dict[bytes, _Round] = {}
        self._ready: dict[bytes, list] = {}  # group id -> [event set when the round starts here, waiting streams]
        self._waiting = Slots(max_waiting_per_peer, max_waiting, "avg.gather streams waiting for a round")
        self._finished: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        p2p.add_stream_handler(self.method, self._serve, max_message_size=protocol.MAX_GATHER_MESSAGE_BYTES)

    def close(self) -> None:
        self.p2p.remove_handler(self.method)

    def ready(self, group_id: bytes) -> None:
        """The round ``group_id`` runs here now: streams waiting for it go on."""
        entry = self._ready.get(group_id)
        if entry is not None:
            entry[0].set()

    def finish(self, group_id: bytes) -> None:
        """This peer takes no (further) part in round ``group_id``: its streams are refused at once."""
        if group_id in self._rounds:
            return
        self._remember_finished(group_id)
        self.ready(group_id)

    def _remember_finished(self, group_id: bytes) -> None:
        self._finished[group_id] = None
        while len(self._finished) > MAX_FINISHED_ROUNDS:
            self._finished.popitem(last=False)

    def table_sizes(self) -> dict[str, int]:
        """Entries in every table keyed by what peers send (for tests: back to 0 between rounds)."""
        return {"rounds": len(self._rounds), "ready": len(self._ready), "waiting": len(self._waiting),
                "waiting_peers": self._waiting.keys}

    async def _wait_for_round(self, group_id: bytes, ctx: CallContext) -> _Round:
        with self._waiting.hold(ctx.peer_id):
            entry = self._ready.get(group_id)
            if entry is None:
                entry = self._ready[group_id] = [asyncio.Event(), 0]
            entry[1] += 1
            try:
                await asyncio.wait_for(entry[0].wait(), self.join_wait)
            except asyncio.TimeoutError:
                raise P2PError("unknown averaging group") from None
            finally:
                entry[1] -= 1
                if entry[1] <= 0 and self._ready.get(group_id) is entry:
                    del self._ready[group_id]
        round_ = self._rounds.get(group_id)
        if round_ is None:
            raise P2PError("the averaging round is over")
        return round_

    async def _serve(self, stream: Stream, ctx: CallContext) -> None:
        try:
            message = await asyncio.wait_for(stream.recv(), self.header_timeout)
        except asyncio.TimeoutError:
            raise refuse(f"no gather header within {self.header_timeout:.3g} s") from None
        header = protocol.parse_gather_header(message)
        round_ = self._rounds.get(header.group_id)
        if round_ is None:
            if header.group_id in self._finished:
                raise P2PError("the averaging round is over")
            round_ = await self._wait_for_round(header.group_id, ctx)
        members, member = round_.config.group.members, header.member
        if member >= len(members) or members[member] != ctx.peer_id:
            raise refuse("not a member of this group at that index", member)
        if stream.done:  # it was given up while it waited (e.g. the caller's round timed out)
            return
        if round_.config.is_banned(member):
            raise refuse("banned from this round", member)
        future = round_.incoming.get(member)
        if future is None:
            raise refuse("this member does not dial this peer in this group", member)
        if future.done():
            raise refuse("a second gather stream for the same round")
        future.set_result(stream)
        await round_.pairs[member].released.wait()

    async def run(self, config: RoundConfig, flat: torch.Tensor, result: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, AllReduceResult]:
        """Average ``flat`` with the group; returns (result vector, what happened) or raises
        AveragingError (the codec's error feedback restored)."""
        group_id = config.group.group_id
        result = torch.empty_like(flat) if result is None else result
        feedback: ErrorFeedback | None = getattr(config.codec, "feedback", None)
        saved = feedback.snapshot() if feedback is not None else None
        round_ = _Round(self, config, flat)
        self._rounds[group_id] = round_
        try:
            return await round_.run(result)
        except BaseException as e:
            if isinstance(e, AveragingError):
                logger.warning("%s lost here: %s", config.label, e)
            if feedback is not None and saved is not None:
                feedback.restore(saved)
            raise
        finally:
            await round_.close()
            self._rounds.pop(group_id, None)
            self._remember_finished(group_id)
