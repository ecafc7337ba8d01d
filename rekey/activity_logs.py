"""One log event per activity outcome and per phase change of a rotation or a migration.

A worker interceptor (:class:`ActivityLogInterceptor`) wraps every activity the worker runs:
when the activity returns or fails it logs, on logger ``rekey.activity``, the outcome
(``ok``, ``failed``, ``cancelled``) with the fields of ``temporalio.activity.info()``
(``workflow_id``, ``run_id``, ``activity``, ``attempt``), its ``step`` (the activity's name
without its ``migration_`` prefix: ``rewrap``, ``verify_sample``, ``handoff``, ``gate``...)
and the identifiers of its input:
``key_ref``, ``generation`` / ``from_generation`` / ``to_generation``, ``migration_id``,
``host_id``, agent ids, version numbers. The workflows record each phase change through their
``audit`` activity (events ``phase.changed`` and ``migration.phase``): that activity's success
is also logged as ``phase changed`` with ``phase`` (the new one: ``REWRAPPING``, ``DONE``...)
and ``previous_phase``. (An activity does not know its workflow's phase: the worker running it
may not be the one that ran the last phase change, so activity events carry their step, not a
phase that could be stale.)

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

from rekey.logs import event_context

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
CONTEXT: Final = (
    "workflow_id",
    "run_id",
    "activity",
    "key_ref",
    "from_generation",
    "to_generation",
    "host_id",
)
"""What every event logged while the activity runs carries (`rekey.logs.event_context`)."""
PHASE_EVENTS: Final = frozenset({"phase.changed", "migration.phase"})
MIGRATION_PREFIX: Final = "migration_"


def step_of(activity_type: str) -> str:
    """The step an activity is: ``rewrap_batch`` -> ``rewrap``, ``migration_handoff`` -> ``handoff``."""
    name = activity_type.removeprefix(MIGRATION_PREFIX)
    return {"rewrap_batch": "rewrap", "rotate_key": "rotate", "retire_versions": "retire"}.get(name, name)


def identifiers(args: Sequence[Any]) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for arg in args[:1]:
        for name in IDENTIFIERS:
            value = getattr(arg, name, None)
            if isinstance(value, str | int) and not isinstance(value, bool):
                fields[name] = value
    return fields


def counts(result: Any) -> dict[str, int]:
    if isinstance(result, int) and not isinstance(result, bool):
        return {"result": result}
    found = {}
    for name in COUNTS:
        value = getattr(result, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            found[name] = value
    return found


def subject_fields(subject: str) -> dict[str, Any]:
    """A migration id (``migrate:<from>:<to>``) names both generations; an audit event's other
    subjects are key refs."""
    parts = subject.split(":")
    if len(parts) == 3 and parts[0] == "migrate":
        return {"migration_id": subject, "from_generation": parts[1], "to_generation": parts[2]}
    return {"key_ref": subject}


def audit_fields(arg: Any) -> dict[str, Any]:
    """The ids of an audit activity's event; for a phase change also ``phase`` (the new one)
    and ``previous_phase``. The event's other details are not copied."""
    event = str(getattr(arg, "event", ""))
    fields: dict[str, Any] = {"audit_event": event, **subject_fields(str(getattr(arg, "subject", "")))}
    details = getattr(arg, "details", None)
    if event in PHASE_EVENTS and isinstance(details, dict):
        fields |= {"phase": str(details.get("to", "")), "previous_phase": str(details.get("from", ""))}
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
            "step": step_of(info.activity_type),
            **identifiers(input.args),
        }
        if info.workflow_id and info.workflow_id.startswith("migrate:"):
            # A migration's workflow id is its migration id: it names both generations.
            fields = {k: v for k, v in subject_fields(info.workflow_id).items() if k != "key_ref"} | fields
        if info.activity_type == "audit" and input.args:
            fields |= audit_fields(input.args[0])
        started = time.monotonic()
        try:
            with event_context(**{k: fields[k] for k in CONTEXT if k in fields}):
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
            **counts(result),
        }
        if "phase" in extra:
            log.info("phase changed to %s", extra["phase"], extra=extra)
        else:
            log.info("activity %s ok", info.activity_type, extra=extra)
        return result


class ActivityLogInterceptor(Interceptor):
    """Logs every activity's outcome (see the module docstring)."""

    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        return _Inbound(next)
