"""`rekey dev up | down | status` against the real servers, on private ports and home.

One stack is shared by the module (cold start of OpenBao with raft takes several
seconds); the port-conflict and nothing-running tests use homes of their own.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import socket
import ssl
import stat
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import boto3
import httpx
import hvac
import pytest
from azure.keyvault.keys import KeyClient
from botocore.config import Config
from botocore.exceptions import ClientError
from temporalio.api.workflowservice.v1 import DescribeNamespaceRequest
from temporalio.client import Client, WorkflowExecutionDescription, WorkflowExecutionStatus

from emulators.azure_keyvault import DEFAULT_LIMITS, SustainedLoad
from kms_adapters.azure_hsm import StaticTokenCredential
from rekey import devstack
from rekey.backends import adapter_for
from rekey.config import Settings, load_settings
from sealing.errors import UnknownKey
from sealing.state import SealedState
from sealing.store import SealedStateStore
from tests.fixtures.cli import run_cli
from tests.fixtures.ports import free_port

pytestmark = pytest.mark.integration

NAMES = ["temporal", "openbao", "moto", "azure", "codec", "worker"]
T = TypeVar("T")


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _private_settings(home: Path) -> Settings:
    """Settings with distinct free ports (and OpenBao's cluster port free as well)."""
    taken: set[int] = set()

    def pick(pair: bool = False) -> int:
        while True:
            port = free_port()
            wanted = {port, port + 1} if pair else {port}
            if not wanted & taken and all(_port_free(p) for p in wanted) and port < 65535:
                taken.update(wanted)
                return port

    env = {
        "REKEY_TEMPORAL_PORT": str(pick()),
        "REKEY_TEMPORAL_UI_PORT": str(pick()),
        "REKEY_OPENBAO_PORT": str(pick(pair=True)),
        "REKEY_MOTO_PORT": str(pick(pair=True)),  # moto_port + 1: moto behind the aws-kms throttle
        "REKEY_AZURE_PORT": str(pick()),
        "REKEY_CODEC_PORT": str(pick()),
    }
    return load_settings(home, environ=env)


def _all_ports(settings: Settings) -> list[int]:
    return [
        settings.temporal_port,
        settings.temporal_ui_port,
        settings.openbao_port,
        settings.openbao_port + 1,
        settings.moto_port,
        settings.azure_port,
        settings.codec_port,
    ]


def _pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _pid_files(settings: Settings) -> dict[str, dict[str, object]]:
    run = settings.home / "run"
    return {name: json.loads((run / f"{name}.json").read_text()) for name in NAMES}


def _processes_running(args: list[str]) -> list[int]:
    """Pids of live processes whose command line ends with ``args``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parts = (entry / "cmdline").read_bytes().split(b"\0")[:-1]
        except OSError:
            continue
        cmdline = [part.decode(errors="replace") for part in parts]
        if cmdline[-len(args) :] == args and _pid_alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def _run_temporal(settings: Settings, use: Callable[[Client], Awaitable[T]]) -> T:
    async def main() -> T:
        client = await Client.connect(settings.temporal_address)
        return await use(client)

    return asyncio.run(main())


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    settings = _private_settings(tmp_path_factory.mktemp("devstack") / "home")
    try:
        devstack.up(settings, echo=lambda _line: None)
        yield settings
    finally:
        devstack.down(settings, echo=lambda _line: None)


def test_up_brings_everything_up(stack: Settings) -> None:
    by_name = {s.name: s for s in devstack.status(stack)}
    assert list(by_name) == NAMES
    for name in NAMES:
        assert by_name[name].state == "running", by_name[name]
        assert isinstance(by_name[name].pid, int)
        assert by_name[name].to_dict()["state"] == "running"
    temporal = by_name["temporal"].endpoints
    assert temporal["grpc"] == f"127.0.0.1:{stack.temporal_port}"
    assert temporal["ui"] == f"http://127.0.0.1:{stack.temporal_ui_port}"
    assert by_name["openbao"].endpoints["api"] == stack.vault_addr
    assert by_name["moto"].endpoints["kms"] == stack.aws_endpoint
    assert "memory" in by_name["moto"].note

    # Temporal: UI answers, and the frontend serves the namespace.
    assert httpx.get(temporal["ui"], timeout=10).status_code == 200
    namespace = _run_temporal(
        stack,
        lambda c: c.workflow_service.describe_namespace(DescribeNamespaceRequest(namespace="default")),
    )
    assert namespace.namespace_info.name == "default"

    # OpenBao: unsealed, root token from init.json authenticates, transit mounted.
    client = devstack.openbao_client(stack)
    assert client.is_authenticated()
    assert not client.sys.is_sealed()
    mounts = client.sys.list_mounted_secrets_engines()
    mounts = mounts.get("data", mounts)
    assert mounts[f"{stack.transit_mount}/"]["type"] == "transit"

    # moto: KMS works.
    kms = boto3.client(
        "kms",
        endpoint_url=stack.aws_endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        aws_session_token="testing",
    )
    key = kms.create_key(Description="devstack test")["KeyMetadata"]
    assert key["KeyId"]
    assert kms.describe_key(KeyId=key["KeyId"])["KeyMetadata"]["Enabled"]

    # Azure emulator: the real SDK creates a key through the 401 challenge.
    azure = by_name["azure"].endpoints
    assert azure["vault"] == stack.azure_vault_url
    keys = KeyClient(
        azure["vault"],
        StaticTokenCredential(),
        verify_challenge_resource=False,
        connection_verify=azure["ca_file"],
        retry_total=0,
    )
    assert keys.create_oct_key("devstack-check", size=256, hardware_protected=True).name == "devstack-check"


def test_second_up_starts_no_second_copy(stack: Settings) -> None:
    before = _pid_files(stack)
    lines: list[str] = []
    result = devstack.up(stack, echo=lines.append)
    assert _pid_files(stack) == before
    assert {s.name: s.pid for s in result} == {n: before[n]["pid"] for n in NAMES}
    assert all("already running" in s.note for s in result)
    assert len(lines) == len(NAMES) and all("already running" in line for line in lines)
    for name in NAMES:
        cmdline = before[name]["cmdline"]
        assert isinstance(cmdline, list)
        assert _processes_running(cmdline[1:]) == [before[name]["pid"]], name


def test_init_file_is_private(stack: Settings) -> None:
    mode = stat.S_IMODE(os.stat(stack.openbao_init_file).st_mode)
    assert mode == 0o600
    data = json.loads(stack.openbao_init_file.read_text())
    assert set(data) == {"unseal_key", "root_token"}


def test_codec_server_requires_its_token(stack: Settings) -> None:
    """The stack's codec server decodes only for holders of <home>/codec/server-token (0600)."""
    codec = {s.name: s for s in devstack.status(stack)}["codec"].endpoints
    token_file = Path(codec["token_file"])
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    body = b'{"payloads": []}'
    anonymous = httpx.post(f"{codec['codec']}/decode", content=body, timeout=10)
    assert anonymous.status_code == 401
    wrong = httpx.post(
        f"{codec['codec']}/decode", content=body, headers={"Authorization": "Bearer " + "x" * 43}, timeout=10
    )
    assert wrong.status_code == 401
    authorized = httpx.post(
        f"{codec['codec']}/decode",
        content=body,
        headers={"Authorization": f"Bearer {token_file.read_text().strip()}"},
        timeout=10,
    )
    assert authorized.status_code == 200, authorized.text


def _env_of(settings: Settings) -> dict[str, str]:
    return {
        "REKEY_TEMPORAL_PORT": str(settings.temporal_port),
        "REKEY_TEMPORAL_UI_PORT": str(settings.temporal_ui_port),
        "REKEY_OPENBAO_PORT": str(settings.openbao_port),
        "REKEY_MOTO_PORT": str(settings.moto_port),
        "REKEY_AZURE_PORT": str(settings.azure_port),
        "REKEY_CODEC_PORT": str(settings.codec_port),
    }


def _azure_stats(settings: Settings) -> dict[str, object]:
    verify = ssl.create_default_context(cafile=settings.azure_ca_file)
    response = httpx.get(f"{settings.azure_vault_url}/_emulator/stats", verify=verify, timeout=10)
    stats: dict[str, object] = response.json()
    return stats


def test_throttle_profiles_apply_live_and_are_kept(
    stack: Settings, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    quiet = lambda _line: None  # noqa: E731
    client = devstack.openbao_client(stack)
    mount = stack.transit_mount
    client.secrets.transit.create_key("throttle-check", mount_point=mount)
    plaintext = base64.b64encode(b"x").decode()

    def hammer(times: int = 40) -> None:
        for _ in range(times):
            client.secrets.transit.encrypt_data("throttle-check", plaintext=plaintext, mount_point=mount)

    try:
        rows = {
            r.name: r
            for r in devstack.up(stack, echo=quiet, throttle=devstack.ThrottleChoice("vault-quota", 5))
        }
        assert rows["openbao"].throttle == {"profile": "vault-quota", "rate": 5.0, "default_rate": False}
        assert "throttle profile vault-quota 5 req/s" in rows["openbao"].note
        assert [n for n, r in rows.items() if r.throttle] == ["openbao"] and "throttle" not in rows
        with pytest.raises(hvac.exceptions.RateLimitExceeded):  # the root token is throttled too
            hammer()

        # Kept by a later `dev up`, shown by `dev status --json`.
        devstack.up(stack, echo=quiet)
        assert devstack.read_choice(stack) == devstack.ThrottleChoice("vault-quota", 5)
        for name, value in _env_of(stack).items():
            monkeypatch.setenv(name, value)
        code, out, err = run_cli(capsys, "--home", str(stack.home), "dev", "status", "--json")
        assert code == 0, err
        shown = {row["name"]: row for row in json.loads(out)}
        assert shown["openbao"]["throttle"]["profile"] == "vault-quota" and shown["azure"]["throttle"] is None
        code, out, _ = run_cli(capsys, "--home", str(stack.home), "dev", "status")
        assert code == 0 and "Throttle profile: vault-quota 5 req/s" in out

        # Switched live to the Azure emulator's sustained profile: the quota goes.
        rows = {
            r.name: r
            for r in devstack.up(
                stack, echo=quiet, throttle=devstack.ThrottleChoice("managed-hsm-sustained", 50)
            )
        }
        assert (
            rows["azure"].throttle is not None
            and rows["azure"].throttle["profile"] == "managed-hsm-sustained"
        )
        stats = _azure_stats(stack)
        assert stats["sustained"] == SustainedLoad().to_dict() and stats["retry_after"] is False
        classes = stats["classes"]
        assert isinstance(classes, dict) and classes["wrap"]["limit"] == 50.0
        hammer()

        # aws-kms would move a running moto behind the proxy: refused, nothing changed.
        with pytest.raises(devstack.DevStackError, match="rekey dev down"):
            devstack.up(stack, echo=quiet, throttle=devstack.ThrottleChoice("aws-kms"))
        assert devstack.read_choice(stack).profile == "managed-hsm-sustained"
    finally:
        devstack.up(stack, echo=quiet, throttle=devstack.ThrottleChoice())
    stats = _azure_stats(stack)
    assert stats["sustained"] is None and stats["retry_after"] is True
    classes = stats["classes"]
    assert isinstance(classes, dict) and classes["wrap"]["limit"] == DEFAULT_LIMITS["wrap"]
    assert all(s.throttle is None for s in devstack.status(stack))


def test_aws_kms_profile_puts_the_proxy_on_the_aws_endpoint(tmp_path: Path) -> None:
    settings = _private_settings(tmp_path / "home")
    parts = [c for c in devstack.COMPONENTS if c.name in ("moto", "throttle")]
    quiet = lambda _line: None  # noqa: E731
    try:
        rows = {
            r.name: r
            for r in devstack.up(
                settings, echo=quiet, components=parts, throttle=devstack.ThrottleChoice("aws-kms", 5)
            )
        }
        assert rows["throttle"].endpoints["kms"] == settings.aws_endpoint
        assert rows["moto"].endpoints["kms"] == f"http://127.0.0.1:{settings.moto_port + 1}"
        assert rows["throttle"].throttle == {"profile": "aws-kms", "rate": 5.0, "default_rate": False}
        kms = boto3.client(
            "kms",
            endpoint_url=settings.aws_endpoint,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            config=Config(retries={"total_max_attempts": 1}),
        )
        key_id = kms.create_key()["KeyMetadata"]["KeyId"]  # not a crypto operation: unmetered
        with pytest.raises(ClientError) as err:
            for _ in range(40):
                kms.encrypt(KeyId=key_id, Plaintext=b"dek")
        assert err.value.response["Error"]["Code"] == "ThrottlingException"

        # A new rate restarts the (stateless) proxy only: moto and its keys stay.
        again = {
            r.name: r
            for r in devstack.up(
                settings, echo=quiet, components=parts, throttle=devstack.ThrottleChoice("aws-kms", 1000)
            )
        }
        assert again["moto"].pid == rows["moto"].pid and again["throttle"].pid != rows["throttle"].pid
        assert again["throttle"].endpoints["rate"] == "1000/s"
        assert kms.describe_key(KeyId=key_id)["KeyMetadata"]["Enabled"]
        for _ in range(20):
            kms.encrypt(KeyId=key_id, Plaintext=b"dek")
    finally:
        devstack.down(settings, echo=quiet, components=parts)
    assert all(_port_free(port) for port in (settings.moto_port, settings.moto_port + 1))


@pytest.mark.parametrize(
    "args",
    [
        ["--throttle-profile", "bogus"],
        ["--throttle-profile", "aws-kms", "--throttle-rate", "0"],
        ["--throttle-profile", "aws-kms", "--throttle-rate", "nan"],
        ["--throttle-profile", "vault-quota", "--throttle-rate", "fast"],
        ["--throttle-rate", "5"],
        ["--throttle-profile", "none", "--throttle-rate", "5"],
    ],
)
def test_dev_up_refuses_a_bad_throttle_profile(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str]
) -> None:
    code, _, err = run_cli(capsys, "--home", str(tmp_path / "home"), "dev", "up", *args)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "home" / "run").exists()  # nothing was started


