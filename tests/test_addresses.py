"""Peer addresses: parsing, printing, errors, interface discovery and wildcard listening."""

import ipaddress

import pytest

from dht import P2P
from dht.peer.addresses import AddressError, PeerAddress, interface_addresses
from dht.peer.identity import Identity

PID = Identity().peer_id
OTHER = Identity().peer_id


@pytest.mark.parametrize("text, protocol, host, port", [
    ("/ip4/127.0.0.1/tcp/31337", "ip4", "127.0.0.1", 31337),
    ("/ip4/0.0.0.0/tcp/0", "ip4", "0.0.0.0", 0),
    ("/ip4/255.255.255.255/tcp/65535", "ip4", "255.255.255.255", 65535),
    ("/ip6/::1/tcp/4001", "ip6", "::1", 4001),
    ("/ip6/2001:db8::7/tcp/80", "ip6", "2001:db8::7", 80),
    ("/dns/example.org/tcp/443", "dns", "example.org", 443),
    ("/dns4/bootstrap.swarm.example/tcp/1", "dns4", "bootstrap.swarm.example", 1),
    ("/dns6/localhost/tcp/2", "dns6", "localhost", 2),
    ("/memory/peer-7", "memory", "peer-7", 0),
])
@pytest.mark.parametrize("with_peer_id", [True, False])
def test_parse_format_roundtrip(text, protocol, host, port, with_peer_id):
    full = f"{text}/p2p/{PID}" if with_peer_id else text
    address = PeerAddress.parse(full)
    assert address.protocol == protocol
    assert address.host == host
    assert address.port == port
    assert address.peer_id == (PID if with_peer_id else None)
    assert str(address) == full
    assert PeerAddress.parse(str(address)) == address
    assert repr(address) == f"PeerAddress({full!r})"
    # with_peer_id / without_peer_id
    assert address.without_peer_id() == PeerAddress.parse(text)
    assert str(address.with_peer_id(OTHER)) == f"{text}/p2p/{OTHER}"
    assert hash(address) == hash(PeerAddress.parse(full))


def test_ip_hosts_are_normalized():
    assert PeerAddress.parse("/ip6/0:0:0:0:0:0:0:1/tcp/5").host == "::1"
    assert str(PeerAddress.parse("/ip6/2001:DB8:0::1/tcp/5")) == "/ip6/2001:db8::1/tcp/5"
    assert PeerAddress.parse("  /ip4/10.0.0.1/tcp/5  ").host == "10.0.0.1"


def test_from_host_port():
    assert str(PeerAddress.from_host_port("127.0.0.1", 5, PID)) == f"/ip4/127.0.0.1/tcp/5/p2p/{PID}"
    assert str(PeerAddress.from_host_port("::1", 6)) == "/ip6/::1/tcp/6"
    assert str(PeerAddress.from_host_port("example.org", 7)) == "/dns/example.org/tcp/7"


