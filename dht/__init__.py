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

from .facade import DHT  # noqa: E402
from .node import DHTNode, get_dht_time  # noqa: E402
from .protocol import DHTLimits  # noqa: E402
from .storage import ValueWithExpiration  # noqa: E402
from .validation import (DHTRecord, RecordValidator, SchemaValidator, SignatureValidator,  # noqa: E402
                         ValidationError)

__all__ += ["DHT", "DHTNode", "get_dht_time", "DHTLimits", "ValueWithExpiration", "DHTRecord", "RecordValidator",
            "SchemaValidator", "SignatureValidator", "ValidationError"]
