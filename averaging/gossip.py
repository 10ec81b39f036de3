"""Gossip: asynchronous push-sum averaging, for peers that cannot wait for a group (algorithms.md §6.2).

Every peer keeps a sum ``s`` (its tensors times its weight) and a weight ``w``. A :meth:`Gossip.step`
keeps half of ``(s, w)`` and pushes the other half to one random peer under the same prefix; the
receiver adds what it gets. The estimate ``s / w`` is written into the tensors. ``Σ s`` and ``Σ w``
over the swarm never change (a push that fails is re-absorbed by its sender), so every estimate
converges to the weighted global mean, in O(log N + log 1/ε) rounds. There is no group to wait for,
no leader, and a peer may join, leave or be slow at any time. Peers find each other through the DHT
(dictionary key ``{prefix}.gossip``). ``mixing="robust"`` replaces the sum of an incoming push by a
clipped one (the incoming estimate is moved at most ``clip_tau`` away from ours), which bounds what a
single bad push can do, at the price of exact mass conservation.

Cost per step: one push of the full sum, uncompressed: ``8 d`` bytes for ``d`` values (float64),
versus about ``2 · 4d (M-1)/M`` bytes sent per member in a butterfly round of a group of M (float32,
uncompressed: :mod:`averaging.allreduce`), which also ends with the exact mean of the group rather
than a step towards it; ``tests/test_gossip.py`` prints the rounds and kB per peer that 16 peers need.

The ``gossip.push.{prefix}`` stream (pusher -> receiver), validated on receipt (encoded and parsed
in :mod:`averaging.protocol`):

=========  ===========================================================================================
message    content and limits
=========  ===========================================================================================
1          ``{"w": weight}``: int or float, finite, > 0
2          tensor header (:mod:`averaging.tensor_wire`): ``{"dtype": "float64", "shape": [d], "chunk": int}``,
           exactly our own sum's dtype and shape (anything else is refused before any allocation)
3..        raw bytes, at most ``PUSH_CHUNK_BYTES`` (1 MiB) per message, ``8 d`` bytes in all
reply      ``"ok"`` once the push is mixed in; ``bad_request`` for any malformed or non-finite push,
           ``overloaded`` beyond ``max_pushes_per_peer`` (1) / ``max_pushes`` (8) pushes received at
           once (memory: at most ``max(8 d, max_push_bytes)`` bytes), ``deadline`` for a push not complete
           within ``request_timeout`` (it is then dropped; the pusher re-absorbs its mass)
=========  ===========================================================================================
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import threading
from typing import Any, Sequence

import torch

from dht import DHT, MessageTooLargeError, P2PError, PeerID, ProtocolError, Stream
from dht.peer.errors import BadRequestError, ErrorCode
from dht.peer.p2p import CallContext
from dht.peer.slots import Slots

from . import protocol
from .errors import AveragingError
from .partition import flatten, unflatten_into
from .protocol import PUSH_CHUNK_BYTES
from .tensor_wire import recv_tensor, send_tensor

__all__ = ["Gossip"]

logger = logging.getLogger(__name__)

class _PushTimeout(P2PError):
    code = ErrorCode.DEADLINE  # the pusher gets DeadlineExceededError


class Gossip:
    """Push-sum gossip over ``tensors`` with the peers under ``prefix``.

    - ``weight``: this peer's initial weight (e.g. its number of samples); default 1.
    - ``mixing``: ``"push-sum"`` (exact mass conservation) or ``"robust"`` (clip incoming estimates
      to within ``clip_tau`` of ours before mixing).
    - ``declare_period``: seconds between refreshing this peer's entry in the DHT.
    - ``request_timeout`` (10 s): limit of a push, sent or received.
    - ``max_pushes_per_peer`` (1), ``max_pushes`` (8): pushes received at once from one peer and in
      all (each holds a buffer of our sum's size until it is mixed in); beyond: ``overloaded``.
    - ``max_push_bytes`` (64 MiB): the buffers of pushes received at once, in all; with a sum of
      ``8 d`` bytes at most ``max(1, max_push_bytes // 8 d)`` pushes are received at once, so what
      pushers can pin does not grow with the model.
    """

    def __init__(self, tensors: Sequence[torch.Tensor], dht: DHT, prefix: str, *, weight: float = 1.0,
                 mixing: str = "push-sum", clip_tau: float = 1.0, declare_period: float = 10.0,
                 request_timeout: float = 10.0, rng: random.Random | None = None, max_pushes_per_peer: int = 1,
                 max_pushes: int = 8, max_push_bytes: int = 64 << 20):
        if mixing not in ("push-sum", "robust"):
            raise ValueError("mixing must be 'push-sum' or 'robust'")
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError("weight must be positive and finite")
        self.tensors, self.dht, self.prefix = list(tensors), dht, prefix
        self.mixing, self.clip_tau = mixing, clip_tau
        self.declare_period, self.request_timeout = declare_period, request_timeout
        self.rng = rng or random.Random()
        self.lock = threading.Lock()
        self.s = flatten(self.tensors).double() * weight
        self.w = float(weight)
        self.bytes_sent = self.bytes_received = 0
        self.pushes_sent = self.pushes_failed = 0
        self._key = f"{prefix}.gossip"
        self._method = protocol.method(protocol.GOSSIP_PUSH_METHOD, prefix)
        self._peers: list[PeerID] = []
        self._declared_at = -math.inf
        sum_bytes = max(self.s.numel() * 8, 1)
        at_once = max(1, min(max_pushes, max_push_bytes // sum_bytes))
        self._slots = Slots(max_pushes_per_peer, at_once, "gossip pushes")

        async def setup(_, node):
            node.p2p.add_stream_handler(self._method, self._serve_push, max_message_size=PUSH_CHUNK_BYTES + 1024)

        dht.run_coroutine(setup)

    @property
    def estimate(self) -> torch.Tensor:
        """The current estimate ``s / w`` (flat, float64)."""
        return self.s / self.w

    def step(self, timeout: float | None = None) -> bool:
        """Push half of this peer's mass to a random peer and update the tensors; False if no peer
        was reachable (the mass then stays here)."""
        return self.dht.run_coroutine(lambda _, node: self._step(node, timeout or self.request_timeout))

    async def _step(self, node, timeout: float) -> bool:
        await self._refresh_peers(node)
        candidates = [p for p in self._peers if p != node.peer_id]
        if not candidates:
            return False
        target = self.rng.choice(candidates)
        half_s = self.s * 0.5
        self.s -= half_s  # keep exactly the other half: s_kept + half_s == s
        half_w = self.w / 2
        self.w -= half_w
        try:
            await asyncio.wait_for(self._push(node, target, half_s, half_w), timeout)
            self.pushes_sent += 1
            delivered = True
        except (P2PError, asyncio.TimeoutError, AveragingError):
            self.s += half_s  # re-absorb: mass is conserved even when the push fails
            self.w += half_w
            self.pushes_failed += 1
            self._peers = [p for p in self._peers if p != target]
            delivered = False
        estimate = self.estimate.float()  # taken on the loop: no push is half-applied in it
        await asyncio.get_running_loop().run_in_executor(None, self._write_back, estimate)
        return delivered

    async def _push(self, node, target: PeerID, s: torch.Tensor, w: float) -> None:
        stream = await node.p2p.open_stream(target, self._method, timeout=self.request_timeout)
        async with stream:
            await stream.send(protocol.push_header(w))
            self.bytes_sent += await send_tensor(stream, s, chunk_bytes=PUSH_CHUNK_BYTES)
            await stream.end()
            protocol.check_push_reply(await stream.recv())  # BadRequestError (a P2PError) if it is not "ok"

    async def _serve_push(self, stream: Stream, ctx: CallContext) -> None:
        with self._slots.hold(ctx.peer_id):  # OverloadedError: the pusher gets "overloaded"
            try:
                await asyncio.wait_for(self._receive_push(stream), self.request_timeout)
            except asyncio.TimeoutError:
                raise _PushTimeout(f"the push did not complete within {self.request_timeout:.3g} s") from None

    async def _receive_push(self, stream: Stream) -> None:
        w = protocol.parse_push_header(await stream.recv())  # BadRequestError: the pusher gets bad_request
        try:  # the header must match our own sum before anything is allocated
            s = await recv_tensor(stream, max_bytes=self.s.numel() * 8, like=self.s)
        except (ProtocolError, MessageTooLargeError) as e:
            raise BadRequestError(f"bad tensor: {e}") from None
        if not torch.isfinite(s).all():
            raise BadRequestError("bad tensor: non-finite values")
        self.bytes_received += s.numel() * 8
        if self.mixing == "robust":
            incoming = s / w
            ours = self.s / self.w
            delta = incoming - ours
            norm = float(delta.norm())
            if norm > self.clip_tau:
                s = (ours + delta * (self.clip_tau / norm)) * w
        self.s += s
        self.w += w
        await stream.send(protocol.PUSH_OK, end=True)

    async def _refresh_peers(self, node) -> None:
        now = node.clock()
        if now - self._declared_at > self.declare_period / 2:
            self._declared_at = now
            await node.store(self._key, True, now + self.declare_period, subkey=str(node.peer_id))
            found = await node.get(self._key, latest=True)
            peers = []
            if found is not None and isinstance(found.value, dict):
                for subkey, entry in found.value.items():
                    if entry.value is not True:
                        continue  # a peer that left
                    try:
                        peers.append(PeerID.from_base58(subkey))
                    except ValueError:
                        continue
            self._peers = peers

    def _write_back(self, estimate: torch.Tensor) -> None:
        with self.lock:
            unflatten_into(estimate, self.tensors)

    def shutdown(self) -> None:
        async def teardown(_, node):
            node.p2p.remove_handler(self._method)
            try:
                await node.store(self._key, False, node.clock() + 1, subkey=str(node.peer_id))
            except Exception as e:  # noqa: BLE001 - the entry expires on its own within a second anyway
                logger.debug("withdrawing the gossip entry %s failed: %s", self._key, e)

        try:
            self.dht.run_coroutine(teardown)
        except RuntimeError:
            pass

    def __enter__(self) -> "Gossip":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.shutdown()
