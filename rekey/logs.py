"""Structured logs for the long-running commands (``rekey worker``, ``rekey agent serve``,
``rekey codec-server``): ``--log-format text`` (the default, as before) or ``json``.

JSON: one object per line, ``time`` (ISO 8601, UTC, milliseconds), ``level``, ``logger``,
``message``, then the fields the event carries, taken from ``extra=`` on the log call
(``workflow_id``, ``run_id``, ``key_ref``, ``phase``, ``outcome``, ``activity``,
``generation``, ``agent_id``, ...) and from the fields of the context the event is logged in
(:func:`event_context`: inside an activity :mod:`rekey.activity_logs` sets those of
``temporalio.activity.info()`` and of the activity's input, so that any event logged while it
runs, a refused attested TLS peer say, names its workflow and key). An exception is logged as
its type and the first line of its message (the project's exceptions are one line and
secret-free), never a traceback, so an event stays one line and carries no source or locals.

The stdlib ``logging`` with a small formatter: a JSON logging library (python-json-logger,
structlog) would bring a dependency for what is forty lines here.

Redaction (:class:`Redactor`, on every handler this module installs): a field whose name says it
is a secret (``token``, ``password``, ``secret``, ``dek``, ``plaintext``, ``authorization``,
...) is replaced with ``[redacted]``, and so is every occurrence of a value the process
registered with :func:`register_secret` (the agent's caller tokens, the codec server's token,
the Vault token), in the message and in every field, also in its hex and base64 forms."""

from __future__ import annotations

import base64
import binascii
import contextlib
import contextvars
import json
import logging
import re
import sys
import threading
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, Final, Literal, TextIO

LogFormat = Literal["text", "json"]
FORMATS: Final = ("text", "json")
REDACTED: Final = "[redacted]"
MIN_SECRET_LENGTH: Final = 8
"""Shorter registered values are ignored: replacing them everywhere would garble the logs."""

# Every attribute a LogRecord has of its own: anything else on a record came from ``extra=``.
_STANDARD: Final = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}
_SECRET_NAME: Final = re.compile(
    r"(token|passw|secret|credential|authorization|cookie|\bdek\b|_dek$|^dek|plaintext|private_key|key_material)",
    re.IGNORECASE,
)
_context: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar(
    "rekey_log_context", default=MappingProxyType({})
)
_secrets: set[str] = set()
_secrets_lock = threading.Lock()


@contextlib.contextmanager
def event_context(**fields: Any) -> Iterator[None]:
    """Every event logged inside (this task or thread, and the threads it starts with its
    context) also carries ``fields``, unless the event sets them itself."""
    token = _context.set({**_context.get(), **fields})
    try:
        yield
    finally:
        _context.reset(token)


def register_secret(value: str | bytes | None) -> None:
    """Never let ``value`` (or its hex / base64 forms) reach a log line of this process."""
    if not value:
        return
    raw = value.encode() if isinstance(value, str) else value
    forms = {
        raw.decode("utf-8", errors="ignore"),
        binascii.hexlify(raw).decode(),
        base64.b64encode(raw).decode(),
        base64.urlsafe_b64encode(raw).decode(),
        base64.b64encode(raw).decode().rstrip("="),
        base64.urlsafe_b64encode(raw).decode().rstrip("="),
    }
    with _secrets_lock:
        _secrets.update(form for form in forms if len(form) >= MIN_SECRET_LENGTH)


def _scrub(text: str) -> str:
    with _secrets_lock:
        known = sorted(_secrets, key=len, reverse=True)
    for secret in known:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


def _scrub_value(name: str, value: Any) -> Any:
    if _SECRET_NAME.search(name):
        return REDACTED
    if isinstance(value, str):
        return _scrub(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return REDACTED  # raw bytes in a log are never wanted: blob bytes, key material
    if isinstance(value, dict):
        return {str(k): _scrub_value(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub_value(name, v) for v in value]
    return value


class Redactor(logging.Filter):
    """Rewrites a record in place: secret-named fields and registered secret values become
    ``[redacted]``. It never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = _scrub(record.getMessage())
        record.msg, record.args = message, None
        for name in list(vars(record)):
            if name not in _STANDARD:
                setattr(record, name, _scrub_value(name, getattr(record, name)))
        return True


def _error_text(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:500] if lines else ""


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the record's extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        event: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name, value in vars(record).items():
            if name in _STANDARD or name.startswith("_"):
                continue
            if name in ("temporal_activity", "temporal_workflow") and isinstance(value, dict):
                # temporalio's own loggers put the activity's / workflow's info here
                for key, item in value.items():
                    event.setdefault(_TEMPORAL_KEYS.get(str(key), str(key)), item)
                continue
            event.setdefault(name, value)
        for name, value in _context.get().items():
            event.setdefault(name, _scrub_value(name, value))
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            event["error_type"] = type(exc).__name__
            event["error"] = _scrub(_error_text(exc))
        return json.dumps(event, default=str, ensure_ascii=False, separators=(",", ":"))


_TEMPORAL_KEYS: Final[dict[str, str]] = {
    "workflow_run_id": "run_id",
    "run_id": "run_id",
    "activity_type": "activity",
}


def json_handler(stream: TextIO | None = None) -> logging.Handler:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(Redactor())
    return handler


@contextlib.contextmanager
def configured(log_format: str, *, text_logger: str | None = None) -> Iterator[None]:
    """Logging of one long-running command, undone on exit (a command run in-process, by a test
    or an embedding tool, leaves no handler behind).

    ``json``: every logger of the process (the project's, the Temporal SDK's) goes to stderr as
    JSON lines, INFO and up. ``text``: as before: ``text_logger`` (if any) prints its messages
    to stderr, one a line; the rest goes to Python's default (warnings and errors)."""
    if log_format not in FORMATS:
        raise ValueError(f"log format {log_format!r}: expected one of {', '.join(FORMATS)}")
    if log_format == "json":
        target = logging.getLogger()
        handler = json_handler()
    elif text_logger is not None:
        target = logging.getLogger(text_logger)
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.addFilter(Redactor())
    else:
        yield
        return
    level = target.level
    target.addHandler(handler)
    target.setLevel(logging.INFO)
    try:
        yield
    finally:
        target.removeHandler(handler)
        target.setLevel(level)
