"""The secure handshake and the encrypted frame format of the TCP transport.

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
import hashlib
import struct
import time
from typing import Any, Callable

import msgpack
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .channel import FrameChannel, PeerInfo
from .errors import ConnectionLostError, HandshakeError, IncompatibleVersionError, ProtocolError
from .identity import Identity, PeerID, verify_signature
from .untrusted import brief

__all__ = ["PROTOCOL_NAME", "SUPPORTED_VERSIONS", "PeerInfo", "PeerBusyError", "SecureChannel", "initiate",
           "respond", "refuse_busy", "observed_host"]

PROTOCOL_NAME = "swarm-p2p"
SUPPORTED_VERSIONS: tuple[int, ...] = (1,)
CIPHERS: dict[str, Callable[[bytes], Any]] = {"aes256gcm": AESGCM, "chacha20poly1305": ChaCha20Poly1305}
MAX_HANDSHAKE_FRAME = 4096
MAX_HANDSHAKE_DEPTH = 4  # containers nested in a handshake message (M3's info is map > map > list)
TAG_SIZE = 16
FRAME_HEADER_ROOM = 64  # room for the multiplexer's frame header beyond max_frame_size
_LEN = struct.Struct("!I")
_READ_LIMIT = 4 << 20  # decrypted bytes waiting for the multiplexer before reading pauses
_timeout = getattr(asyncio, "timeout", None)  # Python >= 3.11
_BULK = 64 << 10  # frames at least this long are sealed without joining head and data, into a reused buffer


class PeerBusyError(HandshakeError):
    """The responder has too many handshakes pending from our address, or closed the connection
    before its first reply (as a peer with no room for one more does); retrying shortly may work."""


class _FrameCipher:
    """One direction's AEAD key: ``encrypt``/``decrypt`` as the AEAD, plus :meth:`seal_into`."""

    def __init__(self, name: str, key: bytes):
        self.name, self._key, self._aead = name, key, CIPHERS[name](key)
        self.encrypt, self.decrypt = self._aead.encrypt, self._aead.decrypt

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

    def __init__(self, channel: "SecureChannel", transport: asyncio.BaseTransport, previous: Any,
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

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, send_cipher: Any,
                 recv_cipher: Any, remote_peer_id: PeerID, remote_info: PeerInfo, endpoint: str,
                 max_frame_size: int, version: int, send_counter: int = 1, recv_counter: int = 1):
        super().__init__(remote_peer_id, remote_info, endpoint, observed_host(writer))
        self.version = version
        self._reader, self._writer = reader, writer
        self._send_cipher, self._recv_cipher = send_cipher, recv_cipher
        self._send_counter, self._recv_counter = send_counter, recv_counter
        self._max_ciphertext = max_frame_size + FRAME_HEADER_ROOM + TAG_SIZE
        self._drain_lock = asyncio.Lock()
        self._spare: bytearray | None = None  # the last bulk frame's buffer, reused once written out
        self._small: list[bytearray] = []  # small frames of this loop iteration, written with one call
        self._frames: _FrameReader | None = None
        leftover = getattr(reader, "_buffer", None)  # read past the handshake, not parsed yet
        previous = writer.transport.get_protocol()
        if isinstance(leftover, bytearray) and reader.exception() is None and not reader.at_eof():
            self._frames = _FrameReader(self, writer.transport, previous, bytes(leftover))
            leftover.clear()
            writer.transport.set_protocol(self._frames)
            writer.transport.resume_reading()  # in case the StreamReader had paused it
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
        buf = self._spare
        # reuse the previous bulk buffer only when the transport holds nothing (it may keep a
        # reference to a buffer it has not written yet); fresh large buffers cost page faults
        if not (buf is not None and len(buf) >= 4 + n and self._writer.transport.get_write_buffer_size() == 0):
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
    try:
        peername = writer.get_extra_info("peername")
        host = peername[0] if isinstance(peername, tuple) and peername else None
    except Exception:
        return None
    if not isinstance(host, str):
        return None
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    return host.split("%", 1)[0]  # no IPv6 zone index


