"""One stress op and its recording, without processes: the outcome classes, the ring of recent
wraps, the null backend, each strategy's governor, and the recorder's seconds and chunks on a
clock the test drives."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from kms_adapters.accounting import accounting
from kms_adapters.errors import (
    AnswerLost,
    InvalidCiphertext,
    InvalidRequest,
    KmsError,
    NotFound,
    PermissionDenied,
    PolicyDenied,
    Throttled,
    Unavailable,
    VersionDisabled,
)
from kms_adapters.governor import CircuitOpen, Governor, PassThroughGovernor
from rekey.stress.recorder import Recorder, merge_partials
from rekey.stress.summary import OUTCOMES, decode_hdr, read_events
from rekey.stress.workload import (
    NullAdapter,
    Ring,
    Workload,
    WorkloadError,
    WorkloadSpec,
    build_adapter,
    classify,
)
from sealing.errors import InvalidWrappedKey


@pytest.mark.parametrize(
    ("exc", "outcome"),
    [
        (Throttled("429"), "throttled"),
        (Unavailable("down"), "unavailable"),
        (AnswerLost("reset"), "unavailable"),
        (CircuitOpen("open"), "unavailable"),
        (VersionDisabled("v1"), "version_disabled"),
        (NotFound("gone"), "not_found"),
        (PermissionDenied("no"), "denied"),
        (PolicyDenied(["measurement"]), "denied"),
        (InvalidCiphertext("junk"), "invalid"),
        (InvalidRequest("bad"), "invalid"),
        (InvalidWrappedKey("junk"), "invalid"),
        (KmsError("other"), "error"),
        (RuntimeError("bug"), "error"),
    ],
)
def test_every_error_maps_to_its_outcome_class(exc: BaseException, outcome: str) -> None:
    assert classify(exc) == outcome and outcome in OUTCOMES


def test_the_ring_keeps_the_newest_versions_recent_ciphertexts_only() -> None:
    ring = Ring(3, random.Random(1))
    assert ring.pick() is None and ring.version == 0
    for n in range(5):
        ring.add(b"v1-%d" % n, 1)
    assert len(ring) == 3
    assert {ring.pick() for _ in range(200)} == {(b"v1-2", 1), (b"v1-3", 1), (b"v1-4", 1)}
    ring.add(b"v2-0", 2)
    ring.add(b"v1-late", 1)  # an older version no longer joins
    assert len(ring) == 1 and ring.pick() == (b"v2-0", 2)


def test_the_null_backend_never_carries_the_dek_and_refuses_disabled_versions(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    adapter = NullAdapter("k", state_file=str(state), poll=0.0)
    dek = bytes(range(32))
    with accounting() as acc:
        wrapped = adapter.wrap(dek)
    assert acc.requests == 1
    assert dek not in wrapped.ciphertext and dek.hex().encode() not in wrapped.ciphertext
    assert wrapped.key_version == adapter.version_of(wrapped.ciphertext) == 1
    assert adapter.unwrap(wrapped.ciphertext) == bytes(32)
    state.write_text(json.dumps({"primary": 2, "disabled": [1]}))
    with pytest.raises(VersionDisabled):
        adapter.unwrap(wrapped.ciphertext)
    with pytest.raises(VersionDisabled):
        adapter.rewrap(wrapped.ciphertext)
    assert adapter.wrap(dek).key_version == 2
    with pytest.raises(InvalidCiphertext):
        adapter.unwrap(b"vault:v1:abc")
    with pytest.raises(InvalidCiphertext):
        adapter.unwrap(b"null:v9:abc")  # a version that never existed


def test_an_op_reports_its_outcome_version_and_attempts() -> None:
    adapter = NullAdapter("k")
    work = Workload(adapter, ring=8)
    first = work.execute("unwrap")  # an empty ring: done as a wrap
    assert (first.op, first.outcome, first.version, first.attempts) == ("wrap", "ok", 1, 1)
    assert work.execute("unwrap").op == "unwrap"
    adapter.rotate()
    rewrap = work.execute("rewrap")
    assert (rewrap.op, rewrap.outcome, rewrap.version) == ("rewrap", "ok", 2)
    adapter.disable_version(2)
    refused = work.execute("unwrap")
    assert (refused.outcome, refused.version) == ("version_disabled", 2)
    assert work.execute("wrap").outcome == "version_disabled"  # no usable primary


def _throttled() -> None:
    raise Throttled("429")


@pytest.mark.parametrize(
    ("backend", "strategy", "sends", "counted"),
    [
        ("aws", "naive", 10, 10),
        ("azure", "naive", 10, 10),
        ("vault", "naive", 10, 10),
        ("aws", "sdk-default", 1, 0),  # counted by the SDK's hooks, not the governor
        ("azure", "sdk-default", 1, 0),
        ("vault", "sdk-default", 1, 1),  # hvac has no retries: the governor counts
    ],
)
def test_each_strategy_builds_its_governor(
    tmp_path: Path, backend: str, strategy: str, sends: int, counted: int
) -> None:
    settings = {
        "home": str(tmp_path),
        "vault_addr": "http://127.0.0.1:9",
        "vault_token": "t",
        "aws_endpoint": "http://127.0.0.1:9",
        "azure_vault_url": "https://127.0.0.1:9",
    }
    adapter = build_adapter(WorkloadSpec(f"{backend}:k", strategy, settings=settings))
    governor = adapter.governor  # type: ignore[attr-defined]
    assert isinstance(governor, PassThroughGovernor)
    calls: list[int] = []

    def once() -> None:
        calls.append(1)
        _throttled()

    with accounting() as acc, pytest.raises(Throttled):
        governor.call(once)
    assert len(calls) == sends and acc.requests == counted


def test_the_governor_strategy_uses_the_endpoints_own_governor(tmp_path: Path) -> None:
    settings = {"home": str(tmp_path), "aws_endpoint": "http://127.0.0.1:9"}
    adapter = build_adapter(WorkloadSpec("aws:k", "governor", settings=settings))
    governor = adapter.governor  # type: ignore[attr-defined]
    assert isinstance(governor, Governor) and not isinstance(governor, PassThroughGovernor)


def test_bad_workloads_are_refused() -> None:
    for spec in (
        WorkloadSpec("null:k", "yolo"),
        WorkloadSpec("gcp:k", "naive"),
        WorkloadSpec("null", "naive"),
        WorkloadSpec("null:k", "naive", ring=0),
        WorkloadSpec("null:k", "naive", null_delay=-1),
    ):
        with pytest.raises(WorkloadError):
            spec.check()


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_seconds_close_in_order_and_chunks_are_written_as_they_close(tmp_path: Path) -> None:
    clock = Clock()
    recorder = Recorder(3, tmp_path, clock)
    rows = []
    for step in range(250):  # ops every 0.1 s for 25 s, each answering in 50 ms
        intended = step / 10
        recorder.horizon(intended)
        clock.t = intended
        rows += recorder.close_ready()
        recorder.offer(intended, dropped=False)
        clock.t = intended + 0.05
        recorder.complete(intended, intended + 0.001, "wrap", "ok", 1, 1, 0, 0.0)
        if step == 120:  # the first chunk is on disk once second 9 closed, before the run ends
            assert [p.name for p in tmp_path.glob("*.parquet")] == ["p03-000000.parquet"]
    recorder.horizon(float("inf"))
    clock.t = 25.5
    rows += recorder.close_ready()
    assert [row["t"] for row in rows] == list(range(25))
    assert sorted(p.name for p in tmp_path.glob("*.parquet")) == ["p03-000000.parquet", "p03-000001.parquet"]
    assert all(row["offered"] == row["done"] == 10 for row in rows)
    rows += recorder.close_ready(final=True)
    assert len(rows) == 25  # nothing left open
    names = sorted(p.name for p in tmp_path.glob("*.parquet"))
    assert names == ["p03-000000.parquet", "p03-000001.parquet", "p03-000002.parquet"]
    assert not list(tmp_path.glob("*.tmp"))
    table = pq.read_table(tmp_path / "p03-000001.parquet")
    assert table.num_rows == 100 and set(table.column("process").to_pylist()) == {3}
    latency = decode_hdr(rows[4]["hdr"])
    assert latency.get_total_count() == 10 and abs(latency.get_max_value() - 50_000) <= 50


def test_a_second_waits_for_the_scheduler_before_it_closes(tmp_path: Path) -> None:
    clock = Clock()
    recorder = Recorder(0, tmp_path, clock)
    recorder.horizon(0.5)
    clock.t = 3.0
    assert [row["t"] for row in recorder.close_ready()] == []  # an op intended at 0.5 may still come
    recorder.offer(0.5, dropped=True, op="unwrap")
    recorder.horizon(2.5)
    rows = recorder.close_ready()
    assert [(row["t"], row["offered"], row["done"]) for row in rows] == [(0, 1, 0), (1, 0, 0)]
    assert rows[0]["outcomes"] == {}
    # the dropped op is recorded when it was dropped (t=3), in second 3
    rows = recorder.close_ready(final=True)
    assert [(row["t"], row["outcomes"]) for row in rows] == [(2, {}), (3, {"dropped": 1})]


def test_late_rechunks_keep_the_readers_glob(tmp_path: Path) -> None:
    clock = Clock()
    for _ in range(2):  # the same process and chunk written twice: a second file, not a clobber
        recorder = Recorder(1, tmp_path, clock)
        recorder.offer(0.0, dropped=False)
        recorder.complete(0.0, 0.0, "wrap", "ok", 1, 1, 0, 0.0)
        recorder.close_ready(final=True)
    assert sorted(p.name for p in tmp_path.glob("*.parquet")) == [
        "p01-000000-1.parquet",
        "p01-000000.parquet",
    ]
    run = tmp_path.parent / "run"
    (run / "events").mkdir(parents=True)
    for path in tmp_path.glob("*.parquet"):
        path.rename(run / "events" / path.name)
    assert len(read_events(run)) == 2


def test_partials_merge_into_one_row() -> None:
    clock = Clock()
    parts = []
    for process, (outcome, version) in enumerate([("ok", 1), ("version_disabled", 2)]):
        recorder = Recorder(process, Path("/nonexistent"), clock)
        recorder.offer(0.1, dropped=False)
        clock.t = 0.3
        recorder.complete(0.1, 0.2, "rewrap", outcome, version, 2, 1, 0.05)
        recorder.horizon(float("inf"))
        clock.t = 1.0
        parts += recorder.close_ready()
    row = merge_partials(0, parts, processes_alive=2)
    assert (row["offered"], row["done"], row["ok"], row["attempts"], row["throttled_attempts"]) == (
        2,
        2,
        1,
        4,
        2,
    )
    assert row["outcomes"] == {"ok": 1, "version_disabled": 1} and row["versions"] == {"1": 1}
    assert row["refused"] == [[pytest.approx(0.3), "rewrap", 2, "version_disabled"]]
    assert (
        row["ops"]["rewrap"]["done"] == 2 and decode_hdr(row["ops"]["rewrap"]["hdr"]).get_total_count() == 2
    )
    assert row["throttle_wait"] == pytest.approx(0.1) and row["processes_alive"] == 2
    assert 199 <= row["p99_ms"] <= 201 and 99 <= row["lag_max_ms"] <= 101
