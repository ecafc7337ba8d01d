"""The ``rekey`` command line: noun verb, every reporting command takes ``--json``.

Errors end in one line on stderr and a non-zero exit code (2 for bad input, 1 for a failed
operation, 3 for evidence a policy denies, 4 for a generation downgrade, 130 when interrupted);
``--debug`` adds the traceback.

Each noun is a module of this package exporting its command as ``cli`` (as in click's
``examples/complex``); the root group loads only the one a command line names. The commands are
a skin over library calls (`rekey.client` for everything Temporal); output helpers and the exit
codes live in `rekey.cli.output`.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Final

import click

from rekey.cli.context import CliState
from rekey.cli.output import CONTEXT, err, exit_on_error

COMMANDS: Final = {
    "agent": "agent",
    "attest": "attest",
    "audit": "audit",
    "codec-server": "codec",
    "dev": "dev",
    "generation": "generation",
    "key": "key",
    "migrate": "migrate",
    "rotate": "rotate",
    "schedule": "schedule",
    "state": "state",
    "stress": "stress",
    "worker": "worker",
}
"""Command name -> module under ``rekey.cli``."""


class NounGroup(click.Group):
    """The root group: its commands are the ``cli`` objects of the modules in `COMMANDS`."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        module = COMMANDS.get(cmd_name)
        if module is None:
            return None
        command: click.Command = importlib.import_module(f"{__name__}.{module}").cli
        return command


@click.group(cls=NounGroup, context_settings=CONTEXT)
@click.option(
    "--home",
    type=click.Path(path_type=Path),
    envvar="REKEY_HOME",
    help="State directory (default ./.rekey; env REKEY_HOME).",
)
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
@click.pass_context
def app(ctx: click.Context, home: Path | None, debug: bool) -> None:
    """Key rotation and sealed-state migration for confidential-computing fleets."""
    ctx.obj = CliState(home)


def main(argv: list[str] | None = None) -> None:
    """Run ``rekey`` with ``argv`` (default: the process's arguments); a failure is a ``SystemExit``."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    with exit_on_error(debug):
        # Without standalone mode click returns the code of a `click.exceptions.Exit`.
        code = app.main(args=argv, prog_name="rekey", standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)


def entry() -> None:
    """Console entry point: ``main``, then exit without interpreter finalisation once the
    Temporal SDK's native runtime is loaded. Its threads can abort the interpreter at exit after
    all work succeeded (sdk-python#300); the SDK's own test suite ends the same way."""
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if isinstance(exc.code, str):
            err.print(exc.code, markup=False)
    if any(name.startswith("temporalio.bridge") for name in sys.modules):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
