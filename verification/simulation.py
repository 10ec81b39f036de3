"""Verified training simulated in one process: the real protocol code, N peers, attackers, bans.

Each peer is a real :class:`dht.P2P` peer (with its own Ed25519 identity) and :class:`dht.DHTNode` on
one :class:`dht.peer.memory_transport.MemoryNetwork`, with an :class:`averaging.allreduce.AllReduceService`,
a model and its torch optimizer, a :class:`~verification.validator.TrainingVerifier` and a
:class:`~verification.banlist.BanList`; the whole thing runs on :mod:`dht.peer.virtual_clock`. A step
(= a collaborative epoch of sync mode):

1. the group: every peer that the honest peers' views have not banned or distrusted (matchmaking's
   ``banned=`` filter, tested with the averager, is replaced by this list: forming 16-peer groups through
   the DHT costs seconds per round here);
2. every member trains on its named batches (:class:`~verification.recompute.EpochBatches`; honest
   peers with 1 or 2 torch threads and 1, 2 or 4 micro-batches per batch, so real float
   nondeterminism separates trainer and validator) and signs its claim; an attacker
   (:class:`~verification.byzantine.Byzantine`) sends what its attack makes of its gradient;
3. the butterfly all-reduce with commitments, the run's aggregator (CenteredClip by default) and the
   members' ban checks (a lying owner reduces with a shifted reducer);
4. the checks: every honest member's consistency check (:meth:`TrainingVerifier.check_consistency`),
   the shared randomness of the round (commit-reveal among the members over the P2P,
   :mod:`verification.randomness`) and the (validator, target) pairs it picks with the check
   probability; an honest validator recomputes and, on a mismatch, publishes an accusation with the
   evidence in the DHT ban list; the owners' results are checked (:mod:`verification.evidence`'s
   "wrong_aggregate"); a ``false_accuser`` attacker accuses an honest member;
5. every honest peer refreshes its ban list, checking each new accusation's evidence itself
   (a recomputation) before honouring it;
6. every member applies its round's result with its optimizer; a member left without a result
   adopts an honest peer's parameters (as a state download would).

:func:`run` returns a :class:`SimResult`: per attacker the step at which every honest peer had it
banned (or distrusted), the honest peers banned by anyone (false bans), held-out accuracy over the
steps, and where time and bytes went.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from averaging import aggregators, compression
from averaging.allreduce import AllReduceService, RoundConfig, weighted_mean
from averaging.group import GroupInfo
from dht import PeerID
from dht.node import DHTNode
from dht.peer import virtual_clock
from dht.peer.identity import Identity
from dht.peer.memory_transport import MemoryNetwork

from .byzantine import Byzantine
from .recompute import EpochBatches, flat_gradient
from .validator import DEFAULT_PROBABILITY, TrainingVerifier

__all__ = ["SimConfig", "SimResult", "Simulation", "run", "FALSE_ACCUSER"]

logger = logging.getLogger(__name__)

FALSE_ACCUSER = "false_accuser"  # an attacker that accuses honest members with evidence that does not hold
YEAR = 365 * 24 * 3600.0


@dataclass
class SimConfig:
    """``peers`` (16); ``attackers``: peer index -> attack (a :func:`verification.byzantine.attack_names`
    name or ``"false_accuser"``); ``steps`` (50); ``probability``: check probability (1/16);
    ``verify`` (True; False: robust aggregation only, no commitments); ``aggregator`` ("centered_clip"); ``batch_size``
    (32, one batch per peer and step); ``eval_every`` (10 steps); ``seed``; ``vary_float`` (True: honest
    peers use 1 or 2 threads and 1, 2 or 4 micro-batches); ``stop_when_banned`` (False: stop early once
    every attacker is banned, when only the steps-to-ban matter)."""

    peers: int = 16
    attackers: dict[int, str] = field(default_factory=dict)
    steps: int = 50
    probability: float = DEFAULT_PROBABILITY
    verify: bool = True
    aggregator: str = "centered_clip"
    batch_size: int = 32
    eval_every: int = 10
    seed: int = 0
    vary_float: bool = True
    stop_when_banned: bool = False
    latency: float = 0.002


@dataclass
class SimResult:
    banned_at: dict[int, int | None]  # attacker index -> the step after which every honest peer excludes it
    false_bans: list[tuple[int, int, str]]  # (honest peer banned, step, by whom or reason)
    accuracy: list[tuple[int, float]]  # (step, held-out accuracy of an honest peer)
    steps: int
    # wall seconds: train, allreduce, consistency, randomness, validation (audit and recompute are parts of it),
    # banlist, total
    seconds: dict[str, float]
    bytes: dict[str, int]  # allreduce (payload), commitments (estimate), claims, accusations
    validations: int = 0
    accusations: int = 0
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def final_accuracy(self) -> float:
        return self.accuracy[-1][1] if self.accuracy else float("nan")

    def as_dict(self) -> dict:
        return {"banned_at": {str(k): v for k, v in self.banned_at.items()}, "false_bans": self.false_bans,
                "accuracy": self.accuracy, "final_accuracy": self.final_accuracy, "steps": self.steps,
                "seconds": self.seconds, "bytes": self.bytes, "validations": self.validations,
                "accusations": self.accusations, "counts": self.counts}


class _Peer:
    def __init__(self, index: int, identity: Identity, node: DHTNode, service: AllReduceService, model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, source: EpochBatches, verifier: TrainingVerifier, banlist: Any,
                 attack: str | None, byzantine: Byzantine | None, threads: int, micro: int):
        self.index, self.identity, self.node, self.service = index, identity, node, service
        self.model, self.optimizer, self.source, self.verifier = model, optimizer, source, verifier
        self.banlist, self.attack, self.byzantine = banlist, attack, byzantine
        self.threads, self.micro = threads, micro
        self.exchange: Any = None  # its verification.randomness.RandomnessExchange
        self.inputs: Any = None  # its verification.audit.InputsService

    @property
    def peer_id(self) -> PeerID:
        return self.identity.peer_id

    @property
    def honest(self) -> bool:
        return self.attack is None

    def excludes(self, peer_id: PeerID) -> bool:
        return self.banlist.is_banned(peer_id) or self.verifier.is_distrusted(peer_id)


def _state_hash(params: list[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for p in params:
        h.update(p.detach().to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


class _CachedData:
    """``task.data`` memoized per argument tuple (the batches materialized once): 16 peers rebuilding
    batches every step would otherwise reload the data set each time (e.g. digits reads it from disk)."""

    def __init__(self, data: Any, size: int = 4096):
        self.data, self.size = data, size
        self.cache: collections.OrderedDict[tuple, list] = collections.OrderedDict()

    def __call__(self, shard: int, num_shards: int, batch_size: int, seed: int) -> list:
        key = (shard, num_shards, batch_size, seed)
        if key not in self.cache:
            self.cache[key] = list(self.data(shard, num_shards, batch_size, seed))
            if len(self.cache) > self.size:
                self.cache.popitem(last=False)
        return self.cache[key]


def _with_cached_data(task: Any) -> Any:
    import copy

    cached = copy.copy(task)
    cached.data = _CachedData(task.data)
    return cached


class Simulation:
    """Build with :meth:`create` on a virtual-clock loop, then :meth:`step` / :meth:`run`."""

    def __init__(self, task: Any, config: SimConfig, run_id: str = "sim-run"):
        task = _with_cached_data(task)
        self.task, self.config, self.run_id = task, config, run_id
        self.prefix = f"{run_id}.grads"  # the averager's prefix: commitments, accusations and the ban list bind it
        self.rng = random.Random(config.seed)
        self.peers: list[_Peer] = []
        self.seconds: collections.defaultdict[str, float] = collections.defaultdict(float)
        self.bytes: collections.Counter = collections.Counter()
        self.counts: collections.Counter = collections.Counter()
        self.banned_at: dict[int, int | None] = {i: None for i in config.attackers}
        self.false_bans: list[tuple[int, int, str]] = []
        self.accuracy: list[tuple[int, float]] = []
        self.step_number = 0
        self._refreshed_at = 0
        honest = aggregators.as_reducer(aggregators.get(config.aggregator)) if config.aggregator != "mean" \
            else weighted_mean
        self.reducer = honest

    @classmethod
    async def create(cls, task: Any, config: SimConfig, run_id: str = "sim-run") -> "Simulation":
        self = cls(task, config, run_id)
        await self._build()
        return self

    async def _build(self) -> None:
        from .audit import InputsService
        from .banlist import BanList
        from .randomness import RandomnessExchange

        cfg = self.config
        self.network = MemoryNetwork(latency=cfg.latency, seed=cfg.seed)
        torch.manual_seed(cfg.seed)
        initial = self.task.model()
        state = {k: v.clone() for k, v in initial.state_dict().items()}
        nodes: list[DHTNode] = []
        for i in range(cfg.peers):
            identity = Identity(_private_key(self.rng))
            p2p = await self.network.create_peer(identity=identity, name=f"p{i}")
            seeds = [nodes[0].p2p.get_visible_addresses()[0]] if nodes else []
            node = await DHTNode.create(seeds, p2p=p2p, rpc_timeout=2.0, refresh_interval=YEAR,
                                        republish_interval=YEAR, rng=random.Random(self.rng.random()))
            nodes.append(node)
            model = self.task.model()
            model.load_state_dict(state)
            optimizer = self.task.optimizer(list(model.parameters()))
            source = EpochBatches(self.task, self.run_id, str(identity.peer_id), shard=i % cfg.peers,
                                  num_shards=cfg.peers, batch_size=cfg.batch_size)
            verifier = TrainingVerifier(self.task, self.run_id, identity, self.task.model,
                                        probability=cfg.probability)
            banlist = BanList(node, self.prefix, identity)
            attack = cfg.attackers.get(i)
            byzantine = Byzantine(attack, seed=cfg.seed * 1000 + i) if attack not in (None, FALSE_ACCUSER) else None
            threads = 1 + (i % 2) if cfg.vary_float else 1
            micro = (1, 2, 4)[i % 3] if cfg.vary_float else 1
            service = AllReduceService(p2p, self.prefix)
            peer = _Peer(i, identity, node, service, model, optimizer, source, verifier, banlist, attack, byzantine,
                         threads, micro)
            peer.exchange = RandomnessExchange(p2p, self.prefix, identity)
            peer.inputs = InputsService(p2p, self.prefix)
            self.peers.append(peer)
        for a in self.peers:  # everyone can dial everyone (a converged DHT's address books)
            for b in self.peers:
                if a is not b:
                    a.node.p2p.add_addresses(b.peer_id, b.node.p2p.get_visible_addresses())

    # ------------------------------------------------------------------ one step

    def honest_peers(self) -> list[_Peer]:
        return [p for p in self.peers if p.honest]

    def excluded_by_all(self, peer: _Peer) -> bool:
        return all(h.excludes(peer.peer_id) for h in self.honest_peers())

    def group(self) -> list[_Peer]:
        reference = self.honest_peers()[0]
        return [p for p in self.peers if p is reference or not reference.excludes(p.peer_id)]

    def _train(self, peer: _Peer, epoch: int) -> tuple[torch.Tensor, float]:
        """The peer's contribution (flat, after its attack) and its weight (samples)."""
        torch.set_num_threads(peer.threads)
        peer.source.reset(epoch)  # one batch per step: batch 0 of the peer's stream for this epoch
        batch = peer.source.next(epoch)
        if peer.byzantine is not None and peer.byzantine.name == "label_flip":
            if peer.byzantine.num_classes is None:
                peer.byzantine.learn_classes(peer.model, batch)
            batch = peer.byzantine.flip(batch)
        n = self.task.samples_in(batch)
        params = list(peer.model.parameters())
        for p in params:
            p.grad = None
        peer.model.train()
        pieces = _split(batch, peer.micro)
        for piece in pieces:
            loss = self.task.loss(peer.model, piece)
            (loss * (self.task.samples_in(piece) / n if len(pieces) > 1 else 1.0)).backward()
        peer.source.count(n)
        flat = torch.zeros(sum(q.numel() for q in params))  # as swarm.Optimizer: the sum of n * grad, / samples
        flat.add_(flat_gradient(params), alpha=float(n)).div_(float(n))
        if peer.byzantine is not None and peer.byzantine.name not in ("label_flip", "wrong_aggregate"):
            parts = [flat]
            peer.byzantine.transform(parts)
            flat = parts[0]
        return flat, float(n)

    async def step(self) -> None:
        cfg, t = self.config, self.step_number
        members = self.group()
        n = len(members)
        wall = time.perf_counter()
        params_before = {p.index: [q.detach().clone() for q in p.model.parameters()] for p in members}
        hashes = {p.index: _state_hash(params_before[p.index]) for p in members}
        flats: dict[int, torch.Tensor] = {}
        weights: dict[int, float] = {}
        claims: dict[PeerID, Any] = {}
        for p in members:
            flats[p.index], weights[p.index] = self._train(p, t)
            if cfg.verify:
                p.verifier.history.remember(hashes[p.index], params_before[p.index])
                claims[p.peer_id] = p.verifier.claim(p.source, hashes[p.index], flats[p.index])
                self.bytes["claims"] += _packed(claims[p.peer_id])
        self.seconds["train"] += time.perf_counter() - wall

        size = flats[members[0].index].numel()
        sizes = [size * (j + 1) // n - size * j // n for j in range(n)]
        group_id = hashlib.sha256(f"{self.run_id}|{cfg.seed}|{t}".encode()).digest()[:20]
        group = GroupInfo(group_id, [p.peer_id for p in members], sizes, [None] * n, [False] * n,
                          [{"gather": {"claim": claims.get(p.peer_id)}} for p in members])
        codec = compression.get("none")
        wall = time.perf_counter()

        def config(j: int, p: _Peer) -> RoundConfig:
            reducer = self.reducer
            if p.byzantine is not None and p.byzantine.name == "wrong_aggregate":
                reducer = p.byzantine.reducer(self.reducer, getattr(self.reducer, "__name__", "reducer"))
            return RoundConfig(group, j, weights[p.index], codec, reducer, chunk_elems=1 << 14, sender_timeout=2.0,
                               banned=p.excludes, identity=p.identity if cfg.verify else None,
                               commit_prefix=self.prefix)

        outcomes = await asyncio.gather(*(p.service.run(config(j, p), flats[p.index]) for j, p in enumerate(members)),
                                        return_exceptions=True)
        for p in members:
            p.service.finish(group_id)
        self.seconds["allreduce"] += time.perf_counter() - wall
        results: dict[int, tuple[torch.Tensor, Any]] = {}
        for p, outcome in zip(members, outcomes):
            if isinstance(outcome, BaseException):
                if not isinstance(outcome, Exception):
                    raise outcome
                self.counts["failed_rounds"] += 1
                logger.info("sim step %d: peer %d's round failed: %s", t, p.index, outcome)
                continue
            results[p.index] = outcome
            self.bytes["allreduce"] += outcome[1].bytes_sent
            transcript = outcome[1].transcript
            if transcript is not None:
                p.inputs.add(transcript)
                self.bytes["commitments"] += 140 * sum(len(ph.sent) + (1 if ph.results else 0)
                                                       for ph in transcript.phases)

        if cfg.verify:
            await self._verify(t, members, results, claims, hashes, group_id)

        # apply: every member with a result steps with it; the others adopt an honest peer's parameters
        donor = None
        for p in members:
            if p.index in results:
                result = results[p.index][0]
                offset = 0
                for q in p.model.parameters():
                    q.grad = result[offset:offset + q.numel()].view_as(q).clone()
                    offset += q.numel()
                p.optimizer.step()
                if donor is None and p.honest:
                    donor = p
        for p in members:
            if p.index not in results and donor is not None:
                p.model.load_state_dict(donor.model.state_dict())
                p.optimizer.load_state_dict(donor.optimizer.state_dict())
        self.step_number += 1
        for i in self.banned_at:
            if self.banned_at[i] is None and self.excluded_by_all(self.peers[i]):
                self.banned_at[i] = self.step_number
        if cfg.eval_every and (self.step_number % cfg.eval_every == 0 or self.step_number == cfg.steps):
            self.evaluate()

    async def _verify(self, t: int, members: list[_Peer], results: dict[int, Any], claims: dict[PeerID, Any],
                      hashes: dict[int, str], group_id: bytes) -> None:
        from .randomness import choose_checks

        cfg = self.config
        wall = time.perf_counter()
        parsed = {}
        for p in members:
            if p.honest and p.index in results and results[p.index][1].transcript is not None:
                parsed[p.index] = p.verifier.parse_claims(claims)
                p.verifier.check_consistency(results[p.index][1].transcript, parsed[p.index])
        self.seconds["consistency"] += time.perf_counter() - wall

        wall = time.perf_counter()
        live = [p for p in members if p.index in results]
        member_ids = [p.peer_id for p in live]
        round_id = hashlib.sha256(b"seed" + group_id).digest()[:20]
        shared = await asyncio.gather(*(p.exchange.run(round_id, member_ids, commit_timeout=2.0, open_timeout=2.0)
                                        for p in live), return_exceptions=True)
        self.seconds["randomness"] += time.perf_counter() - wall
        wall = time.perf_counter()
        by_id = {p.peer_id: p for p in members}
        for validator, outcome in zip(live, shared):
            if isinstance(outcome, BaseException):
                if not isinstance(outcome, Exception):
                    raise outcome
                logger.info("sim step %d: peer %d's randomness exchange failed: %s", t, validator.index, outcome)
                continue
            for validator_id, target_id in choose_checks(outcome.value, member_ids, cfg.probability):
                if validator_id != validator.peer_id:
                    continue  # every member acts on its own view of the checks
                transcript = results[validator.index][1].transcript
                if transcript is None:
                    continue
                if validator.honest:
                    target_id = validator.verifier.choose_target(transcript, outcome.value, target_id,
                                                                 validator.excludes)
                target = by_id[target_id]
                self.counts["checks"] += 1
                if validator.attack == FALSE_ACCUSER and target.honest:
                    await self._false_accusation(validator, target, transcript, claims)
                    continue
                if not validator.honest:
                    continue  # colluders never accuse each other
                signed = parsed.get(validator.index, {}).get(target_id)
                if signed is None or signed.claim.state_hash != hashes[validator.index]:
                    continue  # the target claims another state than the validator's: not checkable
                verdict, accusation = validator.verifier.validate(transcript, target_id, signed)
                self.counts[f"validation_{verdict.verdict}"] += 1
                if accusation is not None:
                    await self._publish(validator, accusation)
                audit_started = time.perf_counter()
                await self._audit(validator, transcript, outcome.value, target_id)
                self.seconds["audit"] += time.perf_counter() - audit_started
        self.seconds["validation"] += time.perf_counter() - wall
        wall = time.perf_counter()
        if self.counts["accusations"] + self.counts["false_accusations"] != self._refreshed_at:
            # (the sim knows when the list changed; a daemon refreshes every few seconds instead)
            self._refreshed_at = self.counts["accusations"] + self.counts["false_accusations"]
            for p in self.honest_peers():
                await p.banlist.refresh(check=p.verifier.recompute)
        self.seconds["banlist"] += time.perf_counter() - wall
        for p in self.honest_peers():
            for q in self.honest_peers():
                if p.excludes(q.peer_id) and not any(f[0] == q.index for f in self.false_bans):
                    self.false_bans.append((q.index, t, f"excluded by peer {p.index}"))

    async def _audit(self, validator: _Peer, transcript: Any, randomness: bytes, drawn: PeerID) -> None:
        """The owners' check: recompute one owner's result from its contributors' committed inputs."""
        from .audit import audit_aggregate

        owner = validator.verifier.choose_owner(transcript, randomness, drawn, validator.excludes)
        if owner is None:
            return
        self.counts["audits"] += 1
        self.bytes["audits"] += 4 * sum(hi - lo for lo, hi in transcript.phases[0].ranges[owner]) * (
            len(transcript.members) - 1)
        accusation = await audit_aggregate(validator.node.p2p, self.prefix, validator.identity, transcript, owner,
                                           timeout=5.0)
        if accusation is not None:
            self.counts["audit_guilty"] += 1
            await self._publish(validator, accusation)

    async def _publish(self, accuser: _Peer, accusation: Any) -> None:
        self.bytes["accusations"] += _packed(accusation.to_wire())
        self.counts["accusations"] += 1
        try:
            await accuser.banlist.publish(accusation, check=accuser.verifier.recompute)
        except ValueError as e:
            logger.warning("sim: peer %d's accusation was not published: %s", accuser.index, e)

    async def _false_accusation(self, accuser: _Peer, target: _Peer, transcript: Any, claims: dict) -> None:
        """A lie: accuse an honest member of a wrong gradient with its real part and claim, stored in the
        DHT directly (BanList.publish would refuse it: it does not hold)."""
        from .banlist import banned_key
        from .evidence import Accusation

        signed = accuser.verifier.parse_claims(claims).get(target.peer_id)
        member = transcript.members.index(target.peer_id)
        phase = transcript.phases[0]
        if signed is None or member not in phase.received or member not in phase.inputs:
            return
        ranges = [list(r) for r in phase.ranges[transcript.me]]
        accusation = Accusation.make(accuser.identity, "wrong_gradient", self.prefix, target.peer_id,
                                     transcript.group_id, [phase.inputs[member]], {0: phase.received[member].clone()},
                                     {"claim": signed.to_wire(), "ranges": ranges})
        self.counts["false_accusations"] += 1
        self.bytes["accusations"] += _packed(accusation.to_wire())
        node = accuser.node
        await node.store(banned_key(self.prefix), accusation.to_wire(), node.clock() + 3600.0,
                         subkey=f"{target.peer_id} {node.signature_validator.ownership_marker}")

    # ------------------------------------------------------------------ evaluation and the loop

    def evaluate(self) -> float:
        reference = self.honest_peers()[0]
        if self.task.evaluate is None:
            return float("nan")
        reference.model.eval()
        accuracy = float(self.task.evaluate(reference.model).get("accuracy", float("nan")))
        self.accuracy.append((self.step_number, accuracy))
        return accuracy

    async def run(self) -> SimResult:
        started = time.perf_counter()
        threads = torch.get_num_threads()
        try:
            while self.step_number < self.config.steps:
                await self.step()
                if self.config.stop_when_banned and self.banned_at and all(
                        v is not None for v in self.banned_at.values()):
                    break
        finally:
            torch.set_num_threads(threads)
        if not self.accuracy or self.accuracy[-1][0] != self.step_number:
            self.evaluate()
        self.seconds["total"] = time.perf_counter() - started
        # of "validation" (which includes "audit"): the validators' gradient recomputations alone
        self.seconds["recompute"] = sum(p.verifier.checker.recompute_seconds for p in self.peers)
        validations = sum(p.verifier.stats["validations"] for p in self.peers)
        return SimResult(dict(self.banned_at), list(self.false_bans), list(self.accuracy), self.step_number,
                         dict(self.seconds), dict(self.bytes), validations, self.counts["accusations"],
                         dict(self.counts))

    async def close(self) -> None:
        for p in self.peers:
            p.service.close()
            p.exchange.close()
            p.inputs.close()
            p.banlist.close()
        await asyncio.gather(*(p.node.shutdown() for p in self.peers), return_exceptions=True)


def _private_key(rng: random.Random) -> Any:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.from_private_bytes(rng.randbytes(32))


def _split(batch: Any, pieces: int) -> list[Any]:
    if pieces <= 1 or not isinstance(batch, (tuple, list)):
        return [batch]
    columns = [torch.tensor_split(b, pieces) for b in batch]
    return [type(batch)(col[i] for col in columns) for i in range(pieces) if len(columns[0][i])]


def _packed(value: Any) -> int:
    import msgpack

    try:
        return len(msgpack.packb(value, use_bin_type=True))
    except (TypeError, ValueError):
        return 0


def run(task: Any, config: SimConfig, run_id: str = "sim-run") -> SimResult:
    """Build and run a simulation on a fresh virtual-clock loop (blocking)."""

    async def go() -> SimResult:
        sim = await Simulation.create(task, config, run_id)
        try:
            return await sim.run()
        finally:
            await sim.close()

    return virtual_clock.run(go())


def steps_to_ban_probability(probability: float, members: int, attackers: int) -> float:
    """The per-step probability that one attacker is validated by an honest member when each
    member is checked with ``probability`` by a uniformly chosen other member."""
    if members < 2:
        return 0.0
    honest_validators = (members - attackers) / (members - 1)
    return probability * min(1.0, honest_validators)

