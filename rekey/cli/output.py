"""What every command prints with: the consoles, ``--json``, tables, and the exit codes.

`exit_on_error` is the one place where an error becomes the one-line ``error: ...`` on stderr
and an exit code; commands raise typed errors and never print them themselves.
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
import traceback
from collections.abc import Callable, Iterator
from typing import Any, Final, NoReturn

import click
from click.decorators import FC
from rich.console import Console
from rich.table import Table

from rekey.logs import configured

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
"""An operation failed (a KMS, the store, Temporal, a rotation)."""
EXIT_USAGE: Final = 2
"""Bad input: an option, a file, a key ref, a manifest."""
EXIT_DENIED: Final = 3
"""Attestation evidence denied by the policy."""
EXIT_DOWNGRADE: Final = 4
"""``generation diff``: the SVN goes down."""
EXIT_INTERRUPTED: Final = 130

CONTEXT: Final = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
json_option = click.option("--json", "json_out", is_flag=True, help="Print JSON.")
LOG_FORMAT_HELP: Final = "Logs on stderr as text, or as JSON, one event per line (rekey.logs)."


def _configure_logs(ctx: click.Context, _param: click.Parameter, value: str) -> str:
    ctx.with_resource(configured(value))  # undone when the command ends
    return value


def log_format_option(*, configure: bool = True) -> Callable[[FC], FC]:
    """``--log-format text|json``; with ``configure`` the logs are set up for the command's run
    (`rekey.logs.configured`) and the value is not passed to it."""
    return click.option(
        "--log-format",
        type=click.Choice(["text", "json"]),
        default="text",
        show_default=True,
        help=LOG_FORMAT_HELP,
        expose_value=not configure,
        callback=_configure_logs if configure else None,
    )


# Piped output is not cut to 80 columns: scripts and logs get whole key refs and paths.
out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, highlight=False, soft_wrap=True)


class CliError(Exception):
    """Base of the command line's own errors (a file, an option's value, a port); one line."""

    exit_code = EXIT_USAGE


def table(*columns: str) -> Table:
    """A borderless table; cells are rich markup unless given as `rich.text.Text`."""
    return Table(*columns, box=None, pad_edge=False)


def emit_json(data: Any, *, sort_keys: bool = False) -> None:
    """``data`` as indented JSON on stdout (values JSON does not know as their ``str``)."""
    out.print_json(json.dumps(data, default=str), sort_keys=sort_keys)


def printable(text: str) -> str:
    """``text`` with every character that is not printable (a newline, an escape sequence, a
    record separator from a hostile name or path) written as its Python escape: one line that
    cannot move the cursor or recolour the terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


MAX_ERROR_CHARS = 2000
"""The longest error line shown: a message quoting a hostile value whole (a megabyte-long
option, say) is cut there, with its length said."""


def error_line(message: str) -> None:
    """``error: <message>`` on stderr: one line (`printable`) of at most `MAX_ERROR_CHARS`
    characters, never read as markup or emoji codes (``:smile:``)."""
    line = printable(message)
    if len(line) > MAX_ERROR_CHARS:
        line = f"{line[:MAX_ERROR_CHARS]}… (cut, {len(line)} characters)"
    err.print(f"error: {line}", markup=False, emoji=False)


def _one_line(message: str) -> str:
    """A click message on one line: click puts the choices of a missing option on lines of
    their own (``Choose from:\n\tsim,\n\t...``)."""
    return re.sub(r"[ \t]*\n\s*", " ", message).strip()


def fail(message: str, code: int) -> NoReturn:
    error_line(message)
    sys.exit(code)


def known_errors() -> tuple[type[Exception], ...]:
    """The errors that say what happened: each ends in one ``error:`` line and its ``exit_code``.

    Imported when an error is being handled, so that a command loads only what it uses (the
    Temporal SDK only for ``rotate``, ``schedule`` and ``worker``)."""
    from attestation.errors import AttestationError
    from audit import AuditError
    from kms_adapters.keyref import InvalidKeyRef
    from rekey.backends import BackendNotAvailable
    from rekey.client import RekeyClientError
    from rekey.codec import CodecError
    from rekey.config import ConfigError
    from rekey.devstack import DevStackError
    from sealing.errors import SealingError
    from sealing.generation import ManifestError
    from sealing.store import StoreError

    return (
        AttestationError,
        ConfigError,
        ManifestError,
        InvalidKeyRef,
        BackendNotAvailable,
        SealingError,
        StoreError,
        AuditError,
        DevStackError,
        RekeyClientError,
        CodecError,
        CliError,
    )


def exit_code_of(error: BaseException) -> int:
    """The exit code of a known error (its ``exit_code``; 1 if it has none)."""
    code = getattr(error, "exit_code", EXIT_FAILED)
    return code if isinstance(code, int) else EXIT_FAILED


@contextlib.contextmanager
def exit_on_error(debug: bool) -> Iterator[None]:
    """Turn whatever the block raises into an exit code and, for an error, one ``error:`` line.

    ``debug`` adds the traceback of a known or unexpected error (not of a usage error)."""
    try:
        yield
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        fail("aborted", EXIT_INTERRUPTED)
    except click.ClickException as exc:
        fail(_one_line(exc.format_message()), exc.exit_code)
    except KeyboardInterrupt:
        fail("interrupted", EXIT_INTERRUPTED)
    except Exception as exc:
        if debug:
            traceback.print_exc()
        if isinstance(exc, known_errors()):
            fail(str(exc), exit_code_of(exc))
        # The last line of defence: never a bare traceback.
        fail(f"internal error: {type(exc).__name__}: {exc} (run with --debug for the traceback)", EXIT_FAILED)
