"""Pipelines over real sockets (TCP on 127.0.0.1): gradients of a 3-stage model trained by 2 trainers
through 6 servers equal the unsplit model's; servers killed with SIGKILL mid-forward and
mid-backward lose no microbatch; a hostile caller gets clear errors and the server keeps serving."""

from __future__ import annotations

import asyncio
import copy

import pytest
import torch

from dht.peer.errors import MessageTooLargeError, RemoteError
from swarm.pipeline import PipelineClient, StageServer, protocol
from tests.dht_net import addr, net  # noqa: F401 - the fixture
from tests.pipeline_worker import build_stages
from tests.processes import ProcessGroup

RUN = "pipe-net"


def _loss(out: torch.Tensor, batch) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(out, batch[1], reduction="sum")


def _batches(seed: int, n: int, size: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 8, generator=gen), torch.randint(0, 3, (size,), generator=gen)) for _ in range(n)]


async def _train(client: PipelineClient, batches: list, in_flight: int = 2) -> list[float]:
    """Every batch through the pipeline, ``in_flight`` at a time; the losses in batch order."""
    losses: list[float] = [0.0] * len(batches)
    queue = list(enumerate(batches))

    async def worker() -> None:
        while queue:
            i, batch = queue.pop(0)
            losses[i], _ = await client.train_microbatch(batch, _loss)

    await asyncio.gather(*(worker() for _ in range(in_flight)))
    return losses


async def test_gradients_equal_unsplit_model_two_trainers_six_servers(net):  # noqa: F811
    stages = build_stages(seed=3)
    boot = await net.node()
    servers = []
    for k in range(3):
        for _ in range(2):
            node = await net.node([addr(boot)])
            server = StageServer(node, RUN, k, copy.deepcopy(stages[k]), codec="none")
            await server.start()
            servers.append(server)
    try:
        trainers = [PipelineClient(await net.node([addr(boot)]), RUN, 3, codec="none") for _ in range(2)]
        work = [_batches(10 + t, 6) for t in range(2)]
        results = await asyncio.gather(*(_train(c, b) for c, b in zip(trainers, work)))
        reference = torch.nn.Sequential(*copy.deepcopy(stages))
        samples = 0
        for losses, batches in zip(results, work):
            for loss, batch in zip(losses, batches):
                expected = _loss(reference(batch[0]), batch)
                expected.backward()
                samples += len(batch[0])
                assert abs(loss - expected.item()) <= 1e-5 * max(1.0, abs(expected.item()))
        assert all(c.microbatches_ok == 6 and c.microbatches_failed == 0 for c in trainers)
        for k in range(3):
            mine = [s for s in servers if s.stage == k]
            assert sum(s.samples_accumulated for s in mine) == samples
            for name, p in reference[k].named_parameters():
                grads = [dict(s.module.named_parameters())[name].grad for s in mine]
                total = sum(g for g in grads if g is not None)
                assert float((total / samples - p.grad / samples).abs().max()) <= 1e-5, (k, name)
    finally:
        await asyncio.gather(*(s.stop(drain_timeout=1.0) for s in servers))


async def test_hostile_caller_gets_clear_errors_and_server_keeps_serving(net):  # noqa: F811
    boot = await net.node()
    server = StageServer(await net.node([addr(boot)]), RUN, 0, torch.nn.Linear(8, 3), codec="none",
                         max_elements=256, max_requests_per_peer=2)
    await server.start()
    attacker = await net.raw_peer()
    target = addr(server.node)
    fwd, bwd = protocol.method(protocol.FORWARD, RUN), protocol.method(protocol.BACKWARD, RUN)
    try:
        bad = [
            (fwd, b"\xc1 not a map"),
            (fwd, {"v": 1, "s": 0, "mb": b"", "x": {"dtype": "float32", "shape": [1 << 30], "codec": "none",
                                                    "c": {"d": b""}}}),
            (fwd, {"v": 1, "s": 0, "mb": b"", "x": {"dtype": "complex64", "shape": [1], "codec": "none"}}),
            (fwd, {"v": 1, "s": 0, "mb": "str", "x": None}),
            (bwd, {"v": 1, "s": 0, "mb": b"", "x": protocol.encode_tensor(torch.zeros(2, 8), "none"),
                   "g": protocol.encode_tensor(torch.zeros(2, 3), "blockwise8") | {"c": {"d": b"", "s": b""}}}),
        ]
        for method, request in bad:
            with pytest.raises(RemoteError) as info:
                await attacker.call(target, method, request, timeout=10)
            assert info.value.code == "bad_request" and len(str(info.value)) < 600
        with pytest.raises((MessageTooLargeError, RemoteError), match="exceeds the limit|too_large"):
            await attacker.call(target, fwd, {"v": 1, "s": 0, "mb": b"", "x": b"\0" * (1 << 20)}, timeout=10)
        assert server.samples_accumulated == 0
        backward = protocol.backward_request(0, b"", torch.ones(2, 8), torch.ones(2, 3), "none")
        async with server.paused():  # two backwards wait inside, holding this caller's two slots
            held = [asyncio.ensure_future(attacker.call(target, bwd, backward, timeout=10)) for _ in range(2)]
            await asyncio.sleep(0.2)
            with pytest.raises(RemoteError) as info:
                await attacker.call(target, fwd, protocol.forward_request(0, b"", torch.zeros(1, 8)), timeout=10)
            assert info.value.code == "overloaded" and "from this peer" in str(info.value)
        await asyncio.gather(*held)
        assert server.samples_accumulated == 4  # the valid backwards, and nothing else, counted
        client = PipelineClient(await net.node([addr(boot)]), RUN, 1, codec="none")
        loss, samples = await client.train_microbatch(_batches(0, 1)[0], _loss)
        assert samples == 4 and server.samples_accumulated == 8 and server.stats()["bad_request"] >= len(bad)
    finally:
        await server.stop(drain_timeout=1.0)


