"""The generation migration's acceptance test, end to end with real processes: OpenBao, the
Temporal dev server, a ``rekey worker`` process and, on each of four simulated hosts, a v1 and a
v2 ``rekey agent serve --register`` process.

v1 (svn 1) holds the blobs: half KMS-wrapped under an OpenBao Transit key (generation v1, the
key's release policy admitting v1 only), half hardware-sealed by the v1 agents under the
MRENCLAVE policy, spread over the hosts. ``rekey migrate start --wait`` moves them to a patched
v2 (new measurement, svn 2) and completes; then every blob reads back through a v2 agent (a
hardware-sealed one on its own host's, a KMS-wrapped one through the release gate), every blob
is refused by the v1 agents (after NARROWING the key releases nothing to v1, and a direct release
request with a v1 agent's token is refused at the gate), ``rekey audit verify`` passes over the
signed audit log and the log holds the generation diff.

The full size (5,000 blobs) takes a few minutes on two cores: it is marked ``soak`` and runs
with ``make acceptance``; a scaled-down copy with the same checks runs in ``make test``.
Plaintexts stay in memory: never logged, never in a file, never in the workflow's history."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from emulators.servers import OpenBao
from kms_adapters.errors import PolicyDenied
from rekey.agent_auth import AgentClient, read_token
from rekey.agent_sealer import AgentSealer
from rekey.backends import adapter_for, release_token_signer, sim_verifiers, witness_for
from rekey.client import connect
from rekey.client.release_policies import agent_release_token
from rekey.config import Settings, load_settings
from rekey.ratls_transport import server_expectation
from sealing import envelope
from sealing.kms_migration import attested_token
from sealing.migration import manifest_of
from sealing.state import EnclaveRefused, SealedState
from sealing.store import SealedStateStore
from sealing.tee.sim import ROOT_CA_CERT_FILE, host_id_of
from tests.fixtures.cli import MANIFEST, run_cli

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]

HOSTS = ("h1", "h2", "h3", "h4")
STARTUP_S = 120.0
"""How long a process may take to start on a loaded machine (agents, the worker)."""


@dataclass
class AgentProcess:
    generation: str
    host: str
    process: subprocess.Popen[bytes]
    log: Path
    state_dir: Path
    url: str = ""


class Stack:
    """A home (its rekey.toml names OpenBao and the Temporal dev server), two generations, an
    agent of each on every host (registered, tokens in ``<home>/agent/<agent id>``, the hosts'
    root CAs under ``<home>/hosts``: where a real worker looks for them) and a worker process."""

    def __init__(self, root: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.root, self.home, self.capsys = root, root / "home", capsys
        tag = uuid.uuid4().hex[:8]
        self.v1, self.v2 = f"acc{tag}-v1", f"acc{tag}-v2"
        self.key_ref = f"vault:acc-{tag}"
        self.agents: dict[tuple[str, str], AgentProcess] = {}
        self.host_ids: dict[str, str] = {}
        self.worker: subprocess.Popen[bytes] | None = None
        self.store: SealedStateStore

    def cli(self, *args: str) -> tuple[int, str, str]:
        return run_cli(self.capsys, "--home", str(self.home), *args)

    def cli_process(self, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
        """``rekey`` as a separate process, as an operator runs it."""
        return subprocess.run(
            [sys.executable, "-m", "rekey.cli", "--home", str(self.home), *args],
            env=_clean_environ(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    @property
    def settings(self) -> Settings:
        return load_settings(self.home, environ={})

    def start_agent(self, manifest: Path, generation: str, host: str) -> AgentProcess:
        agent_id = f"{generation}.{host}"
        log = self.root / f"agent-{agent_id}.log"
        state_dir = self.home / "agent" / agent_id
        with log.open("wb") as sink:  # a file, not a pipe: thousands of request lines
            command = [sys.executable, "-m", "rekey.cli", "--home", str(self.home), "agent", "serve"]
            command += ["--manifest", str(manifest), "--platform", "sim", "--port", "0"]
            command += ["--host-dir", str(self.home / "hosts" / host), "--state-dir", str(state_dir)]
            command += ["--agent-id", agent_id, "--register", "--refresh-every", "1"]
            process = subprocess.Popen(
                command,
                env=_clean_environ(),
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        agent = AgentProcess(generation, host, process, log, state_dir)
        self.agents[(host, generation)] = agent
        return agent

    def wait_registered(self, agent: AgentProcess) -> None:
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            text = agent.log.read_text(errors="replace")
            if "registered as agent " in text:
                agent.url = text.split(" listening on ", 1)[1].split()[0]
                return
            if agent.process.poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError(
            f"agent {agent.generation} on {agent.host} did not start:\n{agent.log.read_text()}"
        )

    def sealer(self, host: str, generation: str) -> AgentSealer:
        """The client API's view of an agent (as ``rekey state get --agent`` builds it): signed
        requests with its default caller's token, release tokens made for it on demand."""
        agent = self.agents[(host, generation)]
        record = self.store.get_agent(f"{generation}.{host}")
        expect = server_expectation(
            manifest_of(self.store, generation),
            [(self.home / "hosts" / host / ROOT_CA_CERT_FILE).read_bytes()],
        )
        assert record.generation == generation
        client = AgentClient(agent.url, read_token(agent.state_dir), expect=expect)
        return AgentSealer.connect(client, agent_release_token(self.settings, self.store))

    def stop(self) -> None:
        processes = [a.process for a in self.agents.values()]
        if self.worker is not None:
            processes.append(self.worker)
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def _clean_environ() -> dict[str, str]:
    """The test's environment without REKEY_* variables: the processes read the home's rekey.toml."""
    return {k: v for k, v in os.environ.items() if not k.startswith("REKEY_")}


