"""Attack harness: what Byzantine peers send, as pure tensor functions, to test aggregators and setups.

Every attack is ``attack(honest [m, d], b, *, generator=None, **params) -> malicious [b, d]``:
``honest`` holds the honest updates of the round (omniscient attackers see them all; pass a peer's
own sub-batch gradients for a realistic one), ``b`` the number of attackers, ``generator`` a
``torch.Generator`` for the random ones (default: seeded with 0, so runs repeat). Attacker ``k``'s
"own" honest update is ``honest[k % m]``. Parameters default to the values of the design notes'
attack catalogue (algorithms.md section 8.1).

    >>> from averaging import attacks, aggregators
    >>> honest = torch.randn(16, 1000) + 1
    >>> x = attacks.make_inputs(honest, 4, "alie")            # [20, 1000]: honest rows, then attackers
    >>> err = (aggregators.median(x) - honest.mean(0)).norm()

Registry: :data:`ATTACKS` (name -> function with its defaults); :func:`get` binds parameters.
Beyond update-level attacks: :func:`flip_labels` (label flipping is a data transform: train the
attacker on flipped labels and send its honest-looking gradient), :class:`DelayedUpdates` (a
stale/delayed-update source for training loops) and :func:`collude_on_part` with
:func:`part_ranges` (colluders that attack only the part owned by one peer in the butterfly and
behave honestly elsewhere).
"""

from __future__ import annotations

import collections
import functools
import inspect
import math
import statistics
from typing import Any, Callable

import torch

__all__ = ["ATTACKS", "get", "names", "make_inputs", "sign_flip", "scaling", "large_constant", "random_direction",
           "gaussian", "uniform", "zero", "drop", "nan", "inf", "alie", "alie_z", "ipm", "stale", "mimic",
           "min_max", "centered_clip_adaptive", "collude_on_part", "part_ranges", "flip_labels",
           "DelayedUpdates"]

Attack = Callable[..., torch.Tensor]


def _check(honest: torch.Tensor, b: int) -> None:
    if (not isinstance(honest, torch.Tensor) or honest.dim() != 2 or honest.shape[0] < 1
            or not honest.is_floating_point()):
        raise ValueError(f"honest must be a float tensor of shape [m >= 1, d], got "
                         f"{tuple(honest.shape) if isinstance(honest, torch.Tensor) else type(honest).__name__}")
    if isinstance(b, bool) or not isinstance(b, int) or b < 0:
        raise ValueError(f"b (number of attackers) must be an integer >= 0, got {b!r}")


def _own(honest: torch.Tensor, b: int) -> torch.Tensor:
    return honest[torch.arange(b) % honest.shape[0]]


def _generator(generator: torch.Generator | None) -> torch.Generator:
    return generator if generator is not None else torch.Generator().manual_seed(0)


