"""The secure handshake and the encrypted frame format of the TCP transport.

The handshake's logic is the sans-IO :mod:`dht.peer.handshake_state` (bytes in, bytes and an
outcome out); this module drives it over asyncio streams (:func:`initiate`, :func:`respond`,
:func:`refuse_busy`) and encrypts the session's frames (:class:`SecureChannel`).

Handshake (protocol version 1; the message flow of Noise XX, ``-> e; <- e, ee, s, es; -> s, se``,
with Ed25519 signatures over the transcript in place of static-DH authentication, as in SIGMA-I
and the libp2p Noise handshake's identity payload)::

    M1  I -> R  plain  {"p": "swarm-p2p", "versions": [1, ...], "ciphers": [...], "e": X25519 ephemeral}
    M2  R -> I  plain  {"version": v, "cipher": c, "e": X25519 ephemeral}
                       or {"error": "...", "versions": [...]} and close, if no version is shared
                       or {"error": "...", "busy": true, "versions": [...]} and close, if too many
                          handshakes from the initiator's IP are pending (it may retry shortly)
        both:  h = SHA-256(M1 || M2)        (the raw bytes of both messages)
               k_ir || k_ri = HKDF-SHA256(X25519(e_I, e_R), salt=h, info="swarm-p2p/1 keys", 64 bytes)
    M3  R -> I  AEAD(k_ri)  {"pub": Ed25519 key, "sig": Sign("swarm-p2p/1 responder" || h), "info": {...}}
    M4  I -> R  AEAD(k_ir)  {"pub": Ed25519 key, "sig": Sign("swarm-p2p/1 initiator" || h), "info": {...}}

Each side checks the other's signature over the transcript hash, which binds both ephemeral keys,
so a man in the middle cannot splice two sessions and a recorded handshake cannot be replayed;
the keys are ephemeral, so recorded traffic stays secret if an identity key leaks later (forward
secrecy), and identities travel encrypted. A dialer that expected PeerID X aborts unless the
responder's key hashes to X. ``info`` carries the peer's announced listen addresses and its
receive limits (per-stream window, largest message).

Handshake frames are ``u32 big-endian length || msgpack map`` (at most 4 KiB each, lists and maps
nested at most 4 deep; anything else is refused before any field is looked at). After the
handshake every frame is ``u32 big-endian L || AEAD ciphertext (L bytes, tag included)``, with the
4 length bytes as associated data and a 96-bit nonce ``0x00000000 || u64 little-endian counter``
that starts at 0 in each direction (M3 and M4 use nonce 0 of their direction). The plaintext of a
frame is the multiplexer's ``type u8 | flags u8 | stream id u32 | payload`` (:mod:`dht.peer.multiplex`).
"""

from __future__ import annotations

import asyncio
import collections
import struct
import time
from typing import Any, cast

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from .channel import FrameChannel, PeerInfo
from .errors import ConnectionLostError, HandshakeError, ProtocolError
from .handshake_state import (
    CIPHERS,
    MAX_HANDSHAKE_FRAME,
    PROTOCOL_NAME,
    SUPPORTED_VERSIONS,
    TAG_SIZE,
    HandshakeResult,
    InitiatorHandshake,
    PeerBusyError,
    ResponderHandshake,
    busy_reply,
)
from .handshake_state import nonce as _nonce
from .identity import Identity, PeerID

__all__ = ["PROTOCOL_NAME", "SUPPORTED_VERSIONS", "CIPHERS", "MAX_HANDSHAKE_FRAME", "PeerInfo", "PeerBusyError",
           "SecureChannel", "initiate", "respond", "refuse_busy", "observed_host", "within"]

FRAME_HEADER_ROOM = 64  # room for the multiplexer's frame header beyond max_frame_size
_LEN = struct.Struct("!I")
_READ_LIMIT = 4 << 20  # decrypted bytes waiting for the multiplexer before reading pauses
_timeout = getattr(asyncio, "timeout", None)  # Python >= 3.11
_BULK = 64 << 10  # frames at least this long are sealed without joining head and data, into a reused buffer


