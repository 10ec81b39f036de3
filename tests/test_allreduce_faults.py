"""AllReduceService rounds on MemoryNetwork and the virtual clock, with faults at exact points.

- Two faulty members of five (NaN values, or a stall after the first chunks; or two stalls): the
  owners exclude them, and what the excluded members then report or do (they were refused by every
  good owner) must not make the honest ones drop each other: the three honest members end with the
  exact weighted mean over themselves, bit-identical, and the faulty ones are named in the log.
- A failure report that arrives before this member's own agreement starts (from a member it has
  already seen fail) is taken into account, not an error.
- An owner whose own event loop stalls longer than the sender timeout (a synchronous call that
  blocks it), or whose decoding of a member's chunk is slow, does not blame the members whose chunks
  were already on their way: nobody is excluded; a member that really sends nothing still is.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable, Sequence

import pytest
import torch

from averaging import allreduce, compression
from averaging.allreduce import AllReduceService, RoundConfig
from averaging.errors import AveragingError
from averaging.group import GroupInfo
from dht import P2P
from dht.peer import virtual_clock
from dht.peer.memory_transport import MemoryNetwork
from tests.fault_injection import on_outgoing_chunk, stall_forever

PART = 4_000  # values per member's part: 4 chunks of 1 024 (the last one shorter)
CHUNK = 1_024
SENDER_TIMEOUT = 2.0
GROUP_ID = b"\x42" * 20


class Round:
    """``n`` P2P peers with an AllReduceService each on one MemoryNetwork (on the running loop)."""

    def __init__(self, n: int, latency: float = 0.005, seed: int = 0):
        self.n, self.latency, self.seed = n, latency, seed
        self.peers: list[P2P] = []
        self.services: list[AllReduceService] = []
        g = torch.Generator().manual_seed(seed)
        self.values = [torch.randn(n * PART, generator=g) for _ in range(n)]
        self.weights = [float(i + 1) for i in range(n)]

    async def __aenter__(self) -> "Round":
        network = MemoryNetwork(latency=self.latency, seed=self.seed)
        self.peers = [await network.create_peer(name=f"p{i}") for i in range(self.n)]
        for a in self.peers:
            for b in self.peers:
                if a is not b:
                    a.add_addresses(b.peer_id, b.get_visible_addresses())
        self.services = [AllReduceService(p, "faults") for p in self.peers]
        self.group = GroupInfo(GROUP_ID, [p.peer_id for p in self.peers], [PART] * self.n, [None] * self.n,
                               [False] * self.n, [None] * self.n)
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        for service in self.services:
            service.close()
        await asyncio.gather(*(p.shutdown() for p in self.peers))

    def config(self, i: int, **kwargs: Any) -> RoundConfig:
        options: dict[str, Any] = dict(codec=compression.get("none"), chunk_elems=CHUNK, sender_timeout=SENDER_TIMEOUT)
        options.update(kwargs)
        return RoundConfig(self.group, i, self.weights[i], **options)

    async def run(self, configs: dict[int, dict] | None = None) -> list[Any]:
        """Every member's ``run`` at once: its (result, AllReduceResult) or the exception it raised."""
        configs = configs or {}
        return await asyncio.gather(*(self.services[i].run(self.config(i, **configs.get(i, {})), self.values[i])
                                      for i in range(self.n)), return_exceptions=True)

    def name(self, i: int) -> str:
        return str(self.peers[i].peer_id)


def assert_exact_mean(r: Round, outcomes: Sequence[Any], honest: Sequence[int]) -> None:
    """Every honest member succeeded with the weighted mean over exactly ``honest`` (float32
    accuracy), bit-identical, every part contributed by exactly them."""
    total = sum(r.weights[i] for i in honest)
    expected = torch.stack([r.weights[i] * r.values[i].double() for i in honest]).sum(0) / total
    ids = {r.peers[i].peer_id for i in honest}
    for i in honest:
        assert isinstance(outcomes[i], tuple), f"member {i}: {outcomes[i]!r}"
    first = outcomes[honest[0]][0]
    for i in honest:
        result, info = outcomes[i]
        assert set(info.survivors) == ids
        assert all(set(contributors) == ids for _, _, contributors in info.parts)
        assert torch.allclose(result.double(), expected, rtol=1e-6, atol=1e-6), (result.double() - expected).abs().max()
        assert torch.equal(result.view(torch.int32), first.view(torch.int32))


