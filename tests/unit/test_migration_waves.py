"""How a migration splits hosts into waves (workflows.migration_state.split_waves)."""

from __future__ import annotations

from workflows.migration_state import split_waves


def test_waves_split_hosts_cumulatively_at_least_one_host_each() -> None:
    hosts = [f"h{i}" for i in range(20)]
    assert split_waves(hosts, [1, 10, 50, 100]) == [hosts[:1], hosts[1:2], hosts[2:10], hosts[10:]]
    assert split_waves(hosts[:2], [1, 10, 50, 100]) == [["h0"], ["h1"]]
    assert split_waves(hosts[:3], [50, 100]) == [["h0", "h1"], ["h2"]]
    assert split_waves([], [1, 100]) == []
    assert split_waves(hosts[:4], [10, 20]) == [["h0"], ["h1"], ["h2", "h3"]]
