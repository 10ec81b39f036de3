"""Bad input against a live server over real sockets: it must refuse it and keep serving.

One server (a P2P peer on 127.0.0.1 with an ``echo`` handler) runs for the whole module on its own
event loop in a background thread. Every hypothesis example opens fresh sockets from the test thread
(``asyncio.run`` per example). After the attacks, a real P2P client must still be able to call the
server, and the server must not have logged an internal error (a bug in a frame handler) or let an
exception escape to its event loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
import threading

import msgpack
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from dht import P2P, ConnectionLostError, HandshakeError, IncompatibleVersionError, Limits, ProtocolError
from dht.peer.handshake import PeerInfo, SecureChannel, initiate, respond
from dht.peer.identity import Identity
from dht.peer.multiplex import (CANCEL, DATA, END, ERROR, FLAG_END, FLAG_MORE, GOAWAY, HEADER, OPEN, PING, PONG,
                           WINDOW)

FUZZ = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])
MAX_FRAME = Limits().max_frame_size
CLIENT = Identity()


# ---- the server under attack ------------------------------------------------------------------


class _ErrorLog(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class Server:
    """A P2P peer running in a background thread with its own event loop."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.loop_errors: list[dict] = []
        self.loop.set_exception_handler(lambda loop, context: self.loop_errors.append(context))
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-server", daemon=True)
        self.p2p: P2P | None = None
        self.calls = 0

    def start(self) -> None:
        self.thread.start()
        self.p2p = self.submit(self._create())
        address = self.p2p.get_visible_addresses()[0]
        assert address.host == "127.0.0.1"
        self.address, self.port, self.peer_id = address, address.port, self.p2p.peer_id

    async def _create(self) -> P2P:
        p2p = await P2P.create(host="127.0.0.1", limits=Limits(handshake_timeout=3.0))

        async def echo(request, ctx):
            self.calls += 1
            return request

        p2p.add_unary_handler("echo", echo)
        return p2p

    def take_internal_errors(self) -> list[str]:
        """Errors logged by the server (bar handler failures) or escaped to its loop since the last call."""
        records, self.error_log.records = self.error_log.records, []
        errors, self.loop_errors = self.loop_errors, []
        return [r.getMessage() for r in records if not r.getMessage().startswith("handler of")] + \
            [str(context.get("exception") or context.get("message")) for context in errors]

    def check_clean(self) -> None:
        errors = self.take_internal_errors()
        assert not errors, f"the server logged internal errors or leaked exceptions: {errors}"

    def submit(self, coro, timeout: float = 15.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        try:
            if self.p2p is not None:
                self.submit(self.p2p.shutdown())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            if not self.thread.is_alive():
                self.loop.close()


@pytest.fixture(scope="module")
def server():
    log = _ErrorLog()
    dht_logger = logging.getLogger("dht")
    dht_logger.addHandler(log)
    srv = Server()
    srv.error_log = log
    try:
        srv.start()
        yield srv
    finally:
        dht_logger.removeHandler(log)
        srv.stop()


async def _echo_call(address, value) -> None:
    client = await P2P.create(host="127.0.0.1", client_mode=True)
    try:
        assert await client.call(address, "echo", value, timeout=5) == value
    finally:
        await client.shutdown()


def assert_alive(server: Server) -> None:
    """A real client can still call the server, and nothing went wrong inside it."""
    before = server.calls
    value = {"alive": os.urandom(8), "n": [1, 2.5, None]}
    asyncio.run(_echo_call(server.address, value))
    assert server.calls == before + 1
    assert server.thread.is_alive()
    server.check_clean()
    pending = server.submit(_pending_handshakes(server.p2p))
    assert pending < 64, f"{pending} handshakes still pending"


async def _pending_handshakes(p2p: P2P) -> int:
    return len(p2p._transport._pending)


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        await writer.wait_closed()
    except (ConnectionError, OSError):
        pass


async def _read_until_eof(reader: asyncio.StreamReader, timeout: float) -> bytes:
    received = bytearray()

    async def read_all():
        while chunk := await reader.read(65536):
            received.extend(chunk)

    try:
        await asyncio.wait_for(read_all(), timeout)
    except ConnectionError:
        pass
    return bytes(received)


async def _read_until_closed(channel: SecureChannel, timeout: float = 5.0) -> None:
    """Read (and check) frames until the server closes the connection: ConnectionLostError."""

    async def read_all():
        while True:
            _check_server_frame(await channel.read_frame())

    await asyncio.wait_for(read_all(), timeout)


# ---- a. raw bytes instead of a handshake ------------------------------------------------------


def _framed(payload: bytes) -> bytes:
    return struct.pack("!I", len(payload)) + payload


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 63, 2 ** 64 - 1) | st.floats() | st.text(max_size=20)
    | st.binary(max_size=40) | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=12)),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)