class _FrameCipher:
    """One direction's AEAD key: ``decrypt`` as the AEAD's, and :meth:`seal_into`."""

    def __init__(self, name: str, key: bytes):
        self.name, self._key, self._aead = name, key, CIPHERS[name](key)
        self.decrypt = self._aead.decrypt

    def seal_into(self, nonce: bytes, head: bytes, data: bytes | bytearray | memoryview, aad: bytes,
                  out: memoryview) -> None:
        """Write AEAD(head || data) and its tag into ``out`` (exactly len(head) + len(data) + 16 bytes).

        For AES-GCM and long data, the incremental GCM context encrypts both pieces in place of a
        joined copy (same ciphertext and tag as the one-shot AEAD); otherwise they are joined.
        """
        if self.name != "aes256gcm" or len(data) < _BULK:
            self._aead.encrypt_into(nonce, bytes(head) + bytes(data) if head else data, aad, out)
            return
        context = Cipher(algorithms.AES(self._key), modes.GCM(nonce)).encryptor()
        context.authenticate_additional_data(aad)
        # update_into wants len(input) + 15 bytes of room: the tag's 16 bytes after the data give it
        written = context.update_into(head, out) if head else 0
        written += context.update_into(data, out[written:])
        context.finalize()
        out[written:written + TAG_SIZE] = context.tag


class _FrameReader(asyncio.BufferedProtocol):
    """Receives the encrypted frames of a SecureChannel: the transport reads straight into one buffer
    and each complete frame is decrypted from there (the StreamReader it replaces after the
    handshake copied every byte twice). Writing keeps going through the StreamWriter: flow-control
    and connection-lost callbacks are passed on to the protocol that served it."""

    _INITIAL = 16 << 10  # buffer bytes of a connection without recent large frames
    _SHRINK_AFTER = 2.0  # seconds without a large frame after which a grown buffer is given back

    def __init__(self, channel: "SecureChannel", transport: asyncio.Transport, previous: Any,
                 leftover: bytes):
        self._channel, self._transport, self._previous = channel, transport, previous
        self._buf = bytearray(max(self._INITIAL, 2 * len(leftover)))
        self._view = memoryview(self._buf)
        self._buf[:len(leftover)] = leftover
        self._start, self._end = 0, len(leftover)  # unparsed bytes: buf[start:end]
        self._need = 4  # bytes the frame at start takes (4 until its length is known)
        self._frames: collections.deque[bytes] = collections.deque()
        self._queued = 0
        self._paused = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future | None = None
        self._last_large = 0.0  # time.monotonic() of the last frame that did not fit the initial buffer

    # ---- the transport's side ------------------------------------------------------------
    def get_buffer(self, sizehint: int) -> memoryview:
        size = len(self._buf)
        if self._end == size or (self._start > 0 and self._start + self._need > size):
            self._make_room()
        return self._view[self._end:]

    def _make_room(self) -> None:
        """Move the unparsed bytes to the front, doubling the buffer first when they fill more than
        half of it (up to room for two of the largest frames). The buffer grows with the bytes that
        arrived, never with the length a frame announces: a peer that announces a 1 MiB frame and
        sends 4 bytes costs nothing, and the buffer stays within max(16 KiB, 4 x bytes received)."""
        pending = self._end - self._start
        size = len(self._buf)
        if pending > size // 2:
            size = min(2 * size, 2 * (self._channel._max_ciphertext + 4))
        if size != len(self._buf):
            buf = bytearray(size)
            buf[:pending] = self._view[self._start:self._end]
            self._view.release()
            self._buf, self._view = buf, memoryview(buf)
        else:
            self._view[:pending] = self._view[self._start:self._end]
        self._start, self._end = 0, pending

    def buffer_updated(self, nbytes: int) -> None:
        self._end += nbytes
        channel = self._channel
        try:
            while self._end - self._start >= 4:
                (n,) = _LEN.unpack_from(self._buf, self._start)
                if not TAG_SIZE <= n <= channel._max_ciphertext:
                    raise ProtocolError(f"{channel.describe()} sent a frame of {n} bytes "
                                        f"(limit {channel._max_ciphertext})")
                self._need = 4 + n
                if self._end - self._start < self._need:
                    break
                start = self._start
                plaintext = channel._open(self._view[start + 4:start + 4 + n], bytes(self._view[start:start + 4]))
                self._frames.append(plaintext)
                self._queued += len(plaintext)
                self._start += 4 + n
                self._need = 4
                if n > self._INITIAL // 2:
                    self._last_large = time.monotonic()
        except ProtocolError as e:
            self._error = e
            self._transport.close()
        if self._start == self._end:
            self._start = self._end = 0
            if len(self._buf) > self._INITIAL and time.monotonic() - self._last_large > self._SHRINK_AFTER:
                self._view.release()  # bulk traffic is over: keep idle connections small
                self._buf = bytearray(self._INITIAL)
                self._view = memoryview(self._buf)
        if self._queued > _READ_LIMIT and not self._paused and self._error is None:
            self._paused = True
            self._transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        if self._error is None:
            self._error = ConnectionLostError(f"connection to {self._channel.describe()} closed by the peer")
        self._wake()
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        if self._error is None:
            cause = f" ({type(exc).__name__})" if exc is not None else ""
            self._error = ConnectionLostError(f"connection to {self._channel.describe()} closed{cause}")
        self._wake()
        self._previous.connection_lost(exc)  # the StreamWriter's drain() and wait_closed() rely on it

    def pause_writing(self) -> None:
        self._previous.pause_writing()

    def resume_writing(self) -> None:
        self._previous.resume_writing()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # ---- the channel's side --------------------------------------------------------------
    async def read(self) -> bytes:
        while not self._frames:
            if self._error is not None:
                raise self._error
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        frame = self._frames.popleft()
        self._queued -= len(frame)
        if self._paused and self._queued <= _READ_LIMIT // 2:
            self._paused = False
            self._transport.resume_reading()
        return frame


