"""Many concurrent streams over one FrameChannel, with flow control, deadlines and cancellation.

Frame plaintext: ``type u8 | flags u8 | stream id u32 big-endian | payload``. The dialer of a
connection numbers its streams 1, 3, 5, ...; the listener 2, 4, 6, ...; either side may open streams.

=========  =================================================================================
type       payload / meaning
=========  =================================================================================
OPEN   1   msgpack ``{"m": method (str), "t": timeout in seconds or None}``: a new call
DATA   2   a fragment of one msgpack message; flag MORE (1): the message continues in the
           next DATA frame of this stream; flag END (2): the sender sends nothing after this
END    3   the sender half-closes the stream (nothing more will be sent)
ERROR  4   msgpack ``{"c": code, "m": text}``: the stream failed; both directions are closed
CANCEL 5   the caller abandons the call (deadline passed, task cancelled); the handler is cancelled
WINDOW 6   u32: the receiver consumed that many message bytes; the sender may send as much more
PING   7   8 opaque bytes, answered by PONG 8 with the same bytes (stream id 0; keepalive)
GOAWAY 9   msgpack ``{"m": reason}``: the sender is closing the connection
=========  =================================================================================

ERROR codes are the strings of :class:`~dht.peer.errors.ErrorCode` (or a handler's own short code).

Flow control is per stream and counts whole messages: the receiver announces a window W in the
handshake; a sender may start a message while fewer than W bytes it sent are unconsumed, so at
most W + one message is buffered per stream (messages are capped by ``Limits.max_message_size``).
A slow reader therefore slows its sender down instead of growing memory.

Budgets (:mod:`dht.peer.resources`): every inbound message byte is reserved against the budgets of its
stream, connection, peer, source IP and the whole peer before it is buffered, and given back when the
message is consumed or the stream closes (whatever the reason). Reassembly buffers grow as fragments
arrive, never from an announced size. A message beyond the stream's limit (``max_message_size``, at
most ``stream_memory``, or the method's own ``max_message_size``) fails the stream with ``too_large``;
a spent connection/peer/IP/system budget fails it with ``overloaded``; the connection keeps serving.
Decoded messages are budgeted too: each msgpack object (a container or an element of one) is charged
``OBJECT_COST`` (64) bytes on top of the message's bytes, and decoding stops past the stream's budget
(1 MiB of empty arrays would otherwise become 64 MiB of Python lists); a message of one string or
bin is charged its bytes, one of at most ``SMALL_MESSAGE`` (512) bytes a bound (96 per byte).
An OPEN beyond the inbound stream caps (per connection, per peer over all its connections, per IP,
in total) is answered at once with ERROR ``overloaded``, nothing allocated. Every handler runs under
a server-side deadline: the caller's (cut to ``max_handler_timeout``) or ``default_handler_timeout``.

A DATA frame carries at most ``Limits.max_frame_size`` message bytes, or ``FRAME_SLACK`` (48) more
when that ends the message (so a tensor chunk of exactly ``max_frame_size`` bytes plus its msgpack
header travels as one frame). Long byte strings are framed from the caller's memory, without a
packed copy (:func:`_split_bulk`).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import struct
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import msgpack

from .channel import FrameChannel
from .errors import (
    BadRequestError,
    ConnectionLostError,
    DeadlineExceededError,
    ErrorCode,
    MessageTooLargeError,
    P2PError,
    ProtocolError,
    RemoteError,
    ResourceLimitError,
    StreamClosedError,
)
from .identity import PeerID
from .resources import ResourceManager, StreamScope
from .rpc_stats import MethodStats, RpcStats
from .untrusted import LogLimiter, brief

__all__ = ["Limits", "Stream", "Connection"]

logger = logging.getLogger(__name__)
_remote_log = LogLimiter()  # lines a remote peer can trigger: per peer id / source IP
_bug_log = LogLimiter(rate=1 / 60, burst=3)  # tracebacks of failing handlers: per method

OPEN, DATA, END, ERROR, CANCEL, WINDOW, PING, PONG, GOAWAY = range(1, 10)
FLAG_MORE, FLAG_END = 1, 2
HEADER = struct.Struct("!BBI")
_U32 = struct.Struct("!I")
_BIN32 = b"\xc6"  # msgpack's bin 32 type byte; a u32 length follows
_BULK_BYTES = 64 << 10  # payloads from this size on are framed without joining copies
_timeout_at = getattr(asyncio, "timeout_at", None)
FRAME_SLACK = 48  # message bytes a frame may carry beyond max_frame_size (6-byte header + 48 < 64 of room)


def _split_bulk(message: Any) -> tuple[bytes, memoryview] | None:
    """``(prefix, view)`` whose concatenation is the msgpack encoding of ``message``, if ``message``
    is a long bytes-like value or a small map with exactly one (its other fields short); else None."""
    if isinstance(message, (bytes, bytearray, memoryview)):
        big_key, value, rest = None, message, None
    elif isinstance(message, dict) and 0 < len(message) < 16:
        bulky = [k for k, v in message.items()
                 if isinstance(v, (bytes, bytearray, memoryview)) and len(v) >= _BULK_BYTES]
        if len(bulky) != 1:
            return None
        big_key = bulky[0]
        value, rest = message[big_key], [(k, v) for k, v in message.items() if k != big_key]
    else:
        return None
    try:
        view = memoryview(value).cast("B")
    except TypeError:  # not C-contiguous: let msgpack deal with it (or say why it cannot)
        return None
    if len(view) < _BULK_BYTES or len(view) >= (1 << 32):
        return None
    header = _BIN32 + _U32.pack(len(view))
    if rest is None:
        return header, view
    prefix = bytes([0x80 | len(message)]) + b"".join(_pack(k) + _pack(v) for k, v in rest) + _pack(big_key) + header
    return (prefix, view) if len(prefix) <= FRAME_SLACK else None
MAX_METHOD_NAME = 256


@dataclass
class Limits:
    """Resource limits of a peer (bytes and seconds)."""

    max_message_size: int = 16 << 20  # largest message accepted or sent (at most stream_memory is accepted)
    max_frame_size: int = 1 << 20  # payload bytes per frame; longer messages are split
    stream_window: int = 8 << 20  # bytes buffered per stream before the sender waits
    max_streams_per_connection: int = 1024  # concurrent inbound calls per connection
    max_connections: int = 4096  # inbound connections (handshakes beyond it are refused)
    max_pending_handshakes: int = 256  # unauthenticated sockets in total
    max_pending_handshakes_per_ip: int = 8  # unauthenticated sockets from one source IP
    first_byte_timeout: float = 3.0  # an accepted socket that sends nothing this long is closed
    handshake_timeout: float = 10.0
    max_connections_per_ip: int = 64  # authenticated connections from one source IP (all identities)
    max_connections_per_peer: int = 8  # connections with one PeerID
    max_inbound_streams_per_peer: int = 256  # concurrent inbound calls of one PeerID, all connections
    max_inbound_streams_per_ip: int = 1024  # concurrent inbound calls from one source IP (IPv6: its /64)
    max_inbound_streams: int = 8192  # concurrent inbound calls from all peers together
    stream_memory: int = 16 << 20  # bytes of unfinished/unread inbound messages (decoded ones too) per stream
    connection_memory: int = 32 << 20  # same, per connection (+ buffers a transport reserves on its scope)
    peer_memory: int = 64 << 20  # same, per PeerID (all its connections)
    ip_memory: int = 128 << 20  # same, per source IP (all its identities)
    system_memory: int = 1 << 30  # same, all peers together
    default_handler_timeout: float = 300.0  # server-side deadline of calls whose caller gives none
    max_known_peers: int = 4096  # peers in the address book (LRU; peers neither connected nor routed to are dropped)
    max_handler_timeout: float = 3600.0  # a longer deadline asked for by a caller is cut to this
    dial_timeout: float = 5.0
    keepalive_interval: float = 15.0  # ping when idle this long; close after 3 silent intervals

    def __post_init__(self) -> None:
        if not (1 << 16) <= self.stream_window <= (1 << 34) or not (1 << 16) <= self.max_message_size <= (1 << 34):
            raise ValueError("stream_window and max_message_size must lie in [64 KiB, 16 GiB]")
        if not 1024 <= self.max_frame_size <= (16 << 20):
            raise ValueError("max_frame_size must lie in [1 KiB, 16 MiB]")
        budgets = (self.stream_memory, self.connection_memory, self.peer_memory, self.ip_memory, self.system_memory)
        if min(budgets) < (1 << 16):
            raise ValueError("stream, connection, peer, ip and system memory budgets must be at least 64 KiB")
        streams = (self.max_streams_per_connection, self.max_inbound_streams_per_peer,
                   self.max_inbound_streams_per_ip, self.max_inbound_streams)
        if min(streams) < 1:
            raise ValueError("the inbound stream limits must be at least 1")
        if not 0 < self.default_handler_timeout <= self.max_handler_timeout:
            raise ValueError("default_handler_timeout must lie in (0, max_handler_timeout]")


def _pack(message: Any) -> bytes:
    try:
        return msgpack.packb(message, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as e:
        raise TypeError(f"message cannot be serialized with msgpack: {e}") from None


OBJECT_COST = 64  # bytes reserved per decoded msgpack object (a Python object and its reference)
# a message of at most this many bytes is decoded without counting and charged SMALL_MESSAGE_COST bytes
# per byte: every object takes >= 1 byte (<= 64 bytes of Python object each), every map entry >= 2
# (<= 48 bytes of dict table each), so that bounds what it can decode to
SMALL_MESSAGE, SMALL_MESSAGE_COST = 512, 96
_ONE_STRING = frozenset([*range(0xa0, 0xc0), 0xc4, 0xc5, 0xc6, 0xd9, 0xda, 0xdb])  # fixstr, bin 8-32, str 8-32


class TooManyObjectsError(ValueError):
    """A msgpack message decodes to more objects than its budget allows."""


class _ObjectCount:
    """msgpack hooks counting decoded objects (each container and its elements); past ``limit`` the
    decoding stops (one container is also capped to ``limit`` elements, so the overshoot is bounded).

    A remote peer chooses the shape of what it sends: 1 MiB of empty arrays decodes to 64 MiB of
    Python lists (and takes ~0.4 s), so decoded objects are budgeted, not only received bytes."""

    __slots__ = ("objects", "limit")

    def __init__(self, limit: int):
        self.objects, self.limit = 0, limit

    def array(self, value: list) -> list:
        self.objects += len(value) + 1
        if self.objects > self.limit:
            raise TooManyObjectsError(f"the message decodes to more than {self.limit} objects")
        return value

    def map(self, value: dict) -> dict:
        self.objects += 2 * len(value) + 1
        if self.objects > self.limit:
            raise TooManyObjectsError(f"the message decodes to more than {self.limit} objects")
        return value


def _unpack_counted(data: bytes | bytearray | memoryview, max_objects: int) -> tuple[Any, int]:
    """``(message, objects)``: decode at most ``max_objects`` objects (TooManyObjectsError beyond)."""
    count = _ObjectCount(max_objects)
    limit = max(max_objects, 1)
    try:
        message = msgpack.unpackb(data, raw=False, strict_map_key=False, list_hook=count.array,
                                  object_hook=count.map, max_array_len=limit, max_map_len=limit)
    except ValueError as e:
        if "exceeds max_" in str(e)[:200]:  # one container longer than the whole budget
            raise TooManyObjectsError(f"the message decodes to more than {max_objects} objects") from None
        raise
    return message, count.objects


def _unpack(data: bytes | bytearray | memoryview, max_size: int, max_objects: int = 64) -> Any:
    """Decode a small control message (OPEN, ERROR, GOAWAY): ValueError past ``max_size`` bytes or
    ``max_objects`` objects, before any work."""
    if len(data) > max_size:
        raise ValueError(f"control message of {len(data)} bytes (limit {max_size})")
    if len(data) <= max_objects:  # cannot hold more objects than bytes
        return msgpack.unpackb(data, raw=False, strict_map_key=False)
    return _unpack_counted(data, max_objects)[0]


class Stream:
    """One call: an ordered, bidirectional sequence of msgpack messages.

    ``await send(msg)``, ``await recv()`` (StreamClosedError after the peer's END), ``async for msg
    in stream``, ``await end()`` to half-close, ``cancel()`` to abandon, ``async with`` to make sure
    it is closed. ``peer_id`` and ``method`` say what it is. On the calling side the deadline given
    when it was opened bounds every wait: DeadlineExceededError, and the other side is told.
    """

    def __init__(self, conn: "Connection", stream_id: int, method: str, deadline: float | None, initiator: bool,
                 scope: StreamScope, stats: MethodStats | None = None):
        self._conn = conn
        self._stats = stats  # this method's counters (None: not counted); see dht.peer.rpc_stats
        self._opened = conn.clock()
        self._scope = scope  # the memory of its unread/unfinished inbound messages is reserved here
        self.max_message_size = conn.max_inbound_message  # a handler's P2P registration may lower it
        self.id = stream_id
        self.method = method
        self.deadline = deadline  # loop time, or None
        self.initiator = initiator
        self._inbox: collections.deque[tuple[Any, int, int]] = collections.deque()  # message, bytes, reserved
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._send_lock = asyncio.Lock()
        self._partial: bytearray | None = None
        self._remote_ended = self._local_ended = self._closed = False
        self._error: BaseException | None = None
        self._send_credit = conn.channel.remote_info.window
        self._writable.set()
        self._recv_outstanding = 0
        self._refund = 0

    @property
    def peer_id(self) -> PeerID:
        return self._conn.peer_id

    def _describe(self) -> str:
        return f"{self.method!r} with {self._conn.channel.describe()}"

    # ---- sending ---------------------------------------------------------------------------
    async def send(self, message: Any, *, end: bool = False) -> None:
        """Send one msgpack-serializable message; with ``end=True`` also half-close.

        A long bytes-like message, or a map with one long bytes-like value (a tensor chunk), is framed
        without packing that value into an intermediate copy.
        """
        split = _split_bulk(message)
        if split is not None:
            prefix, view = split
            await self.send_packed(view, end=end, prefix=prefix)
        else:
            await self.send_packed(_pack(message), end=end)

    async def send_packed(self, payload: bytes | bytearray | memoryview, *, end: bool = False,
                          prefix: bytes = b"") -> None:
        """Send a message that is already msgpack-encoded (avoids packing twice when broadcasting).

        The message is ``prefix || payload``; a prefix (at most ``FRAME_SLACK`` bytes, e.g. a msgpack
        header) rides in the first frame. A frame carries up to ``max_frame_size`` bytes of the
        message, or ``FRAME_SLACK`` more when that makes it the last one (the frame header room of
        the transport covers it), so a chunk of exactly ``max_frame_size`` data bytes plus its
        msgpack header is one frame, which the receiver parses without reassembling.
        """
        total = len(prefix) + len(payload)
        limit = min(self._conn.limits.max_message_size, self._conn.channel.remote_info.max_message_size)
        if total > limit:
            raise MessageTooLargeError(f"message of {total} bytes for {self._describe()} exceeds the "
                                       f"limit of {limit} bytes; send large tensors in chunks")
        if len(prefix) > FRAME_SLACK:
            raise ValueError(f"a message prefix is at most {FRAME_SLACK} bytes")
        async with self._send_lock:
            self._check_can_send()
            while self._send_credit <= 0:
                self._writable.clear()
                await self._wait(self._writable)
                self._check_can_send()
            frame_size = self._conn.limits.max_frame_size
            view = memoryview(payload)
            offset = 0
            head = prefix
            while True:
                last = len(view) - offset + len(head) <= frame_size + FRAME_SLACK
                take = len(view) - offset if last else frame_size - len(head)
                flags = (0 if last else FLAG_MORE) | (FLAG_END if last and end else 0)
                self._conn.write_frame(DATA, flags, self.id, view[offset:offset + take], head)
                offset += take
                head = b""
                if last:
                    break
                await self._conn.drain()
                self._check_can_send()
            self._send_credit -= total
            if self._stats is not None:
                self._stats.bytes_sent += total
            if end:
                self._local_ended = True
                self._maybe_release()
        await self._conn.drain()

    async def end(self) -> None:
        """Half-close: tell the other side that nothing more will be sent (idempotent)."""
        if self._local_ended or self._closed:
            return
        async with self._send_lock:
            if not (self._local_ended or self._closed):
                self._conn.write_frame(END, 0, self.id)
                self._local_ended = True
                self._maybe_release()

    def _check_can_send(self) -> None:
        if self._error is not None:
            raise self._error
        if self._local_ended or self._closed:
            raise StreamClosedError(f"stream {self._describe()} was already ended")

    # ---- receiving -------------------------------------------------------------------------
    async def recv(self) -> Any:
        """The next message; StreamClosedError when the other side ended the stream."""
        while True:
            if self._inbox:
                message, size, reserved = self._inbox.popleft()
                self._scope.release(reserved)
                self._give_credit(size)
                return message
            if self._error is not None:
                raise self._error
            if self._remote_ended:
                raise StreamClosedError(f"stream {self._describe()} was ended by the other side")
            self._readable.clear()
            await self._wait(self._readable)

    def __aiter__(self) -> "Stream":
        return self

    async def __anext__(self) -> Any:
        try:
            return await self.recv()
        except StreamClosedError:
            if self._error is None:
                raise StopAsyncIteration from None
            raise

    def _give_credit(self, size: int) -> None:
        if self._remote_ended or self._closed:
            return  # the other side sends nothing more: no need for credit
        self._refund += size
        if self._refund >= self._conn.limits.stream_window // 4:
            self._recv_outstanding -= self._refund
            try:
                self._conn.write_frame(WINDOW, 0, self.id, _U32.pack(self._refund))
            except ConnectionLostError:  # the connection is gone: nothing more to tell the peer
                pass
            self._refund = 0

    # ---- lifetime --------------------------------------------------------------------------
    async def _wait(self, event: asyncio.Event) -> None:
        if self.deadline is None or not self.initiator:
            await event.wait()
            return
        remaining = self.deadline - asyncio.get_running_loop().time()
        try:
            if remaining <= 0:
                raise asyncio.TimeoutError
            if _timeout_at is not None:  # Python >= 3.11: no extra task per wait
                async with _timeout_at(self.deadline):
                    await event.wait()
            else:
                await asyncio.wait_for(event.wait(), remaining)
        except asyncio.TimeoutError:
            error = DeadlineExceededError(f"call {self._describe()} exceeded its deadline")
            self.cancel(error)
            raise (self._error or error) from None

    def cancel(self, error: BaseException | None = None) -> None:
        """Abandon the stream: the other side is told (CANCEL or ERROR) and local waiters fail."""
        if self._closed:
            return
        if error is None:
            error = StreamClosedError(f"stream {self._describe()} was cancelled")
        try:
            if self.initiator:
                self._conn.write_frame(CANCEL, 0, self.id)
            else:
                self._conn.write_frame(ERROR, 0, self.id, _pack({"c": ErrorCode.CANCELLED, "m": str(error)[:1000]}))
        except ConnectionLostError:  # the connection is gone: nothing more to tell the peer
            pass
        self._fail(error)

    def fail_remote(self, code: str, text: str) -> None:
        """Send ERROR(code, text) to the other side and close the stream."""
        if self._closed:
            return
        try:
            self._conn.write_frame(ERROR, 0, self.id, _pack({"c": code, "m": text[:4000]}))
        except ConnectionLostError:  # the connection is gone: nothing more to tell the peer
            pass
        self._fail(StreamClosedError(f"stream {self._describe()} failed: {code}: {text[:200]}"))

    @property
    def done(self) -> bool:
        return self._closed

    async def aclose(self) -> None:
        """Close: cancels the stream unless both sides already ended it cleanly."""
        if not self._closed:
            if self._local_ended and self._remote_ended:
                self._release()
            else:
                self.cancel()

    async def __aenter__(self) -> "Stream":
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.aclose()

    def _fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        self._readable.set()
        self._writable.set()
        self._release()

    def _maybe_release(self) -> None:
        if self._local_ended and self._remote_ended:
            self._release()

    def _release(self) -> None:
        if not self._closed:
            self._closed = True
            self._partial = None
            if self._stats is not None:
                self._stats.observe(self._conn.clock() - self._opened, self._error is not None)
            if self.initiator:
                self._scope.close()
            else:  # the inbound stream slot is held until the handler returns (Connection._serve)
                self._scope.release_memory()
            self._conn._forget(self)

    # ---- frames from the connection ------------------------------------------------------
    def _on_data(self, payload: memoryview, flags: int) -> None:
        if self._remote_ended:
            return self._violation("DATA after END")
        size = len(payload)
        self._recv_outstanding += size
        if self._stats is not None:
            self._stats.bytes_received += size
        limits = self._conn.limits
        if self._recv_outstanding > limits.stream_window + limits.max_message_size + limits.max_frame_size:
            return self._violation("sent past its flow-control window")
        partial = self._partial
        if (0 if partial is None else len(partial)) + size > self.max_message_size:
            return self._refuse(ErrorCode.TOO_LARGE, f"message exceeds the limit of {self.max_message_size} bytes")
        if partial is None and not flags & FLAG_MORE and size <= SMALL_MESSAGE:
            return self._on_small_message(payload, flags)
        try:
            self._scope.reserve(size)  # before the bytes are kept: given back by recv() or when closed
        except ResourceLimitError as e:
            return self._refuse(e.code, str(e))
        if partial is None and not flags & FLAG_MORE:
            data: bytes | bytearray | memoryview = payload
        else:
            if partial is None:
                partial = self._partial = bytearray()  # grows as fragments arrive
            partial += payload
            if flags & FLAG_MORE:
                return
            data, self._partial = partial, None
        n = len(data)
        try:  # the decoded objects are budgeted too: what the stream may still reserve bounds them
            if n and data[0] in _ONE_STRING:  # one str or bin (e.g. a tensor chunk): its bytes, counted
                message, extra = msgpack.unpackb(data, raw=False), 0
            elif n <= SMALL_MESSAGE:  # reassembled from small fragments
                message, extra = msgpack.unpackb(data, raw=False, strict_map_key=False), n * (SMALL_MESSAGE_COST - 1)
            else:
                message, objects = _unpack_counted(data, self._scope.available // OBJECT_COST)
                extra = objects * OBJECT_COST
        except TooManyObjectsError as e:
            return self._refuse(ErrorCode.TOO_LARGE, str(e))
        except Exception as e:  # noqa: BLE001 - any decoding failure is the sender's: told, stream failed
            self.fail_remote(ErrorCode.BAD_REQUEST, f"malformed msgpack message ({type(e).__name__})")
            self._error = ProtocolError(f"{self._describe()}: the peer sent a malformed message")
            return
        if extra:
            try:
                self._scope.reserve(extra)
            except ResourceLimitError as e:
                return self._refuse(e.code, str(e))
        self._inbox.append((message, n, n + extra))
        if flags & FLAG_END:
            self._remote_ended = True
            self._maybe_release()
        self._readable.set()

    def _on_small_message(self, payload: memoryview, flags: int) -> None:
        """A whole message of at most SMALL_MESSAGE bytes in one frame (most calls): decoded, then its
        bound (SMALL_MESSAGE_COST per byte) reserved in one go."""
        n = len(payload)
        try:
            message = msgpack.unpackb(payload, raw=False, strict_map_key=False)
        except Exception as e:  # noqa: BLE001 - any decoding failure is the sender's: told, stream failed
            self.fail_remote(ErrorCode.BAD_REQUEST, f"malformed msgpack message ({type(e).__name__})")
            self._error = ProtocolError(f"{self._describe()}: the peer sent a malformed message")
            return
        reserved = n if n <= 1 or payload[0] in _ONE_STRING else n * SMALL_MESSAGE_COST
        try:
            self._scope.reserve(reserved)
        except ResourceLimitError as e:
            return self._refuse(e.code, str(e))
        self._inbox.append((message, n, reserved))
        if flags & FLAG_END:
            self._remote_ended = True
            self._maybe_release()
        self._readable.set()

    def _on_end(self) -> None:
        self._remote_ended = True
        self._readable.set()
        self._maybe_release()

    def _on_window(self, increment: int) -> None:
        self._send_credit += increment
        if self._send_credit > 0:
            self._writable.set()

    def _refuse(self, code: str, text: str) -> None:
        """An inbound message over a limit or budget: fail the stream (the connection goes on)."""
        self.fail_remote(code, text)
        if not self.initiator:  # its handler cannot reply any more: stop it (as an ERROR from the caller does)
            task = self._conn._handlers.get(self.id)
            if task is not None:
                task.cancel()
        if code == ErrorCode.TOO_LARGE:
            self._error = MessageTooLargeError(f"{self._describe()}: {text}")
        else:
            self._error = RemoteError(code, f"{self._describe()}: refused here: {text}")

    def _violation(self, what: str) -> None:
        self.fail_remote(ErrorCode.PROTOCOL, what)
        self._error = ProtocolError(f"{self._describe()}: the peer {what}")


Dispatcher = Callable[[Stream], Callable[[], Awaitable[None]]]


class Connection:
    """Streams multiplexed over one authenticated FrameChannel.

    ``dispatch(stream)`` is called for each stream the other side opens and returns a function that
    makes the coroutine serving it (LookupError for an unknown method); ``on_close(connection)`` runs
    when the connection stops taking new calls (GOAWAY received) and when it closes. ``resources`` is
    the peer's :class:`~dht.peer.resources.ResourceManager` (shared by its connections; a private one if
    None); ``scope`` is this connection's budget in it. ``stats``: the peer's per-method counters
    (:class:`~dht.peer.rpc_stats.RpcStats`; None: nothing counted).
    """

    def __init__(self, channel: FrameChannel, limits: Limits, initiator: bool,
                 dispatch: Dispatcher, on_close: Callable[["Connection"], None],
                 resources: ResourceManager | None = None, stats: RpcStats | None = None):
        self.channel = channel
        self.stats = stats
        self.clock = asyncio.get_running_loop().time
        self.peer_id = channel.remote_peer_id
        self.limits = limits
        self.resources = resources if resources is not None else ResourceManager(limits)
        self.max_inbound_message = min(limits.max_message_size, limits.stream_memory)  # per stream, by default
        self.scope = self.resources.open_connection(self.peer_id, getattr(channel, "remote_host", None),
                                                    channel.endpoint)
        self._dispatch = dispatch
        self._on_close = on_close
        self._streams: dict[int, Stream] = {}
        self._handlers: dict[int, asyncio.Task] = {}
        self._next_id = 1 if initiator else 2
        # calls this side opens wait (P2P.open_stream) while the other side would refuse them as too many
        self.max_outbound_streams = min(limits.max_inbound_streams_per_peer, limits.max_streams_per_connection)
        self._outbound_open = 0
        self._slot_waiters: collections.deque[asyncio.Future] = collections.deque()
        self.closed = False
        self.close_reason = ""
        self._remote_goaway: str | None = None
        loop = asyncio.get_running_loop()
        self._last_recv = loop.time()
        self._reader = loop.create_task(self._read_loop())
        self._keepalive = loop.create_task(self._keepalive_loop())

    @property
    def usable(self) -> bool:
        """True if new calls may be opened on this connection."""
        return not self.closed and self._remote_goaway is None

    @property
    def num_streams(self) -> int:
        return len(self._streams)

    @property
    def stream_slot_free(self) -> bool:
        """True if a call opened now would not exceed ``max_outbound_streams`` (and nobody waits)."""
        return self._outbound_open < self.max_outbound_streams and not self._slot_waiters

    async def wait_for_stream_slot(self, deadline: float | None) -> None:
        """Wait until fewer than ``max_outbound_streams`` calls this side opened are open here (the
        other side refuses more from one peer), at most until ``deadline`` (loop time):
        DeadlineExceededError past it. Returns at once if the connection closes (opening then fails)."""
        loop = asyncio.get_running_loop()
        first = True
        while self.usable and (self._outbound_open >= self.max_outbound_streams or (first and self._slot_waiters)):
            waiter = loop.create_future()
            if first:
                self._slot_waiters.append(waiter)
            else:  # woken but beaten to the slot: keep the place in the queue
                self._slot_waiters.appendleft(waiter)
            first = False
            try:
                if deadline is None:
                    await waiter
                else:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        raise asyncio.TimeoutError
                    await asyncio.wait_for(waiter, remaining)
            except asyncio.TimeoutError:
                raise DeadlineExceededError(f"no call slot to {self.channel.describe()} became free before the "
                                            f"deadline ({self.max_outbound_streams} calls in flight)") from None
            finally:
                try:
                    self._slot_waiters.remove(waiter)
                except ValueError:  # a wake-up took it off the queue already
                    pass
                if not waiter.done():
                    waiter.cancel()
                self._wake_slot_waiter()  # pass on a wake-up this waiter may not use

    def _wake_slot_waiter(self) -> None:
        if self._outbound_open < self.max_outbound_streams or not self.usable:
            for waiter in self._slot_waiters:
                if not waiter.done():
                    waiter.set_result(None)
                    return

    def write_frame(self, ftype: int, flags: int, stream_id: int, payload: bytes | memoryview = b"",
                    prefix: bytes = b"") -> None:
        """Queue one frame whose payload is ``prefix || payload``."""
        if self.closed:
            raise ConnectionLostError(f"connection to {self.channel.describe()} is closed: {self.close_reason}")
        if len(payload) >= _BULK_BYTES:  # no joined copy of a long payload: the channel seals the pieces
            self.channel.write_frame(payload, HEADER.pack(ftype, flags, stream_id) + prefix)
        else:
            self.channel.write_frame(HEADER.pack(ftype, flags, stream_id) + prefix + payload)

    async def drain(self) -> None:
        if self.closed:
            raise ConnectionLostError(f"connection to {self.channel.describe()} is closed: {self.close_reason}")
        await self.channel.drain()

    def open_stream(self, method: str, timeout: float | None) -> Stream:
        """Start a call of ``method``; ``timeout`` (seconds) bounds it here and at the other side."""
        if not self.usable:
            raise ConnectionLostError(f"connection to {self.channel.describe()} is closing: "
                                      f"{self.close_reason or self._remote_goaway}")
        stream_id, self._next_id = self._next_id, self._next_id + 2
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        stream = Stream(self, stream_id, method, deadline, initiator=True,
                        scope=self.scope.open_stream(inbound=False),
                        stats=None if self.stats is None else self.stats.entry(method, False))
        self._streams[stream_id] = stream
        self._outbound_open += 1
        self.write_frame(OPEN, 0, stream_id, _pack({"m": method, "t": timeout}))
        return stream

    def _forget(self, stream: Stream) -> None:
        if self._streams.pop(stream.id, None) is not None and stream.initiator:
            self._outbound_open -= 1
            if self._slot_waiters:
                self._wake_slot_waiter()

    # ---- reading ---------------------------------------------------------------------------
    async def _read_loop(self) -> None:
        reason = "closed"
        loop = asyncio.get_running_loop()
        try:
            while True:
                frame = await self.channel.read_frame()
                self._last_recv = loop.time()
                if len(frame) < HEADER.size:
                    raise ProtocolError(f"{self.channel.describe()} sent a truncated frame")
                ftype, flags, stream_id = HEADER.unpack_from(frame)
                payload = memoryview(frame)[HEADER.size:]
                if ftype == DATA:
                    stream = self._streams.get(stream_id)
                    if stream is not None:
                        stream._on_data(payload, flags)
                elif ftype == OPEN:
                    self._on_open(stream_id, payload)
                elif ftype == WINDOW:
                    stream = self._streams.get(stream_id)
                    if stream is not None and len(payload) == 4:
                        stream._on_window(_U32.unpack(payload)[0])
                elif ftype == END:
                    stream = self._streams.get(stream_id)
                    if stream is not None:
                        stream._on_end()
                elif ftype == ERROR:
                    self._on_error(stream_id, payload)
                elif ftype == CANCEL:
                    self._on_cancel(stream_id)
                elif ftype == PING:
                    self.write_frame(PONG, 0, 0, payload[:8])
                elif ftype == PONG:
                    pass
                elif ftype == GOAWAY:
                    self._remote_goaway = _goaway_reason(payload)
                    self._on_close(self)  # take it out of the pool at once; streams in flight go on
                else:
                    raise ProtocolError(f"{self.channel.describe()} sent an unknown frame type {ftype}")
        except ConnectionLostError as e:
            reason = f"closed by the peer ({self._remote_goaway})" if self._remote_goaway else str(e)
        except ProtocolError as e:
            reason = str(e)[:500]
            _remote_log.log(logger, logging.WARNING, self.scope.ip, "closing connection: %s", reason)
        except asyncio.CancelledError:
            reason = self.close_reason or "closed"
        except Exception as e:  # a bug in a frame handler must not leave the connection half-alive
            if _bug_log.allow("read_loop")[0]:
                logger.exception("connection to %s failed", self.channel.describe())
            reason = f"internal error: {_error_text(e)}"
        self._shutdown(reason, send_goaway=False)

    def _on_open(self, stream_id: int, payload: memoryview) -> None:
        if stream_id % 2 == self._next_id % 2 or stream_id == 0 or stream_id in self._streams:
            raise ProtocolError(f"{self.channel.describe()} opened stream {stream_id}, which is not its to open")
        try:
            header = _unpack(payload, 4096)
            method, timeout = header["m"], header.get("t")
            if not isinstance(method, str) or not 0 < len(method) <= MAX_METHOD_NAME:
                raise ValueError("bad method name")
            if timeout is not None and (not isinstance(timeout, (int, float)) or not 0 < timeout < 1e7):
                raise ValueError("bad timeout")
        except Exception:  # noqa: BLE001 - any malformed OPEN is the caller's: answered bad_request
            self.write_frame(ERROR, 0, stream_id, _pack({"c": ErrorCode.BAD_REQUEST, "m": "malformed OPEN frame"}))
            return
        if self._remote_goaway is not None or self.closed:
            return
        try:  # the per-connection, per-peer (all its connections), per-IP and total caps
            scope = self.scope.open_stream(inbound=True)
        except ResourceLimitError as e:
            self.write_frame(ERROR, 0, stream_id, _pack({"c": ErrorCode.OVERLOADED, "m": str(e)[:200]}))
            return
        loop = asyncio.get_running_loop()
        limits = self.limits
        timeout = min(limits.default_handler_timeout if timeout is None else timeout, limits.max_handler_timeout)
        stream = Stream(self, stream_id, method, loop.time() + timeout, initiator=False, scope=scope)
        try:
            serve = self._dispatch(stream)
        except LookupError:
            scope.close()
            if self.stats is not None:
                self.stats.unknown_call(len(payload))
            self.write_frame(ERROR, 0, stream_id,
                             _pack({"c": ErrorCode.UNKNOWN_METHOD, "m": f"unknown method {method!r}"}))
            return
        if self.stats is not None:  # (a method this peer serves: a bounded label)
            stream._stats = self.stats.entry(method, True)
        self._streams[stream_id] = stream
        task = self._handlers[stream_id] = loop.create_task(self._serve(stream, serve, timeout))
        # also when the task is cancelled before it starts (then _serve's finally never runs)
        task.add_done_callback(functools.partial(self._handler_done, stream))

    def _handler_done(self, stream: Stream, task: asyncio.Task) -> None:
        if self._handlers.get(stream.id) is task:
            del self._handlers[stream.id]
        if not stream.done:
            stream.fail_remote(ErrorCode.CANCELLED, "the handler was cancelled")
        stream._scope.close()  # the inbound stream slot and any memory left

    async def _serve(self, stream: Stream, serve: Callable[[], Awaitable[None]], timeout: float) -> None:
        """Run a handler under its server-side deadline; its failures go back to the caller as ERROR
        codes with bounded texts. Remote mistakes (bad_request, ValueError/TypeError/KeyError) log at
        most a rate-limited line per peer; other exceptions a rate-limited traceback per method."""
        deadline = stream.deadline
        assert deadline is not None  # inbound streams always have one (_on_open)
        try:
            coro = serve()
            if _timeout_at is not None:
                async with _timeout_at(deadline):
                    await coro
            else:
                await asyncio.wait_for(coro, max(deadline - asyncio.get_running_loop().time(), 0.0))
            if not stream.done and stream._error is None:
                await stream.end()
        except asyncio.TimeoutError:
            if asyncio.get_running_loop().time() >= deadline:
                stream.fail_remote(ErrorCode.DEADLINE, f"the call exceeded its deadline of {timeout:.3g} s")
            else:
                stream.fail_remote(ErrorCode.HANDLER_ERROR, "TimeoutError inside the handler")
        except asyncio.CancelledError:
            stream.fail_remote(ErrorCode.CANCELLED, "the handler was cancelled")  # no-op if the caller cancelled
        except BadRequestError as e:
            text = _error_text(e)
            stream.fail_remote(ErrorCode.BAD_REQUEST, text)
            _remote_log.log(logger, logging.INFO, self.peer_id, "bad request to %s from %s: %s",
                            brief(stream.method), self.channel.describe(), text)
        except P2PError as e:
            code = getattr(e, "code", None)
            stream.fail_remote(code[:64] if isinstance(code, str) else ErrorCode.HANDLER_ERROR, _error_text(e))
        except (ValueError, TypeError, KeyError) as e:  # most likely input the handler did not expect
            text = _error_text(e)
            stream.fail_remote(ErrorCode.HANDLER_ERROR, text)
            _remote_log.log(logger, logging.WARNING, self.peer_id, "handler of %s failed for %s: %s",
                            brief(stream.method), self.channel.describe(), text)
        except Exception as e:
            text = _error_text(e)
            stream.fail_remote(ErrorCode.HANDLER_ERROR, text)
            allowed, suppressed = _bug_log.allow(stream.method)
            if allowed:
                logger.exception("handler of %s failed for %s%s", brief(stream.method), self.channel.describe(),
                                 f" ({suppressed} similar failures not logged)" if suppressed else "")
        finally:
            if not stream.done and stream._local_ended:
                stream._release()  # the reply is complete; ignore whatever the caller still sends

    def _on_error(self, stream_id: int, payload: memoryview) -> None:
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        try:
            body = _unpack(payload, 65536)
            code, text = body["c"], body["m"]
            code = code[:64] if isinstance(code, str) else ErrorCode.PROTOCOL
            text = text[:1000] if isinstance(text, str) else brief(text)
        except Exception:  # noqa: BLE001 - whatever the peer sent instead: the call fails with "protocol"
            code, text = ErrorCode.PROTOCOL, "malformed ERROR frame"
        where = f"{stream.method!r} on {self.channel.describe()}"
        if code == ErrorCode.DEADLINE:
            error: BaseException = DeadlineExceededError(f"{where}: {text}")
        elif code == ErrorCode.TOO_LARGE:
            error = MessageTooLargeError(f"{where}: {text}")
        else:
            error = RemoteError(code, f"{where} failed: {code}: {text}")
        stream._fail(error)
        task = self._handlers.get(stream_id)
        if task is not None:
            task.cancel()

    def _on_cancel(self, stream_id: int) -> None:
        stream = self._streams.get(stream_id)
        task = self._handlers.pop(stream_id, None)
        if stream is not None:
            stream._fail(StreamClosedError(f"call {stream.method!r} was cancelled by {self.channel.describe()}"))
        if task is not None:
            task.cancel()

    async def _keepalive_loop(self) -> None:
        interval = self.limits.keepalive_interval
        loop = asyncio.get_running_loop()
        try:
            while not self.closed:
                await asyncio.sleep(interval)
                idle = loop.time() - self._last_recv
                if idle > 3 * interval:
                    self._shutdown(f"no traffic from the peer for {idle:.0f} s", send_goaway=False)
                elif idle >= interval:
                    self.write_frame(PING, 0, 0, b"\0" * 8)
        except (ConnectionLostError, asyncio.CancelledError):  # closed: the keepalive ends with the connection
            pass

    # ---- closing ---------------------------------------------------------------------------
    def close(self, reason: str = "closed") -> None:
        """Close now: the peer is told why (GOAWAY); calls in flight fail with ConnectionLostError."""
        self._shutdown(reason, send_goaway=True)

    def _shutdown(self, reason: str, send_goaway: bool) -> None:
        if self.closed:
            return
        if send_goaway:
            try:
                self.write_frame(GOAWAY, 0, 0, _pack({"m": reason[:500]}))
            except ConnectionLostError:  # the connection is gone: nothing more to tell the peer
                pass
        self.closed = True
        self.close_reason = reason
        error = ConnectionLostError(f"connection to {self.channel.describe()} lost: {reason}")
        for stream in list(self._streams.values()):
            stream._fail(error)
        for task in list(self._handlers.values()):
            task.cancel()
        self._handlers.clear()
        self.scope.close()  # every reservation of the connection and its streams is given back
        for waiter in self._slot_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self.channel.close()
        current = asyncio.current_task()
        for task in (self._reader, self._keepalive):
            if task is not current:
                task.cancel()
        self._on_close(self)

    async def wait_closed(self) -> None:
        await asyncio.gather(self._reader, self._keepalive, return_exceptions=True)
        await self.channel.wait_closed()


def _goaway_reason(payload: memoryview) -> str:
    try:
        reason = _unpack(payload, 4096)["m"]
        return reason[:500] if isinstance(reason, str) else brief(reason)
    except Exception:  # noqa: BLE001 - a malformed GOAWAY still closes the connection, with a generic reason
        return "going away"


def _error_text(e: BaseException) -> str:
    """``"TypeName: message"`` of an exception, bounded (about 1,000 characters), without calling
    ``str()`` on arguments that are not strings (they may be untrusted values)."""
    name = type(e).__name__[:60]
    try:
        args = e.args
        if len(args) == 1 and isinstance(args[0], str):
            detail = args[0][:1000]
        else:
            detail = ", ".join(brief(a) for a in args[:4])
    except Exception:  # noqa: BLE001 - an exotic exception's args: the type name alone says enough
        detail = ""
    return f"{name}: {detail}" if detail else name
