"""The fleet registry of the sealed-state store: which enclave agents run where.

One row of ``agents`` per agent id (``rekey agent serve --register``): the host it runs on (the
platform's host id, e.g. `sealing.tee.sim.SimHost.host_id`), its generation, its endpoint, the
SHA-256 fingerprint of its handoff public key (as its identity and evidence carry it), when it
started and when it was last seen. A running agent refreshes ``last_seen`` every
``refresh_seconds``; a row not refreshed for `STALE_AFTER_REFRESHES` intervals lists as stale,
and a clean stop marks it stopped.

**Who may take a row over.** An agent id is bound to the host and generation that first
registered it:

* the same agent starting again (same id, same host, same generation: a restart, or a second
  process started by mistake) takes the row over: the row gets the new process's endpoint,
  fingerprint, start time and a new ``incarnation``; the earlier process's next refresh finds a
  newer incarnation and stops refreshing (`AgentSuperseded`). Registration is a compare-and-swap
  on the incarnation read, so of two racing starts one wins and the other takes over after it;
* another host (or another generation) claiming a registered id is refused (`AgentConflict`,
  naming both), whatever the row's state: a stale row is not up for grabs, because a host that
  is down for a while must find its id when it comes back. `remove_agent` frees an id;
* a row put back by a restore of the store (or edited by hand) cannot take over a running agent
  either: a refresh that finds another incarnation with an *earlier* start time on its own host
  (an older registration of the same agent) re-asserts the running process's row; one that
  finds another host's row raises `AgentConflict` and leaves it; a missing row (removed, or
  restored from before the registration) is registered again. A restored row of an agent that
  no longer runs keeps its old ``last_seen`` and so lists as stale.

**Ids and twins.** An id of the default form ``<generation>@<host id>`` (any id with an ``@``) is
only taken by an agent of that generation on that host (`AgentConflict` otherwise): host ids are
public, and another host registering it first would keep the real agent out. There is one agent
per generation and host: registering a second id for a (generation, host) pair while another id's
row for it is live raises `AgentConflict` (a stale or stopped row does not count). Both checks
are of `register_agent`; they keep honest agents and mistakes apart, not a store writer, who can
insert any row.

**Clock.** ``started_at`` and ``last_seen`` are the database's clock (`AgentRegistry.clock`),
not the writer's, and ``agent list`` compares against the same clock. A ``last_seen`` more than
one refresh interval ahead of it lists as stale (no refresh writes one), and a row whose start is
that far ahead is not a newer start of the agent: a refresh that finds one re-asserts its own row.
(``now`` arguments override the clock, for tests.)

**A row is a hint, never trusted.** Whoever can write the store can write any row with any
endpoint and fingerprint (agent ids, host ids and generations are public). A row says where an
agent may be; it is trusted only once the agent at that endpoint attests with a fresh nonce and
its evidence gives the host id, generation and handoff key (the migration's attesting step),
and callers bind their requests to the endpoint they mean (`rekey.agent_auth`).
"""

from __future__ import annotations

import re
import secrets
from datetime import UTC, datetime, timedelta
from typing import Any, Final
from urllib.parse import urlsplit

from sqlalchemy import Row, delete, func, insert, select, update

from sealing.names import check_agent_id, check_generation_id, check_host_id
from sealing.store.base import StoreBase
from sealing.store.errors import AgentConflict, AgentSuperseded, DuplicateRecord, RecordNotFound
from sealing.store.records import AgentRecord
from sealing.store.schema import agents

__all__ = ["MAX_ENDPOINT_CHARS", "MAX_REFRESH_SECONDS", "AgentRegistry", "check_endpoint"]

MAX_ENDPOINT_CHARS: Final = 200
MAX_REFRESH_SECONDS: Final = 3600
_FINGERPRINT: Final = re.compile(r"[0-9a-f]{64}")
_HOSTNAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,252}")
_ATTEMPTS: Final = 5


