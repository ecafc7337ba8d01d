"""The servers of the dev stack, in start order: Temporal, OpenBao, moto, the Azure Key Vault
emulator, the codec server and the rekey worker."""

from __future__ import annotations

import asyncio
import ssl
import sys
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import httpx

from emulators import servers
from rekey.config import Settings
from rekey.devstack.component import HOST, Component, executable
from rekey.devstack.errors import one_line
from rekey.devstack.files import absolute
from rekey.devstack.openbao import OpenBaoServer
from rekey.devstack.processes import STOP_TIMEOUT
from rekey.devstack.temporal import register_search_attributes, search_attribute_flags

__all__ = [
    "COMPONENTS",
    "AzureKeyVaultServer",
    "CodecServer",
    "MotoServer",
    "RekeyWorker",
    "TemporalDevServer",
]

_T = TypeVar("_T")


class TemporalDevServer(Component):
    """``temporal server start-dev`` with a SQLite file under ``home/temporal``."""

    name = "temporal"
    binary = "temporal"
    port_fields = ("temporal_port", "temporal_ui_port")

    def db_file(self, settings: Settings) -> Path:
        return self.data_dir(settings) / "temporal.db"

    def command(self, settings: Settings) -> list[str]:
        cmd = [
            executable(self.binary, self.name),
            "server",
            "start-dev",
            "--ip",
            HOST,
            "--port",
            str(settings.temporal_port),
            "--ui-ip",
            HOST,
            "--ui-port",
            str(settings.temporal_ui_port),
            "--db-filename",
            str(self.db_file(settings)),
            "--log-level",
            "warn",
            # The UI decodes the encrypted payloads through the codec server started below.
            "--ui-codec-endpoint",
            f"http://{HOST}:{settings.codec_port}",
        ]
        if settings.temporal_namespace != "default":
            cmd += ["--namespace", settings.temporal_namespace]
        return cmd + search_attribute_flags()

    def after_start(self, settings: Settings, deadline: float) -> None:
        # start-dev's --search-attribute only takes effect on a new database file: a dev stack
        # first started by an older rekey gets them here (idempotent).
        register_search_attributes(
            executable(self.binary, self.name),
            f"{HOST}:{settings.temporal_port}",
            settings.temporal_namespace,
            timeout=max(5.0, deadline - time.monotonic()),
        )

    def probe(self, settings: Settings) -> str | None:
        if not servers.port_open(settings.temporal_port):
            return f"gRPC port {settings.temporal_port} closed"
        reason = _temporal_probe(f"{HOST}:{settings.temporal_port}", settings.temporal_namespace)
        if reason:
            return reason
        try:
            response = httpx.get(self._ui_url(settings), timeout=2.0)
        except httpx.HTTPError as exc:
            return f"UI does not answer: {exc.__class__.__name__}"
        if response.status_code >= 500:
            return f"UI answers HTTP {response.status_code}"
        return None

    def _ui_url(self, settings: Settings) -> str:
        return f"http://{HOST}:{settings.temporal_ui_port}"

    def endpoints(self, settings: Settings) -> dict[str, str]:
        return {
            "grpc": f"{HOST}:{settings.temporal_port}",
            "ui": self._ui_url(settings),
            "namespace": settings.temporal_namespace,
        }


class MotoServer(Component):
    """moto in server mode, emulating AWS KMS (state in memory only)."""

    name = "moto"
    binary = "moto_server"
    port_fields = ("moto_port",)
    note = "state is kept in memory only; KMS keys are lost when moto stops"
    # Replaying moto's recorded calls (its /moto-api/recorder/) would not bring them back: a
    # replayed CreateKey makes a new key id and new random key material, so what was wrapped
    # under the old key still does not open.
    lost_on_stop = "its AWS KMS keys are gone (memory only): blobs sealed under aws: keys no longer open"

    def prepare(self, settings: Settings) -> None:
        pass  # no data directory: moto keeps nothing on disk

    def command(self, settings: Settings) -> list[str]:
        return [
            executable(self.binary, self.name),
            "-H",
            HOST,
            "-p",
            str(settings.moto_port),
        ]

    def probe(self, settings: Settings) -> str | None:
        try:
            httpx.get(f"http://{HOST}:{settings.moto_port}/moto-api/", timeout=2.0)
        except httpx.HTTPError as exc:
            return f"does not answer: {exc.__class__.__name__}"
        return None

    def endpoints(self, settings: Settings) -> dict[str, str]:
        return {"kms": f"http://{HOST}:{settings.moto_port}", "region": settings.aws_region}


