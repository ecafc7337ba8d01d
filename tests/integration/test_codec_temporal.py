"""Payload encryption end to end: a real Temporal dev server never sees the secret.

A workflow and an activity carry a known secret in their inputs, results, an activity
failure (retried) and a workflow failure. The history is then fetched by a client
WITHOUT the codec and searched, raw and base64 (every alignment), for the secret; the
codec client reads the values fine, and so does the codec server over HTTP.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import stat
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
from temporalio import activity, workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    import httpx
    from google.protobuf import json_format
    from google.protobuf.message import Message
    from temporalio.api.common.v1 import Payload, Payloads
    from temporalio.api.history.v1 import History
    from temporalio.client import (
        Client,
        WorkflowFailureError,
        WorkflowHandle,
        WorkflowQueryFailedError,
        WorkflowUpdateFailedError,
    )
    from temporalio.common import RawValue
    from temporalio.exceptions import ApplicationError
    from temporalio.testing import WorkflowEnvironment
    from temporalio.worker import Worker

    from rekey.codec import ENCODING, CodecError, data_converter
    from rekey.codec_server import (
        CodecServer,
        read_server_token,
        serve_codec,
        server_token_path,
        write_server_token,
    )
    from rekey.devstack.temporal import search_attribute_flags, temporal_cli
    from rekey.worker import worker_client
    from tests.fixtures.ports import free_port

pytestmark = pytest.mark.integration

SECRET = "rekey-test-secret-DEK-7f3a9c21e4b8d6a0-never-in-history"
UI_ORIGIN = "http://127.0.0.1:8233"
OTHER_NAMESPACE = "codec-other"


@dataclass
class UnwrapInput:
    key_ref: str
    material: str
    fail: bool = False


@activity.defn
async def unwrap(inp: UnwrapInput) -> str:
    if activity.info().attempt == 1:
        # Recorded in history as the last failure of the next (successful) attempt.
        raise RuntimeError(f"transient unwrap error for {inp.material}")
    return f"unwrapped:{inp.material}"


@workflow.defn
class SecretWorkflow:
    @workflow.run
    async def run(self, inp: UnwrapInput) -> str:
        result = await workflow.execute_activity(
            unwrap,
            inp,
            start_to_close_timeout=timedelta(seconds=10),
            retry_policy=RetryPolicy(initial_interval=timedelta(milliseconds=100), maximum_attempts=3),
        )
        if inp.fail:
            raise ApplicationError(f"workflow failed holding {inp.material}", non_retryable=True)
        return result


@workflow.defn
class ApprovalWorkflow:
    """Waits for an approval (update or signal) naming what to unwrap, then unwraps it."""

    def __init__(self) -> None:
        self._approved: UnwrapInput | None = None

    @workflow.run
    async def run(self) -> str:
        await workflow.wait_condition(lambda: self._approved is not None)
        assert self._approved is not None
        return await workflow.execute_activity(
            unwrap,
            self._approved,
            start_to_close_timeout=timedelta(seconds=10),
            retry_policy=RetryPolicy(initial_interval=timedelta(milliseconds=100), maximum_attempts=3),
        )

    @workflow.update
    async def approve(self, inp: UnwrapInput) -> str:
        self._approved = inp
        return "approved"

    @workflow.signal
    def approve_signal(self, inp: UnwrapInput) -> None:
        self._approved = inp

    @workflow.query
    def approved_for(self, who: UnwrapInput) -> str:
        return "" if self._approved is None else f"{who.key_ref}:{self._approved.key_ref}"


def _needles(secret: bytes) -> list[bytes]:
    """The secret raw, and every base64 substring that encodes only secret bytes."""
    needles = [secret]
    for shift in range(3):
        encoded = base64.b64encode(b"\0" * shift + secret)
        start = 4 if shift else 0  # the first quantum mixes in the shift bytes
        needles.append(encoded[start:-4])  # the last quantum depends on what follows
        url = base64.urlsafe_b64encode(b"\0" * shift + secret)
        needles.append(url[start:-4])
    return needles


def _assert_no_secret(blob: bytes, what: str) -> None:
    for needle in _needles(SECRET.encode()):
        assert needle not in blob, f"secret ({needle!r}) found in {what}"


def _payloads_in(message: object) -> Iterator[Payload]:
    """Every Payload anywhere inside a protobuf message."""
    assert isinstance(message, Message)
    if isinstance(message, Payload):
        yield message
        return
    for descriptor, value in message.ListFields():
        if descriptor.message_type is None:
            continue
        if descriptor.message_type.GetOptions().map_entry:
            for item in value.values():
                if isinstance(item, Message):
                    yield from _payloads_in(item)
        elif descriptor.is_repeated:
            for item in value:
                yield from _payloads_in(item)
        else:
            yield from _payloads_in(value)


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("codec-home")


@pytest.fixture
async def env(home: Path) -> AsyncIterator[WorkflowEnvironment]:
    async with await WorkflowEnvironment.start_local(
        dev_server_existing_path=temporal_cli(),
        data_converter=data_converter(home),
        dev_server_extra_args=[*search_attribute_flags(), "--namespace", OTHER_NAMESPACE],
    ) as env:
        yield env


def _auth(home: Path) -> dict[str, str]:
    return {"Authorization": f"Bearer {server_token_path(home).read_text().strip()}"}


@pytest.fixture
def codec_server(home: Path) -> Iterator[CodecServer]:
    server = serve_codec(home, 0, [UI_ORIGIN], allow_encode=True)
    yield server
    server.stop()


async def _run(env: WorkflowEnvironment, fail: bool) -> tuple[str, str | BaseException]:
    task_queue = f"codec-{uuid.uuid4()}"
    workflow_id = f"codec-wf-{uuid.uuid4()}"
    async with Worker(env.client, task_queue=task_queue, workflows=[SecretWorkflow], activities=[unwrap]):
        try:
            result: str | BaseException = await env.client.execute_workflow(
                SecretWorkflow.run,
                UnwrapInput(key_ref="kms://fleet/dek/1", material=SECRET, fail=fail),
                id=workflow_id,
                task_queue=task_queue,
                memo={"note": SECRET},
            )
        except WorkflowFailureError as err:
            result = err
    return workflow_id, result


async def _raw_history(env: WorkflowEnvironment, workflow_id: str) -> History:
    raw_client = Client(env.client.service_client, namespace=env.client.namespace)
    assert raw_client.data_converter.payload_codec is None
    history = await raw_client.get_workflow_handle(workflow_id).fetch_history()
    return History(events=history.events)


async def test_history_holds_no_plaintext_secret(env: WorkflowEnvironment) -> None:
    workflow_id, result = await _run(env, fail=False)
    assert result == f"unwrapped:{SECRET}"  # the codec client reads the result

    history = await _raw_history(env, workflow_id)
    kinds = {event.WhichOneof("attributes") for event in history.events}
    assert {
        "workflow_execution_started_event_attributes",
        "activity_task_scheduled_event_attributes",
        "activity_task_started_event_attributes",
        "activity_task_completed_event_attributes",
        "workflow_execution_completed_event_attributes",
    } <= kinds
    _assert_no_secret(history.SerializeToString(), "raw history protobuf")
    _assert_no_secret(json_format.MessageToJson(history).encode(), "history JSON")

    payloads = list(_payloads_in(history))
    assert len(payloads) >= 4  # workflow input, memo, activity input, activity result, workflow result
    assert all(p.metadata["encoding"] == ENCODING for p in payloads), [dict(p.metadata) for p in payloads]

    started = next(e for e in history.events if e.HasField("activity_task_started_event_attributes"))
    last_failure = started.activity_task_started_event_attributes.last_failure
    assert last_failure.message == "Encoded failure"  # attempt 1's message is encrypted


async def test_workflow_failure_is_encrypted(env: WorkflowEnvironment) -> None:
    workflow_id, result = await _run(env, fail=True)
    assert isinstance(result, WorkflowFailureError)
    assert isinstance(result.cause, ApplicationError)
    assert SECRET in result.cause.message  # decoded through the codec client

    history = await _raw_history(env, workflow_id)
    failed = history.events[-1].workflow_execution_failed_event_attributes
    assert failed.failure.message == "Encoded failure"
    _assert_no_secret(history.SerializeToString(), "raw history protobuf")
    _assert_no_secret(json_format.MessageToJson(history).encode(), "history JSON")


async def test_codec_server_decodes_history_payloads(
    env: WorkflowEnvironment, codec_server: CodecServer, home: Path
) -> None:
    """What the UI does: send the raw history payloads to POST /decode."""
    workflow_id, _ = await _run(env, fail=False)
    history = await _raw_history(env, workflow_id)
    started = history.events[0].workflow_execution_started_event_attributes
    body = json_format.MessageToJson(started.input)
    async with httpx.AsyncClient(base_url=codec_server.url) as http:
        response = await http.post(
            "/decode",
            content=body,
            headers={
                "Content-Type": "application/json",
                "X-Namespace": "default",
                "Origin": UI_ORIGIN,
                **_auth(home),
            },
        )
    assert response.status_code == 200, response.text
    assert response.headers["access-control-allow-origin"] == UI_ORIGIN
    decoded = json_format.Parse(response.content, Payloads())
    [payload] = decoded.payloads
    assert payload.metadata["encoding"] == b"json/plain"
    assert json.loads(payload.data)["material"] == SECRET


# -- codec server over HTTP, without Temporal ------------------------------------------------


def _plain_payloads_json(*texts: str) -> str:
    payloads = Payloads(
        payloads=[Payload(metadata={"encoding": b"json/plain"}, data=json.dumps(t).encode()) for t in texts]
    )
    return json_format.MessageToJson(payloads)


def test_codec_server_encode_decode_round_trip(codec_server: CodecServer, home: Path) -> None:
    body = _plain_payloads_json(SECRET, "second")
    with httpx.Client(base_url=codec_server.url, headers=_auth(home)) as http:
        encoded = http.post("/encode", content=body, headers={"Content-Type": "application/json"})
        assert encoded.status_code == 200, encoded.text
        _assert_no_secret(encoded.content, "/encode response")
        wire = json.loads(encoded.content)
        assert len(wire["payloads"]) == 2
        assert base64.b64decode(wire["payloads"][0]["metadata"]["encoding"]) == ENCODING
        assert base64.b64decode(wire["payloads"][0]["metadata"]["encryption-format"]) == b"2"
        assert base64.b64decode(wire["payloads"][0]["metadata"]["encryption-key-id"]).decode() == (
            codec_server.key_id
        )

        decoded = http.post("/decode", content=encoded.content, headers={"Content-Type": "application/json"})
        assert decoded.status_code == 200, decoded.text
        assert json_format.Parse(decoded.content, Payloads()) == json_format.Parse(body, Payloads())

        # Unencrypted payloads pass through /decode unchanged.
        passthrough = http.post("/decode", content=body)
        assert json_format.Parse(passthrough.content, Payloads()) == json_format.Parse(body, Payloads())


def test_codec_server_rejects_tampered_and_malformed(codec_server: CodecServer, home: Path) -> None:
    with httpx.Client(base_url=codec_server.url, headers=_auth(home)) as http:
        wire = http.post("/encode", content=_plain_payloads_json(SECRET)).json()
        data = bytearray(base64.b64decode(wire["payloads"][0]["data"]))
        data[-1] ^= 1
        wire["payloads"][0]["data"] = base64.b64encode(bytes(data)).decode()
        tampered = http.post("/decode", content=json.dumps(wire))
        assert tampered.status_code == 422
        assert "failed authentication" in tampered.json()["error"]

        assert http.post("/decode", content=b"not json").status_code == 400
        assert http.post("/nope", content=_plain_payloads_json("x")).status_code == 404
        assert http.get("/decode").status_code == 405


def test_codec_server_cors_preflight(codec_server: CodecServer, home: Path) -> None:
    with httpx.Client(base_url=codec_server.url, headers=_auth(home)) as http:
        preflight = http.options(
            "/decode",
            headers={
                "Origin": UI_ORIGIN,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type,x-namespace",
            },
        )
        assert preflight.status_code in (200, 204)
        assert preflight.headers["access-control-allow-origin"] == UI_ORIGIN
        assert "POST" in preflight.headers["access-control-allow-methods"]
        allowed = {h.strip() for h in preflight.headers["access-control-allow-headers"].split(",")}
        assert {"authorization", "content-type", "x-namespace"} <= allowed

        evil = "http://evil.example"
        denied = http.options("/decode", headers={"Origin": evil, "Access-Control-Request-Method": "POST"})
        assert denied.status_code == 403
        assert "access-control-allow-origin" not in denied.headers
        post = http.post("/decode", content=_plain_payloads_json("x"), headers={"Origin": evil})
        assert post.status_code == 403

        rebound = http.post(
            "/decode", content=_plain_payloads_json("x"), headers={"Host": "attacker.example"}
        )
        assert rebound.status_code == 403


@pytest.mark.parametrize("path", ["/decode", "/encode"])
@pytest.mark.parametrize("origin", [None, UI_ORIGIN])
@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        "Bearer wrong-token-0123456789abcdef0123456789abcdef",
        "Basic eDp5",
        "TOKEN",  # the bare token, no "Bearer"
        "Bearer TOKENx",  # the token with a suffix
        "Bearer TOKEN[:-1]",  # the token less its last character
    ],
)
def test_codec_server_refuses_callers_without_the_token(
    codec_server: CodecServer, home: Path, path: str, origin: str | None, authorization: str | None
) -> None:
    """Attack: a local process (no Origin) or a page of the UI's origin, without the secret,
    decodes nothing and encodes nothing."""
    token = server_token_path(home).read_text().strip()
    with httpx.Client(base_url=codec_server.url) as http:
        genuine = http.post("/encode", content=_plain_payloads_json(SECRET), headers=_auth(home))
        assert genuine.status_code == 200
        body = genuine.content if path == "/decode" else _plain_payloads_json(SECRET).encode()
        headers = {"Content-Type": "application/json"}
        if origin is not None:
            headers["Origin"] = origin
        if authorization is not None:
            headers["Authorization"] = authorization.replace("TOKEN[:-1]", token[:-1]).replace("TOKEN", token)
        response = http.post(path, content=body, headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    _assert_no_secret(response.content, "401 response")
    assert "payloads" not in response.json()


def test_codec_server_token_file_is_private(codec_server: CodecServer, home: Path) -> None:
    path = server_token_path(home)
    assert path == home / "codec" / "server-token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(path.read_text().strip()) >= 32
    token = path.read_text()
    second = serve_codec(home, 0)  # every start writes a fresh token, never reuses one
    try:
        assert path.read_text() != token
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    finally:
        second.stop()
    assert not path.exists()  # the second server deleted its own token at stop
    write_server_token(home, token.strip())
    os.chmod(path, 0o644)
    try:
        with pytest.raises(CodecError, match="chmod 600"):
            read_server_token(home)  # a client does not read a token others could have read
    finally:
        os.chmod(path, 0o600)


def test_codec_server_binds_loopback_only(codec_server: CodecServer) -> None:
    assert codec_server.server_address[0] == "127.0.0.1"
    assert codec_server.url == f"http://127.0.0.1:{codec_server.port}"


def test_default_cors_origins_are_the_dev_ui(home: Path) -> None:
    server = serve_codec(home, 0)
    try:
        with httpx.Client(base_url=server.url) as http:
            for origin in ("http://127.0.0.1:8233", "http://localhost:8233"):
                r = http.options(
                    "/encode", headers={"Origin": origin, "Access-Control-Request-Method": "POST"}
                )
                assert r.headers["access-control-allow-origin"] == origin
    finally:
        server.stop()


@pytest.mark.parametrize("allow_encode", [False, True])
async def test_run_codec_server_stops_on_sigterm(home: Path, tmp_path: Path, allow_encode: bool) -> None:
    """`rekey codec-server` in a child process: prints its URL, serves /decode (and /encode only
    with --allow-encode), exits 0 on SIGTERM and deletes its token file then."""
    port = free_port()
    flags = ["--allow-encode"] if allow_encode else []
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "rekey.cli", "--home", str(home), "codec-server", "--port", str(port), *flags,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
    assert f"http://127.0.0.1:{port}" in line
    async with httpx.AsyncClient() as http:
        decoded = await http.post(
            f"http://127.0.0.1:{port}/decode", content=_plain_payloads_json("x"), headers=_auth(home)
        )
        assert decoded.status_code == 200
        r = await http.post(
            f"http://127.0.0.1:{port}/encode", content=_plain_payloads_json(SECRET), headers=_auth(home)
        )
        if allow_encode:
            assert r.status_code == 200
        else:
            assert r.status_code == 403 and "--allow-encode" in r.json()["error"]
            assert "payloads" not in r.json()
            _assert_no_secret(r.content, "refused /encode")
        anonymous = await http.post(f"http://127.0.0.1:{port}/encode", content=_plain_payloads_json("x"))
        assert anonymous.status_code == 401
    token_file = server_token_path(home)
    assert token_file.exists()
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 10) == 0
    assert not token_file.exists(), "the stopped codec server left its token for a squatter to be sent"


async def test_worker_refuses_forged_plain_input(env: WorkflowEnvironment) -> None:
    """Attack: a local process without the codec starts a workflow with a plain (forged)
    input; the worker's converter refuses it, the workflow never runs an activity."""
    task_queue = f"codec-forged-{uuid.uuid4()}"
    workflow_id = f"codec-forged-{uuid.uuid4()}"
    raw_client = Client(env.client.service_client, namespace=env.client.namespace)
    assert raw_client.data_converter.payload_codec is None
    await raw_client.start_workflow(
        "SecretWorkflow",
        UnwrapInput(key_ref="vault:attacker-chosen", material="forged"),
        id=workflow_id,
        task_queue=task_queue,
    )
    handle = env.client.get_workflow_handle(workflow_id)
    async with Worker(env.client, task_queue=task_queue, workflows=[SecretWorkflow], activities=[unwrap]):
        failed = None
        for _ in range(600):  # wait for the first workflow task to fail (bounded, not a timing assertion)
            history = History(events=(await handle.fetch_history()).events)
            failed = next(
                (e for e in history.events if e.HasField("workflow_task_failed_event_attributes")), None
            )
            if failed is not None:
                break
            await asyncio.sleep(0.1)
        assert failed is not None, "the worker accepted the forged plain input"
    failure = await env.client.data_converter.decode_failure(
        failed.workflow_task_failed_event_attributes.failure
    )
    assert "not encrypted" in str(failure)
    kinds = {event.WhichOneof("attributes") for event in history.events}
    assert "activity_task_scheduled_event_attributes" not in kinds
    await handle.terminate("test done")


