"""Record the workflow histories the replay test replays: one per scenario, each stopping in
a different place (a phase it waits in, or the end of a run).

Run: ``python -m tests.replay.record_rotation_history`` (about 10 s).

Runs RotateKeyWorkflow and LaunchRotationWorkflow against a real Temporal dev server (its
continue-as-new suggestion lowered), a real OpenBao and a real SQLite store, with the real
activities, the default data converter and no codec: a checked-in history must be readable
without a key, so it holds only ids, cursors and counts (every file is checked for
ciphertexts, tokens and the blobs' plaintexts before it is written). A history that stops in
a waiting phase is fetched while the workflow waits there (its timer started), then the
workflow goes on or is terminated. Waits are real: 24 h grace periods and 7 d destroy delays
are never reached; each history ends before them.

Writes ``histories/<scenario>.json`` and ``histories/corpus.toml`` (the index: workflow id,
the phase each history stops in, the updates refused on the way). ``rotation_done.json``
(recorded before PATCH_SAFETY by this script as it was then) is not touched:
it proves the patch replays old histories. Record new histories when the workflow's commands
change (docs/workflow-versioning.md); keep the old files until no running workflow predates
the change.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import logging
import secrets
import sys
import tempfile
import threading
import time
import typing
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import hvac
from temporalio import activity
from temporalio.client import Client, WorkflowHandle, WorkflowHistory, WorkflowUpdateFailedError
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from activities.rotation import RotationActivities
from audit import AuditLog, load_or_create_signing_key
from emulators.servers import OpenBao, openbao_dev
from kms_adapters.governor import Governor
from kms_adapters.release import MemoryReleasePolicyStore
from kms_adapters.vault_transit import VaultTransitAdapter
from rekey.devstack.temporal import search_attribute_flags, temporal_cli
from rekey.worker import WORKFLOWS
from sealing import envelope
from sealing.state import SealedState
from sealing.store import SealedStateStore
from tests.replay import corpus
from workflows.launcher import LaunchRotationWorkflow
from workflows.rotation import (
    ABORTED,
    AWAITING_COMMIT,
    AWAITING_DESTROY,
    BLOCKED,
    DONE,
    REWRAPPING,
    Progress,
    RotateKeyInput,
    RotateKeyWorkflow,
)
from workflows.rotation_state import LaunchRotationInput

SUGGEST_CONTINUE_AS_NEW = 200
"""The dev server suggests continue-as-new past this many events: the continued_as_new
scenario (50 batches of 2) passes it once, every other scenario (a few batches) never."""
GRACE = 24 * 3600.0
WEEK = 7 * 24 * 3600.0
WAIT_S = 120.0  # wall seconds any one wait may take before the recording fails
DENY_REWRAP = """
path "transit/*" {{ capabilities = ["create", "read", "update", "delete", "list"] }}
path "transit/rewrap/{name}" {{ capabilities = ["deny"] }}
"""
ALLOW_ALL = 'path "transit/*" { capabilities = ["create", "read", "update", "delete", "list"] }'


class RecordingError(RuntimeError):
    pass


# ----------------------------------------------------------------------------- gates


@dataclass
class Gate:
    """Holds the calls of one activity that ``matches`` accepts until released."""

    matches: Callable[[Any], bool]
    entered: threading.Event = field(default_factory=threading.Event)
    released: threading.Event = field(default_factory=threading.Event)

    async def wait_entered(self) -> None:
        if not await asyncio.to_thread(self.entered.wait, WAIT_S):
            raise RecordingError("a held activity was never called")


def gated(fn: Callable[[Any], Any], name: str, gates: dict[str, list[Gate]]) -> Callable[[Any], Any]:
    """``fn`` (a real activity) under its own name, first holding at any gate of ``name``."""

    def run(request: Any) -> Any:
        for gate in gates.get(name, []):
            if gate.matches(request):
                gate.entered.set()
                if not gate.released.wait(WAIT_S):
                    raise ApplicationError("gate never released", non_retryable=True)
        return fn(request)

    run.__annotations__ = typing.get_type_hints(fn)  # the SDK converts by them
    return activity.defn(name=name)(run)


# ----------------------------------------------------------------------------- benches


@dataclass
class Bench:
    """One Transit key with blobs sealed under it in a SQLite store, and a worker with the real
    activities (over ``adapter``, which may use a restricted token) on its own task queue."""

    client: Client
    bao: OpenBao
    name: str
    root: VaultTransitAdapter
    adapter: VaultTransitAdapter
    store: SealedStateStore
    state: SealedState
    task_queue: str
    plaintexts: list[bytes]
    gates: dict[str, list[Gate]] = field(default_factory=dict)

    @property
    def key_ref(self) -> str:
        return self.root.key_ref

    def hold(self, name: str, matches: Callable[[Any], bool] = lambda _r: True) -> Gate:
        gate = Gate(matches)
        self.gates.setdefault(name, []).append(gate)
        return gate

    def request(self, **options: Any) -> RotateKeyInput:
        return RotateKeyInput(
            self.key_ref, started_by="replay-recorder", requested_at=datetime.now(UTC).isoformat(), **options
        )

    async def start(self, workflow_id: str, **options: Any) -> WorkflowHandle[Any, Progress]:
        return await self.client.start_workflow(
            RotateKeyWorkflow.run, self.request(**options), id=workflow_id, task_queue=self.task_queue
        )


def _adapter(client: hvac.Client, name: str) -> VaultTransitAdapter:
    return VaultTransitAdapter(
        client, name, release_store=MemoryReleasePolicyStore(), governor=Governor(f"replay-{name}")
    )


@asynccontextmanager
async def bench(
    client: Client, bao: OpenBao, home: Path, name: str, *, blobs: int = 40, token: str | None = None
) -> AsyncIterator[Bench]:
    root = _adapter(bao.client(), name)
    root.create()
    adapter = root if token is None else _adapter(hvac.Client(url=bao.addr, token=token, timeout=30), name)
    store = SealedStateStore(f"sqlite:///{home / f'{name}.db'}")
    store.put_generation("gen-1", '{"id":"gen-1"}')
    state = SealedState(store, lambda _ref: root)
    plaintexts = []
    for i in range(blobs):
        data = secrets.token_bytes(32)
        state.put(namespace="ns", name=f"item-{i}", data=data, key_ref=root.key_ref, generation="gen-1")
        plaintexts.append(data)
    audit_log = AuditLog(f"sqlite:///{home / f'{name}.db'}", load_or_create_signing_key(home / "audit.pem"))

    def audit(event: str, subject: str, details: dict[str, Any], who: str) -> None:
        audit_log.append(event, subject, details, actor=who)  # the real log: it validates details

    setup = Bench(client, bao, name, root, adapter, store, state, f"replay-{uuid.uuid4()}", plaintexts)
    activities = RotationActivities(lambda _ref: adapter, store, audit)
    worker = Worker(
        client,
        task_queue=setup.task_queue,
        workflows=WORKFLOWS,
        # every activity method is named as its activity
        activities=[gated(fn, fn.__name__, setup.gates) for fn in activities.all()],
        activity_executor=ThreadPoolExecutor(16),
        max_concurrent_activities=16,
    )
    try:
        async with worker:
            yield setup
    finally:
        for gates in setup.gates.values():
            for gate in gates:
                gate.released.set()
        audit_log.close()
        store.close()


# ----------------------------------------------------------------------------- waiting


async def _progress(handle: WorkflowHandle[Any, Progress]) -> Progress:
    return await handle.query(RotateKeyWorkflow.progress)


async def settled(handle: WorkflowHandle[Any, Any], phase: str | None = None, *, timer: bool = False) -> None:
    """Wait until the workflow is in ``phase`` and idle: no workflow task and no activity
    pending (and, with ``timer``, the timer of its wait started)."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        description = await handle.describe()
        raw = description.raw_description
        idle = not raw.HasField("pending_workflow_task") and not raw.pending_activities
        if idle and (phase is None or (await _progress(handle)).phase == phase):
            history = await handle.fetch_history()
            if not timer or _timer_pending(history):
                return
        await asyncio.sleep(0.05)
    raise RecordingError(f"{handle.id} did not settle in {phase}")


