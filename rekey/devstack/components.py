"""The servers of the dev stack, in start order: Temporal, OpenBao, moto (and, with the aws-kms
throttle profile, the throttling proxy in front of it), the Azure Key Vault emulator, the codec
server and the rekey worker."""

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
from rekey.devstack.errors import ComponentFailed, one_line
from rekey.devstack.files import absolute
from rekey.devstack.openbao import OpenBaoServer
from rekey.devstack.processes import STOP_TIMEOUT
from rekey.devstack.temporal import register_search_attributes, search_attribute_flags
from rekey.devstack.throttle import read_choice

__all__ = [
    "COMPONENTS",
    "AzureKeyVaultServer",
    "CodecServer",
    "MotoServer",
    "RekeyWorker",
    "TemporalDevServer",
    "ThrottleProxyServer",
    "moto_listen_port",
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

    def ports(self, settings: Settings) -> list[int]:
        return [moto_listen_port(settings)]

    def port_hint(self, settings: Settings, port: int) -> str:
        hint = "set REKEY_MOTO_PORT or moto_port in rekey.toml to use another port"
        if port != settings.moto_port:
            return f"behind the aws-kms throttle moto listens on moto_port + 1; {hint}"
        return hint

    def command(self, settings: Settings) -> list[str]:
        return [
            executable(self.binary, self.name),
            "-H",
            HOST,
            "-p",
            str(moto_listen_port(settings)),
        ]

    def probe(self, settings: Settings) -> str | None:
        try:
            httpx.get(f"http://{HOST}:{moto_listen_port(settings)}/moto-api/", timeout=2.0)
        except httpx.HTTPError as exc:
            return f"does not answer: {exc.__class__.__name__}"
        return None

    def endpoints(self, settings: Settings) -> dict[str, str]:
        endpoints = {"kms": f"http://{HOST}:{moto_listen_port(settings)}", "region": settings.aws_region}
        if moto_listen_port(settings) != settings.moto_port:
            endpoints["behind"] = "throttle"
        return endpoints


def moto_listen_port(settings: Settings) -> int:
    """moto's port: ``moto_port``, or ``moto_port + 1`` behind the aws-kms throttle proxy (which
    then listens on ``moto_port``, where the settings' AWS endpoint points)."""
    return settings.moto_port + 1 if read_choice(settings).profile == "aws-kms" else settings.moto_port


class ThrottleProxyServer(Component):
    """The throttling proxy in front of moto, with the ``aws-kms`` throttle profile only: R req/s
    for AWS KMS's shared symmetric-crypto operations, ``ThrottlingException`` over it."""

    name = "throttle"
    binary = "python"
    port_fields = ("moto_port",)
    note = "throttling proxy in front of moto"
    restart_on_change = True  # stateless: a new rate restarts it

    def wanted(self, settings: Settings) -> bool:
        return read_choice(settings).profile == "aws-kms"

    def prepare(self, settings: Settings) -> None:
        pass

    def command(self, settings: Settings) -> list[str]:
        rate = read_choice(settings).effective_rate()
        return [
            sys.executable,
            "-m",
            "emulators.throttle_proxy",
            "--backend",
            f"http://{HOST}:{moto_listen_port(settings)}",
            "--port",
            str(settings.moto_port),
            "--rate",
            f"{rate:g}",
            "--profile",
            "aws",
            "--kms-crypto",
        ]

    def probe(self, settings: Settings) -> str | None:
        try:
            response = httpx.get(f"http://{HOST}:{settings.moto_port}/moto-api/", timeout=2.0)
        except httpx.HTTPError as exc:
            return f"does not answer: {exc.__class__.__name__}"
        if response.status_code == 502:
            return "answers, but moto behind it does not"
        return None

    def endpoints(self, settings: Settings) -> dict[str, str]:
        return {
            "kms": f"http://{HOST}:{settings.moto_port}",
            "backend": f"http://{HOST}:{moto_listen_port(settings)}",
            "rate": f"{read_choice(settings).effective_rate():g}/s",
        }


class AzureKeyVaultServer(Component):
    """The project's Azure Key Vault / Managed HSM emulator (HTTPS, keys persisted)."""

    name = "azure"
    binary = "python"
    port_fields = ("azure_port",)
    note = "emulator: keys (material included) persisted in the state directory"

    def command(self, settings: Settings) -> list[str]:
        command = [
            sys.executable,
            "-m",
            "emulators.azure_keyvault",
            "--port",
            str(settings.azure_port),
            "--state-dir",
            str(absolute(self.data_dir(settings))),
        ]
        choice = read_choice(settings)
        if choice.backend == "azure" and choice.profile is not None:
            command += ["--profile", choice.profile, "--throttle-rate", f"{choice.effective_rate():g}"]
            command += ["--retry-after", "off"]
        return command

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

    def after_start(self, settings: Settings, deadline: float) -> None:
        # A running emulator takes the stack's throttle profile (or its absence) live, so
        # `dev up --throttle-profile ...` needs no restart (its keys are kept either way).
        from emulators.azure_keyvault.throttle import DEFAULT_LIMITS, SustainedLoad, managed_hsm_limits

        choice = read_choice(settings)
        config: dict[str, Any] = {"limits": DEFAULT_LIMITS, "sustained": None, "retry_after": True}
        if choice.backend == "azure":
            config["limits"] = managed_hsm_limits(choice.effective_rate())
            config["retry_after"] = False
            if choice.profile == "managed-hsm-sustained":
                config["sustained"] = SustainedLoad().to_dict()
        try:
            response = httpx.post(
                f"https://{HOST}:{settings.azure_port}/_emulator/config",
                json=config,
                timeout=5.0,
                verify=ssl.create_default_context(cafile=str(settings.azure_ca_file)),
            )
        except httpx.HTTPError as exc:
            raise ComponentFailed(f"azure emulator refused its throttle settings: {exc}") from None
        if response.status_code != 200:
            raise ComponentFailed(
                f"azure emulator refused its throttle settings: HTTP {response.status_code}"
            )

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
#: A component whose ``wanted`` is false is left out (unless a pid file says it runs).
COMPONENTS: list[Component] = [
    TemporalDevServer(),
    OpenBaoServer(),
    MotoServer(),
    ThrottleProxyServer(),  # only with the aws-kms throttle profile
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
