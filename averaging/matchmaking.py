"""Matchmaking: peers that never met form an averaging group through the DHT (algorithms.md §5.1).

Each peer looking for a group declares itself under the group key ``{prefix}.0b{bits}`` (a DHT
dictionary: subkey = its PeerID, value = its addresses and mode, expiration = the time by which it
wants to start). Peers are ranked by ``(expiration, PeerID)``; a peer asks the best-ranked earlier
peer to lead it (stream ``avg.join``), and leads the later ones that ask it. A leader starts the
group when it is full (``target_group_size``) or when its own time comes with at least
``min_group_size`` members; it picks a random group id, shuffles the member order (the order decides
who reduces which part), computes the part sizes from the members' bandwidths and sends the same
``begin`` message to everyone. A follower that gets a better leader disbands its own followers and
points them to that leader. Leaders or followers that vanish are dropped: followers move on to the
next candidate, leaders simply start without them.

After a round, :func:`next_group_bits` shifts each member's key and appends bits distinct for every
member (derived from the group id), so group-mates land in different groups next time, every key
keeps its number of peers, and information mixes across the swarm (Moshpit SGD). When a search ends,
the declaration is withdrawn in the background: the all-reduce starts at once even if the DHT nodes
holding the key are slow or frozen.

The ``avg.join.{prefix}`` stream (follower -> leader: request; leader -> follower: ``rejected``,
or ``accepted`` then ``begin`` or ``disbanded``) is specified, encoded and parsed in
:mod:`averaging.protocol`; a malformed request gets ``bad_request`` and at most the transport's
rate-limited one-line log per peer. A follower checks the same bounds on what its leader sends,
and waits for ``begin`` no longer than its own deadline.

Followers waiting at a leader are bounded by ``target_group_size``; each leaves the table when its
stream ends, however it ends.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import random
import re
from typing import Annotated, Any, Callable

import pydantic

from dht import P2P, DHTNode, P2PError, PeerID, SchemaValidator, Stream, get_dht_time
from dht.peer.p2p import CallContext

from . import protocol
from .errors import MatchmakingError
from .group import GroupInfo
from .load_balancing import part_sizes
from .protocol import MAX_ADDR_CHARS, MAX_JOIN_BYTES

__all__ = ["Matchmaker", "next_group_bits", "is_relayed_member", "RELAYED_BANDWIDTH_SHARE"]

logger = logging.getLogger(__name__)
# a member reachable only through relays counts with this share of its bandwidth in the part sizes
# (Petals advertises 20% of a relayed server's throughput): its traffic crosses a third peer
RELAYED_BANDWIDTH_SHARE = 0.2


def is_relayed_member(addrs: list[str]) -> bool:
    """True if every address a member announced is a relay address (``.../p2p/RELAY/relay``)."""
    return bool(addrs) and all(isinstance(a, str) and "/relay" in a for a in addrs)


class Declaration(pydantic.BaseModel):
    """A peer's declaration under a group key, as the DHT checks it."""

    addrs: list[Annotated[str, pydantic.Field(max_length=MAX_ADDR_CHARS)]]
    client: bool = False
    relayed: bool = False  # reachable only through relays (behind NAT): slower, penalised in part sizes


class GroupKeySchema(pydantic.BaseModel):
    group: dict[Annotated[str, pydantic.Field(max_length=128)], Declaration | None]  # subkey: PeerID; None: withdrawn


def group_key_schema(prefix: str) -> SchemaValidator:
    """The DHT schema of the group keys ``{prefix}[.{scope}].0b{bits}`` (registered by each Matchmaker)."""
    return SchemaValidator(GroupKeySchema, patterns={"group": re.escape(prefix) + r"(?:\..*)?\.0b[01]*"})


