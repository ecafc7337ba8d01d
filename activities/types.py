"""Inputs and outputs of the rotation activities: plain dataclasses, shared with the workflow
(which may import this module and nothing else from ``activities``). Ids, cursors and counts
only: never key material."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

TASK_QUEUE = "rekey"


@dataclass
class KeyRefInput:
    key_ref: str


@dataclass
class KeyState:
    key_ref: str
    primary_version: int
    enabled_versions: list[int]


@dataclass
class RotateToInput:
    key_ref: str
    target_version: int  # idempotent: rotate only while the primary is below it


@dataclass
class CountInput:
    key_ref: str
    below_version: int


@dataclass
class PlanInput:
    key_ref: str
    below_version: int
    after: str | None
    size: int
    count: int


@dataclass
class RewrapBatchInput:
    key_ref: str
    below_version: int
    start: str | None
    end: str | None
    size: int


@dataclass
class RewrapBatchResult:
    rewrapped: int = 0
    conflicts: int = 0
    failed: int = 0
    failed_ids: list[str] = field(default_factory=list)
    throttled: int = 0  # throttled attempts the governor absorbed during the batch


@dataclass
class VerifyInput:
    key_ref: str
    version: int
    sample: int


@dataclass
class RetireInput:
    key_ref: str
    below_version: int
    action: str  # disable | destroy


@dataclass
class AuditInput:
    event: str
    subject: str
    details: dict[str, Any]
    actor: str = ""