class AzureKeyVaultServer(Component):
    """The project's Azure Key Vault / Managed HSM emulator (HTTPS, keys persisted)."""

    name = "azure"
    binary = "python"
    port_fields = ("azure_port",)
    note = "emulator: keys (material included) persisted in the state directory"

    def command(self, settings: Settings) -> list[str]:
        return [
            sys.executable,
            "-m",
            "emulators.azure_keyvault",
            "--port",
            str(settings.azure_port),
            "--state-dir",
            str(absolute(self.data_dir(settings))),
        ]

    def probe(self, settings: Settings) -> str | None:
        ca_file = Path(settings.azure_ca_file)
        if not ca_file.exists():
            return "has not written its CA yet"
        try:
            httpx.get(
                f"https://{HOST}:{settings.azure_port}/_emulator/health",
                timeout=2.0,
                verify=ssl.create_default_context(cafile=str(ca_file)),
            )
        except httpx.HTTPError as exc:
            return f"does not answer: {exc.__class__.__name__}"
        return None

    def endpoints(self, settings: Settings) -> dict[str, str]:
        return {"vault": settings.azure_vault_url, "ca_file": str(absolute(Path(settings.azure_ca_file)))}


class CodecServer(Component):
    """``rekey codec-server``: lets the Temporal UI decode the encrypted payloads."""

    name = "codec"
    binary = "python"
    port_fields = ("codec_port",)

    def command(self, settings: Settings) -> list[str]:
        home = str(absolute(settings.home))
        return [
            sys.executable,
            "-m",
            "rekey.cli",
            "--home",
            home,
            "codec-server",
            "--port",
            str(settings.codec_port),
        ]

    def probe(self, settings: Settings) -> str | None:
        from rekey.codec import CodecError  # keeps `rekey` start-up light
        from rekey.codec_server import read_server_token

        # Read at every probe: the server writes a fresh token at each start (after binding) and
        # deletes it when it stops; a stale one left by a killed server is refused until then.
        try:
            token = read_server_token(absolute(settings.home))
        except CodecError as exc:
            return f"has not written its token yet ({exc})"
        try:
            response = httpx.post(
                f"http://{HOST}:{settings.codec_port}/decode",
                content=b'{"payloads": []}',
                headers={
                    "Content-Type": "application/json",
                    "Authorization": f"Bearer {token}",
                },
                timeout=2.0,
            )
        except httpx.HTTPError as exc:
            return f"does not answer: {exc.__class__.__name__}"
        if response.status_code != 200:
            return f"refuses its own token: HTTP {response.status_code}"
        return None

    def endpoints(self, settings: Settings) -> dict[str, str]:
        from rekey.codec_server import server_token_path

        return {
            "codec": f"http://{HOST}:{settings.codec_port}",
            "token_file": str(server_token_path(absolute(settings.home))),
        }


class RekeyWorker(Component):
    """``rekey worker`` on task queue ``rekey``: runs rotations against the stack above."""

    name = "worker"
    binary = "python"
    port_fields = ()

    def command(self, settings: Settings) -> list[str]:
        # `rekey dev down` sends SIGTERM and SIGKILLs after STOP_TIMEOUT: the worker's graceful
        # shutdown has to end well before that.
        return [
            sys.executable,
            "-m",
            "rekey.cli",
            "--home",
            str(absolute(settings.home)),
            "worker",
            "--shutdown-timeout",
            f"{int(STOP_TIMEOUT * 2 / 3)}s",
        ]

    def probe(self, settings: Settings) -> str | None:
        return None  # no port: alive is ready (it connects to Temporal, which is up)

    def endpoints(self, settings: Settings) -> dict[str, str]:
        return {"task_queue": "rekey", "temporal": settings.temporal_address}


#: Start order; ``down`` stops in reverse. The worker comes last: it needs everything above.
COMPONENTS: list[Component] = [
    TemporalDevServer(),
    OpenBaoServer(),
    MotoServer(),
    AzureKeyVaultServer(),
    CodecServer(),
    RekeyWorker(),
]


def _run_sync(factory: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
    """Run a coroutine from sync code, also when the caller already runs an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(factory())
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(lambda: asyncio.run(factory())).result()


def _temporal_probe(address: str, namespace: str) -> str | None:
    from temporalio.api.workflowservice.v1 import DescribeNamespaceRequest
    from temporalio.client import Client

    async def check() -> None:
        client = await asyncio.wait_for(Client.connect(address, namespace=namespace), 5.0)
        await client.workflow_service.describe_namespace(
            DescribeNamespaceRequest(namespace=namespace), timeout=timedelta(seconds=3)
        )

    try:
        _run_sync(check)
    except Exception as exc:
        return f"frontend not ready: {one_line(exc) or exc.__class__.__name__}"
    return None
