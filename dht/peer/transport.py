"""Transport: how a peer listens and dials, producing authenticated FrameChannels.

Two implementations share this interface: :class:`dht.peer.tcp_transport.TCPTransport` (real sockets,
encrypted) and :class:`dht.peer.memory_transport.MemoryTransport` (in-process, simulated latency and loss).
"""

from __future__ import annotations

import abc
from typing import Callable

from .addresses import PeerAddress
from .channel import FrameChannel
from .identity import PeerID

__all__ = ["Transport"]


class Transport(abc.ABC):
    @abc.abstractmethod
    async def listen(self, on_channel: Callable[[FrameChannel], None]) -> list[PeerAddress]:
        """Start accepting connections; returns the addresses others can dial (without /p2p)."""

    @abc.abstractmethod
    async def dial(self, address: PeerAddress, expected: PeerID | None) -> FrameChannel:
        """Connect and authenticate; HandshakeError if the peer there is not ``expected``."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop accepting connections."""
