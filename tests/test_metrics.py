"""swarm.metrics and dht.peer.rpc_stats over real sockets on loopback: the Prometheus text parses, the
issue's names exist, counters move during a short real training, and the RPC method label stays
bounded whatever method names a caller sends."""

from __future__ import annotations

import asyncio
import random
import string
import threading
import time

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from dht import DHT, P2P, RemoteError
from dht.peer.rpc_stats import OTHER, SECONDS_BUCKETS, RpcStats
from swarm.metrics import CONTENT_TYPE, Metrics
from swarm.optimizer import Optimizer
from swarm.status import PeerView, collect_status

from .dht_net import addr, net  # noqa: F401 - the fixture

REQUIRED = ["swarm_bytes_sent_total", "swarm_bytes_received_total", "swarm_rpc_seconds",
            "swarm_dht_routing_table_peers", "swarm_dht_records", "swarm_averaging_rounds_total",
            "swarm_averaging_seconds", "swarm_averaging_group_size", "swarm_samples_per_second", "swarm_epoch",
            "swarm_loss", "swarm_state_downloads_total"]


def _parse(metrics: Metrics) -> dict[str, dict[tuple, float]]:
    """sample name -> {sorted label items: value}"""
    samples: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return samples


def _value(samples: dict, name: str, **labels) -> float:
    return samples[name][tuple(sorted(labels.items()))]


def test_rpc_stats_cap_the_method_names():
    stats = RpcStats(max_methods=3)
    for i in range(10):
        stats.entry(f"m{i}", inbound=False).bytes_sent += 1
    assert set(stats.outbound) == {"m0", "m1", "m2", OTHER}
    assert stats.outbound[OTHER].bytes_sent == 7
    stats.unknown_call(20)
    assert stats.inbound[OTHER].bytes_received == 20 and stats.inbound[OTHER].failures == 1
    m = stats.entry("x", inbound=True)
    for seconds in (0.0001, 0.001, 0.3, 1e6):
        m.observe(seconds, failed=False)
    assert m.calls == 4 and sum(m.buckets) == 4 and m.buckets[-1] == 1 and m.buckets[0] == 1
    assert m.buckets[SECONDS_BUCKETS.index(0.001)] == 1


async def test_metrics_parse_and_the_method_label_stays_bounded(net):  # noqa: F811 - the fixture
    first, second = await net.many(2)
    assert await second.store("some-key", b"v", time.time() + 60)
    view = PeerView(role="dht")
    metrics = Metrics(first, view)
    assert CONTENT_TYPE.startswith("text/plain")
    samples = _parse(metrics)
    for name in REQUIRED:
        assert any(s == name or s.startswith(name + "_") for s in samples), name
    families = {f.name for f in text_string_to_metric_families(metrics.render().decode())}
    assert len([f for f in families if f.startswith("swarm_")]) >= 30
    assert _value(samples, "swarm_dht_routing_table_peers") == 1
    assert _value(samples, "swarm_dht_records") >= 1
    assert _value(samples, "swarm_state", state="serving") == 0
    assert _value(samples, "swarm_state", state="starting") == 1
    # the store reached the first node: its server side counted the bytes and the call
    assert _value(samples, "swarm_bytes_received_total", method="dht.store") > 0
    assert _value(samples, "swarm_rpc_seconds_count", method="dht.store", side="server") >= 1

    attacker = await net.raw_peer()
    names = {"".join(random.choices(string.ascii_letters, k=12)) for _ in range(1000)}

    async def call(name: str) -> None:
        with pytest.raises(RemoteError):
            await attacker.call(addr(first), name, {"x": 1}, timeout=5)
    for chunk in [sorted(names)[i:i + 100] for i in range(0, len(names), 100)]:
        await asyncio.gather(*(call(n) for n in chunk))
    assert set(first.p2p.stats.inbound) <= {"dht.ping", "dht.store", "dht.find", "p2p.ping", OTHER}
    assert first.p2p.stats.inbound[OTHER].calls == len(names)
    after = _parse(metrics)
    labelled = {dict(k).get("method") for k in after["swarm_bytes_received_total"]}
    assert labelled <= {"dht.ping", "dht.store", "dht.find", "p2p.ping", OTHER} and OTHER in labelled
    assert len(after["swarm_rpc_seconds_count"]) <= 10
    # the attacker's own counters: the methods it called (its code chose them), capped
    assert len(attacker.stats.outbound) <= attacker.stats.max_methods + 1
    # two peers in one process keep separate registries
    other = Metrics(second, PeerView(role="dht"), process=False)
    assert _value(_parse(other), "swarm_info", peer_id=str(second.peer_id), role="dht", run_id="",
                  version=metrics.version) == 1