def test_state_survives_down_and_up(stack: Settings) -> None:
    client = devstack.openbao_client(stack)
    mount = stack.transit_mount
    client.secrets.transit.create_key("persist-check", mount_point=mount)
    plaintext = base64.b64encode(b"sealed state survives restarts").decode()
    ciphertext = client.secrets.transit.encrypt_data("persist-check", plaintext=plaintext, mount_point=mount)[
        "data"
    ]["ciphertext"]

    async def start(c: Client) -> str:
        handle = await c.start_workflow(
            "NoSuchWorkflow", id="persist-check", task_queue="rekey-devstack-test-nobody-polls"
        )
        return handle.result_run_id or ""

    run_id = _run_temporal(stack, start)
    # A sealed blob in the store, its DEK wrapped by a Transit key of this OpenBao.
    with SealedStateStore(stack.store_url) as store:
        store.put_generation("gen-persist", '{"id":"gen-persist"}')
        adapter_for(stack, "vault:persist-blob").create()
        SealedState(store, lambda ref: adapter_for(stack, ref)).put(
            namespace="ns",
            name="kept",
            data=b"blob survives restarts",
            key_ref="vault:persist-blob",
            generation="gen-persist",
        )
    # An AWS KMS key (moto) and blob sealed under it: what the README says does not survive.
    with SealedStateStore(stack.store_url) as store:
        adapter_for(stack, "aws:persist-blob").create()
        SealedState(store, lambda ref: adapter_for(stack, ref)).put(
            namespace="ns",
            name="aws-sealed",
            data=b"lost with moto",
            key_ref="aws:persist-blob",
            generation="gen-persist",
        )
    old_pids = {s.name: s.pid for s in devstack.status(stack)}

    lines: list[str] = []
    stopped = devstack.down(stack, echo=lines.append)
    assert [s.name for s in stopped] == NAMES
    assert all(s.state == "stopped" and "stopped" in s.note for s in stopped)
    # `down` says what it lost, for moto only.
    lost = [line for line in lines if "no longer open" in line]
    assert len(lost) == 1 and lost[0].startswith("moto: stopped") and "AWS KMS keys are gone" in lost[0], (
        lines
    )
    for name, pid in old_pids.items():
        assert pid is not None and not _pid_alive(pid), name
    assert all(_port_free(port) for port in _all_ports(stack))
    assert not list((stack.home / "run").glob("*.json"))
    assert all(s.state == "stopped" for s in devstack.status(stack))

    restarted = devstack.up(stack, echo=lambda _line: None)
    assert all(s.state == "running" and "started" in s.note for s in restarted)

    client = devstack.openbao_client(stack)
    decrypted = client.secrets.transit.decrypt_data(
        "persist-check", ciphertext=ciphertext, mount_point=mount
    )["data"]["plaintext"]
    assert decrypted == plaintext

    async def describe(c: Client) -> WorkflowExecutionDescription:
        return await c.get_workflow_handle("persist-check").describe()

    description = _run_temporal(stack, describe)
    assert description.run_id == run_id
    assert description.status == WorkflowExecutionStatus.RUNNING

    with SealedStateStore(stack.store_url) as store:
        state = SealedState(store, lambda ref: adapter_for(stack, ref))
        reopened = state.get(namespace="ns", name="kept")
        assert reopened == b"blob survives restarts"
        # As documented: the AWS key is gone with moto, and the blob sealed under it with it.
        with pytest.raises(UnknownKey):
            adapter_for(stack, "aws:persist-blob").describe()
        with pytest.raises(UnknownKey):
            state.get(namespace="ns", name="aws-sealed")


