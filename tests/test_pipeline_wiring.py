"""Pipeline data plane in process: wiring (algorithms.md 1.9 S1-S3), failover (S4), backward on
another replica (S5), 8-bit activations (S8), the pipe.* protocol, stage records, the stage server's
bounds and the Task's stage fields. Network: dht.peer.memory_transport (real sockets in
tests/test_pipeline_net.py)."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from averaging import compression
from dht import get_dht_time
from dht.node import DHTNode
from dht.peer.errors import BadRequestError, MessageTooLargeError, ProtocolError, RemoteError
from dht.peer.memory_transport import MemoryNetwork
from swarm import Task
from swarm.pipeline import (
    PerformanceEMA,
    PipelineClient,
    PipelineError,
    StageBalancer,
    StageRecord,
    StageServer,
    announce,
    fetch_stages,
    protocol,
)
from swarm.pipeline.wiring import NoServersError

RUN = "pipe-test"


# ---- S1-S3: the balancer and its EMA ------------------------------------------------------------

def _measured(balancer: StageBalancer, peer: str, tau: float) -> None:
    balancer.ema[peer].update(1.0, 1.0 / tau)  # one exact measurement: bias correction makes it exact


def test_s1_scheduler_shares():
    far = get_dht_time() + 1e6
    balancer = StageBalancer(rng=random.Random(0))
    balancer.add_peer("slow", far)
    balancer.add_peer("fast", far)
    _measured(balancer, "slow", 1.0)
    _measured(balancer, "fast", 3.0)
    counts = {"slow": 0, "fast": 0}
    for _ in range(4000):
        counts[balancer.choose(1.0)] += 1
    assert abs(counts["slow"] - 1000) <= 10 and abs(counts["fast"] - 3000) <= 10


def test_s2_ema_values():
    ema = PerformanceEMA(alpha=0.1)
    assert ema.samples_per_second == 0.0
    got = [ema.update(1, dt) for dt in (2, 2, 2, 1)]
    assert got == pytest.approx([0.5, 0.5, 0.5, 0.58506], abs=1e-4)


def test_ema_overlapping_calls_count_wall_time_once():
    ema = PerformanceEMA()
    ema.update_span(1, 0.0, 2.0)
    ema.update_span(1, 1.0, 3.0)  # ran alongside the first: only 2.0 -> 3.0 is new
    reference = PerformanceEMA()
    reference.update(1, 2.0)
    reference.update(1, 1.0)
    assert ema.samples_per_second == pytest.approx(reference.samples_per_second)


def test_s3_new_peer_is_chosen_next():
    far = get_dht_time() + 1e6
    balancer = StageBalancer(rng=random.Random(1))
    for peer, tau in (("a", 1.0), ("b", 1.0)):
        balancer.add_peer(peer, far)
        _measured(balancer, peer, tau)
    while balancer._heap[0][0] < 12.0:  # run until the heap minimum is 12.0
        balancer.choose(1.0)
    assert balancer._heap[0][0] == pytest.approx(12.0)
    balancer.add_peer("new", far)
    assert balancer.choose(1.0) == "new"


def test_ban_until_later_expiration_and_expired_peers_skipped():
    clock = [1000.0]
    balancer = StageBalancer(clock=lambda: clock[0], rng=random.Random(2))
    balancer.add_peer("a", 1100.0)
    balancer.add_peer("b", 1050.0)
    balancer.ban("a")
    assert {balancer.choose() for _ in range(5)} == {"b"}
    balancer.add_peer("a", 1100.0)  # the same record again: still banned
    assert balancer.is_banned("a") and {balancer.choose() for _ in range(5)} == {"b"}
    clock[0] = 1060.0  # b's record expired
    with pytest.raises(NoServersError):
        balancer.choose()
    balancer.add_peer("a", 1130.0)  # a re-announced: back, at the heap's minimum
    assert not balancer.is_banned("a") and balancer.choose() == "a"
    balancer.add_peer("b", 1200.0)  # b re-announced after expiring
    assert "b" in {balancer.choose() for _ in range(4)}
    balancer.ban("b")  # at 1060
    balancer.add_peer("b", 1210.0, announced_at=1055.0)  # dated before the ban: read late, still banned
    assert balancer.is_banned("b")
    balancer.add_peer("b", 1220.0, announced_at=1061.0)
    assert not balancer.is_banned("b")


def test_unmeasured_peer_costs_s0_per_sample():
    balancer = StageBalancer(rng=random.Random(3))
    balancer.add_peer("a", get_dht_time() + 1e6)
    balancer.choose(4.0)
    assert balancer._heap[0][0] == pytest.approx(4.0)  # s0 = 1 s/sample


# ---- S8 and the tensor codec of pipe.* ------------------------------------------------------------

def _relative_error(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x - y).norm() / x.norm())


def test_s8_eight_bit_activations():
    x = torch.randn(10 ** 6, generator=torch.Generator().manual_seed(0))
    spec_blocks = compression.Blockwise8()
    spec_blocks.block = 4096  # algorithms.md S8: absmax-linear int8 per 4096-block
    assert _relative_error(x, spec_blocks.decode(spec_blocks.encode(x), x.numel())) < 0.012
    for codec, bound in (("blockwise8", 0.012), ("uint8", 0.02), ("float16", 5e-4)):
        wire = protocol.encode_tensor(x.view(1000, 1000), codec)
        y = protocol.decode_tensor(wire, 10 ** 6)
        assert y.shape == (1000, 1000) and _relative_error(x, y.view(-1)) < bound, codec
    exact = protocol.decode_tensor(protocol.encode_tensor(x, "none"), 10 ** 6)
    assert torch.equal(exact, x)


def test_tensor_codec_dtypes_and_limits():
    ids = torch.randint(0, 50_000, (3, 7))
    assert torch.equal(protocol.decode_tensor(protocol.encode_tensor(ids), 100), ids)  # exact: raw
    half = torch.randn(5, 3).half()
    back = protocol.decode_tensor(protocol.encode_tensor(half, "none"), 100)
    assert back.dtype == torch.float16 and torch.equal(back, half)
    with pytest.raises(BadRequestError, match="exceed"):
        protocol.decode_tensor(protocol.encode_tensor(torch.zeros(11)), 10)
    with pytest.raises(BadRequestError, match="non-finite"):
        protocol.decode_tensor(protocol.encode_tensor(torch.tensor([1.0, float("nan")]), "none"), 10)
    wire = protocol.encode_tensor(torch.zeros(4), "none")
    with pytest.raises(BadRequestError, match="codec"):
        protocol.decode_tensor({**wire, "codec": "topk"}, 10)
    with pytest.raises(BadRequestError, match="bytes"):
        protocol.decode_tensor({**wire, "c": {"d": b"\0" * 15}}, 10)
    with pytest.raises(BadRequestError, match="raw"):
        protocol.decode_tensor({**protocol.encode_tensor(ids), "codec": "none"}, 100)
    with pytest.raises(ValueError, match="unknown pipeline codec"):
        protocol.encode_tensor(torch.zeros(1), "powersgd")


def test_requests_round_trip_and_versions():
    x, g = torch.randn(2, 3), torch.randn(2, 4)
    parsed = protocol.parse_backward_request(protocol.backward_request(1, b"mb", x, g, "none"), 100)
    assert (parsed.stage, parsed.microbatch) == (1, b"mb")
    assert torch.equal(parsed.inputs, x) and parsed.grad is not None and torch.equal(parsed.grad, g)
    assert parsed.want_grad_inputs
    without = protocol.backward_request(1, b"mb", x, g, "none", want_grad_inputs=False)
    assert not protocol.parse_backward_request(without, 100).want_grad_inputs
    with pytest.raises(BadRequestError, match="'gi'"):
        protocol.parse_backward_request({**without, "gi": "yes"}, 100)
    request = protocol.forward_request(0, b"id", x, "none")
    with pytest.raises(BadRequestError, match="version"):
        protocol.parse_forward_request({**request, "v": 2}, 100)
    with pytest.raises(BadRequestError, match="stage"):
        protocol.parse_forward_request({**request, "s": -1}, 100)
    with pytest.raises(BadRequestError, match="microbatch"):
        protocol.parse_forward_request({**request, "mb": b"x" * 33}, 100)
    with pytest.raises(BadRequestError, match="floating"):
        protocol.parse_backward_request({**request, "g": protocol.encode_tensor(torch.zeros(2, dtype=torch.int64))},
                                        100)
    with pytest.raises(ProtocolError):
        protocol.parse_forward_reply({"v": 1, "y": "nope"}, 100)
    with pytest.raises(ProtocolError):
        protocol.parse_info_reply({"v": 1, "stage": 0})


def test_wire_byte_vectors():
    """The pipe.* encoding is pinned: a change here breaks compatibility with deployed peers."""
    import msgpack

    forward = protocol.forward_request(1, b"ab", torch.tensor([[1.0, 2.0]]), "none")
    assert msgpack.packb(forward, use_bin_type=True).hex() == (
        "84a17601a17301a26d62c4026162a17884a56474797065a7666c6f61743332a57368617065920102a5636f646563a46e6f6e65"
        "a16381a164c4080000803f00000040")
    backward = protocol.backward_request(0, b"", torch.tensor([3]), torch.tensor([0.5]), "none",
                                         want_grad_inputs=False)
    assert msgpack.packb(backward, use_bin_type=True).hex() == (
        "86a17601a17300a26d62c400a17884a56474797065a5696e743634a573686170659101a5636f646563a3726177a16381a164c408"
        "0300000000000000a16784a56474797065a7666c6f61743332a573686170659101a5636f646563a46e6f6e65a16381a164c404"
        "0000003fa26769c2")
    parsed = protocol.parse_backward_request(msgpack.unpackb(msgpack.packb(backward, use_bin_type=True)), 10)
    assert parsed.inputs.tolist() == [3] and parsed.grad.tolist() == [0.5] and not parsed.want_grad_inputs


_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
                       | st.binary(max_size=64), lambda inner: st.lists(inner, max_size=4)
                       | st.dictionaries(st.sampled_from(["v", "s", "mb", "x", "g", "dtype", "shape", "codec", "c",
                                                         "d", "s"]), inner, max_size=6), max_leaves=20)


@settings(max_examples=150, deadline=None)
@given(_values)
def test_parsers_refuse_anything_malformed_with_bad_request(value):
    for parse in (protocol.parse_forward_request, protocol.parse_backward_request):
        try:
            parse(value, 64)
        except BadRequestError:
            pass


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.sampled_from(["dtype", "shape", "codec", "c"]),
                       st.sampled_from(["float32", "int64", "bool", "none", "raw", "blockwise8", [2, 2], [1 << 40],
                                        [-1], {"d": b"\0" * 16}, {"d": b"", "s": b""}, None, 3]), max_size=4))
def test_tensor_decoder_refuses_malformed_tensors(value):
    try:
        out = protocol.decode_tensor(value, 64)
    except BadRequestError:
        return
    assert out.numel() <= 64


# ---- Task stage fields ----------------------------------------------------------------------------

def _task(**overrides) -> Task:
    fields = dict(name="t", stages=[lambda: torch.nn.Linear(3, 4), lambda: torch.nn.Linear(4, 2)],
                  optimizer=lambda p: torch.optim.SGD(p, 0.1), data=lambda *a: [], loss=lambda out, b: out.sum())
    fields.update(overrides)
    return Task(**fields)


def test_task_stages():
    task = _task()
    assert task.is_pipeline and task.num_stages == 2 and task.model is None
    state = torch.random.get_rng_state()
    a, b = task.build_stage(0), task.build_stage(0)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is untouched
    assert torch.equal(a.weight, b.weight)
    assert not torch.equal(_task(name="other").build_stage(0).weight, a.weight)  # seeded by the task's name
    assert task.stage_cost(0) == 16 and task.stage_cost(1) == 10
    assert _task(stage_costs=[1, 2.5]).stage_cost(1) == 2.5
    assert task.stage_input((torch.ones(1), 0)).item() == 1
    with pytest.raises(ValueError, match="no single model"):
        task.build_model()
    with pytest.raises(IndexError):
        task.build_stage(2)
    with pytest.raises(ValueError, match="not both"):
        _task(model=lambda: torch.nn.Linear(1, 1))
    with pytest.raises(ValueError, match="stage_costs"):
        _task(stage_costs=[1.0])
    with pytest.raises(TypeError, match="stages"):
        _task(stages=[])
    with pytest.raises(TypeError, match="optimizer is required"):
        Task(name="x", stages=[lambda: torch.nn.Linear(1, 1)], data=lambda *a: [], loss=lambda o, b: o)
    plain = Task(name="p", model=lambda: torch.nn.Linear(1, 1), optimizer=lambda p: torch.optim.SGD(p, 0.1),
                 data=lambda *a: [], loss=lambda m, b: m(b))
    assert not plain.is_pipeline and plain.num_stages == 1 and isinstance(plain.build_model(), torch.nn.Linear)
    with pytest.raises(ValueError, match="not a pipeline"):
        plain.build_stage(0)


# ---- in-memory swarms ----------------------------------------------------------------------------

class Swarm:
    """DHT nodes on one MemoryNetwork, with stage servers; everything closed by the fixture."""

    def __init__(self) -> None:
        self.network = MemoryNetwork(latency=0.0005, seed=0)
        self.nodes: list[DHTNode] = []
        self.servers: list[StageServer] = []

    async def node(self) -> DHTNode:
        initial = [self.nodes[0].p2p.get_visible_addresses()[0]] if self.nodes else []
        node = await DHTNode.create(initial, p2p=await self.network.create_peer())
        self.nodes.append(node)
        return node

    async def server(self, stage: int, module: torch.nn.Module, **kwargs) -> StageServer:
        server = StageServer(await self.node(), RUN, stage, module, **{"codec": "none", **kwargs})
        await server.start()
        self.servers.append(server)
        return server

    async def kill(self, server: StageServer) -> None:
        """The server's process dies: no goodbye, its connections break."""
        if server._announcer is not None:
            server._announcer.cancel()
        server._accepting = False
        await server.node.shutdown()

    async def close(self) -> None:
        for server in self.servers:
            if server._announcer is not None:
                server._announcer.cancel()
            server._executor.shutdown(wait=False)
        await asyncio.gather(*(n.shutdown() for n in self.nodes), return_exceptions=True)