@pytest.mark.parametrize("faults", [("nan", "stall"), ("stall", "stall"), ("stall", "nan")])
def test_two_faulty_members_of_five_honest_ones_get_the_exact_mean(faults, caplog):
    """Members 1 and 3 are faulty (NaN values: every owner refuses them at once; or they stop
    sending after two chunks: excluded after the sender timeout). Each faulty member's own part
    waits for the other faulty one, so it is still open when the good owners exclude it: what it
    does then must not drop good owners. The honest 0, 2, 4 get the exact mean over themselves."""
    async def main() -> None:
        async with Round(5) as r:
            for i, fault in zip((1, 3), faults):
                if fault == "nan":
                    r.values[i][::97] = float("nan")
                else:
                    on_outgoing_chunk(r.peers[i], 2, stall_forever)
            started = asyncio.get_running_loop().time()
            outcomes = await asyncio.wait_for(r.run(), 60)
            assert_exact_mean(r, outcomes, [0, 2, 4])
            for i in (0, 2, 4):
                assert outcomes[i][1].recovered_ranges, "the faulty members' parts are re-reduced"
            for i in (1, 3):
                assert isinstance(outcomes[i], AveragingError), outcomes[i]
            # virtual seconds: exclusion after the sender timeout, then agreement and recovery
            assert asyncio.get_running_loop().time() - started < 4 * SENDER_TIMEOUT
            for i, fault in zip((1, 3), faults):
                reason = "sent NaN or Inf values" if fault == "nan" else "sent nothing"
                assert f"excluding {r.name(i)}: {reason}" in caplog.text
            for i in (0, 2, 4):
                assert f"excluding {r.name(i)}" not in caplog.text
                assert f"part owner {r.name(i)} failed" not in caplog.text

    with caplog.at_level(logging.INFO, logger="averaging.allreduce"):
        virtual_clock.run(main())


