"""The options of a migration start, shared by ``migrate start`` and ``generation register
--auto-migrate`` (click only: loading them loads no Temporal SDK)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import click


@dataclass(frozen=True)
class MigrationOptions:
    waves: str = "1,10,50,100"
    grace: str = "24h"
    on_failure: str = "rollback"
    gate_sample: int = 5
    allow_same_svn: bool = False
    jitter: str = "2s"
    wait: bool = False


_DEFAULTS = MigrationOptions()
_OPTIONS = (
    click.option(
        "--waves", default=_DEFAULTS.waves, show_default=True, help="Cumulative percentages of hosts."
    ),
    click.option(
        "--grace", default=_DEFAULTS.grace, show_default=True, help="Wait before deleting the old copies."
    ),
    click.option(
        "--on-failure",
        type=click.Choice(["rollback", "pause"]),
        default=_DEFAULTS.on_failure,
        show_default=True,
    ),
    click.option(
        "--gate-sample", type=click.IntRange(0, 1000), default=_DEFAULTS.gate_sample, show_default=True
    ),
    click.option("--allow-same-svn", is_flag=True, help="Admit a new generation with the old one's SVN."),
    click.option(
        "--jitter",
        default=_DEFAULTS.jitter,
        show_default=True,
        metavar="DUR",
        help="Each host's first batch of a wave starts after a random delay up to this (0s: none; max 10m).",
    ),
    click.option("--wait", is_flag=True, help="Show a progress bar per wave and wait for the end."),
)
NAMES = tuple(f.name for f in fields(MigrationOptions))
"""The parameter names of the options (``wait`` for ``--wait``)."""


def migration_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add the migration start options to a click command; it receives them as ``migration``."""

    @functools.wraps(command)
    def collected(**kwargs: Any) -> Any:
        options = MigrationOptions(**{name: kwargs.pop(name) for name in NAMES})
        return command(migration=options, **kwargs)

    for option in reversed(_OPTIONS):
        collected = option(collected)
    return collected
