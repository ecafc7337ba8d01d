"""rekey.logs: the JSON formatter (one line per event, the extra fields, exceptions as one line),
the redaction of secret-named fields and of registered secrets (raw, hex, base64), the
``--log-format`` switch of the long-running commands; and rekey.activity_logs' field picking."""

from __future__ import annotations

import base64
import io
import json
import logging
import secrets
import sys
from dataclasses import dataclass
from typing import Any

import click
import pytest
from click.testing import CliRunner

from rekey.activity_logs import audit_fields, counts, identifiers, step_of
from rekey.cli import agent, codec, worker
from rekey.logs import (
    REDACTED,
    JsonFormatter,
    Redactor,
    configured,
    event_context,
    json_handler,
    register_secret,
)


def _emit(logger: logging.Logger, *args: Any, **kwargs: Any) -> list[dict[str, Any]]:
    stream = io.StringIO()
    handler = json_handler(stream)
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        logger.info(*args, **kwargs)
    finally:
        logger.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    return [json.loads(line) for line in lines]


def test_an_event_is_one_json_line_with_time_level_logger_message_and_its_fields() -> None:
    (event,) = _emit(
        logging.getLogger("rekey.test.fields"),
        "phase changed to %s\nsecond line",
        "DONE",
        extra={
            "workflow_id": "rotate:vault:k",
            "key_ref": "vault:k",
            "phase": "DONE",
            "outcome": "ok",
            "n": 3,
        },
    )
    assert event["message"] == "phase changed to DONE\nsecond line"
    assert event["level"] == "info" and event["logger"] == "rekey.test.fields"
    assert event["time"].endswith("+00:00") and "T" in event["time"]
    assert (event["workflow_id"], event["key_ref"], event["phase"], event["outcome"], event["n"]) == (
        "rotate:vault:k",
        "vault:k",
        "DONE",
        "ok",
        3,
    )


def test_an_exception_is_its_type_and_first_line_never_a_traceback() -> None:
    record = logging.LogRecord("rekey.x", logging.ERROR, __file__, 1, "failed", None, None)
    try:
        raise ValueError("first line\nsecond line")
    except ValueError:
        record.exc_info = sys.exc_info()
    line = JsonFormatter().format(record)
    assert "\n" not in line
    event = json.loads(line)
    assert (event["error_type"], event["error"]) == ("ValueError", "first line")
    assert "Traceback" not in line and "second line" not in line


def test_temporal_info_dicts_become_fields() -> None:
    (event,) = _emit(
        logging.getLogger("rekey.test.temporal"),
        "x",
        extra={"temporal_activity": {"workflow_id": "w", "workflow_run_id": "r", "activity_type": "a"}},
    )
    assert (event["workflow_id"], event["run_id"], event["activity"]) == ("w", "r", "a")


def test_secret_named_fields_and_bytes_are_redacted() -> None:
    (event,) = _emit(
        logging.getLogger("rekey.test.names"),
        "x",
        extra={
            "vault_token": "hvs.abc",
            "dek": "00ff",
            "plaintext": "p",
            "blob": b"\x00\x01",
            "key_ref": "vault:k",
        },
    )
    assert event["vault_token"] == event["dek"] == event["plaintext"] == event["blob"] == REDACTED
    assert event["key_ref"] == "vault:k"  # an id, not a secret


@pytest.mark.parametrize("form", ["raw", "hex", "b64", "b64url-unpadded"])
def test_a_registered_secret_is_redacted_in_messages_fields_and_errors(form: str) -> None:
    secret = secrets.token_bytes(24)
    register_secret(secret)
    raw = secrets.token_urlsafe(24)
    register_secret(raw)
    text = {
        "raw": raw,
        "hex": secret.hex(),
        "b64": base64.b64encode(secret).decode(),
        "b64url-unpadded": base64.urlsafe_b64encode(secret).decode().rstrip("="),
    }[form]
    (event,) = _emit(logging.getLogger("rekey.test.secret"), "got %s here", text, extra={"note": f"[{text}]"})
    assert event["message"] == f"got {REDACTED} here" and event["note"] == f"[{REDACTED}]"
    token = secrets.token_urlsafe(32)
    register_secret(token)
    record = logging.LogRecord("rekey.x", logging.ERROR, __file__, 1, "failed", None, None)
    try:
        raise RuntimeError(f"refused {token}")
    except RuntimeError:
        record.exc_info = sys.exc_info()
    Redactor().filter(record)
    assert token not in JsonFormatter().format(record)


def test_short_values_are_not_registered() -> None:
    register_secret("abc")
    (event,) = _emit(logging.getLogger("rekey.test.short"), "abc abc")
    assert event["message"] == "abc abc"


def test_configured_json_goes_to_the_root_and_is_undone(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    before = list(root.handlers), root.level
    with configured("json"):
        logging.getLogger("rekey.test.cfg").info("hello", extra={"agent_id": "a1"})
    assert (list(root.handlers), root.level) == before
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "hello" in line]
    assert json.loads(line)["agent_id"] == "a1"
    with pytest.raises(ValueError, match="log format"), configured("yaml"):
        pass


@pytest.mark.parametrize(
    "command", [worker.cli, agent.serve, codec.cli], ids=["worker", "agent-serve", "codec"]
)
def test_the_long_running_commands_take_log_format(command: click.Command) -> None:
    result = CliRunner().invoke(command, ["--help"])
    assert result.exit_code == 0 and "--log-format [text|json]" in result.output
    bad = CliRunner().invoke(command, ["--log-format", "yaml"])
    assert bad.exit_code == 2 and "yaml" in bad.output


@dataclass
class _Input:
    key_ref: str
    new_version: int
    wrapped_dek: bytes = b"secret"
    nonce: str = "n"


@dataclass
class _Audit:
    event: str
    subject: str
    details: dict[str, Any]


def test_activity_events_copy_ids_and_counts_only() -> None:
    assert identifiers([_Input("vault:k", 2)]) == {"key_ref": "vault:k", "new_version": 2}
    assert counts(7) == {"result": 7} and counts(True) == {}
    assert step_of("migration_handoff") == "handoff" and step_of("rewrap_batch") == "rewrap"


def test_phase_changes_and_migration_subjects() -> None:
    fields = audit_fields(
        _Audit("phase.changed", "vault:k", {"from": "PREPARING", "to": "REWRAPPING", "x": "s"})
    )
    assert fields == {
        "audit_event": "phase.changed",
        "key_ref": "vault:k",
        "phase": "REWRAPPING",
        "previous_phase": "PREPARING",
    }
    fields = audit_fields(
        _Audit("migration.phase", "migrate:g1:g2", {"from": "WIDENING", "to": "HANDING_OFF"})
    )
    assert (fields["from_generation"], fields["to_generation"], fields["phase"]) == (
        "g1",
        "g2",
        "HANDING_OFF",
    )
    assert "phase" not in audit_fields(_Audit("blob.moved", "vault:k", {"to": "x"}))


def test_events_inside_an_event_context_carry_its_fields() -> None:
    logger = logging.getLogger("rekey.test.context")
    with event_context(workflow_id="w1", key_ref="vault:k", token="t0ps3cret"):
        (inside,) = _emit(logger, "refused", extra={"key_ref": "own"})
    (outside,) = _emit(logger, "later")
    assert (inside["workflow_id"], inside["key_ref"], inside["token"]) == ("w1", "own", REDACTED)
    assert "workflow_id" not in outside
