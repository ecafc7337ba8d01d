"""One log event per activity outcome and per phase change of a rotation or a migration.

A worker interceptor (:class:`ActivityLogInterceptor`) wraps every activity the worker runs:
when the activity returns or fails it logs, on logger ``rekey.activity``, the outcome
(``ok``, ``failed``, ``cancelled``) with the fields of ``temporalio.activity.info()``
(``workflow_id``, ``run_id``, ``activity``, ``attempt``) and the identifiers of its input:
``key_ref``, ``generation`` / ``from_generation`` / ``to_generation``, ``migration_id``,
``host_id``, agent ids, version numbers. The workflows record each phase change through their
``audit`` activity (events ``phase.changed`` and ``migration.phase``): that activity's success
is also logged as ``phase changed`` with ``phase`` (the new one) and ``previous_phase``.

Only those named identifiers and counts are copied; never an input or a result as a whole (no
nonce, token, sealed blob or key material can reach a log that way). A failure is logged as its
exception's type and one-line message."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any, Final

from temporalio import activity
from temporalio.exceptions import ApplicationError, CancelledError
from temporalio.worker import (
    ActivityInboundInterceptor,
    ExecuteActivityInput,
    Interceptor,
)

log = logging.getLogger("rekey.activity")

IDENTIFIERS: Final = (
    "key_ref",
    "generation",
    "from_generation",
    "to_generation",
    "migration_id",
    "host_id",
    "agent_id",
    "old_agent",
    "new_agent",
    "new_version",
    "old_primary",
    "version",
)
"""Input fields copied into the event: ids, names and versions only."""
COUNTS: Final = ("rewrapped", "conflicts", "failed", "moved", "remaining", "total", "retired")
"""Result fields (integers only) copied into the event."""
PHASE_EVENTS: Final = frozenset({"phase.changed", "migration.phase"})
MIGRATION_PREFIX: Final = "migration_"


def phase_of(activity_type: str) -> str:
    """The step an activity is: ``rewrap_batch`` -> ``rewrap``, ``migration_handoff`` -> ``handoff``."""
    name = activity_type.removeprefix(MIGRATION_PREFIX)
    return {"rewrap_batch": "rewrap", "rotate_key": "rotate", "retire_versions": "retire"}.get(name, name)


def _identifiers(args: Sequence[Any]) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for arg in args[:1]:
        for name in IDENTIFIERS:
            value = getattr(arg, name, None)
            if isinstance(value, str | int) and not isinstance(value, bool):
                fields[name] = value
    return fields


def _counts(result: Any) -> dict[str, int]:
    if isinstance(result, int) and not isinstance(result, bool):
        return {"result": result}
    found = {}
    for name in COUNTS:
        value = getattr(result, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            found[name] = value
    return found


def _phase_event(arg: Any) -> dict[str, Any] | None:
    """The fields of a phase-change audit event, or None for any other audit event."""
    event = getattr(arg, "event", None)
    if event not in PHASE_EVENTS:
        return None
    details = getattr(arg, "details", None) or {}
    subject = str(getattr(arg, "subject", ""))
    fields: dict[str, Any] = {
        "phase": str(details.get("to", "")),
        "previous_phase": str(details.get("from", "")),
    }
    parts = subject.split(":")
    if event == "migration.phase" and len(parts) == 3 and parts[0] == "migrate":
        fields |= {"migration_id": subject, "from_generation": parts[1], "to_generation": parts[2]}
        fields["generation"] = parts[2]
    else:
        fields["key_ref"] = subject
    if isinstance(details.get("rewrapped"), int):
        fields["rewrapped"] = details["rewrapped"]
    return fields


class _Inbound(ActivityInboundInterceptor):
    async def execute_activity(self, input: ExecuteActivityInput) -> Any:
        info = activity.info()
        fields: dict[str, Any] = {
            "workflow_id": info.workflow_id,
            "run_id": info.workflow_run_id,
            "activity": info.activity_type,
            "activity_id": info.activity_id,
            "attempt": info.attempt,
            "phase": phase_of(info.activity_type),
            **_identifiers(input.args),
        }
        started = time.monotonic()
        try:
            result = await self.next.execute_activity(input)
        except BaseException as exc:
            outcome = "cancelled" if isinstance(exc, CancelledError) else "failed"
            extra = fields | {"outcome": outcome, "duration_s": round(time.monotonic() - started, 3)}
            extra["error_type"] = (
                exc.type if isinstance(exc, ApplicationError) and exc.type else type(exc).__name__
            )
            message = str(exc).strip().splitlines()
            extra["error"] = message[0][:500] if message else ""
            log.warning("activity %s %s", info.activity_type, outcome, extra=extra)
            raise
        extra = fields | {
            "outcome": "ok",
            "duration_s": round(time.monotonic() - started, 3),
            **_counts(result),
        }
        phase = _phase_event(input.args[0]) if info.activity_type == "audit" and input.args else None
        if phase is not None:
            log.info("phase changed to %s", phase["phase"], extra=extra | phase)
        else:
            log.info("activity %s ok", info.activity_type, extra=extra)
        return result


class ActivityLogInterceptor(Interceptor):
    """Logs every activity's outcome (see the module docstring)."""

    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        return _Inbound(next)
