"""The handshake state machines (dht.peer.handshake_state) fuzzed in-process with hypothesis.

Whatever arrives, in whatever chunks, a machine ends in a HandshakeError-family outcome, or is still
waiting, or (only for the untouched transcript) succeeds; it never raises anything else and never
holds more than one frame (4 + 4096 bytes). A transcript with any message changed in flight never
lets both sides succeed.
"""

from __future__ import annotations

import msgpack
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from dht.peer.channel import PeerInfo
from dht.peer.errors import HandshakeError
from dht.peer.handshake_state import (CIPHERS, MAX_HANDSHAKE_FRAME, PROTOCOL_NAME, HandshakeResult,
                                      InitiatorHandshake, ResponderHandshake, busy_reply)
from dht.peer.identity import Identity

FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
INITIATOR = Identity(Ed25519PrivateKey.from_private_bytes(b"\x01" * 32))
RESPONDER = Identity(Ed25519PrivateKey.from_private_bytes(b"\x02" * 32))
E_I = X25519PrivateKey.from_private_bytes(b"\x03" * 32)
E_R = X25519PrivateKey.from_private_bytes(b"\x04" * 32)
MOST_BUFFERED = 4 + MAX_HANDSHAKE_FRAME


def initiator(expected=RESPONDER.peer_id) -> InitiatorHandshake:
    return InitiatorHandshake(INITIATOR, PeerInfo(["/ip4/192.0.2.1/tcp/1"]), "test", expected, ephemeral=E_I)


def responder() -> ResponderHandshake:
    return ResponderHandshake(RESPONDER, PeerInfo(["/ip4/192.0.2.2/tcp/2"]), "test", ephemeral=E_R)


def feed(machine, data: bytes, cuts: list[int]) -> bytes:
    """Feed ``data`` cut at ``cuts`` (while the machine takes data); check the invariants after each chunk."""
    out = b""
    bounds = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    for start, end in zip(bounds, bounds[1:]):
        if machine.outcome is not None:
            break
        out += machine.receive_data(data[start:end])
        assert machine.buffered <= MOST_BUFFERED
        assert machine.outcome is None or isinstance(machine.outcome, (HandshakeError, HandshakeResult))
    return out


def framed(message) -> bytes:
    raw = msgpack.packb(message, use_bin_type=True)
    return len(raw).to_bytes(4, "big") + raw


def transcript() -> tuple[bytes, bytes, bytes, bytes]:
    i, r = initiator(), responder()
    m2m3 = r.receive_data(i.initial_bytes)
    m4 = i.receive_data(m2m3)
    r.receive_data(m4)
    assert isinstance(i.outcome, HandshakeResult) and isinstance(r.outcome, HandshakeResult)
    m2_len = 4 + int.from_bytes(m2m3[:4], "big")
    return i.initial_bytes, m2m3[:m2_len], m2m3[m2_len:], m4


M1, M2, M3, M4 = transcript()
KEYS = ["p", "versions", "ciphers", "e", "error", "busy", "version", "cipher", "pub", "sig", "info"]
values = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 63, 2 ** 64 - 1) | st.floats() | st.text(max_size=20)
    | st.binary(max_size=40) | st.sampled_from([PROTOCOL_NAME, 1, [1], list(CIPHERS), b"\x09" * 32, b"\0" * 32]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
messages = st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), values, max_size=6)
cuts = st.lists(st.integers(0, 10_000), max_size=8)
# hellos close to a valid M1, so that the responder gets past it (and answers) often
hellos = st.fixed_dictionaries({"p": st.just(PROTOCOL_NAME) | values, "versions": st.just([1]) | values,
                                "ciphers": st.sampled_from([list(CIPHERS), ["chacha20poly1305"]]) | values,
                                "e": st.just(M1[-32:]) | values})
garbage = st.one_of(
    st.binary(max_size=300),
    messages.map(framed),
    st.integers(0, 2 ** 32 - 1).map(lambda n: n.to_bytes(4, "big") + b"x" * 40),  # any announced length
    st.builds(lambda m, tail: framed(m) + tail, messages, st.binary(max_size=80)),
    st.builds(lambda m, n, tail: framed(m) + n.to_bytes(4, "big") + tail, hellos, st.integers(0, 5000),
              st.binary(max_size=200)),
)


