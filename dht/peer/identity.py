"""Peer identity: an Ed25519 key pair and the PeerID derived from its public key.

A PeerID is the SHA-256 multihash of the raw 32-byte Ed25519 public key, printed in base58btc
(46 characters starting with ``Qm``, the shape hivemind/libp2p users know). Nobody can claim a
PeerID without the matching private key: the handshake (:mod:`dht.peer.handshake`) makes every peer
send its public key and sign the session transcript with it, and the other side checks that the
key hashes to the PeerID it expected.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

__all__ = ["PeerID", "Identity", "IdentityError", "verify_signature", "b58encode", "b58decode"]

_B58_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B58_INDEX = {c: i for i, c in enumerate(_B58_ALPHABET)}
_MULTIHASH_SHA256 = b"\x12\x20"  # multihash code 0x12 (sha2-256), length 32


class IdentityError(ValueError):
    """An identity file or a PeerID string is malformed."""


def b58encode(data: bytes) -> str:
    """Base58btc (Bitcoin alphabet) encoding."""
    value = int.from_bytes(data, "big")
    out = []
    while value:
        value, rem = divmod(value, 58)
        out.append(_B58_ALPHABET[rem])
    leading_zeros = len(data) - len(data.lstrip(b"\0"))
    return "1" * leading_zeros + "".join(reversed(out))


def b58decode(text: str) -> bytes:
    """Inverse of :func:`b58encode`; raises IdentityError on characters outside the alphabet."""
    value = 0
    for char in text:
        try:
            value = value * 58 + _B58_INDEX[char]
        except KeyError:
            raise IdentityError(f"invalid base58 character {char!r} in {text!r}") from None
    leading_ones = len(text) - len(text.lstrip("1"))
    body = value.to_bytes((value.bit_length() + 7) // 8, "big") if value else b""
    return b"\0" * leading_ones + body


@dataclass(frozen=True, order=True)
class PeerID:
    """Identifier of a peer: the multihash of its Ed25519 public key (34 bytes)."""

    raw: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.raw, bytes) or len(self.raw) != 34 or not self.raw.startswith(_MULTIHASH_SHA256):
            raise IdentityError("a PeerID is a 34-byte sha2-256 multihash")

    @classmethod
    def from_public_key(cls, public_key: bytes) -> "PeerID":
        """The PeerID of a raw 32-byte Ed25519 public key."""
        if len(public_key) != 32:
            raise IdentityError(f"an Ed25519 public key has 32 bytes, got {len(public_key)}")
        return cls(_MULTIHASH_SHA256 + hashlib.sha256(public_key).digest())

    @classmethod
    def from_base58(cls, text: str) -> "PeerID":
        """Parse the printed form (``Qm...``)."""
        if not isinstance(text, str):
            raise IdentityError(f"a PeerID is a base58 string, got {type(text).__name__}")
        try:
            return cls(b58decode(text))
        except IdentityError as e:
            raise IdentityError(f"not a valid PeerID: {text!r} ({e})") from None

    def to_base58(self) -> str:
        return b58encode(self.raw)

    def matches(self, public_key: bytes) -> bool:
        """True if ``public_key`` (raw Ed25519, 32 bytes) is the key behind this PeerID."""
        return len(public_key) == 32 and PeerID.from_public_key(public_key) == self

    def short(self) -> str:
        """A short form for logs: the last 8 characters."""
        return "…" + self.to_base58()[-8:]

    def __str__(self) -> str:
        return self.to_base58()

    def __repr__(self) -> str:
        return f"PeerID({self.to_base58()})"


def verify_signature(public_key: bytes, signature: bytes, message: bytes) -> bool:
    """Check an Ed25519 signature; False for any malformed key or signature."""
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
        return True
    except (InvalidSignature, ValueError, TypeError):
        return False


class Identity:
    """An Ed25519 key pair. ``Identity()`` makes an ephemeral one; see :meth:`load_or_create`."""

    def __init__(self, private_key: Ed25519PrivateKey | None = None):
        self._private_key = private_key if private_key is not None else Ed25519PrivateKey.generate()
        self.public_key: bytes = self._private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.peer_id = PeerID.from_public_key(self.public_key)

    def sign(self, message: bytes) -> bytes:
        """Ed25519 signature (64 bytes) of ``message``."""
        return self._private_key.sign(message)

    def private_bytes(self) -> bytes:
        """PKCS#8 PEM of the private key (unencrypted)."""
        return self._private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Identity":
        """Load a PEM (PKCS#8) Ed25519 private key; IdentityError with the path if it is not one."""
        data = Path(path).read_bytes()
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as e:
            raise IdentityError(f"{path}: not a PEM private key ({e})") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise IdentityError(f"{path}: expected an Ed25519 private key, got {type(key).__name__}")
        return cls(key)

    @classmethod
    def load_or_create(cls, path: str | os.PathLike) -> "Identity":
        """Load the key at ``path``, or create it there (permissions 0600) if the file is missing."""
        path = Path(path)
        if path.exists():
            return cls.from_file(path)
        identity = cls()
        path.parent.mkdir(parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
        fd = os.open(path, flags, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(identity.private_bytes())
        return identity

    def __repr__(self) -> str:
        return f"Identity({self.peer_id})"
