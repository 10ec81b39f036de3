"""Shared randomness no single member controls: commit-reveal of per-member seeds within a group
(algorithms.md §2.3 step 6), and the checks it picks.

After an averaging round, every member ``i`` draws a 256-bit secret ``s_i``, sends every other member
its signed commitment ``H(s_i | i | t)`` (``t``: the round id), and only once it holds everyone's
commitment (or ``commit_timeout`` passed) sends its signed opening ``s_i``. The output is
``r_t = H(s_1 xor ... xor s_n | t)`` over the members whose commitment and matching opening are
known (:func:`combine`). A member that commits and then withholds its opening is left out of
``r_t`` and named in :attr:`SharedRandomness.missing` (it can bias the outcome only by aborting,
which the caller sees); an opening that does not match its commitment is provable (both are
signed): :attr:`SharedRandomness.bad` holds the pairs, for an ``Accusation("bad_opening")``.
Openings and commitments are signed, so members relay them: a member that did not hear from
another asks the others for what they hold (``fetch``), and members that can reach one peer that
heard everyone end with the same ``r_t``. The ``open`` messages also carry each member's *view*
(32 bytes, e.g. :func:`verification.audit.results_view` of its transcript: a digest of the owners'
signed results it received); :attr:`SharedRandomness.disagree` lists the members whose view differs
from this one's, the ones to compare signed results with (:func:`verification.audit.find_equivocations`).

:func:`choose_checks` turns ``r_t`` into (validator, target) pairs, the same at every member.

The protocol, ``verify.seed.{prefix}`` (unary, requests at most MAX_SEED_REQUEST_BYTES=16 KiB):

=========================  ==============================================================================
request (caller -> callee)  reply
=========================  ==============================================================================
``{"g": round id (bytes,    ``{"m": the callee's seed commitment}`` (waits up to ``join_wait`` for the
1 to 64), "i": caller's     callee to start this round).
index, "st": "commit",
"m": its commitment}``
``{"g", "i", "st":          ``{"m": the callee's opening, "have": [indices whose opening it holds],
"open", "m": its            "v": its view}``, once the callee closed its own commit stage (it never opens
opening, "v": its view      earlier). A view is at most 32 bytes (b"": none).
(bytes)}``
``{"g", "i", "st":          ``{"c": [commitments], "o": [openings]}``: those of the wanted members it holds
"fetch", "want":            (only after it opened).
[indices]}``
=========================  ==============================================================================

A seed commitment is ``{"x": run prefix, "g": round id, "i": index, "h": 32 bytes, "k": key, "s":
signature}``, an opening the same with ``"seed": 32 bytes`` instead of ``"h"``; both are checked
(bounds, signature, that ``k`` is the key of member ``i``) before they count.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hashlib
import logging
import os
import struct
from dataclasses import dataclass, field
from typing import Any, Sequence

import msgpack

from dht import P2P, P2PError, PeerID
from dht.peer.errors import BadRequestError
from dht.peer.identity import Identity, verify_signature
from dht.peer.p2p import CallContext
from dht.peer.slots import Slots
from dht.peer.untrusted import brief

__all__ = ["SEED_METHOD", "SeedCommitment", "SeedOpening", "SharedRandomness", "RandomnessExchange", "combine",
           "choose_checks", "seed_hash", "bad_opening_accusations"]

logger = logging.getLogger(__name__)

SEED_METHOD = "verify.seed"
SEED_BYTES = 32
MAX_SEED_REQUEST_BYTES = 16 << 10
MAX_ROUND_ID_BYTES = 64
MAX_RUN_CHARS = 512
MAX_MEMBERS = 4096
MAX_KEPT_ROUNDS = 64  # finished rounds whose messages are kept for relaying
_COMMIT_DOMAIN = b"swarm.seed.commit/1"
_OPEN_DOMAIN = b"swarm.seed.open/1"
_OUTPUT_DOMAIN = b"swarm.seed.output/1"
_CHECK_DOMAIN = b"swarm.seed.check/1"


def _refuse(what: str, value: Any = None) -> BadRequestError:
    return BadRequestError(what if value is None else f"{what} (got {brief(value)})")


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < MAX_MEMBERS


def seed_hash(seed: bytes, index: int, round_id: bytes, run_id: str) -> bytes:
    """``H(s_i | i | t)`` (with the run bound too), what a member commits to."""
    h = hashlib.sha256(_COMMIT_DOMAIN)
    for part in (seed, struct.pack("<I", index), round_id, run_id.encode()):
        h.update(struct.pack("<I", len(part)))
        h.update(part)
    return h.digest()


@dataclass(frozen=True)
class _Signed:
    run_id: str
    round_id: bytes
    index: int
    value: bytes  # the commitment hash, or the seed
    public_key: bytes
    signature: bytes

    _domain = b""
    _field = ""

    @property
    def sender(self) -> PeerID:
        return PeerID.from_public_key(self.public_key)

    def payload(self) -> bytes:
        return msgpack.packb([self._domain, self.run_id, self.round_id, self.index, self.value], use_bin_type=True)

    @classmethod
    def make(cls, identity: Identity, run_id: str, round_id: bytes, index: int, value: bytes) -> Any:
        unsigned = cls(run_id, round_id, index, value, identity.public_key, b"")
        return dataclasses.replace(unsigned, signature=identity.sign(unsigned.payload()))

    def verify(self) -> bool:
        return verify_signature(self.public_key, self.signature, self.payload())

    def to_wire(self) -> dict:
        return {"x": self.run_id, "g": self.round_id, "i": self.index, self._field: self.value, "k": self.public_key,
                "s": self.signature}

    @classmethod
    def from_wire(cls, message: Any) -> Any:
        """Checked for types and bounds (not the signature: :meth:`verify`); BadRequestError otherwise."""
        if not isinstance(message, dict):
            raise _refuse("a seed message must be a map", message)
        fields: list[Any] = [message.get(k) for k in ("x", "g", "i", cls._field, "k", "s")]
        run_id, round_id, index, value, key, signature = fields
        if not isinstance(run_id, str) or len(run_id) > MAX_RUN_CHARS:
            raise _refuse("'x' must be the run prefix", run_id)
        if not isinstance(round_id, bytes) or not 0 < len(round_id) <= MAX_ROUND_ID_BYTES:
            raise _refuse("'g' must be a round id", round_id)
        if not _is_index(index):
            raise _refuse("'i' must be a member index", index)
        if not isinstance(value, bytes) or len(value) != SEED_BYTES:
            raise _refuse(f"{cls._field!r} must be {SEED_BYTES} bytes", value)
        if not (isinstance(key, bytes) and len(key) == 32 and isinstance(signature, bytes) and len(signature) == 64):
            raise _refuse("'k' and 's' must be a 32-byte key and a 64-byte signature")
        return cls(run_id, round_id, index, value, key, signature)


@dataclass(frozen=True)
class SeedCommitment(_Signed):
    """Member ``index``'s signed ``H(seed | index | round | run)`` (``value``)."""

    _domain = _COMMIT_DOMAIN
    _field = "h"

    def opened_by(self, opening: "SeedOpening") -> bool:
        """Whether ``opening`` (same run, round, member) reveals the seed committed to."""
        return ((opening.run_id, opening.round_id, opening.index, opening.public_key) ==
                (self.run_id, self.round_id, self.index, self.public_key)
                and seed_hash(opening.value, self.index, self.round_id, self.run_id) == self.value)