async def test_temporal_cli_decodes_with_codec_auth(
    env: WorkflowEnvironment, codec_server: CodecServer, home: Path
) -> None:
    """The documented operator path: `temporal workflow show --codec-auth "Bearer <token>"`
    decodes the history; without --codec-auth the CLI gets nothing decoded."""
    workflow_id, _ = await _run(env, fail=False)
    address = env.client.service_client.config.target_host

    async def show(*extra: str) -> str:
        proc = await asyncio.create_subprocess_exec(
            temporal_cli(), "workflow", "show", "--address", address, "--workflow-id", workflow_id,
            "--output", "json", "--codec-endpoint", codec_server.url, *extra,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        return (out + err).decode()

    def has_secret(out: str) -> bool:  # JSON output: payload data stays base64
        return any(needle in out.encode() for needle in _needles(SECRET.encode()))

    authorized, anonymous, wrong = await asyncio.gather(  # three CLI processes at once
        show("--codec-auth", _auth(home)["Authorization"]), show(), show("--codec-auth", "Bearer " + "x" * 43)
    )
    assert has_secret(authorized)
    assert '"anNvbi9wbGFpbg=="' in authorized  # metadata encoding "json/plain": decoded
    assert not has_secret(anonymous)
    assert not has_secret(wrong)


@pytest.mark.parametrize(
    "headers",
    [
        {"Content-Length": "1_5"},  # int() would take it
        {"Content-Length": "+15"},
        {"Transfer-Encoding": "chunked", "Content-Length": "15"},  # smuggling behind a proxy
    ],
)
def test_codec_server_reads_lengths_strictly(
    codec_server: CodecServer, home: Path, headers: dict[str, str]
) -> None:
    """A proxy in front must read a request as this server does: no lenient Content-Length, no
    Transfer-Encoding; such a request is refused before its body is read, even with the token."""
    import socket

    host, port = codec_server.url.removeprefix("http://").split(":")
    lines = [
        "POST /encode HTTP/1.1",
        f"Host: {host}:{port}",
        "Content-Type: application/json",
        f"Authorization: {_auth(home)['Authorization']}",
        *(f"{name}: {value}" for name, value in headers.items()),
    ]
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + b'{"payloads":[]}')
        answer = conn.recv(4096).decode(errors="replace")
    assert answer.startswith("HTTP/1.") and " 411 " in answer.split("\r\n", 1)[0], answer[:200]


