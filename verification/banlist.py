"""A run's ban list in the DHT: accusations with their evidence, each re-verified by every reader.

Under ``f"{run_id}.banned"`` (a DHT dictionary) every publisher writes one signed sub-key per accused
peer, ``f"{accused} [owner:{publisher's key}]"`` (nobody can overwrite another's record), whose
value is the accusation's wire form (:class:`~verification.evidence.Accusation`) when it packs to at
most 224 KiB, else a reference ``{"v": 1, "ref": its evidence id (32 hex characters), "kind": str,
"accused": PeerID bytes, "holder": the publisher's PeerID bytes, "addrs": [its addresses] (at most
8)}``: readers fetch the accusation from the holder over ``verify.evidence.{run_id}`` (request
``{"id": evidence id}``, reply: the accusation's wire form, at most 15 MiB) and check that it hashes
to the id. The holder serves the last 64 accusations it published; a reference whose holder does
not answer is not judged (retried at the next refresh) and bans nobody. An accusation's run may
be ``run_id`` or a prefix under it (e.g. an averager's ``f"{run_id}.grads"``).

A reader trusts no record: :meth:`BanList.refresh` re-verifies the evidence of each one it has not
judged yet (:func:`~verification.evidence.verify_accusation`, off the event loop) and bans the
accused if it holds, the accuser if it does not (a false accusation is the accuser's lie); records
it cannot judge (e.g. ``wrong_gradient`` without a recompute function, or not signed by their
accuser) ban nobody. :meth:`publish` checks an accusation the same way before storing it, so an
honest peer never publishes one that would ban itself.

>>> bans = BanList(node, "my-run", identity)
>>> await bans.publish(accusation, check=recompute)    # verified, stored, honoured here at once
>>> await bans.refresh(check=recompute)                # read and re-verify what others published
>>> bans.is_banned(peer_id), bans.entries()            # [{"peer_id": "Qm...", "reason": "..."}]

With ``filter_stores`` (default) the node refuses stores under ``run_id`` from banned peers
(:meth:`dht.DHTNode.set_store_filter`). Pass ``bans.is_banned`` as ``banned=`` to the averager so
that matchmaking and the all-reduce never take a banned peer again.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import Any

import msgpack

from dht import DHTNode, P2PError, PeerID
from dht.peer.errors import BadRequestError
from dht.peer.identity import Identity
from dht.peer.p2p import CallContext
from dht.peer.untrusted import brief

from .evidence import (
    MAX_ACCUSATION_BYTES,
    MAX_INLINE_BYTES,
    Accusation,
    CannotVerify,
    Recompute,
    Verdict,
    in_run,
    verify_accusation,
)

__all__ = ["BanList", "banned_key"]

logger = logging.getLogger(__name__)

DEFAULT_TTL = 7 * 86400.0  # seconds a published accusation is kept in the DHT
MAX_JUDGED = 4096  # accusations whose verdict is remembered (not verified twice)
MAX_BANNED = 65536
MAX_HELD = 64  # accusations published by reference and served to readers
MAX_FETCHES = 16  # references fetched per refresh (the others wait for the next one)
EVIDENCE_METHOD = "verify.evidence"


def banned_key(run_id: str) -> str:
    """The DHT key of ``run_id``'s ban list."""
    return f"{run_id}.banned"