@FUZZ
@given(data=garbage, cuts=cuts, eof=st.booleans())
def test_responder_takes_anything(data, cuts, eof):
    machine = responder()
    sent = feed(machine, data, cuts)
    if eof:
        machine.receive_eof("EOF")
        assert isinstance(machine.outcome, HandshakeError)
    assert not isinstance(machine.outcome, HandshakeResult)
    event(type(machine.outcome).__name__ + (" after answering" if sent else ""))
    if sent:  # M2 + M3, or a refusal listing our versions
        assert len(sent) < 2 * MOST_BUFFERED


@FUZZ
@given(data=garbage, cuts=cuts, eof=st.booleans())
def test_initiator_takes_anything(data, cuts, eof):
    machine = initiator()
    assert feed(machine, data, cuts) == b""  # M4 only after a valid M3, which garbage cannot forge
    if eof:
        machine.receive_eof("EOF")
        assert isinstance(machine.outcome, HandshakeError)
    assert not isinstance(machine.outcome, HandshakeResult)
    event(type(machine.outcome).__name__)


@FUZZ
@given(length=st.integers(0, 5000) | st.just(len(M3) - 4), body=st.binary(max_size=300), cuts=cuts)
def test_initiator_takes_any_m3_after_a_valid_m2(length, body, cuts):
    machine = initiator()
    machine.receive_data(M2)
    assert machine.outcome is None
    assert feed(machine, length.to_bytes(4, "big") + body, cuts) == b""
    assert not isinstance(machine.outcome, HandshakeResult)


mutations = st.tuples(st.integers(0, 3), st.sampled_from(["flip", "cut", "insert", "drop"]), st.integers(0, 10_000),
                      st.integers(1, 255))


def mutate(message: bytes, kind: str, at: int, byte: int) -> bytes:
    at %= len(message)
    if kind == "flip":
        return message[:at] + bytes([message[at] ^ byte]) + message[at + 1:]
    if kind == "cut":
        return message[:at]
    if kind == "insert":
        return message[:at] + bytes([byte]) + message[at:]
    return message[:at] + message[at + 1:]


def split_m2_m3(sent: bytes) -> list[bytes]:
    n = 4 + int.from_bytes(sent[:4], "big")
    return [sent[:n], sent[n:]]


@FUZZ
@given(mutation=st.none() | mutations, cuts=cuts)
def test_a_mutated_transcript_never_lets_both_sides_succeed(mutation, cuts):
    """A man in the middle changes one message (M1, M2, M3 or M4) of a live exchange."""
    which, kind, at, byte = mutation if mutation is not None else (-1, "", 0, 0)

    def on_the_way(index: int, message: bytes) -> bytes:
        return mutate(message, kind, at, byte) if index == which and message else message

    i, r = initiator(), responder()
    m2, m3 = split_m2_m3(feed(r, on_the_way(0, i.initial_bytes), cuts))
    m4 = feed(i, on_the_way(1, m2) + on_the_way(2, m3), cuts)
    if r.outcome is None:
        feed(r, on_the_way(3, m4), cuts)
    for machine in (i, r):  # a truncated message leaves its receiver waiting: the connection then closes
        machine.receive_eof("EOF")
    both = isinstance(i.outcome, HandshakeResult) and isinstance(r.outcome, HandshakeResult)
    assert both == (mutation is None)
    if mutation is None:
        assert (i.initial_bytes, m2, m3, m4) == (M1, M2, M3, M4)
    assert all(isinstance(m.outcome, (HandshakeError, HandshakeResult)) for m in (i, r))


def test_busy_and_oversized_replies():
    machine = initiator()
    machine.receive_data(busy_reply("x" * 10_000))
    assert "refused for now" in str(machine.outcome) and len(str(machine.outcome)) < 300
    machine = responder()
    machine.receive_data((MAX_HANDSHAKE_FRAME + 1).to_bytes(4, "big"))
    assert isinstance(machine.outcome, HandshakeError) and "limit 4096" in str(machine.outcome)
    assert machine.buffered <= 4