# -- format 3: a ciphertext copied from one workflow's history into another is refused ------------


async def _task_failure(client: Client, handle: WorkflowHandle[object, object]) -> tuple[str, History]:
    """The first workflow task failure of ``handle`` (decoded by ``client``) and its history then."""
    for _ in range(600):  # bounded wait for the worker to fail the task, not a timing assertion
        history = History(events=(await handle.fetch_history()).events)
        failed = next(
            (e for e in history.events if e.HasField("workflow_task_failed_event_attributes")), None
        )
        if failed is not None:
            failure = await client.data_converter.decode_failure(
                failed.workflow_task_failed_event_attributes.failure
            )
            return str(failure), history
        await asyncio.sleep(0.1)
    raise AssertionError(f"the worker accepted the copied payload in {handle.id}")


def _nothing_acted(history: History) -> None:
    kinds = {event.WhichOneof("attributes") for event in history.events}
    assert "activity_task_scheduled_event_attributes" not in kinds
    assert "workflow_execution_update_accepted_event_attributes" not in kinds
    assert "workflow_execution_completed_event_attributes" not in kinds


async def _stolen_start_input(env: WorkflowEnvironment) -> tuple[str, Payload]:
    """Workflow A runs with a secret; the attacker (no codec) copies its encrypted input."""
    workflow_id, result = await _run(env, fail=False)
    assert result == f"unwrapped:{SECRET}"
    started = (await _raw_history(env, workflow_id)).events[0].workflow_execution_started_event_attributes
    [payload] = started.input.payloads
    assert payload.metadata["encryption-format"] == b"3"
    assert payload.metadata["encryption-workflow-id"] == workflow_id.encode()
    return workflow_id, payload