async def test_kill_9_mid_forward_and_mid_backward_loses_no_microbatch(net, tmp_path):  # noqa: F811
    """2 stages x 2 servers: per stage one server in its own process (killed with SIGKILL: the stage-0
    one when it starts its first forward, the stage-1 one when it starts its first backward) and one
    in this process (over TCP all the same)."""
    boot = await net.node()
    stages = build_stages(0)[:2]
    survivors = []
    for k in range(2):
        server = StageServer(await net.node([addr(boot)]), RUN, k, copy.deepcopy(stages[k]), codec="none")
        await server.start()
        survivors.append(server)
    with ProcessGroup(tmp_path) as group:
        victims = {0: ("s0", "FWD"), 1: ("s1", "BWD")}
        for k, (name, mark) in victims.items():  # slow only where it is to be killed
            group.spawn(name, ["tests/pipeline_worker.py", "--run", RUN, "--stage", str(k), "--delay", "0.5",
                               "--delay-on", mark, str(addr(boot))])
        await asyncio.gather(*(asyncio.to_thread(group.wait_for, name, r"^READY", 60)  # (the loop serves boot)
                               for name, _ in victims.values()))
        client = PipelineClient(await net.node([addr(boot)]), RUN, 2, codec="none")
        killed: list[str] = []

        async def killer() -> None:
            while len(killed) < len(victims):
                for name, mark in victims.values():
                    if name not in killed and mark in group.log(name):
                        group.kill(name)  # SIGKILL by PID, while it computes
                        killed.append(name)
                await asyncio.sleep(0.02)

        hunting = asyncio.ensure_future(killer())
        head = torch.nn.Linear(16, 3)  # stage 1 outputs 16 features; the trainer maps them to classes

        def loss(out, batch):
            return torch.nn.functional.cross_entropy(head(out), batch[1], reduction="sum")

        batches = _batches(5, 60)
        losses: dict[int, float] = {}
        next_batch = iter(range(len(batches)))

        async def trainer() -> None:  # at least 10 microbatches, and on until both victims were killed
            for i in next_batch:
                if i >= 10 and len(killed) == len(victims):
                    return
                losses[i], _ = await client.train_microbatch(batches[i], loss)

        try:
            await asyncio.wait_for(asyncio.gather(*(trainer() for _ in range(2))), 120)
            await asyncio.wait_for(hunting, 10)
        finally:
            hunting.cancel()
            await asyncio.gather(*(s.stop(drain_timeout=1.0) for s in survivors))
        assert sorted(killed) == ["s0", "s1"]
        assert client.microbatches_ok == len(losses) >= 10 and client.microbatches_failed == 0
        assert client.retries >= 2  # each kill cost its stage a retry; the other stages were not redone
        for i, value in losses.items():  # the losses are the model's: every microbatch went through
            with torch.no_grad():
                expected = loss(stages[1](stages[0](batches[i][0])), batches[i])
            assert abs(value - expected.item()) <= 1e-4 * max(1.0, abs(expected.item()))
        assert sum(s.samples_accumulated for s in survivors) >= 4 * len(losses)  # the survivors did the rest