def check_endpoint(value: object) -> str:
    """``value`` if it is an agent endpoint the registry keeps: ``http(s)://HOST:PORT`` with a
    plain host name or IPv4 address and an explicit port, nothing else (no user, path, query or
    fragment), at most `MAX_ENDPOINT_CHARS` characters; else ValueError."""
    rule = "an agent endpoint must be http://HOST:PORT or https://HOST:PORT"
    if not isinstance(value, str) or not value.isascii() or not 0 < len(value) <= MAX_ENDPOINT_CHARS:
        raise ValueError(rule)
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        raise ValueError(rule) from None
    if (
        parts.scheme not in ("http", "https")
        or port is None
        or not 1 <= port <= 65535
        or parts.username is not None
        or parts.password is not None
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
        or parts.hostname is None
        or not _HOSTNAME.fullmatch(parts.hostname)
        or value != f"{parts.scheme}://{parts.netloc}{parts.path}"
        or any(c.isspace() for c in value)
    ):
        raise ValueError(rule)
    return value.rstrip("/")


def _check_fingerprint(value: object) -> str:
    if not isinstance(value, str) or not _FINGERPRINT.fullmatch(value):
        raise ValueError("a handoff key fingerprint is 64 lower-case hex digits (SHA-256)")
    return value


def _check_refresh(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_REFRESH_SECONDS:
        raise ValueError(f"refresh_seconds must be an integer in 1..{MAX_REFRESH_SECONDS}, got {value!r}")
    return value


def _given(now: datetime) -> datetime:
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return now


def _slack(record: AgentRecord) -> timedelta:
    """How far ahead of the database clock a start or a last_seen may be (one refresh
    interval: a concurrent writer's clock read and commit); further ahead is not believed."""
    return timedelta(seconds=record.refresh_seconds)


def _record(row: Row[Any]) -> AgentRecord:
    m = row._mapping
    return AgentRecord(
        agent_id=str(m["agent_id"]),
        host_id=str(m["host_id"]),
        generation=str(m["generation"]),
        endpoint=str(m["endpoint"]),
        handoff_key_sha256=str(m["handoff_key_sha256"]),
        incarnation=str(m["incarnation"]),
        state=str(m["state"]),
        refresh_seconds=int(m["refresh_seconds"]),
        registered_at=m["registered_at"],
        started_at=m["started_at"],
        last_seen=m["last_seen"],
    )


def _conflict(existing: AgentRecord, host_id: str, generation: str) -> AgentConflict:
    return AgentConflict(
        f"agent id {existing.agent_id} is registered for generation {existing.generation} on host"
        f" {existing.host_id}, not for generation {generation} on host {host_id}; it is left as it"
        f" is (give this agent another id, or remove that registration once its agent is gone:"
        f" rekey agent remove {existing.agent_id})"
    )


class AgentRegistry(StoreBase):
    """The enclave agents of a store (mixed into `SealedStateStore`); see the module for who
    may take a registration over."""

    def clock(self) -> datetime:
        """The database's current time (UTC): what the registry writes and compares against,
        so that no writer's or reader's own clock decides whether a row is live."""
        with self.transaction("read of the database clock") as conn:
            if conn.dialect.name == "sqlite":
                value = conn.execute(select(func.strftime("%Y-%m-%d %H:%M:%f", "now"))).scalar_one()
                return datetime.fromisoformat(str(value)).replace(tzinfo=UTC)
            value = conn.execute(select(func.clock_timestamp())).scalar_one()
        if not isinstance(value, datetime) or value.tzinfo is None:
            raise TypeError("the database clock did not answer with an aware timestamp")
        return value.astimezone(UTC)

    def _now(self, now: datetime | None) -> datetime:
        return self.clock() if now is None else _given(now)

    def _read_agent(self, agent_id: str, what: str) -> AgentRecord | None:
        with self.transaction(what) as conn:
            row = conn.execute(select(agents).where(agents.c.agent_id == agent_id)).first()
        return None if row is None else _record(row)

    def register_agent(
        self,
        *,
        agent_id: str,
        host_id: str,
        generation: str,
        endpoint: str,
        handoff_key_sha256: str,
        refresh_seconds: int = 10,
        now: datetime | None = None,
    ) -> AgentRecord:
        """Record a starting agent as live, with a fresh incarnation, and return its row.

        A new id is inserted; the same agent registering again (same host and generation) takes
        its row over; another host or generation gets `AgentConflict` and nothing changes.
        ValueError (`InvalidName` for ids) for a field outside the rules."""
        check_agent_id(agent_id)
        check_host_id(host_id)
        check_generation_id(generation)
        endpoint = check_endpoint(endpoint)
        _check_fingerprint(handoff_key_sha256)
        _check_refresh(refresh_seconds)
        started = self._now(now)
        incarnation = secrets.token_hex(16)
        values = {
            "host_id": host_id,
            "generation": generation,
            "endpoint": endpoint,
            "handoff_key_sha256": handoff_key_sha256,
            "incarnation": incarnation,
            "state": "live",
            "refresh_seconds": refresh_seconds,
            "started_at": started,
            "last_seen": started,
        }
        what = f"registration of agent {agent_id}"
        for _attempt in range(_ATTEMPTS):
            existing = self._read_agent(agent_id, what)
            if existing is not None and (existing.host_id, existing.generation) != (host_id, generation):
                raise _conflict(existing, host_id, generation)
            if "@" in agent_id and agent_id != f"{generation}@{host_id}":
                raise AgentConflict(
                    f"agent id {agent_id} has the form <generation>@<host id> but is not this agent's"
                    f" ({generation}@{host_id}): only an agent of that generation on that host takes it"
                )
            self._refuse_twin(agent_id, host_id, generation, started)
            if existing is None:
                try:
                    with self.transaction(what, write=True) as conn:
                        conn.execute(
                            insert(agents).values(agent_id=agent_id, registered_at=started, **values)
                        )
                except DuplicateRecord:
                    continue  # a concurrent registration inserted it first: compare with it
                return self.get_agent(agent_id)
            if self._swap(agent_id, existing.incarnation, values, what):
                return self.get_agent(agent_id)
        raise AgentSuperseded(f"{what} kept losing to concurrent registrations of the same id")

    def _refuse_twin(self, agent_id: str, host_id: str, generation: str, now: datetime) -> None:
        """`AgentConflict` if another id has a live row for the same generation and host (one
        agent per generation and host; a stale or stopped one does not count)."""
        for other in self.list_agents(generation=generation, host_id=host_id):
            if other.agent_id != agent_id and other.status(now) == "live":
                raise AgentConflict(
                    f"agent {other.agent_id} of generation {generation} on host {host_id} is live"
                    "; one agent per generation and host: stop it, or"
                    f" remove its registration once it is gone (rekey agent remove {other.agent_id})"
                )

    def _swap(
        self,
        agent_id: str,
        incarnation: str,
        values: dict[str, Any],
        what: str,
        owner: AgentRecord | None = None,
    ) -> bool:
        """Update the row if it still holds ``incarnation`` (and, with ``owner``, that owner's
        host and generation)."""
        query = update(agents).where(agents.c.agent_id == agent_id, agents.c.incarnation == incarnation)
        if owner is not None:
            query = query.where(agents.c.host_id == owner.host_id, agents.c.generation == owner.generation)
        with self.transaction(what, write=True) as conn:
            result = conn.execute(query.values(**values))
        return bool(result.rowcount == 1)

    def refresh_agent(self, registration: AgentRecord, *, now: datetime | None = None) -> AgentRecord:
        """Move ``last_seen`` of the agent's row to ``now`` (and its state to live), if the row is
        still this registration's (its incarnation). Otherwise (see the module): a missing row
        or an older registration of the same agent on the same host is replaced by this one; a
        newer start of the same agent raises `AgentSuperseded`; another host's or generation's
        row raises `AgentConflict`; neither is changed."""
        agent_id = check_agent_id(registration.agent_id)
        seen = self._now(now)
        what = f"refresh of agent {agent_id}"
        for _attempt in range(_ATTEMPTS):
            fresh = {"last_seen": seen, "state": "live"}
            if self._swap(agent_id, registration.incarnation, fresh, what, registration):
                return self.get_agent(agent_id)
            existing = self._read_agent(agent_id, what)
            values = {
                "host_id": registration.host_id,
                "generation": registration.generation,
                "endpoint": registration.endpoint,
                "handoff_key_sha256": registration.handoff_key_sha256,
                "incarnation": registration.incarnation,
                "state": "live",
                "refresh_seconds": registration.refresh_seconds,
                "started_at": registration.started_at,
                "last_seen": seen,
            }
            if existing is None:
                try:
                    with self.transaction(what, write=True) as conn:
                        conn.execute(
                            insert(agents).values(
                                agent_id=agent_id, registered_at=registration.registered_at, **values
                            )
                        )
                except DuplicateRecord:
                    continue
                return self.get_agent(agent_id)
            if (existing.host_id, existing.generation) != (registration.host_id, registration.generation):
                raise _conflict(existing, registration.host_id, registration.generation)
            if existing.incarnation == registration.incarnation:
                continue  # our own row after all (the swap raced a re-assertion)
            if registration.started_at < existing.started_at <= seen + _slack(registration):
                raise AgentSuperseded(
                    f"agent {agent_id} was registered again by a process started at"
                    f" {existing.started_at.isoformat()} (endpoint {existing.endpoint}); this one"
                    f" (started {registration.started_at.isoformat()}) no longer refreshes it"
                )
            if self._swap(agent_id, existing.incarnation, values, what):
                return self.get_agent(agent_id)
        raise AgentSuperseded(f"{what} kept losing to concurrent registrations of the same id")

    def stop_agent(self, registration: AgentRecord, *, now: datetime | None = None) -> bool:
        """Mark the agent's row stopped, if it is still this registration's; whether it was."""
        agent_id = check_agent_id(registration.agent_id)
        return self._swap(
            agent_id,
            registration.incarnation,
            {"state": "stopped", "last_seen": self._now(now)},
            f"stop of agent {agent_id}",
            registration,
        )

    def get_agent(self, agent_id: str) -> AgentRecord:
        """The registered agent with this id, or `RecordNotFound`."""
        check_agent_id(agent_id)
        found = self._read_agent(agent_id, f"read of agent {agent_id}")
        if found is None:
            raise RecordNotFound(f"no agent {agent_id} is registered")
        return found

    def list_agents(self, *, generation: str | None = None, host_id: str | None = None) -> list[AgentRecord]:
        """Every registered agent (of ``generation``, on ``host_id``, if given), by generation,
        host and agent id."""
        query = select(agents).order_by(agents.c.generation, agents.c.host_id, agents.c.agent_id)
        if generation is not None:
            query = query.where(agents.c.generation == check_generation_id(generation))
        if host_id is not None:
            query = query.where(agents.c.host_id == check_host_id(host_id))
        with self.transaction("listing of agents") as conn:
            rows = conn.execute(query).all()
        return [_record(row) for row in rows]

    def remove_agent(self, agent_id: str) -> None:
        """Forget the agent's registration (`RecordNotFound` if there is none). An agent that is
        still running registers itself again at its next refresh."""
        check_agent_id(agent_id)
        with self.transaction(f"removal of agent {agent_id}", write=True) as conn:
            result = conn.execute(delete(agents).where(agents.c.agent_id == agent_id))
        if result.rowcount == 0:
            raise RecordNotFound(f"no agent {agent_id} is registered")
