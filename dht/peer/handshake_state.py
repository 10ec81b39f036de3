"""The secure handshake as sans-IO state machines: bytes in, bytes and an outcome out.

The wire format (M1-M4, keys, frame limits) is specified in :mod:`dht.peer.handshake`, whose
asyncio functions (``initiate``, ``respond``) drive these machines over a socket;
:mod:`dht.peer.memory_transport` drives them over the in-memory network. No asyncio, no sockets,
no clock: a driver sends :attr:`InitiatorHandshake.initial_bytes` (M1), then feeds what arrives to
``receive_data`` (any chunking; :attr:`~_Handshake.bytes_wanted` says how much completes the
current frame) and sends what it returns, until ``outcome`` is set::

    machine = InitiatorHandshake(identity, info, endpoint="192.0.2.1:4001", expected_peer_id=peer_id)
    send(machine.initial_bytes)
    while machine.outcome is None:
        data = read(machine.bytes_wanted)
        send(machine.receive_data(data)) if data else machine.receive_eof("EOF")
    if isinstance(machine.outcome, HandshakeError):
        raise machine.outcome
    result = machine.outcome  # HandshakeResult: version, cipher, keys, remote PeerID and PeerInfo

A failed handshake's outcome is a :class:`HandshakeError` (or its subclasses
:class:`~dht.peer.errors.IncompatibleVersionError` and :class:`PeerBusyError`), never another
exception, whatever the bytes. At most one frame is buffered (4 + 4096 bytes): a frame's length
is checked as soon as its 4 length bytes are in, and its message (at most 4 KiB, containers nested
at most 4 deep) before any field is looked at.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import struct
from typing import Any, Callable, Union

import msgpack
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .channel import PeerInfo
from .errors import HandshakeError, IncompatibleVersionError
from .identity import Identity, PeerID, verify_signature
from .untrusted import brief

__all__ = ["PROTOCOL_NAME", "SUPPORTED_VERSIONS", "CIPHERS", "MAX_HANDSHAKE_FRAME", "MAX_HANDSHAKE_DEPTH",
           "TAG_SIZE", "PeerBusyError", "HandshakeResult", "InitiatorHandshake", "ResponderHandshake",
           "busy_reply", "nonce"]

PROTOCOL_NAME = "swarm-p2p"
SUPPORTED_VERSIONS: tuple[int, ...] = (1,)
# AEADs by name, in order of preference (the initiator offers them in this order, the responder
# picks the first of its own list that the initiator offered)
CIPHERS: dict[str, Callable[[bytes], Any]] = {"aes256gcm": AESGCM, "chacha20poly1305": ChaCha20Poly1305}
MAX_HANDSHAKE_FRAME = 4096
MAX_HANDSHAKE_DEPTH = 4  # containers nested in a handshake message (M3's info is map > map > list)
TAG_SIZE = 16
_LEN = struct.Struct("!I")
_KEYS_INFO = f"{PROTOCOL_NAME}/1 keys".encode()


class PeerBusyError(HandshakeError):
    """The responder has too many handshakes pending from our address, or closed the connection
    before its first reply (as a peer with no room for one more does); retrying shortly may work."""


@dataclasses.dataclass(frozen=True)
class HandshakeResult:
    """A finished handshake: the session's parameters and the authenticated other side.

    ``send_key``/``recv_key`` are this side's AEAD keys (32 bytes each) for ``cipher``; the first
    frame each way after the handshake uses nonce counter 1 (M3 and M4 used 0). ``trailing`` holds
    the bytes that arrived in the same chunk as the last handshake message, after it (the first
    encrypted frames, for the session to parse).
    """

    version: int
    cipher: str
    send_key: bytes
    recv_key: bytes
    remote_peer_id: PeerID
    remote_info: PeerInfo
    transcript_hash: bytes
    trailing: bytes = b""


Outcome = Union[HandshakeResult, HandshakeError, None]


def nonce(counter: int) -> bytes:
    """The 96-bit AEAD nonce of frame number ``counter`` in one direction."""
    return b"\0\0\0\0" + counter.to_bytes(8, "little")


def busy_reply(reason: str, versions: tuple[int, ...] = SUPPORTED_VERSIONS) -> bytes:
    """The M2 that refuses a hello for now (``{"error": reason, "busy": true, ...}``): the initiator
    raises PeerBusyError and may retry later."""
    return _plain({"error": reason[:200], "busy": True, "versions": list(versions)})


def _plain(message: dict) -> bytes:
    raw = msgpack.packb(message, use_bin_type=True)
    return _LEN.pack(len(raw)) + raw


def _sealed(key: bytes, cipher: str, message: dict) -> bytes:
    raw = msgpack.packb(message, use_bin_type=True)
    header = _LEN.pack(len(raw) + TAG_SIZE)
    return header + CIPHERS[cipher](key).encrypt(nonce(0), raw, header)


def _unpack_handshake(raw: bytes, what: str) -> dict:
    """A handshake message: a msgpack map of at most MAX_HANDSHAKE_FRAME bytes whose containers
    nest at most MAX_HANDSHAKE_DEPTH deep (so that nothing downstream recurses on it)."""
    limit = MAX_HANDSHAKE_FRAME
    try:
        message = msgpack.unpackb(raw, raw=False, strict_map_key=True, max_str_len=limit, max_bin_len=limit,
                                  max_array_len=limit, max_map_len=limit, max_ext_len=0)
    except Exception:  # noqa: BLE001 - msgpack fails with many types; each means a malformed message
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


def _public(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _exchange(own: X25519PrivateKey, remote: Any, what: str) -> bytes:
    """The X25519 shared secret with the other side's ephemeral key (HandshakeError if it is bad)."""
    if not isinstance(remote, bytes) or len(remote) != 32:
        raise HandshakeError(f"{what}: bad ephemeral key")
    try:
        return own.exchange(X25519PublicKey.from_public_bytes(remote))
    except ValueError as e:  # e.g. an all-zero (low-order) point
        raise HandshakeError(f"{what}: bad ephemeral key ({e})") from None