def _timer_pending(history: WorkflowHistory) -> bool:
    started = fired = 0
    for event in history.events:
        started += event.HasField("timer_started_event_attributes")
        fired += event.HasField("timer_fired_event_attributes") or event.HasField(
            "timer_canceled_event_attributes"
        )
    return started > fired


async def until_phase(handle: WorkflowHandle[Any, Progress], phase: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if (await _progress(handle)).phase == phase:
            return
        await asyncio.sleep(0.05)
    raise RecordingError(f"{handle.id} never reached {phase}")


async def refused(handle: WorkflowHandle[Any, Progress], update: Callable[..., Any]) -> str:
    """Send ``update``, which the workflow must refuse; the phase and reason it refused with."""
    phase = (await _progress(handle)).phase
    try:
        await handle.execute_update(update)
    except WorkflowUpdateFailedError as failure:
        cause = failure.cause
        if isinstance(cause, ApplicationError) and cause.type == "Refused":
            return f"{update.__name__} in {phase}: {cause.message}"
        raise
    raise RecordingError(f"{update.__name__} was accepted in {phase}")


# ----------------------------------------------------------------------------- recording


@dataclass
class Recorder:
    out: Path
    secrets: list[str] = field(default_factory=list)
    written: list[corpus.Entry] = field(default_factory=list)

    async def save(
        self,
        name: str,
        handle: WorkflowHandle[Any, Any],
        stops_in: str,
        *,
        plaintexts: Sequence[bytes] = (),
        refused: Sequence[str] = (),
    ) -> None:
        history = await handle.fetch_history()
        text = history.to_json()
        doc = json.loads(text)
        known = tuple(self.secrets) + tuple(
            form for data in plaintexts for form in (data.hex(), *_base64_forms(data))
        )
        leaks = corpus.secrets_in(doc, known)
        if leaks:
            raise RecordingError(f"{name}: the history holds {leaks}; not written")
        seen = corpus.phases(doc)
        if stops_in not in ("", *seen[-1:]):
            raise RecordingError(f"{name}: expected to stop in {stops_in}, the history ends in {seen[-1:]}")
        (self.out / f"{name}.json").write_text(text)
        self.written.append(corpus.Entry(f"{name}.json", handle.id, stops_in, list(refused)))
        print(f"  {name}.json: {len(history.events)} events, phases {' > '.join(seen) or '-'}")


def _base64_forms(data: bytes) -> list[str]:
    return [base64.b64encode(data).decode()[:40], base64.urlsafe_b64encode(data).decode()[:40]]


async def awaiting_commit_and_aborted(rec: Recorder, b: Bench) -> None:
    """A 24 h grace period, paused and resumed in AWAITING_COMMIT (saved there), then aborted."""
    handle = await b.start(f"replay-awaiting-commit-{b.name}", grace_seconds=GRACE, batch_size=10)
    await settled(handle, AWAITING_COMMIT, timer=True)
    await handle.execute_update(RotateKeyWorkflow.pause)
    await handle.execute_update(RotateKeyWorkflow.resume)
    await settled(handle, AWAITING_COMMIT, timer=True)
    await rec.save("awaiting_commit", handle, AWAITING_COMMIT, plaintexts=b.plaintexts)
    await handle.execute_update(RotateKeyWorkflow.abort)
    if (await handle.result()).phase != ABORTED:
        raise RecordingError("the abort did not end the rotation")
    await rec.save("aborted", handle, ABORTED, plaintexts=b.plaintexts)


async def continued_as_new(rec: Recorder, b: Bench) -> None:
    """Batches of 2 until the server suggests continue-as-new: the first run's history ends in
    CONTINUED_AS_NEW; the successor, carrying the state over, waits in AWAITING_COMMIT."""
    handle = await b.start(
        f"replay-continued-{b.name}", grace_seconds=GRACE, batch_size=2, batches_in_flight=2
    )
    first = handle.first_execution_run_id
    assert first is not None
    latest = b.client.get_workflow_handle_for(RotateKeyWorkflow.run, handle.id)
    await settled(latest, AWAITING_COMMIT, timer=True)
    successor = (await latest.describe()).run_id
    if successor == first:
        raise RecordingError("the rotation never continued as new (raise the blob count)")
    run = functools.partial(b.client.get_workflow_handle, handle.id)
    await rec.save("continued_as_new_first_run", run(run_id=first), REWRAPPING, plaintexts=b.plaintexts)
    await rec.save(
        "continued_as_new_successor", run(run_id=successor), AWAITING_COMMIT, plaintexts=b.plaintexts
    )
    await latest.terminate("recorded")


async def updates_refused(rec: Recorder, b: Bench) -> None:
    """approve refused while REWRAPPING (a batch held), then accepted in AWAITING_COMMIT: DONE."""
    gate = b.hold("rewrap_batch", lambda request: request.start is None)
    handle = await b.start(f"replay-refused-{b.name}", grace_seconds=GRACE, batch_size=10)
    await gate.wait_entered()
    reasons = [await refused(handle, RotateKeyWorkflow.approve)]
    gate.released.set()
    await settled(handle, AWAITING_COMMIT, timer=True)
    await handle.execute_update(RotateKeyWorkflow.approve)
    if (await handle.result()).phase != DONE:
        raise RecordingError("the approved rotation did not finish")
    await rec.save("updates_refused", handle, DONE, plaintexts=b.plaintexts, refused=reasons)


async def blocked(rec: Recorder, b: Bench, policy: str) -> None:
    """The worker's token may not rewrap: the first batch fails non-retryably and the rotation
    waits in BLOCKED (saved); the policy is fixed, resume sweeps again: DONE."""
    handle = await b.start(f"replay-blocked-{b.name}", grace_seconds=0, batch_size=10)
    await settled(handle, BLOCKED)
    reasons = [await refused(handle, RotateKeyWorkflow.pause)]
    await rec.save("blocked", handle, BLOCKED, plaintexts=b.plaintexts, refused=reasons)
    b.bao.client().sys.create_or_update_policy(name=policy, policy=ALLOW_ALL)
    await handle.execute_update(RotateKeyWorkflow.resume)
    if (await handle.result()).phase != DONE:
        raise RecordingError("the resumed rotation did not finish")
    await rec.save("blocked_resumed", handle, DONE, plaintexts=b.plaintexts)


async def destroy_delay(rec: Recorder, cancelled: Bench, approved: Bench) -> None:
    """Grace 0, a 7 d destroy delay: waiting in AWAITING_DESTROY (saved), then cancel_destroy
    (DONE, nothing destroyed); a second rotation approve_destroy (DESTROYING, DONE)."""
    handle = await cancelled.start(
        f"replay-destroy-{cancelled.name}", grace_seconds=0, destroy_after_seconds=WEEK
    )
    await settled(handle, AWAITING_DESTROY, timer=True)
    reasons = [await refused(handle, RotateKeyWorkflow.abort)]
    await rec.save(
        "destroy_delay", handle, AWAITING_DESTROY, plaintexts=cancelled.plaintexts, refused=reasons
    )
    await handle.execute_update(RotateKeyWorkflow.cancel_destroy)
    if (await handle.result()).phase != DONE:
        raise RecordingError("cancel_destroy did not end the rotation")
    await rec.save("destroy_cancelled", handle, DONE, plaintexts=cancelled.plaintexts)

    handle = await approved.start(
        f"replay-destroy-{approved.name}", grace_seconds=0, destroy_after_seconds=WEEK
    )
    await settled(handle, AWAITING_DESTROY, timer=True)
    await handle.execute_update(RotateKeyWorkflow.approve_destroy)
    final = await handle.result()
    if final.phase != DONE or not final.destroyed:
        raise RecordingError("approve_destroy did not destroy the old version")
    await rec.save("destroy_approved", handle, DONE, plaintexts=approved.plaintexts)


async def retire_census(rec: Recorder, b: Bench) -> None:
    """A late writer stores a blob under the old version during the grace period: the census
    before disabling finds it, the rotation sweeps again, then disables: DONE."""
    late = secrets.token_bytes(32)
    blob_id = uuid.uuid4()
    sealed = bytes(
        envelope.seal(late, b.root, namespace="ns", name="late", generation="gen-1", blob_id=blob_id)
    )
    old_version = envelope.parse(sealed).key_version
    handle = await b.start(f"replay-census-{b.name}", grace_seconds=GRACE, batch_size=10)
    await settled(handle, AWAITING_COMMIT, timer=True)
    b.store.insert(
        blob_id=str(blob_id),
        namespace="ns",
        name="late",
        key_ref=b.key_ref,
        key_version=old_version,
        generation="gen-1",
        blob=sealed,
    )
    await handle.execute_update(RotateKeyWorkflow.approve)
    final = await handle.result()
    if final.phase != DONE or final.sweeps < 1:
        raise RecordingError("the census did not send the rotation back to re-wrapping")
    if b.state.get(namespace="ns", name="late") != late:
        raise RecordingError("the late blob is unreadable after the rotation")
    await rec.save("retire_census", handle, DONE, plaintexts=[*b.plaintexts, late])


async def destroy_blocked(rec: Recorder, cancelled: Bench, resumed: Bench) -> None:
    """Grace 0, a 7 d destroy delay; during it a blob sealed under the old version before the
    rotation is restored into the store; approve_destroy: the census stops the destroy, BLOCKED
    (saved). Then cancel_destroy: DONE, nothing destroyed; on a second key, resume: the old
    versions are enabled again, the blob swept, disabled again, approve_destroy: DONE."""
    for b, ending in ((cancelled, "cancelled"), (resumed, "resumed")):
        data = secrets.token_bytes(32)
        blob_id = uuid.uuid4()
        sealed = bytes(
            envelope.seal(data, b.root, namespace="ns", name="restored", generation="gen-1", blob_id=blob_id)
        )
        handle = await b.start(f"replay-restored-{b.name}", grace_seconds=0, destroy_after_seconds=WEEK)
        await settled(handle, AWAITING_DESTROY, timer=True)
        b.store.insert(
            blob_id=str(blob_id),
            namespace="ns",
            name="restored",
            key_ref=b.key_ref,
            key_version=envelope.parse(sealed).key_version,
            generation="gen-1",
            blob=sealed,
        )
        await handle.execute_update(RotateKeyWorkflow.approve_destroy)
        await settled(handle, BLOCKED)
        if ending == "cancelled":
            await rec.save("destroy_blocked", handle, BLOCKED, plaintexts=[*b.plaintexts, data])
            await handle.execute_update(RotateKeyWorkflow.cancel_destroy)
            final = await handle.result()
            if final.phase != DONE or final.destroyed:
                raise RecordingError("cancel_destroy while blocked did not end the rotation undestroyed")
        else:
            await handle.execute_update(RotateKeyWorkflow.resume)
            await settled(handle, AWAITING_DESTROY, timer=True)
            await handle.execute_update(RotateKeyWorkflow.approve_destroy)
            final = await handle.result()
            if final.phase != DONE or not final.destroyed:
                raise RecordingError("the resumed rotation did not destroy the old version")
            if b.state.get(namespace="ns", name="restored") != data:
                raise RecordingError("the restored blob is unreadable after the rotation")
            first = b.client.get_workflow_handle(handle.id, run_id=handle.first_execution_run_id)
            if first.run_id != (await handle.describe()).run_id:  # it continued as new: keep the
                # run that went through BLOCKED, the resume and the enable too
                phases = corpus.phases(json.loads((await first.fetch_history()).to_json()))
                await rec.save(
                    f"destroy_blocked_{ending}_first_run", first, phases[-1], plaintexts=[*b.plaintexts, data]
                )
        await rec.save(f"destroy_blocked_{ending}", handle, DONE, plaintexts=[*b.plaintexts, data])


async def launcher(rec: Recorder, b: Bench) -> None:
    """A launch starts the key's rotation (which waits in its grace period); a second launch
    finds it running and skips."""
    rotation = f"replay-launched-{b.name}"
    launch = LaunchRotationInput(rotation, b.request(grace_seconds=GRACE, batch_size=10))
    started = await b.client.start_workflow(
        LaunchRotationWorkflow.run, launch, id=f"launch-1-{b.name}", task_queue=b.task_queue
    )
    if not (await started.result()).startswith("started"):
        raise RecordingError("the first launch did not start the rotation")
    child = b.client.get_workflow_handle_for(RotateKeyWorkflow.run, rotation)
    await settled(child, AWAITING_COMMIT, timer=True)
    skipped = await b.client.start_workflow(
        LaunchRotationWorkflow.run, launch, id=f"launch-2-{b.name}", task_queue=b.task_queue
    )
    if not (await skipped.result()).startswith("skipped"):
        raise RecordingError("the second launch did not skip")
    await rec.save("launcher_started", started, "")
    await rec.save("launcher_skipped", skipped, "")
    await child.terminate("recorded")


async def record(out: Path) -> None:
    began = time.monotonic()
    # The activity failures the scenarios cause on purpose are logged with tracebacks: hide them.
    logging.getLogger("temporalio.activity").setLevel(logging.ERROR)
    home = Path(tempfile.mkdtemp(prefix="rekey-replay-"))
    out.mkdir(parents=True, exist_ok=True)
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=temporal_cli(),
        dev_server_extra_args=[
            *search_attribute_flags(),
            "--dynamic-config-value",
            f"limit.historyCount.suggestContinueAsNew={SUGGEST_CONTINUE_AS_NEW}",
        ],
    )
    try:
        with openbao_dev() as bao:
            rec = Recorder(out, secrets=[bao.token])
            client = env.client
            policy = f"deny-rewrap-{secrets.token_hex(3)}"
            name = f"blocked-{secrets.token_hex(3)}"
            root = bao.client()
            root.sys.create_or_update_policy(name=policy, policy=DENY_REWRAP.format(name=name))
            token = root.auth.token.create(policies=[policy], ttl="2h")["auth"]["client_token"]
            rec.secrets.append(token)

            def key(label: str) -> str:
                return f"{label}-{secrets.token_hex(3)}"

            async with (
                bench(client, bao, home, key("commit")) as commit,
                bench(client, bao, home, key("continued"), blobs=100) as continued,
                bench(client, bao, home, key("refused")) as refusing,
                bench(client, bao, home, name, token=token) as denied,
                bench(client, bao, home, key("cancel")) as cancel,
                bench(client, bao, home, key("destroy")) as destroy,
                bench(client, bao, home, key("census")) as census,
                bench(client, bao, home, key("launch")) as launched,
                bench(client, bao, home, key("restored")) as restored,
                bench(client, bao, home, key("restoredr")) as restored_resumed,
            ):
                await asyncio.gather(
                    awaiting_commit_and_aborted(rec, commit),
                    continued_as_new(rec, continued),
                    updates_refused(rec, refusing),
                    blocked(rec, denied, policy),
                    destroy_delay(rec, cancel, destroy),
                    retire_census(rec, census),
                    launcher(rec, launched),
                    destroy_blocked(rec, restored, restored_resumed),
                )
            # Histories kept from earlier recordings (renamed, for workflows that predate a
            # patch) keep their entries.
            index = out / corpus.INDEX.name
            written = {entry.file for entry in rec.written}
            kept = [
                entry
                for name, entry in corpus.index(index).items()
                if name not in written and (out / name).exists()
            ]
            corpus.write_index([*kept, *rec.written], index)
    finally:
        await env.shutdown()
    print(f"wrote {len(rec.written)} histories and {corpus.INDEX.name} in {time.monotonic() - began:.0f} s")


if __name__ == "__main__":
    asyncio.run(record(Path(sys.argv[1]) if len(sys.argv) > 1 else corpus.HISTORIES))
