"""Record histories of the pre-patch rotation workflow (``rotation_v1``) steered by its signals.

Run: ``python -m tests.replay.pre_safety.record``. Writes ``tests/replay/histories/pre_safety_*.json``.

Stub activities over an in-memory fleet (a history holds only what the workflow saw: ids,
counts, cursors), a real Temporal dev server, the default data converter (no codec, so the
files are readable without a key). Each scenario is one way a run started before the patch
may still be running when the patched workers are deployed: waiting in AWAITING_COMMIT, and
approved, paused and resumed, or aborted by signal.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from temporalio import activity
from temporalio.client import WorkflowHandle
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from activities.types import (
    AuditInput,
    CountInput,
    KeyRefInput,
    KeyState,
    PlanInput,
    RetireInput,
    RewrapBatchInput,
    RewrapBatchResult,
    RotateToInput,
    VerifyInput,
)
from rekey.devstack.temporal import temporal_cli
from tests.replay import corpus
from tests.replay.pre_safety import rotation_v1 as v1

OUT = Path(__file__).parent.parent / "histories"


class Fleet:
    def __init__(self) -> None:
        self.primary = 1
        self.blobs = {f"blob-{i:03d}": 1 for i in range(30)}
        self.hold_rewrap = asyncio.Event()
        self.hold_rewrap.set()

    def activities(self) -> list[Callable[..., Any]]:
        fleet = self

        @activity.defn(name="describe_key")
        async def describe_key(r: KeyRefInput) -> KeyState:
            return KeyState(r.key_ref, fleet.primary, [fleet.primary])

        @activity.defn(name="rotate_key")
        async def rotate_key(r: RotateToInput) -> KeyState:
            fleet.primary = max(fleet.primary, r.target_version)
            return KeyState(r.key_ref, fleet.primary, [])

        @activity.defn(name="count_below")
        async def count_below(r: CountInput) -> int:
            return sum(v < r.below_version for v in fleet.blobs.values())

        @activity.defn(name="plan_batches")
        async def plan_batches(r: PlanInput) -> list[str]:
            ids = sorted(
                b for b, v in fleet.blobs.items() if v < r.below_version and (r.after is None or b > r.after)
            )
            chunks = [ids[i : i + r.size] for i in range(0, len(ids), r.size)]
            return [chunk[-1] for chunk in chunks[: r.count]]

        @activity.defn(name="rewrap_batch")
        async def rewrap_batch(r: RewrapBatchInput) -> RewrapBatchResult:
            await fleet.hold_rewrap.wait()
            done = 0
            for blob in sorted(fleet.blobs):
                if (
                    fleet.blobs[blob] < r.below_version
                    and (r.start is None or blob > r.start)
                    and blob <= (r.end or "~")
                ):
                    fleet.blobs[blob] = r.below_version
                    done += 1
            return RewrapBatchResult(done)

        @activity.defn(name="verify_sample")
        async def verify_sample(r: VerifyInput) -> int:
            return min(r.sample, len(fleet.blobs))

        @activity.defn(name="retire_versions")
        async def retire_versions(r: RetireInput) -> list[int]:
            return list(range(1, r.below_version))

        @activity.defn(name="audit")
        async def audit(r: AuditInput) -> None:
            return None

        return [
            describe_key,
            rotate_key,
            count_below,
            plan_batches,
            rewrap_batch,
            verify_sample,
            retire_versions,
            audit,
        ]


async def _wait_phase(handle: WorkflowHandle[Any, Any], phase: str) -> None:
    async with asyncio.timeout(20):
        while (await handle.query("progress"))["phase"] != phase:
            await asyncio.sleep(0.05)


Scenario = Callable[[WorkflowHandle[Any, Any], Fleet], Awaitable[bool]]


async def awaiting_commit(handle: WorkflowHandle[Any, Any], fleet: Fleet) -> bool:
    await _wait_phase(handle, "AWAITING_COMMIT")
    return False  # stop here: the history ends waiting on the grace timer


async def approve_signal(handle: WorkflowHandle[Any, Any], fleet: Fleet) -> bool:
    await _wait_phase(handle, "AWAITING_COMMIT")
    await handle.signal("approve")
    return True


async def pause_resume_signals(handle: WorkflowHandle[Any, Any], fleet: Fleet) -> bool:
    await _wait_phase(handle, "REWRAPPING")
    await handle.signal("pause")
    fleet.hold_rewrap.set()
    async with asyncio.timeout(20):
        while not (await handle.query("progress"))["paused"]:
            await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)
    await handle.signal("resume")
    await _wait_phase(handle, "AWAITING_COMMIT")
    await handle.signal("approve")
    return True


async def abort_signal(handle: WorkflowHandle[Any, Any], fleet: Fleet) -> bool:
    await _wait_phase(handle, "AWAITING_COMMIT")
    await handle.signal("abort")
    return True


SCENARIOS: dict[str, tuple[Scenario, bool]] = {  # name -> (steps, hold the first batch)
    "awaiting_commit": (awaiting_commit, False),
    "approve_signal": (approve_signal, False),
    "pause_resume_signals": (pause_resume_signals, True),
    "abort_signal": (abort_signal, False),
}


async def record() -> None:
    OUT.mkdir(exist_ok=True)
    env = await WorkflowEnvironment.start_local(dev_server_existing_path=temporal_cli())
    try:
        for name, (steps, hold) in SCENARIOS.items():
            fleet = Fleet()
            if hold:
                fleet.hold_rewrap.clear()
            task_queue = f"pre-safety-{uuid.uuid4()}"
            async with Worker(
                env.client,
                task_queue=task_queue,
                workflows=[v1.RotateKeyWorkflow],
                activities=fleet.activities(),
            ):
                handle = await env.client.start_workflow(
                    v1.RotateKeyWorkflow.run,
                    v1.RotateKeyInput(
                        "vault:replay",
                        grace_seconds=86400,
                        batch_size=10,
                        batches_in_flight=1,
                        started_by="recorder",
                    ),
                    id=f"rotate:vault:replay-{name}",
                    task_queue=task_queue,
                )
                if await steps(handle, fleet):
                    await asyncio.wait_for(handle.result(), 20)
                history = await handle.fetch_history()
            if name == "awaiting_commit":
                await handle.terminate("recorded: the history ends waiting on the grace timer")
            path = OUT / f"pre_safety_{name}.json"
            path.write_text(history.to_json())
            seen = corpus.phases(corpus.load(path))
            entries = corpus.index()
            entries[path.name] = corpus.Entry(path.name, handle.id, seen[-1] if seen else "")
            corpus.write_index(list(entries.values()))
            print(f"{path}: {len(history.events)} events, stops in {seen[-1:]}")
    finally:
        await env.shutdown()


if __name__ == "__main__":
    asyncio.run(record())
