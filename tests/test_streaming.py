"""Streaming DiLoCo (algorithms.md 7.2): the schedule (design check D4), the fragments, and the
optimizer's bookkeeping on one peer and on two peers over loopback TCP."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from dht import DHT
from swarm import streaming
from swarm.optimizer import Optimizer, auto_compression, pinned_options
from tests import test_optimizer

dhts = test_optimizer.dhts  # the fixture: loopback DHT peers, shut down after the test


def test_schedule_d4():
    """D4: P = 4, H = 100: offsets 25, 50, 75, 100; each fragment starts exactly once per 100 steps; at
    most one fragment starts per step; with tau = 5 every finish comes exactly 5 steps after its start."""
    h, p, tau = 100, 4, 5
    offsets = streaming.offsets(h, p)
    assert offsets == [25, 50, 75, 100]
    starts: dict[int, list[int]] = {f: [] for f in range(p)}
    finishes: dict[int, list[int]] = {f: [] for f in range(p)}
    in_flight: set[int] = set()
    for t in range(1, 10 * h + 1):
        finishing, starting = streaming.events(t, h, offsets, tau)
        assert len(starting) <= 1 and len(finishing) <= 1
        for f in finishing:
            finishes[f].append(t)
            in_flight.discard(f)
        for f in starting:
            starts[f].append(t)
            in_flight.add(f)
        assert len(in_flight) <= 1  # tau < H / P: one fragment on the wire at a time
    for f in range(p):
        assert starts[f] == [offsets[f] + k * h for k in range(10)]  # once per 100 steps, at its offset
        assert all(b - a == tau for a, b in zip(starts[f], finishes[f]))
        assert len(finishes[f]) == len(starts[f]) - (f == p - 1)  # the last start (t = 1000) finishes at 1005


def test_schedule_without_overlap_and_uneven_offsets():
    assert streaming.offsets(10, 4) == [2, 5, 7, 10]
    assert streaming.offsets(16, 1) == [16]
    for t in range(1, 60):
        finishing, starting = streaming.events(t, 10, [2, 5, 7, 10], 0)
        assert finishing == starting  # tau = 0: a round finishes at the step it starts
    with pytest.raises(ValueError, match="fragment_overlap"):
        streaming.check(16, 4, 4)  # tau * P must stay below H
    with pytest.raises(ValueError, match="fragments"):
        streaming.check(3, 4, 0)
    with pytest.raises(ValueError, match="fragment_overlap"):
        streaming.check(16, 4, -1)
    streaming.check(16, 4, 3)


def test_partition_balanced_and_explicit():
    sizes = [32768, 8192, 128, 128, 49152, 384, 16384, 128, 65536, 256, 65536, 128, 32768]
    groups = streaming.partition(sizes, 4)
    assert sorted(i for g in groups for i in g) == list(range(len(sizes)))
    loads = [sum(sizes[i] for i in g) for g in groups]
    assert max(loads) <= 1.3 * min(loads), loads
    assert streaming.partition(sizes, 4) == groups  # deterministic: every peer splits alike
    assert streaming.partition([5, 5, 5, 5], [[0, 2], [3, 1]]) == [[0, 2], [1, 3]]
    for bad in ([[0, 1], [1, 2, 3]], [[0, 1, 2]], [[0, 1, 2, 3], []], [[0, 1, 2, 3, 4]]):
        with pytest.raises(ValueError, match="each index exactly once"):
            streaming.partition([5, 5, 5, 5], bad)
    with pytest.raises(ValueError, match="number of parameter tensors"):
        streaming.partition([5, 5], 3)
    with pytest.raises(TypeError):
        streaming.partition([5, 5], [["a"], [1]])


def test_streaming_options_are_checked_and_pinned(dhts):
    (d,) = dhts(1)
    params = [torch.nn.Parameter(torch.zeros(4)) for _ in range(4)]
    sgd = lambda p: torch.optim.SGD(p, lr=0.1)  # noqa: E731
    for kwargs, message in [(dict(mode="sync", target_batch_size=64), "mode='diloco'"),
                            (dict(mode="diloco", inner_steps=8, fragment_overlap=2), "fragment_overlap"),
                            (dict(mode="diloco", inner_steps=8, merge_alpha=1.5), "merge_alpha")]:
        with pytest.raises(ValueError, match=message):
            Optimizer(dht=d, run_id="bad", optimizer=sgd, params=params, fragments=4, **kwargs)
    pinned = pinned_options(dict(mode="diloco", fragments=4, fragment_overlap=1))
    assert pinned["fragments"] == 4 and pinned["fragment_overlap"] == 1
    assert pinned["compression"] == auto_compression("diloco", 4) != "float16"
    plain = pinned_options(dict(mode="diloco"))
    assert plain["compression"] == "float16"
    assert not {"fragments", "fragment_overlap", "merge_alpha"} & set(plain)  # as runs announced before them


def test_one_peer_streaming_is_plain_sgd_and_keeps_the_schedule(dhts):
    """Alone, with tau = 0, outer SGD lr 1 without momentum and plain replacement (alpha 0), every
    fragment's outer step installs the local parameters: the trajectory is plain SGD's (the D2 sign
    guard per fragment). The epoch ends when the last fragment finishes: once every H inner steps."""
    (d,) = dhts(1)
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n)) for n in (5, 3, 4, 2)]
    reference = [p.detach().clone() for p in params]
    opt = Optimizer(dht=d, run_id="test-stream-1", optimizer=lambda p: torch.optim.SGD(p, lr=0.1), params=params,
                    mode="diloco", inner_steps=8, outer_lr=1.0, outer_momentum=0.0, fragments=4,
                    fragment_overlap=0, compression=None)
    try:
        assert opt.fragment_offsets == [2, 4, 6, 8] and len(opt.averagers) == 4
        changed = []
        for step in range(20):
            for i, p in enumerate(params):
                p.grad = torch.sin(torch.arange(float(p.numel())) + step + i)
                reference[i] -= 0.1 * p.grad
            changed.append(opt.step(batch_size=1))
        for p, r in zip(params, reference):
            assert torch.allclose(p.detach(), r, atol=1e-6)
        for i in opt.fragment_indices[1]:  # offset 4: its latest outer step was at step 20, the last one
            assert torch.equal(params[i].detach(), opt.global_params[i])
        assert opt.local_epoch == 2  # the last fragment finished at steps 8 and 16
        assert [t + 1 for t, c in enumerate(changed) if c] == [2, 4, 6, 8, 10, 12, 14, 16, 18, 20]
    finally:
        opt.shutdown()


def test_two_peers_stream_fragments_over_loopback(dhts):
    """Two peers (threads, real sockets), 2 fragments, H = 8, tau = 3 (overlapped rounds), 8-bit or
    4-bit on the wire: every fragment is averaged, both peers end with identical global parameters
    that fit the data far better than the initial ones."""
    a, b = dhts(2)
    true_w = torch.linspace(-1, 1, 8).unsqueeze(1)
    results: dict[int, Optimizer] = {}
    errors: list[BaseException] = []
    initial: list[float] = []

    def peer(dht: DHT, index: int) -> None:
        try:
            torch.manual_seed(7)
            model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 1))
            x0 = torch.randn(256, 8, generator=torch.Generator().manual_seed(99))
            if index == 0:
                initial.append(float(((model(x0) - x0 @ true_w) ** 2).mean().detach()))
            opt = Optimizer(dht=dht, run_id="test-stream-2", optimizer=lambda p: torch.optim.Adam(p, 0.03),
                            params=model.parameters(), mode="diloco", inner_steps=8, fragments=2, overlap=True,
                            outer_momentum=0.5, matchmaking_time=1.0, averaging_timeout=10)
            assert opt.fragment_overlap == 3 and opt.merge_alpha == 0.5
            deadline = time.monotonic() + 20
            while opt.tracker.refresh().num_peers < 2 and time.monotonic() < deadline:
                time.sleep(0.1)
            g = torch.Generator().manual_seed(index)
            while opt.local_epoch < 4 and time.monotonic() < deadline + 40:
                x = torch.randn(16, 8, generator=g)
                loss = ((model(x) - x @ true_w) ** 2).mean()
                loss.backward()
                opt.step(batch_size=16, loss=loss)
                opt.zero_grad()
                time.sleep(0.01)
            opt.flush(timeout=30)
            results[index] = opt
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    threads = [threading.Thread(target=peer, args=(d, i)) for i, d in enumerate((a, b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    try:
        if errors:
            raise errors[0]
        first, second = results[0], results[1]
        assert first.local_epoch >= 4 and second.local_epoch >= 4
        ok = [r for r in first.rounds if r["result"] == "ok"]
        assert len(ok) >= 4, first.rounds
        assert first.round_counts["ok"] >= 4 and second.round_counts["ok"] >= 4
        if first.local_epoch == second.local_epoch and not first._fragment_pending:
            for ga, gb in zip(first.global_params, second.global_params):
                assert torch.equal(ga, gb)
        x0 = torch.randn(256, 8, generator=torch.Generator().manual_seed(99))
        w1, b1, w2, b2 = first.global_params
        final = float((((x0 @ w1.T + b1) @ w2.T + b2 - x0 @ true_w) ** 2).mean())
        assert final < 0.5 * initial[0], (final, initial)
        assert all(r["group_size"] == 2 for r in ok)
    finally:
        for opt in results.values():
            opt.shutdown()


def test_error_feedback_is_checkpointed_but_never_shared(dhts):
    """A biased codec's residual (sparseloco: error feedback) is in this peer's checkpoints
    (training_state_blob) and comes back from one, but is not in the shared state (its hash does not
    depend on it) and a state downloaded without it clears it; a malformed one is refused whole."""
    from swarm.state import StateFormatError, pack_state, unpack_state

    (d,) = dhts(1)
    made = []

    def make(run_id: str) -> Optimizer:
        torch.manual_seed(3)
        model = torch.nn.Linear(64, 64)
        opt = Optimizer(dht=d, run_id=run_id, optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
                        params=model.parameters(), mode="diloco", inner_steps=4, compression="sparseloco")
        made.append(opt)
        return opt

    try:
        opt = make("test-ef-a")
        residual = torch.randn(64 * 64 + 64)
        opt.averager.codec.feedback.residual = residual.clone()
        shared = unpack_state(pack_state(opt._training_state()))
        assert not any(name.startswith("local.") for name in shared.tensors)
        assert "error_feedback" not in shared.metadata
        checkpoint = unpack_state(opt.training_state_blob())
        assert torch.equal(checkpoint.tensors["local.ef.0"], residual)
        assert checkpoint.metadata["error_feedback"][0]["codec"] == "sparseloco"

        other = make("test-ef-b")
        other.load_training_state(checkpoint)
        assert torch.equal(other.averager.codec.feedback.residual, residual)
        hash_with = other.state_hash
        other.averager.codec.feedback.residual.zero_()
        other._publish_state()
        assert other.state_hash == hash_with  # the residual is not part of what the swarm agrees on

        bad = unpack_state(opt.training_state_blob())
        bad.tensors["local.ef.0"] = torch.full((10,), float("nan"))
        epoch_before = other.local_epoch
        other.averager.codec.feedback.residual = residual.clone()
        with pytest.raises(StateFormatError, match="NaN"):
            other.load_training_state(bad)
        assert torch.equal(other.averager.codec.feedback.residual, residual) and other.local_epoch == epoch_before
        bad.metadata["error_feedback"] = [{"averager": 7}]
        with pytest.raises(StateFormatError, match="error_feedback"):
            other.load_training_state(bad)

        other.load_training_state(shared)  # as downloaded from a peer: no residual, so it starts empty
        assert other.averager.codec.feedback.residual.numel() == 0
    finally:
        for o in made:
            o.shutdown()