async def test_counting_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("SWARM_METRICS", "0")
    a = await P2P.create(host="127.0.0.1")
    b = await P2P.create(host="127.0.0.1")
    try:
        assert a.stats is None and b.stats is None
        await a.ping(b.get_visible_addresses()[0])
    finally:
        await a.shutdown()
        await b.shutdown()


def _train(dht: DHT, index: int, ready: threading.Event, done: list[threading.Event]) -> Optimizer:
    """Train until every peer averaged once and reached epoch 3 (so that each keeps a partner)."""
    torch.manual_seed(3)
    model = torch.nn.Linear(4, 1)
    opt = Optimizer(dht=dht, run_id="metrics-run", optimizer=lambda p: torch.optim.Adam(p, 0.05),
                    params=model.parameters(), target_batch_size=64, batch_size_per_step=16,
                    matchmaking_time=0.5, averaging_timeout=10)
    ready.wait(30)
    g = torch.Generator().manual_seed(index)
    deadline = time.monotonic() + 60
    while not all(d.is_set() for d in done) and time.monotonic() < deadline:
        x = torch.randn(16, 4, generator=g)
        loss = ((model(x) - x.sum(-1, keepdim=True)) ** 2).mean()
        loss.backward()
        opt.step(loss=loss)
        opt.zero_grad()
        if opt.round_counts["ok"] >= 1 and opt.local_epoch >= 3:
            done[index].set()
        time.sleep(0.02)
    return opt


@pytest.mark.slow
def test_counters_move_during_a_short_training():
    dhts: list[DHT] = []
    opts: list[Optimizer] = []
    try:
        dhts.append(DHT(host="127.0.0.1"))
        dhts.append(DHT(initial_peers=dhts[0].get_visible_addresses(), host="127.0.0.1"))
        view = PeerView(role="trainer", run_id="metrics-run", target_batch_size=64, state="training")
        metrics = Metrics(dhts[0].node, view)
        before = _parse(metrics)
        assert _value(before, "swarm_averaging_rounds_total", result="ok") == 0
        assert _value(before, "swarm_loss") != _value(before, "swarm_loss")  # NaN: no loss yet
        ready = threading.Event()
        done = [threading.Event(), threading.Event()]
        threads, results = [], [None, None]
        for i, d in enumerate(dhts):
            def run(i=i, d=d):
                results[i] = _train(d, i, ready, done)
            threads.append(threading.Thread(target=run))
            threads[-1].start()
        ready.set()
        for t in threads:
            t.join(90)
        opts = [r for r in results if r is not None]
        assert len(opts) == 2 and all(o.local_epoch >= 3 for o in opts)
        view.optimizer = results[0]

        after = _parse(metrics)
        assert _value(after, "swarm_epoch") >= 3
        assert _value(after, "swarm_samples_total") > 0 and _value(after, "swarm_loss") == opts[0].last_loss
        ok = _value(after, "swarm_averaging_rounds_total", result="ok")
        assert ok >= 1, results[0].rounds
        assert _value(after, "swarm_averaging_seconds_count") == ok + _value(after, "swarm_averaging_rounds_total",
                                                                               result="failed")
        assert _value(after, "swarm_averaging_group_size_sum") >= 2 * ok
        assert _value(after, "swarm_averaging_bytes_sent_total") == opts[0].bytes_sent > 0
        sent = sum(after["swarm_bytes_sent_total"].values())
        assert sent > sum(before["swarm_bytes_sent_total"].values())
        averaging_methods = [dict(k)["method"] for k in after["swarm_bytes_sent_total"]
                             if "metrics-run" in dict(k)["method"]]
        assert averaging_methods, after["swarm_bytes_sent_total"]
        assert _value(after, "swarm_run_peers") >= 1

        status = dhts[0].run_coroutine(lambda _d, node: collect_status(node, local=view), return_future=True).result(30)
        assert status["progress"]["run_id"] == "metrics-run" and status["progress"]["epoch"] >= 3
        assert status["runs"] == [] or status["runs"][0]["run_id"] == "metrics-run"
        assert {p["peer_id"] for p in status["peers"]} == {str(d.peer_id) for d in dhts}
        assert status["averaging"]["rounds"] and status["averaging"]["rounds"][-1]["result"] in ("ok", "failed")
        assert any(r["result"] == "ok" and r["group_size"] == 2 and r["bytes_sent"] > 0
                   for r in status["averaging"]["rounds"])
    finally:
        for o in opts:
            o.shutdown()
        for d in dhts:
            d.shutdown()