def next_group_bits(bits: str, group_id: bytes, my_index: int, group_size: int,
                    target_group_size: int | None = None) -> str:
    """The Moshpit key of member ``my_index`` for the next round: the key shifted left by
    ``ceil(log2(target_group_size))`` bits (at least 1; ``target_group_size`` defaults to
    ``group_size``), the new bits on the right a symbol distinct for every member of the group (a
    permutation seeded by ``group_id``, the same at every member). So group-mates land in different
    groups next round, and a full ``M x ... x M`` grid stays balanced: each key keeps its number of
    peers, and after ``len(bits) / log2(M) + 1`` rounds of exact groups every peer holds the global
    mean. When the shift covers the whole key (groups as large as the number of keys), the key is
    replaced: distinct keys for up to ``2**len(bits)`` members, a larger group spread evenly over all
    keys (each gets ``group_size / 2**len(bits)`` members, +-1)."""
    if not bits:
        return bits
    rng = random.Random(group_id)
    shift = max(1, math.ceil(math.log2(max(target_group_size or group_size, group_size, 2))))
    if shift < len(bits):
        symbol = rng.sample(range(2 ** shift), group_size)[my_index]
        return (bits + format(symbol, f"0{shift}b"))[-len(bits):]
    buckets = 2 ** len(bits)
    if group_size <= buckets:
        symbol = rng.sample(range(buckets), group_size)[my_index]
    else:  # distinct positions modulo the number of keys: balanced, so next round's groups are full
        offset = rng.randrange(buckets)
        symbol = (rng.sample(range(group_size), group_size)[my_index] + offset) % buckets
    return format(symbol, f"0{len(bits)}b")


