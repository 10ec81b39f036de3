"""Reachability (dial-back) verdicts and the NAT service over real sockets on loopback.

A "NATed" peer on loopback: it listens on 127.0.0.2 only, while its connections to the helpers (on
127.0.0.1) leave from 127.0.0.1, so the helpers observe an IP that is none of its own and find nothing
listening there, as a helper on the internet sees a peer behind an address translator.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dht import P2P, DHTNode, RemoteError
from dht.peer.addresses import AddressError, PeerAddress
from dht.peer.errors import BadRequestError, P2PError
from dht.peer.identity import Identity
from dht.peer.nat import NatOptions, NatService
from dht.peer.reachability import (
    DIALBACK_METHOD,
    FIREWALLED,
    NAT,
    PUBLIC,
    UNKNOWN,
    DialBackService,
    check_reachability,
    verdict_line,
)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs 127.0.0.2 on loopback")

LINE = re.compile(r"^nat: verdict=(public|nat|firewalled|unknown) helpers=(\d+)/(\d+) reached=(\d+) "
                  r"observed=(\S+) port=(\S+) seconds=([\d.]+) advice=\"[^\"]*\"$")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.asynccontextmanager
async def helpers(n: int):
    peers = [await P2P.create(host="127.0.0.1") for _ in range(n)]
    for p in peers:
        DialBackService(p)
    try:
        yield peers
    finally:
        await asyncio.gather(*(p.shutdown() for p in peers))


async def connect_all(subject: P2P, peers: list[P2P]) -> list:
    return [await subject.connect(p.get_visible_addresses()[0]) for p in peers]


async def test_verdicts_public_firewalled_nat_unknown():
    async with helpers(3) as hs:
        public = await P2P.create(host="127.0.0.1")
        firewalled = await P2P.create(host="127.0.0.1", announce=[f"/ip4/127.0.0.1/tcp/{closed_port()}"])
        natted = await P2P.create(host="127.0.0.2")
        try:
            for subject, expected in ((public, PUBLIC), (firewalled, FIREWALLED), (natted, NAT)):
                ids = await connect_all(subject, hs)
                result = await check_reachability(subject, ids, timeout=10.0)
                assert result.verdict == expected, (expected, result)
                assert result.answered == 3 and result.seconds < 10.0
                assert result.observed_ip == "127.0.0.1"
                assert LINE.match(verdict_line(result)), verdict_line(result)
            few = await check_reachability(natted, ids[:2], timeout=10.0, min_helpers=3)
            assert few.verdict == UNKNOWN and few.answered == 2
            assert "forward TCP port" in (await check_reachability(natted, ids, timeout=5)).advice
        finally:
            await asyncio.gather(public.shutdown(), firewalled.shutdown(), natted.shutdown())


async def test_helper_dials_only_the_requesters_observed_ip_and_is_rate_limited():
    async with helpers(1) as (helper,):
        requester = await P2P.create(host="127.0.0.1")
        bystander = await P2P.create(host="127.0.0.3")
        try:
            port = requester.get_visible_addresses()[0].port
            # asks to be dialled at 127.0.0.3 (the bystander's IP, with the bystander's port): dialled at its own IP
            request = {"v": 1, "addrs": [f"/ip4/127.0.0.3/tcp/{bystander.get_visible_addresses()[0].port}",
                                         f"/ip4/127.0.0.3/tcp/{port}"]}
            answer = await requester.call(helper.get_visible_addresses()[0], DIALBACK_METHOD, request, timeout=10)
            assert answer["ip"] == "127.0.0.1"
            assert [r["addr"] for r in answer["results"]] == [
                f"/ip4/127.0.0.1/tcp/{bystander.get_visible_addresses()[0].port}", f"/ip4/127.0.0.1/tcp/{port}"]
            assert [r["ok"] for r in answer["results"]] == [False, True]
            assert bystander.num_connections == (0, 0)  # never dialled on the requester's behalf
            for bad in ({"v": 2, "addrs": ["/ip4/127.0.0.1/tcp/1"]}, {"v": 1, "addrs": []}, {"v": 1, "addrs": ["x"]},
                        {"v": 1, "addrs": ["/ip4/127.0.0.1/tcp/1"] * 5}, [1, 2]):
                with pytest.raises(RemoteError) as info:
                    await requester.call(helper.get_visible_addresses()[0], DIALBACK_METHOD, bad, timeout=5)
                assert info.value.code == "bad_request"
            codes = []
            for _ in range(4):  # burst of 3 per peer (one spent above)
                try:
                    await requester.call(helper.get_visible_addresses()[0], DIALBACK_METHOD, request, timeout=10)
                    codes.append("ok")
                except RemoteError as e:
                    codes.append(e.code)
            assert codes.count("ok") == 2 and codes[-1] == "overloaded", codes
        finally:
            await asyncio.gather(requester.shutdown(), bystander.shutdown())


async def test_dht_node_behind_nat_switches_to_client_mode_and_logs_the_verdict(caplog):
    nodes = [await DHTNode.create(host="127.0.0.1")]
    for _ in range(2):
        nodes.append(await DHTNode.create([nodes[0].p2p.get_visible_addresses()[0]], host="127.0.0.1"))
    try:
        with caplog.at_level("INFO", logger="dht.peer.nat"):
            natted = await DHTNode.create([nodes[0].p2p.get_visible_addresses()[0]], host="127.0.0.2",
                                          nat=NatOptions(min_helpers=2, use_relay="off"))
            nodes.append(natted)
        assert isinstance(natted.p2p.nat, NatService) and natted.p2p.nat.verdict == NAT
        assert natted.client_mode
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("nat: ")]
        assert len(lines) == 1 and LINE.match(lines[0]) and "verdict=nat" in lines[0], lines
        public = await DHTNode.create([nodes[0].p2p.get_visible_addresses()[0]], host="127.0.0.1",
                                      nat=NatOptions(min_helpers=2))
        nodes.append(public)
        assert public.p2p.nat.verdict == PUBLIC and not public.client_mode
    finally:
        await asyncio.gather(*(n.shutdown() for n in nodes))


async def test_natted_dht_node_reserves_relays_and_is_reached_through_them():
    from swarm.metrics import Metrics
    from swarm.status import PeerView, collect_status

    nodes = [await DHTNode.create(host="127.0.0.1")]
    for _ in range(2):
        nodes.append(await DHTNode.create([nodes[0].p2p.get_visible_addresses()[0]], host="127.0.0.1"))
    try:
        natted = await DHTNode.create([nodes[0].p2p.get_visible_addresses()[0]], host="127.0.0.2",
                                      nat=NatOptions(min_helpers=2, holepunch=False))
        nodes.append(natted)
        service = natted.p2p.nat
        for _ in range(200):
            if len(service.relay_client.held) == 2:
                break
            await asyncio.sleep(0.02)
        assert len(service.relay_client.held) == 2 and service.relayed
        visible = natted.p2p.get_visible_addresses()
        assert visible and all(a.relay is not None for a in visible)  # direct addresses are not announced
        assert service.relay_service is not None and not service.relay_service.enabled  # it cannot relay
        caller = await P2P.create(host="127.0.0.1")
        NatService(caller, NatOptions(check=False, holepunch=False))
        try:
            natted.p2p.add_unary_handler("test.echo", _echo)
            assert await caller.call(visible[0], "test.echo", "hi", timeout=10) == "hi"
        finally:
            await caller.nat.close()
            await caller.shutdown()
        status = await collect_status(natted, local=PeerView(role="dht"))
        assert status["self"]["nat"]["verdict"] == NAT and len(status["self"]["nat"]["relays"]) == 2
        relay_status = await collect_status(nodes[0], local=PeerView(role="dht"))
        assert relay_status["self"]["nat"]["relay_reservations"] + \
            (await collect_status(nodes[1], local=PeerView(role="dht")))["self"]["nat"]["relay_reservations"] + \
            (await collect_status(nodes[2], local=PeerView(role="dht")))["self"]["nat"]["relay_reservations"] == 2
        text = Metrics(natted, PeerView(role="dht")).render().decode()
        assert 'swarm_nat_verdict{verdict="nat"} 1.0' in text and "swarm_nat_relays_held 2.0" in text
    finally:
        await asyncio.gather(*(n.shutdown() for n in nodes))


async def _echo(request, ctx):
    return request


# ---- parsers: hostile input gets a clear error, nothing else (hypothesis)
_IDS = [Identity().peer_id for _ in range(2)]
_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=300) | st.binary(max_size=40),
                       lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=8), inner,
                                                                                   max_size=5), max_leaves=20)


@settings(max_examples=150, deadline=None)
@given(st.ip_addresses(v=4) | st.ip_addresses(v=6), st.integers(0, 65535), st.booleans(), st.booleans())
def test_relay_addresses_round_trip(ip, port, with_peer, relayed):
    proto = "ip4" if ip.version == 4 else "ip6"
    address = PeerAddress(proto, str(ip), port, _IDS[0] if with_peer else None, _IDS[1] if relayed else None)
    parsed = PeerAddress.parse(str(address))
    assert parsed == address and str(parsed) == str(address)
    if relayed:
        assert parsed.relay_address() == PeerAddress(proto, str(ip), port, _IDS[1])
        assert parsed.without_peer_id().relay == _IDS[1]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["ip4", "1.2.3.4", "tcp", "5", "p2p", str(_IDS[0]), "relay", "", "x", "memory"]),
                max_size=9))
def test_address_parser_refuses_junk_with_address_error(parts):
    text = "/" + "/".join(parts)
    try:
        PeerAddress.parse(text)
    except AddressError:
        pass


@settings(max_examples=120, deadline=None)
@given(_values | st.fixed_dictionaries({"v": st.just(1), "addrs": st.lists(st.text(max_size=80) | _values,
                                                                            max_size=9)},
                                       optional={"token": st.text(max_size=40)}))
def test_nat_message_parsers_raise_only_clear_errors(message):
    from dht.peer import holepunch, reachability, relay

    for parse in (reachability._parse_request, holepunch._parse_addrs, relay._token, reachability._parse_response):
        try:
            parse(message)
        except (BadRequestError, P2PError):
            pass


def test_relayed_members_are_recognised_for_the_bandwidth_penalty():
    from averaging.matchmaking import RELAYED_BANDWIDTH_SHARE, is_relayed_member

    relay, peer = _IDS
    relayed = f"/ip4/192.0.2.1/tcp/4000/p2p/{relay}/relay"
    assert is_relayed_member([relayed]) and is_relayed_member([relayed, relayed + "/p2p/" + str(peer)])
    assert not is_relayed_member([]) and not is_relayed_member(["/ip4/192.0.2.2/tcp/4000", relayed])
    assert 0 < RELAYED_BANDWIDTH_SHARE < 1


async def test_too_few_helpers_none_reaching_still_holds_relays_besides_direct_addresses():
    public = await DHTNode.create(host="127.0.0.1")
    try:
        natted = await DHTNode.create([public.p2p.get_visible_addresses()[0]], host="127.0.0.2",
                                      nat=NatOptions(min_helpers=3, holepunch=False))
        try:
            service = natted.p2p.nat
            assert service.verdict == UNKNOWN and not natted.client_mode  # one helper: no verdict
            for _ in range(200):
                if service.relay_client.held:
                    break
                await asyncio.sleep(0.02)
            visible = natted.p2p.get_visible_addresses()
            assert any(a.relay == public.peer_id for a in visible) and any(a.relay is None for a in visible)
        finally:
            await natted.shutdown()
    finally:
        await public.shutdown()
