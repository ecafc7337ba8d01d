"""The embedded dev stack behind ``rekey dev up | down | status``.

Every component is a real server process bound to 127.0.0.1 whose data, log and pid file
live under the state directory (``settings.home``):

* ``home/<name>/``          data (Temporal SQLite file, OpenBao raft storage and config)
* ``home/logs/<name>.log``  stdout and stderr of the process
* ``home/run/<name>.json``  pid file: pid, command line, ports, start time

Processes run in their own session, so they outlive the ``rekey`` command that started
them; ``down`` stops exactly the processes named in the pid files after checking that the
pid still belongs to the command line we started (pids get reused).

Importing this module starts nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, ClassVar, Literal, TypeVar

import httpx

from rekey.config import Settings

if TYPE_CHECKING:
    import hvac

__all__ = [
    "COMPONENTS",
    "BinaryMissing",
    "Component",
    "ComponentFailed",
    "ComponentStatus",
    "DevStackError",
    "MotoServer",
    "OpenBaoServer",
    "PortInUse",
    "TemporalDevServer",
    "down",
    "openbao_client",
    "status",
    "up",
]

HOST = "127.0.0.1"
START_TIMEOUT = 60.0  # seconds for one component to become ready
STOP_TIMEOUT = 15.0  # seconds between SIGTERM and SIGKILL
LOG_TAIL_LINES = 5

State = Literal["running", "stopped", "unhealthy"]
Echo = Callable[[str], None]
_T = TypeVar("_T")


# --------------------------------------------------------------------------- errors


class DevStackError(Exception):
    """A dev-stack operation failed; the message is one line meant for the user."""

    exit_code = 1


class PortInUse(DevStackError):
    """A port a component needs is taken by some other process."""


class ComponentFailed(DevStackError):
    """A component exited early, did not become ready in time, or failed its setup."""


class BinaryMissing(DevStackError):
    """The executable of a component is neither in this environment nor on PATH."""


class _NotReady(Exception):
    """Internal: a readiness wait ended without the component answering."""


# --------------------------------------------------------------------------- status


@dataclass
class ComponentStatus:
    name: str
    state: State
    pid: int | None = None
    endpoints: dict[str, str] = field(default_factory=dict)
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- components


class Component:
    """One server of the dev stack. Subclasses fill in the hooks."""

    name: ClassVar[str]
    binary: ClassVar[str]
    #: Settings fields holding the ports of this component (for error messages).
    port_fields: ClassVar[tuple[str, ...]]
    #: Always shown in the status ``note`` (e.g. that state is not persisted).
    note: ClassVar[str] = ""
    start_timeout: ClassVar[float] = START_TIMEOUT

    def ports(self, settings: Settings) -> list[int]:
        """Every port on 127.0.0.1 the process will listen on."""
        return [int(getattr(settings, name)) for name in self.port_fields]

    def port_hint(self, settings: Settings, port: int) -> str:
        """Which setting moves ``port``, phrased for an error message."""
        for name in self.port_fields:
            if getattr(settings, name) == port:
                return f"set REKEY_{name.upper()} or {name} in rekey.toml to use another port"
        name = self.port_fields[0]
        return f"set REKEY_{name.upper()} or {name} in rekey.toml to move it"

    def command(self, settings: Settings) -> list[str]:
        raise NotImplementedError

    def data_dir(self, settings: Settings) -> Path:
        return _abs(settings.home) / self.name

    def prepare(self, settings: Settings) -> None:
        """Create directories and configuration before the process starts."""
        self.data_dir(settings).mkdir(parents=True, exist_ok=True)

    def probe(self, settings: Settings) -> str | None:
        """One quick readiness check: ``None`` once the server answers, else why not."""
        raise NotImplementedError

    def health(self, settings: Settings) -> str | None:
        """One quick health check for ``status``: ``None`` if usable, else why not."""
        return self.probe(settings)

    def wait_ready(
        self,
        settings: Settings,
        deadline: float,
        alive: Callable[[], bool] | None = None,
    ) -> None:
        """Poll :meth:`probe` until it passes; raise ``_NotReady`` at ``deadline``.

        ``alive`` reports whether the process we just started still runs, so an early
        exit fails at once instead of at the deadline.
        """
        while True:
            if alive is not None and not alive():
                raise _NotReady("the process exited")
            reason = self.probe(settings)
            if reason is None:
                return
            if time.monotonic() >= deadline:
                raise _NotReady(f"not ready after {self.start_timeout:.0f}s ({reason})")
            time.sleep(0.2)

    def after_start(self, settings: Settings, deadline: float) -> None:
        """One-off setup once the server answers; must be idempotent."""

    def endpoints(self, settings: Settings) -> dict[str, str]:
        raise NotImplementedError


class TemporalDevServer(Component):
    """``temporal server start-dev`` with a SQLite file under ``home/temporal``."""

    name = "temporal"
    binary = "temporal"
    port_fields = ("temporal_port", "temporal_ui_port")

    def db_file(self, settings: Settings) -> Path:
        return self.data_dir(settings) / "temporal.db"

    def command(self, settings: Settings) -> list[str]:
        cmd = [
            _find_binary(self.binary, self.name),
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
        return cmd

    def probe(self, settings: Settings) -> str | None:
        if not _port_open(settings.temporal_port):
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


class OpenBaoServer(Component):
    """Single-node OpenBao on raft storage (2.7 has no ``file`` backend).

    First start: initialise with one key share and store unseal key and root token in
    ``settings.openbao_init_file`` (mode 0600). Every start: unseal, wait for the node to
    become active, mount Transit at ``settings.transit_mount``.
    """

    name = "openbao"
    binary = "bao"
    port_fields = ("openbao_port",)

    def ports(self, settings: Settings) -> list[int]:
        # The raft cluster listener only binds after unseal, but it must be free too.
        return [settings.openbao_port, settings.openbao_port + 1]

    def port_hint(self, settings: Settings, port: int) -> str:
        hint = "set REKEY_OPENBAO_PORT or openbao_port in rekey.toml to use another port"
        if port == settings.openbao_port + 1:
            return f"the cluster port is openbao_port + 1; {hint}"
        return hint

    def data_dir(self, settings: Settings) -> Path:
        return _abs(settings.openbao_dir)

    def config_file(self, settings: Settings) -> Path:
        return self.data_dir(settings) / "config.hcl"

    def raft_dir(self, settings: Settings) -> Path:
        return self.data_dir(settings) / "data"

    def api_url(self, settings: Settings) -> str:
        return f"http://{HOST}:{settings.openbao_port}"

    def prepare(self, settings: Settings) -> None:
        directory = self.data_dir(settings)
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.raft_dir(settings).mkdir(mode=0o700, exist_ok=True)
        port = settings.openbao_port
        config = (
            "# Written by `rekey dev up`; rewritten on every start.\n"
            'storage "raft" {\n'
            f"  path    = {json.dumps(str(self.raft_dir(settings)))}\n"
            '  node_id = "rekey-dev"\n'
            "}\n"
            "\n"
            'listener "tcp" {\n'
            f'  address         = "{HOST}:{port}"\n'
            f'  cluster_address = "{HOST}:{port + 1}"\n'
            "  tls_disable     = true\n"
            "}\n"
            "\n"
            f'api_addr     = "http://{HOST}:{port}"\n'
            f'cluster_addr = "http://{HOST}:{port + 1}"\n'
            "ui           = false\n"
        )
        _write_atomic(self.config_file(settings), config)

    def command(self, settings: Settings) -> list[str]:
        return [
            _find_binary(self.binary, self.name),
            "server",
            f"-config={self.config_file(settings)}",
        ]

    def _health(self, settings: Settings) -> int | None:
        try:
            response = httpx.get(f"{self.api_url(settings)}/v1/sys/health", timeout=2.0)
        except httpx.HTTPError:
            return None
        return response.status_code

    def probe(self, settings: Settings) -> str | None:
        # Any answer will do here: sealed (503) and uninitialised (501) are expected.
        code = self._health(settings)
        return None if code is not None else f"{self.api_url(settings)} does not answer"

    def health(self, settings: Settings) -> str | None:
        code = self._health(settings)
        reasons = {
            None: "API does not answer",
            429: "standby, not active",
            501: "not initialised",
            503: "sealed",
        }
        if code == 200:
            return None
        return reasons.get(code, f"sys/health answers HTTP {code}")

    def after_start(self, settings: Settings, deadline: float) -> None:
        import hvac

        client = hvac.Client(url=self.api_url(settings), timeout=10)
        init_file = settings.openbao_init_file
        if not client.sys.is_initialized():
            # An init file without initialised storage belongs to deleted data.
            init_file.unlink(missing_ok=True)
            result = client.sys.initialize(secret_shares=1, secret_threshold=1)
            _write_secret_json(
                init_file,
                {"unseal_key": result["keys"][0], "root_token": result["root_token"]},
            )
        unseal_key, root_token = _read_init_file(init_file, self.raft_dir(settings))
        if client.sys.is_sealed():
            client.sys.submit_unseal_key(unseal_key)
        # Raft needs a few seconds after unseal to elect itself; writes fail before that.
        while (code := self._health(settings)) != 200:
            if time.monotonic() >= deadline:
                raise ComponentFailed(f"openbao did not become active after unseal (sys/health: HTTP {code})")
            time.sleep(0.2)
        client.token = root_token
        mount = settings.transit_mount.strip("/")
        mounts = client.sys.list_mounted_secrets_engines()
        mounts = mounts.get("data", mounts)
        if f"{mount}/" not in mounts:
            client.sys.enable_secrets_engine("transit", path=mount)

    def endpoints(self, settings: Settings) -> dict[str, str]:
        return {
            "api": self.api_url(settings),
            "transit_mount": settings.transit_mount,
            "init_file": str(_abs(settings.openbao_init_file)),
        }


class MotoServer(Component):
    """moto in server mode, emulating AWS KMS (state in memory only)."""

    name = "moto"
    binary = "moto_server"
    port_fields = ("moto_port",)
    note = "state is kept in memory only; KMS keys are lost when moto stops"

    def prepare(self, settings: Settings) -> None:
        pass  # no data directory: moto keeps nothing on disk

    def command(self, settings: Settings) -> list[str]:
        return [
            _find_binary(self.binary, self.name),
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


class AzureKeyVaultEmulator(Component):
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
            str(_abs(self.data_dir(settings))),
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
        return {"vault": settings.azure_vault_url, "ca_file": str(_abs(Path(settings.azure_ca_file)))}


class CodecServer(Component):
    """``rekey codec-server``: lets the Temporal UI decode the encrypted payloads."""

    name = "codec"
    binary = "python"
    port_fields = ("codec_port",)

    def command(self, settings: Settings) -> list[str]:
        home = str(_abs(settings.home))
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
        try:
            httpx.options(f"http://{HOST}:{settings.codec_port}/decode", timeout=2.0)
        except httpx.HTTPError as exc:
            return f"does not answer: {exc.__class__.__name__}"
        return None

    def endpoints(self, settings: Settings) -> dict[str, str]:
        return {"codec": f"http://{HOST}:{settings.codec_port}"}


class RekeyWorker(Component):
    """``rekey worker`` on task queue ``rekey``: runs rotations against the stack above."""

    name = "worker"
    binary = "python"
    port_fields = ()

    def command(self, settings: Settings) -> list[str]:
        return [sys.executable, "-m", "rekey.cli", "--home", str(_abs(settings.home)), "worker"]

    def probe(self, settings: Settings) -> str | None:
        return None  # no port: alive is ready (it connects to Temporal, which is up)

    def endpoints(self, settings: Settings) -> dict[str, str]:
        return {"task_queue": "rekey", "temporal": settings.temporal_address}


#: Start order; ``down`` stops in reverse. The worker comes last: it needs everything above.
COMPONENTS: list[Component] = [
    TemporalDevServer(),
    OpenBaoServer(),
    MotoServer(),
    AzureKeyVaultEmulator(),
    CodecServer(),
    RekeyWorker(),
]


# --------------------------------------------------------------------------- operations


def up(
    settings: Settings,
    echo: Echo = print,
    components: Sequence[Component] | None = None,
) -> list[ComponentStatus]:
    """Start every component that is not already running; return their status.

    On failure the processes this call started are stopped again (already running ones
    are left alone) and :class:`DevStackError` is raised.
    """
    chosen = COMPONENTS if components is None else list(components)
    results: list[ComponentStatus] = []
    started: list[tuple[Component, int]] = []
    with _lock(settings):
        try:
            for component in chosen:
                result = _up_one(component, settings, started)
                results.append(result)
                echo(_describe(component, result))
        except BaseException:
            for component, pid in reversed(started):
                _terminate(pid)
                _pid_file(settings, component).unlink(missing_ok=True)
            raise
    return results


def down(
    settings: Settings,
    echo: Echo = print,
    components: Sequence[Component] | None = None,
) -> list[ComponentStatus]:
    """Stop the processes named in the pid files (last started first)."""
    chosen = COMPONENTS if components is None else list(components)
    results: list[ComponentStatus] = []
    with _lock(settings):
        for component in reversed(chosen):
            pid_file = _pid_file(settings, component)
            record = _read_record(pid_file)
            if record is None:
                result = ComponentStatus(component.name, "stopped", note="not running")
            elif not _record_is_live(record):
                pid_file.unlink(missing_ok=True)
                result = ComponentStatus(
                    component.name, "stopped", note="not running (removed stale pid file)"
                )
            else:
                pid = int(record["pid"])
                killed = _terminate(pid)
                pid_file.unlink(missing_ok=True)
                how = "killed after timeout" if killed else "stopped"
                result = ComponentStatus(component.name, "stopped", pid, note=f"{how} (pid {pid})")
            results.append(result)
            echo(f"{component.name}: {result.note}")
    results.reverse()
    return results


def status(
    settings: Settings,
    components: Sequence[Component] | None = None,
) -> list[ComponentStatus]:
    """Report each component as running, stopped or unhealthy (starts nothing)."""
    chosen = COMPONENTS if components is None else list(components)
    results: list[ComponentStatus] = []
    for component in chosen:
        record = _read_record(_pid_file(settings, component))
        notes = [component.note] if component.note else []
        if record is None or not _record_is_live(record):
            if record is not None:
                notes.insert(0, "stale pid file")
            busy = [p for p in component.ports(settings) if not _port_free(p)]
            if busy:
                notes.insert(0, f"port {busy[0]} is in use by another process")
            results.append(ComponentStatus(component.name, "stopped", note="; ".join(notes)))
            continue
        reason = component.health(settings)
        state: State = "running" if reason is None else "unhealthy"
        if reason:
            notes.insert(0, reason)
        results.append(
            ComponentStatus(
                component.name,
                state,
                int(record["pid"]),
                component.endpoints(settings),
                "; ".join(notes),
            )
        )
    return results


def openbao_client(settings: Settings) -> hvac.Client:
    """An hvac client for ``settings.vault_addr`` with the configured or dev root token."""
    import hvac

    token = settings.resolved_vault_token()
    if not token:
        raise DevStackError(
            "no OpenBao token: set REKEY_VAULT_TOKEN or run `rekey dev up` to create "
            f"{settings.openbao_init_file}"
        )
    return hvac.Client(url=settings.vault_addr, token=token, timeout=30)


# --------------------------------------------------------------------------- internals


def _up_one(
    component: Component,
    settings: Settings,
    started: list[tuple[Component, int]],
) -> ComponentStatus:
    name = component.name
    pid_file = _pid_file(settings, component)
    record = _read_record(pid_file)
    if record is not None and _record_is_live(record):
        pid = int(record["pid"])
        deadline = time.monotonic() + component.start_timeout
        try:
            component.wait_ready(settings, deadline, lambda: _pid_alive(pid))
            component.after_start(settings, deadline)
        except Exception as exc:
            raise ComponentFailed(
                f"{name} is running (pid {pid}) but not healthy: {_one_line(exc)}; "
                "run `rekey dev down` and try again"
            ) from None
        return _status_of(component, settings, pid, "already running")
    if record is not None:
        pid_file.unlink(missing_ok=True)

    command = component.command(settings)  # raises BinaryMissing first
    for port in component.ports(settings):
        if not _port_free(port):
            raise PortInUse(
                f"cannot start {name}: {HOST}:{port} is already in use "
                f"({component.port_hint(settings, port)})"
            )
    component.prepare(settings)
    log_file = _log_file(settings, component)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("ab") as log:
        log.write(f"--- {_now()} rekey dev up: {' '.join(command)}\n".encode())
        log.flush()
        log_offset = log.tell()
        process = subprocess.Popen(
            command,
            env=os.environ | settings.environ(),  # rekey children see the settings this stack uses
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )
    _CHILDREN[process.pid] = process
    started.append((component, process.pid))
    _write_atomic(
        pid_file,
        json.dumps(
            {
                "pid": process.pid,
                "cmdline": command,
                "ports": component.ports(settings),
                "started_at": _now(),
                "proc_start": _proc_start_ticks(process.pid),
            },
            indent=2,
        )
        + "\n",
    )
    began = time.monotonic()
    deadline = began + component.start_timeout
    try:
        component.wait_ready(settings, deadline, lambda: process.poll() is None)
        component.after_start(settings, deadline)
    except Exception as exc:
        # Give a crashing process a moment to flush its last words to the log.
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=0.5)
        tail = _log_tail(log_file, log_offset)
        raise ComponentFailed(
            f"{name} failed to start: {_one_line(exc)}"
            + (f"; log {log_file}: {tail}" if tail else f"; see {log_file}")
        ) from None
    return _status_of(component, settings, process.pid, f"started in {time.monotonic() - began:.1f}s")


def _status_of(component: Component, settings: Settings, pid: int, note: str) -> ComponentStatus:
    notes = "; ".join(n for n in (note, component.note) if n)
    return ComponentStatus(component.name, "running", pid, component.endpoints(settings), notes)


def _describe(component: Component, result: ComponentStatus) -> str:
    """One line for ``up``: what happened, the pid, the endpoints, the standing note."""
    how = result.note.removesuffix(component.note).rstrip("; ")
    where = " ".join(f"{key}={value}" for key, value in result.endpoints.items())
    line = f"{result.name}: {how} (pid {result.pid}) {where}".rstrip()
    return f"{line} [{component.note}]" if component.note else line


# Popen objects of processes started by this interpreter, so ``down`` in the same
# process reaps them instead of leaving zombies behind.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


def _abs(path: Path) -> Path:
    return Path(os.path.abspath(path))


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _pid_file(settings: Settings, component: Component) -> Path:
    return _abs(settings.home) / "run" / f"{component.name}.json"


def _log_file(settings: Settings, component: Component) -> Path:
    return _abs(settings.home) / "logs" / f"{component.name}.log"


@contextlib.contextmanager
def _lock(settings: Settings) -> Iterator[None]:
    """Serialise ``up`` and ``down`` on one state directory."""
    run_dir = _abs(settings.home) / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / ".lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _find_binary(binary: str, component: str) -> str:
    scripts = Path(sysconfig.get_path("scripts"))
    candidate = scripts / binary
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which(binary)
    if found:
        return found
    raise BinaryMissing(
        f"cannot start {component}: `{binary}` is neither in {scripts} nor on PATH "
        "(install rekey with its dependencies: pip install -e .)"
    )


def _port_free(port: int) -> bool:
    """True if a server could listen on 127.0.0.1:port right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Like the servers themselves: TIME_WAIT leftovers must not count as "in use".
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


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
        return f"frontend not ready: {_one_line(exc) or exc.__class__.__name__}"
    return None


