"""averaging.Averager across OS processes on loopback: each peer is ``tests/avg_worker.py`` (one
dht.DHT + one Averager) driven by JSON commands on its stdin. Exact weighted means, kill -9 and
SIGSTOP of a member mid-round, a member that never sends, a client-mode member, mismatched
shapes, NaN, every codec, and Moshpit mixing of groups smaller than the swarm."""

from __future__ import annotations

import collections
import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import pytest
import torch

from averaging.matchmaking import next_group_bits
from averaging.partition import flatten
from tests.avg_worker import make_tensors, parse_shapes
from tests.processes import ROOT, stop

pytestmark = pytest.mark.slow

SHAPES = "7x13,101,1"  # odd sizes: 193 values
SENDER_TIMEOUT = 3.0  # the workers' --sender-timeout; reducer timeout = 2x
STEP_TIMEOUT = 60.0  # the round's global timeout in the fault tests
FAULTY_TIMEOUT = 20.0  # a faulty member's, where it must not retry until STEP_TIMEOUT (the test waits for it)


class Peer:
    """One ``avg_worker.py`` process: ``command`` sends a JSON command, ``answer`` waits for its reply."""

    def __init__(self, name: str, args: list[str], directory: Path):
        self.name, self.log_path = name, directory / f"{name}.log"
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "avg_worker.py"), *args],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True,
                                     env=env, cwd=ROOT)
        self.events: list[dict] = []
        self._answers: dict[int, dict] = {}
        self._lines: queue.Queue = queue.Queue()
        self._next_id = 0
        self._ready = threading.Event()
        self.peer_id = self.address = ""
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            line = line.strip()
            if line.startswith("PEER "):
                _, self.peer_id, self.address = line.split()
            elif line == "READY":
                self._ready.set()
            elif line.startswith("{"):
                self._lines.put(json.loads(line))
        self._lines.put(None)

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{self.name} did not start:\n{self.log()[-3000:]}")

    def command(self, op: str, **fields: Any) -> int:
        self._next_id += 1
        self.proc.stdin.write(json.dumps({"op": op, "id": self._next_id, **fields}) + "\n")
        self.proc.stdin.flush()
        return self._next_id

    def answer(self, command_id: int, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while command_id not in self._answers:
            try:
                message = self._lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                raise AssertionError(f"{self.name}: no answer within {timeout} s:\n{self.log()[-3000:]}") from None
            if message is None:
                raise AssertionError(f"{self.name} exited:\n{self.log()[-3000:]}")
            if "event" in message:
                self.events.append(message)
            else:
                self._answers[message.get("id")] = message
        return self._answers.pop(command_id)

    def wait_event(self, timeout: float) -> dict:
        """The next ``{"event": "allreduce"}`` (this peer's all-reduce started)."""
        deadline = time.monotonic() + timeout
        while not self.events:
            message = self._lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            if message is None:
                raise AssertionError(f"{self.name} exited:\n{self.log()[-3000:]}")
            if "event" in message:
                self.events.append(message)
            else:
                self._answers[message.get("id")] = message
        return self.events.pop(0)

    def call(self, op: str, timeout: float = 60.0, **fields: Any) -> dict:
        answer = self.answer(self.command(op, **fields), timeout)
        assert "error" not in answer, f"{self.name}: {answer['error']}"
        return answer

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGCONT)  # in case a test stopped it
        if self.proc.stdin:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        stop(self.proc)  # SIGKILL by PID, reap
        self._log.close()


@contextlib.contextmanager
def peers(directory: Path, specs: Sequence[Sequence[str]]) -> Iterator[list[Peer]]:
    """One worker per entry of ``specs`` (extra command-line arguments); the first starts the DHT,
    the others join it. Every worker is killed by its PID at the end, even when the test failed."""
    started: list[Peer] = []
    try:
        common = ["--sender-timeout", str(SENDER_TIMEOUT), "--min-matchmaking-time", "1.0", "--request-timeout", "1.0"]
        started.append(Peer("peer0", [*common, *specs[0]], directory))
        started[0].wait_ready()
        for i, spec in enumerate(specs[1:], 1):
            started.append(Peer(f"peer{i}", [*common, *spec, started[0].address], directory))
        for p in started:
            p.wait_ready()
        yield started
    finally:
        for p in started:
            p.close()


