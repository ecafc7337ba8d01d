"""Pieces shared by the rotation benchmarks: a throttled backend with a Temporal dev server, a
``rekey worker`` process with that backend's settings, bulk seeding, and one timed run of
``RotateKeyWorkflow`` with its phase timestamps, the server's own counters and the CPU of every
process involved.

    async with quota_stack("aws-kms", workdir, rate=500) as stack:
        adapter = stack.adapter(key_ref)            # the bench process's own adapter
        adapter.create()
        store = SealedStateStore(stack.store_url)
        with stack.unthrottled():                   # seed with the throttle lifted
            seed_blobs(store, key_ref, 20_000, 64, threaded_wrap_many(adapter))
        run = await stack.rotate(key_ref, 20_000)   # a fresh worker, throttled at R

Seeding never meets the throttle: ``unthrottled()`` lifts it at the server for the while
(``LocalBackend.set_rate(None)``: OpenBao's quota deleted, the proxy unlimited, the emulator's
cryptographic classes unlimited) and puts R back after. Envelopes are sealed locally; their DEKs
are wrapped in bulk (Transit: batch encrypt, 490 per request; AWS and Azure: one wrap per DEK on
a thread pool) and stored in one transaction per chunk.

``bench_rotation`` (OpenBao without a quota) uses the process helpers and ``seed_blobs`` too.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import secrets
import shutil
import subprocess  # starts workers for the benchmarks  # nosec B404
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from temporalio.client import Client

from activities.types import DEFAULT_BATCH, DEFAULT_IN_FLIGHT, TASK_QUEUE
from emulators.profiles import LocalBackend, start_local
from kms_adapters.contract import KmsAdapter
from rekey.backends import adapter_for
from rekey.client import rotation_id
from rekey.codec import data_converter
from rekey.config import Settings
from rekey.devstack.temporal import start_dev_server
from sealing import envelope
from sealing.keywrap import WrappedKey
from sealing.store import NewBlob, SealedStateStore
from workflows.rotation import (
    AWAITING_COMMIT,
    DONE,
    PREPARING,
    REWRAPPING,
    VERIFYING,
    Progress,
    RotateKeyInput,
    RotateKeyWorkflow,
)

SEED_CHUNK = 5000
SEED_THREADS = 8
NAMESPACE = "bench"

#: Wraps a list of DEKs under the key's primary, in order.
WrapMany = Callable[[Sequence[bytes]], list[WrappedKey]]

# ------------------------------------------------------------------------------ processes


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads), from ``/proc``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def peak_rss_mib(pid: int) -> float:
    """The peak resident set (``VmHWM``) of process ``pid``, MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc status")


def children(parent: int | None = None) -> dict[int, str]:
    """The direct child processes of ``parent`` (default: this one): pid -> command line."""
    parent = os.getpid() if parent is None else parent
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == parent:
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
    return found


def load_average() -> tuple[float, float, float]:
    return os.getloadavg()