@pytest.fixture
async def swarm():
    s = Swarm()
    try:
        yield s
    finally:
        await s.close()


def _stages(seed: int = 0) -> list[torch.nn.Module]:
    torch.manual_seed(seed)
    return [torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh()), torch.nn.Linear(12, 3)]


def _loss(out: torch.Tensor, batch) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(out, batch[1], reduction="sum")


def _summed_grads(servers: list[StageServer], stage: int) -> dict[str, torch.Tensor]:
    total: dict[str, torch.Tensor] = {}
    for server in servers:
        if server.stage != stage:
            continue
        for name, p in server.module.named_parameters():
            if p.grad is not None:
                total[name] = total[name] + p.grad if name in total else p.grad.clone()
    return total


async def test_s4_failover_all_microbatches_complete_and_match_reference(swarm):
    stages = _stages()
    servers = [await swarm.server(k, copy.deepcopy(stages[k])) for k in (0, 1) for _ in range(3)]
    client = PipelineClient(await swarm.node(), RUN, 2, codec="none")
    reference = copy.deepcopy(stages)
    gen = torch.Generator().manual_seed(1)
    for i in range(200):
        if i == 50:
            balancer = client.balancers[1]  # the stage-1 server its queue would choose next dies
            victim_id = min(e for e in balancer._heap if e[3] == balancer._peers[e[2]].version)[2]
            await swarm.kill(next(s for s in servers if s.node.peer_id.to_base58() == victim_id))
            sent_before = client.requests.get(victim_id, 0)
        x, y = torch.randn(4, 6, generator=gen), torch.randint(0, 3, (4,), generator=gen)
        loss, samples = await client.train_microbatch((x, y), _loss)
        expected = _loss(reference[1](reference[0](x)), (x, y))
        expected.backward()
        assert samples == 4 and abs(loss - expected.item()) <= 1e-5 * max(1.0, abs(expected.item()))
    assert client.microbatches_ok == 200 and client.microbatches_failed == 0
    assert client.requests.get(victim_id, 0) - sent_before == 1  # nothing after its first failure
    assert client.balancers[1].is_banned(victim_id)
    assert sum(s.samples_accumulated for s in servers if s.stage == 1) == 800
    for k in (0, 1):  # the mean gradient (what the stage's step uses) over the 800 samples
        got = _summed_grads(servers, k)  # the dead server's grads included: it died between microbatches
        for name, p in reference[k].named_parameters():
            assert float((got[name] / 800 - p.grad / 800).abs().max()) <= 1e-5, (k, name)