class SecureChannel(FrameChannel):
    """An authenticated, encrypted frame channel over an asyncio stream pair."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, session: HandshakeResult,
                 endpoint: str, max_frame_size: int):
        super().__init__(session.remote_peer_id, session.remote_info, endpoint, observed_host(writer))
        self.version = session.version
        self._reader, self._writer = reader, writer
        self._send_cipher = _FrameCipher(session.cipher, session.send_key)
        self._recv_cipher = _FrameCipher(session.cipher, session.recv_key)
        self._send_counter = self._recv_counter = 1  # nonce 0 each way sealed M3 and M4
        self._max_ciphertext = max_frame_size + FRAME_HEADER_ROOM + TAG_SIZE
        self._drain_lock = asyncio.Lock()
        self._spare: bytearray | None = None  # the last bulk frame's buffer, reused once written out
        self._small: list[bytearray] = []  # small frames of this loop iteration, written with one call
        self._frames: _FrameReader | None = None
        leftover = getattr(reader, "_buffer", None)  # read past the handshake, not parsed yet
        transport = cast(asyncio.Transport, writer.transport)  # a socket's: it reads as well
        previous = transport.get_protocol()
        if isinstance(leftover, bytearray) and reader.exception() is None and not reader.at_eof():
            self._frames = _FrameReader(self, transport, previous, bytes(leftover))
            leftover.clear()
            transport.set_protocol(self._frames)
            transport.resume_reading()  # in case the StreamReader had paused it
            self._frames.buffer_updated(0)  # frames that arrived with the handshake's last message

    def write_frame(self, data: bytes | bytearray | memoryview, head: bytes = b"") -> None:
        if self._writer.is_closing():
            raise ConnectionLostError(f"connection to {self.describe()} is closed")
        n = len(head) + len(data) + TAG_SIZE
        if n < _BULK:  # e.g. a call's OPEN and request and the other side's reply: one syscall each way
            buf = bytearray(4 + n)
            _LEN.pack_into(buf, 0, n)
            nonce = _nonce(self._send_counter)
            self._send_counter += 1
            self._send_cipher.seal_into(nonce, head, data, bytes(buf[:4]), memoryview(buf)[4:])
            if not self._small:
                asyncio.get_running_loop().call_soon(self._flush)
            self._small.append(buf)
            return
        self._flush()
        spare = self._spare
        # reuse the previous bulk buffer only when the transport holds nothing (it may keep a
        # reference to a buffer it has not written yet); fresh large buffers cost page faults
        if spare is not None and len(spare) >= 4 + n and self._writer.transport.get_write_buffer_size() == 0:
            buf = spare
        else:
            buf = bytearray(4 + n)
        frame = memoryview(buf)[:4 + n]
        _LEN.pack_into(buf, 0, n)
        nonce = _nonce(self._send_counter)
        self._send_counter += 1
        self._send_cipher.seal_into(nonce, head, data, bytes(frame[:4]), frame[4:])
        self._writer.write(frame)
        self._spare = buf

    def _flush(self) -> None:
        """Write the small frames queued in this loop iteration (in order, with one call)."""
        if self._small:
            small, self._small = self._small, []
            if not self._writer.is_closing():
                self._writer.writelines(small) if len(small) > 1 else self._writer.write(small[0])

    async def drain(self) -> None:
        self._flush()
        async with self._drain_lock:
            try:
                await self._writer.drain()
            except (ConnectionError, RuntimeError) as e:
                raise ConnectionLostError(f"connection to {self.describe()} lost: {e}") from None

    def _open(self, ciphertext: bytes | memoryview, header: bytes) -> bytes:
        """Decrypt the next frame (ProtocolError if it fails authentication)."""
        try:
            plaintext = self._recv_cipher.decrypt(_nonce(self._recv_counter), ciphertext, header)
        except InvalidTag:
            raise ProtocolError(f"{self.describe()} sent a frame that fails authentication") from None
        self._recv_counter += 1
        return plaintext

    async def read_frame(self) -> bytes:
        if self._frames is not None:
            return await self._frames.read()
        try:  # a StreamReader without the buffer we take over: read through it
            header = await self._reader.readexactly(4)
            (n,) = _LEN.unpack(header)
            if not TAG_SIZE <= n <= self._max_ciphertext:
                raise ProtocolError(f"{self.describe()} sent a frame of {n} bytes (limit {self._max_ciphertext})")
            ciphertext = await self._reader.readexactly(n)
        except (asyncio.IncompleteReadError, ConnectionError) as e:
            raise ConnectionLostError(f"connection to {self.describe()} closed ({type(e).__name__})") from None
        return self._open(ciphertext, header)

    def close(self) -> None:
        self._flush()  # e.g. a GOAWAY written just before
        if not self._writer.is_closing():
            self._writer.close()

    async def wait_closed(self) -> None:
        try:
            await self._writer.wait_closed()
        except (ConnectionError, OSError):
            pass


async def within(awaitable: Any, seconds: float) -> Any:
    """``await awaitable`` for at most ``seconds`` (asyncio.TimeoutError after), in this task: unlike
    ``asyncio.wait_for`` on Python < 3.12 no inner task, whose exception nobody would retrieve when the
    socket is aborted while this task is being cancelled."""
    if _timeout is None:
        return await asyncio.wait_for(awaitable, seconds)
    async with _timeout(seconds):
        return await awaitable


def observed_host(writer: asyncio.StreamWriter) -> str | None:
    """The other side's IP address as seen on the socket (IPv4-mapped IPv6 in IPv4 form), or None."""
    peername = writer.get_extra_info("peername")
    host = peername[0] if isinstance(peername, tuple) and peername else None
    if not isinstance(host, str):
        return None
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    return host.split("%", 1)[0]  # no IPv6 zone index