@pytest.mark.parametrize("text, fragment", [
    ("/udp/127.0.0.1/tcp/1", "unsupported protocol 'udp'"),
    ("/ip5/127.0.0.1/tcp/1", "unsupported protocol 'ip5'"),
    ("/ip4/127.0.0.256/tcp/1", "bad ip4 host"),
    ("/ip4/localhost/tcp/1", "bad ip4 host"),
    ("/ip4/::1/tcp/1", "bad ip4 host"),
    ("/ip6/127.0.0.1/tcp/1", "bad ip6 host"),
    ("/ip6/:::1/tcp/1", "bad ip6 host"),
    ("/dns//tcp/1", "bad dns host"),
    ("/ip4/127.0.0.1/tcp/70000", "bad TCP port '70000'"),
    ("/ip4/127.0.0.1/tcp/65536", "bad TCP port '65536'"),
    ("/ip4/127.0.0.1/tcp/abc", "bad TCP port 'abc'"),
    ("/ip4/127.0.0.1/tcp/-1", "bad TCP port '-1'"),
    ("/ip4/127.0.0.1/tcp/", "bad TCP port ''"),
    ("/ip4/127.0.0.1/udp/1", "expected /ip4/HOST/tcp/PORT"),
    ("/ip4/127.0.0.1/tcp", "expected /ip4/HOST/tcp/PORT"),
    ("/ip4/127.0.0.1", "expected /ip4/HOST/tcp/PORT"),
    ("/ip4/127.0.0.1/tcp/1/extra", "expected /ip4/HOST/tcp/PORT"),
    ("/ip4/127.0.0.1/tcp/1/", "expected /ip4/HOST/tcp/PORT"),
    ("/ip4", "expected /ip4/HOST/tcp/PORT"),
    ("ip4/127.0.0.1/tcp/1", "expected /ip4/HOST/tcp/PORT"),
    ("", "expected /ip4/HOST/tcp/PORT"),
    ("/", "expected /ip4/HOST/tcp/PORT"),
    ("/memory", "expected /ip4/HOST/tcp/PORT"),
    ("/memory/", "expected /memory/NAME"),
    ("/memory/a/b", "expected /memory/NAME"),
    ("/ip4/127.0.0.1/tcp/1/p2p/QmNotAPeerId", "not a valid PeerID"),
    ("/ip4/127.0.0.1/tcp/1/p2p/", "not a valid PeerID"),
    ("/memory/x/p2p/Qm0000", "not a valid PeerID"),
    (f"/p2p/{PID}", "unsupported protocol 'p2p'"),
])
def test_parse_errors(text, fragment):
    with pytest.raises(AddressError) as info:
        PeerAddress.parse(text)
    message = str(info.value)
    assert fragment in message
    assert repr(text) in message  # the offending text is quoted


@pytest.mark.parametrize("value", [None, 5, b"/ip4/127.0.0.1/tcp/1"])
def test_parse_refuses_non_strings(value):
    with pytest.raises(AddressError, match="must be a string"):
        PeerAddress.parse(value)


@pytest.mark.parametrize("port", ["²", "٨٠"])
def test_parse_error_for_non_ascii_port_digits(port):
    with pytest.raises(AddressError, match="bad TCP port"):
        PeerAddress.parse(f"/ip4/127.0.0.1/tcp/{port}")


def test_interface_addresses():
    found = interface_addresses()
    assert found[0] == "127.0.0.1"
    assert len(found) == len(set(found))
    for host in found:
        ip = ipaddress.ip_address(host)
        assert not ip.is_link_local
        assert "%" not in host
    v4_only = interface_addresses(include_ipv6=False)
    assert v4_only[0] == "127.0.0.1"
    assert all(ipaddress.ip_address(h).version == 4 for h in v4_only)
    assert set(v4_only) <= set(found)
    # loopback addresses come first
    flags = [ipaddress.ip_address(h).is_loopback for h in found]
    assert flags == sorted(flags, reverse=True)


async def test_wildcard_listener_is_reachable_on_loopback():
    server = client = None
    try:
        server = await P2P.create(host="0.0.0.0")
        client = await P2P.create(host="127.0.0.1")
        visible = server.get_visible_addresses()
        assert visible, "a listening peer reports at least one address"
        first = visible[0]
        assert first.protocol == "ip4" and first.host == "127.0.0.1"
        assert first.port > 0
        assert first.peer_id == server.peer_id
        assert all(a.protocol == "ip4" and a.port == first.port for a in visible)  # 0.0.0.0: IPv4 only
        assert "0.0.0.0" not in {a.host for a in visible}
        rtt = await client.ping(first, timeout=5)
        assert 0 <= rtt < 5
        # the printed form works too, and the call is authenticated as the server
        assert await client.connect(str(first)) == server.peer_id
        assert client.is_connected(server.peer_id)
    finally:
        for peer in (client, server):
            if peer is not None:
                await peer.shutdown()
