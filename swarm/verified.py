"""Verified training for the daemon (``swarm join --verify P``) and its test attacker (``--byzantine``).

:class:`VerifiedOptimizer` is a :class:`swarm.Optimizer` (sync mode, exact averaging) whose gradient
rounds run with commitments (:mod:`averaging.commitments`) and skip banned peers, and whose peer:

- trains on named batches (:class:`verification.recompute.EpochBatches`, the daemon draws them) and
  sends its signed data claim with every round (the matchmaking ``gather``);
- after every round, in a background thread: checks that the members' parts it received match their
  claims (an inconsistent member is distrusted here), joins the round's shared-randomness exchange
  (:mod:`verification.randomness`) and, when it is drawn as a validator, recomputes its target's
  gradient (:mod:`verification.validator`) and audits one part owner's result from the committed
  inputs (:mod:`verification.audit`), and publishes an accusation with the evidence in the run's
  ban list (:mod:`verification.banlist`) on a mismatch;
- refreshes the ban list every ``refresh_period`` seconds (re-verifying each accusation itself);
  banned and distrusted peers are never grouped with, their DHT stores under the gradient prefix are
  refused, state sharing neither serves them nor downloads from them;
- publishes the peers it bans under ``{run_id}.bans`` (one subkey per reporter), which ``swarm runs``
  shows (:func:`ban_views`: peers banned in the view of most reporters).

The parameters of the last 32 epochs are kept (one copy each) so that accusations about them can be
checked. ``byzantine`` (a :class:`verification.byzantine.Byzantine`) makes this peer attack instead.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from typing import Any

import torch

from dht import DHT, PeerID

from .optimizer import Optimizer

__all__ = ["VerifiedOptimizer", "AttackingOptimizer", "ban_views", "fetch_ban_views", "BANS_SUFFIX"]

logger = logging.getLogger(__name__)

BANS_SUFFIX = "bans"  # {run_id}.bans: every verifying peer's view of the ban list
MAX_VIEW_ENTRIES = 64
VIEW_REFRESH = 120.0  # seconds between stores of an unchanged ban view (it expires after 600 s)


def _lying_owner(byzantine: Any, options: dict[str, Any]) -> None:
    """``wrong_aggregate`` (a lying part owner): reduce this peer's parts with the shifted reducer."""
    if byzantine is not None and byzantine.name == "wrong_aggregate":
        from averaging.averager import _resolve_reducer

        name, honest = _resolve_reducer(options.get("aggregator", "mean"))
        options["aggregator"] = byzantine.reducer(honest, name)


