"""swarm.status over real sockets on loopback: collect_status from the DHT's records (schema version 1,
every key present, untrusted records bounded or ignored), the local PeerView, and ``swarm status``
(a separate process) against a real small swarm training on loopback TCP."""

from __future__ import annotations

import json
import socket
import threading
import time
from dataclasses import asdict

import pytest
import torch

from dht import DHT, Identity, get_dht_time
from swarm.optimizer import Optimizer
from swarm.progress import progress_key
from swarm.runs import RUNS_KEY, RUNS_SCHEMA, RunAnnouncement, announce_run
from swarm.status import HISTORY_POINTS, PeerView, collect_status, format_status

from .dht_net import net  # noqa: F401 - the fixture
from .processes import run_swarm

KEYS = {"version", "generated_at", "self", "runs", "peers", "progress", "history", "averaging", "stages", "bans"}
PEER_KEYS = {"peer_id", "address", "role", "stage", "samples_per_second", "reachability", "last_seen_s", "state"}


def _record(node, epoch: int, age: float = 0.0, **extra) -> dict:
    return dict({"peer_id": str(node.peer_id), "epoch": epoch, "samples": 8, "samples_per_second": 4.0, "loss": 0.5,
                 "time": get_dht_time() - age}, **extra)


async def _publish(node, run_id: str, record: dict) -> None:
    now = get_dht_time()
    assert await node.store(progress_key(run_id), record, now + 60, subkey=node.signature_validator.ownership_marker)


async def test_collect_status_from_the_dhts_records(net):  # noqa: F811 - the fixture
    nodes = await net.many(5)
    viewer, creator, stale, leaver, client = nodes
    now = get_dht_time()
    creator.validator.extend([RUNS_SCHEMA])
    announcement = RunAnnouncement("run-a", "task.py", "ab" * 32, str(creator.peer_id), now, target_batch_size=64)
    assert await creator.store(RUNS_KEY, asdict(announcement), now + 600,
                               subkey=f"run-a {creator.signature_validator.ownership_marker}")
    await _publish(creator, "run-a", _record(creator, 3))
    await _publish(stale, "run-a", _record(stale, 2, age=30.0))  # no new record for 30 s: gone
    await _publish(leaver, "run-a", _record(leaver, 3, left=True))
    await _publish(client, "run-a", _record(client, 3, client_mode=True, loss=float("nan")))
    await _publish(client, "run-b", _record(client, 7))  # another run, not announced
    assert await client.store(progress_key("run-b"), {"peer_id": "x" * 5000}, now + 60, subkey="junk")  # malformed

    view = PeerView(role="dht")
    status = await collect_status(viewer, local=view)
    assert set(status) == KEYS and status["version"] == 1
    json.dumps(status, allow_nan=False)  # JSON as it is served: no NaN, no Inf
    assert status["self"]["role"] == "dht" and status["self"]["peer_id"] == str(viewer.peer_id)
    assert status["self"]["addresses"] and status["self"]["run_id"] is None
    runs = {r["run_id"]: r for r in status["runs"]}
    assert set(runs) == {"run-a"}, "an unannounced run shows only when asked for"
    assert runs["run-a"]["peers"] == 2 and runs["run-a"]["epoch"] == 3
    peers = {p["peer_id"]: p for p in status["peers"]}
    assert set(peers) == {str(n.peer_id) for n in (creator, stale, leaver, client)}
    for p in peers.values():
        assert PEER_KEYS <= set(p) and p["role"] == "trainer" and p["stage"] is None
    assert peers[str(creator.peer_id)]["state"] == "training"
    assert peers[str(creator.peer_id)]["reachability"] == "public"
    assert peers[str(creator.peer_id)]["address"].endswith(f"/p2p/{creator.peer_id}")
    assert peers[str(stale.peer_id)]["state"] == "left" and peers[str(stale.peer_id)]["last_seen_s"] >= 29
    assert peers[str(leaver.peer_id)]["state"] == "left"
    assert peers[str(client.peer_id)]["reachability"] == "client" and peers[str(client.peer_id)]["loss"] is None
    progress = status["progress"]
    assert progress["run_id"] == "run-a" and progress["epoch"] == 3 and progress["target_batch_size"] == 64
    assert progress["samples_per_second"] == 8.0 and progress["samples"] >= 16
    assert status["history"]["epoch"] == [3] and len(status["history"]["t"]) == 1

    one = await collect_status(viewer, run_id="run-b")
    assert one["self"] is None and [r["run_id"] for r in one["runs"]] == ["run-b"]
    assert [p["peer_id"] for p in one["peers"]] == [str(client.peer_id)], "the malformed record is ignored"
    assert one["progress"]["epoch"] == 7 and one["progress"]["target_batch_size"] is None
    missing = await collect_status(viewer, run_id="no-such-run")
    assert missing["runs"] == [{"run_id": "no-such-run", "peers": 0, "epoch": 0, "samples_per_second": 0.0,
                                "last_seen_s": None}]
    assert missing["peers"] == [] and missing["progress"]["loss"] is None
    text = format_status(status)
    assert "run-a" in text and str(creator.peer_id)[:16] in text and "left" in text


