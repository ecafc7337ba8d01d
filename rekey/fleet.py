"""An agent's membership of the fleet registry (``rekey agent serve --register``): register the
running agent in the store, refresh its ``last_seen`` from a background thread, mark it stopped at
a clean stop. The rules of who may take a registration over are `sealing.store.agents`'."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Final

from sealing.agent import EnclaveAgent
from sealing.generation import ManifestError
from sealing.names import check_agent_id
from sealing.state import UnknownGeneration
from sealing.store import (
    AgentConflict,
    AgentRecord,
    AgentSuperseded,
    RecordNotFound,
    SealedStateStore,
    StoreError,
)

__all__ = ["DEFAULT_REFRESH_SECONDS", "FleetMembership", "NoHostId", "default_agent_id"]

DEFAULT_REFRESH_SECONDS: Final = 10


class NoHostId(StoreError):
    """The agent's platform gives no host id, so it cannot be registered."""

    exit_code = 2


def default_agent_id(generation: str, host_id: str) -> str:
    """``<generation id>@<host id>``: one agent per generation and host."""
    return check_agent_id(f"{generation}@{host_id}")


class FleetMembership:
    """Registers ``agent`` (reachable at ``endpoint``) in ``store`` and keeps it refreshed.

    ``report`` receives one line when a refresh fails (the store is down: retried at the next
    interval) or when the registration is no longer this process's (`AgentSuperseded`,
    `AgentConflict`: refreshing stops). The store is used from the refresh thread and the caller's
    thread; `SealedStateStore` is thread-safe."""

    def __init__(
        self,
        store: SealedStateStore,
        agent: EnclaveAgent,
        *,
        endpoint: str,
        agent_id: str | None = None,
        refresh_seconds: int = DEFAULT_REFRESH_SECONDS,
        report: Callable[[str], None] = lambda _line: None,
    ) -> None:
        host_id = agent.host_id
        if host_id is None:
            raise NoHostId(f"platform {agent.manifest.platform} gives no host id; the agent cannot register")
        self._store = store
        self._agent = agent
        self._endpoint = endpoint
        self._host_id = host_id
        self._agent_id = check_agent_id(agent_id) if agent_id is not None else None
        self._refresh_seconds = refresh_seconds
        self._report = report
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._registration: AgentRecord | None = None

    @property
    def registration(self) -> AgentRecord | None:
        return self._registration

    @property
    def store(self) -> SealedStateStore:
        return self._store

    def _check_generation(self) -> None:
        manifest = self._agent.manifest
        try:
            document = self._store.get_generation(manifest.id)
        except RecordNotFound:
            raise UnknownGeneration(
                f"generation {manifest.id!r} is not registered (rekey generation register MANIFEST);"
                " an agent registers only for a registered generation"
            ) from None
        if document != manifest.canonical_json():
            raise ManifestError(
                f"generation {manifest.id} is registered with another manifest than the one this agent"
                " runs; the agent is not registered"
            )

    def start(self) -> AgentRecord:
        """Register (refused with nothing changed if the generation is not registered with this
        agent's manifest, or the id belongs to another host or generation) and start refreshing."""
        self._check_generation()
        manifest = self._agent.manifest
        agent_id = self._agent_id or default_agent_id(manifest.id, self._host_id)
        self._registration = self._store.register_agent(
            agent_id=agent_id,
            host_id=self._host_id,
            generation=manifest.id,
            endpoint=self._endpoint,
            handoff_key_sha256=self._agent.identity()["handoff_key_sha256"],
            refresh_seconds=self._refresh_seconds,
        )
        self._thread = threading.Thread(target=self._refresh_loop, name="rekey-agent-refresh", daemon=True)
        self._thread.start()
        return self._registration

    def refresh(self) -> bool:
        """Refresh once; False once the registration is no longer this process's."""
        registration = self._registration
        if registration is None:
            return False
        try:
            self._registration = self._store.refresh_agent(registration)
        except (AgentSuperseded, AgentConflict) as exc:
            self._report(f"{exc}; no longer refreshing the registration")
            self._registration = None
            return False
        except StoreError as exc:
            self._report(f"refresh of agent {registration.agent_id} failed (retried): {exc}")
        return True

    def _refresh_loop(self) -> None:
        while not self._stop.wait(self._refresh_seconds):
            if not self.refresh():
                return

    def stop(self) -> None:
        """Stop refreshing and mark the registration stopped (if it is still this process's)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        registration, self._registration = self._registration, None
        if registration is not None:
            try:
                self._store.stop_agent(registration)
            except StoreError as exc:
                self._report(f"agent {registration.agent_id} not marked stopped: {exc}")