def _keys(shared: bytes, transcript_hash: bytes) -> tuple[bytes, bytes]:
    """(initiator->responder key, responder->initiator key)."""
    okm = HKDF(hashes.SHA256(), 64, salt=transcript_hash, info=_KEYS_INFO).derive(shared)
    return okm[:32], okm[32:]


def _proof(identity: Identity, info: PeerInfo, role: str, transcript_hash: bytes) -> dict:
    return {"pub": identity.public_key, "sig": identity.sign(f"{PROTOCOL_NAME}/1 {role}".encode() + transcript_hash),
            "info": info.to_wire()}


def _check_proof(message: dict, transcript_hash: bytes, role: str, what: str) -> tuple[PeerID, PeerInfo]:
    pub, sig = message.get("pub"), message.get("sig")
    if not isinstance(pub, bytes) or len(pub) != 32 or not isinstance(sig, bytes) or len(sig) != 64:
        raise HandshakeError(f"{what}: malformed identity proof")
    if not verify_signature(pub, sig, f"{PROTOCOL_NAME}/1 {role}".encode() + transcript_hash):
        raise HandshakeError(f"{what}: the peer could not prove possession of its key (bad signature)")
    return PeerID.from_public_key(pub), PeerInfo.from_wire(message.get("info"))


def _cipher_names(ciphers: tuple[str, ...]) -> tuple[str, ...]:
    unknown = [c for c in ciphers if c not in CIPHERS]
    if unknown or not ciphers:
        raise ValueError(f"ciphers must be a non-empty subset of {list(CIPHERS)}, got {list(ciphers)}")
    return tuple(ciphers)