def test_peer_view_bounds_and_checks():
    view = PeerView(role="trainer", run_id="r")
    for i in range(HISTORY_POINTS + 500):
        view.add_point(i, 1.0 / (i + 1), None, 10.0, t=1000.0 + i)
    assert len(view.history) == HISTORY_POINTS and view.history[-1][1] == HISTORY_POINTS + 499
    assert not view.add_point(1, None, None, 0.0, t=1000.0 + HISTORY_POINTS + 499.5)  # within history_period
    assert view.add_point(1, float("inf"), float("nan"), 0.0, force=True)
    assert view.history[-1][2:4] == (None, None)
    with pytest.raises(ValueError):
        PeerView(role="boss")
    with pytest.raises(ValueError):
        view.set_state("sleeping")
    view.set_state("training")
    assert view.current_state() == "training"


def _trainer(dht: DHT, index: int, stop: threading.Event) -> Optimizer:
    torch.manual_seed(3)
    model = torch.nn.Linear(4, 1)
    opt = Optimizer(dht=dht, run_id="status-run", optimizer=lambda p: torch.optim.Adam(p, 0.05),
                    params=model.parameters(), target_batch_size=64, batch_size_per_step=16,
                    matchmaking_time=0.5, averaging_timeout=10)
    g = torch.Generator().manual_seed(index)
    deadline = time.monotonic() + 120
    while not stop.is_set() and time.monotonic() < deadline:
        x = torch.randn(16, 4, generator=g)
        loss = ((model(x) - x.sum(-1, keepdim=True)) ** 2).mean()
        loss.backward()
        opt.step(loss=loss)
        opt.zero_grad()
        time.sleep(0.02)
    return opt


@pytest.mark.slow
def test_swarm_status_shows_a_real_swarm():
    """Two peers train on loopback TCP; ``swarm status`` (a separate process) shows them."""
    with socket.socket() as s:  # nobody listens there: exit 4, one line
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    unreachable = run_swarm(["status", "--initial-peers", f"/ip4/127.0.0.1/tcp/{port}/p2p/{Identity().peer_id}"])
    assert unreachable.returncode == 4 and unreachable.stderr.startswith("error: "), unreachable.stderr

    stop = threading.Event()
    dhts = [DHT(host="127.0.0.1")]
    threads: list[threading.Thread] = []
    opts: list[Optimizer | None] = [None, None]
    try:
        address = str(dhts[0].get_visible_addresses()[0])
        dhts += [DHT(initial_peers=[address], host="127.0.0.1") for _ in range(2)]
        announce_run(dhts[1], RunAnnouncement("status-run", "tiny.py", "ab" * 32, str(dhts[1].peer_id), time.time(),
                                              64))
        for i in range(2):
            def run(i=i):
                opts[i] = _trainer(dhts[i + 1], i, stop)
            threads.append(threading.Thread(target=run, daemon=True))
            threads[-1].start()
        ids = {str(d.peer_id) for d in dhts[1:]}
        deadline = time.monotonic() + 60
        while True:
            result = run_swarm(["status", "--initial-peers", address, "--run-id", "status-run", "--json"])
            assert result.returncode in (0, 1), result.stderr  # 1: no progress record of the run yet
            status = json.loads(result.stdout)
            online = [p for p in status["peers"] if p["state"] != "left"]
            if len(online) == 2 and status["progress"]["epoch"] >= 2:
                break
            assert time.monotonic() < deadline, f"never saw the swarm: {status}"
            time.sleep(0.5)
        assert {p["peer_id"] for p in online} == ids
        assert status["self"]["role"] == "status" and status["self"]["peer_id"] not in ids
        assert status["runs"][0]["peers"] == 2 and status["progress"]["target_batch_size"] == 64
        whole = run_swarm(["status", "--initial-peers", address])
        assert whole.returncode == 0, whole.stderr
        assert "status-run" in whole.stdout and "PEER" in whole.stdout and "run status-run: epoch" in whole.stdout
        unknown = run_swarm(["status", "--initial-peers", address, "--run-id", "nobody", "--json"])
        assert unknown.returncode == 1 and "no peer of it" in unknown.stderr
        assert json.loads(unknown.stdout)["peers"] == []
        stop.set()
        for t in threads:
            t.join(60)
        # the epoch shown is one the swarm reached (the peers went on training meanwhile)
        assert 2 <= status["progress"]["epoch"] <= max(o.local_epoch for o in opts if o is not None)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
        for o in opts:
            if o is not None:
                o.shutdown()
        for d in dhts:
            d.shutdown()