raw_inputs = st.one_of(
    st.binary(max_size=3000),
    st.sampled_from([
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        b"SSH-2.0-OpenSSH_9.6\r\n",
        b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + b"\0" * 32,  # a TLS ClientHello start
        b"\xff\xff\xff\xff",  # 4 GiB length prefix
        b"\x00\x00\x00\x00",  # empty frame
        b"\x00\x00\x10\x01" + b"\x80" * 64,  # 4097 bytes: just over the limit
        b"\x00\x00\x10\x00" + b"\xc1" * 4096,  # at the limit, reserved msgpack byte
        b"\x7f\xff\xff\xff" + b"A" * 1000,
        b"\r\n" * 100,
        b"",
    ]),
    st.builds(lambda n, body: struct.pack("!I", n) + body, st.integers(0, 2 ** 32 - 1), st.binary(max_size=64)),
    st.builds(lambda v: _framed(msgpack.packb(v, use_bin_type=True)), msgpack_values),
    st.builds(lambda v, rest: _framed(msgpack.packb(v, use_bin_type=True)) + rest, msgpack_values,
              st.binary(max_size=200)),
)


async def _poke(port: int, data: bytes, half_close: bool) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        if half_close:
            writer.write_eof()
            # the server must give up on us promptly once it has seen the end of our bytes
            answer = await _read_until_eof(reader, 5.0)
            assert reader.at_eof(), "the server kept a connection open after garbage and EOF"
            event(f"server answered {'something' if answer else 'nothing'} before closing")
    except ConnectionError:
        pass  # the server closed first: fine
    finally:
        await _close(writer)


@FUZZ
@given(data=raw_inputs, half_close=st.booleans())
def test_a_random_bytes_instead_of_handshake(server, data, half_close):
    asyncio.run(_poke(server.port, data, half_close))
    server.check_clean()


def test_a_server_alive_after_random_bytes(server):
    assert_alive(server)


# ---- b. random msgpack values as the first handshake message ---------------------------------

_hello_fields = {
    "p": st.sampled_from(["swarm-p2p", "swarm-p2p ", "", "libp2p"]) | st.text(max_size=8) | msgpack_values,
    "versions": st.lists(st.sampled_from([1, 0, 2, 99, -1, 2 ** 64 - 1, True, 1.0, "1", None]) | msgpack_values,
                         max_size=5) | msgpack_values,
    "ciphers": st.lists(st.sampled_from(["aes256gcm", "chacha20poly1305", "AES256GCM", ""]) | msgpack_values,
                        max_size=4) | msgpack_values,
    "e": st.binary(min_size=32, max_size=32) | st.just(b"\0" * 32) | st.just(b"\x01" + b"\0" * 31)
         | st.binary(max_size=40) | msgpack_values,
}
# mostly plausible hellos (right protocol name, list-typed fields) so the fuzzing reaches the
# version/cipher negotiation and the key exchange, plus arbitrary maps and values
plausible_hellos = st.fixed_dictionaries({
    "p": st.just("swarm-p2p"),
    "versions": st.lists(st.sampled_from([1, 0, 2, 99, -1, 2 ** 64 - 1, True, 1.0, "1", None]), max_size=4),
    "ciphers": st.lists(st.sampled_from(["aes256gcm", "chacha20poly1305", "AES256GCM", ""]), max_size=3),
}, optional={"e": _hello_fields["e"], "extra": msgpack_values})
first_messages = st.one_of(plausible_hellos, plausible_hellos, st.fixed_dictionaries({}, optional=_hello_fields),
                           msgpack_values)