def test_port_in_use_stops_what_this_call_started(tmp_path: Path) -> None:
    settings = _private_settings(tmp_path / "home")
    lines: list[str] = []
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as blocker:
        blocker.bind(("127.0.0.1", settings.openbao_port))
        blocker.listen()
        try:
            with pytest.raises(devstack.PortInUse) as excinfo:
                devstack.up(settings, echo=lines.append)
        finally:
            devstack.down(settings, echo=lambda _line: None)
    message = str(excinfo.value)
    assert f"127.0.0.1:{settings.openbao_port}" in message
    assert "openbao" in message and "REKEY_OPENBAO_PORT" in message
    assert "\n" not in message
    assert excinfo.value.exit_code == 1

    # Temporal was started by that call and has been stopped again.
    assert len(lines) == 1 and lines[0].startswith("temporal: started")
    match = re.search(r"\(pid (\d+)\)", lines[0])
    assert match
    assert not _pid_alive(int(match.group(1)))
    assert not list((settings.home / "run").glob("*.json"))
    assert _port_free(settings.temporal_port) and _port_free(settings.temporal_ui_port)
    assert all(s.state == "stopped" for s in devstack.status(settings))


def test_down_when_nothing_runs(tmp_path: Path) -> None:
    settings = _private_settings(tmp_path / "home")
    lines: list[str] = []
    result = devstack.down(settings, echo=lines.append)
    assert [s.name for s in result] == NAMES
    assert all(s.state == "stopped" and s.note == "not running" for s in result)
    assert lines == [f"{name}: not running" for name in reversed(NAMES)]

    # A pid file naming a live process that is not ours (pid reuse) is not signalled.
    run = settings.home / "run"
    (run / "moto.json").write_text(
        json.dumps({"pid": os.getpid(), "cmdline": ["moto_server", "-H", "127.0.0.1"]})
    )
    result = devstack.down(settings, echo=lambda _line: None)
    assert {s.name: s.note for s in result}["moto"] == "not running (removed stale pid file)"
    assert not (run / "moto.json").exists()


