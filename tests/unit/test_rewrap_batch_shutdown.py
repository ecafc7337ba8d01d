"""``rewrap_batch`` on a worker that shuts down (no server: temporalio's ActivityEnvironment):
the attempt stops at a chunk boundary, heartbeats the last finished chunk and fails retryably;
the retry, given that heartbeat, re-wraps exactly the rest. The real SDK and server (heartbeat
throttling, a SIGTERMed ``rekey worker``) are in tests/fault/test_worker_sigterm.py."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

import sealing.rotation
from activities.rotation import WORKER_SHUTDOWN, RotationActivities
from activities.types import RewrapBatchInput
from kms_adapters.governor import Governor
from sealing.store import SealedStateStore
from tests.unit.test_rewrap_range import BLOBS, FakeKms, setup  # noqa: F401  (setup: the fixture)

CHUNK = 5


@pytest.fixture
def governed(
    setup: tuple[SealedStateStore, FakeKms, dict[str, bytes]],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[SealedStateStore, FakeKms]:
    store, kms, _plain = setup
    kms.governor = Governor("fake")  # type: ignore[attr-defined]
    # Small chunks, so that the fixture's 50 blobs make ten of them.
    monkeypatch.setitem(sealing.rotation.rewrap_range.__kwdefaults__, "chunk", CHUNK)
    return store, kms


def _activities(store: SealedStateStore, kms: FakeKms) -> RotationActivities:
    return RotationActivities(lambda _ref: kms, store, lambda *_a: None)  # type: ignore[arg-type,return-value]


@pytest.mark.parametrize("beats_before_stop", [1, 2, 5])
def test_a_shutdown_mid_batch_loses_no_progress(
    governed: tuple[SealedStateStore, FakeKms], beats_before_stop: int
) -> None:
    store, kms = governed
    request = RewrapBatchInput(kms.key_ref, 2, None, None, 1000)
    beats: list[dict[str, Any]] = []
    first = ActivityEnvironment()

    def on_heartbeat(*details: Any) -> None:
        beats.append(details[0])
        if len(beats) == beats_before_stop:
            first.worker_shutdown()  # SIGTERM while this chunk is swapped

    first.on_heartbeat = on_heartbeat
    activities = _activities(store, kms)
    with pytest.raises(ApplicationError) as failed:
        first.run(activities.rewrap_batch, request)
    assert failed.value.type == WORKER_SHUTDOWN and not failed.value.non_retryable
    last = beats[-1]
    # Stop seen after `beats_before_stop` chunks; the two chunks then at the KMS are finished
    # and heartbeated; nothing after them was read.
    finished = CHUNK * (beats_before_stop + 2)
    assert last["rewrapped"] == finished and kms.batches == beats_before_stop + 2
    assert store.count_by_key_version(kms.key_ref) == {1: BLOBS - finished, 2: finished}

    retry = ActivityEnvironment()
    retry.info = dataclasses.replace(retry.info, heartbeat_details=[last], attempt=2)
    result = retry.run(activities.rewrap_batch, request)
    assert result.rewrapped == BLOBS and result.conflicts == 0 and result.failed == 0
    assert kms.batches == BLOBS // CHUNK  # each DEK re-wrapped once, over both attempts
    assert store.count_by_key_version(kms.key_ref) == {2: BLOBS}


def test_no_shutdown_no_stop(governed: tuple[SealedStateStore, FakeKms]) -> None:
    store, kms = governed
    result = ActivityEnvironment().run(
        _activities(store, kms).rewrap_batch, RewrapBatchInput(kms.key_ref, 2, None, None, 1000)
    )
    assert result.rewrapped == BLOBS and store.count_by_key_version(kms.key_ref) == {2: BLOBS}
