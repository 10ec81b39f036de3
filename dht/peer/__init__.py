"""The peer layer: who a peer is and how two peers talk, below (and independent of) the DHT.

- :mod:`~dht.peer.identity`: Ed25519 identities and PeerIDs; :mod:`~dht.peer.addresses`: multiaddrs.
- :mod:`~dht.peer.channel`: the frame pipe every transport provides (and :class:`PeerInfo`, what a
  peer announces in the handshake); :mod:`~dht.peer.handshake_state`: the secure handshake as sans-IO
  state machines, driven over asyncio streams by :mod:`~dht.peer.handshake` (which also holds the
  frame encryption); :mod:`~dht.peer.tcp_transport` and :mod:`~dht.peer.memory_transport` (in-process
  network for simulations, with :mod:`~dht.peer.virtual_clock`).
- :mod:`~dht.peer.multiplex`: streams and RPC frames over one channel; :mod:`~dht.peer.p2p`: the
  :class:`P2P` endpoint (dialing, connection pool, handlers).
- Budgets against hostile callers: :mod:`~dht.peer.resources`, :mod:`~dht.peer.admission`,
  :mod:`~dht.peer.slots`, :mod:`~dht.peer.untrusted`; errors in :mod:`~dht.peer.errors`.

- NAT traversal: :mod:`~dht.peer.nat` (:class:`~dht.peer.nat.NatService`: the verdict, then relays and
  hole punching), :mod:`~dht.peer.reachability` (dial-back checks), :mod:`~dht.peer.relay` (circuit
  relays), :mod:`~dht.peer.holepunch` (direct connections through NATs).

Nothing here imports the DHT (``dht.node``, ``dht.protocol``, ...) or torch; ``tests/test_layers.py``
enforces it.
"""

from .addresses import AddressError, PeerAddress
from .channel import FrameChannel, PeerInfo
from .errors import (
    BadRequestError,
    ConnectionLostError,
    DeadlineExceededError,
    ErrorCode,
    HandshakeError,
    IncompatibleVersionError,
    MessageTooLargeError,
    OverloadedError,
    P2PError,
    PeerUnreachableError,
    ProtocolError,
    RemoteError,
    ResourceLimitError,
    StreamClosedError,
)
from .identity import Identity, IdentityError, PeerID
from .multiplex import Limits, Stream
from .p2p import P2P, CallContext

__all__ = [
    "AddressError", "PeerAddress", "FrameChannel", "PeerInfo", "Identity", "IdentityError", "PeerID", "Limits",
    "Stream", "P2P", "CallContext", "P2PError", "HandshakeError", "IncompatibleVersionError", "PeerUnreachableError",
    "ConnectionLostError", "ProtocolError", "RemoteError", "DeadlineExceededError", "MessageTooLargeError",
    "StreamClosedError", "BadRequestError", "OverloadedError", "ResourceLimitError", "ErrorCode",
]
