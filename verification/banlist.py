"""A run's ban list in the DHT: accusations with their evidence, each re-verified by every reader.

Under ``f"{run_id}.banned"`` (a DHT dictionary) every publisher writes one signed sub-key per accused
peer, ``f"{accused} [owner:{publisher's key}]"`` (nobody can overwrite another's record), whose
value is the accusation's wire form (:class:`~verification.evidence.Accusation`, at most 224 KiB).
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

from dht import DHTNode, PeerID
from dht.peer.errors import BadRequestError
from dht.peer.identity import Identity
from dht.peer.untrusted import brief

from .evidence import Accusation, CannotVerify, Recompute, Verdict, verify_accusation

__all__ = ["BanList", "banned_key"]

logger = logging.getLogger(__name__)

DEFAULT_TTL = 7 * 86400.0  # seconds a published accusation is kept in the DHT
MAX_JUDGED = 4096  # accusations whose verdict is remembered (not verified twice)
MAX_BANNED = 65536


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
        self._judged: collections.OrderedDict[str, tuple[PeerID, str] | None] = collections.OrderedDict()
        if filter_stores:
            node.set_store_filter(run_id, self.is_banned)

    def close(self) -> None:
        """Stop filtering the node's stores under ``run_id`` (idempotent)."""
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
        """(guilty peer, reason) for ``accusation``, or None if it cannot be judged here; verified once
        (off the event loop), then remembered."""
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
        newly = []
        for subkey, entry in found.value.items():
            try:
                accusation = Accusation.from_wire(entry.value)
            except (BadRequestError, ValueError, TypeError) as e:
                logger.debug("run %s: a malformed ban record %s: %s", brief(self.run_id, 64), brief(subkey, 80), e)
                continue
            if accusation.run_id != self.run_id:
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
        if accusation.run_id != self.run_id:
            raise ValueError(f"the accusation is for run {brief(accusation.run_id, 64)}, not {brief(self.run_id, 64)}")
        outcome = await self.judge(accusation, check)
        if outcome is None or outcome[0] != accusation.accused:
            raise ValueError("the accusation does not hold: " + (outcome[1] if outcome else "it cannot be judged here"))
        self.ban(*outcome)
        subkey = f"{accusation.accused} {self.node.signature_validator.ownership_marker}"
        stored = await self.node.store(self.key, accusation.to_wire(), self.node.clock() + self.ttl, subkey=subkey)
        if not stored:
            logger.warning("run %s: the accusation against %s was not stored in the DHT", brief(self.run_id, 64),
                           accusation.accused)
        return Verdict("accused", outcome[1])

    def __repr__(self) -> str:
        return f"BanList({self.run_id!r}, {len(self._banned)} banned)"
