"""Peer layer of swarm: identity (Ed25519), authenticated encrypted transport, RPC, Kademlia DHT.

Importing ``dht`` never imports torch (a bootstrap peer stays small); tensor helpers live in
:mod:`dht.tensor_wire`.
"""

from .addresses import AddressError, PeerAddress
from .errors import (ConnectionLostError, DeadlineExceededError, HandshakeError, IncompatibleVersionError,
                     MessageTooLargeError, P2PError, PeerUnreachableError, ProtocolError, RemoteError,
                     StreamClosedError)
from .identity import Identity, IdentityError, PeerID
from .multiplex import Limits, Stream
from .p2p import P2P, CallContext

__all__ = [
    "AddressError", "PeerAddress", "Identity", "IdentityError", "PeerID", "Limits", "Stream", "P2P", "CallContext",
    "P2PError", "HandshakeError", "IncompatibleVersionError", "PeerUnreachableError", "ConnectionLostError",
    "ProtocolError", "RemoteError", "DeadlineExceededError", "MessageTooLargeError", "StreamClosedError",
]
