"""The open-loop schedule of a stress run: when each operation is intended, and which it is.

The offered rate follows a linear ramp from 0 to ``rate`` over ``ramp`` seconds, then stays flat
until ``duration``. Op ``i`` (from 0) is intended at the time the cumulative offered count
``N(t) = integral of the rate`` reaches ``i``: without a ramp that is ``i / rate`` (op 0 at t=0),
with a ramp ``sqrt(2 * i * ramp / rate)`` while ramping. The run offers every op intended before
``duration``. Process ``p`` of ``P`` takes the ops with ``i % P == p``.

Which operation op ``i`` is comes from the mix (weights per operation) and one seeded random
stream over all ops in order, so op ``i`` is the same whatever the number of processes (each
process draws the whole stream and keeps its own share: one ``random()`` per op, cheap).

Pure functions of the plan; nothing here sleeps or reads a clock.
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Iterator, Mapping
from itertools import accumulate
from typing import Final

OPS: Final = ("wrap", "unwrap", "rewrap")
DEFAULT_MIX: Final[Mapping[str, int]] = {"wrap": 60, "unwrap": 30, "rewrap": 10}


class ScheduleError(ValueError):
    """A plan the generator cannot run (a rate, duration, ramp or mix out of range); one line."""

    exit_code = 2


def check_mix(mix: Mapping[str, int]) -> dict[str, int]:
    """The mix as a plain dict of known operations with non-negative integer weights, at least
    one positive; else `ScheduleError`."""
    out: dict[str, int] = {}
    for name, weight in mix.items():
        if name not in OPS:
            raise ScheduleError(f"unknown operation {name!r} in the mix (known: {', '.join(OPS)})")
        if isinstance(weight, bool) or not isinstance(weight, int) or weight < 0:
            raise ScheduleError(f"the mix weight of {name} must be a whole number >= 0, not {weight!r}")
        out[name] = weight
    if sum(out.values()) <= 0:
        raise ScheduleError("the mix gives no operation a positive weight")
    return out


def _positive(name: str, value: float) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ScheduleError(f"{name} must be a positive number, not {value!r}")
    return float(value)


class Schedule:
    """The rate function, the intended time of each op and the op choice of one plan."""

    def __init__(
        self,
        rate: float,
        duration: float,
        *,
        ramp: float = 0.0,
        mix: Mapping[str, int] = DEFAULT_MIX,
        seed: int = 0,
    ) -> None:
        self.rate = _positive("the rate", rate)
        self.duration = _positive("the duration", duration)
        if isinstance(ramp, bool) or not isinstance(ramp, int | float) or not math.isfinite(ramp) or ramp < 0:
            raise ScheduleError(f"the ramp must be a number of seconds >= 0, not {ramp!r}")
        self.ramp = float(ramp)
        self.mix = check_mix(mix)
        self.seed = seed
        self._names = [name for name, weight in self.mix.items() if weight > 0]
        self._cumulative = list(accumulate(self.mix[name] for name in self._names))
        self._ramp_ops = self.rate * self.ramp / 2.0  # N(ramp)
        self.total = self._count()
        """How many ops the run offers (every op intended before ``duration``)."""

    def rate_at(self, t: float) -> float:
        """The offered rate (ops/s) at time ``t`` (s since t0)."""
        if t < 0 or t >= self.duration:
            return 0.0
        if self.ramp > 0 and t < self.ramp:
            return self.rate * t / self.ramp
        return self.rate

    def cumulative(self, t: float) -> float:
        """``N(t)``: ops intended in ``[0, t)`` as a real number (op ``i`` at ``N = i``)."""
        t = min(max(t, 0.0), self.duration)
        if self.ramp > 0 and t <= self.ramp:
            return self.rate * t * t / (2.0 * self.ramp)
        return self._ramp_ops + self.rate * (t - self.ramp)

    def intended(self, i: int) -> float:
        """When op ``i`` is intended (s since t0); may be past ``duration`` (then not offered)."""
        if self.ramp > 0 and i <= self._ramp_ops:
            return math.sqrt(2.0 * i * self.ramp / self.rate)
        return self.ramp + (i - self._ramp_ops) / self.rate

    def _count(self) -> int:
        n = max(0, math.ceil(self.cumulative(self.duration)) - 1)
        while n > 0 and self.intended(n - 1) >= self.duration:  # floating point at the edge
            n -= 1
        while self.intended(n) < self.duration:
            n += 1
        return n

    def offered_per_second(self) -> list[int]:
        """Ops intended in each second ``[t, t+1)`` of the run (what seconds.jsonl's ``offered``
        must show)."""
        seconds = math.ceil(self.duration)
        counts = [0] * seconds
        for i in range(self.total):
            counts[min(int(self.intended(i)), seconds - 1)] += 1
        return counts

    def op_of(self, u: float) -> str:
        """The operation a uniform draw ``u`` in [0, 1) picks from the mix."""
        index = bisect.bisect_right(self._cumulative, u * self._cumulative[-1])
        return self._names[min(index, len(self._names) - 1)]

    def ops(self, process: int = 0, processes: int = 1) -> Iterator[tuple[int, float, str]]:
        """``(i, intended, op)`` of every op process ``process`` of ``processes`` offers, in order."""
        if not 0 <= process < processes:
            raise ScheduleError(f"process {process} is not one of {processes}")
        rng = random.Random(self.seed)  # the op mix, not a secret  # nosec B311
        draw = rng.random
        for i in range(self.total):
            u = draw()
            if i % processes == process:
                yield i, self.intended(i), self.op_of(u)