class VerifiedOptimizer(Optimizer):
    """:class:`swarm.Optimizer` with gradient verification (keyword arguments as the Optimizer's, plus):
    ``task`` (the run's :class:`swarm.Task`), ``model`` (this peer's model), ``source`` (the
    :class:`~verification.recompute.EpochBatches` the training loop draws from), ``probability`` (check
    probability, default 1/16), ``tolerance`` (1e-3), ``byzantine`` (None), ``refresh_period`` (2 s)."""

    def __init__(self, *, task: Any, model: torch.nn.Module, source: Any, probability: float | None = None,
                 tolerance: float | None = None, byzantine: Any = None, refresh_period: float = 2.0, **options: Any):
        from verification.recompute import DEFAULT_TOLERANCE
        from verification.validator import DEFAULT_PROBABILITY, TrainingVerifier

        if options.get("mode", "sync") != "sync":
            raise ValueError("verification needs mode='sync' (it recomputes gradients)")
        if options.get("compression", "auto") not in ("auto", None, "none"):
            raise ValueError("verification needs exact averaging (compression=None): parts are hashed as sent")
        dht: DHT = options["dht"]
        run_id: str = options["run_id"]
        self.task, self.source, self.byzantine = task, source, byzantine
        self.refresh_period = refresh_period
        identity = dht.node.p2p.identity
        self.verifier = TrainingVerifier(task, run_id, identity, getattr(task, "build_model", task.model),
                                         probability=DEFAULT_PROBABILITY if probability is None else probability,
                                         tolerance=DEFAULT_TOLERANCE if tolerance is None else tolerance)
        self.grads_prefix = f"{run_id}.grads"
        self._claim: dict | None = None
        self._view: list | None = None
        self._view_time = 0.0
        self._closing = threading.Event()
        self._jobs = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="verify")

        async def setup(_dht: DHT, node: Any) -> tuple[Any, Any, Any]:
            from verification.audit import InputsService
            from verification.banlist import BanList
            from verification.randomness import RandomnessExchange

            return (BanList(node, self.grads_prefix, identity),
                    RandomnessExchange(node.p2p, self.grads_prefix, identity),
                    InputsService(node.p2p, self.grads_prefix))

        self.banlist, self.exchange, self.inputs = dht.run_coroutine(setup)
        extra = dict(options.pop("averager_options", None) or {}, commitments=True, banned=self.excludes)
        _lying_owner(byzantine, options)
        super().__init__(averager_options=extra, **options)
        self.sharing.refuse = self.excludes  # state sharing: no banned donor, no banned requester
        self._refresher = threading.Thread(target=self._refresh_loop, name="verify-bans", daemon=True)
        self._refresher.start()

    # ---- who is excluded

    def excludes(self, peer_id: PeerID) -> bool:
        """Banned (proven) or distrusted (seen sending values that are not its claim's) here."""
        return self.banlist.is_banned(peer_id) or self.verifier.is_distrusted(peer_id)

    def banned_entries(self) -> list[dict[str, str]]:
        """``[{"peer_id", "reason"}]``: the ban list as this peer verified it, and the peers it distrusts."""
        entries = list(self.banlist.entries())
        listed = {e["peer_id"] for e in entries}
        entries += [{"peer_id": str(p), "reason": f"distrusted: {r}"} for p, r in self.verifier.distrusted().items()
                    if str(p) not in listed]
        return entries

    # ---- the round's hooks

    def before_averaging(self, tensors: list[torch.Tensor]) -> None:
        if self.byzantine is not None:
            self.byzantine.transform(tensors)
        flat = torch.cat([t.detach().reshape(-1).to(torch.float32) for t in tensors])
        self._claim = self.verifier.claim(self.source, self.state_hash, flat)
        self.verifier.history.remember(self.state_hash, [p.detach() for p in self.params])

    def _gather(self) -> dict:
        gathered = super()._gather()
        if self._claim is not None:
            gathered["claim"] = self._claim
        return gathered

    def _account(self, result: Any) -> None:
        super()._account(result)
        transcript = getattr(result, "transcript", None)
        if transcript is None or self._closing.is_set() or transcript.prefix != self.grads_prefix:
            return  # (a parameter-averaging round, average_state_every: no gradients to check)
        state_hash = self.state_hash
        self.dht.loop.call_soon_threadsafe(self.inputs.add, transcript)  # the owners' audits may ask for it
        self._jobs.submit(self._after_round, transcript, dict(result.gathered), state_hash)

    # ---- background work

    def _after_round(self, transcript: Any, gathered: dict, state_hash: str | None) -> None:
        try:
            claims = self.verifier.parse_claims(gathered)
            self.verifier.check_consistency(transcript, claims)
            shared = self.dht.run_coroutine(
                lambda _dht, _node: self.exchange.run(transcript.group_id, transcript.members, commit_timeout=3.0,
                                                      open_timeout=3.0))
            from verification.randomness import choose_checks

            me = self.dht.peer_id
            for validator, target in choose_checks(shared.value, transcript.members, self.verifier.probability):
                if validator != me or self.byzantine is not None:
                    continue
                target = self.verifier.choose_target(transcript, shared.value, target, self.excludes)
                signed = claims.get(target)
                if signed is None or signed.claim.state_hash != (state_hash or ""):
                    continue
                outcome, accusation = self.verifier.validate(transcript, target, signed)
                logger.info("verification: checked %s: %s (%s)", target.short(), outcome.verdict, outcome.reason)
                if accusation is not None:
                    self._publish(accusation)
                self._audit(transcript, shared.value, target)
        except Exception as e:  # noqa: BLE001 - a failed check must never stop training
            if not self._closing.is_set():
                logger.warning("verification after a round failed: %s: %s", type(e).__name__, e)

    def _audit(self, transcript: Any, randomness: bytes, drawn: PeerID) -> None:
        """Recompute one part owner's result from its contributors' committed inputs (wrong_aggregate)."""
        from verification.audit import audit_aggregate

        owner = self.verifier.choose_owner(transcript, randomness, drawn, self.excludes)
        if owner is None:
            return
        identity = self.dht.node.p2p.identity
        accusation = self.dht.run_coroutine(lambda _dht, node: audit_aggregate(
            node.p2p, self.grads_prefix, identity, transcript, owner, timeout=5.0))
        if accusation is not None:
            logger.warning("verification: the result of %s's part is wrong", transcript.members[owner].short())
            self._publish(accusation)

    def _publish(self, accusation: Any) -> None:
        check = self.verifier.recompute
        try:
            self.dht.run_coroutine(lambda _dht, _node: self.banlist.publish(accusation, check=check))
        except ValueError as e:  # it does not hold here after all: nothing published
            logger.warning("verification: an accusation was not published: %s", e)
        self._publish_view()

    def _refresh_loop(self) -> None:
        while not self._closing.wait(self.refresh_period):
            try:
                newly = self.dht.run_coroutine(lambda _dht, _node: self.banlist.refresh(check=self.verifier.recompute))
                if newly:
                    logger.warning("verification: banned %s", ", ".join(p.short() for p in newly))
                self._publish_view()
            except Exception as e:  # noqa: BLE001 - the DHT may be briefly unreachable
                if not self._closing.is_set():
                    logger.debug("ban list refresh failed: %s: %s", type(e).__name__, e)

    def _publish_view(self) -> None:
        """Store this peer's ban view when it changed, and at least every VIEW_REFRESH seconds."""
        entries = self.banned_entries()[:MAX_VIEW_ENTRIES]
        if entries == self._view and time.monotonic() - self._view_time < VIEW_REFRESH:
            return
        self._view, self._view_time = entries, time.monotonic()
        value = {"banned": [{"peer_id": e["peer_id"], "reason": e["reason"][:200]} for e in entries],
                 "time": time.time()}
        key = f"{self.run_id}.{BANS_SUFFIX}"

        async def store(_dht: DHT, node: Any) -> Any:
            marker = node.signature_validator.ownership_marker
            return await node.store(key, value, node.clock() + 600.0, subkey=f"{node.peer_id} {marker}")

        self.dht.run_coroutine(store)

    def shutdown(self, timeout: float | None = None) -> None:
        if getattr(self, "_closed", False):
            return
        self._closing.set()
        self._jobs.shutdown(wait=False, cancel_futures=True)
        super().shutdown(timeout)

        async def close(_dht: DHT, _node: Any) -> None:
            self.exchange.close()
            self.inputs.close()
            self.banlist.close()

        try:
            self.dht.run_coroutine(close, return_future=True).result(5.0)
        except (RuntimeError, concurrent.futures.TimeoutError):
            pass


