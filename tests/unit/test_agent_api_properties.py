"""Every agent endpoint answers a hostile JSON body with a 4xx error, never a 500.

Hypothesis draws request bodies for each route of `rekey.agent_server.AgentApi` from the fields
the API reads, with values of every JSON type and some that are almost right (real base64 of a
sealed blob, evidence, a nonce this agent issued); the error each raises must map to 400, 403 or
422 in `error_answer`, the function the HTTP handler answers with. A 500 means an input the API did
not check.
"""

from __future__ import annotations

import base64
from http import HTTPStatus
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attestation.sim import SimVerifier
from rekey.agent_server import AgentApi, error_answer
from sealing.agent import EnclaveAgent
from sealing.generation import parse_manifest
from sealing.tee.sim import EnclaveIdentity, SimHost
from tests.fixtures.cli import MANIFEST

FIELDS = {
    "/v1/identity": [],
    "/v1/nonce": [],
    "/v1/import-nonce": [],
    "/v1/attest": ["nonce"],
    "/v1/seal": ["policy", "namespace", "name", "data", "blob_id", "version"],
    "/v1/unseal": ["blob"],
    "/v1/check": ["blob", "token"],
    "/v1/open": ["blob", "token"],
    "/v1/rebind": ["blobs", "from_generation", "token"],
    "/v1/export": ["peer_evidence", "peer_public_key", "nonce", "import_nonce", "blobs"],
    "/v1/import": ["package"],
}
"""The fields each route reads (a test below checks that these are all the routes)."""
CALLER = "workload"


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> tuple[AgentApi, list[str]]:
    host = SimHost.load_or_create(Path(tmp_path_factory.mktemp("host")) / "sim-host")
    manifest = parse_manifest(MANIFEST)
    agent = EnclaveAgent(
        manifest, host.enclave(EnclaveIdentity.from_manifest(manifest)), SimVerifier(host.root_ca_pem())
    )
    api = AgentApi(agent)
    nonce = api.routes[("POST", "/v1/nonce")]({}, CALLER)["nonce"]
    attested = api.attest({"nonce": nonce}, CALLER)
    blob = api.seal({"name": "item", "data": base64.b64encode(b"x").decode()}, CALLER)["blob"]
    almost = [
        nonce,
        attested["evidence"],
        attested["public_key"],
        blob,
        blob[:-4],
        "AAAA",
    ]  # valid base64, each: the hostile values come from `_json`
    return api, almost


def _json(almost: list[str]) -> st.SearchStrategy[Any]:
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**80), 2**80),
        st.floats(allow_nan=False),
        st.text(max_size=30),
        st.sampled_from(
            [*almost, "mrenclave", "mrsigner", "default", "", "=", "not base64!", "../x", "a\nb", "x" * 300]
        ),
    )
    return scalars | st.recursive(
        scalars,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)
        ),
        max_leaves=8,
    )


@settings(
    max_examples=500, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
)
@given(data=st.data())
def test_every_route_answers_hostile_bodies_with_a_client_error(
    api: tuple[AgentApi, list[str]], data: st.DataObject
) -> None:
    routes, almost = api
    route = data.draw(st.sampled_from(sorted(routes.routes)), label="route")
    # Every field almost right but one (hostile, or missing): the check of each field is
    # reached whatever the order the route reads them in.
    fields = FIELDS[route[1]]
    body: dict[str, Any] = {field: data.draw(st.sampled_from(almost)) for field in fields}
    if "blobs" in body:
        body["blobs"] = data.draw(st.lists(st.sampled_from(almost), max_size=3))
    target = data.draw(st.sampled_from([*fields, "other"]), label="hostile field")
    if data.draw(st.booleans()):
        body.pop(target, None)
    elif target == "other":
        body = data.draw(_json(almost))  # not even an object
        body = body if isinstance(body, dict) else {"value": body}
    else:
        body[target] = data.draw(_json(almost))
    data.draw(st.just(body), label="body")
    try:
        routes.routes[route](body, CALLER)
    except Exception as exc:  # what the handler turns into an answer
        status, answer = error_answer(exc)
        assert status != HTTPStatus.INTERNAL_SERVER_ERROR, f"{route} {body!r}: {type(exc).__name__}: {exc}"
        assert "\n" not in answer["message"] or status == HTTPStatus.FORBIDDEN


def test_the_fields_cover_every_route(api: tuple[AgentApi, list[str]]) -> None:
    assert sorted(path for _, path in api[0].routes) == sorted(FIELDS)