async def _drive(machine: InitiatorHandshake | ResponderHandshake, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, first_byte_timeout: float | None = None,
                 prefix: bytes = b"") -> HandshakeResult:
    """Feed ``machine`` what arrives on ``reader`` (exactly the bytes it wants, so that the frames
    after the handshake stay in the reader for the channel) and write what it answers, until it has
    an outcome; raises the HandshakeError that ended it (after a short drain if it answered).
    ``prefix``: bytes of the first message already read from the socket (fed first)."""
    if prefix:
        out = machine.receive_data(prefix)
        if out:
            writer.write(out)
    while machine.outcome is None:
        out = b""
        try:
            if first_byte_timeout is not None and machine.received == 0:
                # an accepted socket that sends nothing is closed early, not after the whole handshake timeout
                try:
                    data = await within(reader.readexactly(1), first_byte_timeout)
                except asyncio.TimeoutError:
                    raise HandshakeError(f"{machine.what}: nothing received within {first_byte_timeout:g} s") from None
            else:
                data = await reader.readexactly(machine.bytes_wanted)
        except asyncio.IncompleteReadError as e:
            if e.partial:
                machine.receive_data(e.partial)  # less than a frame: no answer, no outcome
            machine.receive_eof(type(e).__name__)
            break
        except ConnectionError as e:
            machine.receive_eof(type(e).__name__)
            break
        out = machine.receive_data(data)
        if out:
            writer.write(out)
    outcome = machine.outcome
    if isinstance(outcome, HandshakeError):
        if out:  # a refusal that answers (no common version, listing ours): let it leave before the close
            await _drain_quietly(writer)
        raise outcome
    assert isinstance(outcome, HandshakeResult)
    return outcome


