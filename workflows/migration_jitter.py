"""Jittered wave starts: when a wave begins, each host's first hand-off batch waits a random
delay up to a bound, so that hundreds of hosts do not make their agents attest at the same
moment. The delays come from the workflow's deterministic randomness (`workflow.random`, seeded
by Temporal), so a replay draws the same ones, and each is a durable timer."""

from __future__ import annotations

import math
import random
from collections.abc import Iterable

__all__ = ["start_delays"]


def start_delays(host_ids: Iterable[str], bound_seconds: float, rng: random.Random) -> dict[str, float]:
    """A delay in ``[0, bound_seconds]`` per host, drawn in host id order, in whole milliseconds
    (a timer's resolution). Hosts whose delay is 0 are left out: no timer for them. A bound of 0
    draws nothing."""
    if not bound_seconds > 0:
        return {}
    delays = {host: math.floor(rng.uniform(0, bound_seconds) * 1000) / 1000 for host in sorted(set(host_ids))}
    return {host: delay for host, delay in delays.items() if delay > 0}
