"""The handshake's wire format, pinned: a transcript recorded before the sans-IO rewrite must come out
byte for byte, from the state machines and from the asyncio path over a real loopback socket.

``tests/vectors/handshake.json`` was recorded with the code of commit b04c9ef (the handshake written
directly on asyncio streams), with fixed Ed25519 identities and fixed X25519 ephemeral keys: M1-M4
and the first encrypted frame each way for both ciphers (the chacha20poly1305 session is the one
whose initiator offers only that cipher), the derived keys and transcript hash, and the bytes of
the busy and the incompatible-version refusals. Ed25519 signatures and AEAD with fixed keys and
counter nonces are deterministic, so every byte is fixed.
"""

from __future__ import annotations

import asyncio
import json
import pathlib

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from dht.peer.channel import PeerInfo
from dht.peer.errors import HandshakeError, IncompatibleVersionError
from dht.peer.handshake import SecureChannel, initiate, respond
from dht.peer.handshake_state import (CIPHERS, HandshakeResult, InitiatorHandshake, PeerBusyError, ResponderHandshake,
                                      busy_reply, nonce)
from dht.peer.identity import Identity

VECTOR = json.loads((pathlib.Path(__file__).parent / "vectors" / "handshake.json").read_text())
KEYS = {name: bytes.fromhex(value) for name, value in VECTOR["keys"].items()}
TRANSCRIPTS = {t["cipher"]: {k: bytes.fromhex(v) if k not in ("cipher", "offered_ciphers") else v for k, v in t.items()}
               for t in VECTOR["transcripts"]}
FRAME_I = bytes.fromhex(VECTOR["first_plaintext_i_to_r"])
FRAME_R = bytes.fromhex(VECTOR["first_plaintext_r_to_i"])
MAX_FRAME = VECTOR["max_frame_size"]
ciphers = pytest.mark.parametrize("cipher", sorted(TRANSCRIPTS))


def identity(name: str) -> Identity:
    return Identity(Ed25519PrivateKey.from_private_bytes(KEYS[name]))


def ephemeral(name: str) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(KEYS[name])


def info(name: str) -> PeerInfo:
    wire = VECTOR[name]
    return PeerInfo(wire["addrs"], wire["window"], wire["max_msg"])


def machines(cipher: str) -> tuple[InitiatorHandshake, ResponderHandshake]:
    offered = tuple(TRANSCRIPTS[cipher]["offered_ciphers"])
    initiator = InitiatorHandshake(identity("initiator_identity"), info("initiator_info"), "test",
                                   identity("responder_identity").peer_id, ciphers=offered,
                                   ephemeral=ephemeral("initiator_ephemeral"))
    responder = ResponderHandshake(identity("responder_identity"), info("responder_info"), "test",
                                   ephemeral=ephemeral("responder_ephemeral"))
    return initiator, responder


def sealed_frame(cipher: str, key: bytes, counter: int, plaintext: bytes) -> bytes:
    """A frame after the handshake, as the format in dht.peer.handshake's docstring defines it."""
    header = (len(plaintext) + 16).to_bytes(4, "big")
    return header + CIPHERS[cipher](key).encrypt(nonce(counter), plaintext, header)


@ciphers
def test_state_machines_reproduce_the_recorded_transcript(cipher):
    t = TRANSCRIPTS[cipher]
    initiator, responder = machines(cipher)
    assert initiator.initial_bytes == t["m1"]
    assert responder.receive_data(t["m1"]) == t["m2"] + t["m3"]
    assert initiator.receive_data(t["m2"] + t["m3"]) == t["m4"]
    assert responder.receive_data(t["m4"]) == b""
    ours, theirs = initiator.outcome, responder.outcome
    assert isinstance(ours, HandshakeResult) and isinstance(theirs, HandshakeResult)
    assert (ours.send_key, ours.recv_key) == (theirs.recv_key, theirs.send_key) == (t["key_i_to_r"], t["key_r_to_i"])
    assert ours.transcript_hash == theirs.transcript_hash == t["transcript_hash"]
    assert ours.cipher == theirs.cipher == cipher and ours.version == theirs.version == 1
    assert ours.remote_peer_id == identity("responder_identity").peer_id
    assert theirs.remote_peer_id == identity("initiator_identity").peer_id
    assert ours.remote_info == info("responder_info") and theirs.remote_info == info("initiator_info")
    assert sealed_frame(cipher, ours.send_key, 1, FRAME_I) == t["first_frame_i_to_r"]
    assert sealed_frame(cipher, theirs.send_key, 1, FRAME_R) == t["first_frame_r_to_i"]


@ciphers
def test_byte_at_a_time_gives_the_same_bytes_and_keeps_what_follows(cipher):
    t = TRANSCRIPTS[cipher]
    initiator, responder = machines(cipher)
    sent = b"".join(responder.receive_data(t["m1"][i:i + 1]) for i in range(len(t["m1"])))
    assert sent == t["m2"] + t["m3"]
    stream = t["m2"] + t["m3"]
    assert b"".join(initiator.receive_data(stream[i:i + 1]) for i in range(len(stream))) == t["m4"]
    assert initiator.bytes_wanted == 0
    # frames that arrive in the same chunk as the last handshake message are the session's
    assert responder.receive_data(t["m4"] + t["first_frame_i_to_r"]) == b""
    assert responder.outcome.trailing == t["first_frame_i_to_r"]
    with pytest.raises(RuntimeError):
        responder.receive_data(b"more")