def _nonce(counter: int) -> bytes:
    return b"\0\0\0\0" + counter.to_bytes(8, "little")


def _unpack_handshake(raw: bytes, what: str) -> dict:
    """A handshake message: a msgpack map of at most MAX_HANDSHAKE_FRAME bytes whose containers
    nest at most MAX_HANDSHAKE_DEPTH deep (so that nothing downstream recurses on it)."""
    try:
        message = msgpack.unpackb(raw, raw=False, strict_map_key=True, max_str_len=MAX_HANDSHAKE_FRAME, max_bin_len=MAX_HANDSHAKE_FRAME,
                                  max_array_len=MAX_HANDSHAKE_FRAME, max_map_len=MAX_HANDSHAKE_FRAME,
                                  max_ext_len=0)
    except Exception:
        raise HandshakeError(f"{what}: malformed handshake message") from None
    if not isinstance(message, dict):
        raise HandshakeError(f"{what}: handshake message is not a map")
    if not _shallow(message, MAX_HANDSHAKE_DEPTH):
        raise HandshakeError(f"{what}: handshake message nested deeper than {MAX_HANDSHAKE_DEPTH} levels")
    return message


def _shallow(value: Any, max_depth: int) -> bool:
    """Whether lists and maps in ``value`` nest at most ``max_depth`` deep (iterative: no recursion)."""
    todo = [(value, 1)]
    while todo:
        item, depth = todo.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        if depth > max_depth:
            return False
        todo.extend((child, depth + 1) for child in children if isinstance(child, (list, dict)))
    return True


class _NoReply(HandshakeError):
    """The other side closed the connection before sending a byte."""


async def _read_plain(reader: asyncio.StreamReader, what: str,
                      first_byte_timeout: float | None = None) -> tuple[bytes, dict]:
    head = b""
    try:
        if first_byte_timeout is None:
            head = await reader.readexactly(4)
        else:  # an accepted socket that sends nothing is closed early, not after the whole handshake timeout
            try:
                first = await within(reader.readexactly(1), first_byte_timeout)
            except asyncio.TimeoutError:
                raise HandshakeError(f"{what}: nothing received within {first_byte_timeout:g} s") from None
            head = first
            head += await reader.readexactly(3)
        (n,) = _LEN.unpack(head)
        if not 0 < n <= MAX_HANDSHAKE_FRAME:
            raise HandshakeError(f"{what}: frame of {n} bytes (limit {MAX_HANDSHAKE_FRAME}); not a swarm peer?")
        raw = await reader.readexactly(n)
    except (asyncio.IncompleteReadError, ConnectionError) as e:
        if not head and not getattr(e, "partial", b""):
            raise _NoReply(f"{what}: connection closed before anything was received ({type(e).__name__})") from None
        raise HandshakeError(f"{what}: connection closed during the handshake ({type(e).__name__})") from None
    return raw, _unpack_handshake(raw, what)


def _write_plain(writer: asyncio.StreamWriter, message: dict) -> bytes:
    raw = msgpack.packb(message, use_bin_type=True)
    writer.write(_LEN.pack(len(raw)) + raw)
    return raw


def _write_sealed(writer: asyncio.StreamWriter, cipher: Any, message: dict) -> None:
    raw = msgpack.packb(message, use_bin_type=True)
    header = _LEN.pack(len(raw) + TAG_SIZE)
    writer.write(header + cipher.encrypt(_nonce(0), raw, header))