@dataclass(frozen=True)
class SeedOpening(_Signed):
    """Member ``index``'s signed seed (``value``)."""

    _domain = _OPEN_DOMAIN
    _field = "seed"


def combine(seeds: Sequence[bytes], round_id: bytes) -> bytes:
    """``r_t = H(s_1 xor ... xor s_n | t)`` (32 bytes)."""
    mixed = bytearray(SEED_BYTES)
    for seed in seeds:
        for k, byte in enumerate(seed):
            mixed[k] ^= byte
    return hashlib.sha256(_OUTPUT_DOMAIN + bytes(mixed) + round_id).digest()


def _uniform(r: bytes, *labels: Any) -> float:
    """A number in [0, 1) derived from ``r`` and ``labels`` (the same everywhere)."""
    digest = hashlib.sha256(_CHECK_DOMAIN + r + msgpack.packb(list(labels), use_bin_type=True)).digest()
    return int.from_bytes(digest[:8], "little") / 2 ** 64


def choose_checks(r: bytes, members: Sequence[PeerID], probability: float) -> list[tuple[PeerID, PeerID]]:
    """(validator, target) pairs for one round, the same at every member that knows ``r``: each member
    validates with ``probability`` (in [0, 1]) a target drawn uniformly among the others (so its
    expected extra work is ``probability`` gradient computations per round). Sorted by validator."""
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"probability must be in [0, 1], got {probability!r}")
    ordered = sorted(set(members))
    checks = []
    for validator in ordered:
        others = [m for m in ordered if m != validator]
        if others and _uniform(r, "validate", validator.raw) < probability:
            checks.append((validator, others[int(_uniform(r, "target", validator.raw) * len(others))]))
    return checks