async def initiate(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, identity: Identity,
                   local_info: PeerInfo, endpoint: str, expected_peer_id: PeerID | None,
                   max_frame_size: int, versions: tuple[int, ...] = SUPPORTED_VERSIONS,
                   ciphers: tuple[str, ...] = tuple(CIPHERS),
                   ephemeral: X25519PrivateKey | None = None) -> SecureChannel:
    """Run the initiator (dialer) side; HandshakeError names ``endpoint`` and the cause.
    ``versions`` and ``ciphers`` are offered in that order; ``ephemeral`` (default: fresh) is this
    session's X25519 key, for test vectors."""
    machine = InitiatorHandshake(identity, local_info, endpoint, expected_peer_id, versions, ciphers, ephemeral)
    writer.write(machine.initial_bytes)
    result = await _drive(machine, reader, writer)
    return SecureChannel(reader, writer, result, endpoint, max_frame_size)


async def respond(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, identity: Identity,
                  local_info: PeerInfo, endpoint: str, max_frame_size: int,
                  versions: tuple[int, ...] = SUPPORTED_VERSIONS, first_byte_timeout: float | None = None,
                  ciphers: tuple[str, ...] = tuple(CIPHERS),
                  ephemeral: X25519PrivateKey | None = None, prefix: bytes = b"") -> SecureChannel:
    """Run the responder (listener) side; HandshakeError names ``endpoint`` and the cause.
    ``first_byte_timeout`` (seconds, None: no separate limit) bounds the wait for the first byte;
    ``ciphers`` in order of preference; ``ephemeral`` as for :func:`initiate`; ``prefix``: the first
    bytes of M1, read already (by a listener that looked at the first byte)."""
    machine = ResponderHandshake(identity, local_info, endpoint, versions, ciphers, ephemeral)
    result = await _drive(machine, reader, writer, first_byte_timeout, prefix)
    return SecureChannel(reader, writer, result, endpoint, max_frame_size)


def refuse_busy(writer: asyncio.StreamWriter, reason: str, versions: tuple[int, ...] = SUPPORTED_VERSIONS) -> None:
    """Answer a hello with ``{"error": reason, "busy": true, ...}`` (a plain M2): the initiator raises
    PeerBusyError and may retry later. The caller closes the connection."""
    writer.write(busy_reply(reason, versions))


async def _drain_quietly(writer: asyncio.StreamWriter) -> None:
    try:
        await within(writer.drain(), 1.0)
    except (ConnectionError, asyncio.TimeoutError, RuntimeError):
        pass