async def test_s5_backward_on_another_replica(swarm):
    stage = _stages()[0]
    a, b = await swarm.server(0, copy.deepcopy(stage)), await swarm.server(0, copy.deepcopy(stage))
    caller = await swarm.node()
    x = torch.randn(5, 6)
    method = protocol.method(protocol.FORWARD, RUN)
    y = protocol.parse_forward_reply(await caller.p2p.call(a.node.peer_id, method, protocol.forward_request(
        0, b"m", x, "none"), timeout=10), 1 << 20)
    g = torch.randn_like(y)
    reply = await caller.p2p.call(b.node.peer_id, protocol.method(protocol.BACKWARD, RUN),
                                  protocol.backward_request(0, b"m", x, g, "none"), timeout=10)
    grad_x = protocol.parse_backward_reply(reply, 1 << 20)
    local_x = x.clone().requires_grad_(True)
    local = copy.deepcopy(stage)
    local_y = local(local_x)
    local_y.backward(g)
    assert torch.allclose(y, local_y.detach(), atol=1e-6)
    assert grad_x is not None and float((grad_x - local_x.grad).abs().max()) <= 1e-6
    assert b.samples_accumulated == 5 and a.samples_accumulated == 0
    assert float((b.module[0].weight.grad - local[0].weight.grad).abs().max()) <= 1e-6


