"""An agent whose attested TLS certificate is not the one expected (another build at the
registered endpoint, an impostor) is a refusal in the migration activities, not an outage: the
hand-off fails for good naming the host (the workflow rolls back or pauses), where an
unreachable old agent holds the migration until it is back."""

from __future__ import annotations

from pathlib import Path

from temporalio.testing import ActivityEnvironment

from activities.migration_types import (
    NEW_AGENT_FAILED,
    OLD_AGENT_UNREACHABLE,
    AgentNonce,
    AttestInput,
    HandoffInput,
)
from sealing.agent import EnclaveAgent
from sealing.migration import AgentDown, AgentRefused, AgentUntrusted
from sealing.state import SealedState
from sealing.store import SealedStateStore
from sealing.witness import DirectoryWitness
from tests.unit.test_migration_handoff import (
    MIGRATION,
    Host,
    LocalPort,
    activities_over,
    digest,
    failure_of,
    fill,
)
from tests.unit.test_migration_handoff import state as state  # the fixture

URL = "https://127.0.0.1:9"
UNTRUSTED = (
    f"the agent at {URL} is not the attested agent expected: attested TLS handshake failed:"
    " PolicyDenied: measurement 55 is not the expected 33"
)


class _UntrustedPort(LocalPort):
    """A port whose every call meets a certificate of another build (while ``untrusted``)."""

    def __init__(self, agent: EnclaveAgent) -> None:
        super().__init__(agent)
        self.untrusted = True

    def _check(self, name: str) -> None:
        if self.untrusted:
            self.calls.append(name)
            raise AgentUntrusted(UNTRUSTED)
        super()._check(name)


def _request(host: Host) -> HandoffInput:
    return HandoffInput(
        MIGRATION, "app-v1", "app-v2", host.host_id, host.records["v1"].agent_id, host.records["v2"].agent_id
    )


def test_an_untrusted_agent_is_a_refusal_not_an_outage() -> None:
    assert issubclass(AgentUntrusted, AgentRefused) and not issubclass(AgentUntrusted, AgentDown)


def test_an_untrusted_old_agent_fails_the_hand_off_for_good_naming_its_host(
    tmp_path: Path, store: SealedStateStore, state: SealedState, witness: DirectoryWitness
) -> None:
    host = Host(tmp_path / "host", store)
    fill(state, host, 3)
    before = digest(store)
    old, new = _UntrustedPort(host.v1), LocalPort(host.v2)
    activities = activities_over(store, host, {"app-v1": old, "app-v2": new}, witness)
    failure = failure_of(activities.handoff, _request(host))
    assert (failure.type, failure.non_retryable, failure.details) == ("HandoffRefused", True, (host.host_id,))
    assert failure.type != OLD_AGENT_UNREACHABLE and "unreachable" not in failure.message
    assert host.host_id in failure.message and UNTRUSTED in failure.message
    assert "\n" not in failure.message
    assert digest(store) == before and new.calls == []

    old.untrusted, old.down = False, True  # the same old agent, down instead: held, not failed
    failure = failure_of(activities.handoff, _request(host))
    assert (failure.type, failure.details) == (OLD_AGENT_UNREACHABLE, (host.host_id,))


def test_an_untrusted_new_agent_is_a_new_agent_failure_and_changes_nothing(
    tmp_path: Path, store: SealedStateStore, state: SealedState, witness: DirectoryWitness
) -> None:
    host = Host(tmp_path / "host", store)
    fill(state, host, 3)
    before = digest(store)
    old, new = LocalPort(host.v1), _UntrustedPort(host.v2)
    activities = activities_over(store, host, {"app-v1": old, "app-v2": new}, witness)
    failure = failure_of(activities.handoff, _request(host))
    assert (failure.type, failure.non_retryable, failure.details) == (NEW_AGENT_FAILED, True, (host.host_id,))
    assert UNTRUSTED in failure.message
    assert digest(store) == before and "export" not in old.calls


def test_attesting_an_untrusted_new_agent_reports_it_as_a_reason(
    tmp_path: Path, store: SealedStateStore, state: SealedState, witness: DirectoryWitness
) -> None:
    """ATTESTING: an untrusted new agent is a reason the migration refuses to start, with its id."""
    host = Host(tmp_path / "host", store)
    ports = {"app-v1": LocalPort(host.v1), "app-v2": _UntrustedPort(host.v2)}
    activities = activities_over(store, host, ports, witness)
    agent_id = host.records["v2"].agent_id
    request = AttestInput("app-v1", "app-v2", [AgentNonce(agent_id, "00" * 32)])
    result = ActivityEnvironment().run(activities.attest, request)
    assert result.reasons == [f"{agent_id}: {UNTRUSTED}"] and result.attested == 0