async def fetch_ban_views(node: Any, run_id: str, timeout: float = 10.0) -> list[dict[str, Any]]:
    """``[{"peer_id", "reason", "reporters"}]``: the peers that more than half of the peers reporting
    under ``{run_id}.bans`` ban (each verifying peer publishes its own view, having checked the
    evidence itself; ``reporters``: how many ban it). Values from the DHT are untrusted: bounded here."""
    try:
        found = await asyncio.wait_for(node.get(f"{run_id}.{BANS_SUFFIX}", latest=True), timeout)
    except (asyncio.TimeoutError, OSError):
        return []
    if found is None or not isinstance(found.value, dict):
        return []
    counts: dict[str, int] = {}
    reasons: dict[str, str] = {}
    reporters = 0
    for entry in list(found.value.values())[:1024]:
        value = getattr(entry, "value", None)
        if not isinstance(value, dict) or not isinstance(value.get("banned"), list):
            continue
        reporters += 1
        for item in value["banned"][:MAX_VIEW_ENTRIES]:
            if isinstance(item, dict) and isinstance(item.get("peer_id"), str) and len(item["peer_id"]) <= 128:
                counts[item["peer_id"]] = counts.get(item["peer_id"], 0) + 1
                if isinstance(item.get("reason"), str):
                    reasons.setdefault(item["peer_id"], item["reason"][:200])
    return [{"peer_id": p, "reason": reasons.get(p, ""), "reporters": n}
            for p, n in sorted(counts.items()) if 2 * n > reporters]


def ban_views(dht: DHT, run_id: str, timeout: float = 10.0) -> list[dict[str, Any]]:
    """:func:`fetch_ban_views` from a synchronous caller."""
    return dht.run_coroutine(lambda _dht, node: fetch_ban_views(node, run_id, timeout))


class AttackingOptimizer(Optimizer):
    """``swarm join --byzantine`` on a run without verification: sends ``byzantine``'s attack of its
    contribution (and, for ``wrong_aggregate``, reduces its part with the shifted reducer)."""

    def __init__(self, *, byzantine: Any, **options: Any):
        self.byzantine = byzantine
        _lying_owner(byzantine, options)
        super().__init__(**options)

    def before_averaging(self, tensors: list[torch.Tensor]) -> None:
        self.byzantine.transform(tensors)