async def _hello(port: int, message, trailer: bytes) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(_framed(msgpack.packb(message, use_bin_type=True)) + trailer)
        await writer.drain()
        writer.write_eof()
        answer = await _read_until_eof(reader, 5.0)
        assert reader.at_eof(), "the server kept a bad handshake open after EOF"
        if answer:
            # whatever the server said first must itself be a well-formed handshake frame
            (n,) = struct.unpack("!I", answer[:4])
            assert 0 < n <= 4096
            reply = msgpack.unpackb(answer[4:4 + n], raw=False)
            assert isinstance(reply, dict)
            assert ("error" in reply and reply["versions"] == [1]) or reply.get("version") == 1
            event("server refused the version" if "error" in reply else "server went on with the handshake")
        else:
            event("server closed silently")
    except ConnectionError:
        pass
    finally:
        await _close(writer)


@FUZZ
@given(message=first_messages, trailer=st.sampled_from([b""]) | st.binary(max_size=100))
def test_b_random_msgpack_as_first_handshake_message(server, message, trailer):
    asyncio.run(_hello(server.port, message, trailer))
    server.check_clean()


def test_b_incompatible_hello_gets_an_explanation(server):
    async def go():
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            writer.write(_framed(msgpack.packb({"p": "swarm-p2p", "versions": [7, 8], "ciphers": ["aes256gcm"],
                                                "e": os.urandom(32)})))
            answer = await _read_until_eof(reader, 5.0)
        finally:
            await _close(writer)
        reply = msgpack.unpackb(answer[4:], raw=False)
        assert reply["versions"] == [1]
        assert "[7, 8]" in reply["error"] and "[1]" in reply["error"]

    asyncio.run(go())
    assert_alive(server)


def test_b_server_alive_after_bad_hellos(server):
    assert_alive(server)


# ---- c. garbage after a valid handshake -------------------------------------------------------


async def _handshake(port: int, peer_id, identity: Identity = CLIENT, versions=(1,)):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        channel = await asyncio.wait_for(
            initiate(reader, writer, identity, PeerInfo(), f"127.0.0.1:{port}", peer_id, MAX_FRAME,
                     versions=versions), 5)
    except BaseException:
        await _close(writer)
        raise
    return channel, writer


