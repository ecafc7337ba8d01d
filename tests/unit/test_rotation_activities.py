"""The rotation activities' error mapping, without a server: what can never succeed fails the
activity for good (non-retryable); what may succeed later is left to Temporal's retries."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.rotation import RotationActivities
from activities.types import (
    MUTATION_HEARTBEAT_S,
    MUTATION_TIMEOUT_S,
    ROTATED_ELSEWHERE,
    VERSIONS_IN_USE,
    AuditInput,
    KeyRefInput,
    RetireInput,
    RotateToInput,
)
from kms_adapters.contract import KeyInfo, KeyVersionInfo
from kms_adapters.errors import AnswerLost
from kms_adapters.governor import PROGRESS_STEP
from sealing.keywrap import WrappedKey
from sealing.store import StoreUnavailable


def activities_with(sink: Any) -> RotationActivities:
    def no_adapter(_key_ref: str) -> Any:
        raise AssertionError("the audit activity needs no KMS")

    return RotationActivities(no_adapter, None, sink)  # type: ignore[arg-type]


@pytest.mark.parametrize("refusal", [ValueError("actor contains control characters"), TypeError("a float")])
def test_a_record_the_audit_log_refuses_fails_for_good(refusal: Exception) -> None:
    # Retried, it would fail on every attempt and hold the rotation at its first audit step.
    def refusing(*_record: object) -> None:
        raise refusal

    with pytest.raises(ApplicationError) as failed:
        activities_with(refusing).audit(AuditInput("rotation.started", "vault:k", {}, "ci\nbot"))
    assert failed.value.non_retryable
    assert failed.value.type == type(refusal).__name__ and failed.value.message == str(refusal)


def test_an_unavailable_audit_database_is_retried() -> None:
    def unavailable(*_record: object) -> None:
        raise StoreUnavailable("database sqlite:///x unavailable (append of audit event x): locked")

    with pytest.raises(StoreUnavailable):  # not an ApplicationError: Temporal retries it
        activities_with(unavailable).audit(AuditInput("rotation.started", "vault:k", {}))


# ------------------------------------------------------------------ KMS mutations (a fake KMS)


class FakeKms:
    """One key: versions 1..N with states, the primary the last. ``lose`` makes the next calls of
    a mutation raise ``AnswerLost``, after applying it (``applied=True``) or not."""

    key_ref = "vault:k"

    def __init__(self, versions: int = 1) -> None:
        self.states: dict[int, str] = {v: "enabled" for v in range(1, versions + 1)}
        self.calls: list[str] = []
        self.lost: dict[str, list[bool]] = {}

    def lose(self, op: str, *applied: bool) -> None:
        self.lost[op] = list(applied)

    def _mutate(self, op: str, change: Callable[[], None]) -> KeyInfo:
        self.calls.append(op)
        faults = self.lost.get(op)
        if faults:
            if faults.pop(0):
                change()
            raise AnswerLost(f"{op}: no answer, may have been applied")
        change()
        return self.describe()

    def describe(self) -> KeyInfo:
        top = max(self.states)
        return KeyInfo(
            self.key_ref,
            "aes256-gcm96",
            "native",
            tuple(KeyVersionInfo(v, s, v == top) for v, s in sorted(self.states.items())),  # type: ignore[arg-type]
        )

    def rotate(self) -> KeyInfo:
        return self._mutate("rotate", lambda: self.states.__setitem__(max(self.states) + 1, "enabled"))

    def disable_version(self, version: int) -> KeyInfo:
        return self._mutate("disable", lambda: self.states.__setitem__(version, "disabled"))

    def enable_version(self, version: int) -> KeyInfo:
        return self._mutate("enable", lambda: self.states.__setitem__(version, "enabled"))

    def destroy_below(self, version: int) -> KeyInfo:
        def change() -> None:
            for v in self.states:
                if v < version:
                    self.states[v] = "destroyed"

        return self._mutate("destroy", change)

    def wrap(self, dek: bytes) -> WrappedKey:
        return WrappedKey(b"fake:" + dek, max(self.states))

    def unwrap(self, wrapped: bytes) -> bytes:
        return wrapped.removeprefix(b"fake:")


class FakeStore:
    def __init__(self, counts: dict[int, int]) -> None:
        self.counts = counts

    def count_by_key_version(self, key_ref: str) -> dict[int, int]:
        return dict(self.counts)


def run_activity(
    kms: FakeKms, fn: str, request: Any, store: Any = None, details: Any = None
) -> tuple[Any, list[Any]]:
    env = ActivityEnvironment()
    if details is not None:
        env.info = dataclasses.replace(env.info, heartbeat_details=[details])
    beats: list[Any] = []
    env.on_heartbeat = lambda *d: beats.append(d)
    activities = RotationActivities(lambda _ref: kms, store, lambda *_: None)  # type: ignore[arg-type]
    return env.run(getattr(activities, fn), request), beats


def test_rotate_from_the_expected_primary_rotates_once_and_returns_the_actual_primary() -> None:
    kms = FakeKms(versions=1)
    state, beats = run_activity(kms, "rotate_key", RotateToInput("vault:k", 2, expected_primary=1))
    assert (state.primary_version, state.enabled_versions, kms.calls) == (2, [1, 2], ["rotate"])
    assert beats


def test_rotate_already_done_by_an_earlier_attempt_does_not_rotate_again() -> None:
    kms = FakeKms(versions=2)
    state, _ = run_activity(kms, "rotate_key", RotateToInput("vault:k", 2, expected_primary=1))
    assert state.primary_version == 2 and kms.calls == []


@pytest.mark.parametrize("versions", [3, 4])
def test_rotate_refuses_a_primary_that_is_neither_expected_nor_target(versions: int) -> None:
    kms = FakeKms(versions=versions)
    with pytest.raises(ApplicationError) as refused:
        run_activity(kms, "rotate_key", RotateToInput("vault:k", 2, expected_primary=1))
    assert refused.value.non_retryable and refused.value.type == ROTATED_ELSEWHERE
    assert "another rotation ran at the KMS meanwhile" in refused.value.message
    assert kms.calls == [] and max(kms.states) == versions


def test_rotate_with_a_lost_answer_that_applied_reads_the_key_and_does_not_rotate_again() -> None:
    kms = FakeKms(versions=1)
    kms.lose("rotate", True)
    state, _ = run_activity(kms, "rotate_key", RotateToInput("vault:k", 2, expected_primary=1))
    assert state.primary_version == 2 and kms.calls == ["rotate"] and max(kms.states) == 2


def test_rotate_with_a_lost_answer_that_did_not_apply_rotates_once_more() -> None:
    kms = FakeKms(versions=1)
    kms.lose("rotate", False)
    state, _ = run_activity(kms, "rotate_key", RotateToInput("vault:k", 2, expected_primary=1))
    assert state.primary_version == 2 and kms.calls == ["rotate", "rotate"] and max(kms.states) == 2


def test_rotate_with_two_lost_answers_fails_the_attempt_retryably() -> None:
    kms = FakeKms(versions=1)
    kms.lose("rotate", False, False)
    with pytest.raises(ApplicationError) as lost:
        run_activity(kms, "rotate_key", RotateToInput("vault:k", 2, expected_primary=1))
    assert not lost.value.non_retryable and lost.value.type == "AnswerLost"
    assert kms.calls == ["rotate", "rotate"]


def test_rotate_without_expected_primary_keeps_the_old_rule() -> None:
    kms = FakeKms(versions=1)
    state, _ = run_activity(kms, "rotate_key", RotateToInput("vault:k", 2))
    assert state.primary_version == 2 and kms.calls == ["rotate"]
    with pytest.raises(ApplicationError) as refused:  # primary 2 already beyond a target of 1
        run_activity(kms, "rotate_key", RotateToInput("vault:k", 1))
    assert refused.value.non_retryable and kms.calls == ["rotate"]


@pytest.mark.parametrize("action", ["disable", "destroy"])
def test_census_refuses_while_blobs_remain_below_and_changes_nothing(action: str) -> None:
    kms = FakeKms(versions=3)
    store = FakeStore({1: 2, 2: 5, 3: 100})
    with pytest.raises(ApplicationError) as refused:
        run_activity(kms, "retire_versions", RetireInput("vault:k", 3, action, census=True), store)
    assert refused.value.type == VERSIONS_IN_USE and refused.value.non_retryable
    assert list(refused.value.details) == [7]
    assert kms.calls == [] and set(kms.states.values()) == {"enabled"}


@pytest.mark.parametrize(("action", "state"), [("disable", "disabled"), ("destroy", "destroyed")])
def test_census_with_nothing_below_retires(action: str, state: str) -> None:
    kms = FakeKms(versions=3)
    retired, _ = run_activity(
        kms, "retire_versions", RetireInput("vault:k", 3, action, census=True), FakeStore({3: 9})
    )
    assert retired == [1, 2] and kms.states == {1: state, 2: state, 3: "enabled"}


def test_retire_skips_what_an_earlier_attempt_did_and_reports_it() -> None:
    kms = FakeKms(versions=3)
    kms.states[1] = "disabled"  # the earlier attempt got this far
    retired, beats = run_activity(
        kms, "retire_versions", RetireInput("vault:k", 3, "disable"), details={"done": [1]}
    )
    assert retired == [1, 2] and kms.calls == ["disable"]
    assert beats[-1] == ({"done": [1, 2]},)


def test_retire_with_a_lost_answer_reads_the_key_before_sending_again() -> None:
    kms = FakeKms(versions=3)
    kms.lose("disable", True, False)  # v1 applied (answer lost); v2 did not apply
    retired, _ = run_activity(kms, "retire_versions", RetireInput("vault:k", 3, "disable"))
    assert retired == [1, 2] and kms.calls == ["disable", "disable", "disable"]
    assert kms.states == {1: "disabled", 2: "disabled", 3: "enabled"}


def test_enable_enables_the_versions_asked_for() -> None:
    kms = FakeKms(versions=3)
    kms.states.update({1: "disabled", 2: "disabled"})
    enabled, _ = run_activity(kms, "retire_versions", RetireInput("vault:k", 3, "enable", versions=[2, 3]))
    assert enabled == [2] and kms.states == {1: "disabled", 2: "enabled", 3: "enabled"}
    again, _ = run_activity(kms, "retire_versions", RetireInput("vault:k", 3, "enable", versions=[2]))
    assert again == [] and kms.calls == ["enable"]


def test_an_unknown_retire_action_fails_for_good() -> None:
    with pytest.raises(ApplicationError) as refused:
        run_activity(FakeKms(2), "retire_versions", RetireInput("vault:k", 2, "shred"))
    assert refused.value.non_retryable


def test_the_mutation_heartbeat_timeout_exceeds_the_longest_gap_between_heartbeats() -> None:
    # Heartbeats come before every governor attempt and every PROGRESS_STEP of waiting, so the
    # longest gap is one attempt: the SDK's connect + read timeout as the adapters set them.
    longest_attempt = max(30 + 30, 5 + 30, 10 + 30)  # hvac (rekey.backends), boto3, azure-core
    assert max(longest_attempt, PROGRESS_STEP) < MUTATION_HEARTBEAT_S
    assert MUTATION_TIMEOUT_S > MUTATION_HEARTBEAT_S


@pytest.mark.parametrize("fn", ["describe_key", "rotate_key"])
def test_a_key_ref_the_worker_does_not_know_fails_for_good_in_every_activity(fn: str) -> None:
    from kms_adapters.keyref import InvalidKeyRef, KeyRef

    def refusing(key_ref: str) -> Any:
        KeyRef.parse(key_ref)
        raise AssertionError("unreachable: the ref is unsafe")

    activities = RotationActivities(refusing, None, lambda *_: None)  # type: ignore[arg-type]
    request: Any = (
        KeyRefInput("vault:x/../../keys/orders/rotate")
        if fn == "describe_key"
        else RotateToInput("vault:x/../../keys/orders/rotate", 2, expected_primary=1)
    )
    with pytest.raises(ApplicationError) as refused:
        ActivityEnvironment().run(getattr(activities, fn), request)
    assert refused.value.non_retryable and refused.value.type == InvalidKeyRef.__name__