class BanList:
    """The ban list of ``run_id`` as this peer verified it (see the module docstring). ``identity``
    (default: the node's) signs nothing itself (the DHT record's owner signature is the node's); it
    names this peer, which never bans itself."""

    def __init__(self, node: DHTNode, run_id: str, identity: Identity | None = None, *, ttl: float = DEFAULT_TTL,
                 filter_stores: bool = True):
        self.node, self.run_id, self.ttl = node, run_id, ttl
        self.identity = identity or node.p2p.identity
        self.key = banned_key(run_id)
        self._banned: dict[PeerID, str] = {}
        self._judged: collections.OrderedDict[str, tuple[PeerID, str]] = collections.OrderedDict()
        self._held: collections.OrderedDict[str, dict] = collections.OrderedDict()  # evidence id -> wire form
        self.evidence_method = f"{EVIDENCE_METHOD}.{run_id}"
        self.fetch_timeout = 10.0
        node.p2p.add_unary_handler(self.evidence_method, self._serve_evidence, max_message_size=1024)
        self.filter_stores = filter_stores
        if filter_stores:
            node.set_store_filter(run_id, self.is_banned)

    def close(self) -> None:
        """Stop serving evidence and filtering the node's stores under ``run_id`` (idempotent)."""
        self.node.p2p.remove_handler(self.evidence_method)
        if self.filter_stores:
            self.node.set_store_filter(self.run_id, None)

    # ---- reading ------------------------------------------------------------------------------
    def is_banned(self, peer_id: PeerID) -> bool:
        """Whether ``peer_id`` is banned here (cheap: a dict lookup)."""
        return peer_id in self._banned

    def entries(self) -> list[dict[str, str]]:
        """``[{"peer_id": base58, "reason": str}]``, sorted by peer id."""
        return [{"peer_id": str(p), "reason": r} for p, r in sorted(self._banned.items(), key=lambda kv: str(kv[0]))]

    def ban(self, peer_id: PeerID, reason: str) -> bool:
        """Ban ``peer_id`` here (not published; this peer itself is never banned). True if new."""
        if peer_id == self.identity.peer_id or peer_id in self._banned or len(self._banned) >= MAX_BANNED:
            return False
        self._banned[peer_id] = reason
        logger.warning("run %s: banned %s: %s", brief(self.run_id, 64), peer_id, reason)
        return True

    async def judge(self, accusation: Accusation, check: Recompute | None = None) -> tuple[PeerID, str] | None:
        """(guilty peer, reason) for ``accusation``, or None if it cannot be judged here; verified off
        the event loop, a verdict once (then remembered)."""
        evidence_id = accusation.evidence_id
        if evidence_id in self._judged:
            return self._judged[evidence_id]
        try:
            verdict: Verdict = await asyncio.get_running_loop().run_in_executor(
                None, verify_accusation, accusation, check)
        except CannotVerify as e:
            logger.info("run %s: cannot judge an accusation against %s: %s", brief(self.run_id, 64),
                        accusation.accused, e)
            outcome = None
        else:
            if verdict.holds:
                outcome = (accusation.accused, f"{accusation.kind}: {verdict.reason}")
            else:
                outcome = (accusation.accuser, f"false accusation ({accusation.kind}) against {accusation.accused}: "
                                               f"{verdict.reason}")
        if outcome is not None:  # (one that cannot be judged now may be later, e.g. with a recompute function)
            self._judged[evidence_id] = outcome
            while len(self._judged) > MAX_JUDGED:
                self._judged.popitem(last=False)
        return outcome

    async def refresh(self, check: Recompute | None = None) -> list[PeerID]:
        """Read the ban list from the DHT, verify every record not judged yet and honour the verdicts;
        returns the peers newly banned. Malformed records are skipped (logged once per peer)."""
        found = await self.node.get(self.key, latest=True)
        if found is None or not isinstance(found.value, dict):
            return []
        newly, fetches = [], 0
        for subkey, entry in found.value.items():
            try:
                value = entry.value
                if isinstance(value, dict) and "ref" in value:
                    if _reference_id(value) in self._judged or fetches >= MAX_FETCHES:
                        continue
                    fetches += 1
                    value = await self._fetch(value)
                    if value is None:
                        continue
                accusation = Accusation.from_wire(value)
            except (BadRequestError, ValueError, TypeError) as e:
                logger.debug("run %s: a malformed ban record %s: %s", brief(self.run_id, 64), brief(subkey, 80), e)
                continue
            if not in_run(accusation.run_id, self.run_id):
                continue
            outcome = await self.judge(accusation, check)
            if outcome is not None and self.ban(*outcome):
                newly.append(outcome[0])
        return newly

    # ---- writing ------------------------------------------------------------------------------
    async def publish(self, accusation: Accusation, check: Recompute | None = None) -> Verdict:
        """Verify ``accusation``, ban the accused here and store it in the DHT; ValueError (nothing
        stored or banned) if it does not hold or cannot be judged here: publishing it would only ban
        its accuser."""
        if not in_run(accusation.run_id, self.run_id):
            raise ValueError(f"the accusation is for run {brief(accusation.run_id, 64)}, not {brief(self.run_id, 64)}")
        outcome = await self.judge(accusation, check)
        if outcome is None or outcome[0] != accusation.accused:
            raise ValueError("the accusation does not hold: " + (outcome[1] if outcome else "it cannot be judged here"))
        self.ban(*outcome)
        subkey = f"{accusation.accused} {self.node.signature_validator.ownership_marker}"
        wire = accusation.to_wire()
        size = len(msgpack.packb(wire, use_bin_type=True))
        if size > MAX_ACCUSATION_BYTES:
            raise ValueError(f"the accusation packs to {size} bytes, more than {MAX_ACCUSATION_BYTES}")
        value: dict[str, Any] = wire
        if size > MAX_INLINE_BYTES:  # by reference: readers fetch it from this peer
            self._held[accusation.evidence_id] = wire
            while len(self._held) > MAX_HELD:
                self._held.popitem(last=False)
            value = {"v": 1, "ref": accusation.evidence_id, "kind": accusation.kind, "accused": accusation.accused.raw,
                     "holder": self.node.p2p.peer_id.raw,
                     "addrs": [str(a) for a in self.node.p2p.get_visible_addresses()][:8]}
        stored = await self.node.store(self.key, value, self.node.clock() + self.ttl, subkey=subkey)
        if not stored:
            logger.warning("run %s: the accusation against %s was not stored in the DHT", brief(self.run_id, 64),
                           accusation.accused)
        return Verdict("accused", outcome[1])

    async def _fetch(self, reference: dict) -> Any:
        """The accusation a reference names, from its holder (None if it cannot be had now)."""
        evidence_id, holder, addrs = _reference_id(reference), reference.get("holder"), reference.get("addrs")
        try:
            peer = PeerID(holder)  # type: ignore[arg-type]
        except (ValueError, TypeError):
            return None
        if evidence_id is None or peer == self.node.p2p.peer_id:
            return self._held.get(evidence_id) if evidence_id is not None else None
        if isinstance(addrs, list):
            try:
                self.node.p2p.add_addresses(peer, [a for a in addrs if isinstance(a, str)][:8], third_party=True)
            except ValueError:
                pass
        try:
            wire = await self.node.p2p.call(peer, self.evidence_method, {"id": evidence_id},
                                            timeout=self.fetch_timeout)
            accusation = Accusation.from_wire(wire)
        except (P2PError, asyncio.TimeoutError, BadRequestError) as e:
            logger.debug("run %s: evidence %s not fetched from %s: %s", brief(self.run_id, 64), evidence_id, peer, e)
            return None
        if accusation.evidence_id != evidence_id:
            logger.debug("run %s: %s served other evidence than %s", brief(self.run_id, 64), peer, evidence_id)
            return None
        return wire

    async def _serve_evidence(self, request: Any, ctx: CallContext) -> Any:
        evidence_id = request.get("id") if isinstance(request, dict) else None
        if not isinstance(evidence_id, str):
            raise BadRequestError("the request must be {'id': evidence id}")
        wire = self._held.get(evidence_id)
        if wire is None:
            raise P2PError("no such evidence here (any more)")
        return wire

    def __repr__(self) -> str:
        return f"BanList({self.run_id!r}, {len(self._banned)} banned)"


def _reference_id(reference: dict) -> str | None:
    """The evidence id of a reference record, if well-formed (32 hex characters)."""
    ref = reference.get("ref")
    if isinstance(ref, str) and len(ref) == 32 and all(c in "0123456789abcdef" for c in ref):
        return ref
    return None