async def test_start_input_copied_to_another_workflow_is_refused(env: WorkflowEnvironment) -> None:
    """Attack: someone who may start workflows but has no codec key starts workflow B with the
    encrypted input of workflow A (naming A's key and material); the worker refuses it."""
    _, stolen = await _stolen_start_input(env)
    task_queue = f"codec-copy-{uuid.uuid4()}"
    raw_client = Client(env.client.service_client, namespace=env.client.namespace)
    victim = f"codec-copy-{uuid.uuid4()}"
    await raw_client.start_workflow("SecretWorkflow", RawValue(stolen), id=victim, task_queue=task_queue)
    handle = env.client.get_workflow_handle(victim)
    async with Worker(env.client, task_queue=task_queue, workflows=[SecretWorkflow], activities=[unwrap]):
        message, history = await _task_failure(env.client, handle)
    assert "belongs to workflow" in message and f"not {victim!r}" in message
    _nothing_acted(history)
    await handle.terminate("test done")


async def test_start_input_copied_to_another_namespace_is_refused(env: WorkflowEnvironment) -> None:
    """Attack: the same workflow id in another namespace, with A's encrypted input."""
    workflow_id, stolen = await _stolen_start_input(env)
    task_queue = f"codec-ns-{uuid.uuid4()}"
    raw_other = Client(env.client.service_client, namespace=OTHER_NAMESPACE)
    other = Client(
        env.client.service_client, namespace=OTHER_NAMESPACE, data_converter=env.client.data_converter
    )
    await raw_other.start_workflow("SecretWorkflow", RawValue(stolen), id=workflow_id, task_queue=task_queue)
    handle = other.get_workflow_handle(workflow_id)
    async with Worker(other, task_queue=task_queue, workflows=[SecretWorkflow], activities=[unwrap]):
        message, history = await _task_failure(other, handle)
    assert f"belongs to namespace 'default', not {OTHER_NAMESPACE!r}" in message
    _nothing_acted(history)
    await handle.terminate("test done")