def test_refusals_are_the_recorded_bytes():
    r = VECTOR["refusals"]
    assert busy_reply(r["busy_reason"]).hex() == r["busy_reply"]
    responder = ResponderHandshake(Identity(), PeerInfo(), "test")
    assert responder.receive_data(bytes.fromhex(r["incompatible_hello"])).hex() == r["incompatible_reply"]
    assert isinstance(responder.outcome, IncompatibleVersionError)
    assert str(responder.outcome) == r["incompatible_error"]
    for reply, error, text in ((r["busy_reply"], PeerBusyError, "refused for now: too many pending"),
                               (r["incompatible_reply"], IncompatibleVersionError, "they support versions [1]")):
        initiator = InitiatorHandshake(Identity(), PeerInfo(), "test")
        assert initiator.receive_data(bytes.fromhex(reply)) == b""
        assert type(initiator.outcome) is error and text in str(initiator.outcome)


def test_closed_before_any_reply_reads_as_busy_for_the_initiator():
    initiator = InitiatorHandshake(Identity(), PeerInfo(), "192.0.2.1:4001")
    initiator.receive_eof("IncompleteReadError")
    assert isinstance(initiator.outcome, PeerBusyError) and "busy?" in str(initiator.outcome)
    responder = ResponderHandshake(Identity(), PeerInfo(), "192.0.2.1:4001")
    responder.receive_data(TRANSCRIPTS["aes256gcm"]["m1"][:10])
    responder.receive_eof("ConnectionResetError")
    assert type(responder.outcome) is HandshakeError
    assert str(responder.outcome) == ("handshake from 192.0.2.1:4001: connection closed during the handshake "
                                      "(ConnectionResetError)")


def test_a_wrong_expected_peer_id_is_refused_before_m4():
    t = TRANSCRIPTS["aes256gcm"]
    stranger = Identity().peer_id
    initiator = InitiatorHandshake(identity("initiator_identity"), info("initiator_info"), "test", stranger,
                                   ephemeral=ephemeral("initiator_ephemeral"))
    assert initiator.receive_data(t["m2"] + t["m3"]) == b""  # no M4: nothing about us is revealed
    assert isinstance(initiator.outcome, HandshakeError) and str(stranger) in str(initiator.outcome)


async def _capture(listen_port: int, log: dict[str, bytearray]) -> asyncio.base_events.Server:
    """A TCP proxy on loopback that forwards to ``listen_port`` and records each direction."""

    async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter, record: bytearray) -> None:
        try:
            while data := await source.read(65536):
                record += data
                sink.write(data)
                await sink.drain()
        except ConnectionError:
            pass
        finally:
            sink.close()

    async def on_client(reader, writer):
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", listen_port)
        await asyncio.gather(pipe(reader, upstream_writer, log["i_to_r"]), pipe(upstream_reader, writer, log["r_to_i"]))

    return await asyncio.start_server(on_client, "127.0.0.1", 0)


@ciphers
async def test_the_asyncio_path_puts_the_recorded_bytes_on_a_real_socket(cipher):
    t = TRANSCRIPTS[cipher]
    served: asyncio.Future = asyncio.get_running_loop().create_future()

    async def on_client(reader, writer):
        try:
            channel = await respond(reader, writer, identity("responder_identity"), info("responder_info"), "test",
                                    MAX_FRAME, ephemeral=ephemeral("responder_ephemeral"))
            channel.write_frame(FRAME_R)
            served.set_result((channel, await channel.read_frame()))
        except Exception as e:  # noqa: BLE001 - handed to the test
            served.set_exception(e)

    listener = await asyncio.start_server(on_client, "127.0.0.1", 0)
    log = {"i_to_r": bytearray(), "r_to_i": bytearray()}
    proxy = await _capture(listener.sockets[0].getsockname()[1], log)
    channel: SecureChannel | None = None
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.sockets[0].getsockname()[1])
        channel = await asyncio.wait_for(
            initiate(reader, writer, identity("initiator_identity"), info("initiator_info"), "test",
                     identity("responder_identity").peer_id, MAX_FRAME, ciphers=tuple(t["offered_ciphers"]),
                     ephemeral=ephemeral("initiator_ephemeral")), 10)
        channel.write_frame(FRAME_I)
        assert await asyncio.wait_for(channel.read_frame(), 10) == FRAME_R
        server_channel, got = await asyncio.wait_for(served, 10)
        assert got == FRAME_I
        assert channel.remote_peer_id == identity("responder_identity").peer_id
        assert server_channel.remote_peer_id == identity("initiator_identity").peer_id
        assert bytes(log["i_to_r"]) == t["m1"] + t["m4"] + t["first_frame_i_to_r"]
        assert bytes(log["r_to_i"]) == t["m2"] + t["m3"] + t["first_frame_r_to_i"]
        server_channel.close()
    finally:
        if channel is not None:
            channel.close()
        proxy.close()
        listener.close()