async def test_server_bounds_and_hostile_requests(swarm):
    server = await swarm.server(1, torch.nn.Linear(4, 2), max_elements=64, max_requests_per_peer=1)
    caller = await swarm.node()
    fwd, bwd = protocol.method(protocol.FORWARD, RUN), protocol.method(protocol.BACKWARD, RUN)

    async def call(method, request):
        return await caller.p2p.call(server.node.peer_id, method, request, timeout=10)

    cases = [
        (fwd, protocol.forward_request(0, b"", torch.zeros(2, 4)), "serves stage 1"),
        (fwd, protocol.forward_request(1, b"", torch.zeros(2, 5)), "cannot run on"),
        (fwd, protocol.forward_request(1, b"", torch.zeros(20, 4)), "exceed"),
        (fwd, {"v": 9}, "version"),
        (fwd, [1, 2, 3], "map"),
        (bwd, protocol.backward_request(1, b"", torch.zeros(2, 4), torch.zeros(3, 2)), "shape"),
        (bwd, protocol.backward_request(1, b"", torch.zeros(2, 4), torch.full((2, 2), float("inf")), "none"),
         "non-finite"),
    ]
    for method, request, message in cases:
        with pytest.raises(RemoteError, match=message) as info:
            await call(method, request)
        assert info.value.code == "bad_request"
    with pytest.raises(MessageTooLargeError, match="exceeds the limit"):  # refused while it arrives
        await call(fwd, {"v": 1, "s": 1, "mb": b"", "x": {"pad": b"\0" * (2 * protocol.max_request_bytes(64))}})
    assert server.samples_accumulated == 0 and all(p.grad is None for p in server.module.parameters())
    # still serving, and one caller holds at most one slot
    async with server.paused():
        blocked = asyncio.ensure_future(call(bwd, protocol.backward_request(1, b"k", torch.ones(2, 4),
                                                                            torch.ones(2, 2))))
        await asyncio.sleep(0.05)
        assert not blocked.done()  # no backward inside paused()
        with pytest.raises(RemoteError) as info:
            await call(fwd, protocol.forward_request(1, b"", torch.zeros(2, 4)))
        assert info.value.code == "overloaded"
        assert server.samples_accumulated == 0
    await blocked
    assert server.samples_accumulated == 2
    # a retried backward (same caller, same microbatch id) is counted once
    await call(bwd, protocol.backward_request(1, b"k", torch.ones(2, 4), torch.ones(2, 2)))
    assert server.samples_accumulated == 2 and server.stats()["repeated"] == 1
    no_input_grad = await call(bwd, protocol.backward_request(1, b"j", torch.ones(2, 4), torch.ones(2, 2),
                                                              want_grad_inputs=False))
    assert protocol.parse_backward_reply(no_input_grad, 100) is None and server.samples_accumulated == 4
    server.module.weight.grad.div_(2)
    grad = server.module.weight.grad.clone()
    assert float((grad - torch.ones(2, 1) @ torch.ones(1, 4) * 2).abs().max()) < 1e-6
    assert protocol.parse_info_reply(await call(protocol.method(protocol.INFO, RUN), protocol.info_request()))[
        "stage"] == 1
    server.reset_accumulated()
    assert server.samples_accumulated == 0 and server.module.weight.grad is None