def sign_flip(honest: torch.Tensor, b: int, *, scale: float = 1000.0,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """``-scale * g`` (own update g); scale 1000 as in BTARD, 10 as Garfield's "reverse"."""
    _check(honest, b)
    return -scale * _own(honest, b)


def scaling(honest: torch.Tensor, b: int, *, scale: float = 1000.0,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """``scale * g``: the own update blown up (default x1000)."""
    _check(honest, b)
    return scale * _own(honest, b)


def large_constant(honest: torch.Tensor, b: int, *, value: float = 1000.0,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """``value * 1`` (the T13 fixture's attackers, value 1000)."""
    _check(honest, b)
    return torch.full((b, honest.shape[1]), float(value), dtype=honest.dtype)


def random_direction(honest: torch.Tensor, b: int, *, scale: float = 1000.0,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """One random unit direction shared by all attackers, times ``scale * ‖g‖`` (BTARD's random attack)."""
    _check(honest, b)
    u = torch.randn(honest.shape[1], generator=_generator(generator), dtype=torch.float64)
    u = (u / u.norm().clamp(min=1e-300)).to(honest.dtype)
    norms = torch.linalg.vector_norm(_own(honest, b), dim=1, keepdim=True)
    return scale * norms * u[None, :]


def gaussian(honest: torch.Tensor, b: int, *, sigma: float = 200.0,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """i.i.d. ``N(0, sigma^2)`` coordinates (sigma 200)."""
    _check(honest, b)
    return sigma * torch.randn(b, honest.shape[1], generator=_generator(generator), dtype=honest.dtype)


def uniform(honest: torch.Tensor, b: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """i.i.d. ``U[0, 1)`` coordinates (Garfield's "random"; after normalisation almost ``1 / sqrt(d)``)."""
    _check(honest, b)
    return torch.rand(b, honest.shape[1], generator=_generator(generator), dtype=honest.dtype)


def zero(honest: torch.Tensor, b: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """All zeros (a free rider)."""
    _check(honest, b)
    return torch.zeros(b, honest.shape[1], dtype=honest.dtype)


def drop(honest: torch.Tensor, b: int, *, p: float = 0.1, generator: torch.Generator | None = None) -> torch.Tensor:
    """The own update with a random fraction ``p`` (0.1) of its coordinates zeroed."""
    _check(honest, b)
    keep = torch.rand(b, honest.shape[1], generator=_generator(generator)) >= p
    return _own(honest, b) * keep.to(honest.dtype)


def nan(honest: torch.Tensor, b: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """All NaN (aggregators raise on it; the all-reduce excludes the sender)."""
    _check(honest, b)
    return torch.full((b, honest.shape[1]), float("nan"), dtype=honest.dtype)


def inf(honest: torch.Tensor, b: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Alternating ``+inf`` / ``-inf`` coordinates."""
    _check(honest, b)
    signs = 1.0 - 2.0 * (torch.arange(honest.shape[1]) % 2).to(honest.dtype)
    return (signs * float("inf")).expand(b, -1).clone()


def alie_z(n: int, f: int) -> float:
    """ALIE's shift ``z = Φ⁻¹((n - s) / n)``, ``s = floor(n / 2 + 1) - f`` (clamped to [1, n - 1]):
    1.150 for n = 16, f = 7; 0.502 for n = 13, f = 3."""
    if n < 2:
        raise ValueError(f"alie_z: need n >= 2, got {n}")
    s = min(max(math.floor(n / 2 + 1) - f, 1), n - 1)
    return statistics.NormalDist().inv_cdf((n - s) / n)


def _mean_std(honest: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mu = honest.mean(dim=0)
    sigma = honest.std(dim=0, correction=1 if honest.shape[0] > 1 else 0)
    return mu, sigma


def alie(honest: torch.Tensor, b: int, *, n: int | None = None, z: float | None = None,
         generator: torch.Generator | None = None) -> torch.Tensor:
    """"A little is enough" (Baruch et al. 2019): every attacker sends ``μ - z σ`` (coordinate-wise honest
    mean and standard deviation). ``n`` (None: ``m + b``) is the group size, ``z`` (None: :func:`alie_z`
    of ``n`` and ``f = b``; Garfield uses 0.21)."""
    _check(honest, b)
    z = alie_z(n if n is not None else honest.shape[0] + b, b) if z is None else float(z)
    mu, sigma = _mean_std(honest)
    return (mu - z * sigma).expand(b, -1).clone()


def ipm(honest: torch.Tensor, b: int, *, eps: float = 0.1, generator: torch.Generator | None = None) -> torch.Tensor:
    """Inner-product manipulation (Xie et al. 2019): ``-eps * μ``. ``eps`` 0.1 targets median/Krum-like
    rules; 100 (registered as ``ipm_large``) mean-like ones."""
    _check(honest, b)
    return (-eps * honest.mean(dim=0)).expand(b, -1).clone()


def stale(honest: torch.Tensor, b: int, *, past: torch.Tensor | None = None,
          generator: torch.Generator | None = None) -> torch.Tensor:
    """Stale/delayed updates: attacker ``k`` sends ``past[k % len(past)]``, updates from ``Δt`` steps ago
    (BTARD: Δt = 1000). In a training loop keep them with :class:`DelayedUpdates`."""
    _check(honest, b)
    if past is None:
        raise ValueError("stale: pass past=[k, d] updates from earlier steps (see DelayedUpdates)")
    past = torch.as_tensor(past, dtype=honest.dtype)
    if past.dim() == 1:
        past = past[None, :]
    if past.dim() != 2 or past.shape[1] != honest.shape[1] or past.shape[0] < 1:
        raise ValueError(f"stale: past must have shape [k >= 1, {honest.shape[1]}], got {tuple(past.shape)}")
    return past[torch.arange(b) % past.shape[0]].clone()


def mimic(honest: torch.Tensor, b: int, *, target: int = 0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Every attacker copies honest peer ``target`` (over-weights one peer's data: a heterogeneity attack)."""
    _check(honest, b)
    if not 0 <= target < honest.shape[0]:
        raise ValueError(f"mimic: target must be in [0, {honest.shape[0]}), got {target}")
    return honest[target].expand(b, -1).clone()


def min_max(honest: torch.Tensor, b: int, *, direction: str = "std", gamma: float = 10.0, tol: float = 1e-5,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """Min-max (Shejwalkar & Houmansadr 2021): ``μ + γ p`` with the largest γ (bisection from ``gamma``)
    such that its largest distance to an honest update is at most the largest honest pairwise
    distance. ``direction``: ``"std"`` (p = -σ), ``"unit"`` (-μ/‖μ‖) or ``"sign"`` (-sign μ)."""
    _check(honest, b)
    mu, sigma = _mean_std(honest)
    if direction == "std":
        p = -sigma
    elif direction == "unit":
        p = -mu / mu.norm().clamp(min=1e-300)
    elif direction == "sign":
        p = -torch.sign(mu)
    else:
        raise ValueError(f"min_max: direction must be 'std', 'unit' or 'sign', got {direction!r}")
    h = honest.to(torch.float64)
    bound = float(torch.cdist(h, h).max())
    mu64, p64 = mu.to(torch.float64), p.to(torch.float64)

    def ok(g: float) -> bool:
        return float(torch.linalg.vector_norm(h - (mu64 + g * p64), dim=1).max()) <= bound

    g, step, best = float(gamma), float(gamma), 0.0  # as in the authors' code: moves of gamma/2, gamma/4, ...
    for _ in range(200):  # bounded bisection
        if abs(best - g) <= tol:
            break
        if ok(g):
            best = g
            g += step / 2
        else:
            g -= step / 2
        step /= 2
    return (mu64 + best * p64).to(honest.dtype).expand(b, -1).clone()


def centered_clip_adaptive(honest: torch.Tensor, b: int, *, tau: float | None = None,
                           center: torch.Tensor | None = None, margin: float = 0.99,
                           generator: torch.Generator | None = None) -> torch.Tensor:
    """All attackers at distance ``margin * tau`` (just inside the clipping radius) from the centre, in one
    common direction (against the honest mean): the worst case for CenteredClip. ``center`` (None: the
    honest mean); ``tau`` (None: the median distance of the honest updates to their coordinate median,
    what CenteredClip's adaptive default would pick)."""
    _check(honest, b)
    mu = honest.mean(dim=0)
    center = mu if center is None else torch.as_tensor(center, dtype=honest.dtype)
    if tau is None:
        tau = float(torch.linalg.vector_norm(honest - honest.median(dim=0).values, dim=1).median())
    u = -mu / mu.norm().clamp(min=1e-30)
    return (center + margin * tau * u).expand(b, -1).clone()


def part_ranges(d: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous near-equal ranges of ``range(d)`` (the butterfly's parts without load balancing)."""
    if parts < 1 or d < 0:
        raise ValueError(f"part_ranges: need parts >= 1 and d >= 0, got parts={parts}, d={d}")
    bounds = [d * k // parts for k in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def collude_on_part(honest: torch.Tensor, b: int, *, part: tuple[int, int] = (0, 0), inner: str = "sign_flip",
                    generator: torch.Generator | None = None, **params: Any) -> torch.Tensor:
    """Colluders targeting one part owner: inside ``part = (start, end)`` (the columns one peer reduces
    in the butterfly, see :func:`part_ranges`) all attackers send the attack named ``inner`` (of
    :data:`ATTACKS`, with ``params``) computed on that slice; elsewhere they send their own honest updates, so every
    other owner sees nothing wrong."""
    _check(honest, b)
    lo, hi = part
    if not 0 <= lo <= hi <= honest.shape[1]:
        raise ValueError(f"collude_on_part: part must satisfy 0 <= start <= end <= {honest.shape[1]}, got {part}")
    if inner == "collude_on_part":
        raise ValueError("collude_on_part: the inner attack cannot be collude_on_part")
    out = _own(honest, b).clone()
    if hi > lo:
        out[:, lo:hi] = get(inner, **params)(honest[:, lo:hi].contiguous(), b, generator=generator)
    return out


def flip_labels(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Label flipping (BTARD): ``y -> C - 1 - y``. Train the attacker on these labels."""
    labels = torch.as_tensor(labels)
    if labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"flip_labels: labels must be integers, got {labels.dtype}")
    if num_classes < 1 or (labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes)):
        raise ValueError(f"flip_labels: labels must lie in [0, {num_classes})")
    return num_classes - 1 - labels


class DelayedUpdates:
    """Source of stale updates: ``push(update)`` stores a copy and returns the update from ``delay``
    pushes ago (the oldest stored one until ``delay`` updates were pushed). BTARD: delay 1000."""

    def __init__(self, delay: int = 1000):
        if isinstance(delay, bool) or not isinstance(delay, int) or delay < 0:
            raise ValueError(f"delay must be an integer >= 0, got {delay!r}")
        self.delay = delay
        self._buffer: collections.deque[torch.Tensor] = collections.deque(maxlen=delay + 1)

    def push(self, update: torch.Tensor) -> torch.Tensor:
        self._buffer.append(update.detach().clone())
        return self._buffer[0].clone()

    def __len__(self) -> int:
        return len(self._buffer)


ATTACKS: dict[str, Attack] = {
    "sign_flip": sign_flip,
    "scaling": scaling,
    "large_constant": large_constant,
    "random_direction": random_direction,
    "gaussian": gaussian,
    "uniform": uniform,
    "zero": zero,
    "drop": drop,
    "nan": nan,
    "inf": inf,
    "alie": alie,
    "ipm": ipm,
    "ipm_large": functools.update_wrapper(functools.partial(ipm, eps=100.0), ipm),
    "stale": stale,
    "mimic": mimic,
    "min_max": min_max,
    "centered_clip_adaptive": centered_clip_adaptive,
    "collude_on_part": collude_on_part,
}


def names() -> list[str]:
    return list(ATTACKS)


def get(name: str, **params: Any) -> Attack:
    """The attack called ``name`` with ``params`` bound."""
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; known: {', '.join(ATTACKS)}")
    f = ATTACKS[name]
    signature = inspect.signature(f)
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())
    unknown = set(params) - (set(signature.parameters) - {"honest", "b"})
    if unknown and not accepts_any:
        raise ValueError(f"{name}: unknown parameters {sorted(unknown)}")
    return functools.update_wrapper(functools.partial(f, **params), f) if params else f


def make_inputs(honest: torch.Tensor, b: int, attack: str | Attack, generator: torch.Generator | None = None,
                **params: Any) -> torch.Tensor:
    """``[honest; attack(honest, b)]``, shape ``[m + b, d]``: what an aggregator sees."""
    if isinstance(attack, str):
        f = get(attack, **params)
    else:
        f = functools.partial(attack, **params) if params else attack
    malicious = f(honest, b, generator=generator)
    if malicious.shape != (b, honest.shape[1]):
        raise ValueError(f"attack returned shape {tuple(malicious.shape)}, expected {(b, honest.shape[1])}")
    return torch.cat([honest, malicious.to(honest.dtype)])
