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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

from .addresses import PeerAddress
from .errors import P2PError
from .holepunch import HolePuncher
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
from .relay import RelayClient, RelayLimits, RelayService

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


class NatService:
    """The NAT machinery of one :class:`~dht.peer.p2p.P2P` peer; ``p2p.nat`` points to it."""

    def __init__(self, p2p: "P2P", options: NatOptions | None = None):
        self.p2p = p2p
        self.options = options or NatOptions()
        self.reachability: Reachability | None = None
        self.dialback = DialBackService(p2p)
        self.relay_client = RelayClient(p2p)
        self.relay_service: RelayService | None = None
        if self.options.relay != "off":
            self.relay_service = RelayService(p2p, self.options.relay_limits or RelayLimits())
        self.holepuncher: HolePuncher | None = None
        if self.options.holepunch:
            self.holepuncher = HolePuncher(p2p, self._observed_ip)
            self.relay_client.on_dialed = self.holepuncher.schedule
        self.on_unreachable: list[Callable[[Reachability], None]] = []  # e.g. the DHT switching to client mode
        self._helpers: Callable[[], Sequence[PeerID]] = p2p.connected_peers
        self._tasks: set[asyncio.Task] = set()
        self._closed = False
        self._keeping_relays = False
        p2p.nat = self

    def _observed_ip(self) -> str | None:
        """Our public IP as others see it: the reachability helpers' answer, else a relay's."""
        r = self.reachability
        return (r.observed_ip if r is not None else None) or self.relay_client.observed_ip

    @property
    def verdict(self) -> str:
        return self.reachability.verdict if self.reachability is not None else UNKNOWN

    @property
    def relayed(self) -> bool:
        """True when this peer is reachable through relays only (it holds reservations, found unreachable)."""
        return bool(self.relay_client.held) and self.verdict in (NAT, FIREWALLED)

    async def start(self, helpers: Callable[[], Sequence[PeerID]] | None = None) -> "NatService":
        """Run the reachability check (if enabled) and act on its verdict. ``helpers``: the peers to
        ask (default: the connected ones)."""
        if helpers is not None:
            self._helpers = helpers
        if self.options.check:
            await self.check()
            if self.verdict == UNKNOWN and self.options.max_rechecks > 0:
                self._spawn(self._recheck_loop())
        if isinstance(self.options.use_relay, list):
            await self.reserve_relays([PeerAddress.parse(a) for a in self.options.use_relay])
        return self

    async def reserve_relays(self, candidates: Sequence[PeerAddress] | None = None) -> int:
        """Hold reservations on up to ``max_relays`` of ``candidates`` (direct addresses with /p2p;
        default: the connected peers we reached at an address of their own); returns how many are held."""
        client = self.relay_client
        if candidates is None:
            candidates = []
            for peer_id in self._helpers():
                address = self.p2p.dialed_address(peer_id)
                if address is not None and address.relay is None:
                    candidates.append(address.with_peer_id(peer_id))
        for relay in candidates:
            if len(client.held) >= self.options.max_relays or self._closed:
                break
            if relay.peer_id in client.held or relay.peer_id in client._tasks or relay.peer_id == self.p2p.peer_id:
                continue
            try:
                address = await client.reserve(relay)
                logger.info("nat: relay reservation on %s: reachable at %s", relay,
                            address.with_peer_id(self.p2p.peer_id))
            except (P2PError, asyncio.TimeoutError, OSError, ValueError) as e:
                logger.info("nat: relay %s refused a reservation: %s", relay, e)
        return len(client.held)

    async def check(self) -> Reachability:
        """One reachability check; logs (and, with ``print_verdict``, prints) the verdict line."""
        result = await check_reachability(self.p2p, list(self._helpers()), timeout=self.options.check_timeout,
                                          min_helpers=self.options.min_helpers)
        previous = self.verdict
        self.reachability = result
        line = verdict_line(result)
        # printed on stdout as well (the CLI): logged at INFO only, so that it shows once
        quiet = result.verdict == PUBLIC or self.options.print_verdict
        logger.log(logging.INFO if quiet else logging.WARNING, "%s", line)
        if result.errors:
            logger.debug("reachability check: helpers that did not answer: %s", "; ".join(result.errors))
        if self.options.print_verdict:
            print(line, file=sys.stdout, flush=True)
        if result.verdict in (NAT, FIREWALLED) and previous not in (NAT, FIREWALLED):
            if self.relay_service is not None and self.options.relay == "auto":
                self.relay_service.enabled = False  # nobody could reach it as a relay
            self.relay_client.announce_direct = False
            self.relay_client._publish()
            for callback in self.on_unreachable:
                callback(result)
            if self.options.use_relay == "auto":
                self._start_keeping_relays()
        elif result.verdict == UNKNOWN and result.answered and not result.reached and self.options.use_relay == "auto":
            # too few answers for a verdict, but nobody reached us: hold relays as well (announced besides
            # the direct addresses), so that even a swarm of two or three peers reaches a peer behind NAT
            self._start_keeping_relays()
        return result

    def _start_keeping_relays(self) -> None:
        if not self._keeping_relays:
            self._keeping_relays = True
            self._spawn(self._keep_relays())

    async def _keep_relays(self) -> None:
        """While unreachable: hold ``max_relays`` reservations, looking for new relays every 30 s."""
        while not self._closed:
            held = await self.reserve_relays()
            if held == 0:
                logger.warning("nat: no relay accepted a reservation yet: peers cannot reach this one")
            await asyncio.sleep(30.0 if held >= self.options.max_relays else 5.0)

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
        relay = self.relay_service.stat() if self.relay_service is not None and self.relay_service.enabled else {}
        return {"verdict": self.verdict, "observed_ip": self._observed_ip(), "relayed": self.relayed,
                "relays": sorted(str(p) for p in self.relay_client.held),
                "relay_reservations": relay.get("reservations", 0), "relay_circuits": relay.get("circuits", 0),
                "relay_bytes": relay.get("bytes_relayed", 0),
                "relay_circuits_dialed": self.relay_client.circuits_dialed,
                "relay_circuits_accepted": self.relay_client.circuits_accepted,
                **(self.holepuncher.status() if self.holepuncher is not None else
                   {"holepunch_upgrades": 0, "holepunch_attempts": 0, "holepunch_successes": 0,
                    "holepunch_first_try": 0})}

    async def close(self) -> None:
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.relay_client.close()
        if self.holepuncher is not None:
            await self.holepuncher.close()
        if self.relay_service is not None:
            self.relay_service.close()