async def test_records_switch_and_stop(swarm):
    server = await swarm.server(0, torch.nn.Linear(3, 3))
    watcher = await swarm.node()
    found = await fetch_stages(watcher, RUN, 3)
    assert [r.peer_id for r in found[0]] == [server.node.peer_id.to_base58()] and not found[1]
    assert found[0][0].expiration_time > get_dht_time()
    await server.switch(2, torch.nn.Linear(3, 3))
    found = await fetch_stages(watcher, RUN, 3)
    assert not found[0] and [r.stage for r in found[2]] == [2]
    assert [r.left for r in (await fetch_stages(watcher, RUN, 3, include_left=True))[0]] == [True]
    task = _task(stages=[lambda: torch.nn.Linear(3, 3)] * 3, stage_input=lambda batch: batch["x"])
    client = PipelineClient.for_task(watcher, RUN, task, codec="none", no_server_wait=0.2, max_retries_per_stage=1)
    assert client.num_stages == 3 and client.stage_input({"x": 7}) == 7
    with pytest.raises(PipelineError, match="stage 0"):
        await client.forward(torch.zeros(1, 3))
    assert client.microbatches_failed == 0  # forward() is not a training microbatch
    await server.stop(drain_timeout=1.0)
    assert not (await fetch_stages(watcher, RUN, 3))[2]
    await server.start()  # serving again after a stop
    assert [r.stage for r in (await fetch_stages(watcher, RUN, 3))[2]] == [2]
    out = protocol.parse_forward_reply(await watcher.p2p.call(
        server.node.peer_id, protocol.method(protocol.FORWARD, RUN),
        protocol.forward_request(2, b"", torch.zeros(1, 3), "none"), timeout=5), 100)
    assert out.shape == (1, 3)


