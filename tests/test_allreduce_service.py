"""AllReduceService in-process on MemoryNetwork: the part owner's reduction and result encoding run
off the event loop (during a slow reduction the loop stays responsive: a heartbeat's largest gap is
far below the reduction's duration; the results are bit-identical to reducing on the loop), and a
round's phases are freed without the cyclic GC."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from averaging import allreduce, compression
from averaging.allreduce import AllReduceService, RoundConfig, weighted_mean
from averaging.group import GroupInfo
from dht.peer.memory_transport import MemoryNetwork

SIZE = 1 << 20  # values per member: two parts of 2**19, one chunk each
REDUCE_SECONDS = 0.6  # each reduction's duration (the reducer sleeps, as a heavy aggregator computes)
MAX_GAP = REDUCE_SECONDS / 2  # the bound: the loop never stalls for half a reduction


def _slow(chunkwise: bool):
    def reducer(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        time.sleep(REDUCE_SECONDS)  # releases the GIL, like torch's kernels
        return weighted_mean(x, weights)

    reducer.chunkwise = chunkwise  # type: ignore[attr-defined]
    return reducer


async def _round(reducer, codec_name: str) -> tuple[list[torch.Tensor], float]:
    """A 2-member round; returns both results and the heartbeat's largest gap (s) meanwhile."""
    network = MemoryNetwork(latency=0.0, seed=0)
    peers = [await network.create_peer() for _ in range(2)]
    gaps = [0.0]
    done = asyncio.Event()

    async def heartbeat() -> None:
        loop = asyncio.get_running_loop()
        last = loop.time()
        while not done.is_set():
            await asyncio.sleep(0.005)
            now = loop.time()
            gaps.append(now - last)
            last = now

    try:
        peers[0].add_addresses(peers[1].peer_id, peers[1].get_visible_addresses())
        peers[1].add_addresses(peers[0].peer_id, peers[0].get_visible_addresses())
        services = [AllReduceService(p, "offloop") for p in peers]
        group = GroupInfo(b"\x07" * 20, [p.peer_id for p in peers], [SIZE // 2, SIZE // 2], [None, None],
                          [False, False], [None, None])
        g = torch.Generator().manual_seed(0)
        flats = [torch.randn(SIZE, generator=g) for _ in peers]
        beat = asyncio.ensure_future(heartbeat())
        outcomes = await asyncio.wait_for(asyncio.gather(*(
            services[i].run(RoundConfig(group, i, float(i + 1), compression.get(codec_name), reducer,
                                        chunk_elems=SIZE // 2, sender_timeout=30.0), flats[i])
            for i in range(2))), 60)
        done.set()
        await beat
    finally:
        await asyncio.gather(*(p.shutdown() for p in peers))
    return [result for result, _ in outcomes], max(gaps)


@pytest.mark.parametrize("chunkwise,codec", [(True, "float16"), (False, "none")],
                         ids=["chunkwise-float16", "whole-part-none"])
async def test_the_loop_stays_responsive_during_a_slow_reduction(chunkwise, codec, monkeypatch):
    results, gap = await _round(_slow(chunkwise), codec)
    assert gap < MAX_GAP, f"the event loop stalled for {gap:.3f} s during {REDUCE_SECONDS} s reductions"
    assert torch.equal(results[0], results[1])
    # the same round with every reduction on the loop (the code before): the same bits, and a stall
    monkeypatch.setattr(allreduce, "INLINE_VALUES", 1 << 62)
    on_loop, stalled = await _round(_slow(chunkwise), codec)
    assert torch.equal(on_loop[0], results[0]) and torch.equal(on_loop[1], results[1])
    assert stalled >= REDUCE_SECONDS * 0.9


async def test_a_rounds_phases_are_freed_without_the_cyclic_gc(monkeypatch):
    """No reference cycle holds a phase's owner (with its snapshot, result and encoded part) after
    the round: with the cyclic GC off, every _Owner is gone once the round returned."""
    import gc
    import weakref

    owners: list[weakref.ref] = []
    original = allreduce._Owner.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        owners.append(weakref.ref(self))

    monkeypatch.setattr(allreduce._Owner, "__init__", init)
    gc.disable()
    try:
        results, _ = await _round(weighted_mean, "float16")
        for _ in range(5):
            await asyncio.sleep(0)
        assert len(owners) == 2 and all(ref() is None for ref in owners), [ref() for ref in owners]
    finally:
        gc.enable()
    assert torch.equal(results[0], results[1])