def _frame(ftype: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(ftype, flags, stream_id) + payload


def _packed(value) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


stream_ids = st.sampled_from([1, 1, 3, 5]) | st.sampled_from([0, 2, 7, 2 ** 32 - 1]) | st.integers(0, 2 ** 32 - 1)
flags = st.sampled_from([0, FLAG_MORE, FLAG_END, FLAG_MORE | FLAG_END]) | st.integers(0, 255)
open_payloads = st.one_of(
    st.fixed_dictionaries({"m": st.sampled_from(["echo", "p2p.ping", "nope", "", "x" * 300]) | msgpack_values,
                           "t": st.none() | st.floats() | st.integers(-5, 10 ** 8) | msgpack_values}).map(_packed),
    msgpack_values.map(_packed),
    st.binary(max_size=40),
)
error_payloads = st.one_of(
    st.fixed_dictionaries({"c": msgpack_values, "m": msgpack_values}).map(_packed),
    msgpack_values.map(_packed),
    st.binary(max_size=40),
)
data_payloads = st.one_of(msgpack_values.map(_packed), st.binary(max_size=200),
                          msgpack_values.map(_packed).map(lambda b: b[:-1] if len(b) > 1 else b"\xc1"))
window_payloads = st.one_of(st.integers(0, 2 ** 32 - 1).map(lambda n: struct.pack("!I", n)),
                            st.binary(max_size=8))


@st.composite
def structured_frames(draw, types=st.integers(0, 12)):
    ftype = draw(types)
    payload = {
        OPEN: open_payloads, ERROR: error_payloads, DATA: data_payloads, GOAWAY: error_payloads,
        WINDOW: window_payloads, PING: st.binary(max_size=16), PONG: st.binary(max_size=16),
    }.get(ftype, st.binary(max_size=16))
    return _frame(ftype, draw(flags), draw(stream_ids), draw(payload))


# mostly frames of known types (which keep the connection open more often, so later frames reach
# the stream logic), some of any type 0-12, some plain random plaintexts
frame_lists = st.lists(st.one_of(structured_frames(st.integers(1, 9)), structured_frames(st.integers(1, 9)),
                                 structured_frames(), st.binary(max_size=64)), min_size=1, max_size=6)


def _check_server_frame(frame: bytes) -> tuple[int, int, int, bytes]:
    """Frames the server sends must be well-formed whatever we sent it."""
    assert len(frame) >= HEADER.size
    ftype, fflags, stream_id = HEADER.unpack_from(frame)
    payload = frame[HEADER.size:]
    assert ftype in (OPEN, DATA, END, ERROR, CANCEL, WINDOW, PING, PONG, GOAWAY), ftype
    if ftype == ERROR:
        body = msgpack.unpackb(payload, raw=False)
        assert isinstance(body["c"], str) and isinstance(body["m"], str)
    if ftype == GOAWAY:
        assert isinstance(msgpack.unpackb(payload, raw=False)["m"], str)
    return ftype, fflags, stream_id, payload


async def _frame_session(port: int, peer_id, frames: list[bytes], open_echo_first: bool) -> None:
    channel, writer = await _handshake(port, peer_id)
    try:
        if open_echo_first:
            channel.write_frame(_frame(OPEN, 0, 1, _packed({"m": "echo", "t": 5})))
        for frame in frames:
            channel.write_frame(frame)
        # a PING after the garbage: the server reads frames in order, so it must either answer it
        # (it handled everything before) or close the connection, and do so promptly
        token = os.urandom(8)
        channel.write_frame(_frame(PING, 0, 0, token))
        await channel.drain()
        async def until_pong_or_closed():
            while True:
                try:
                    frame = await channel.read_frame()
                except ConnectionLostError:
                    event("server closed the connection")  # it broke the protocol
                    return
                ftype, _, _, payload = _check_server_frame(frame)
                if ftype == PONG and payload == token:
                    event("server answered the PING")
                    return

        await asyncio.wait_for(until_pong_or_closed(), 5)
    except (ConnectionLostError, ConnectionError):
        event("server closed the connection while we were writing")
    finally:
        channel.close()
        await channel.wait_closed()


@FUZZ
@given(frames=frame_lists, open_echo_first=st.booleans())
def test_c_random_frames_after_handshake(server, frames, open_echo_first):
    asyncio.run(_frame_session(server.port, server.peer_id, frames, open_echo_first))
    server.check_clean()


def test_c_server_alive_after_random_frames(server):
    assert_alive(server)


async def _read_stream_frames(channel: SecureChannel, stream_id: int) -> list[tuple[int, int, bytes]]:
    """Frames of ``stream_id`` until ERROR, or DATA/END with the END flag."""
    out = []

    async def read():
        while True:
            ftype, fflags, sid, payload = _check_server_frame(await channel.read_frame())
            if sid != stream_id:
                continue
            out.append((ftype, fflags, payload))
            if ftype in (ERROR, END) or (ftype == DATA and fflags & FLAG_END):
                return out

    return await asyncio.wait_for(read(), 5)


def test_c_unknown_method_and_malformed_open(server):
    async def go():
        channel, _ = await _handshake(server.port, server.peer_id)
        try:
            assert channel.remote_peer_id == server.peer_id
            channel.write_frame(_frame(OPEN, 0, 1, _packed({"m": "no.such.method", "t": None})))
            [(ftype, _, payload)] = await _read_stream_frames(channel, 1)
            assert ftype == ERROR
            body = msgpack.unpackb(payload, raw=False)
            assert body["c"] == "unknown_method" and "no.such.method" in body["m"]

            for sid, bad in [(3, b"\xc1"), (5, _packed([1, 2])), (7, _packed({"m": 5})),
                             (9, _packed({"m": "echo", "t": -1})), (11, _packed({"m": ""}))]:
                channel.write_frame(_frame(OPEN, 0, sid, bad))
                [(ftype, _, payload)] = await _read_stream_frames(channel, sid)
                assert ftype == ERROR and msgpack.unpackb(payload, raw=False)["c"] == "bad_request"

            # after all that, a well-formed call on the same connection works
            channel.write_frame(_frame(OPEN, 0, 13, _packed({"m": "echo", "t": 5})))
            channel.write_frame(_frame(DATA, FLAG_END, 13, _packed({"k": [1, b"v"]})))
            frames = await _read_stream_frames(channel, 13)
            assert frames[-1][0] == DATA and frames[-1][1] & FLAG_END
            assert msgpack.unpackb(frames[-1][2], raw=False) == {"k": [1, b"v"]}

            # opening a stream id that belongs to the server is a protocol violation: connection closed
            channel.write_frame(_frame(OPEN, 0, 2, _packed({"m": "echo"})))
            with pytest.raises(ConnectionLostError):
                await _read_until_closed(channel)
        finally:
            channel.close()
            await channel.wait_closed()

    asyncio.run(go())
    assert_alive(server)


def test_c_tampered_ciphertext_closes_the_connection(server):
    async def go():
        channel, writer = await _handshake(server.port, server.peer_id)
        try:
            payload = bytearray(16 + HEADER.size)
            writer.write(struct.pack("!I", len(payload)) + bytes(payload))  # fails authentication
            with pytest.raises(ConnectionLostError):
                await _read_until_closed(channel)
        finally:
            channel.close()
            await channel.wait_closed()

    asyncio.run(go())
    assert_alive(server)


# ---- d. an initiator that cannot prove its key ------------------------------------------------


def _bad_signer(kind: str) -> Identity:
    identity = Identity()
    other = Identity()
    if kind == "random":
        identity.sign = lambda message: os.urandom(64)
    elif kind == "other_key":
        identity.sign = other.sign
    elif kind == "wrong_message":
        real = identity.sign
        identity.sign = lambda message: real(message + b"!")
    elif kind == "short":
        identity.sign = lambda message: os.urandom(63)
    return identity


@pytest.mark.parametrize("kind", ["random", "other_key", "wrong_message", "short"])
def test_d_initiator_with_bad_signature_is_refused(server, kind):
    identity = _bad_signer(kind)

    async def raw():
        # the initiator's proof is its last message, so initiate() itself succeeds; the server then
        # drops the connection instead of serving it
        channel, _ = await _handshake(server.port, server.peer_id, identity=identity)
        try:
            channel.write_frame(_frame(OPEN, 0, 1, _packed({"m": "echo", "t": 5})))
            channel.write_frame(_frame(DATA, FLAG_END, 1, _packed("hi")))
            await channel.drain()
            with pytest.raises(ConnectionLostError):
                await _read_until_closed(channel)
        except ConnectionLostError:
            pass
        finally:
            channel.close()
            await channel.wait_closed()

    async def via_p2p():
        client = await P2P.create(host="127.0.0.1", client_mode=True, identity=identity)
        try:
            with pytest.raises((ConnectionLostError, HandshakeError)):
                await client.call(server.address, "echo", "hi", timeout=5)
        finally:
            await client.shutdown()

    calls = server.calls
    asyncio.run(raw())
    asyncio.run(via_p2p())
    assert server.calls == calls, "the server served a peer that could not prove its identity"
    assert_alive(server)


def test_d_responder_with_bad_signature_is_refused():
    """The mirror image: a listener whose proof is wrong makes initiate() raise HandshakeError."""

    async def go():
        liar = _bad_signer("other_key")
        failures: list[BaseException] = []

        async def on_client(reader, writer):
            try:
                await respond(reader, writer, liar, PeerInfo(), "test", MAX_FRAME)
            except BaseException as e:
                failures.append(e)
            finally:
                writer.close()

        listener = await asyncio.start_server(on_client, "127.0.0.1", 0)
        try:
            port = listener.sockets[0].getsockname()[1]
            for expected in (liar.peer_id, None):
                with pytest.raises(HandshakeError, match="bad signature"):
                    channel, _ = await _handshake(port, expected)
        finally:
            listener.close()
            await listener.wait_closed()
        assert all(isinstance(e, HandshakeError) for e in failures)

    asyncio.run(go())


# ---- e. the peer at the address is not the one expected ---------------------------------------


def test_e_unexpected_peer_id(server):
    expected = Identity().peer_id

    async def raw():
        with pytest.raises(HandshakeError) as info:
            await _handshake(server.port, expected)
        message = str(info.value)
        assert str(expected) in message and str(server.peer_id) in message
        assert f"127.0.0.1:{server.port}" in message

    async def via_p2p():
        client = await P2P.create(host="127.0.0.1", client_mode=True)
        try:
            with pytest.raises(HandshakeError) as info:
                await client.call(server.address.with_peer_id(expected), "echo", 1, timeout=5)
            assert str(expected) in str(info.value) and str(server.peer_id) in str(info.value)
            assert not client.is_connected(server.peer_id)
        finally:
            await client.shutdown()

    asyncio.run(raw())
    asyncio.run(via_p2p())
    assert_alive(server)


# ---- f. no common protocol version ------------------------------------------------------------


@pytest.mark.parametrize("versions", [(99,), (0, 2, 99)])
def test_f_incompatible_versions(server, versions):
    async def go():
        with pytest.raises(IncompatibleVersionError) as info:
            await _handshake(server.port, server.peer_id, versions=versions)
        message = str(info.value)
        assert "99" in message and "1" in message
        assert str(list(versions)) in message  # what we offered
        assert "[1]" in message  # what the server supports
        assert isinstance(info.value, HandshakeError)

    asyncio.run(go())
    assert_alive(server)


def test_f_newer_client_with_a_common_version_connects(server):
    async def go():
        channel, _ = await _handshake(server.port, server.peer_id, versions=(1, 99))
        try:
            assert channel.version == 1
            channel.write_frame(_frame(OPEN, 0, 1, _packed({"m": "echo", "t": 5})))
            channel.write_frame(_frame(DATA, FLAG_END, 1, _packed(42)))
            frames = await _read_stream_frames(channel, 1)
            assert msgpack.unpackb(frames[-1][2], raw=False) == 42
        finally:
            channel.close()
            await channel.wait_closed()

    asyncio.run(go())


def test_z_server_survived_everything(server):
    assert_alive(server)
    # and many clients at once
    async def many():
        await asyncio.gather(*(_echo_call(server.address, i) for i in range(10)))

    asyncio.run(many())
    assert_alive(server)


# ---- g. the encrypted frame reader, raw -------------------------------------------------------


def test_g_frames_sent_with_the_last_handshake_message_and_of_every_size(monkeypatch):
    """Frames written right behind M4 (they reach the responder in the same read as M4, before its
    channel exists), then frames from 0 bytes to beyond max_frame_size in one burst, arrive intact
    and in order, also after the receive buffer shrank back; a frame that fails authentication ends
    the channel with ProtocolError."""
    from dht.peer.handshake import _FrameReader

    monkeypatch.setattr(_FrameReader, "_SHRINK_AFTER", 0.0)  # shrink as soon as the buffer is empty

    async def go():
        received: asyncio.Queue = asyncio.Queue()
        server_channels: list[SecureChannel] = []

        async def on_client(reader, writer):
            channel = await respond(reader, writer, Identity(), PeerInfo(), "test", MAX_FRAME)
            server_channels.append(channel)
            try:
                while True:
                    await received.put(await channel.read_frame())
            except Exception as e:  # noqa: BLE001 - handed to the test
                await received.put(e)
            finally:
                channel.close()

        listener = await asyncio.start_server(on_client, "127.0.0.1", 0)
        try:
            port = listener.sockets[0].getsockname()[1]
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            channel = await initiate(reader, writer, Identity(), PeerInfo(), "test", None, MAX_FRAME)
            sizes = [1, 5, 0, 70_000, MAX_FRAME + 40, 3, (64 << 10) - 1, MAX_FRAME // 2, 17]
            frames = [bytes([i]) * n for i, n in enumerate(sizes)]
            for frame in frames[:2]:  # no await since initiate() returned: same segment as M4
                channel.write_frame(frame)
            for frame in frames[2:]:  # the rest in one burst, each as head + data
                channel.write_frame(frame[1:], head=frame[:1])
            await channel.drain()
            for expected in frames:
                got = await asyncio.wait_for(received.get(), 10)
                assert isinstance(got, bytes) and got == expected, (len(expected), got if isinstance(got, Exception) else len(got))
            reader_side = server_channels[0]._frames
            assert reader_side is not None and len(reader_side._buf) == _FrameReader._INITIAL  # grew, then shrank
            for frame in (b"after", bytes(range(256)) * 4000, b"small again"):
                channel.write_frame(frame)
                await channel.drain()
                assert await asyncio.wait_for(received.get(), 10) == frame
            # a tampered frame: flip one ciphertext byte on the wire
            n = 16 + 10
            raw = bytearray(struct.pack("!I", n) + os.urandom(n))
            writer.write(bytes(raw))
            await writer.drain()
            outcome = await asyncio.wait_for(received.get(), 10)
            assert isinstance(outcome, ProtocolError) and "authentication" in str(outcome)
            channel.close()
        finally:
            listener.close()
            await listener.wait_closed()

    asyncio.run(go())