async def test_registry_drops_forged_and_malformed_records(swarm):
    honest, forger = await swarm.node(), await swarm.node()
    record = StageRecord(honest.peer_id.to_base58(), [], 0, 2.0, 1, 10, 0.0)
    assert await announce(honest, RUN, record, 30)
    with pytest.raises(ValueError, match="own peer id"):
        await announce(forger, RUN, record, 30)
    forged = dict(record.to_wire(), time=get_dht_time())  # signed by the forger, claiming the honest id
    await forger.store(f"{RUN}.stage_load.0", forged, get_dht_time() + 30,
                       subkey=forger.signature_validator.ownership_marker)
    with contextlib.suppress(Exception):  # the schema refuses it (locally and at every node)
        await forger.store(f"{RUN}.stage_load.0", {"peer_id": 3}, get_dht_time() + 30,
                           subkey=forger.signature_validator.ownership_marker)
    found = await fetch_stages(honest, RUN, 1)
    assert [r.peer_id for r in found[0]] == [honest.peer_id.to_base58()]
    with pytest.raises(ValueError):
        StageRecord("x", ["a" * 300], 0, 1.0, 0, 0, 0.0).to_wire()
    assert StageRecord.from_wire({"peer_id": "x"}) is None
    assert StageRecord.from_wire({**record.to_wire(), "samples_per_s": float("nan")}) is None