@contextmanager
def worker_process(home: Path, env: dict[str, str], number: int = 0) -> Iterator[subprocess.Popen[bytes]]:
    """A ``rekey worker`` process (the real CLI) with ``home`` and ``env``; its output goes to
    ``home/worker-<number>.log``. Terminated (then killed) on exit."""
    log = (home / f"worker-{number}.log").open("wb")
    proc = subprocess.Popen(  # argument list, no shell  # nosec B603
        [sys.executable, "-m", "rekey.cli", "--home", str(home), "worker"],
        env=os.environ | env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


# ------------------------------------------------------------------------------- seeding


class CollectingWrapper:
    """Stands in for the KMS while seeding: hands out placeholder slots, keeps the DEKs so they
    can be wrapped in bulk afterwards (the benchmark's own memory only)."""

    def __init__(self, key_ref: str) -> None:
        self.key_ref = key_ref
        self.deks: list[bytes] = []

    def wrap(self, dek: bytes) -> WrappedKey:
        self.deks.append(dek)
        return WrappedKey(b"pending", 1)


def transit_wrap_many(transit: Any, name: str, *, mount: str = "transit", items: int = 490) -> WrapMany:
    """Transit batch encrypt through an hvac ``client.secrets.transit``: one request per
    ``items`` DEKs (OpenBao refuses bodies of more than 1,000 items)."""

    def wrap_many(deks: Sequence[bytes]) -> list[WrappedKey]:
        out: list[WrappedKey] = []
        for at in range(0, len(deks), items):
            batch = [{"plaintext": base64.b64encode(d).decode()} for d in deks[at : at + items]]
            answer = transit.encrypt_data(name, plaintext="", batch_input=batch, mount_point=mount)
            for item in answer["data"]["batch_results"]:
                text = item["ciphertext"]
                out.append(WrappedKey(text.encode(), int(text.split(":", 2)[1].removeprefix("v"))))
        return out

    return wrap_many


def threaded_wrap_many(adapter: KmsAdapter, threads: int = SEED_THREADS) -> WrapMany:
    """One ``adapter.wrap`` per DEK on a pool of ``threads`` (backends without a batch API)."""

    def wrap_many(deks: Sequence[bytes]) -> list[WrappedKey]:
        with ThreadPoolExecutor(threads) as pool:
            return list(pool.map(adapter.wrap, deks))

    return wrap_many


def seed_blobs(
    store: SealedStateStore, key_ref: str, count: int, body: int, wrap_many: WrapMany, *, start: int = 0
) -> None:
    """``count`` sealed blobs named ``item-<7 digits>`` (from ``start``) of ``body`` random bytes
    each, their DEKs wrapped by ``wrap_many``, inserted in one transaction per chunk."""
    for at in range(start, start + count, SEED_CHUNK):
        wrapper = CollectingWrapper(key_ref)
        names = [f"item-{i:07d}" for i in range(at, min(start + count, at + SEED_CHUNK))]
        ids = [uuid.uuid4() for _ in names]
        blobs = [
            bytes(
                envelope.seal(
                    os.urandom(body),
                    wrapper,  # type: ignore[arg-type]
                    namespace=NAMESPACE,
                    name=name,
                    generation="gen-1",
                    blob_id=blob_id,
                )
            )
            for name, blob_id in zip(names, ids, strict=True)
        ]
        wrapped = wrap_many(wrapper.deks)
        rows = []
        for name, blob_id, blob, slot in zip(names, ids, blobs, wrapped, strict=True):
            sealed = envelope.replace_key_slot(blob, envelope.key_slot(blob), slot)
            rows.append(NewBlob(NAMESPACE, name, key_ref, slot.key_version, "gen-1", sealed, str(blob_id)))
        store.insert_many(rows)


# ------------------------------------------------------------------------------ rotation


def phase_seconds(progress: Progress, since: str, until: str) -> float:
    stamps = progress.phase_started
    return (datetime.fromisoformat(stamps[until]) - datetime.fromisoformat(stamps[since])).total_seconds()


async def wait_for_phase(handle: Any, phase: str, timeout: float) -> Progress:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        progress: Progress = await handle.query(RotateKeyWorkflow.progress)
        if progress.phase == phase:
            return progress
        if progress.phase in ("ABORTED", DONE) and phase != DONE:
            raise RuntimeError(f"rotation ended in {progress.phase}: {progress.note}")
        await asyncio.sleep(0.25)
    raise TimeoutError(f"the rotation did not reach {phase} within {timeout:.0f}s")


@dataclass
class RotationRun:
    """One rotation, start to DONE, timed from the workflow's own phase timestamps."""

    blobs: int
    sweep_s: float  # REWRAPPING -> VERIFYING
    rotation_s: float  # PREPARING -> AWAITING_COMMIT
    failed: int  # blobs the sweeps could not re-wrap (Progress.failed)
    throttled_waits: int
    new_version: int
    server: dict[str, Any]  # LocalBackend.stats() over start -> AWAITING_COMMIT
    cpu_s: dict[str, float]  # by role, start -> AWAITING_COMMIT
    wall_s: float  # start -> AWAITING_COMMIT, this process's clock
    load_average: tuple[float, float, float]  # at AWAITING_COMMIT
    worker_peak_rss_mib: float
    final: Progress = field(repr=False)

    @property
    def sweep_per_s(self) -> float:
        return self.blobs / self.sweep_s if self.sweep_s > 0 else float("inf")


def _role(cmdline: str) -> str:
    if "moto_server" in cmdline or "/bao " in cmdline or cmdline.startswith("bao "):
        return "backend"
    if "temporal" in cmdline:
        return "temporal"
    return "other"


class Stack:
    """A throttled backend (``LocalBackend``), a Temporal dev server and a state directory."""

    def __init__(self, local: LocalBackend, client: Client, temporal_address: str, home: Path) -> None:
        self.local = local
        self.client = client
        self.temporal_address = temporal_address
        self.home = home
        self.store_url = f"sqlite:///{home / 'state.db'}"
        self.rate: float | None = local.rate  # what the backend is throttled at now (None: not)
        self.settings = Settings(
            home=home,
            temporal_address=temporal_address,
            store_url=self.store_url,
            **local.settings,  # type: ignore[arg-type]
        )

    def adapter(self, key_ref: str) -> KmsAdapter:
        return adapter_for(self.settings, key_ref)

    def worker_env(self) -> dict[str, str]:
        env = {f"REKEY_{name.upper()}": value for name, value in self.local.settings.items()}
        env["REKEY_TEMPORAL_ADDRESS"] = self.temporal_address
        env["REKEY_STORE_URL"] = self.store_url
        return env

    def set_rate(self, rate: float | None) -> None:
        """Throttle the backend at ``rate`` requests/s from now on (None: not at all)."""
        self.local.set_rate(rate)
        self.rate = rate

    @contextmanager
    def unthrottled(self) -> Iterator[None]:
        """The backend without its throttle for the duration (seeding, baselines); as before after."""
        rate = self.rate
        self.set_rate(None)
        try:
            yield
        finally:
            self.set_rate(rate)

    def _cpu(self, workers: Sequence[int]) -> dict[str, float]:
        out = {
            "worker": sum(cpu_seconds(pid) for pid in workers),
            "backend": 0.0,
            "temporal": 0.0,
            "this_process": time.process_time(),
        }
        for pid, cmdline in children().items():
            role = _role(cmdline)
            if role in ("backend", "temporal"):
                with contextlib.suppress(OSError):
                    out[role] += cpu_seconds(pid)
        return out

    async def rotate(
        self,
        key_ref: str,
        blobs: int,
        *,
        batch_size: int = DEFAULT_BATCH,
        in_flight: int = DEFAULT_IN_FLIGHT,
        workers: int = 1,
        timeout: float = 1800.0,
        settle: float = 1.0,
        env: dict[str, str] | None = None,
    ) -> RotationRun:
        """Rotate ``key_ref`` (``blobs`` stored under it) with ``RotateKeyWorkflow`` on fresh
        ``rekey worker`` processes (``workers`` of them on the task queue; ``env`` added to
        theirs), throttled as the backend is now; approve the commit and wait for DONE. The
        server's counters and the CPU cover start -> AWAITING_COMMIT (worker CPU summed, peak
        memory the largest)."""
        run_home = Path(tempfile.mkdtemp(prefix="worker-", dir=self.home))
        shutil.copytree(self.home / "codec", run_home / "codec", dirs_exist_ok=True)
        with contextlib.ExitStack() as procs:
            pids = [
                procs.enter_context(worker_process(run_home, self.worker_env() | (env or {}), n)).pid
                for n in range(workers)
            ]
            await asyncio.sleep(settle)  # let the workers connect and poll; quota buckets refill
            self.local.reset_stats()
            before, started = self._cpu(pids), time.monotonic()
            handle = await self.client.start_workflow(
                RotateKeyWorkflow.run,
                RotateKeyInput(
                    key_ref,
                    grace_seconds=3600,
                    batch_size=batch_size,
                    batches_in_flight=in_flight,
                    requested_at=datetime.now(UTC).isoformat(),
                ),
                id=rotation_id(key_ref),
                task_queue=TASK_QUEUE,
                execution_timeout=timedelta(seconds=timeout + 300),
            )
            committed = await wait_for_phase(handle, AWAITING_COMMIT, timeout=timeout)
            after, wall = self._cpu(pids), time.monotonic() - started
            server = self.local.stats()
            load = load_average()
            await handle.execute_update(RotateKeyWorkflow.approve)
            final: Progress = await handle.result()
            peak = max(peak_rss_mib(pid) for pid in pids)
        shutil.rmtree(run_home, ignore_errors=True)
        if final.phase != DONE:
            raise RuntimeError(f"rotation of {key_ref} ended in {final.phase}: {final.note}")
        return RotationRun(
            blobs=blobs,
            sweep_s=phase_seconds(committed, REWRAPPING, VERIFYING),
            rotation_s=phase_seconds(committed, PREPARING, AWAITING_COMMIT),
            failed=committed.failed,
            throttled_waits=committed.throttled_waits,
            new_version=final.new_version,
            server=server,
            cpu_s={role: round(after[role] - before[role], 3) for role in before},
            wall_s=wall,
            load_average=load,
            worker_peak_rss_mib=peak,
            final=final,
        )


@contextlib.asynccontextmanager
async def quota_stack(profile: str, workdir: Path | None = None, *, rate: float) -> AsyncIterator[Stack]:
    """``profile`` (``emulators.profiles``) throttled at ``rate`` and a Temporal dev server,
    with a state directory (a fresh temporary one unless ``workdir``) removed on exit."""
    home = Path(tempfile.mkdtemp(prefix=f"rekey-bench-{profile}-", dir=workdir))
    try:
        with start_local(profile, home / "backend", rate=rate) as local:
            env = await start_dev_server(data_converter=data_converter(home))
            try:
                address = env.client.service_client.config.target_host
                yield Stack(local, env.client, address, home)
            finally:
                await env.shutdown()
    finally:
        shutil.rmtree(home, ignore_errors=True)


def fresh_key_name(prefix: str = "bench") -> str:
    return f"{prefix}-{secrets.token_hex(3)}"
