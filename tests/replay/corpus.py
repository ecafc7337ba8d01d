"""Reading the checked-in workflow histories (tests/replay/*.json, tests/replay/histories/*.json):
their files, the phases a history passes through, the kinds of events it holds, and the text
of every payload in it. Shared by the recorder (which checks what it wrote) and the replay test.

``histories/corpus.toml`` is written by the recorder beside the histories: for each file, the
workflow id, the phase the history stops in and the updates the workflow refused on the way.
Refused updates are never written to a history (Temporal drops the workflow task of an update
its validator rejects; EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_REJECTED "is never written to
history"), so the index is where the recorder states them, and only after it saw the refusal.
"""

from __future__ import annotations

import base64
import json
import re
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
HISTORIES = HERE / "histories"
INDEX = HISTORIES / "corpus.toml"
MIGRATION_HISTORIES = HISTORIES / "migration"
"""MigrateGenerationWorkflow's histories, with their own ``corpus.toml``
(``python -m tests.replay.record_migration_history``)."""
PRE_PATCH_ID = "rotate:vault:replay"
"""Workflow id of tests/replay/rotation_done.json (recorded before the index existed)."""

TIMER_STARTED = "EVENT_TYPE_TIMER_STARTED"
UPDATE_ACCEPTED = "EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED"
CONTINUED_AS_NEW = "EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW"
ACTIVITY_FAILED = "EVENT_TYPE_ACTIVITY_TASK_FAILED"

# What a checked-in history must never hold: Transit ciphertexts (wrapped DEKs) and tokens.
SECRET_PATTERNS = (
    re.compile(r"vault:v\d+:"),
    re.compile(r"\b(?:hvs|hvb|s|b)\.[A-Za-z0-9]{20,}"),
    re.compile(r"-----BEGIN"),
)


@dataclass
class Entry:
    """One history of the index."""

    file: str
    workflow_id: str
    stops_in: str
    refused: list[str] = field(default_factory=list)


def history_files() -> list[Path]:
    return sorted(HERE.glob("*.json")) + sorted(HISTORIES.glob("*.json"))


def load(path: Path) -> dict[str, Any]:
    doc = json.loads(path.read_text())
    assert isinstance(doc, dict)
    return doc


def index(path: Path = INDEX) -> dict[str, Entry]:
    if not path.exists():
        return {}
    raw = tomllib.loads(path.read_text())
    return {
        name: Entry(name, item["workflow_id"], item["stops_in"], list(item.get("refused", [])))
        for name, item in raw.get("histories", {}).items()
    }


def write_index(entries: list[Entry], path: Path = INDEX, recorder: str = "record_rotation_history") -> None:
    lines = [
        f"# Written by `python -m tests.replay.{recorder}`: one entry per history in",
        "# this directory. `refused`: updates the workflow's validators refused while it was",
        "# recorded (never part of a history), as seen by the recorder.",
        "",
    ]
    for entry in sorted(entries, key=lambda e: e.file):
        lines += [
            f"[histories.{json.dumps(entry.file)}]",
            f"workflow_id = {json.dumps(entry.workflow_id)}",
            f"stops_in = {json.dumps(entry.stops_in)}",
            f"refused = [{', '.join(json.dumps(r) for r in entry.refused)}]",
            "",
        ]
    path.write_text("\n".join(lines))


def workflow_id_of(path: Path) -> str:
    entry = index().get(path.name)
    return entry.workflow_id if entry else PRE_PATCH_ID


def events(doc: dict[str, Any]) -> list[dict[str, Any]]:
    found = doc.get("events", [])
    assert isinstance(found, list)
    return found


def event_types(doc: dict[str, Any]) -> set[str]:
    return {event["eventType"] for event in events(doc)}


def _decode(payload: dict[str, Any]) -> str:
    return base64.b64decode(payload.get("data", "")).decode("utf-8", errors="replace")


def _payloads(node: Any) -> Iterator[dict[str, Any]]:
    """Every payload anywhere below ``node`` (inputs, results, memo fields, search attributes,
    failure details)."""
    if isinstance(node, dict):
        if "data" in node and isinstance(node.get("metadata"), dict):
            yield node
        for value in node.values():
            yield from _payloads(value)
    elif isinstance(node, list):
        for value in node:
            yield from _payloads(value)


def payload_texts(doc: dict[str, Any]) -> list[str]:
    return [_decode(payload) for payload in _payloads(events(doc))]


def _json(payload: dict[str, Any]) -> Any:
    try:
        return json.loads(_decode(payload))
    except ValueError:
        return None


def phases(doc: dict[str, Any]) -> list[str]:
    """The phases the history enters, in order: the ``to`` (and ``from``) of every
    ``phase.changed`` audit it schedules and the phase of every memo it writes."""
    seen: list[str] = []

    def add(phase: Any) -> None:
        if isinstance(phase, str) and phase and (not seen or seen[-1] != phase):
            seen.append(phase)

    for event in events(doc):
        scheduled = event.get("activityTaskScheduledEventAttributes")
        if scheduled and scheduled["activityType"]["name"] == "audit":
            for payload in scheduled.get("input", {}).get("payloads", []):
                audit = _json(payload)
                if isinstance(audit, dict) and audit.get("event") == "phase.changed":
                    if not seen:  # a history from before the memo: its first phase
                        add(audit["details"].get("from"))
                    add(audit["details"].get("to"))
        for key in ("workflowExecutionStartedEventAttributes", "workflowPropertiesModifiedEventAttributes"):
            attributes = event.get(key) or {}
            memo = attributes.get("memo") or attributes.get("upsertedMemo") or {}
            progress = memo.get("fields", {}).get("progress")
            if progress:
                value = _json(progress)
                if isinstance(value, dict):
                    add(value.get("phase"))
    return seen


def accepted_updates(doc: dict[str, Any]) -> list[str]:
    names = []
    for event in events(doc):
        accepted = event.get("workflowExecutionUpdateAcceptedEventAttributes")
        if accepted:
            names.append(accepted["acceptedRequest"]["input"]["name"])
    return names


def secrets_in(doc: dict[str, Any], known: tuple[str, ...] = ()) -> list[str]:
    """What in the history looks like key material, a ciphertext or a token (or is one of
    ``known``): empty for a history fit to check in."""
    texts = [json.dumps(doc), *payload_texts(doc)]
    found = [p.pattern for p in SECRET_PATTERNS for text in texts if p.search(text)]
    found += [f"a known secret ({len(k)} chars)" for k in known if k and any(k in t for t in texts)]
    return sorted(set(found))