@pytest.fixture
def stack(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], openbao: OpenBao, temporal_env: WorkflowEnvironment
) -> Iterator[Stack]:
    stack = Stack(tmp_path, capsys)
    stack.home.mkdir(mode=0o700)
    target = temporal_env.client.service_client.config.target_host
    (stack.home / "rekey.toml").write_text(
        f'vault_addr = "{openbao.addr}"\nvault_token = "{openbao.token}"\ntemporal_address = "{target}"\n'
    )
    manifests = {}
    for generation, measurement, svn in ((stack.v1, "11" * 32, 1), (stack.v2, "33" * 32, 2)):
        path = tmp_path / f"{generation}.yaml"
        path.write_text(yaml.safe_dump(MANIFEST | {"id": generation, "measurement": measurement, "svn": svn}))
        manifests[generation] = path
    code, _, stderr = stack.cli("generation", "register", str(manifests[stack.v1]))
    assert code == 0, stderr
    code, _, stderr = stack.cli("generation", "register", str(manifests[stack.v2]), "--supersedes", stack.v1)
    assert code == 0, stderr
    stack.store = SealedStateStore(stack.settings.store_url)
    try:
        started = [stack.start_agent(manifests[g], g, h) for h in HOSTS for g in (stack.v1, stack.v2)]
        for agent in started:
            stack.wait_registered(agent)
        for host in HOSTS:
            stack.host_ids[host] = host_id_of((stack.home / "hosts" / host / ROOT_CA_CERT_FILE).read_bytes())
        yield stack
    finally:
        stack.stop()
        stack.store.close()


def _parallel(fn: Callable[[Any], Any], items: list[Any], workers: int = 8) -> list[Any]:
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, items))


