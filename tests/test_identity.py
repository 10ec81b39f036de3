"""Identity: Ed25519 keys, PeerID derivation and printing, key files, signatures."""

import hashlib
import os
import stat

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from dht.peer.identity import Identity, IdentityError, PeerID, b58decode, b58encode, verify_signature

# ---- base58 -----------------------------------------------------------------------------------


def test_b58_known_vectors():
    # Bitcoin base58 test vectors
    assert b58encode(b"") == ""
    assert b58encode(b"\0") == "1"
    assert b58encode(b"\0\0\0") == "111"
    assert b58encode(b"hello world") == "StV1DL6CwTryKyV"
    assert b58encode(bytes.fromhex("0000287fb4cd")) == "11233QC4"
    assert b58decode("StV1DL6CwTryKyV") == b"hello world"
    assert b58decode("11233QC4") == bytes.fromhex("0000287fb4cd")
    assert b58decode("") == b""


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=80),
                 st.tuples(st.integers(0, 8), st.binary(max_size=40)).map(lambda t: b"\0" * t[0] + t[1])))
def test_b58_roundtrip(data):
    text = b58encode(data)
    assert set(text) <= set("123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz")
    assert b58decode(text) == data
    # every leading zero byte is one leading "1", and nothing else is a leading "1"
    zeros = len(data) - len(data.lstrip(b"\0"))
    assert len(text) - len(text.lstrip("1")) == zeros


@pytest.mark.parametrize("char", ["0", "O", "I", "l", "+", "/", " ", "é"])
def test_b58_rejects_characters_outside_the_alphabet(char):
    with pytest.raises(IdentityError) as info:
        b58decode("Qm" + char + "abc")
    assert repr(char) in str(info.value)


# ---- PeerID -----------------------------------------------------------------------------------


def test_peer_id_derivation_is_deterministic():
    key = Ed25519PrivateKey.generate()
    a, b = Identity(key), Identity(key)
    assert a.peer_id == b.peer_id
    assert a.public_key == b.public_key and len(a.public_key) == 32
    assert a.peer_id == PeerID.from_public_key(a.public_key)
    assert a.peer_id.raw == b"\x12\x20" + hashlib.sha256(a.public_key).digest()
    assert hash(a.peer_id) == hash(b.peer_id)
    assert Identity().peer_id != a.peer_id


def test_peer_id_from_known_public_key():
    # an all-zero 32-byte key: the multihash is fixed, so is the printed form
    pid = PeerID.from_public_key(b"\0" * 32)
    assert pid.raw == b"\x12\x20" + hashlib.sha256(b"\0" * 32).digest()
    assert PeerID.from_base58(str(pid)) == pid


@pytest.mark.parametrize("_", range(20))
def test_peer_id_base58_roundtrip(_):
    pid = Identity().peer_id
    text = str(pid)
    assert text == pid.to_base58()
    assert text.startswith("Qm") and len(text) == 46
    assert PeerID.from_base58(text) == pid
    assert repr(pid) == f"PeerID({text})"
    assert pid.short() == "…" + text[-8:]


def test_peer_ids_are_ordered_and_hashable():
    ids = [Identity().peer_id for _ in range(10)]
    assert sorted(ids) == sorted(ids, key=lambda p: p.raw)
    assert len(set(ids + ids)) == 10


@pytest.mark.parametrize("text", [
    "",
    "Qm",
    "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N0",  # '0' is not base58
    "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5",  # 45 characters: too short
    "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5NN",  # 47 characters: too long
    "1" * 46,
    "zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz",  # right length, wrong multihash prefix
    "StV1DL6CwTryKyV",
])
def test_invalid_peer_id_strings(text):
    with pytest.raises(IdentityError) as info:
        PeerID.from_base58(text)
    message = str(info.value)
    assert "not a valid PeerID" in message
    assert repr(text) in message


def test_invalid_peer_id_bytes():
    with pytest.raises(IdentityError, match="34-byte"):
        PeerID(b"\x12\x20" + b"\0" * 31)
    with pytest.raises(IdentityError, match="34-byte"):
        PeerID(b"\x13\x20" + b"\0" * 32)  # not sha2-256
    with pytest.raises(IdentityError, match="34-byte"):
        PeerID("\x12\x20" + "a" * 32)  # str, not bytes
    with pytest.raises(IdentityError, match="32 bytes, got 31"):
        PeerID.from_public_key(b"\0" * 31)


def test_peer_id_matches():
    a, b = Identity(), Identity()
    assert a.peer_id.matches(a.public_key)
    assert not a.peer_id.matches(b.public_key)
    assert not a.peer_id.matches(a.public_key[:31])
    assert not a.peer_id.matches(a.public_key + b"\0")
    assert not a.peer_id.matches(b"")


