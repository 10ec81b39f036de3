"""Reachability: is this peer dialable from the internet? Other peers dial it back and say.

Protocol ``nat.dialback`` (version 1, unary, request at most 2 KiB)::

    request   {"v": 1, "addrs": [ADDR, ...]}        our announced addresses, printed without /p2p (<= 4)
    response  {"v": 1, "ip": OBSERVED_IP, "port": OBSERVED_PORT,
               "results": [{"addr": ADDR_DIALED, "ok": bool, "err": REASON}, ...]}

The helper (:class:`DialBackService`, on every peer) dials each requested TCP address on a fresh
connection, but only at the requester's own observed IP (an announced host that differs is replaced by
it: the helper never dials third parties on anyone's behalf, so it cannot be used to reflect traffic)
and only where the handshake proves the requester's PeerID; the connection is then closed. Requests are
rate-limited per PeerID and per source IP, and at most ``max_concurrent`` dial-backs run at once (beyond
it: ``overloaded``).

The requester (:func:`check_reachability`) asks up to 5 helpers at once (Petals uses 5) and decides
within ``timeout`` (10 s): ``public`` if at least half of the helpers that answered reached it,
otherwise ``nat`` if the helpers see it at an IP that is none of its own addresses (an address
translator is in the way), else ``firewalled``; ``unknown`` if fewer than ``min_helpers`` (3) answered.
:func:`verdict_line` prints the outcome as the parseable log line ``nat: verdict=...``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

from .addresses import AddressError, PeerAddress
from .admission import KeyedBuckets, host_of
from .errors import BadRequestError, OverloadedError, P2PError
from .identity import PeerID
from .resources import ip_key
from .untrusted import LogLimiter, brief

if TYPE_CHECKING:
    from .p2p import P2P, CallContext

__all__ = ["DIALBACK_METHOD", "Reachability", "DialBackService", "check_reachability", "verdict_line",
           "PUBLIC", "NAT", "FIREWALLED", "UNKNOWN"]

logger = logging.getLogger(__name__)
DIALBACK_METHOD = "nat.dialback"
VERSION = 1
MAX_REQUEST = 2048  # bytes
MAX_ADDRS = 4  # addresses dialled per request
PUBLIC, NAT, FIREWALLED, UNKNOWN = "public", "nat", "firewalled", "unknown"
_bad_requests = LogLimiter(rate=0.1, burst=3.0)


@dataclass
class Reachability:
    """The outcome of a reachability check."""

    verdict: str  # "public" | "nat" | "firewalled" | "unknown"
    asked: int = 0  # helpers asked
    answered: int = 0  # helpers that answered
    reached: int = 0  # helpers that reached us
    observed_ip: str | None = None  # our IP as most helpers saw it
    observed_port: int | None = None  # the source port of our connection to one of them
    reached_address: str | None = None  # an address where a helper reached us
    listen_port: int | None = None  # the TCP port we listen on (the one to open or forward)
    seconds: float = 0.0
    advice: str = ""
    errors: list[str] = field(default_factory=list)  # why helpers did not answer (bounded, for debugging)

    @property
    def reachable(self) -> bool:
        return self.verdict == PUBLIC

    def to_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "asked": self.asked, "answered": self.answered, "reached": self.reached,
                "observed_ip": self.observed_ip, "seconds": round(self.seconds, 3), "advice": self.advice}


def verdict_line(r: Reachability) -> str:
    """``nat: verdict=V helpers=ANSWERED/ASKED reached=N observed=IP port=P seconds=S advice="..."``."""
    observed = r.observed_ip or "-"
    port = r.listen_port if r.listen_port is not None else "-"
    advice = r.advice.replace('"', "'")
    return (f"nat: verdict={r.verdict} helpers={r.answered}/{r.asked} reached={r.reached} observed={observed} "
            f"port={port} seconds={r.seconds:.2f} advice=\"{advice}\"")


class DialBackService:
    """Serves ``nat.dialback`` on ``p2p``: bounded, rate-limited dial-backs to the requester itself.

    ``rate_per_peer`` / ``burst_per_peer``: requests per second and at once per PeerID (defaults: one
    per 10 s, 3 at once); ``rate_per_ip`` / ``burst_per_ip``: the same per source IP (IPv6: its /64;
    0.5/s, 8); ``max_concurrent``: dial-backs running at once (8); ``dial_timeout``: seconds per address (4).
    """

    def __init__(self, p2p: "P2P", *, rate_per_peer: float = 0.1, burst_per_peer: float = 3.0,
                 rate_per_ip: float = 0.5, burst_per_ip: float = 8.0, max_concurrent: int = 8,
                 dial_timeout: float = 4.0):
        self.p2p = p2p
        self.dial_timeout = dial_timeout
        self.max_concurrent = max_concurrent
        self._per_peer = KeyedBuckets(rate_per_peer, burst_per_peer)
        self._per_ip = KeyedBuckets(rate_per_ip, burst_per_ip)
        self._running = 0
        self.served = self.refused = 0
        p2p.add_unary_handler(DIALBACK_METHOD, self._handle, max_message_size=MAX_REQUEST)

    async def _handle(self, request: Any, ctx: "CallContext") -> dict:
        addrs = _parse_request(request)
        host = self.p2p.observed_host(ctx.peer_id) or host_of(ctx.endpoint)
        observed_port = _port_of(ctx.endpoint)
        if host is None:
            raise BadRequestError("dial-back needs a caller on an IP transport")
        if not (self._per_peer.take(ctx.peer_id) and self._per_ip.take(ip_key(host))):
            self.refused += 1
            raise OverloadedError("dial-back rate limit reached for this peer or IP; retry later")
        if self._running >= self.max_concurrent:
            self.refused += 1
            raise OverloadedError(f"{self.max_concurrent} dial-backs running; retry later")
        targets: list[PeerAddress] = []
        for address in addrs:
            if address.protocol not in ("ip4", "ip6") or address.relay is not None:
                continue  # names and relay addresses are not dialled back
            if ipaddress.ip_address(host).version != (4 if address.protocol == "ip4" else 6):
                continue
            target = PeerAddress.from_host_port(host, address.port)  # only ever the requester's own IP
            if target not in targets:
                targets.append(target)
        self._running += 1
        try:
            results = await asyncio.gather(*(self._try(t, ctx.peer_id) for t in targets))
        finally:
            self._running -= 1
        self.served += 1
        return {"v": VERSION, "ip": host, "port": observed_port, "results": results}

    async def _try(self, address: PeerAddress, peer_id: PeerID) -> dict:
        try:
            await self.p2p.probe(address, peer_id, self.dial_timeout)
            return {"addr": str(address), "ok": True, "err": ""}
        except (P2PError, asyncio.TimeoutError, OSError) as e:
            return {"addr": str(address), "ok": False, "err": (str(e) or type(e).__name__)[:200]}


def parse_address_list(message: Any, what: str, version: int, least: int, most: int,
                       longest: int) -> list[PeerAddress]:
    """The ``addrs`` of an untrusted ``{"v": version, "addrs": [...]}`` message: ``least`` to ``most``
    strings of at most ``longest`` characters, each a :class:`PeerAddress`; anything else raises
    :class:`BadRequestError` naming ``what`` (the dial-back request, the hole punch message)."""
    if not isinstance(message, dict) or message.get("v") != version:
        raise BadRequestError(f"{what} must be a map with v={version}, got {brief(message)}")
    addrs = message.get("addrs")
    if not isinstance(addrs, list) or not least <= len(addrs) <= most:
        raise BadRequestError(f"{what} 'addrs' must be a list of {least} to {most} addresses, got {brief(addrs)}")
    parsed = []
    for text in addrs:
        if not isinstance(text, str) or len(text) > longest:
            raise BadRequestError(f"{what} address must be a short string, got {brief(text)}")
        try:
            parsed.append(PeerAddress.parse(text))
        except AddressError as e:
            raise BadRequestError(f"{what} address: {brief(str(e), 200)}") from None
    return parsed


def _parse_request(request: Any) -> list[PeerAddress]:
    return parse_address_list(request, "dial-back request", VERSION, 1, MAX_ADDRS, 256)


def _port_of(endpoint: str) -> int | None:
    head, _, port = endpoint.rpartition(":")
    return int(port) if head and port.isdigit() and int(port) <= 65535 else None


def _parse_response(response: Any) -> tuple[str, int | None, list[tuple[str, bool]]]:
    if not isinstance(response, dict) or response.get("v") != VERSION:
        raise P2PError(f"malformed dial-back answer: {brief(response)}")
    ip, port, results = response.get("ip"), response.get("port"), response.get("results")
    if not isinstance(ip, str) or len(ip) > 64 or not isinstance(results, list) or len(results) > MAX_ADDRS:
        raise P2PError("malformed dial-back answer: bad ip or results")
    try:
        ip = str(ipaddress.ip_address(ip))
    except ValueError:
        raise P2PError(f"malformed dial-back answer: ip {brief(ip)}") from None
    out = []
    for item in results:
        if not isinstance(item, dict) or not isinstance(item.get("ok"), bool) or not isinstance(item.get("addr"), str):
            raise P2PError("malformed dial-back answer: bad result")
        out.append((item["addr"][:256], item["ok"]))
    return ip, port if isinstance(port, int) and 0 < port <= 65535 else None, out


async def check_reachability(p2p: "P2P", helpers: Sequence[PeerID], *, timeout: float = 10.0,
                             min_helpers: int = 3, max_helpers: int = 5) -> Reachability:
    """Ask up to ``max_helpers`` of ``helpers`` to dial us back; the verdict comes within ``timeout`` s."""
    start = time.perf_counter()
    own = [a for a in p2p.get_visible_addresses() if a.protocol in ("ip4", "ip6") and a.relay is None]
    listen_port = own[0].port if own else None
    helpers = [h for h in dict.fromkeys(helpers) if h != p2p.peer_id][:max_helpers]
    result = Reachability(UNKNOWN, asked=len(helpers), listen_port=listen_port)
    if not own:
        result.verdict = FIREWALLED
        result.advice = "this peer listens nowhere (client mode): others cannot dial it"
        result.seconds = time.perf_counter() - start
        return result
    request = {"v": VERSION, "addrs": [str(a.without_peer_id()) for a in own[:MAX_ADDRS]]}
    answers: list[tuple[str, int | None, list[tuple[str, bool]]]] = []

    async def ask(helper: PeerID) -> None:
        try:
            answers.append(_parse_response(await p2p.call(helper, DIALBACK_METHOD, request, timeout=timeout - 0.5)))
        except (P2PError, asyncio.TimeoutError) as e:
            if len(result.errors) < 8:
                result.errors.append(f"{helper.short()}: {(str(e) or type(e).__name__)[:200]}")

    if helpers:
        await asyncio.wait([asyncio.ensure_future(ask(h)) for h in helpers], timeout=timeout)
    result.answered = len(answers)
    result.reached = sum(any(ok for _, ok in results) for _, _, results in answers)
    for _, _, results in answers:
        for addr, ok in results:
            if ok and result.reached_address is None:
                result.reached_address = addr
    ips = [ip for ip, _, _ in answers]
    if ips:
        result.observed_ip = max(set(ips), key=ips.count)
        result.observed_port = next((port for ip, port, _ in answers if ip == result.observed_ip), None)
    own_hosts = {a.host for a in own}
    if result.answered < min_helpers:
        result.verdict = UNKNOWN
    elif 2 * result.reached >= result.answered:
        result.verdict = PUBLIC
    elif result.observed_ip is not None and result.observed_ip not in own_hosts:
        result.verdict = NAT
    else:
        result.verdict = FIREWALLED
    result.advice = _advice(result, own, min_helpers)
    result.seconds = time.perf_counter() - start
    return result


def _advice(r: Reachability, own: list[PeerAddress], min_helpers: int) -> str:
    port = r.listen_port
    if r.verdict == PUBLIC:
        return f"reachable at {r.reached_address}" if r.reached_address else "reachable"
    if r.verdict == UNKNOWN:
        return (f"only {r.answered} of {r.asked} helpers answered (need {min_helpers}): "
                "reachability unknown; the peer keeps serving")
    if r.verdict == NAT:
        return (f"behind NAT (seen as {r.observed_ip}, listening on {own[0].host}:{port}): forward TCP port {port} "
                f"to this host and pass --announce-addr {r.observed_ip}:{port}; meanwhile this peer is "
                "outbound-only in the DHT and others reach it through relays")
    return (f"TCP port {port} on {r.observed_ip or own[0].host} is not reachable (firewall?): open it "
            f"(e.g. ufw allow {port}/tcp) or pass --announce-addr with an address that is; meanwhile this peer "
            "is outbound-only in the DHT and others reach it through relays")
