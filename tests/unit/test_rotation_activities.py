"""The rotation activities' error mapping, without a server: what can never succeed fails the
activity for good (non-retryable); what may succeed later is left to Temporal's retries."""

from __future__ import annotations

from typing import Any

import pytest
from temporalio.exceptions import ApplicationError

from activities.rotation import RotationActivities
from activities.types import AuditInput
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
