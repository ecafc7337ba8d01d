"""What a command gets from the root group: the settings of ``--home``, the store, a client."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import click

from audit import AuditLog
from rekey.config import Settings, load_settings
from sealing.signing import Signer
from sealing.store import InvalidStoreURL, SealedStateStore, StoreMissing
from sealing.witness import Witness

if TYPE_CHECKING:
    from rekey.client import RekeyClient

T = TypeVar("T")


class CliState:
    """The root group's ``--home``; settings are read on first use, so ``--help`` needs none."""

    def __init__(self, home: Path | None) -> None:
        self.home = home
        self._settings: Settings | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load_settings(self.home)
        return self._settings


def settings() -> Settings:
    """The settings of the running command."""
    state = click.get_current_context().find_object(CliState)
    assert state is not None, "commands run under the rekey root group"  # nosec B101 # typing only
    return state.settings


STORE_SETTING = "store_url / REKEY_STORE_URL"


@contextmanager
def _store_setting_named() -> Iterator[None]:
    """`InvalidStoreURL` and `StoreMissing` name the setting to fix (and the latter the commands
    that create a store)."""
    try:
        yield
    except InvalidStoreURL as exc:
        raise InvalidStoreURL(f"{exc} (setting {STORE_SETTING})") from None
    except StoreMissing as exc:
        raise StoreMissing(
            f"{exc} (setting {STORE_SETTING}); it is created by the commands that store something"
            " (rekey generation register, rekey worker, rekey dev up)"
        ) from None


def store(*, create: bool = False) -> SealedStateStore:
    """The store of the settings. Only a command that stores something passes ``create=True``;
    any other gets `StoreMissing` (exit 2, naming the setting) when there is none yet."""
    with _store_setting_named():
        return SealedStateStore(settings().store_url, create=create)


def audit_log(signer: Signer | None, *, witness: Witness | None = None, create: bool = False) -> AuditLog:
    """The audit log in the settings' store; ``create`` as for `store`."""
    with _store_setting_named():
        return AuditLog(settings().store_url, signer, witness=witness, create=create)


def sim_host_dir(host_dir: Path | None) -> Path:
    """The simulated TEE host's directory: ``host_dir``, else ``<home>/sim-host``."""
    return host_dir if host_dir is not None else settings().home / "sim-host"


def with_client(action: Callable[[RekeyClient], Awaitable[T]]) -> T:
    """Connect to Temporal (from the settings) and run ``action`` with the client."""
    # Imported here: only the commands that talk to Temporal load its SDK.
    from rekey.client import RekeyClient

    def unchecked(message: str) -> None:
        from rekey.cli.output import err, printable

        err.print(f"warning: {printable(message)}", markup=False, emoji=False)

    async def run() -> T:
        return await action(await RekeyClient.connect(settings(), on_unchecked_key=unchecked))

    return asyncio.run(run())