async def _stolen_approval(env: WorkflowEnvironment, task_queue: str) -> Payload:
    """Workflow A is approved (update) for its key; the attacker copies the update's input."""
    approved = await env.client.start_workflow(
        ApprovalWorkflow.run, id=f"codec-approved-{uuid.uuid4()}", task_queue=task_queue
    )
    assert (
        await approved.execute_update(
            ApprovalWorkflow.approve, UnwrapInput(key_ref="vault:a-only", material=SECRET)
        )
        == "approved"
    )
    assert await approved.result() == f"unwrapped:{SECRET}"
    history = await _raw_history(env, approved.id)
    accepted = next(
        e.workflow_execution_update_accepted_event_attributes
        for e in history.events
        if e.HasField("workflow_execution_update_accepted_event_attributes")
    )
    [payload] = accepted.accepted_request.input.args.payloads
    assert payload.metadata["encryption-workflow-id"] == approved.id.encode()
    return payload


def _kinds(history: History) -> list[str]:
    return [str(event.WhichOneof("attributes")) for event in history.events]


async def _processed(handle: WorkflowHandle[object, object], after_kind: str) -> History:
    """The history once the worker has completed a workflow task after the last event of kind
    ``after_kind`` (bounded wait, not a timing assertion)."""
    for _ in range(600):
        history = History(events=(await handle.fetch_history()).events)
        kinds = _kinds(history)
        if after_kind in kinds:
            last = len(kinds) - 1 - kinds[::-1].index(after_kind)
            if "workflow_task_completed_event_attributes" in kinds[last:]:
                return history
        await asyncio.sleep(0.1)
    raise AssertionError(f"the worker never completed a workflow task after {after_kind} in {handle.id}")