class _Doomed(devstack.Component):
    """A stand-in that prints to its log and then exits, or never becomes ready."""

    name = "doomed"
    binary = "python"
    port_fields = ("moto_port",)
    start_timeout = 1.5

    def __init__(self, script: str) -> None:
        self.script = script

    def command(self, settings: Settings) -> list[str]:
        return [sys.executable, "-c", self.script]

    def probe(self, settings: Settings) -> str | None:
        return "never ready"

    def endpoints(self, settings: Settings) -> dict[str, str]:
        return {}


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        ("print('line one'); print('boom: bad config'); raise SystemExit(3)", "exited"),
        ("import time; print('waiting forever', flush=True); time.sleep(60)", "not ready"),
    ],
)
def test_component_failure_reports_log_and_cleans_up(tmp_path: Path, script: str, expected: str) -> None:
    settings = _private_settings(tmp_path / "home")
    component = _Doomed(script)
    with pytest.raises(devstack.ComponentFailed) as excinfo:
        devstack.up(settings, echo=lambda _line: None, components=[component])
    message = str(excinfo.value)
    assert message.startswith("doomed failed to start:") and expected in message
    assert ("boom: bad config" if "boom" in script else "waiting forever") in message
    assert "\n" not in message
    assert not (settings.home / "run" / "doomed.json").exists()
    assert _processes_running(["-c", script]) == []
