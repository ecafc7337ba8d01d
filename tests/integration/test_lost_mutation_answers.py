"""A KMS mutation whose answer is lost is never applied twice: a real OpenBao behind a fault
proxy that forwards the request and then hangs up on the client (or resets, or answers 500).

The ``rotate_key`` activity runs as Temporal runs it (``ActivityEnvironment``); the key's
versions are then read from OpenBao directly, not through the proxy."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

import hvac
import pytest
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.rotation import RotationActivities
from activities.types import ROTATED_ELSEWHERE, RetireInput, RotateToInput
from kms_adapters.errors import AnswerLost
from kms_adapters.governor import Governor
from kms_adapters.release import MemoryReleasePolicyStore
from kms_adapters.vault_transit import VaultTransitAdapter
from tests.fixtures.fault_proxy import Fault, FaultProxy
from tests.fixtures.openbao import OpenBao

pytestmark = pytest.mark.integration

ROTATE = r"/v1/transit/keys/{name}/rotate$"
CONFIG = r"/v1/transit/keys/{name}/config$"


def _adapter(client: hvac.Client, name: str) -> VaultTransitAdapter:
    return VaultTransitAdapter(
        client, name, release_store=MemoryReleasePolicyStore(), governor=Governor(f"g-{secrets.token_hex(4)}")
    )


def _key(openbao: OpenBao) -> VaultTransitAdapter:
    direct = _adapter(openbao.client(), f"lost-{secrets.token_hex(4)}")
    info, created = direct.create()
    assert created and info.primary_version == 1
    return direct


def _through(proxy: FaultProxy, openbao: OpenBao, name: str) -> VaultTransitAdapter:
    return _adapter(hvac.Client(url=proxy.url, token=openbao.token, timeout=10), name)


def _run(
    adapter: VaultTransitAdapter, fn: Callable[[RotationActivities], Any], request: Any
) -> tuple[Any, list[Any]]:
    beats: list[Any] = []
    env = ActivityEnvironment()
    env.on_heartbeat = lambda *details: beats.append(details)
    activities = RotationActivities(lambda _ref: adapter, None, lambda *_: None)  # type: ignore[arg-type]
    return env.run(fn(activities), request), beats


@pytest.mark.parametrize("action", ["drop", "reset", "error500"])
def test_a_lost_rotate_answer_leaves_exactly_one_new_version(
    openbao: OpenBao, fault_proxy: Callable[[str], FaultProxy], action: str
) -> None:
    direct = _key(openbao)
    proxy = fault_proxy(openbao.addr)
    lost = proxy.add(Fault("POST", ROTATE.format(name=direct.name), action))  # type: ignore[arg-type]
    through = _through(proxy, openbao, direct.name)

    state, beats = _run(
        through, lambda a: a.rotate_key, RotateToInput(direct.key_ref, target_version=2, expected_primary=1)
    )

    assert lost.hits == 1  # the answer to the first rotate was lost ...
    assert state.primary_version == 2
    assert [v.version for v in direct.describe().versions] == [1, 2]  # ... and it was not sent again
    assert proxy.count("POST", ROTATE.format(name=direct.name)) == 1
    assert beats  # it heartbeated between its KMS calls


def test_a_rotate_that_never_arrived_is_sent_again(
    openbao: OpenBao, fault_proxy: Callable[[str], FaultProxy]
) -> None:
    direct = _key(openbao)
    proxy = fault_proxy(openbao.addr)
    proxy.add(Fault("POST", ROTATE.format(name=direct.name), "drop", forward=False))
    through = _through(proxy, openbao, direct.name)

    state, _ = _run(
        through, lambda a: a.rotate_key, RotateToInput(direct.key_ref, target_version=2, expected_primary=1)
    )

    assert state.primary_version == 2
    assert [v.version for v in direct.describe().versions] == [1, 2]
    # Two rotates reached the proxy, one reached OpenBao: the describe showed the first had not applied.
    assert proxy.count("POST", ROTATE.format(name=direct.name), forwarded=False) == 2
    assert proxy.count("POST", ROTATE.format(name=direct.name)) == 1


def test_the_adapter_itself_raises_answer_lost_instead_of_resending(
    openbao: OpenBao, fault_proxy: Callable[[str], FaultProxy]
) -> None:
    direct = _key(openbao)
    proxy = fault_proxy(openbao.addr)
    proxy.add(Fault("POST", ROTATE.format(name=direct.name), "drop"))
    with pytest.raises(AnswerLost, match="may have been applied"):
        _through(proxy, openbao, direct.name).rotate()
    assert [v.version for v in direct.describe().versions] == [1, 2]


def test_a_key_rotated_elsewhere_is_refused_for_good(openbao: OpenBao) -> None:
    direct = _key(openbao)
    direct.rotate()
    direct.rotate()  # someone else made versions 2 and 3
    with pytest.raises(ApplicationError) as refused:
        _run(
            direct,
            lambda a: a.rotate_key,
            RotateToInput(direct.key_ref, target_version=2, expected_primary=1),
        )
    assert refused.value.non_retryable and refused.value.type == ROTATED_ELSEWHERE
    assert [v.version for v in direct.describe().versions] == [1, 2, 3]


def test_a_lost_disable_answer_is_resolved_by_reading_the_key_then_enable(
    openbao: OpenBao, fault_proxy: Callable[[str], FaultProxy]
) -> None:
    direct = _key(openbao)
    direct.rotate()
    proxy = fault_proxy(openbao.addr)
    lost = proxy.add(Fault("POST", CONFIG.format(name=direct.name), "drop"))
    through = _through(proxy, openbao, direct.name)

    disabled, _ = _run(through, lambda a: a.retire_versions, RetireInput(direct.key_ref, 2, "disable"))
    assert disabled == [1] and lost.hits == 1
    assert proxy.count("POST", CONFIG.format(name=direct.name)) == 1
    assert direct.describe().state_of(1) == "disabled"

    enabled, _ = _run(
        through, lambda a: a.retire_versions, RetireInput(direct.key_ref, 2, "enable", versions=[1])
    )
    assert enabled == [1] and direct.describe().state_of(1) == "enabled"
