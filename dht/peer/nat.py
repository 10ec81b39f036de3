"""NAT traversal of one peer: reachability verdict, relays, hole punching (:class:`NatService`).

At start (:meth:`NatService.start`) a peer asks other peers to dial it back
(:mod:`dht.peer.reachability`) and logs the verdict as one parseable line::

    nat: verdict=public|nat|firewalled|unknown helpers=ANSWERED/ASKED reached=N observed=IP port=P
         seconds=S advice="..."                                  (one line; wrapped here)

Then, by :class:`NatOptions`:

- ``relay`` ("auto", default: serve unless found unreachable; "on"; "off"): serve as a relay for NATed
  peers (:mod:`dht.peer.relay`, within :class:`~dht.peer.relay.RelayLimits`);
- ``use_relay`` ("auto", default: when found behind NAT or firewalled, reserve a slot on up to
  ``max_relays`` reachable peers; "off"; or a list of relay addresses to use whatever the verdict):
  the peer then announces ``/ip4/R/tcp/P/p2p/RELAY/relay`` addresses and is reachable through them;
- ``holepunch`` (default True): over a relayed connection, try a direct one (:mod:`dht.peer.holepunch`).

A verdict of "unknown" (too few helpers) is re-checked every ``recheck_interval`` seconds (a few times)
as more peers connect.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

from .identity import PeerID
from .reachability import (
    FIREWALLED,
    NAT,
    PUBLIC,
    UNKNOWN,
    DialBackService,
    Reachability,
    check_reachability,
    verdict_line,
)

if TYPE_CHECKING:
    from .p2p import P2P

__all__ = ["NatOptions", "NatService"]

logger = logging.getLogger(__name__)


@dataclass
class NatOptions:
    """What a peer does about NAT (the CLI's ``--relay``, ``--use-relay``, ``--no-holepunch``, ...)."""

    check: bool = True  # ask other peers to dial us back at start (--no-reachability-check: off)
    min_helpers: int = 3  # answers needed for a verdict (fewer: "unknown")
    check_timeout: float = 10.0  # seconds
    relay: str = "auto"  # serve as a relay: "auto" (unless found unreachable), "on", "off"
    use_relay: str | list[str] = "auto"  # "auto", "off", or relay addresses to reserve a slot on
    max_relays: int = 2  # relays a NATed peer holds reservations on
    holepunch: bool = True
    print_verdict: bool = False  # also print the verdict line on stdout (the CLI does)
    recheck_interval: float = 20.0  # seconds between re-checks while the verdict is "unknown"
    max_rechecks: int = 5
    relay_limits: Any = None  # a dht.peer.relay.RelayLimits, or None for the defaults


@dataclass
class NatStats:
    """Counters for ``swarm status`` and the metrics."""

    holepunch_attempts: int = 0
    holepunch_successes: int = 0
    holepunch_first_try: int = 0
    counters: dict[str, int] = field(default_factory=dict)


class NatService:
    """The NAT machinery of one :class:`~dht.peer.p2p.P2P` peer; ``p2p.nat`` points to it."""

    def __init__(self, p2p: "P2P", options: NatOptions | None = None):
        self.p2p = p2p
        self.options = options or NatOptions()
        self.reachability: Reachability | None = None
        self.stats = NatStats()
        self.dialback = DialBackService(p2p)
        self.on_unreachable: list[Callable[[Reachability], None]] = []  # e.g. the DHT switching to client mode
        self._helpers: Callable[[], Sequence[PeerID]] = p2p.connected_peers
        self._tasks: set[asyncio.Task] = set()
        self._closed = False
        p2p.nat = self

    @property
    def verdict(self) -> str:
        return self.reachability.verdict if self.reachability is not None else UNKNOWN

    @property
    def relayed(self) -> bool:
        """True when this peer is reachable only through relays (it holds relay reservations)."""
        return False

    async def start(self, helpers: Callable[[], Sequence[PeerID]] | None = None) -> "NatService":
        """Run the reachability check (if enabled) and act on its verdict. ``helpers``: the peers to
        ask (default: the connected ones)."""
        if helpers is not None:
            self._helpers = helpers
        if self.options.check:
            await self.check()
            if self.verdict == UNKNOWN and self.options.max_rechecks > 0:
                self._spawn(self._recheck_loop())
        return self

    async def check(self) -> Reachability:
        """One reachability check; logs (and, with ``print_verdict``, prints) the verdict line."""
        result = await check_reachability(self.p2p, list(self._helpers()), timeout=self.options.check_timeout,
                                          min_helpers=self.options.min_helpers)
        previous = self.verdict
        self.reachability = result
        line = verdict_line(result)
        logger.log(logging.INFO if result.verdict == PUBLIC else logging.WARNING, "%s", line)
        if result.errors:
            logger.debug("reachability check: helpers that did not answer: %s", "; ".join(result.errors))
        if self.options.print_verdict:
            print(line, file=sys.stdout, flush=True)
        if result.verdict in (NAT, FIREWALLED) and previous not in (NAT, FIREWALLED):
            for callback in self.on_unreachable:
                callback(result)
        return result

    async def _recheck_loop(self) -> None:
        for _ in range(self.options.max_rechecks):
            await asyncio.sleep(self.options.recheck_interval)
            if self._closed or self.verdict != UNKNOWN:
                return
            if len(self._helpers()) >= self.options.min_helpers:
                await self.check()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def status(self) -> dict[str, Any]:
        """The NAT state for ``swarm status`` and the metrics (plain JSON-able values)."""
        r = self.reachability
        return {"verdict": self.verdict, "observed_ip": r.observed_ip if r else None, "relayed": self.relayed,
                "holepunch_attempts": self.stats.holepunch_attempts,
                "holepunch_successes": self.stats.holepunch_successes}

    async def close(self) -> None:
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
