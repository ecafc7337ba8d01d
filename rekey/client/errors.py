"""Errors of `rekey.client`: each a `RekeyClientError` with a one-line message and its exit code."""

from __future__ import annotations

from typing import NoReturn

from temporalio.exceptions import (
    ActivityError,
    ChildWorkflowError,
    FailureError,
)
from temporalio.service import RPCError, RPCStatusCode

from workflows.rotation import (
    Progress,
)

# ----------------------------------------------------------------------------------- errors


class RekeyClientError(Exception):
    """Base of every error this module raises; ``exit_code`` is the command line's for it."""

    exit_code = 1


class TemporalUnreachable(RekeyClientError):
    """The Temporal frontend does not answer at the configured address."""


class ProgressUnreadable(RekeyClientError):
    """A rotation's progress (its memo) does not decode with this client's codec keys."""


class TemporalRequestFailed(RekeyClientError):
    """Temporal refused or could not answer a request (other than for a missing rotation or schedule)."""


class InvalidId(RekeyClientError):
    """Text given as a rotation id, schedule id or key ref is none of these."""

    exit_code = 2


class InvalidDuration(RekeyClientError):
    """A duration is not one rekey can use (malformed, negative, or zero where it must not be)."""

    exit_code = 2


class InvalidOption(RekeyClientError):
    """A rotation option is out of range (batch size, batches in flight, who started it)."""

    exit_code = 2


class KeyNotFound(RekeyClientError):
    """The key to rotate or schedule does not exist on its backend: nothing was started."""

    exit_code = 2


class KeyCheckFailed(RekeyClientError):
    """The key's backend could not say whether the key exists (unreachable, or the credentials
    may not describe it): nothing was started."""


class RotationRefused(RekeyClientError):
    """The rotation said no to a pause, resume, abort, approve, approve-destroy or cancel-destroy
    (its phase does not allow it), or it has ended; the message says why."""

    exit_code = 2


class MigrationOverlaps(RekeyClientError):
    """Another migration involving one of the generations has not ended (DONE or ROLLED_BACK):
    nothing was started. The message names it."""

    exit_code = 3


class NamespaceNotReady(RekeyClientError):
    """The Temporal namespace lacks the search attributes rotations keep their status in."""


class UpdateUnanswered(RekeyClientError):
    """An update reached Temporal but no answer came in time: it may still be applied when a
    worker takes it up (send it again with the same ``update_id`` to learn its outcome)."""


class NoWorker(RekeyClientError):
    """No rekey worker is polling the rotation's task queue, so nothing can answer a request."""


class RotationBlocked(RekeyClientError):
    """The rotation stopped in BLOCKED; ``reason`` is why. It waits for resume or abort."""

    def __init__(self, rotation_id: str, progress: Progress) -> None:
        super().__init__(
            f"rotation {rotation_id} is BLOCKED in {progress.blocked_in}: {progress.blocked_reason}"
            f" (fix the cause, then `rekey rotate resume {rotation_id}`, or abort it)"
        )
        self.rotation_id = rotation_id
        self.progress = progress


class RotationNotFound(RekeyClientError):
    """No rotation has this id (for a signal: none is running under it)."""

    exit_code = 2


class RotationFailed(RekeyClientError):
    """The rotation workflow failed; ``cause`` is what failed, as the workflow reported it."""

    def __init__(self, rotation_id: str, cause: str) -> None:
        super().__init__(f"rotation {rotation_id} failed: {cause}")
        self.rotation_id = rotation_id
        self.cause = cause


class MigrationFailed(RekeyClientError):
    """The migration workflow failed; ``cause`` is what failed, as the workflow reported it."""

    def __init__(self, migration_id: str, cause: str) -> None:
        super().__init__(f"migration {migration_id} failed: {cause}")
        self.migration_id = migration_id
        self.cause = cause


class ScheduleExists(RekeyClientError):
    """A rotation schedule for this key exists already."""

    exit_code = 2


class ScheduleNotFound(RekeyClientError):
    """No rotation schedule has this id."""

    exit_code = 2


def cause_message(error: BaseException | None) -> str:
    # An activity or child-workflow error only says "Activity task failed"; what happened is
    # the message of the innermost cause.
    while isinstance(error, ActivityError | ChildWorkflowError) and error.cause is not None:
        error = error.cause
    if isinstance(error, FailureError):
        return error.message
    return str(error)


def rpc_failure(error: RPCError, not_found: type[RekeyClientError], missing: str, doing: str) -> NoReturn:
    """Raise ``not_found`` ("``missing``: ...") for a NOT_FOUND answer, else
    `TemporalRequestFailed` ("``doing``: ...", e.g. a query no worker answered in time)."""
    if error.status == RPCStatusCode.NOT_FOUND:
        raise not_found(f"{missing}: {error.message}") from None
    raise TemporalRequestFailed(f"{doing}: {error.message}") from None
