"""`workflows.migration_jitter.start_delays`: per-host delays of a jittered wave start."""

from __future__ import annotations

import random

from workflows.migration_jitter import start_delays


def test_start_delays_are_a_function_of_the_seed_and_within_the_bound() -> None:
    hosts = [f"host-{i:03d}" for i in range(200)]
    first = start_delays(hosts, 2.0, random.Random(7))
    assert first == start_delays(list(reversed(hosts)), 2.0, random.Random(7))  # drawn in host order
    assert first != start_delays(hosts, 2.0, random.Random(8))
    assert all(0 < d <= 2.0 and round(d, 3) == d for d in first.values())
    assert len(first) >= 190  # a 0 ms draw is left out, rarely
    assert len(set(first.values())) > 100  # spread over the bound, not one value
    assert start_delays(hosts, 0, random.Random(7)) == {}
    assert all(d <= 0.0015 for d in start_delays(hosts, 0.0015, random.Random(1)).values())
