"""A fleet of real ``rekey agent serve --register`` processes for the migration fault tests: sim
hosts under one root, a v1 and a v2 agent (and more) on each, each agent killable and
restartable on its host; the store digest the refusal tests compare; migrations started with
a batch size and waited on by condition."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import yaml
from sqlalchemy import MetaData, create_engine, select
from temporalio.client import Client, WorkflowHandle

from attestation.platform import PlatformVerifier
from attestation.ratls import RatlsVerifier
from attestation.sim import SimVerifier
from rekey.agent_sealer import AgentSealer
from rekey.cli import main
from sealing.store import AgentRecord
from sealing.tee.sim import ROOT_CA_CERT_FILE, host_id_of
from tests.fixtures.agent import Agent, expectations, start_agents, stop_agents
from tests.fixtures.cli import MANIFEST
from workflows.migration import MigrateGenerationWorkflow, MigrateInput, MigrationProgress, migration_id

T = TypeVar("T")
WAIT = 180.0  # generous: a loaded 2-core machine


def manifests(prefix: str) -> dict[str, dict[str, Any]]:
    """v1 and v2 of one workload, under ids unique to a test (migration ids are per server)."""
    v1 = MANIFEST | {"id": f"{prefix}-v1", "svn": 2}
    return {"v1": v1, "v2": v1 | {"id": f"{prefix}-v2", "measurement": "33" * 32, "svn": 3}}


def register_generations(root: Path, generations: dict[str, dict[str, Any]]) -> None:
    for manifest in generations.values():
        path = root / f"gen-{manifest['id']}.yaml"
        path.write_text(yaml.safe_dump(manifest))
        try:
            main(["--home", str(root / "home"), "generation", "register", str(path)])
        except SystemExit as exc:
            assert not exc.code, f"generation register {manifest['id']} exited {exc.code}"


class Fleet:
    """Agents by (host, name); ``host`` "host" keeps its tokens in ``<home>/agent/<generation>``,
    where a ``rekey worker`` of that home looks for them."""

    def __init__(self, root: Path, generations: dict[str, dict[str, Any]], refresh_every: int = 1) -> None:
        self.root = root
        self.generations = generations
        self.extra = ["--register", "--refresh-every", str(refresh_every)]
        self.agents: dict[tuple[str, str], Agent] = {}
        self.host_ids: dict[str, str] = {}

    def start(self, host: str, *names: str) -> None:
        started = start_agents(
            self.root, {n: self.generations[n] for n in names}, Agent, self.extra, host=host
        )
        for name, agent in started.items():
            assert agent.process.stdout is not None
            line = agent.process.stdout.readline().strip()
            assert line.startswith("registered as agent "), line
            self.agents[(host, name)] = agent
        self.host_ids[host] = host_id_of((self.root / host / ROOT_CA_CERT_FILE).read_bytes())

    def kill(self, host: str, name: str) -> None:
        """SIGKILL: no clean stop, the registration stays live with a dead endpoint."""
        agent = self.agents.pop((host, name))
        agent.process.kill()
        agent.process.wait(timeout=30)

    def stop(self) -> None:
        stop_agents({f"{h}/{n}": a for (h, n), a in self.agents.items()})
        self.agents.clear()

    def sealer(self, host: str, name: str) -> AgentSealer:
        agent = self.agents[(host, name)]
        return AgentSealer.connect(agent.client())

    def host_of(self, host_id: str) -> str:
        return next(h for h, i in self.host_ids.items() if i == host_id)

    def state_dir(self, record: AgentRecord) -> Path:
        host = self.host_of(record.host_id)
        return self.root / "home" / ("agent" if host == "host" else f"agent-{host}") / record.generation

    def expect(self, record: AgentRecord) -> RatlsVerifier:
        """What a registered agent's certificate must show (its generation on its host)."""
        return expectations(self.root, self.generations.values())(record)

    def verifier(self, host_id: str) -> PlatformVerifier:
        return SimVerifier((self.root / self.host_of(host_id) / ROOT_CA_CERT_FILE).read_bytes())


def store_digest(url: str) -> str:
    """SHA-256 over every row of every table of the store at ``url``, tables and rows sorted."""
    engine = create_engine(url)
    try:
        metadata = MetaData()
        metadata.reflect(engine)
        with engine.connect() as conn:
            tables = {
                name: sorted(repr(tuple(row)) for row in conn.execute(select(table)))
                for name, table in sorted(metadata.tables.items())
            }
    finally:
        engine.dispose()
    return hashlib.sha256(json.dumps(tables, sort_keys=True).encode()).hexdigest()


async def start_migration(
    client: Client, generations: dict[str, dict[str, Any]], task_queue: str, to: str = "v2", **options: Any
) -> WorkflowHandle[Any, MigrationProgress]:
    old, new = generations["v1"]["id"], generations[to]["id"]
    return await client.start_workflow(
        MigrateGenerationWorkflow.run,
        MigrateInput(old, new, requested_at=datetime.now(UTC).isoformat(), **options),
        id=migration_id(old, new),
        task_queue=task_queue,
    )


async def progress(handle: WorkflowHandle[Any, MigrationProgress]) -> MigrationProgress:
    result: MigrationProgress = await handle.query(MigrateGenerationWorkflow.progress)
    return result


async def wait_for(
    check: Callable[[], Awaitable[T | None]], what: str, timeout: float = WAIT, every: float = 0.1
) -> T:
    """The first truthy answer of ``check``; fails naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(every)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")
