"""Errors raised by the peer layer. Every message names the remote peer (or address) and the cause."""

from __future__ import annotations

__all__ = [
    "ErrorCode",
    "P2PError",
    "HandshakeError",
    "IncompatibleVersionError",
    "PeerUnreachableError",
    "ConnectionLostError",
    "ProtocolError",
    "RemoteError",
    "DeadlineExceededError",
    "MessageTooLargeError",
    "StreamClosedError",
    "BadRequestError",
    "OverloadedError",
    "ResourceLimitError",
]


class ErrorCode:
    """The ``code`` of a :class:`RemoteError`: the strings the wire carries in ERROR frames (stable; a
    handler may send other short codes of its own, such as averaging's ``excluded``)."""

    UNKNOWN_METHOD = "unknown_method"  # no handler for the method
    HANDLER_ERROR = "handler_error"  # the handler raised (a bug or an unexpected failure over there)
    BAD_REQUEST = "bad_request"  # the request failed validation (BadRequestError) or was not msgpack
    TOO_LARGE = "too_large"  # a message over the receiver's size or per-stream memory limit
    DEADLINE = "deadline"  # the call ran past its deadline on the server
    CANCELLED = "cancelled"  # the call was cancelled (by the caller, or the server's handler was)
    OVERLOADED = "overloaded"  # a concurrency or rate budget is spent: retry later or ask another peer
    SHUTDOWN = "shutdown"  # reserved (a peer shutting down now closes its connections: ConnectionLostError)
    PROTOCOL = "protocol"  # the stream broke the multiplexing protocol (or sent a malformed ERROR frame)
    ALL = frozenset({UNKNOWN_METHOD, HANDLER_ERROR, BAD_REQUEST, TOO_LARGE, DEADLINE, CANCELLED, OVERLOADED,
                     SHUTDOWN, PROTOCOL})


class P2PError(Exception):
    """Base class of the peer layer's errors."""


class HandshakeError(P2PError):
    """The secure handshake failed: wrong key, bad signature, malformed or timed-out exchange."""


class IncompatibleVersionError(HandshakeError):
    """The two peers share no protocol version; the message lists both sides' versions."""


class PeerUnreachableError(P2PError):
    """No known address of the peer accepted a connection (or none is known)."""


class ConnectionLostError(P2PError):
    """The connection closed while a call was in flight (peer died, shut down or broke the protocol)."""


class ProtocolError(P2PError):
    """A peer sent something that violates the wire protocol (malformed frame or message)."""


class RemoteError(P2PError):
    """The remote side failed the call; ``code`` is a short machine-readable reason, one of
    :class:`ErrorCode` (``unknown_method``, ``handler_error``, ``bad_request``, ``too_large``,
    ``deadline``, ``cancelled``, ``overloaded``, ``shutdown``, ``protocol``) or a handler's own.
    """

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class DeadlineExceededError(P2PError, TimeoutError):
    """A call did not finish before its deadline (the remote side was told to stop)."""


class MessageTooLargeError(P2PError):
    """A message exceeds the configured size limit (``Limits.max_message_size``)."""


class StreamClosedError(P2PError):
    """Sending on a stream that was already ended, or receiving past its end."""


class BadRequestError(P2PError):
    """Raised by a handler for a request that fails validation; the caller gets RemoteError("bad_request")."""

    code = ErrorCode.BAD_REQUEST


class OverloadedError(P2PError):
    """Raised by a handler whose per-peer or total concurrency budget is spent; the caller gets
    RemoteError("overloaded") and may retry later or ask another peer."""

    code = ErrorCode.OVERLOADED


class ResourceLimitError(P2PError):
    """A reservation would exceed a resource budget (:mod:`dht.peer.resources`); ``scope`` names the one
    ("stream", "connection", "peer", "ip", "system"). The other side gets ``too_large`` when a single
    stream's budget is spent, ``overloaded`` otherwise."""

    def __init__(self, scope: str, message: str):
        super().__init__(message)
        self.scope = scope
        self.code = ErrorCode.TOO_LARGE if scope == "stream" else ErrorCode.OVERLOADED
