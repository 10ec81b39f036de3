"""After a round: members serve what they committed to, so that part owners' results can be checked.

A part owner's result can only be recomputed from every contributor's committed input, and only the
owner holds them all. So each member keeps its last rounds' transcripts
(:class:`averaging.transcript.RoundTranscript`, commitments on) in an :class:`InputsService`, which
answers the round's members (nobody else) on ``verify.inputs.{prefix}``:

=====================================  ===========================================================
request (unary, at most 4 KiB)          reply
=====================================  ===========================================================
``{"g": round id, "p": phase, "j":      ``{"c": the callee's full input commitment for part j, "t":
part (owner index)}``                   its values for that part ({"dtype", "shape", "data"})}``
``{"g", "p", "j", "m": member}``        the same for member ``m``'s input to the callee's own part
                                        (``j`` must be the callee: it received and verified it)
``{"g", "results": true}``              ``{"r": [the owners' result commitments it verified]}``
=====================================  ===========================================================

:func:`audit_aggregate` recomputes an owner's result from the contributors' inputs (asked from each
contributor, then from the owner for the ones that did not answer) and returns a provable
``wrong_aggregate`` :class:`~verification.evidence.Accusation` if it is off; :func:`find_equivocations`
compares the owners' signed results two members received. Both cost about one part per contributor
on the wire: run them for the checks :func:`verification.randomness.choose_checks` picks.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
from typing import Any, Sequence

from averaging.transcript import PhaseTranscript, RoundTranscript
from dht import P2P, P2PError, PeerID
from dht.peer.errors import BadRequestError
from dht.peer.identity import Identity
from dht.peer.p2p import CallContext
from dht.peer.untrusted import brief

from .commitments import ROLE_INPUT, Commitment, find_equivocation, tensor_digest
from .evidence import Accusation, Verdict, decode_tensor, encode_tensor, verify_accusation

__all__ = ["INPUTS_METHOD", "InputsService", "audit_aggregate", "find_equivocations", "results_view"]

logger = logging.getLogger(__name__)

INPUTS_METHOD = "verify.inputs"
MAX_INPUTS_REQUEST_BYTES = 4 << 10
DEFAULT_KEEP = 4  # transcripts kept (rounds that can still be audited)


def _refuse(what: str, value: Any = None) -> BadRequestError:
    return BadRequestError(what if value is None else f"{what} (got {brief(value)})")


class InputsService:
    """Serves this member's committed inputs of its last ``keep`` rounds (see the module docstring);
    a part over ``max_reply_bytes`` (12 MiB: a reply must fit one 16 MiB message) is not served.
    Memory: a transcript holds about three copies of the averaged vector (float32)."""

    def __init__(self, p2p: P2P, prefix: str, keep: int = DEFAULT_KEEP, max_reply_bytes: int = 12 << 20):
        self.p2p, self.prefix, self.keep = p2p, prefix, keep
        self.method = f"{INPUTS_METHOD}.{prefix}"
        self._transcripts: collections.OrderedDict[bytes, RoundTranscript] = collections.OrderedDict()
        p2p.add_unary_handler(self.method, self._serve, max_message_size=MAX_INPUTS_REQUEST_BYTES)
        self.max_reply_bytes = max_reply_bytes

    def close(self) -> None:
        self.p2p.remove_handler(self.method)

    def add(self, transcript: RoundTranscript) -> None:
        """Keep ``transcript`` (the oldest beyond ``keep`` is dropped)."""
        self._transcripts[transcript.group_id] = transcript
        while len(self._transcripts) > self.keep:
            self._transcripts.popitem(last=False)

    def get(self, round_id: bytes) -> RoundTranscript | None:
        return self._transcripts.get(round_id)

    async def _serve(self, request: Any, ctx: CallContext) -> Any:
        if not isinstance(request, dict):
            raise _refuse("a request must be a map", request)
        round_id = request.get("g")
        transcript = self._transcripts.get(round_id) if isinstance(round_id, bytes) else None
        if transcript is None:
            raise P2PError("unknown round (or no longer kept)")
        if ctx.peer_id not in transcript.members:
            raise P2PError("not a member of that round")
        if request.get("results") is True:
            return {"r": [c.to_wire() for p in transcript.phases for c in p.results.values()]}
        phase_no, part, member = request.get("p"), request.get("j"), request.get("m")
        phases = [p for p in transcript.phases if p.number == phase_no]
        if not phases or not isinstance(part, int) or isinstance(part, bool):
            raise _refuse("'p' and 'j' must be a phase of the round and a part", (phase_no, part))
        phase = phases[0]
        if member is None:
            commitment = phase.sent.get(part)
            if commitment is None or transcript.contribution is None:
                raise P2PError("no committed input for that part here")
            values = await asyncio.get_running_loop().run_in_executor(None, phase.part_values,
                                                                      transcript.contribution, part)
        else:
            if part != transcript.me or not isinstance(member, int) or member not in phase.received:
                raise P2PError("no verified input of that member here")
            commitment, values = phase.inputs[member], phase.received[member]
        if values.numel() * 4 > self.max_reply_bytes:
            raise P2PError("the part is too large to serve")
        encoded = await asyncio.get_running_loop().run_in_executor(None, _checked_encoding, commitment, values)
        if encoded is None:
            raise P2PError("the values kept here do not match the commitment")
        return {"c": commitment.to_wire(), "t": encoded}


def results_view(transcript: RoundTranscript) -> bytes:
    """A digest of the owners' signed results this member received (phase, owner, digest, sorted):
    members with equal views received the same results; to pass to the seed exchange as ``view``."""
    hasher = hashlib.sha256(b"swarm.results-view/1")
    for phase in transcript.phases:
        for owner in sorted(phase.results):
            hasher.update(bytes([phase.number]) + owner.to_bytes(4, "little") + phase.results[owner].digest)
    return hasher.digest()


def _checked_encoding(commitment: Commitment, values: Any) -> dict | None:
    return encode_tensor(values) if tensor_digest(values) == commitment.digest else None


async def _fetch_input(p2p: P2P, method: str, transcript: RoundTranscript, phase: PhaseTranscript, part: int,
                       member: int, timeout: float) -> tuple[Commitment, Any] | None:
    """``member``'s committed input to ``part``: asked from the member, then from the part's owner."""
    group = transcript.members
    for peer, request in ((group[member], {"g": transcript.group_id, "p": phase.number, "j": part}),
                          (group[part], {"g": transcript.group_id, "p": phase.number, "j": part, "m": member})):
        if peer == p2p.peer_id:
            continue
        try:
            reply = await p2p.call(peer, method, request, timeout=timeout)
            commitment = Commitment.from_wire(reply.get("c") if isinstance(reply, dict) else None)
            values = decode_tensor(reply.get("t"))
        except (P2PError, asyncio.TimeoutError, BadRequestError, ValueError) as e:
            logger.debug("auditing part %d: no input of member %d from %s: %s", part, member, peer, e)
            continue
        if (commitment.sender == group[member] and commitment.role == ROLE_INPUT and commitment.part == part
                and commitment.phase == phase.number and commitment.round_id == transcript.group_id
                and commitment.verify()):
            return commitment, values
    return None


async def audit_aggregate(p2p: P2P, prefix: str, identity: Identity, transcript: RoundTranscript, owner: int,
                          phase: int = 0, timeout: float = 10.0, tolerance: float | None = None,
                          time: float = 0.0, run_id: str | None = None) -> Accusation | None:
    """Recompute ``owner``'s result of ``phase`` (which this member received and verified against the
    owner's signed digest) from its contributors' committed inputs; a signed ``wrong_aggregate``
    accusation (by ``identity``, for ``run_id``: default ``prefix``, the averager's) if it is off, None
    if it is right or cannot be checked (an input nobody served, no verified result). The
    recomputation runs off the event loop."""
    phases = [p for p in transcript.phases if p.number == phase]
    if not phases or owner not in phases[0].results or transcript.result is None:
        return None
    record = phases[0]
    result = record.results[owner]
    method = f"{INPUTS_METHOD}.{prefix}"
    me = transcript.me
    fetched: dict[int, tuple[Commitment, Any]] = {}
    if me in result.members and owner in record.sent and transcript.contribution is not None:
        fetched[me] = (record.sent[owner], record.part_values(transcript.contribution, owner))
    pending = [m for m in result.members if m not in fetched]
    answers = await asyncio.gather(*(_fetch_input(p2p, method, transcript, record, owner, m, timeout)
                                     for m in pending))
    for member, answer in zip(pending, answers):
        if answer is None:
            logger.info("%s: cannot audit part %d: no committed input of member %d", brief(prefix, 64), owner, member)
            return None
        fetched[member] = answer
    order = sorted(fetched)
    commitments = [result] + [fetched[m][0] for m in order]
    tensors = {0: record.part_values(transcript.result, owner)}
    tensors.update({i + 1: fetched[m][1] for i, m in enumerate(order)})
    detail: dict[str, Any] = {"members": [m.raw for m in transcript.members], "aggregator": transcript.aggregator}
    if tolerance is not None:
        detail["tolerance"] = tolerance
    accusation = Accusation.make(identity, "wrong_aggregate", run_id or prefix, transcript.members[owner],
                                 transcript.group_id, commitments, tensors, detail, time)
    verdict: Verdict = await asyncio.get_running_loop().run_in_executor(None, verify_accusation, accusation)
    if verdict.holds:
        return accusation
    logger.debug("%s: part %d checked: %s", brief(prefix, 64), owner, verdict.reason)
    return None


async def find_equivocations(p2p: P2P, prefix: str, identity: Identity, transcript: RoundTranscript,
                             peers: Sequence[PeerID], timeout: float = 10.0, time: float = 0.0,
                             run_id: str | None = None) -> list[Accusation]:
    """Ask ``peers`` (members of the round) for the owners' signed results they received and compare
    them with this member's: a signed ``equivocation`` accusation per owner caught signing two
    different results for one part."""
    mine = transcript.commitments()
    method = f"{INPUTS_METHOD}.{prefix}"

    async def ask(peer: PeerID) -> list[Commitment]:
        try:
            reply = await p2p.call(peer, method, {"g": transcript.group_id, "results": True}, timeout=timeout)
            wires = reply.get("r") if isinstance(reply, dict) else None
            return [Commitment.from_wire(w) for w in (wires or [])[:4 * len(transcript.members)]]
        except (P2PError, asyncio.TimeoutError, BadRequestError) as e:
            logger.debug("no results from %s: %s", peer, e)
            return []

    theirs = await asyncio.gather(*(ask(p) for p in peers if p != p2p.peer_id))
    accusations: dict[PeerID, Accusation] = {}
    for commitments in theirs:
        for commitment in commitments:
            if commitment.sender in accusations or commitment.round_id != transcript.group_id:
                continue
            pair = find_equivocation([c for c in mine if c.slot == commitment.slot] + [commitment])
            if pair is not None:
                accusations[commitment.sender] = Accusation.make(
                    identity, "equivocation", run_id or prefix, commitment.sender, transcript.group_id, pair,
                    time=time)
    return list(accusations.values())