# ---- key files --------------------------------------------------------------------------------


def test_load_or_create_creates_a_private_file(tmp_path):
    path = tmp_path / "sub" / "dir" / "identity.key"
    created = Identity.load_or_create(path)
    assert path.is_file()
    if os.name == "posix":
        assert stat.S_IMODE(os.stat(path).st_mode) & 0o777 == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    loaded = Identity.load_or_create(path)
    assert loaded.peer_id == created.peer_id
    assert loaded.public_key == created.public_key
    assert Identity.from_file(str(path)).peer_id == created.peer_id
    # the loaded key signs like the original
    assert verify_signature(created.public_key, loaded.sign(b"msg"), b"msg")


def test_load_or_create_does_not_overwrite(tmp_path):
    path = tmp_path / "id.key"
    first = Identity.load_or_create(path)
    content = path.read_bytes()
    for _ in range(3):
        assert Identity.load_or_create(path).peer_id == first.peer_id
    assert path.read_bytes() == content


@pytest.mark.parametrize("content", [b"", b"hello", b"\0\xff" * 50,
                                     b"-----BEGIN PRIVATE KEY-----\nnot base64!\n-----END PRIVATE KEY-----\n"])
def test_file_that_is_not_a_pem_key(tmp_path, content):
    path = tmp_path / "garbage.key"
    path.write_bytes(content)
    for load in (Identity.from_file, Identity.load_or_create):
        with pytest.raises(IdentityError) as info:
            load(path)
        assert str(path) in str(info.value)
        assert "not a PEM private key" in str(info.value)


def _pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@pytest.mark.parametrize("make_key", [
    lambda: rsa.generate_private_key(public_exponent=65537, key_size=1024),
    lambda: ec.generate_private_key(ec.SECP256R1()),
], ids=["rsa", "ecdsa"])
def test_file_with_another_key_type(tmp_path, make_key):
    path = tmp_path / "other.key"
    path.write_bytes(_pem(make_key()))
    for load in (Identity.from_file, Identity.load_or_create):
        with pytest.raises(IdentityError) as info:
            load(path)
        assert str(path) in str(info.value)
        assert "expected an Ed25519 private key" in str(info.value)
    # the file is left alone
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")


def test_encrypted_key_file_is_refused(tmp_path):
    path = tmp_path / "encrypted.key"
    key = Ed25519PrivateKey.generate()
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.BestAvailableEncryption(b"secret")))
    with pytest.raises(IdentityError) as info:
        Identity.from_file(path)
    assert str(path) in str(info.value)


def test_private_bytes_roundtrip(tmp_path):
    identity = Identity()
    path = tmp_path / "k.pem"
    path.write_bytes(identity.private_bytes())
    assert Identity.from_file(path).peer_id == identity.peer_id
    assert repr(identity) == f"Identity({identity.peer_id})"


# ---- signatures -------------------------------------------------------------------------------


def test_sign_and_verify():
    a, b = Identity(), Identity()
    message = b"swarm-p2p/1 responder" + os.urandom(32)
    signature = a.sign(message)
    assert len(signature) == 64
    assert verify_signature(a.public_key, signature, message)
    # Ed25519 is deterministic
    assert a.sign(message) == signature
    # tampered message
    assert not verify_signature(a.public_key, signature, message + b"x")
    assert not verify_signature(a.public_key, signature, message[:-1])
    assert not verify_signature(a.public_key, signature, bytes([message[0] ^ 1]) + message[1:])
    # tampered signature
    for i in (0, 31, 32, 63):
        bad = bytearray(signature)
        bad[i] ^= 0x80
        assert not verify_signature(a.public_key, bytes(bad), message)
    # wrong key
    assert not verify_signature(b.public_key, signature, message)
    # malformed key or signature: False, never an exception
    assert not verify_signature(a.public_key[:31], signature, message)
    assert not verify_signature(b"", signature, message)
    assert not verify_signature(a.public_key, signature[:63], message)
    assert not verify_signature(a.public_key, b"", message)
    assert not verify_signature(a.public_key, b"\0" * 64, message)


@settings(max_examples=50, deadline=None)
@given(st.binary(max_size=256), st.binary(min_size=1, max_size=256))
def test_signature_binds_the_message(message, other):
    identity = _SHARED_IDENTITY
    signature = identity.sign(message)
    assert verify_signature(identity.public_key, signature, message)
    if other != message:
        assert not verify_signature(identity.public_key, signature, other)


_SHARED_IDENTITY = Identity()
