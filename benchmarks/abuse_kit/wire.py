"""Raw wire access for the abuse benchmark, as a hostile client has it.

- :func:`open_raw`: a TCP connection whose source address is the attacker's (``local_addr``).
- :func:`plain_frame`: a handshake frame (``u32 length || msgpack``) of any content.
- :func:`handshake`: the initiator side of the handshake of :mod:`dht.peer.handshake` (written out here
  from its documented format, not imported, so that an attack can write any bytes afterwards), and
  :class:`RawSession`, which seals arbitrary multiplexer frames (``type u8 | flags u8 | stream u32 |
  payload``) as the victim expects them, ignoring flow control and every other courtesy.
- :func:`bind_dials_to`: makes every asyncio dial to a loopback host in this process leave from the
  attacker's address, so that the project's own :class:`dht.P2P` can be used for authenticated
  attacks (it dials without ``local_addr``).
"""

from __future__ import annotations

import asyncio
import asyncio.base_events
import hashlib
import os
import struct

import msgpack
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = ["open_raw", "plain_frame", "handshake", "RawSession", "bind_dials_to", "bound_dials",
           "OPEN", "DATA", "END", "CANCEL", "FLAG_MORE", "FLAG_END"]

OPEN, DATA, END, ERROR, CANCEL, WINDOW, PING, PONG, GOAWAY = range(1, 10)
FLAG_MORE, FLAG_END = 1, 2
_LEN = struct.Struct("!I")
_HEADER = struct.Struct("!BBI")
PROTOCOL = "swarm-p2p"
_bound = [0]


async def open_raw(host: str, port: int, local_ip: str, timeout: float = 3.0):
    """``(reader, writer)`` of a TCP connection from ``local_ip`` to ``host:port``."""
    return await asyncio.wait_for(asyncio.open_connection(host, port, local_addr=(local_ip, 0)), timeout)


def plain_frame(body: dict | bytes) -> bytes:
    """A handshake frame: ``u32 length || body`` (``body`` packed with msgpack unless already bytes)."""
    raw = body if isinstance(body, (bytes, bytearray)) else msgpack.packb(body, use_bin_type=True)
    return _LEN.pack(len(raw)) + bytes(raw)


def _nonce(counter: int) -> bytes:
    return b"\0\0\0\0" + counter.to_bytes(8, "little")