@dataclass
class SharedRandomness:
    """The outcome of one exchange at one member."""

    round_id: bytes
    value: bytes  # r_t
    included: list[int]  # members whose opening went into r_t
    missing: list[int]  # members that committed (somewhere) but whose opening never came
    silent: list[int]  # members whose commitment never came
    bad: list[tuple[SeedCommitment, SeedOpening]] = field(default_factory=list)  # provable bad openings
    disagree: list[int] = field(default_factory=list)  # members that sent a view other than this member's


def bad_opening_accusations(identity: Identity, shared: SharedRandomness, run_id: str, time: float = 0.0) -> list:
    """A signed ``bad_opening`` :class:`~verification.evidence.Accusation` (by ``identity``, for
    ``run_id``) for every provably bad opening of ``shared``."""
    from .evidence import Accusation

    return [Accusation.make(identity, "bad_opening", run_id, commitment.sender, shared.round_id,
                            detail={"commit": commitment.to_wire(), "open": opening.to_wire()}, time=time)
            for commitment, opening in shared.bad]


@dataclass
class _Round:
    run_id: str
    round_id: bytes
    members: list[PeerID]
    me: int
    commitment: SeedCommitment
    opening: SeedOpening
    commitments: dict[int, SeedCommitment] = field(default_factory=dict)
    openings: dict[int, SeedOpening] = field(default_factory=dict)
    bad: dict[int, tuple[SeedCommitment, SeedOpening]] = field(default_factory=dict)
    view: bytes = b""
    views: dict[int, bytes] = field(default_factory=dict)
    closed: asyncio.Event = field(default_factory=asyncio.Event)  # my commit stage is over: I may open
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def add_commitment(self, commitment: SeedCommitment) -> None:
        if self.closed.is_set() or commitment.index in self.commitments:
            return  # too late: it cannot count any more (it could have seen openings)
        self.commitments[commitment.index] = commitment
        self.changed.set()

    def add_opening(self, opening: SeedOpening) -> None:
        commitment = self.commitments.get(opening.index)
        if commitment is None or opening.index in self.openings:
            return
        if commitment.opened_by(opening):
            self.openings[opening.index] = opening
        else:
            self.bad.setdefault(opening.index, (commitment, opening))
        self.changed.set()


