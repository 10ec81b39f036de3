"""Printable peer addresses, multiaddr-style: ``/ip4/HOST/tcp/PORT/p2p/PEERID``.

Accepted forms (the ``/p2p/PEERID`` suffix is optional where the peer's identity is not known yet,
e.g. the listen address a user types):

- ``/ip4/127.0.0.1/tcp/31337/p2p/Qm...``
- ``/ip6/::1/tcp/31337/p2p/Qm...``
- ``/dns/example.org/tcp/31337/p2p/Qm...`` (also ``/dns4``, ``/dns6``)
- ``/memory/NAME/p2p/Qm...`` (the in-memory transport used by simulations and tests)
- ``/ip4/R/tcp/P/p2p/RELAY/relay/p2p/PEER``: PEER reached through the relay RELAY listening at R:P
  (:mod:`dht.peer.relay`); ``protocol``/``host``/``port`` are the relay's, ``relay`` its PeerID
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

from .identity import IdentityError, PeerID

__all__ = ["PeerAddress", "AddressError", "interface_addresses"]

_HOST_PROTOCOLS = ("ip4", "ip6", "dns", "dns4", "dns6")
_PARSED: dict[str, "PeerAddress"] = {}  # DHT replies repeat the same few addresses: parse each once
_PARSED_MAX = 8192


class AddressError(ValueError):
    """A peer address string cannot be parsed."""


@dataclass(frozen=True)
class PeerAddress:
    """Where a peer listens (``protocol``/``host``/``port``) and, if known, who it is (``peer_id``)."""

    protocol: str  # "ip4", "ip6", "dns", "dns4", "dns6" or "memory"
    host: str
    port: int = 0
    peer_id: PeerID | None = None
    relay: PeerID | None = None  # set for a relayed address: the relay's PeerID (host and port are the relay's)

    @classmethod
    def parse(cls, text: str) -> "PeerAddress":
        """Parse the printed form; AddressError says what is wrong."""
        if not isinstance(text, str):
            raise AddressError(f"peer address must be a string, got {type(text).__name__}")
        parsed = _PARSED.get(text)
        if parsed is None:
            parsed = cls._parse(text)
            if len(_PARSED) >= _PARSED_MAX:
                _PARSED.clear()
            _PARSED[text] = parsed
        return parsed

    @classmethod
    def _parse(cls, text: str) -> "PeerAddress":
        parts = text.strip().split("/")
        if len(parts) < 3 or parts[0] != "":
            raise AddressError(f"{text!r}: expected /ip4/HOST/tcp/PORT/p2p/PEERID")
        parts = parts[1:]
        proto = parts[0]
        peer_id = None
        if len(parts) >= 2 and parts[-2] == "p2p":
            try:
                peer_id = PeerID.from_base58(parts[-1])
            except IdentityError as e:
                raise AddressError(f"{text!r}: {e}") from None
            parts = parts[:-2]
        relay = None
        if len(parts) >= 3 and parts[-1] == "relay" and parts[-3] == "p2p":
            try:
                relay = PeerID.from_base58(parts[-2])
            except IdentityError as e:
                raise AddressError(f"{text!r}: relay: {e}") from None
            parts = parts[:-3]
            if proto not in ("ip4", "ip6", "dns", "dns4", "dns6"):
                raise AddressError(f"{text!r}: a relay address must start with /ip4, /ip6 or /dns")
        if proto == "memory":
            if len(parts) != 2 or not parts[1]:
                raise AddressError(f"{text!r}: expected /memory/NAME/p2p/PEERID")
            return cls("memory", parts[1], 0, peer_id)
        if proto not in _HOST_PROTOCOLS:
            raise AddressError(f"{text!r}: unsupported protocol {proto!r} (use ip4, ip6, dns or memory)")
        if len(parts) != 4 or parts[2] != "tcp":
            raise AddressError(f"{text!r}: expected /{proto}/HOST/tcp/PORT[/p2p/PEERID]")
        host, port_text = parts[1], parts[3]
        try:
            if proto == "ip4":
                host = str(ipaddress.IPv4Address(host))
            elif proto == "ip6":
                host = str(ipaddress.IPv6Address(host))
            elif not host:
                raise ValueError("empty host name")
        except ValueError as e:
            raise AddressError(f"{text!r}: bad {proto} host: {e}") from None
        if not (port_text.isascii() and port_text.isdigit()) or not 0 <= int(port_text) <= 65535:
            raise AddressError(f"{text!r}: bad TCP port {port_text!r}")
        return cls(proto, host, int(port_text), peer_id, relay)

    @classmethod
    def from_host_port(cls, host: str, port: int, peer_id: PeerID | None = None) -> "PeerAddress":
        """Build from a socket-style (host, port); IP literals get ip4/ip6, anything else dns."""
        try:
            ip = ipaddress.ip_address(host)
            return cls("ip4" if ip.version == 4 else "ip6", str(ip), port, peer_id)
        except ValueError:
            return cls("dns", host, port, peer_id)

    def with_peer_id(self, peer_id: PeerID | None) -> "PeerAddress":
        return PeerAddress(self.protocol, self.host, self.port, peer_id, self.relay)

    def relay_address(self) -> "PeerAddress":
        """Where the relay of a relayed address listens, as a direct address with the relay's PeerID."""
        if self.relay is None:
            raise AddressError(f"{self} is not a relay address")
        return PeerAddress(self.protocol, self.host, self.port, self.relay)

    def via(self, relay: "PeerAddress") -> "PeerAddress":
        """This peer (``self.peer_id``, may be None) reached through ``relay`` (a direct address with its PeerID)."""
        if relay.peer_id is None or relay.relay is not None:
            raise AddressError(f"{relay}: a relay must be given as a direct address with /p2p/PEERID")
        return PeerAddress(relay.protocol, relay.host, relay.port, self.peer_id, relay.peer_id)

    def without_peer_id(self) -> "PeerAddress":
        return self.with_peer_id(None)

    def __str__(self) -> str:
        if self.protocol == "memory":
            text = f"/memory/{self.host}"
        else:
            text = f"/{self.protocol}/{self.host}/tcp/{self.port}"
        if self.relay is not None:
            text += f"/p2p/{self.relay}/relay"
        if self.peer_id is not None:
            text += f"/p2p/{self.peer_id}"
        return text

    def __repr__(self) -> str:
        return f"PeerAddress({str(self)!r})"


def interface_addresses(include_ipv6: bool = True) -> list[str]:
    """IP addresses of this machine's network interfaces, loopback included (loopback first)."""
    import psutil  # imported lazily: only needed by peers that listen on a wildcard address

    found: list[str] = []
    for addrs in psutil.net_if_addrs().values():
        for addr in addrs:
            if addr.family == socket.AF_INET or (include_ipv6 and addr.family == socket.AF_INET6):
                host = addr.address.split("%", 1)[0]  # drop the IPv6 zone index
                try:
                    ip = ipaddress.ip_address(host)
                except ValueError:
                    continue
                if ip.is_link_local:
                    continue  # unusable without a zone index
                if str(ip) not in found:
                    found.append(str(ip))
    if "127.0.0.1" not in found:
        found.append("127.0.0.1")
    found.sort(key=lambda h: (not ipaddress.ip_address(h).is_loopback, ipaddress.ip_address(h).version))
    return found
