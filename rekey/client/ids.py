"""Rotation and schedule ids, key refs and durations: built and parsed here only."""

from __future__ import annotations

import math
import re
from datetime import timedelta
from typing import Final

from attestation.errors import AttestationError
from attestation.policy import parse_duration as parse_policy_duration
from kms_adapters.keyref import InvalidKeyRef, KeyRef
from rekey.client.errors import InvalidDuration, InvalidId
from workflows.rotation import (
    MAX_WAIT_SECONDS,
)

ROTATION_PREFIX: Final = "rotate:"
SCHEDULE_PREFIX: Final = "schedule:rotate:"
LAUNCH_PREFIX: Final = "launch:"
"""A schedule's launcher runs as ``launch:<schedule id>-<time>``: each schedule its own id, so
two schedules firing in the same second never collide (the loser would leave no trace)."""

# Rotations started by schedules before the launcher had the scheduled time appended.
_SCHEDULED_SUFFIX: Final = re.compile(r"-[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z\Z")

Duration = float | int | timedelta | str
"""Seconds, a `timedelta`, or text like ``0``, ``30s``, ``15m``, ``24h``, ``7d``, ``1h30m``."""

# -------------------------------------------------------------------------- ids and durations


def checked_key_ref(text: str, context: str = "") -> KeyRef:
    try:
        return KeyRef.parse(text)
    except InvalidKeyRef as exc:
        raise InvalidId(f"{context}{exc}") from None


def rotation_id(key_ref: str) -> str:
    """``rotate:<backend>:<name>``, the workflow id of the rotation of ``key_ref``."""
    return f"{ROTATION_PREFIX}{checked_key_ref(key_ref)}"


def schedule_id(key_ref: str) -> str:
    """``schedule:rotate:<backend>:<name>``, the id of the rotation schedule of ``key_ref``."""
    return f"{SCHEDULE_PREFIX}{checked_key_ref(key_ref)}"


def parse_rotation_id(text: str) -> str:
    """The rotation id ``text`` names: a rotation id (one a schedule started included) or a key ref."""
    if not text.startswith(ROTATION_PREFIX):
        return rotation_id(text)
    rest = text[len(ROTATION_PREFIX) :]
    checked_key_ref(_SCHEDULED_SUFFIX.sub("", rest), f"rotation id {text!r}: ")
    return text


def parse_schedule_id(text: str) -> str:
    """The schedule id ``text`` names: a schedule id or the key ref of the schedule's key."""
    if not text.startswith(SCHEDULE_PREFIX):
        return schedule_id(text)
    checked_key_ref(text[len(SCHEDULE_PREFIX) :], f"schedule id {text!r}: ")
    return text


def key_ref_of(rotation_or_schedule_id: str) -> str:
    """The key ref a rotation id or schedule id (or a key ref) is about."""
    text = rotation_or_schedule_id
    if text.startswith(SCHEDULE_PREFIX):
        return str(checked_key_ref(parse_schedule_id(text)[len(SCHEDULE_PREFIX) :]))
    if text.startswith(ROTATION_PREFIX):
        return str(
            checked_key_ref(_SCHEDULED_SUFFIX.sub("", parse_rotation_id(text)[len(ROTATION_PREFIX) :]))
        )
    return str(checked_key_ref(text))


def parse_duration(text: str, name: str = "duration") -> float:
    """``0``, ``0s``, ``30s``, ``15m``, ``24h``, ``7d`` (or combinations like ``1h30m``) -> seconds.

    ``name`` starts the error message (the command line passes the option, ``--grace``)."""
    if text.strip() in ("0", "0s"):
        return 0.0
    try:
        value = parse_policy_duration(text).total_seconds()
    except OverflowError:
        value = math.inf  # refused below with the limit named
    except (AttestationError, ValueError):
        raise InvalidDuration(f"{name} {text!r} is not a duration like 30s, 15m, 24h or 7d") from None
    return _in_range(value, text, name)


def _in_range(value: float, given: object, name: str) -> float:
    if not value >= 0:  # NaN fails it too
        raise InvalidDuration(f"{name} must not be negative, got {given!r}")
    if value > MAX_WAIT_SECONDS:  # a timer the workflow could not set, or a typo
        raise InvalidDuration(f"{name} {given!r} is longer than {MAX_WAIT_SECONDS // 86400}d (ten years)")
    return value


def seconds(value: Duration, name: str = "duration") -> float:
    """A `Duration` in seconds; `InvalidDuration` if it is malformed, negative or longer than
    ten years (`MAX_WAIT_SECONDS`)."""
    if isinstance(value, str):
        return parse_duration(value, name)
    if isinstance(value, bool) or not isinstance(value, int | float | timedelta):
        raise InvalidDuration(f"{name} must be seconds, a timedelta or text like 24h, got {value!r}")
    return _in_range(value.total_seconds() if isinstance(value, timedelta) else float(value), value, name)