async def _read_sealed(reader: asyncio.StreamReader, cipher: Any, what: str) -> dict:
    try:
        header = await reader.readexactly(4)
        (n,) = _LEN.unpack(header)
        if not TAG_SIZE < n <= MAX_HANDSHAKE_FRAME:
            raise HandshakeError(f"{what}: sealed handshake frame of {n} bytes")
        ciphertext = await reader.readexactly(n)
    except (asyncio.IncompleteReadError, ConnectionError) as e:
        raise HandshakeError(f"{what}: connection closed during the handshake ({type(e).__name__})") from None
    try:
        plaintext = cipher.decrypt(_nonce(0), ciphertext, header)
    except InvalidTag:
        raise HandshakeError(f"{what}: handshake frame fails authentication") from None
    except Exception:
        raise HandshakeError(f"{what}: malformed sealed handshake message") from None
    return _unpack_handshake(plaintext, what)


def _derive(own_ephemeral: X25519PrivateKey, remote_ephemeral: Any, transcript_hash: bytes, cipher_name: str, what: str):
    if not isinstance(remote_ephemeral, bytes) or len(remote_ephemeral) != 32:
        raise HandshakeError(f"{what}: bad ephemeral key")
    try:
        shared = own_ephemeral.exchange(X25519PublicKey.from_public_bytes(remote_ephemeral))
    except ValueError as e:  # e.g. an all-zero (low-order) point
        raise HandshakeError(f"{what}: bad ephemeral key ({e})") from None
    okm = HKDF(hashes.SHA256(), 64, salt=transcript_hash, info=f"{PROTOCOL_NAME}/1 keys".encode()).derive(shared)
    # initiator->responder, responder->initiator
    return _FrameCipher(cipher_name, okm[:32]), _FrameCipher(cipher_name, okm[32:])


def _check_identity(message: dict, transcript_hash: bytes, role: str, what: str) -> tuple[PeerID, PeerInfo]:
    pub, sig = message.get("pub"), message.get("sig")
    if not isinstance(pub, bytes) or len(pub) != 32 or not isinstance(sig, bytes) or len(sig) != 64:
        raise HandshakeError(f"{what}: malformed identity proof")
    if not verify_signature(pub, sig, f"{PROTOCOL_NAME}/1 {role}".encode() + transcript_hash):
        raise HandshakeError(f"{what}: the peer could not prove possession of its key (bad signature)")
    return PeerID.from_public_key(pub), PeerInfo.from_wire(message.get("info"))


def _ephemeral() -> tuple[X25519PrivateKey, bytes]:
    key = X25519PrivateKey.generate()
    return key, key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


async def initiate(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, identity: Identity,
                   local_info: PeerInfo, endpoint: str, expected_peer_id: PeerID | None,
                   max_frame_size: int, versions: tuple[int, ...] = SUPPORTED_VERSIONS) -> SecureChannel:
    """Run the initiator (dialer) side; HandshakeError names ``endpoint`` and the cause."""
    what = f"handshake with {endpoint}"
    eph, eph_pub = _ephemeral()
    m1 = _write_plain(writer, {"p": PROTOCOL_NAME, "versions": list(versions), "ciphers": list(CIPHERS), "e": eph_pub})
    try:
        m2, reply = await _read_plain(reader, what)
    except _NoReply as e:  # e.g. a responder with no room for our handshake now
        raise PeerBusyError(f"{e}; busy?") from None
    if "error" in reply:
        error = reply["error"]
        error = error[:200] if isinstance(error, str) else brief(error)
        if reply.get("busy") is True:
            raise PeerBusyError(f"{what}: refused for now: {error}")
        theirs = reply.get("versions")
        theirs = [v for v in theirs if isinstance(v, int)][:16] if isinstance(theirs, list) else brief(theirs)
        raise IncompatibleVersionError(
            f"{what}: refused: {error} (they support versions {theirs}, we support {list(versions)})")
    version, cipher_name = reply.get("version"), reply.get("cipher")
    if version not in versions or cipher_name not in CIPHERS:
        raise HandshakeError(f"{what}: peer chose version {brief(version)} / cipher {brief(cipher_name)}, "
                             f"which we did not offer")
    transcript = hashlib.sha256(m1 + m2).digest()
    send_cipher, recv_cipher = _derive(eph, reply.get("e"), transcript, cipher_name, what)
    proof = await _read_sealed(reader, recv_cipher, what)
    remote_id, remote_info = _check_identity(proof, transcript, "responder", what)
    if expected_peer_id is not None and remote_id != expected_peer_id:
        raise HandshakeError(f"{what}: expected peer {expected_peer_id}, but the peer there is {remote_id}")
    _write_sealed(writer, send_cipher, {"pub": identity.public_key,
                                        "sig": identity.sign(f"{PROTOCOL_NAME}/1 initiator".encode() + transcript),
                                        "info": local_info.to_wire()})
    return SecureChannel(reader, writer, send_cipher, recv_cipher, remote_id, remote_info, endpoint,
                         max_frame_size, version)