def _not_wedged(history: History) -> None:
    assert "workflow_task_failed_event_attributes" not in _kinds(history), "the refused payload failed a task"


def _refused_logged(caplog: pytest.LogCaptureFixture, workflow_id: str, reason: str) -> None:
    records = [r.getMessage() for r in caplog.records if r.name == "rekey.codec"]
    assert any(reason in m and repr(workflow_id) in m for m in records), records
    assert not any(SECRET in m for m in records)


@pytest.mark.parametrize("kind", ["copied", "plain"])
@pytest.mark.parametrize("via", ["update", "signal"])
async def test_approval_copied_to_another_workflow_is_refused(
    env: WorkflowEnvironment, via: str, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Attack: workflow B waits for approval; the attacker sends B the encrypted approval
    recorded in A's history (``copied``), or a plain one (``plain``), as an update or a signal.
    The worker's codec refuses it: the update is rejected, the signal dropped, no activity runs,
    and B is not wedged: the legitimate approval sent afterwards is processed, and only it acts.
    (With a codec that raised, B's workflow task failed on every attempt, for ever.)"""
    caplog.set_level("WARNING", logger="rekey.codec")
    task_queue = f"codec-approve-{uuid.uuid4()}"
    raw_client = Client(env.client.service_client, namespace=env.client.namespace)
    worker = Worker(
        worker_client(env.client), task_queue=task_queue, workflows=[ApprovalWorkflow], activities=[unwrap]
    )
    async with worker:
        stolen = await _stolen_approval(env, task_queue)
        bad: object = (
            RawValue(stolen) if kind == "copied" else UnwrapInput(key_ref="vault:attacker", material="forged")
        )
        waiting = await env.client.start_workflow(
            ApprovalWorkflow.run, id=f"codec-waiting-{uuid.uuid4()}", task_queue=task_queue
        )
        await _processed(waiting, "workflow_execution_started_event_attributes")
        raw_handle = raw_client.get_workflow_handle(waiting.id)
        if via == "update":
            with pytest.raises(WorkflowUpdateFailedError):  # rejected, not left hanging
                await raw_handle.execute_update("approve", bad, rpc_timeout=timedelta(seconds=60))
            history = History(events=(await waiting.fetch_history()).events)
        else:
            await raw_handle.signal("approve_signal", bad)
            history = await _processed(waiting, "workflow_execution_signaled_event_attributes")
        _nothing_acted(history)
        _not_wedged(history)
        _refused_logged(caplog, waiting.id, "belongs to workflow" if kind == "copied" else "not encrypted")

        legit = UnwrapInput(key_ref="vault:b-approved", material=SECRET + "-for-b")
        if via == "update":
            assert await waiting.execute_update(ApprovalWorkflow.approve, legit) == "approved"
        else:
            await waiting.signal(ApprovalWorkflow.approve_signal, legit)
        assert await waiting.result() == f"unwrapped:{SECRET}-for-b"
        history = History(events=(await waiting.fetch_history()).events)
        _not_wedged(history)
        assert _kinds(history).count("activity_task_scheduled_event_attributes") == 1
        assert _kinds(history).count("workflow_execution_update_accepted_event_attributes") == (
            1 if via == "update" else 0
        )


async def test_refused_query_argument_fails_only_the_query(
    env: WorkflowEnvironment, caplog: pytest.LogCaptureFixture
) -> None:
    """A query whose argument the worker's codec refuses fails; the workflow is untouched and
    later queries, signals and its activity work."""
    caplog.set_level("WARNING", logger="rekey.codec")
    task_queue = f"codec-query-{uuid.uuid4()}"
    raw_client = Client(env.client.service_client, namespace=env.client.namespace)
    worker = Worker(
        worker_client(env.client), task_queue=task_queue, workflows=[ApprovalWorkflow], activities=[unwrap]
    )
    async with worker:
        waiting = await env.client.start_workflow(
            ApprovalWorkflow.run, id=f"codec-query-{uuid.uuid4()}", task_queue=task_queue
        )
        with pytest.raises(WorkflowQueryFailedError):
            await raw_client.get_workflow_handle(waiting.id).query(
                "approved_for", UnwrapInput(key_ref="plain", material="forged")
            )
        _refused_logged(caplog, waiting.id, "not encrypted")
        assert await waiting.query(ApprovalWorkflow.approved_for, UnwrapInput("me", "")) == ""
        await waiting.signal(ApprovalWorkflow.approve_signal, UnwrapInput(key_ref="vault:q", material=SECRET))
        assert await waiting.result() == f"unwrapped:{SECRET}"
        _not_wedged(History(events=(await waiting.fetch_history()).events))


@pytest.mark.parametrize("kind", ["copied", "plain"])
async def test_refused_start_input_never_runs_with_the_worker_codec(
    env: WorkflowEnvironment, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Attack: workflow B started with A's encrypted input, or a plain forged one, on a worker
    with the worker's codec: B's workflow task fails (it has nothing to run on), as with the
    raising codec, and nothing acts."""
    caplog.set_level("WARNING", logger="rekey.codec")
    task_queue = f"codec-start-{uuid.uuid4()}"
    raw_client = Client(env.client.service_client, namespace=env.client.namespace)
    victim = f"codec-start-{uuid.uuid4()}"
    if kind == "copied":
        _, stolen = await _stolen_start_input(env)
        bad: object = RawValue(stolen)
    else:
        bad = UnwrapInput(key_ref="vault:attacker-chosen", material="forged")
    await raw_client.start_workflow("SecretWorkflow", bad, id=victim, task_queue=task_queue)
    handle = env.client.get_workflow_handle(victim)
    async with Worker(
        worker_client(env.client), task_queue=task_queue, workflows=[SecretWorkflow], activities=[unwrap]
    ):
        message, history = await _task_failure(env.client, handle)
    assert message == "RuntimeError: Failed decoding arguments", message  # the stand-in is no value
    _nothing_acted(history)
    _refused_logged(caplog, victim, "belongs to workflow" if kind == "copied" else "not encrypted")
    await handle.terminate("test done")


async def test_codec_server_checks_the_namespace_it_is_told(
    env: WorkflowEnvironment, codec_server: CodecServer, home: Path
) -> None:
    """The UI sends X-Namespace: a payload of another namespace is refused, its own decodes."""
    _, stolen = await _stolen_start_input(env)
    body = json_format.MessageToJson(Payloads(payloads=[stolen]))
    headers = {"Content-Type": "application/json", "Origin": UI_ORIGIN, **_auth(home)}
    async with httpx.AsyncClient(base_url=codec_server.url) as http:
        refused = await http.post(
            "/decode", content=body, headers={**headers, "X-Namespace": OTHER_NAMESPACE}
        )
        shown = await http.post("/decode", content=body, headers={**headers, "X-Namespace": "default"})
    assert refused.status_code == 422 and "belongs to namespace 'default'" in refused.text
    assert SECRET not in refused.text
    assert shown.status_code == 200
    [payload] = json_format.Parse(shown.content, Payloads()).payloads
    assert json.loads(payload.data)["material"] == SECRET
