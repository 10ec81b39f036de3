"""Kademlia DHT with signed, expiring records, on top of the peer layer (:mod:`dht.peer`: identity,
authenticated encrypted transport, streams and RPC), whose main names are re-exported here.

Importing ``dht`` never imports torch (a bootstrap peer stays small); tensor helpers live in
:mod:`averaging.tensor_wire`.
"""

from .peer import (
    P2P,
    AddressError,
    BadRequestError,
    CallContext,
    ConnectionLostError,
    DeadlineExceededError,
    ErrorCode,
    HandshakeError,
    Identity,
    IdentityError,
    IncompatibleVersionError,
    Limits,
    MessageTooLargeError,
    OverloadedError,
    P2PError,
    PeerAddress,
    PeerID,
    PeerUnreachableError,
    ProtocolError,
    RemoteError,
    Stream,
    StreamClosedError,
)

__all__ = [
    "AddressError", "PeerAddress", "Identity", "IdentityError", "PeerID", "Limits", "Stream", "P2P", "CallContext",
    "P2PError", "HandshakeError", "IncompatibleVersionError", "PeerUnreachableError", "ConnectionLostError",
    "ProtocolError", "RemoteError", "DeadlineExceededError", "MessageTooLargeError", "StreamClosedError",
    "BadRequestError", "OverloadedError", "ErrorCode",
]

from .facade import DHT
from .node import DHTNode, get_dht_time
from .protocol import DHTLimits
from .storage import ValueWithExpiration
from .validation import DHTRecord, RecordValidator, SchemaValidator, SignatureValidator, ValidationError

__all__ += ["DHT", "DHTNode", "get_dht_time", "DHTLimits", "ValueWithExpiration", "DHTRecord", "RecordValidator",
            "SchemaValidator", "SignatureValidator", "ValidationError"]
