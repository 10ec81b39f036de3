"""Averaging behaviour users rely on (issue 19, points 1-4), over real sockets on loopback: groups
mixing reachable and client-mode members, Moshpit keys on a grid, steps cancelled right after their
group formed (the others retry until their deadline), and a member that freezes (its event loop
stalls) never gets a healthy one excluded. Several dht.DHT facades in one process, each with its
own event-loop thread; ``step`` called from threads at the same time."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import os
import time
from typing import Any, Callable, Iterator, Sequence

import pytest
import torch

from averaging import Averager, AveragingError, StepResult
from averaging.matchmaking import next_group_bits
from averaging.partition import flatten
from dht import DHT
from tests.test_averager import step_all, weighted_mean

pytestmark = pytest.mark.slow

SHAPES = [(5, 7), (31,)]  # 66 values
FAST = dict(min_matchmaking_time=0.8, request_timeout=0.4, sender_timeout=2.0)
REACHABLE, CLIENTS = 8, 3


@pytest.fixture(scope="module")
def swarm() -> Iterator[tuple[list[DHT], list[DHT]]]:
    """(reachable peers, client-mode peers: they dial out but accept no connections)."""
    reachable: list[DHT] = []
    clients: list[DHT] = []
    try:
        reachable.append(DHT(host="127.0.0.1"))
        initial = reachable[0].get_visible_addresses()
        for _ in range(REACHABLE - 1):
            reachable.append(DHT(initial_peers=initial, host="127.0.0.1"))
        for _ in range(CLIENTS):
            clients.append(DHT(initial_peers=initial, host="127.0.0.1", client_mode=True))
        yield reachable, clients
    finally:
        for d in reachable + clients:
            d.shutdown()


def make_tensors(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for shape in SHAPES]


@contextlib.contextmanager
def averagers(dhts: Sequence[DHT], prefix: str, options: Sequence[dict] | None = None,
              **common: Any) -> Iterator[list[Averager]]:
    made: list[Averager] = []
    prefix = f"{prefix}-{os.urandom(4).hex()}"  # module-scoped DHTs: no leftovers from another test
    try:
        for i, dht in enumerate(dhts):
            extra = options[i] if options else {}
            made.append(Averager(make_tensors(100 + i), dht, prefix, **{**FAST, **common, **extra}))
        yield made
    finally:
        for a in made:
            a.shutdown()


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def after_group_formed(averager: Averager, action: Callable[[], None]) -> list[Any]:
    """Run ``action`` in ``averager``'s event loop each time its matchmaking found a group, before
    the all-reduce starts (a fault injected at that moment); returns the list of groups found."""
    matchmaker = averager._matchmaker
    original = matchmaker.look_for_group
    found: list[Any] = []

    async def look_for_group(deadline: float, info: dict):
        group = await original(deadline, info)
        found.append(group)
        action()
        return group

    matchmaker.look_for_group = look_for_group
    return found


def when_begin_arrives(averager: Averager, action: Callable[[], None]) -> None:
    """Run ``action`` in ``averager``'s event loop when, as a follower, it receives its leader's
    ``begin`` message (before it ends its search): e.g. ``time.sleep`` freezes the whole peer, as
    SIGSTOP would, at the moment the others start the round."""
    matchmaker = averager._matchmaker
    original = matchmaker._parse_begin

    def parse_begin(begin: dict):
        parsed = original(begin)
        if matchmaker._leader is not None:  # a follower (a leader parses its own begin before sending it)
            action()
        return parsed

    matchmaker._parse_begin = parse_begin


def cancel_own_step() -> None:
    """Cancel the step that is running (the task calling this): as ``future.cancel()`` would."""
    asyncio.current_task().cancel()


# ---- 1. client-mode members ---------------------------------------------------------------------

@pytest.mark.parametrize("reachable,clients", [(1, 2), (2, 2), (1, 3), (2, 3)])
def test_any_mix_of_reachable_and_client_members_gets_the_exact_mean(swarm, reachable, clients):
    """Two or more client-mode members in one group used to fail: they tried to exchange failure
    reports directly, which they cannot (neither accepts connections). Reports of clients now go
    through the reachable members; every member ends with the exact weighted mean, bit-identical."""
    dhts = swarm[0][:reachable] + swarm[1][:clients]
    n = len(dhts)
    weights = [1.0 + 0.5 * i for i in range(n)]
    with averagers(dhts, f"mix{reachable}{clients}", target_group_size=n, min_group_size=n) as group:
        assert [a.client_mode for a in group] == [False] * reachable + [True] * clients
        for round_ in range(2):
            before = [flatten(a.tensors) for a in group]
            results = step_all(group, weight=weights)
            for r in results:
                assert isinstance(r, StepResult), f"round {round_}: step failed: {r!r}"
                assert r.survivors == r.members and len(r.members) == n and r.recovered_ranges == []
            expected = weighted_mean(before, weights)
            after = [flatten(a.tensors) for a in group]
            for flat in after:
                assert torch.allclose(flat.double(), expected, rtol=1e-6, atol=1e-6)
                assert torch.equal(bits(flat), bits(after[0]))
            group[0].tensors[0].add_(1.0)


def test_clients_agree_when_a_client_member_freezes(swarm):
    """A client-mode member that stalls right after the group formed is excluded by everyone alike:
    the other client learns through the reachable members that nobody heard from it, and the three
    healthy members (one of them a client) end with the exact mean over themselves."""
    dhts = swarm[0][:2] + swarm[1][:2]
    with averagers(dhts, "client-freeze", target_group_size=4, min_group_size=4, sender_timeout=1.0) as group:
        when_begin_arrives(group[3], lambda: time.sleep(4.0))  # its whole event loop stalls
        before = [flatten(a.tensors) for a in group]
        results = step_all(group, timeout=[10.0, 10.0, 10.0, 3.0], allow_retries=False)
        healthy = [d.peer_id for d in dhts[:3]]
        for r in results[:3]:
            assert isinstance(r, StepResult), f"step failed: {r!r}"
            assert sorted(r.survivors) == sorted(healthy)
        expected = weighted_mean(before[:3], [1.0] * 3)
        for a in group[:3]:
            assert torch.allclose(flatten(a.tensors).double(), expected, rtol=1e-6, atol=1e-6)


# ---- 2. Moshpit keys ----------------------------------------------------------------------------

def simulate_grid(n: int, key_bits: int, target: int, rounds: int, seed: int) -> list[list[int]]:
    """Group sizes of each round when ``n`` peers start with keys spread evenly over ``2**key_bits``
    and groups are whole keys (as matchmaking forms them with target_group_size >= the key's peers)."""
    keys = [format(i % 2 ** key_bits, f"0{key_bits}b") for i in range(n)]
    sizes = []
    for round_ in range(rounds):
        by_key = collections.defaultdict(list)
        for peer, key in enumerate(keys):
            by_key[key].append(peer)
        sizes.append(sorted(len(v) for v in by_key.values()))
        for key, members in by_key.items():
            group_id = f"{seed}-{round_}-{key}".encode()
            for index, peer in enumerate(members):
                keys[peer] = next_group_bits(key, group_id, index, len(members), target)
    return sizes


@pytest.mark.parametrize("n,key_bits,target", [(8, 2, 2), (16, 2, 4), (32, 4, 2), (64, 4, 4), (64, 3, 4)])
def test_moshpit_keys_keep_every_key_populated(n, key_bits, target):
    """Keys shift by log2(target) bits and append bits distinct within the group, so on a full grid
    every key holds the same number of peers every round (replacing the whole key at random left some
    keys empty and others crowded: 2-4 of 8 peers found no group in later rounds)."""
    for seed in range(20):
        for round_, sizes in enumerate(simulate_grid(n, key_bits, target, 6, seed)):
            assert sizes == [n // 2 ** key_bits] * 2 ** key_bits, (seed, round_, sizes)


def test_group_mates_never_share_their_next_key():
    """After any round, no two members of a group share a key in the next round, as long as the group
    is at most 2**shift members (the shift being log2 of the target group size)."""
    rng = __import__("random").Random(0)
    for _ in range(1000):
        key_bits = rng.randint(1, 8)
        target = rng.choice([2, 3, 4, 8, 16])
        size = rng.randint(2, target)
        key = "".join(rng.choice("01") for _ in range(key_bits))
        group_id = os.urandom(20)
        keys = [next_group_bits(key, group_id, i, size, target) for i in range(size)]
        assert all(len(k) == key_bits for k in keys)
        if size <= 2 ** key_bits:
            assert len(set(keys)) == size, (key, target, size, keys)


def test_grid_of_eight_reaches_the_global_mean_in_three_rounds(swarm):
    """8 peers on a 2x2x2 grid (2-bit keys, groups of 2): every peer is in a group of 2 every round,
    the mean is preserved, and after 3 rounds every peer holds the global mean."""
    dhts = swarm[0][:8]
    options = [{"initial_group_bits": format(i // 2, "02b")} for i in range(8)]
    with averagers(dhts, "grid", options, target_group_size=2, min_group_size=2, min_matchmaking_time=2.0) as group:
        flats = [flatten(a.tensors) for a in group]
        mean = torch.stack(flats).double().mean(0)
        assert not all(torch.allclose(f.double(), mean, atol=1e-3) for f in flats)
        for round_ in range(3):
            counts = collections.Counter(a.group_bits for a in group)
            assert sorted(counts.values()) == [2, 2, 2, 2], f"round {round_}: keys {counts}"
            results = step_all(group, timeout=8.0)
            for r in results:
                assert isinstance(r, StepResult), f"round {round_}: step failed: {r!r}"
                assert len(r.members) == 2 and r.survivors == r.members
            flats = [flatten(a.tensors) for a in group]
            assert torch.allclose(torch.stack(flats).double().mean(0), mean, atol=1e-5)
        for flat in flats:
            assert torch.allclose(flat.double(), mean, atol=1e-5)


# ---- 3. retries after a cancelled member --------------------------------------------------------

def test_a_member_cancelling_after_its_group_formed_lets_the_partner_retry(swarm):
    """A and B form a pair; B cancels its step right after the group formed. A's round fails at once
    (B refuses part streams for a round it gave up) and A looks for another group until its deadline:
    it averages with C, who arrives later. B's tensors are unchanged."""
    a_dht, b_dht, c_dht = swarm[0][:3]
    with averagers([a_dht, b_dht, c_dht], "cancel-retry", target_group_size=2, min_group_size=2) as (a, b, c):
        after_group_formed(b, cancel_own_step)
        before = [flatten(x.tensors) for x in (a, b, c)]
        future_a, future_b = a.step(wait=False, timeout=12.0), b.step(wait=False, timeout=12.0)
        with pytest.raises(concurrent.futures.CancelledError):
            future_b.result(timeout=12.0)
        time.sleep(1.0)  # A's first round is over by now (it failed); C arrives
        result_c = c.step(timeout=10.0)
        result_a = future_a.result(timeout=12.0)
        assert isinstance(result_a, StepResult) and isinstance(result_c, StepResult)
        assert set(result_a.members) == {a_dht.peer_id, c_dht.peer_id} == set(result_c.survivors)
        expected = weighted_mean([before[0], before[2]], [1.0, 1.0])
        for x in (a, c):
            assert torch.allclose(flatten(x.tensors).double(), expected, rtol=1e-6, atol=1e-6)
        assert torch.equal(bits(flatten(b.tensors)), bits(before[1]))


def test_without_retries_the_partner_of_a_cancelled_member_fails_at_once(swarm):
    """With ``allow_retries=False`` the partner's step fails, and it fails before its sender timeout
    (before: it waited for the cancelled member's values for sender_timeout, and for its part for
    reducer_timeout or the part streams' join_wait, 10 s): the cancelled member refuses its round's
    streams at once, and an owner that failed is no longer waited for as a sender."""
    a_dht, b_dht = swarm[0][:2]
    with averagers([a_dht, b_dht], "cancel-noretry", target_group_size=2, min_group_size=2,
                   sender_timeout=6.0) as (a, b):
        after_group_formed(b, cancel_own_step)
        before = flatten(a.tensors)
        started = time.monotonic()
        future_a, future_b = a.step(wait=False, timeout=30.0, allow_retries=False), b.step(wait=False, timeout=30.0)
        with pytest.raises(AveragingError):
            future_a.result(timeout=30.0)
        assert time.monotonic() - started < 6.0  # the sender timeout (matchmaking included)
        assert future_b.cancelled()
        assert torch.equal(bits(flatten(a.tensors)), bits(before))


@pytest.mark.parametrize("when", ["at once", "after the group formed"])
def test_two_of_four_cancelling_leaves_the_other_two_averaging(swarm, when):
    """Four peers (two in client mode, as in hivemind's scenario) step; peers 0 and 1 cancel theirs,
    either at once or right after their group formed. Peers 2 and 3 still average together (before:
    their step failed when their partner was one of the cancelled, about 3 runs in 11). Five runs.
    A cancelled peer's step ends cancelled, or failed if it found no group before it cancelled."""
    dhts = [swarm[1][0], swarm[0][0], swarm[1][1], swarm[0][1]]  # clients at 0 and 2
    with averagers(dhts, f"cancel-two-{when[:2]}", target_group_size=2, min_group_size=2) as group:
        if when != "at once":
            for i in (0, 1):
                after_group_formed(group[i], cancel_own_step)
        for run in range(5):
            before = [flatten(a.tensors) for a in group]
            futures = [a.step(wait=False, timeout=10.0) for a in group]
            if when == "at once":  # (a pair finishes in some 50 ms on loopback: no pause before cancelling)
                for i in (0, 1):
                    futures[i].cancel()
            for i in (0, 1):
                try:
                    outcome = futures[i].result(timeout=12.0)
                except concurrent.futures.CancelledError:
                    continue
                except AveragingError:
                    continue
                assert False, f"run {run}: peer {i}'s step was cancelled, yet returned {outcome!r}"
            results = [f.result(timeout=12.0) for f in futures[2:]]
            assert all(isinstance(r, StepResult) for r in results), f"run {run}: {results!r}"
            assert set(results[0].members) == {dhts[2].peer_id, dhts[3].peer_id}, f"run {run}"
            expected = weighted_mean(before[2:], [1.0, 1.0])
            for a in group[2:]:
                assert torch.allclose(flatten(a.tensors).double(), expected, rtol=1e-6, atol=1e-6)
            for a, flat in zip(group[:2], before[:2]):
                assert torch.equal(bits(flatten(a.tensors)), bits(flat))
            group[2].tensors[0].add_(1.0)


# ---- 4. a frozen member never gets a healthy one excluded ------------------------------------------

@pytest.mark.parametrize("timeouts", [dict(request_timeout=1.0, sender_timeout=1.0),
                                      dict(request_timeout=2.0, sender_timeout=1.0)])
def test_a_frozen_member_never_gets_a_healthy_one_excluded(swarm, timeouts):
    """Three members; the last to join stalls its event loop (as SIGSTOP would) right after the group
    formed. The healthy two must both survive with the exact mean over themselves. Before: ending the
    search waited for the withdrawal of the declaration, a DHT store that reaches the frozen peer, so
    a healthy member started up to request_timeout late and was excluded when request_timeout >=
    sender_timeout."""
    dhts = swarm[0][:3]
    with averagers(dhts, "frozen", target_group_size=3, min_group_size=3, min_matchmaking_time=3.0,
                   **timeouts) as group:
        when_begin_arrives(group[2], lambda: time.sleep(4.0))  # the last to join: a follower
        for round_ in range(2):
            before = [flatten(a.tensors) for a in group]
            results = step_all(group, delays=[0.0, 0.1, 0.4], timeout=[10.0, 10.0, 3.0], allow_retries=False)
            healthy = {dhts[0].peer_id, dhts[1].peer_id}
            for r in results[:2]:
                assert isinstance(r, StepResult), f"round {round_}: step failed: {r!r}"
                assert set(r.survivors) == healthy, f"round {round_}"
            expected = weighted_mean(before[:2], [1.0, 1.0])
            for a in group[:2]:
                assert torch.allclose(flatten(a.tensors).double(), expected, rtol=1e-6, atol=1e-6)


def test_a_reducer_timeout_too_short_for_a_stalled_member_is_refused(swarm):
    """An owner cannot reduce while it waits (up to sender_timeout) for a stalled member's values, so
    a reducer_timeout below 1.5 x sender_timeout would make its senders drop a healthy owner."""
    with pytest.raises(ValueError, match="reducer_timeout"):
        Averager(make_tensors(0), swarm[0][0], "short-reducer", sender_timeout=2.0, reducer_timeout=2.0)
    with pytest.raises(ValueError, match="sender_timeout"):
        Averager(make_tensors(0), swarm[0][0], "no-sender", sender_timeout=0.0)
    Averager(make_tensors(0), swarm[0][0], "ok-reducer", sender_timeout=2.0, reducer_timeout=3.0).shutdown()