async def test_abandoned_backward_adds_nothing_and_keeps_its_slot(swarm):
    from tests.pipeline_worker import Marked

    server = await swarm.server(0, Marked(torch.nn.Linear(4, 2), 0.4), max_requests_per_peer=1)
    caller = await swarm.node()
    bwd = protocol.method(protocol.BACKWARD, RUN)
    request = protocol.backward_request(0, b"late", torch.ones(3, 4), torch.ones(3, 2))
    with pytest.raises(TimeoutError):  # DeadlineExceededError: the caller gives up mid-computation
        await caller.p2p.call(server.node.peer_id, bwd, request, timeout=0.1)
    with pytest.raises(RemoteError) as info:  # its job still runs: the caller's one slot is still taken
        await caller.p2p.call(server.node.peer_id, bwd, request, timeout=5)
    assert info.value.code == "overloaded"
    for _ in range(100):
        if server.queue == 0:
            break
        await asyncio.sleep(0.05)
    assert server.stats()["abandoned"] == 1 and server.samples_accumulated == 0
    assert all(p.grad is None for p in server.module.parameters())
    await caller.p2p.call(server.node.peer_id, bwd, request, timeout=5)  # the slot is back
    assert server.samples_accumulated == 3


async def test_overloaded_answers_are_waited_out_not_counted_as_failures(swarm):
    server = await swarm.server(0, torch.nn.Linear(4, 2), max_requests_per_peer=1)
    node = await swarm.node()
    client = PipelineClient(node, RUN, 1, codec="none", max_retries_per_stage=0, overload_pause=0.02)
    bwd = protocol.method(protocol.BACKWARD, RUN)
    async with server.paused():  # this caller's one slot is held by a backward waiting for the step
        held = asyncio.ensure_future(node.p2p.call(server.node.peer_id, bwd, protocol.backward_request(
            0, b"h", torch.ones(1, 4), torch.ones(1, 2)), timeout=10))
        await asyncio.sleep(0.05)
        forward = asyncio.ensure_future(client.forward(torch.ones(2, 4)))
        await asyncio.sleep(0.3)
        assert not forward.done() and client.retries > 0  # refused (overloaded) and retried meanwhile
    assert (await forward).shape == (2, 2) and (await held)["gx"] is not None
    short = PipelineClient(node, RUN, 1, codec="none", max_retries_per_stage=0, forward_timeout=0.2,
                           overload_pause=0.02)
    async with server.paused():
        held = asyncio.ensure_future(node.p2p.call(server.node.peer_id, bwd, protocol.backward_request(
            0, b"i", torch.ones(1, 4), torch.ones(1, 2)), timeout=10))
        await asyncio.sleep(0.05)
        with pytest.raises(PipelineError, match="overloaded"):  # but not longer than the call's timeout
            await short.forward(torch.ones(2, 4))
    await held


async def test_outputs_bounded_like_inputs(swarm):
    server = await swarm.server(0, torch.nn.Linear(4, 16), max_elements=64)  # an expanding stage
    caller = await swarm.node()
    for method, request in ((protocol.FORWARD, protocol.forward_request(0, b"", torch.zeros(8, 4))),
                            (protocol.BACKWARD, protocol.backward_request(0, b"", torch.zeros(8, 4),
                                                                          torch.zeros(2, 16)))):
        with pytest.raises(RemoteError, match="output .* has 128 values, over this server's limit of 64"):
            await caller.p2p.call(server.node.peer_id, protocol.method(method, RUN), request, timeout=10)
    assert server.samples_accumulated == 0


async def test_duplicate_forwards_catch_a_server_that_scales_its_outputs(swarm):
    stage = torch.nn.Linear(4, 3)
    honest = [await swarm.server(0, copy.deepcopy(stage)) for _ in range(2)]
    client = PipelineClient(await swarm.node(), RUN, 1, codec="blockwise8", duplicate_fraction=1.0)
    for _ in range(6):
        await client.forward(torch.randn(5, 4))
    await asyncio.gather(*client._checks)
    assert client.duplicates["checked"] >= 3 and client.duplicates["mismatched"] == 0  # 8-bit noise agrees
    liar = copy.deepcopy(stage)
    with torch.no_grad():
        liar.weight.mul_(10)
        liar.bias.mul_(10)
    bad = await swarm.server(0, liar)
    bad_id = bad.node.peer_id.to_base58()
    await client.refresh()
    for _ in range(12):
        await client.forward(torch.randn(5, 4))
    await asyncio.gather(*client._checks)
    assert client.duplicates["mismatched"] >= 1
    assert all(bad_id in m["peers"] and m["ratio"] != pytest.approx(1.0, abs=0.1) for m in client.mismatches)
    assert all(s.stats()["backward"] == 0 for s in honest + [bad])  # backwards are never duplicated