class RawSession:
    """An authenticated connection on which the attacker writes raw multiplexer frames."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, send_key: bytes,
                 recv_key: bytes):
        self.reader, self.writer = reader, writer
        self._aead, self._recv_aead = AESGCM(send_key), AESGCM(recv_key)
        self._counter = 1  # nonce 0 of each direction sealed the handshake's proofs
        self._recv_counter = 1
        self._drainer: asyncio.Task | None = None
        self.received = 0
        self.errors: dict[int, str] = {}  # stream id -> code of the ERROR frame the victim sent for it
        self.goaway = False

    def seal(self, plaintext: bytes | memoryview) -> bytes:
        """One encrypted frame: ``u32 L || AEAD(plaintext)`` with the next nonce."""
        header = _LEN.pack(len(plaintext) + 16)
        sealed = self._aead.encrypt(_nonce(self._counter), bytes(plaintext), header)
        self._counter += 1
        return header + sealed

    def frame(self, ftype: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
        return self.seal(_HEADER.pack(ftype, flags, stream_id) + payload)

    def open_frame(self, stream_id: int, method: str, timeout: float | None = None) -> bytes:
        return self.frame(OPEN, 0, stream_id, msgpack.packb({"m": method, "t": timeout}))

    def discard_incoming(self) -> None:
        """Read whatever the victim sends (so that its writes never block on us), noting the
        streams it failed (ERROR frames) and whether it said GOAWAY."""
        async def drain() -> None:
            try:
                while True:
                    header = await self.reader.readexactly(4)
                    (n,) = _LEN.unpack(header)
                    sealed = await self.reader.readexactly(n)
                    self.received += 4 + n
                    plain = self._recv_aead.decrypt(_nonce(self._recv_counter), sealed, header)
                    self._recv_counter += 1
                    ftype, _, stream_id = _HEADER.unpack_from(plain)
                    if ftype == ERROR:
                        try:
                            self.errors[stream_id] = str(msgpack.unpackb(plain[_HEADER.size:]).get("c"))[:32]
                        except Exception:
                            self.errors[stream_id] = "?"
                    elif ftype == GOAWAY:
                        self.goaway = True
            except (ConnectionError, OSError, asyncio.IncompleteReadError, asyncio.CancelledError, Exception):
                return
        self._drainer = asyncio.ensure_future(drain())

    @property
    def closed(self) -> bool:
        return self.writer.is_closing() or (self._drainer is not None and self._drainer.done())

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    def close(self) -> None:
        if self._drainer is not None:
            self._drainer.cancel()
        try:
            self.writer.close()
        except Exception:
            pass


async def _read_frame(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    header = await reader.readexactly(4)
    (n,) = _LEN.unpack(header)
    if not 0 < n <= 4096:
        raise ConnectionError(f"handshake frame of {n} bytes")
    return header, await reader.readexactly(n)


async def handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, identity,
                    addresses: list[str] | None = None, timeout: float = 10.0) -> RawSession:
    """Run the initiator side of the swarm-p2p handshake (version 1, AES-256-GCM) as ``identity``
    (a :class:`dht.Identity`); the responder's proof is decrypted but not checked (we attack, we
    do not care who answers). ConnectionError/TimeoutError if the victim refuses."""
    async def run() -> RawSession:
        eph = X25519PrivateKey.generate()
        eph_pub = eph.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        m1 = msgpack.packb({"p": PROTOCOL, "versions": [1], "ciphers": ["aes256gcm"], "e": eph_pub}, use_bin_type=True)
        writer.write(_LEN.pack(len(m1)) + m1)
        _, m2 = await _read_frame(reader)
        reply = msgpack.unpackb(m2, raw=False)
        if not isinstance(reply, dict) or "error" in reply or reply.get("cipher") != "aes256gcm":
            raise ConnectionError(f"victim refused the hello: {str(reply)[:200]}")
        transcript = hashlib.sha256(m1 + m2).digest()
        shared = eph.exchange(X25519PublicKey.from_public_bytes(reply["e"]))
        okm = HKDF(hashes.SHA256(), 64, salt=transcript, info=f"{PROTOCOL}/1 keys".encode()).derive(shared)
        send_key, recv_key = okm[:32], okm[32:]
        header, sealed = await _read_frame(reader)
        AESGCM(recv_key).decrypt(_nonce(0), sealed, header)  # the responder's proof (unchecked)
        proof = msgpack.packb({"pub": identity.public_key,
                               "sig": identity.sign(f"{PROTOCOL}/1 initiator".encode() + transcript),
                               "info": {"addrs": list(addresses or []), "window": 8 << 20, "max_msg": 64 << 20}},
                              use_bin_type=True)
        header = _LEN.pack(len(proof) + 16)
        writer.write(header + AESGCM(send_key).encrypt(_nonce(0), proof, header))
        await writer.drain()
        return RawSession(reader, writer, send_key, recv_key)

    try:
        return await asyncio.wait_for(run(), timeout)
    except asyncio.IncompleteReadError as e:
        raise ConnectionError("victim closed the connection during the handshake") from e


def bind_dials_to(ip: str) -> None:
    """Make every dial of this process to a loopback host (127.x) leave from ``ip`` (e.g. the
    project's P2P dials without ``local_addr``); :func:`bound_dials` counts those dials."""
    original = asyncio.base_events.BaseEventLoop.create_connection
    if getattr(original, "_abuse_bound", False):
        return

    async def create_connection(self, protocol_factory, host=None, port=None, *args, **kwargs):
        if kwargs.get("local_addr") is None and kwargs.get("sock") is None and isinstance(host, str) \
                and host.startswith("127."):
            kwargs["local_addr"] = (ip, 0)
            _bound[0] += 1
        return await original(self, protocol_factory, host, port, *args, **kwargs)

    create_connection._abuse_bound = True  # type: ignore[attr-defined]
    asyncio.base_events.BaseEventLoop.create_connection = create_connection  # type: ignore[method-assign]


def bound_dials() -> int:
    return _bound[0]


def random_key_ids(n: int) -> list[bytes]:
    return [os.urandom(20) for _ in range(n)]