class Matchmaker:
    """Forms groups for one averager (one prefix) on a P2P peer with a DHT node."""

    def __init__(self, p2p: P2P, node: DHTNode, prefix: str, schema_hash: bytes, *, target_group_size: int,
                 min_group_size: int, min_matchmaking_time: float, request_timeout: float, client_mode: bool,
                 banned: Callable[[PeerID], bool] | None = None):
        self.p2p, self.node, self.prefix, self.schema_hash = p2p, node, prefix, schema_hash
        self.banned = banned  # peers never grouped with: not led, not followed, no group that holds one
        self.target_group_size, self.min_group_size = target_group_size, min_group_size
        self.min_matchmaking_time, self.request_timeout = min_matchmaking_time, request_timeout
        self.client_mode = client_mode
        # DHT time (expirations and the deadlines compared with them): the node's clock, so it follows
        # the virtual clock in simulations
        self.clock = node.clock if node is not None else get_dht_time
        self.group_bits = ""
        self.scope = ""
        self._looking = False
        self._key = ""
        self._expiration = 0.0
        self._followers: dict[PeerID, tuple[Stream, dict]] = {}
        self._leader: PeerID | None = None
        self._group_ready: asyncio.Future | None = None
        self._assembled = asyncio.Event()
        self._my_info: dict = {}
        self._deadline = 0.0
        # a follower is committed once its join request reaches a leader (who may start at once), and
        # a leader once it starts: never both, or one peer ends up in two groups and both fail
        self._joining = False  # a join request is in flight: accepted followers wait, no group starts
        self._beginning = False  # this peer starts its own group: it joins no other
        self._begin_started = False  # a call of _begin is sending the begin messages
        self._tried: dict[PeerID, float] = {}  # leader -> its declared expiration when we asked it
        # background tasks, cancelled on close: withdrawals (at most one per search, each within
        # request_timeout) and the start of a group that filled up
        self._withdrawals: set[asyncio.Future] = set()
        if node is not None:  # (tests drive a Matchmaker without a DHT)
            node.validator.extend([group_key_schema(prefix)])
        p2p.add_stream_handler(protocol.method(protocol.JOIN_METHOD, prefix), self._serve_join,
                               max_message_size=MAX_JOIN_BYTES)

    def close(self) -> None:
        self.p2p.remove_handler(protocol.method(protocol.JOIN_METHOD, self.prefix))
        for withdrawal in list(self._withdrawals):
            withdrawal.cancel()

    @property
    def group_key(self) -> str:
        """``{prefix}.0b{bits}``, or ``{prefix}.{scope}.0b{bits}`` when a scope (e.g. an epoch) is set:
        only peers searching under the same scope meet."""
        scope = f".{self.scope}" if self.scope else ""
        return f"{self.prefix}{scope}.0b{self.group_bits}"

    def _rank(self, expiration: float, peer_id: PeerID) -> tuple[float, bytes]:
        return expiration, peer_id.raw

    async def look_for_group(self, deadline: float, info: dict) -> tuple[GroupInfo, int]:
        """Find a group before ``deadline`` (DHT time); returns (group, my index in it)."""
        loop = asyncio.get_running_loop()
        self._key = self.group_key
        self._expiration = min(deadline, self.clock() + max(self.min_matchmaking_time, 0.0))
        self._deadline = deadline
        self._my_info = info
        self._followers = {}
        self._leader = None
        self._tried = {}
        self._joining = self._beginning = self._begin_started = False
        self._group_ready = loop.create_future()
        self._looking = True
        declare = asyncio.ensure_future(self._declare())
        try:
            while True:
                if self._group_ready.done():
                    return self._group_ready.result()
                if len(self._followers) + 1 >= self.target_group_size and not self.client_mode:
                    return await self._begin()  # filled up while we were asking a leader that declined
                leader = await self._best_leader_candidate()
                if leader is not None:
                    try:
                        result = await self._try_join(leader)
                    except MatchmakingError as e:
                        logger.debug("joining %s failed: %s", leader, e)
                        result = None
                    if result is not None:
                        return result
                    continue
                now = self.clock()
                if now >= self._expiration:
                    if len(self._followers) + 1 >= self.min_group_size and not self.client_mode:
                        return await self._begin()
                    if now >= deadline:
                        raise MatchmakingError(
                            f"no averaging group under {self._key!r} before the deadline "
                            f"({len(self._followers) + 1} peer(s) found, need {self.min_group_size})")
                    self._expiration = min(deadline, now + self.min_matchmaking_time)
                    await self._declare_once()
                try:
                    await asyncio.wait_for(asyncio.shield(self._group_ready),
                                           min(0.5, max(self._expiration - now, 0.01)))
                except asyncio.TimeoutError:
                    pass
        finally:
            self._looking = False
            declare.cancel()
            await asyncio.gather(declare, return_exceptions=True)
            await self._disband("the leader stopped looking for a group")
            # in the background: a store waits for the DHT nodes holding the key, and one of them may be
            # a frozen group-mate; this member's all-reduce must start now, or the others exclude it
            withdrawal = asyncio.ensure_future(self._withdraw(self._key, self.clock() + 1.0))
            self._withdrawals.add(withdrawal)
            withdrawal.add_done_callback(self._withdrawals.discard)

    async def _withdraw(self, key: str, expiration: float) -> None:
        """Replace this peer's declaration under ``key`` by None (within ``request_timeout``)."""
        try:
            await asyncio.wait_for(self.node.store(key, None, expiration, subkey=str(self.p2p.peer_id)),
                                   self.request_timeout)
        except Exception as e:  # noqa: BLE001 - the declaration expires on its own anyway
            logger.debug("withdrawing the declaration under %r failed: %s", key, e)

    async def _declare_once(self) -> None:
        nat = getattr(self.p2p, "nat", None)
        value = {"addrs": [str(a) for a in self.p2p.get_visible_addresses()], "client": self.client_mode,
                 "relayed": bool(getattr(nat, "relayed", False))}
        await self.node.store(self._key, value, self._expiration, subkey=str(self.p2p.peer_id))

    async def _declare(self) -> None:
        while True:
            try:
                await self._declare_once()
            except Exception as e:  # noqa: BLE001 - retried on the next period; logged
                logger.debug("declaring for matchmaking failed: %s", e)
            await asyncio.sleep(max(self.min_matchmaking_time / 2, 0.5))

    async def _best_leader_candidate(self) -> PeerID | None:
        found = await self.node.get(self._key, latest=True)
        if found is None or not isinstance(found.value, dict):
            return None
        my_rank = self._rank(self._expiration, self.p2p.peer_id)
        candidates = []
        for subkey, entry in found.value.items():
            value = entry.value
            if not isinstance(value, dict) or value.get("client") or subkey == str(self.p2p.peer_id):
                continue
            try:
                peer_id = PeerID.from_base58(subkey)
                self.p2p.add_addresses(peer_id, [a for a in value.get("addrs", []) if isinstance(a, str)][:8],
                                       third_party=True)  # an unsigned record: hearsay
            except ValueError:
                continue
            rank = self._rank(entry.expiration_time, peer_id)
            # a client cannot lead, so it may join any leader, even one that ranks after it
            # a leader that turned us down is asked again only once it declared anew (a new search)
            if self._is_banned(peer_id):
                continue
            if (rank < my_rank or self.client_mode) and self._tried.get(peer_id) != entry.expiration_time:
                candidates.append((rank, peer_id, entry.expiration_time))
        if not candidates:
            return None
        _, leader, expiration = min(candidates)
        self._tried[leader] = expiration
        return leader

    async def _try_join(self, leader: PeerID) -> tuple[GroupInfo, int] | None:
        if self._beginning:
            return None
        self._joining = True
        try:  # a leader that does not answer quickly (dead, preempted) is skipped, not waited for
            stream = await asyncio.wait_for(
                self.p2p.open_stream(leader, protocol.method(protocol.JOIN_METHOD, self.prefix), timeout=None),
                self.request_timeout)
        except (P2PError, asyncio.TimeoutError) as e:
            self._joining = False
            why = str(e) or f"no answer within {self.request_timeout} s"
            raise MatchmakingError(f"cannot reach {leader}: {why}") from None
        try:
            await stream.send(protocol.join_request(self._key, self.schema_hash, self._expiration, self._my_info,
                                                    self.client_mode,
                                                    [str(a) for a in self.p2p.get_visible_addresses()]))
            reply = await asyncio.wait_for(stream.recv(), self.request_timeout)
            leader_exp = protocol.parse_join_accepted(reply)  # BadRequestError: a bad expiration
            if leader_exp is None:  # rejected
                return None
            self._leader = leader
            await self._disband("joined another leader", suggested=leader)
            # never past our own deadline, whatever the leader announced
            wait_for = min(max(self._expiration, leader_exp), self._deadline) - self.clock() + self.request_timeout
            begin = await asyncio.wait_for(stream.recv(), max(wait_for, self.request_timeout))
            return self._parse_begin(begin)  # None: not a begin message (e.g. disbanded)
        except (P2PError, asyncio.TimeoutError, KeyError, TypeError, ValueError) as e:
            raise MatchmakingError(f"leader {leader} failed: {e}") from None
        finally:
            self._joining = False
            self._leader = None
            await stream.aclose()

    def _parse_begin(self, message: Any) -> tuple[GroupInfo, int] | None:
        """The group a leader's ``begin`` message announces (None for another message); BadRequestError
        if it breaks any bound (:func:`protocol.parse_begin`), ValueError if this peer is not in it."""
        begin = protocol.parse_begin(message, total=self._my_info.get("size"))
        if begin is None:
            return None
        if self.p2p.peer_id not in begin.members:
            raise ValueError("inconsistent begin message: this peer is not a member")
        if any(self._is_banned(m) for m in begin.members):
            raise ValueError("the group holds a banned peer")
        for peer_id, peer_addrs in zip(begin.members, begin.addrs):
            if peer_id != self.p2p.peer_id and peer_addrs:
                self.p2p.add_addresses(peer_id, peer_addrs[:8], third_party=True)  # the leader's word
        group = GroupInfo(begin.group_id, begin.members, begin.sizes, begin.bandwidths, begin.client, begin.gathered)
        return group, begin.members.index(self.p2p.peer_id)

    async def _serve_join(self, stream: Stream, ctx: CallContext) -> None:
        request = await asyncio.wait_for(stream.recv(), max(self.request_timeout, 1.0) * 5)
        request = protocol.parse_join_request(request)  # bad_request, and one rate-limited log line
        reason = None
        if self._is_banned(ctx.peer_id):
            reason = "banned from this run"
        elif not self._looking or self._group_ready is None or self._group_ready.done():
            reason = "not looking for a group"
        elif self._leader is not None:
            reason = "not a leader"
        elif request.get("key") != self._key:
            reason = "different group key"
        elif request.get("schema") != self.schema_hash:
            reason = "different tensor shapes or dtypes"
        elif not isinstance(request.get("exp"), (int, float)) or (
                not request.get("client")
                and self._rank(request["exp"], ctx.peer_id) <= self._rank(self._expiration, self.p2p.peer_id)):
            reason = "you rank before me: I should join you"
        elif len(self._followers) + 1 >= self.target_group_size:
            reason = "group is full"
        elif ctx.peer_id in self._followers:
            reason = "duplicate"
        if reason is not None:
            await stream.send(protocol.join_rejected(reason), end=True)
            return
        addrs = request.get("addrs", [])
        if addrs:
            try:
                self.p2p.add_addresses(ctx.peer_id, addrs[:8])
            except ValueError:
                pass
        done = asyncio.get_running_loop().create_future()
        self._followers[ctx.peer_id] = (stream, {**request, "done": done})
        await stream.send(protocol.join_accepted(self._expiration))
        if len(self._followers) + 1 >= self.target_group_size and not self._joining:
            self._beginning = True
            begin = asyncio.ensure_future(self._begin())  # kept until done (a task may be collected mid-flight)
            self._withdrawals.add(begin)
            begin.add_done_callback(self._withdrawals.discard)
        try:
            await done  # resolved by _begin or _disband; the follower's stream stays open until then
        finally:
            self._followers.pop(ctx.peer_id, None)

    async def _begin(self) -> tuple[GroupInfo, int]:
        assert self._group_ready is not None  # set by the search before any follower is accepted
        if self._group_ready.done():
            return self._group_ready.result()
        if self._begin_started:  # another call is sending the begin messages: the same group
            return await asyncio.shield(self._group_ready)
        self._beginning = True
        for peer_id in [p for p in self._followers if self._is_banned(p)]:  # banned since it was accepted
            stream, request = self._followers.pop(peer_id)
            try:
                await stream.send(protocol.join_rejected("banned from this run"), end=True)
            except P2PError:
                pass
            if not request["done"].done():
                request["done"].set_result(None)
        followers = dict(self._followers)
        members = [self.p2p.peer_id, *followers]
        infos = [self._my_info, *(req.get("info") for _, req in followers.values())]
        clients = [self.client_mode, *(bool(req.get("client")) for _, req in followers.values())]
        addrs = [[str(a) for a in self.p2p.get_visible_addresses()],
                 *([a for a in req.get("addrs", []) if isinstance(a, str)][:8] for _, req in followers.values())]
        order = list(range(len(members)))
        random.shuffle(order)
        members = [members[i] for i in order]
        infos, clients, addrs = [infos[i] for i in order], [clients[i] for i in order], [addrs[i] for i in order]
        bandwidths = [0.0 if c else (i.get("bandwidth") if isinstance(i, dict) else None)
                      for i, c in zip(infos, clients)]
        bandwidths = [b if b is None or (isinstance(b, (int, float)) and math.isfinite(b) and b >= 0) else None
                      for b in bandwidths]
        bandwidths = [b * RELAYED_BANDWIDTH_SHARE if b is not None and is_relayed_member(a) else b
                      for b, a in zip(bandwidths, addrs)]
        total = int(self._my_info.get("size", 0))
        sizes = part_sizes(total, bandwidths, min_part=int(self._my_info.get("min_part", 0)))
        begin = protocol.join_begin(os.urandom(20), [m.raw for m in members], addrs, sizes, bandwidths, clients, infos)
        result = self._parse_begin(begin)
        assert result is not None
        self._begin_started = True
        for stream, request in followers.values():
            try:
                await stream.send(begin, end=True)
            except P2PError:
                pass
            if not request["done"].done():
                request["done"].set_result(None)
        if not self._group_ready.done():
            self._group_ready.set_result(result)
        return result

    def _is_banned(self, peer_id: PeerID) -> bool:
        if self.banned is None:
            return False
        try:
            return bool(self.banned(peer_id))
        except Exception as e:  # noqa: BLE001 - a failing ban check must not break matchmaking: not banned
            logger.warning("the ban check failed: %s: %s", type(e).__name__, e)
            return False

    async def _disband(self, reason: str, suggested: PeerID | None = None) -> None:
        for stream, request in list(self._followers.values()):
            try:
                await stream.send(protocol.join_disbanded(reason, suggested.raw if suggested else None), end=True)
            except P2PError:
                pass
            if not request["done"].done():
                request["done"].set_result(None)
        self._followers.clear()