async def _acceptance(
    stack: Stack, temporal_env: WorkflowEnvironment, per_host: int, migration_timeout: float
) -> None:
    """``per_host`` blobs per host: half hardware-sealed on that host, half KMS-wrapped. The
    migration must end within ``migration_timeout`` seconds (a generous deadline, not a
    measurement: a stuck migration fails the test instead of holding the suite)."""
    tee_per_host, kms_total = per_host // 2, (per_host - per_host // 2) * len(HOSTS)
    timings: dict[str, float] = {}
    settings = stack.settings
    store = stack.store
    adapter = adapter_for(settings, stack.key_ref)
    adapter.create()
    code, _, stderr = stack.cli("key", "release-policy", "set", stack.key_ref, "--generation", stack.v1)
    assert code == 0, stderr
    # What the CLI's state put/get use: the KMS adapters and the freshness witness.
    state = SealedState(store, lambda ref: adapter_for(settings, ref), witness_for(settings))

    # Seeding: KMS-wrapped blobs through the sealing API, hardware-sealed ones through each
    # host's v1 agent (/v1/seal), both with parallel callers.
    secret_of: dict[str, bytes] = {}
    host_of: dict[str, str] = {}  # tee blob -> its host
    started = time.monotonic()

    def put_kms(i: int) -> None:
        name = f"kms-{i:05d}"
        secret_of[name] = secrets.token_bytes(48)
        state.put(
            namespace="app", name=name, data=secret_of[name], key_ref=stack.key_ref, generation=stack.v1
        )

    _parallel(put_kms, list(range(kms_total)))
    timings["seed kms"] = time.monotonic() - started
    started = time.monotonic()
    v1_sealers = {host: stack.sealer(host, stack.v1) for host in HOSTS}

    def put_tee(item: tuple[str, int]) -> None:
        host, i = item
        name = f"tee-{host}-{i:05d}"
        secret_of[name], host_of[name] = secrets.token_bytes(48), host
        state.put_sealed(
            namespace="app", name=name, data=secret_of[name], policy="mrenclave", sealer=v1_sealers[host]
        )

    _parallel(put_tee, [(host, i) for i in range(tee_per_host) for host in HOSTS])
    timings["seed tee"] = time.monotonic() - started
    assert store.count_by_generation() == {stack.v1: len(secret_of)}

    # The worker: a real `rekey worker` process on the home (task queue rekey).
    worker_log = stack.root / "worker.log"
    with worker_log.open("wb") as sink:
        stack.worker = subprocess.Popen(
            [sys.executable, "-m", "rekey.cli", "--home", str(stack.home), "worker"],
            env=_clean_environ(),
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + STARTUP_S
    while "rekey worker on task queue" not in worker_log.read_text(errors="replace"):
        assert stack.worker.poll() is None and time.monotonic() < deadline, worker_log.read_text()
        await asyncio.sleep(0.2)
    started = time.monotonic()
    migrate = await asyncio.to_thread(
        stack.cli_process,
        "migrate", "start", "--from", stack.v1, "--to", stack.v2,
        "--waves", "25,50,100", "--grace", "0s", "--jitter", "0s", "--wait", "--json",
        timeout=migration_timeout,
    )  # fmt: skip
    timings["migration"] = time.monotonic() - started
    assert migrate.returncode == 0, f"{migrate.stdout}\n{migrate.stderr}\n{worker_log.read_text()}"
    result = json.loads(migrate.stdout)
    migration_id = f"migrate:{stack.v1}:{stack.v2}"
    assert result["id"] == migration_id and result["started"] is True
    assert result["phase"] == "DONE", result
    tee_total = tee_per_host * len(HOSTS)
    assert (result["moved"], result["remaining"], result["total"]) == (tee_total, 0, tee_total), result
    assert (result["kms_moved"], result["kms_remaining"]) == (kms_total, 0), result
    assert store.count_by_generation() == {stack.v2: len(secret_of)}
    assert store.count_copies(migration_id) == 0
    code, out, stderr = stack.cli("key", "release-policy", "show", stack.key_ref, "--json")
    assert code == 0, stderr
    assert json.loads(out)["generations"] == [stack.v2]

    # Every blob reads back through a v2 agent: a hardware-sealed one on its own host's, a
    # KMS-wrapped one through the release gate (spread over the v2 agents).
    started = time.monotonic()
    v2_sealers = {host: stack.sealer(host, stack.v2) for host in HOSTS}
    names = sorted(secret_of)

    def read_v2(item: tuple[int, str]) -> str | None:
        i, name = item
        record = store.get_by_name("app", name)
        if record.generation != stack.v2:
            return f"{name}: generation {record.generation}"
        if name in host_of and record.host != stack.host_ids[host_of[name]]:
            return f"{name}: moved off its host"
        sealer = v2_sealers[host_of.get(name, HOSTS[i % len(HOSTS)])]
        if state.get(namespace="app", name=name, sealer=sealer) != secret_of[name]:
            return f"{name}: differs"
        return None

    problems = [p for p in _parallel(read_v2, list(enumerate(names))) if p is not None]
    assert problems == [], problems[:10]
    timings["read back v2"] = time.monotonic() - started

    # Every blob is refused by the v1 agents: a hardware-sealed one by its host's v1 agent (the
    # blob is v2's now), a KMS-wrapped one by a v1 agent (spread over the hosts), which opens only
    # blobs bound to its own generation (GenerationMismatch); that the key's gate itself releases
    # nothing to v1 after NARROWING is the direct release request below.
    started = time.monotonic()

    def read_v1(item: tuple[int, str]) -> str | None:
        i, name = item
        sealer = v1_refusing[host_of.get(name, HOSTS[i % len(HOSTS)])]
        try:
            state.get(namespace="app", name=name, sealer=sealer)
        except EnclaveRefused as exc:
            if name.startswith("kms-") and not (
                "GenerationMismatch" in str(exc) or "release denied" in str(exc)
            ):
                return f"{name}: refused, but not for its generation: {exc}"
            return None
        return f"{name}: v1 read it"

    v1_refusing = {host: stack.sealer(host, stack.v1) for host in HOSTS}
    problems = [p for p in _parallel(read_v1, list(enumerate(names))) if p is not None]
    assert problems == [], problems[:10]
    timings["v1 refused"] = time.monotonic() - started

    # A release request straight to the gate with a v1 agent's attested token is refused; the
    # same request with a v2 agent's token is granted (so the refusal is the policy's).
    wrapped = envelope.parse(store.get_by_name("app", "kms-00000").blob).wrapped_dek
    for generation, allowed in ((stack.v1, False), (stack.v2, True)):
        sealer = stack.sealer(HOSTS[0], generation)
        attested: list[bytes] = []

        def attest(nonce: bytes, sealer: AgentSealer = sealer, attested: list[bytes] = attested) -> Any:
            evidence, public_key = sealer.attest(nonce)
            attested.append(public_key)
            return evidence, public_key

        token = attested_token(
            attest,
            sim_verifiers(settings)(sealer.host_id),
            release_token_signer(settings),
            manifest_of(store, generation),
        )
        if allowed:
            assert adapter.release(wrapped, token, attested[0])
        else:
            with pytest.raises(PolicyDenied, match="allowlist"):
                adapter.release(wrapped, token, attested[0])

    # The signed audit log verifies and holds the generation diff.
    verify = await asyncio.to_thread(stack.cli_process, "audit", "verify", timeout=300)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    exported = await asyncio.to_thread(stack.cli_process, "audit", "export", "--json", timeout=300)
    assert exported.returncode == 0, exported.stderr
    records = json.loads(exported.stdout)
    diffs = [r for r in records if r["event"] == "migration.diff"]
    assert diffs, sorted({r["event"] for r in records})
    diff = diffs[-1]["details"]["diff"]
    assert (diff["old"], diff["new"]) == (stack.v1, stack.v2) and diff["measurement_changed"], diff
    events = {r["event"] for r in records}
    assert {"migration.started", "migration.wave", "migration.narrowed", "migration.done"} <= events

    # No plaintext in the workflow's history (a sample: every form of 200 secrets).
    client: Client = await connect(settings)
    history = (await client.get_workflow_handle(migration_id).fetch_history()).to_json()
    for name in names[:: max(1, len(names) // 200)]:
        secret = secret_of[name]
        for form in (base64.b64encode(secret).decode(), secret.hex()):
            assert form not in history, name
    print(
        f"{len(secret_of)} blobs on {len(HOSTS)} hosts:",
        ", ".join(f"{step} {seconds:.1f}s" for step, seconds in timings.items()),
    )


async def test_acceptance_scaled_down(stack: Stack, temporal_env: WorkflowEnvironment) -> None:
    """The acceptance test at 4 hosts x 100 blobs (400): the same checks, in ``make test``."""
    await _acceptance(stack, temporal_env, per_host=100, migration_timeout=300)


@pytest.mark.soak
async def test_acceptance_5000_blobs(stack: Stack, temporal_env: WorkflowEnvironment) -> None:
    """The issue's acceptance test at full size: 4 hosts x 1,250 blobs (``make acceptance``)."""
    await _acceptance(stack, temporal_env, per_host=1250, migration_timeout=1200)