def seed_args(seed: int, *extra: str) -> list[str]:
    return ["--seed", str(seed), *extra]


def tensors_of(seed: int, shapes: str = SHAPES, fault: str = "none") -> torch.Tensor:
    return flatten(make_tensors(seed, parse_shapes(shapes), fault))


def weighted_mean(flats: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    return sum(w * f.double() for w, f in zip(weights, flats)) / sum(weights)


def step_all(group: Sequence[Peer], directory: Path, weights: Sequence[float] | None = None,
             timeout: float | Sequence[float] = 20.0, wait: float | None = None,
             faulty: Sequence[int] = ()) -> list[tuple[dict, torch.Tensor]]:
    """``step`` on every peer at once; (answer, flat tensors afterwards) per peer. The ``faulty``
    (indices) step with ``allow_retries=False``: once excluded they answer at once, instead of
    looking for another group, alone, until their step's timeout."""
    weights = weights or [1.0] * len(group)
    timeouts = [timeout] * len(group) if isinstance(timeout, (int, float)) else list(timeout)
    ids = [p.command("step", weight=w, timeout=t, out=str(directory / f"{p.name}.pt"), allow_retries=i not in faulty)
           for i, (p, w, t) in enumerate(zip(group, weights, timeouts))]
    return collect(group, ids, directory, wait or max(timeouts) + 30)


def collect(group: Sequence[Peer], ids: Sequence[int], directory: Path, wait: float) -> list[tuple[dict, torch.Tensor]]:
    answers = [p.answer(i, wait) for p, i in zip(group, ids)]
    return [(a, torch.load(directory / f"{p.name}.pt")) for p, a in zip(group, answers)]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def assert_exact(outcomes: Sequence[tuple[dict, torch.Tensor]], expected: torch.Tensor, members: set[str],
                 survivors: set[str] | None = None, size: int = 193) -> None:
    """Every outcome succeeded in the same group, holds the weighted mean (float32 accuracy) bit for
    bit the same as the others, and its parts cover the vector with exactly ``survivors``."""
    survivors = members if survivors is None else survivors
    first = outcomes[0][1]
    for answer, flat in outcomes:
        assert answer.get("ok"), answer
        assert set(answer["members"]) == members and set(answer["survivors"]) == survivors
        assert answer["group_id"] == outcomes[0][0]["group_id"]
        assert torch.allclose(flat.double(), expected, rtol=1e-6, atol=1e-6), (flat.double() - expected).abs().max()
        assert torch.equal(bits(flat), bits(first))
        spans = sorted((s, e) for s, e, _ in answer["parts"])
        assert spans[0][0] == 0 and spans[-1][1] == size and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        assert all(set(contributors) == survivors for _, _, contributors in answer["parts"])


def test_four_processes_average_exactly(tmp_path):
    weights = [1.0, 3.5, 0.25, 7.0]
    with peers(tmp_path, [seed_args(i, "--target-group-size", "4", "--min-group-size", "4") for i in range(4)]) as group:
        outcomes = step_all(group, tmp_path, weights)
        expected = weighted_mean([tensors_of(i) for i in range(4)], weights)
        assert_exact(outcomes, expected, {p.peer_id for p in group})
        for answer, _ in outcomes:
            assert answer["recovered_ranges"] == [] and answer["bytes_sent"] > 0 and answer["bytes_received"] > 0


# The fault tests: 300 000 values in chunks of 16 384; peer1 pauses 1 s after two chunks of every part
# (less than the sender timeout, so it stays in), which holds the round open after the first chunks were
# averaged with everyone. peer3 is killed or stopped 0.3 s into its all-reduce, in the middle of that.
BIG = "300x1000"
FAULT_SPECS = [seed_args(0), seed_args(1, "--fault", "slow_start", "--fault-delay", "1.0", "--fault-after", "2"),
               seed_args(2), seed_args(3)]
BIG_ARGS = ["--shapes", BIG, "--chunk-bytes", str(1 << 16), "--target-group-size", "4", "--min-group-size", "4"]


def _survivors_after_fault(tmp_path: Path, group: list[Peer], fault: str) -> tuple[list, float]:
    weights = [1.0, 2.0, 3.0, 4.0]
    victim = group[3]
    ids = [p.command("step", weight=w, timeout=STEP_TIMEOUT, out=str(tmp_path / f"{p.name}.pt"),
                     allow_retries=p is not victim)  # excluded, it answers at once when it runs again
           for p, w in zip(group, weights)]
    victim.wait_event(timeout=30)
    time.sleep(0.3)
    t_fault = time.time()
    if fault == "kill":
        os.kill(victim.proc.pid, signal.SIGKILL)
    else:
        os.kill(victim.proc.pid, signal.SIGSTOP)
    outcomes = collect(group[:3], ids[:3], tmp_path, STEP_TIMEOUT + 30)
    expected = weighted_mean([tensors_of(i, BIG) for i in range(3)], weights[:3])
    assert_exact(outcomes, expected, {p.peer_id for p in group}, {p.peer_id for p in group[:3]}, size=300_000)
    for answer, _ in outcomes:
        assert answer["t_end"] > t_fault, "the round was over before the fault: nothing was tested"
        # excluded after the sender/reducer timeouts, far from the round's global timeout
        assert answer["t_end"] - t_fault < 3 * SENDER_TIMEOUT + 8 < STEP_TIMEOUT / 2, answer
        assert answer["recovered_ranges"], "the victim's part must have been re-reduced among the survivors"
    return ids, t_fault


def test_kill_minus_9_mid_round_survivors_get_the_exact_mean(tmp_path):
    with peers(tmp_path, [[*spec, *BIG_ARGS] for spec in FAULT_SPECS]) as group:
        _survivors_after_fault(tmp_path, group, "kill")
        # the others carry on: the next round among the three survivors is exact again
        for p in group[:3]:
            p.call("config", fault="none", target_group_size=3, min_group_size=3, seed=10 + int(p.name[-1]))
        outcomes = step_all(group[:3], tmp_path)
        expected = weighted_mean([tensors_of(10 + i, BIG) for i in range(3)], [1.0] * 3)
        assert_exact(outcomes, expected, {p.peer_id for p in group[:3]}, size=300_000)


def test_sigstop_mid_round_does_not_wedge_the_group(tmp_path):
    with peers(tmp_path, [[*spec, *BIG_ARGS] for spec in FAULT_SPECS]) as group:
        ids, _ = _survivors_after_fault(tmp_path, group, "stop")
        victim = group[3]
        os.kill(victim.proc.pid, signal.SIGCONT)
        answer = victim.answer(ids[3], STEP_TIMEOUT + 30)
        assert "error" in answer and answer["averaging_error"], answer  # it was excluded ...
        assert torch.equal(bits(torch.load(tmp_path / "peer3.pt")), bits(tensors_of(3, BIG)))  # ... untouched
        # it recovers: the next round with all four is exact
        for p in group:
            p.call("config", fault="none", seed=20 + int(p.name[-1]))
        outcomes = step_all(group, tmp_path)
        expected = weighted_mean([tensors_of(20 + i, BIG) for i in range(4)], [1.0] * 4)
        assert_exact(outcomes, expected, {p.peer_id for p in group}, size=300_000)


def test_member_that_never_sends_is_excluded(tmp_path):
    specs = [seed_args(i, "--target-group-size", "4", "--min-group-size", "4") for i in range(4)]
    specs[2] += ["--fault", "never_send"]
    with peers(tmp_path, specs) as group:
        outcomes = step_all(group, tmp_path, timeout=STEP_TIMEOUT, faulty=[2])
        silent = group[2]
        expected = weighted_mean([tensors_of(i) for i in (0, 1, 3)], [1.0] * 3)
        assert_exact([outcomes[i] for i in (0, 1, 3)], expected, {p.peer_id for p in group},
                     {group[i].peer_id for i in (0, 1, 3)})
        for answer, _ in (outcomes[i] for i in (0, 1, 3)):
            assert answer["elapsed"] < 3 * SENDER_TIMEOUT + 8 < STEP_TIMEOUT / 2
        assert outcomes[2][0].get("averaging_error"), outcomes[2][0]
        assert torch.equal(bits(outcomes[2][1]), bits(tensors_of(2)))
        assert any(f"excluding {silent.peer_id}: sent nothing" in group[i].log() for i in (0, 1, 3))


def test_client_mode_member(tmp_path):
    specs = [seed_args(i, "--target-group-size", "4", "--min-group-size", "4") for i in range(4)]
    specs[3] += ["--client-mode"]
    weights = [2.0, 1.0, 1.0, 5.0]
    with peers(tmp_path, specs) as group:
        assert group[3].address == "-"  # it cannot be dialed
        for seed in (0, 100):  # twice: the client may find the group before or after the leader
            for p in group:
                p.call("set", seed=seed + int(p.name[-1]))
            outcomes = step_all(group, tmp_path, weights)
            expected = weighted_mean([tensors_of(seed + i) for i in range(4)], weights)
            assert_exact(outcomes, expected, {p.peer_id for p in group})
            assert len(outcomes[0][0]["parts"]) <= 3  # the client owns no part


def test_mismatched_shapes_are_never_grouped(tmp_path):
    other = "7x13,100,1"
    specs = [seed_args(0), seed_args(1, "--shapes", other), seed_args(2), seed_args(3, "--shapes", other)]
    with peers(tmp_path, [[*s, "--target-group-size", "4"] for s in specs]) as group:
        outcomes = step_all(group, tmp_path, timeout=10.0)
        same = assert_exact  # two groups of two, each exact over peers of the same shapes
        same([outcomes[0], outcomes[2]], weighted_mean([tensors_of(0), tensors_of(2)], [1.0, 1.0]),
             {group[0].peer_id, group[2].peer_id})
        same([outcomes[1], outcomes[3]], weighted_mean([tensors_of(1, other), tensors_of(3, other)], [1.0, 1.0]),
             {group[1].peer_id, group[3].peer_id}, size=192)


def test_wrong_chunks_and_nan_are_excluded_naming_the_member(tmp_path):
    # five members, two faulty: the three others are still a majority of the group and finish
    specs = [seed_args(i, "--target-group-size", "5", "--min-group-size", "5") for i in range(5)]
    specs[1] += ["--fault", "bad_chunks"]
    specs[3] += ["--fault", "nan"]
    with peers(tmp_path, specs) as group:
        # the faulty retry (a failed first round is retried by all), but give up sooner than the others
        timeouts = [FAULTY_TIMEOUT if i in (1, 3) else STEP_TIMEOUT for i in range(5)]
        outcomes = step_all(group, tmp_path, timeout=timeouts)
        good = [0, 2, 4]
        expected = weighted_mean([tensors_of(i) for i in good], [1.0] * 3)
        assert_exact([outcomes[i] for i in good], expected, {p.peer_id for p in group},
                     {group[i].peer_id for i in good})
        for i, fault in ((1, "none"), (3, "nan")):  # both failed and kept their own values
            assert outcomes[i][0].get("averaging_error"), outcomes[i][0]
            assert torch.equal(bits(outcomes[i][1]), bits(tensors_of(i, fault=fault)))
        logs = "".join(group[i].log() for i in good)
        assert f"excluding {group[3].peer_id}: sent NaN or Inf values" in logs
        assert f"excluding {group[1].peer_id}: sent a malformed chunk" in logs


# codec -> (bound on the largest error (None: not bounded), bound on the RMS error relative to the exact
# weighted mean's RMS, largest share of the uncompressed bytes sent). Values are N(0, 1) in chunks of 4096:
# float16 rounds twice (contribution, result) by 2^-11 relative; uint8/blockwise8 by half a level of
# range/255 or absmax/127 per chunk/block; quantile8's levels are sparse in the tails (max error up
# to half the gap between the two largest quantiles), so only its RMS error is tight; topk (10 %) and
# PowerSGD (rank 2) keep the largest components of every contribution and only the owner's own values
# exactly, so one round is far from the mean (the rest comes later through error feedback).
CODECS = {"float16": (4e-3, 1e-3, 0.55), "uint8": (0.05, 0.03, 0.3), "blockwise8": (0.05, 0.03, 0.3),
          "quantile8": (1.0, 0.06, 0.4), "topk:0.1": (None, 0.8, 0.65), "powersgd:2": (None, 0.9, 0.4)}


def test_every_codec_end_to_end(tmp_path):
    shapes, weights = "64x256", [1.0, 2.0, 3.0]
    specs = [seed_args(i, "--shapes", shapes, "--chunk-bytes", str(1 << 14), "--target-group-size", "3",
                       "--min-group-size", "3") for i in range(3)]
    with peers(tmp_path, specs) as group:
        flats = [tensors_of(i, shapes) for i in range(3)]
        expected = weighted_mean(flats, weights)
        outcomes = step_all(group, tmp_path, weights)
        assert_exact(outcomes, expected, {p.peer_id for p in group}, size=64 * 256)
        uncompressed = sum(a["bytes_sent"] for a, _ in outcomes)
        for codec, (max_error, rms_error, max_share) in CODECS.items():
            for p in group:  # a new averager with this codec; the tensors are regenerated from the seeds
                p.call("config", compression=codec)
            outcomes = step_all(group, tmp_path, weights)
            results = [flat for _, flat in outcomes]
            for answer, flat in outcomes:
                assert answer.get("ok"), (codec, answer)
                assert torch.equal(bits(flat), bits(results[0])), codec  # owners send averages: identical
            error = (results[0].double() - expected).abs()
            rms = (error.pow(2).mean().sqrt() / expected.pow(2).mean().sqrt()).item()  # relative to the mean's
            sent = sum(a["bytes_sent"] for a, _ in outcomes)
            print(f"{codec}: max error {error.max().item():.4g}, relative RMS error {rms:.4g}, "
                  f"bytes {sent / uncompressed:.3f} of uncompressed")
            assert sent <= max_share * uncompressed, (codec, sent, uncompressed)
            assert 0 < rms <= rms_error, (codec, rms)  # lossy, within the codec's accuracy
            if max_error is not None:
                assert error.max() <= max_error, (codec, error.max())


def test_groups_smaller_than_the_swarm_mix_over_rounds(tmp_path):
    """8 peers, groups of 4 under 1-bit Moshpit keys (two groups a round): after the first round each
    group holds its own mean; because group-mates get distinct keys, later rounds mix the groups and
    the spread between peers keeps shrinking towards the global mean (which every round preserves)."""
    n = 8
    specs = [seed_args(i, "--target-group-size", "4", "--initial-group-bits", str(i % 2)) for i in range(n)]
    with peers(tmp_path, specs) as group:
        flats = [tensors_of(i) for i in range(n)]
        mean = torch.stack(flats).double().mean(0)

        def spread(values: Sequence[torch.Tensor]) -> float:
            return (torch.stack(values).double() - mean).pow(2).mean().item()

        history = [spread(flats)]
        mixed = False
        for round_ in range(3):
            outcomes = step_all(group, tmp_path, timeout=6.0)
            flats = [flat for _, flat in outcomes]
            history.append(spread(flats))
            print(f"round {round_}: groups {sorted(len(a['members']) for a, _ in outcomes if a.get('ok'))}, "
                  f"failed {sum(not a.get('ok') for a, _ in outcomes)}, variance {history[-1]:.3g}")
            assert torch.allclose(torch.stack(flats).double().mean(0), mean, atol=1e-5)  # the mean is preserved
            if round_ == 0:
                first = {frozenset(a["members"]) for a, _ in outcomes if a.get("ok")}
            else:
                mixed |= any(frozenset(a["members"]) not in first for a, _ in outcomes if a.get("ok"))
        assert mixed, "later groups repeated the first round's groups"
        assert history[1] < 0.5 * history[0], history
        assert history[-1] < 0.5 * history[1], history  # mixing went on after the first grouping
        # random groups of 4 out of 8 would leave (N - M) / (M (N - 1)) = 1/7 of the variance per round
        assert history[-1] < 0.05 * history[0], history


def test_next_keys_are_distinct_or_balanced():
    """Group-mates get distinct keys when the group is at most the number of keys, and spread evenly
    over the keys when it is larger (so next round's groups are full, not one crowd and one loner)."""
    for group_size, key_bits in [(4, "00"), (3, "101"), (4, "0"), (8, "01"), (5, "1"), (16, "110")]:
        for seed in range(50):
            group_id = seed.to_bytes(4, "big") * 5
            keys = [next_group_bits(key_bits, group_id, i, group_size) for i in range(group_size)]
            counts = collections.Counter(keys)
            buckets = 2 ** len(key_bits)
            assert all(len(k) == len(key_bits) and set(k) <= {"0", "1"} for k in keys)
            if group_size <= buckets:
                assert len(counts) == group_size
            else:
                assert len(counts) == buckets and max(counts.values()) - min(counts.values()) <= 1