class RandomnessExchange:
    """Serves ``verify.seed.{prefix}`` on ``p2p`` and runs exchanges for rounds of this prefix.

    ``join_wait`` (5 s): how long a request for a round not started here waits for it;
    ``max_waiting_per_peer`` (4) and ``max_waiting`` (64) bound such waiting requests."""

    def __init__(self, p2p: P2P, prefix: str, identity: Identity | None = None, *, join_wait: float = 5.0,
                 max_waiting_per_peer: int = 4, max_waiting: int = 64):
        self.p2p, self.prefix = p2p, prefix
        self.identity = identity or p2p.identity
        self.join_wait = join_wait
        self.method = f"{SEED_METHOD}.{prefix}"
        self._rounds: collections.OrderedDict[bytes, _Round] = collections.OrderedDict()
        self._started: dict[bytes, asyncio.Event] = {}
        self._waiting = Slots(max_waiting_per_peer, max_waiting, "verify.seed requests waiting for a round")
        p2p.add_unary_handler(self.method, self._serve, max_message_size=MAX_SEED_REQUEST_BYTES)

    def close(self) -> None:
        self.p2p.remove_handler(self.method)

    async def run(self, round_id: bytes, members: Sequence[PeerID], commit_timeout: float = 5.0,
                  open_timeout: float = 5.0, clients: Sequence[bool] | None = None, view: bytes = b""
                  ) -> SharedRandomness:
        """One exchange among ``members`` (this peer included) for ``round_id``; returns what this member
        ends with. ``clients``: which members accept no connections (they call the others); ``view``:
        this member's view (at most 32 bytes, see the module docstring). Takes at most about
        ``commit_timeout + 2 * open_timeout`` seconds."""
        if not isinstance(view, bytes) or len(view) > SEED_BYTES:
            raise ValueError(f"view must be at most {SEED_BYTES} bytes")
        members = list(members)
        client = list(clients) if clients is not None else [False] * len(members)
        me = members.index(self.p2p.peer_id)
        seed = os.urandom(SEED_BYTES)
        state = _Round(self.prefix, round_id, members, me,
                       SeedCommitment.make(self.identity, self.prefix, round_id, me, seed_hash(seed, me, round_id,
                                                                                              self.prefix)),
                       SeedOpening.make(self.identity, self.prefix, round_id, me, seed), view=view)
        state.commitments[me], state.openings[me] = state.commitment, state.opening
        self._rounds[round_id] = state
        while len(self._rounds) > MAX_KEPT_ROUNDS:
            old_id, _ = self._rounds.popitem(last=False)
            self._started.pop(old_id, None)
        self._started.setdefault(round_id, asyncio.Event()).set()
        # one call per pair, both sides learn the other's message: the lower index calls, or the client
        callees = [i for i in range(len(members))
                   if i != me and not client[i] and (client[me] or me < i or client[i])]
        await self._stage(state, callees, "commit", state.commitment.to_wire(), commit_timeout,
                          lambda: len(state.commitments) == len(members))
        state.closed.set()
        state.changed.set()
        committed = sorted(state.commitments)
        await self._stage(state, [i for i in callees if i in state.commitments], "open",
                          state.opening.to_wire(), open_timeout,
                          lambda: all(i in state.openings or i in state.bad for i in committed))
        lacking = [i for i in state.commitments if i not in state.openings and i not in state.bad]
        if lacking:
            await self._fetch(state, lacking, open_timeout)
        included = sorted(state.openings)
        return SharedRandomness(round_id, combine([state.openings[i].value for i in included], round_id), included,
                                sorted(i for i in state.commitments if i not in state.openings and i not in state.bad),
                                sorted(set(range(len(members))) - set(state.commitments)),
                                [state.bad[i] for i in sorted(state.bad)],
                                sorted(i for i, v in state.views.items() if v != view))

    async def _stage(self, state: _Round, callees: list[int], stage: str, message: dict, timeout: float,
                     complete: Any) -> None:
        """Call ``callees`` with ``message`` (their replies count), and wait (at most ``timeout``) until
        ``complete()`` (the others call us)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        request = {"g": state.round_id, "i": state.me, "st": stage, "m": message}
        if stage == "open":
            request["v"] = state.view

        async def call(index: int) -> None:
            try:
                reply = await self.p2p.call(state.members[index], self.method, request,
                                            timeout=max(deadline - loop.time(), 0.01))
                self._take(state, index, stage, reply.get("m") if isinstance(reply, dict) else None)
                if stage == "open":
                    self._take_view(state, index, reply.get("v"))
            except (P2PError, asyncio.TimeoutError, BadRequestError) as e:
                logger.debug("seed exchange %s with %s: %s", stage, state.members[index], e)

        calls = asyncio.ensure_future(asyncio.gather(*(call(i) for i in callees)))
        try:
            while not complete() and loop.time() < deadline:
                state.changed.clear()
                try:
                    await asyncio.wait_for(state.changed.wait(), deadline - loop.time())
                except asyncio.TimeoutError:
                    break
            await asyncio.wait_for(asyncio.shield(calls), max(deadline - loop.time(), 0.0) + 0.01)
        except asyncio.TimeoutError:
            pass
        finally:
            calls.cancel()
            await asyncio.gather(calls, return_exceptions=True)

    async def _fetch(self, state: _Round, lacking: list[int], timeout: float) -> None:
        """Ask every other member for the openings of ``lacking`` (relayed: they are signed)."""
        request = {"g": state.round_id, "i": state.me, "st": "fetch", "want": lacking}

        async def call(index: int) -> None:
            try:
                reply = await self.p2p.call(state.members[index], self.method, request, timeout=timeout)
                if not isinstance(reply, dict):
                    return
                for wire in (reply.get("o") or [])[:len(state.members)]:
                    opening = SeedOpening.from_wire(wire)
                    if self._valid(state, opening):
                        state.add_opening(opening)
            except (P2PError, asyncio.TimeoutError, BadRequestError) as e:
                logger.debug("seed fetch from %s: %s", state.members[index], e)

        await asyncio.gather(*(call(i) for i in range(len(state.members)) if i != state.me and i not in lacking))

    def _valid(self, state: _Round, message: _Signed) -> bool:
        return ((message.run_id, message.round_id) == (state.run_id, state.round_id)
                and message.index < len(state.members) and state.members[message.index].matches(message.public_key)
                and message.verify())

    @staticmethod
    def _take_view(state: _Round, index: int, view: Any) -> None:
        if not isinstance(view, bytes) or len(view) > SEED_BYTES:
            raise _refuse(f"'v' must be a view of at most {SEED_BYTES} bytes", view)
        state.views.setdefault(index, view)

    def _take(self, state: _Round, index: int, stage: str, wire: Any) -> None:
        """A message member ``index`` sent for ``stage`` (BadRequestError if malformed or not its own)."""
        message = (SeedCommitment if stage == "commit" else SeedOpening).from_wire(wire)
        if message.index != index or not self._valid(state, message):
            raise _refuse("not that member's signed seed message")
        if stage == "commit":
            state.add_commitment(message)
        else:
            state.add_opening(message)

    async def _serve(self, request: Any, ctx: CallContext) -> Any:
        if not isinstance(request, dict):
            raise _refuse("a seed request must be a map", request)
        fields: list[Any] = [request.get(k) for k in ("g", "i", "st")]
        round_id, index, stage = fields
        if not isinstance(round_id, bytes) or not 0 < len(round_id) <= MAX_ROUND_ID_BYTES or not _is_index(index):
            raise _refuse("'g' and 'i' must be a round id and a member index")
        if stage not in ("commit", "open", "fetch"):
            raise _refuse("'st' must be commit, open or fetch", stage)
        state = self._rounds.get(round_id)
        if state is None:
            state = await self._wait_for_round(round_id, ctx)
        if index >= len(state.members) or state.members[index] != ctx.peer_id:
            raise _refuse("not a member of this round at that index", index)
        if stage == "commit":
            self._take(state, index, stage, request.get("m"))
            return {"m": state.commitment.to_wire()}
        await asyncio.wait_for(state.closed.wait(), self.join_wait)  # never open before my commit stage closed
        if stage == "open":
            self._take(state, index, stage, request.get("m"))
            self._take_view(state, index, request.get("v", b""))
            return {"m": state.opening.to_wire(), "have": sorted(state.openings), "v": state.view}
        want = request.get("want")
        if not isinstance(want, list) or len(want) > len(state.members) or not all(_is_index(w) for w in want):
            raise _refuse("'want' must be a list of member indices", want)
        return {"c": [state.commitments[w].to_wire() for w in want if w in state.commitments],
                "o": [state.openings[w].to_wire() for w in want if w in state.openings]}

    async def _wait_for_round(self, round_id: bytes, ctx: CallContext) -> _Round:
        with self._waiting.hold(ctx.peer_id):
            event = self._started.setdefault(round_id, asyncio.Event())
            try:
                await asyncio.wait_for(event.wait(), self.join_wait)
            except asyncio.TimeoutError:
                raise P2PError("unknown round") from None
            finally:
                if not event.is_set() and self._started.get(round_id) is event:
                    del self._started[round_id]
        state = self._rounds.get(round_id)
        if state is None:
            raise P2PError("unknown round")
        return state