class _Handshake(abc.ABC):
    """What both sides share: framing with bounded buffering, the sealed message, the outcome.

    ``outcome`` is None while the handshake runs, then a :class:`HandshakeResult` or the
    :class:`HandshakeError` that ended it. Subclasses handle one complete frame at a time
    (``_on_plain``, then ``_on_sealed``), append what they send to ``_out`` and raise
    HandshakeError to fail."""

    def __init__(self, identity: Identity, local_info: PeerInfo, what: str, versions: tuple[int, ...],
                 ciphers: tuple[str, ...], ephemeral: X25519PrivateKey | None):
        self.identity, self.local_info, self.what = identity, local_info, what
        self.versions, self.ciphers = tuple(versions), _cipher_names(tuple(ciphers))
        self._ephemeral = ephemeral if ephemeral is not None else X25519PrivateKey.generate()
        self.outcome: Outcome = None
        self.received = 0  # bytes fed in so far
        self._sealed = False  # whether the next frame is the sealed proof (else a plain message)
        self._buf = bytearray()  # the frame being received: length bytes, then body (one frame at most)
        self._length = -1  # the body length of that frame once its 4 length bytes are in
        self._out = bytearray()
        self._transcript_hash = b""
        self._version, self._cipher = 0, ""
        self._send_key = self._recv_key = b""

    @property
    def bytes_wanted(self) -> int:
        """How many more bytes complete the current frame's length or body (0 once finished)."""
        if self.outcome is not None:
            return 0
        return 4 - len(self._buf) if self._length < 0 else 4 + self._length - len(self._buf)

    @property
    def buffered(self) -> int:
        """Bytes held of the frame being received (at most 4 + MAX_HANDSHAKE_FRAME)."""
        return len(self._buf)

    def receive_data(self, data: bytes | bytearray | memoryview) -> bytes:
        """Feed bytes from the other side; returns the bytes to send to it (maybe empty). Once
        ``outcome`` is set the machine takes no more data (a failed handshake's remaining bytes are
        dropped, a finished one's are its result's ``trailing``)."""
        if self.outcome is not None:
            raise RuntimeError(f"{self.what}: the handshake is over; it takes no more data")
        data = bytes(data)
        self.received += len(data)
        pos = 0
        try:
            while pos < len(data) and self.outcome is None:
                take = self.bytes_wanted
                self._buf += data[pos:pos + take]
                pos += min(take, len(data) - pos)
                if self._length < 0 and len(self._buf) == 4:
                    (self._length,) = _LEN.unpack(self._buf)
                    self._check_length(self._length)
                if self._length >= 0 and len(self._buf) == 4 + self._length:
                    frame, self._buf, self._length = bytes(self._buf), bytearray(), -1
                    if self._sealed:
                        self._on_sealed(self._open(frame))
                    else:
                        self._on_plain(frame[4:], _unpack_handshake(frame[4:], self.what))
        except HandshakeError as e:
            self.outcome = e
        if isinstance(self.outcome, HandshakeResult) and pos < len(data):
            self.outcome = dataclasses.replace(self.outcome, trailing=data[pos:])
        out, self._out = bytes(self._out), bytearray()
        return out

    def receive_eof(self, cause: str = "EOF") -> None:
        """The other side closed the connection (``cause``: e.g. the exception's type name)."""
        if self.outcome is not None:
            return
        if self.received == 0:
            self.outcome = self._closed_before_reply(
                f"{self.what}: connection closed before anything was received ({cause})")
        else:
            self.outcome = HandshakeError(f"{self.what}: connection closed during the handshake ({cause})")

    def _closed_before_reply(self, message: str) -> HandshakeError:
        return HandshakeError(message)

    def _check_length(self, n: int) -> None:
        if self._sealed:
            if not TAG_SIZE < n <= MAX_HANDSHAKE_FRAME:
                raise HandshakeError(f"{self.what}: sealed handshake frame of {n} bytes")
        elif not 0 < n <= MAX_HANDSHAKE_FRAME:
            raise HandshakeError(f"{self.what}: frame of {n} bytes (limit {MAX_HANDSHAKE_FRAME}); not a swarm peer?")

    def _open(self, frame: bytes) -> dict:
        try:
            plaintext = CIPHERS[self._cipher](self._recv_key).decrypt(nonce(0), frame[4:], frame[:4])
        except InvalidTag:
            raise HandshakeError(f"{self.what}: handshake frame fails authentication") from None
        return _unpack_handshake(plaintext, self.what)

    def _agree(self, version: int, cipher: str, m1: bytes, m2: bytes, shared: bytes, initiator: bool) -> None:
        self._version, self._cipher = version, cipher
        self._transcript_hash = hashlib.sha256(m1 + m2).digest()
        i_to_r, r_to_i = _keys(shared, self._transcript_hash)
        self._send_key, self._recv_key = (i_to_r, r_to_i) if initiator else (r_to_i, i_to_r)
        self._sealed = True

    def _finish(self, remote_peer_id: PeerID, remote_info: PeerInfo) -> None:
        self.outcome = HandshakeResult(self._version, self._cipher, self._send_key, self._recv_key, remote_peer_id,
                                       remote_info, self._transcript_hash)

    @abc.abstractmethod
    def _on_plain(self, raw: bytes, message: dict) -> None:
        """The plain message (M1 or M2; ``raw``: its bytes, for the transcript)."""

    @abc.abstractmethod
    def _on_sealed(self, message: dict) -> None:
        """The decrypted identity proof (M3 or M4)."""