async def respond(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, identity: Identity,
                  local_info: PeerInfo, endpoint: str, max_frame_size: int,
                  versions: tuple[int, ...] = SUPPORTED_VERSIONS,
                  first_byte_timeout: float | None = None) -> SecureChannel:
    """Run the responder (listener) side; HandshakeError names ``endpoint`` and the cause.
    ``first_byte_timeout`` (seconds, None: no separate limit) bounds the wait for the first byte."""
    what = f"handshake from {endpoint}"
    m1, hello = await _read_plain(reader, what, first_byte_timeout)
    if hello.get("p") != PROTOCOL_NAME:
        raise HandshakeError(f"{what}: not a {PROTOCOL_NAME} peer (protocol {brief(hello.get('p'), 40)})")
    offered, ciphers = hello.get("versions"), hello.get("ciphers")
    if not isinstance(offered, list) or not isinstance(ciphers, list):
        raise HandshakeError(f"{what}: malformed hello")
    common = [v for v in versions if v in offered]
    if not common:
        offered_text = [v for v in offered if isinstance(v, int)][:16]
        _write_plain(writer, {"error": f"incompatible protocol versions: you offer {offered_text}, "
                                       f"this peer supports {list(versions)}", "versions": list(versions)})
        await _drain_quietly(writer)
        raise IncompatibleVersionError(
            f"{what}: incompatible protocol versions (they offer {offered_text}, we support {list(versions)})")
    cipher_name = next((c for c in CIPHERS if c in ciphers), None)
    if cipher_name is None:
        raise HandshakeError(f"{what}: no common cipher (they offer {[brief(c, 32) for c in ciphers[:8]]})")
    eph, eph_pub = _ephemeral()
    version = max(common)
    m2 = _write_plain(writer, {"version": version, "cipher": cipher_name, "e": eph_pub})
    transcript = hashlib.sha256(m1 + m2).digest()
    recv_cipher, send_cipher = _derive(eph, hello.get("e"), transcript, cipher_name, what)
    _write_sealed(writer, send_cipher, {"pub": identity.public_key,
                                        "sig": identity.sign(f"{PROTOCOL_NAME}/1 responder".encode() + transcript),
                                        "info": local_info.to_wire()})
    proof = await _read_sealed(reader, recv_cipher, what)
    remote_id, remote_info = _check_identity(proof, transcript, "initiator", what)
    return SecureChannel(reader, writer, send_cipher, recv_cipher, remote_id, remote_info, endpoint,
                         max_frame_size, version)


def refuse_busy(writer: asyncio.StreamWriter, reason: str, versions: tuple[int, ...] = SUPPORTED_VERSIONS) -> None:
    """Answer a hello with ``{"error": reason, "busy": true, ...}`` (a plain M2): the initiator raises
    PeerBusyError and may retry later. The caller closes the connection."""
    _write_plain(writer, {"error": reason[:200], "busy": True, "versions": list(versions)})


async def _drain_quietly(writer: asyncio.StreamWriter) -> None:
    try:
        await within(writer.drain(), 1.0)
    except (ConnectionError, asyncio.TimeoutError, RuntimeError):
        pass
