"""FrameChannel: an authenticated, ordered, reliable pipe of frames between two peers.

The multiplexer (:mod:`dht.peer.multiplex`) runs on top of any FrameChannel; the TCP transport provides
:class:`dht.peer.handshake.SecureChannel` (encrypted), the in-memory transport
:class:`dht.peer.memory_transport.MemoryChannel` (same semantics, simulated latency and loss).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any

from .errors import HandshakeError
from .identity import PeerID
from .untrusted import brief

__all__ = ["FrameChannel", "PeerInfo"]


@dataclass
class PeerInfo:
    """What a peer announces about itself in the handshake (validated on receipt)."""

    addresses: list[str] = field(default_factory=list)  # listen addresses, printed form without /p2p
    window: int = 8 << 20  # bytes this peer buffers per stream before the sender must wait
    max_message_size: int = 64 << 20  # largest message this peer accepts

    def to_wire(self) -> dict:
        return {"addrs": self.addresses, "window": self.window, "max_msg": self.max_message_size}

    @classmethod
    def from_wire(cls, data: Any) -> "PeerInfo":
        if not isinstance(data, dict):
            raise HandshakeError("peer info must be a map")
        addrs = data.get("addrs", [])
        if not (isinstance(addrs, list) and len(addrs) <= 32
                and all(isinstance(a, str) and len(a) <= 256 for a in addrs)):
            raise HandshakeError("peer info: 'addrs' must be a list of at most 32 short strings")
        window, max_msg = _limit(data, "window"), _limit(data, "max_msg")
        return cls(list(addrs), window, max_msg)


def _limit(data: dict, name: str) -> int:
    value = data.get(name)
    if not isinstance(value, int) or not (1 << 16) <= value <= (1 << 34):
        raise HandshakeError(f"peer info: {name!r} must be an integer in [64 KiB, 16 GiB], got {brief(value)}")
    return value


class FrameChannel(abc.ABC):
    """One connection's frame pipe; ``remote_peer_id`` is authenticated by the transport,
    ``remote_host`` is the observed source IP (for per-IP budgets; None if the transport has none)."""

    def __init__(self, remote_peer_id: PeerID, remote_info: PeerInfo, endpoint: str,
                 remote_host: str | None = None):
        self.remote_peer_id = remote_peer_id
        self.remote_info = remote_info
        self.endpoint = endpoint  # where the other side is, for messages (e.g. "127.0.0.1:4001")
        # the other side's IP address as observed on the socket ("127.0.0.1", "::1"; IPv4-mapped IPv6
        # addresses in IPv4 form), not what it announced; None where there is none (in-memory transport)
        self.remote_host = remote_host

    def describe(self) -> str:
        return f"peer {self.remote_peer_id.short()} at {self.endpoint}" if self.remote_peer_id else self.endpoint

    @abc.abstractmethod
    def write_frame(self, data: bytes | bytearray | memoryview, head: bytes = b"") -> None:
        """Queue the frame ``head || data`` for sending (never blocks; call :meth:`drain` for backpressure).

        ``data`` may be a view of the caller's memory: it is copied (or encrypted) before this returns.
        """

    @abc.abstractmethod
    async def drain(self) -> None:
        """Wait until the outgoing buffer is below its high-water mark."""

    @abc.abstractmethod
    async def read_frame(self) -> bytes:
        """The next frame; ConnectionLostError at the end, ProtocolError on a corrupt frame."""

    @abc.abstractmethod
    def close(self) -> None:
        """Close the connection (idempotent)."""

    @abc.abstractmethod
    async def wait_closed(self) -> None:
        """Wait until the connection is closed."""