class InitiatorHandshake(_Handshake):
    """The dialer's side: sends M1 (:attr:`initial_bytes`), receives M2 and M3, sends M4.

    ``endpoint`` names the other side in errors; a responder whose key does not hash to
    ``expected_peer_id`` (None: any) is refused. ``versions`` and ``ciphers`` are offered in that
    order; ``ephemeral`` (default: a fresh key) is the X25519 key of this session (fixed keys make
    test vectors).
    """

    def __init__(self, identity: Identity, local_info: PeerInfo, endpoint: str = "peer",
                 expected_peer_id: PeerID | None = None, versions: tuple[int, ...] = SUPPORTED_VERSIONS,
                 ciphers: tuple[str, ...] = tuple(CIPHERS), ephemeral: X25519PrivateKey | None = None):
        super().__init__(identity, local_info, f"handshake with {endpoint}", versions, ciphers, ephemeral)
        self.expected_peer_id = expected_peer_id
        self.initial_bytes = _plain({"p": PROTOCOL_NAME, "versions": list(self.versions),
                                     "ciphers": list(self.ciphers), "e": _public(self._ephemeral)})

    def _closed_before_reply(self, message: str) -> HandshakeError:
        return PeerBusyError(f"{message}; busy?")  # e.g. a responder with no room for our handshake now

    def _on_plain(self, raw: bytes, reply: dict) -> None:  # M2
        what = self.what
        if "error" in reply:
            error = reply["error"]
            error = error[:200] if isinstance(error, str) else brief(error)
            if reply.get("busy") is True:
                raise PeerBusyError(f"{what}: refused for now: {error}")
            theirs = reply.get("versions")
            theirs = [v for v in theirs if isinstance(v, int)][:16] if isinstance(theirs, list) else brief(theirs)
            raise IncompatibleVersionError(
                f"{what}: refused: {error} (they support versions {theirs}, we support {list(self.versions)})")
        version, cipher = reply.get("version"), reply.get("cipher")
        if version not in self.versions or cipher not in self.ciphers:
            raise HandshakeError(f"{what}: peer chose version {brief(version)} / cipher {brief(cipher)}, "
                                 f"which we did not offer")
        shared = _exchange(self._ephemeral, reply.get("e"), what)
        self._agree(version, cipher, self.initial_bytes[4:], raw, shared, initiator=True)

    def _on_sealed(self, proof: dict) -> None:  # M3
        remote_id, remote_info = _check_proof(proof, self._transcript_hash, "responder", self.what)
        if self.expected_peer_id is not None and remote_id != self.expected_peer_id:
            raise HandshakeError(
                f"{self.what}: expected peer {self.expected_peer_id}, but the peer there is {remote_id}")
        self._out += _sealed(self._send_key, self._cipher,
                             _proof(self.identity, self.local_info, "initiator", self._transcript_hash))
        self._finish(remote_id, remote_info)


class ResponderHandshake(_Handshake):
    """The listener's side: receives M1, sends M2 and M3, receives M4.

    ``endpoint`` names the other side in errors; of the initiator's offer it picks the highest of
    ``versions`` and the first of ``ciphers`` (its preference); ``ephemeral`` as for the initiator.
    A hello without a common version is answered with the versions this side supports before the
    outcome becomes IncompatibleVersionError.
    """

    def __init__(self, identity: Identity, local_info: PeerInfo, endpoint: str = "peer",
                 versions: tuple[int, ...] = SUPPORTED_VERSIONS, ciphers: tuple[str, ...] = tuple(CIPHERS),
                 ephemeral: X25519PrivateKey | None = None):
        super().__init__(identity, local_info, f"handshake from {endpoint}", versions, ciphers, ephemeral)

    def _on_plain(self, raw: bytes, hello: dict) -> None:  # M1
        what, versions = self.what, self.versions
        if hello.get("p") != PROTOCOL_NAME:
            raise HandshakeError(f"{what}: not a {PROTOCOL_NAME} peer (protocol {brief(hello.get('p'), 40)})")
        offered, ciphers = hello.get("versions"), hello.get("ciphers")
        if not isinstance(offered, list) or not isinstance(ciphers, list):
            raise HandshakeError(f"{what}: malformed hello")
        common = [v for v in versions if v in offered]
        if not common:
            offered_text = [v for v in offered if isinstance(v, int)][:16]
            self._out += _plain({"error": f"incompatible protocol versions: you offer {offered_text}, "
                                          f"this peer supports {list(versions)}", "versions": list(versions)})
            raise IncompatibleVersionError(
                f"{what}: incompatible protocol versions (they offer {offered_text}, we support {list(versions)})")
        cipher = next((c for c in self.ciphers if c in ciphers), None)
        if cipher is None:
            raise HandshakeError(f"{what}: no common cipher (they offer {[brief(c, 32) for c in ciphers[:8]]})")
        shared = _exchange(self._ephemeral, hello.get("e"), what)  # before M2: a bad hello gets no answer
        version = max(common)
        m2 = _plain({"version": version, "cipher": cipher, "e": _public(self._ephemeral)})
        self._agree(version, cipher, raw, m2[4:], shared, initiator=False)
        self._out += m2 + _sealed(self._send_key, cipher,
                                  _proof(self.identity, self.local_info, "responder", self._transcript_hash))

    def _on_sealed(self, proof: dict) -> None:  # M4
        self._finish(*_check_proof(proof, self._transcript_hash, "initiator", self.what))