def test_a_report_that_arrives_before_the_local_agreement_starts(caplog):
    """Member 0's reducer raises: its part fails, so the others see it fail as an owner, while it
    sees nobody fail and sends its report ({0}) to every member at once. Member 2 starts its own
    agreement only after that report arrived (the report of a member it already counts as failed):
    the report is taken (it does not count), no error; 1, 2, 3 get the exact mean over themselves."""
    def broken(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("a reducer that fails")

    async def main() -> None:
        async with Round(4) as r:
            late = r.services[2]
            original = late._agree

            async def agree_after_the_report(config: RoundConfig, failed: set[int], timeout: float) -> list[int]:
                assert 0 in failed
                report = late._reports[GROUP_ID][0]
                await asyncio.wait_for(asyncio.shield(report), 10)  # member 0's report is here
                assert report.result() == {0}
                return await original(config, failed, timeout)

            late._agree = agree_after_the_report  # type: ignore[method-assign]
            outcomes = await asyncio.wait_for(r.run({0: dict(reducer=broken)}), 60)
            assert isinstance(outcomes[2], tuple), repr(outcomes[2])  # (it was an InvalidStateError)
            assert isinstance(outcomes[0], AveragingError), outcomes[0]
            assert_exact_mean(r, outcomes, [1, 2, 3])
            # member 0's values are in every part: all are re-reduced without them
            assert all(outcomes[i][1].recovered_ranges == [(i * PART, (i + 1) * PART) for i in range(4)]
                       for i in (1, 2, 3))
            assert "InvalidStateError" not in caplog.text

    with caplog.at_level(logging.INFO, logger="averaging.allreduce"):
        virtual_clock.run(main())


def stall_the_loop(seconds: float) -> None:
    """This process's event loop blocks for ``seconds`` (a synchronous call, a GC pause, an overloaded
    machine): on the virtual clock, time moves on while nothing else runs."""
    asyncio.get_running_loop()._jumping_selector.now += seconds  # type: ignore[attr-defined]


def on_delivery(monkeypatch: pytest.MonkeyPatch, owner: int, member: int, chunk: int,
                action: Callable[[], None]) -> None:
    """Call ``action()`` (synchronously) the first time the owner ``owner`` takes chunk ``chunk`` of
    ``member``."""
    original = allreduce._Owner.deliver
    done: list[bool] = []

    def deliver(self: Any, who: int, index: int, *args: Any) -> None:
        if self.config.me == owner and who == member and index == chunk and not done:
            done.append(True)
            action()
        original(self, who, index, *args)

    monkeypatch.setattr(allreduce._Owner, "deliver", deliver)


@pytest.mark.parametrize("silent", [False, True], ids=["all-healthy", "one-silent"])
def test_an_owner_whose_own_loop_stalls_blames_no_member(silent, monkeypatch, caplog):
    """The loop stalls for 3 x the sender timeout (more than the owner timeout too) while member 0
    takes member 1's second chunk, every member's chunks in flight: nobody is excluded for the
    owner's stall, and every member gets the exact mean of all four. With member 3 silent (it
    stops after two chunks), it alone is excluded, after the sender timeout of running time."""
    async def main() -> None:
        async with Round(4) as r:
            loop = asyncio.get_running_loop()
            on_delivery(monkeypatch, 0, 1, 1, lambda: stall_the_loop(3 * SENDER_TIMEOUT))
            if silent:
                on_outgoing_chunk(r.peers[3], 2, stall_forever)
            outcomes = await asyncio.wait_for(r.run(), 60)
            if not silent:
                assert_exact_mean(r, outcomes, [0, 1, 2, 3])
                assert all(info.recovered_ranges == [] for _, info in outcomes)
                assert "excluding" not in caplog.text and "failed" not in caplog.text
                return
            assert_exact_mean(r, outcomes, [0, 1, 2])
            assert isinstance(outcomes[3], AveragingError), outcomes[3]
            assert f"excluding {r.name(3)}: sent nothing" in caplog.text
            for i in (0, 1, 2):
                assert f"excluding {r.name(i)}" not in caplog.text
            assert loop.time() < 3 * SENDER_TIMEOUT + 3 * SENDER_TIMEOUT  # the stall, exclusion, recovery

    with caplog.at_level(logging.INFO, logger="averaging.allreduce"):
        virtual_clock.run(main())


def _current_task() -> asyncio.Task:
    task = asyncio.current_task()
    assert task is not None
    return task


def _task_name() -> str:
    return _current_task().get_name()


def test_a_chunk_that_is_slow_to_decode_blames_no_member(monkeypatch, caplog):
    """Owner 0's decoding of member 1's second chunk takes 1.5 x the sender timeout (e.g. its worker
    threads are busy; less than the owner timeout, after which the others rightly give up on owner
    0) while its loop runs on: member 1's chunk had arrived, it is not excluded."""
    original = allreduce._codec_work
    slowed: list[bool] = []

    async def codec_work(codec: Any, fn: Callable[..., Any], *args: Any) -> Any:
        if fn is allreduce._decode_checked and not slowed and _task_name() == "slow":
            slowed.append(True)
            await asyncio.sleep(1.5 * SENDER_TIMEOUT)
        return await original(codec, fn, *args)

    async def main() -> None:
        async with Round(4) as r:
            # the receiving task of owner 0 for member 1 is named "slow" once it took member 1's first chunk
            on_delivery(monkeypatch, 0, 1, 0, lambda: _current_task().set_name("slow"))
            monkeypatch.setattr(allreduce, "_codec_work", codec_work)
            outcomes = await asyncio.wait_for(r.run(), 60)
            assert slowed
            assert_exact_mean(r, outcomes, [0, 1, 2, 3])
            assert "excluding" not in caplog.text and "failed" not in caplog.text

    with caplog.at_level(logging.INFO, logger="averaging.allreduce"):
        virtual_clock.run(main())