# ---- pid files and processes


def _read_record(pid_file: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(pid_file.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable: treated as stale
    return record if isinstance(record, dict) else {}


def _proc_cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [part.decode(errors="replace") for part in raw.split(b"\0")[:-1]]


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (index 0 is the state)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rfind(")") + 2 :].split()


def _proc_start_ticks(pid: int) -> int | None:
    fields = _proc_stat(pid)
    return int(fields[19]) if fields and len(fields) > 19 else None


def _pid_alive(pid: int) -> bool:
    """The process exists and is not a zombie (reaping it if it is our child)."""
    if pid <= 0:
        return False
    child = _CHILDREN.get(pid)
    if child is not None and child.poll() is not None:
        del _CHILDREN[pid]
        return False
    if not Path("/proc").is_dir():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    fields = _proc_stat(pid)
    return fields is not None and bool(fields) and fields[0] not in ("Z", "X")


def _cmdline_matches(actual: list[str], expected: list[str]) -> bool:
    """``actual`` runs ``expected``, allowing for an interpreter or exec'd binary in front.

    Python console scripts show up as ``python3 <script> args`` and ``bao`` execs its
    bundled binary, so compare the arguments exactly and the program by base name.
    """
    if not expected or not actual:
        return False
    args = expected[1:]
    if len(actual) < len(args) + 1 or actual[len(actual) - len(args) :] != args:
        return False
    program = os.path.basename(expected[0])
    head = actual[: len(actual) - len(args)]
    return any(os.path.basename(part) == program for part in head)


def _record_is_live(record: dict[str, Any]) -> bool:
    """The pid file names a live process that is still the one we started."""
    pid = record.get("pid")
    cmdline = record.get("cmdline")
    if not isinstance(pid, int) or not isinstance(cmdline, list) or not _pid_alive(pid):
        return False
    if not Path("/proc").is_dir():
        return True
    actual = _proc_cmdline(pid)
    if actual is None or not _cmdline_matches(actual, [str(part) for part in cmdline]):
        return False
    expected_start = record.get("proc_start")
    return expected_start is None or expected_start == _proc_start_ticks(pid)


def _terminate(pid: int) -> bool:
    """SIGTERM the process group of ``pid``, SIGKILL after a timeout. True if killed."""

    def send(sig: signal.Signals) -> None:
        try:
            if os.getpgid(pid) == pid:
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)
        except ProcessLookupError:
            pass

    def wait(timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while _pid_alive(pid):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True

    send(signal.SIGTERM)
    if wait(STOP_TIMEOUT):
        return False
    send(signal.SIGKILL)
    wait(5.0)
    return True


# ---- files


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _write_secret_json(path: Path, data: dict[str, str]) -> None:
    """Create ``path`` with mode 0600 from the first byte on; never overwrite."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    handle: IO[str]
    with os.fdopen(fd, "w") as handle:
        os.fchmod(handle.fileno(), 0o600)
        json.dump(data, handle)
        handle.write("\n")


def _read_init_file(path: Path, raft_dir: Path) -> tuple[str, str]:
    try:
        data = json.loads(path.read_text())
        return str(data["unseal_key"]), str(data["root_token"])
    except (OSError, ValueError, KeyError, TypeError):
        raise ComponentFailed(
            f"openbao storage in {raft_dir} is initialised but {path} is missing or "
            "unreadable, so it cannot be unsealed; restore the file or delete the storage "
            "directory to start afresh"
        ) from None


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] + ("..." if len(text) > 300 else "")


def _log_tail(log_file: Path, offset: int) -> str:
    """The last few non-empty lines written since ``offset``, joined into one line."""
    try:
        with log_file.open("rb") as handle:
            handle.seek(offset)
            text = handle.read()[-16384:].decode(errors="replace")
    except OSError:
        return ""
    lines = [_ANSI.sub("", line).strip() for line in text.splitlines()]
    lines = [line[:200] for line in lines if line][-LOG_TAIL_LINES:]
    return " | ".join(lines)
