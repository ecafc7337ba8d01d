"""``rekey stress run``: open-loop load through the KMS adapters, with rotations of the key through
the real RotateKeyWorkflow while it runs, recorded in a run directory (format ``rekey-stress/1``,
see docs/stress-run.md and the stress spec).

`run_stress` does, in order:

1. `check_options`: every option checked before anything starts or is written (`StressRunError`,
   exit code 2, one line). An existing non-empty ``out`` is refused unless ``force``.
2. The backend: with ``profile`` a local throttled stack (``emulators.profiles.start_local``)
   under a private temporary home, with ``rotate_every`` also a private Temporal dev server
   (``rekey.devstack.temporal.start_dev_server``) and a ``rekey worker`` process against both;
   all stopped at the end. Without ``profile``, the configured settings (the user's own
   Vault/AWS/Azure and Temporal); with ``rotate_every`` a reachable Temporal and a worker
   polling task queue ``rekey`` are required before anything is written.
3. The key: ``key`` (created on a profile's fresh backend; it must exist otherwise), or a fresh
   ``stress-<random>`` key created for the run and left in place.
4. With ``rotate_every``: ``blobs`` sealed blobs stored under the key (envelopes sealed here,
   their DEKs wrapped by the key through its adapter), so that each rotation re-wraps them.
5. meta.json, then the load (`rekey.stress.generator.run_load`), and, on a thread of its own,
   the rotator: at every ``rotate_every`` since t0 (while before the end of the load) it starts
   a rotation through `rekey.client.RekeyClient.start_rotation` with a grace period of
   ``rotation_grace`` (default half the interval: then the rotation commits, disabling the old
   version, so it ends within its interval; meanwhile the workload's adapters pick up the new
   primary, which some cache for a while) and watches it, appending rotations.jsonl rows. A
   rotation still running when the next is due gets a ``late`` row (an incident) and the next
   rotation is **skipped**, not queued: a key has one rotation at a time (its workflow id), as
   a Temporal Schedule with overlap SKIP does. A
   rotation that stops in BLOCKED is ``failed`` (it needs an operator) and is aborted so the
   next interval can start one (every blob stays readable after an abort). A rotation still
   running at the end of the load is ``unfinished``: with a profile it is lost with the stack;
   against a real Temporal it goes on (``rekey rotate status``).
6. Incidents (`rekey.stress.incidents.IncidentDetector`), fed every seconds row and rotation
   event, written to incidents.jsonl as they are raised.
7. At the end: `rekey.stress.thresholds.conclude` (summary, ``--fail-on`` evaluated, threshold
   incidents) -> summary.json; `RunOutcome.exit_code` 0, 3 (`FAILED_EXIT`) when a threshold
   failed, 130 when the run was interrupted (``stop`` set: the first Ctrl-C).

The worker always uses the normal governor; ``strategy`` only changes the load's adapters.
Temporal is reached through `rekey.client` only (this module imports no temporalio).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import secrets
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

from rekey.stress.incidents import IncidentDetector, write_incident
from rekey.stress.summary import (
    EVENTS,
    FORMAT,
    INCIDENTS,
    META,
    OPS,
    ROTATIONS,
    SECONDS,
    SUMMARY,
    RunDirError,
)
from rekey.stress.thresholds import Threshold, ThresholdError, conclude
from rekey.stress.thresholds import exit_code as threshold_exit_code
from rekey.stress.thresholds import parse as parse_thresholds

if TYPE_CHECKING:
    from rekey.config import Settings

T = TypeVar("T")

BACKENDS: Final = ("vault", "aws", "azure")
STRATEGIES: Final = ("governor", "sdk-default", "naive")
DEFAULT_MIX: Final = {"wrap": 60, "unwrap": 30, "rewrap": 10}
DEFAULT_BLOBS: Final = 100
"""Blobs stored under the key when ``rotate_every`` is given and ``blobs`` is not."""
EXIT_OK: Final = 0
EXIT_USAGE: Final = 2
EXIT_INTERRUPTED: Final = 130
MAX_RATE: Final = 1_000_000.0
MAX_DURATION: Final = 7 * 86400.0
MAX_PROCESSES: Final = 64
MAX_CONCURRENCY: Final = 4096
MAX_BLOBS: Final = 1_000_000
MAX_LABEL: Final = 80
WORKER_LOG: Final = "worker.log"
WORKER_READY_S: Final = 90.0
"""How long a profile run waits for its worker to poll Temporal."""
WATCH_INTERVAL_S: Final = 0.25
PROGRESS_EVERY_S: Final = 1.0
"""At most one ``progress`` row per rotation per this many seconds (phase changes always)."""
SEED_THREADS: Final = 16
BLOB_NAMESPACE: Final = "stress"
BLOB_GENERATION: Final = "stress"
BLOB_BODY: Final = 64
RUN_FILES: Final = (META, SECONDS, ROTATIONS, INCIDENTS, SUMMARY, WORKER_LOG)
"""What ``force`` removes from an existing ``out`` (and the ``events`` directory)."""

_KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


class StressRunError(Exception):
    """An option or the environment a run needs is not usable; one line, nothing started."""

    exit_code = EXIT_USAGE


class StressSetupFailed(Exception):
    """Something the run starts (the local stack, the worker, the key, the blobs) failed."""

    exit_code = 1


class Interrupted(Exception):
    """Stopped (``stop`` set) before the load started: nothing to report."""

    exit_code = EXIT_INTERRUPTED


# ------------------------------------------------------------------------------------ options


@dataclass(frozen=True)
class RunOptions:
    """What ``rekey stress run`` was asked (durations in seconds)."""

    rate: float
    duration: float
    out: Path
    backend: str | None = None
    key: str | None = None
    ramp: float = 0.0
    rotate_every: float | None = None
    rotation_grace: float | None = None
    """Seconds each rotation waits after verifying before it disables the old version (None:
    half of ``rotate_every``)."""
    blobs: int | None = None
    mix: Mapping[str, int] = field(default_factory=lambda: dict(DEFAULT_MIX))
    strategy: str = "governor"
    processes: int = 1
    concurrency: int = 64
    fail_on: str = ""
    profile: str | None = None
    throttle_rate: float | None = None
    label: str = ""
    force: bool = False


@dataclass(frozen=True)
class CheckedOptions:
    """`RunOptions` checked, with what they imply filled in."""

    options: RunOptions
    backend: str
    key_name: str | None
    blobs: int
    rotation_grace: float | None
    thresholds: list[Threshold]
    throttle: dict[str, Any] | None
    """The profile's description (meta.json's ``throttle``) without its live endpoints."""


def _shown(value: object, limit: int = 60) -> str:
    text = str(value)
    clean = "".join(c if c.isprintable() else "?" for c in text[: limit + 1])
    return repr(clean if len(clean) <= limit else clean[: limit - 3] + "...")


def parse_mix(text: str) -> dict[str, int]:
    """``wrap=60,unwrap=30,rewrap=10`` -> weights; an op not in `OPS`, a repeated op, a weight
    that is not a whole number >= 0, or all weights 0 is `StressRunError`."""
    mix: dict[str, int] = {}
    for part in text.split(","):
        op, sep, weight = part.strip().partition("=")
        op = op.strip()
        if not sep:
            raise StressRunError(f"--mix: {_shown(part)} is not OP=WEIGHT (e.g. wrap=60,unwrap=30,rewrap=10)")
        if op not in OPS:
            raise StressRunError(
                f"--mix: unknown operation {_shown(op)}; the operations are {', '.join(OPS)}"
            )
        if op in mix:
            raise StressRunError(f"--mix: {op} given twice")
        weight = weight.strip()
        if not weight.isdigit() or not weight.isascii() or len(weight) > 6:
            raise StressRunError(
                f"--mix: the weight of {op} must be a whole number >= 0, got {_shown(weight)}"
            )
        mix[op] = int(weight)
    if not any(mix.values()):
        raise StressRunError("--mix: at least one weight must be above 0")
    return mix


def _positive(name: str, value: float, top: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise StressRunError(f"{name} must be a number, got {_shown(value)}")
    if not 0 < value <= top:
        raise StressRunError(f"{name} must be above 0 and at most {top:g}, got {value:g}")
    return float(value)


def _whole(name: str, value: int, low: int, top: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= top:
        raise StressRunError(f"{name} must be a whole number from {low} to {top}, got {_shown(value)}")
    return value


def check_label(label: str) -> str:
    if not isinstance(label, str) or len(label) > MAX_LABEL or not label.isprintable():
        raise StressRunError(
            f"--label must be at most {MAX_LABEL} printable characters (no newline or control),"
            f" got {_shown(label)}"
        )
    return label


def check_options(options: RunOptions) -> CheckedOptions:
    """Every option checked and what it implies; `StressRunError` (one line) for the first that
    is not usable. Starts nothing and writes nothing."""
    from emulators.profiles import ProfileError, check_rate, describe_profile, get_profile

    _positive("--rate", options.rate, MAX_RATE)
    _positive("--duration", options.duration, MAX_DURATION)
    if not (math.isfinite(options.ramp) and 0 <= options.ramp <= options.duration):
        raise StressRunError(
            f"--ramp must be from 0 to the duration ({options.duration:g}s), got {options.ramp:g}s"
        )
    if options.rotate_every is not None:
        _positive("--rotate-every", options.rotate_every, MAX_DURATION)
        if options.rotate_every >= options.duration:
            raise StressRunError(
                f"--rotate-every ({options.rotate_every:g}s) must be shorter than --duration"
                f" ({options.duration:g}s): no rotation would start"
            )
    grace = options.rotation_grace
    if grace is not None:
        if options.rotate_every is None:
            raise StressRunError("--rotation-grace needs --rotate-every")
        if not (math.isfinite(grace) and 0 <= grace < options.rotate_every):
            raise StressRunError(
                f"--rotation-grace must be from 0 to less than --rotate-every ({options.rotate_every:g}s),"
                f" got {grace:g}s"
            )
    elif options.rotate_every is not None:
        grace = options.rotate_every / 2
    if options.blobs is not None:
        _whole("--blobs", options.blobs, 0, MAX_BLOBS)
        if options.rotate_every is None:
            raise StressRunError("--blobs needs --rotate-every (the blobs are what each rotation re-wraps)")
    blobs = (DEFAULT_BLOBS if options.blobs is None else options.blobs) if options.rotate_every else 0
    unknown = sorted(set(options.mix) - set(OPS))
    if unknown:
        raise StressRunError(
            f"--mix: unknown operation {_shown(unknown[0])}; the operations are {', '.join(OPS)}"
        )
    if not options.mix or not all(
        isinstance(w, int) and not isinstance(w, bool) and w >= 0 for w in options.mix.values()
    ):
        raise StressRunError("--mix weights must be whole numbers >= 0")
    if not any(options.mix.values()):
        raise StressRunError("--mix: at least one weight must be above 0")
    if options.strategy not in STRATEGIES:
        raise StressRunError(
            f"--strategy must be one of {', '.join(STRATEGIES)}, got {_shown(options.strategy)}"
        )
    _whole("--processes", options.processes, 1, MAX_PROCESSES)
    _whole("--concurrency", options.concurrency, 1, MAX_CONCURRENCY)
    check_label(options.label)
    try:
        thresholds = parse_thresholds(options.fail_on) if options.fail_on.strip() else []
    except ThresholdError as exc:
        raise StressRunError(f"--fail-on: {exc}") from None

    throttle: dict[str, Any] | None = None
    backend = options.backend
    if options.profile is not None:
        try:
            profile = get_profile(options.profile)
            if options.throttle_rate is not None:
                check_rate(options.throttle_rate)
            throttle = describe_profile(profile.name, rate=options.throttle_rate)
        except ProfileError as exc:
            raise StressRunError(f"--profile: {exc}") from None
        if backend is not None and backend != profile.backend:
            raise StressRunError(
                f"--backend {backend} does not match --profile {profile.name} (a {profile.backend} backend)"
            )
        backend = profile.backend
    elif options.throttle_rate is not None:
        raise StressRunError("--throttle-rate needs --profile (it sets the local stack's limit R)")
    if backend is None:
        raise StressRunError("--backend (vault, aws or azure) or --profile is required")
    if backend not in BACKENDS:
        raise StressRunError(f"--backend must be one of {', '.join(BACKENDS)}, got {_shown(backend)}")

    key_name = options.key
    if key_name is not None:
        from kms_adapters.keyref import InvalidKeyRef, KeyRef

        if not isinstance(key_name, str) or not key_name:
            raise StressRunError("--key must not be empty")
        try:
            KeyRef.parse(f"{backend}:{key_name}")
        except InvalidKeyRef as exc:
            raise StressRunError(f"--key: {exc}") from None
        if not key_name.isprintable():
            raise StressRunError(f"--key {_shown(key_name)} holds unprintable characters")
    check_out(options.out, force=options.force)
    return CheckedOptions(options, backend, key_name, blobs, grace, thresholds, throttle)


def check_out(out: Path, *, force: bool) -> None:
    """``out`` must be a directory that does not exist or is empty (any, with ``force``)."""
    text = str(out)
    if not text or not text.isprintable():
        raise StressRunError(f"--out {_shown(text)} is not a usable path")
    if out.is_symlink():
        raise StressRunError(f"--out {text} is a symbolic link: give the directory itself")
    if out.exists() and not out.is_dir():
        raise StressRunError(f"--out {text} exists and is not a directory")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not force:
        raise StressRunError(
            f"--out {text} exists and is not empty (use --force to write a run into it anyway)"
        )
    # --force replaces a previous run, and only that: never a directory of something else.
    entries = {entry.name: entry for entry in out.iterdir()}
    if _previous_format(out / META) != FORMAT:
        raise StressRunError(
            f"--out {text} is not empty and holds no stress run: --force only replaces a run"
        )
    known = {*RUN_FILES, EVENTS}
    unknown = sorted(name for name in entries if name not in known and not _is_leftover_tmp(name))
    if unknown:
        raise StressRunError(
            f"--out {text} holds {_shown(unknown[0])}, which is not part of a run:"
            " --force only replaces a run"
        )
    linked = sorted(name for name, entry in entries.items() if entry.is_symlink())
    if linked:
        raise StressRunError(f"--out {text}: {_shown(linked[0])} is a symbolic link: refusing to replace it")


def _is_leftover_tmp(name: str) -> bool:
    """A temporary file of a crashed run's atomic write (``.meta.json.XXXX.tmp``)."""
    return name.startswith(".") and name.endswith(".tmp")


def _previous_format(meta: Path) -> str | None:
    """The ``format`` of an earlier run's meta.json, or None if there is none readable."""
    try:
        if meta.is_symlink() or meta.stat().st_size > 1_000_000:
            return None
        data = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data.get("format") if isinstance(data, dict) else None


# ------------------------------------------------------------------------------------ outcome


@dataclass(frozen=True)
class RunOutcome:
    """The end of a run: its directory, summary (summary.json's content) and exit code."""

    run_dir: Path
    summary: dict[str, Any]
    exit_code: int
    interrupted: bool
    key_ref: str
    key_created: bool
    rotations: dict[str, int]
    """Rotation ends by event: done, failed, late, unfinished, skipped."""


class RunObserver:
    """What a run tells whoever shows it (the CLI's live display). Every method may be called
    from another thread than the caller's; keep them short."""

    def note(self, text: str) -> None:
        """A line about what the run is doing (starting the stack, the key it created)."""

    def started(self, meta: Mapping[str, Any]) -> None:
        """The load's second 0 began (meta.json is final)."""

    def second(self, row: Mapping[str, Any]) -> None:
        """A seconds.jsonl row as written."""

    def rotation(self, event: Mapping[str, Any]) -> None:
        """A rotations.jsonl row as written."""

    def incident(self, incident: Mapping[str, Any]) -> None:
        """An incident as written to incidents.jsonl."""


# ------------------------------------------------------------------------------------- files


def _write_json_atomic(path: Path, data: Any) -> None:
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # O_EXCL
    tmp = Path(name)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(data, indent=2, allow_nan=False, default=str) + "\n")
    os.replace(tmp, path)


class JsonlWriter:
    """Appends one JSON object a line, flushed at each row (thread-safe)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def append(self, row: Mapping[str, Any]) -> None:
        line = json.dumps(dict(row), allow_nan=False, separators=(",", ":"), default=str) + "\n"
        with self._lock, open(self.path, "a", encoding="utf-8") as file:
            file.write(line)
            file.flush()


def _rekey_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("rekey")
    except PackageNotFoundError:
        return "unknown"


def _settings_fields(settings: Settings) -> dict[str, Any]:
    """``settings`` as the plain field values a child process rebuilds `Settings` from."""
    values: dict[str, Any] = {}
    for item in fields(settings):
        value = getattr(settings, item.name)
        values[item.name] = str(value) if isinstance(value, Path) else value
    return values


# --------------------------------------------------------------------------- the event loop


class _Loop:
    """An asyncio loop on a thread of its own: the rotator and every Temporal call run there
    while the load runs on the calling thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="stress-rotations", daemon=True)
        self._thread.start()

    def call(self, factory: Callable[[], Coroutine[Any, Any, T]], timeout: float | None = None) -> T:
        return asyncio.run_coroutine_threadsafe(factory(), self.loop).result(timeout)

    def submit(self, factory: Callable[[], Coroutine[Any, Any, T]]) -> Any:
        return asyncio.run_coroutine_threadsafe(factory(), self.loop)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        if not self.loop.is_running():
            self.loop.close()


# --------------------------------------------------------------------------------- the stack


@dataclass
class Stack:
    """Where a run's load and rotations go: settings, and (with rotations) a client."""

    settings: Settings
    client: Any = None  # rekey.client.RekeyClient
    throttle: dict[str, Any] | None = None
    local: Any = None  # emulators.profiles.LocalBackend


def _quietly(action: Callable[[], object]) -> None:
    """Stopping a part of the local stack must not hide the run's outcome: a server already
    gone (a Ctrl-C at the terminal reaches the processes of its group too) is fine."""
    with contextlib.suppress(Exception):
        action()


@contextlib.contextmanager
def _quiet_exit(manager: contextlib.AbstractContextManager[T]) -> Iterator[T]:
    """``manager`` entered, and exited with `_quietly`."""
    value = manager.__enter__()
    try:
        yield value
    finally:
        _quietly(lambda: manager.__exit__(None, None, None))


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:300] or type(error).__name__


def _tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])


@contextlib.contextmanager
def _worker(settings: Settings, log_path: Path) -> Iterator[int]:
    """A ``rekey worker`` process on ``settings`` (its own session, output to ``log_path``);
    SIGTERM at the end (SIGKILL if it does not stop)."""
    from rekey.devstack.processes import spawn, terminate

    env = {k: v for k, v in os.environ.items() if not k.startswith("REKEY_")} | settings.environ()
    command = [
        sys.executable,
        "-m",
        "rekey.cli",
        "--home",
        str(settings.home),
        "worker",
        "--shutdown-timeout",
        "5s",
    ]
    with open(log_path, "ab") as log:
        process = spawn(command, env, log)
    try:
        yield process.pid
    finally:
        terminate(process.pid)
        with contextlib.suppress(Exception):
            process.wait(timeout=5)


async def _wait_for_worker(client: Any, pid: int, log_path: Path) -> None:
    from rekey.client import worker_polling
    from rekey.devstack.processes import pid_alive

    deadline = time.monotonic() + WORKER_READY_S
    while not await worker_polling(client.temporal, client.task_queue):
        if not pid_alive(pid):
            raise StressSetupFailed(f"the rekey worker exited at start-up: {_tail(log_path) or 'no output'}")
        if time.monotonic() > deadline:
            raise StressSetupFailed(f"the rekey worker did not poll Temporal within {WORKER_READY_S:.0f}s")
        await asyncio.sleep(0.5)


def check_configured_temporal(settings: Settings) -> None:
    """For a run without a profile, with rotations: Temporal answers and a worker polls task
    queue ``rekey`` (`StressRunError`, exit 2, otherwise). Nothing is written."""
    from rekey.client import RekeyClient, RekeyClientError, worker_polling

    async def check() -> None:
        try:
            client = await RekeyClient.connect(settings)
            polling = await worker_polling(client.temporal, client.task_queue)
        except RekeyClientError as exc:
            raise StressRunError(f"--rotate-every needs Temporal: {_one_line(exc)}") from None
        if not polling:
            raise StressRunError(
                f"--rotate-every needs a rekey worker polling task queue {client.task_queue!r} on"
                f" {settings.temporal_address} (start one with `rekey worker`), or use --profile"
            )

    asyncio.run(check())


# ------------------------------------------------------------------------------- blobs, key


def seed_blobs(
    settings: Settings, key_ref: str, count: int, run_id: str, *, stop: threading.Event | None = None
) -> int:
    """Store ``count`` sealed blobs under ``key_ref`` (namespace ``stress``, names
    ``<run_id>-<n>``): envelopes sealed here with random bodies, each DEK wrapped by the key
    through its adapter (normal governor), inserted in bulk. Returns how many were stored."""
    from rekey.backends import adapter_for
    from sealing import envelope
    from sealing.store import NewBlob, SealedStateStore

    if count <= 0:
        return 0
    adapter = adapter_for(settings, key_ref)
    store = SealedStateStore(settings.store_url, create=True)

    def one(index: int) -> NewBlob:
        blob_id = uuid.uuid4()
        name = f"{run_id}-{index:07d}"
        sealed = envelope.seal(
            os.urandom(BLOB_BODY),
            adapter,
            namespace=BLOB_NAMESPACE,
            name=name,
            generation=BLOB_GENERATION,
            blob_id=blob_id,
        )
        version = envelope.key_slot(sealed).key_version
        return NewBlob(BLOB_NAMESPACE, name, key_ref, version, BLOB_GENERATION, bytes(sealed), str(blob_id))

    stored = 0
    try:
        with ThreadPoolExecutor(max_workers=SEED_THREADS) as pool:
            for start in range(0, count, 500):
                if stop is not None and stop.is_set():
                    break
                rows = list(pool.map(one, range(start, min(count, start + 500))))
                store.insert_many(rows)
                stored += len(rows)
    finally:
        store.close()
    return stored


def _key(settings: Settings, backend: str, name: str | None, *, create_given: bool) -> tuple[str, bool]:
    """The run's key ref and whether it was created for the run."""
    from rekey.backends import adapter_for
    from sealing.errors import UnknownKey

    if name is None:
        ref = f"{backend}:stress-{secrets.token_hex(4)}"
        adapter_for(settings, ref).create()
        return ref, True
    ref = f"{backend}:{name}"
    adapter = adapter_for(settings, ref)
    if create_given:
        _info, created = adapter.create()
        return ref, created
    try:
        adapter.describe()
    except UnknownKey:
        raise StressRunError(
            f"--key {name}: key {ref} does not exist (create it with `rekey key create {ref}`,"
            " or leave --key out for a fresh one)"
        ) from None
    return ref, False


# ---------------------------------------------------------------------------------- rotator


class Rotator:
    """Starts a rotation of the key every ``every`` seconds since t0 while before ``until``,
    and watches each (see the module's docstring: late, skipped, failed, unfinished). Runs on
    the run's event loop."""

    def __init__(
        self,
        client: Any,
        key_ref: str,
        *,
        every: float,
        grace: float,
        until: float,
        run_id: str,
        record: Callable[[dict[str, Any]], None],
        clock: Callable[[], float],
        stopped: Callable[[], bool] = lambda: False,
    ) -> None:
        self.client = client
        self.key_ref = key_ref
        self.every = every
        self.grace = grace
        self.until = until
        self.run_id = run_id
        self.record = record
        self.clock = clock
        self.stopped = stopped
        """Whether the run is being interrupted: a rotation that cannot be watched any more then
        is unfinished, not failed (a Ctrl-C at the terminal also stops a profile's Temporal)."""
        self.counts = {"started": 0, "done": 0, "failed": 0, "late": 0, "unfinished": 0, "skipped": 0}
        self._end = asyncio.Event()
        self._current: asyncio.Task[None] | None = None
        self._current_id = ""
        self._late: set[str] = set()
        self._stuck = ""
        """Why no more rotations are started (a BLOCKED rotation the run could not abort)."""
        self._state: dict[str, Any] = {}

    def end(self) -> None:
        """The load ended (or was stopped): start no more rotations."""
        self._end.set()

    def _row(self, event: str, rid: str, message: str = "", **progress: Any) -> None:
        state = self._state.setdefault(rid, {"phase": "PREPARING", "rewrapped": 0, "total": 0})
        state.update({k: v for k, v in progress.items() if v is not None})
        if event in self.counts:
            self.counts[event] += 1
        self.record(
            {
                "t": round(self.clock(), 3),
                "rotation_id": rid,
                "event": event,
                "phase": state["phase"],
                "rewrapped": int(state["rewrapped"]),
                "total": int(state["total"]),
                "message": message,
            }
        )

    async def run(self) -> None:
        number = 0
        try:
            while True:
                number += 1
                due = number * self.every
                if due >= self.until:
                    break
                try:
                    await asyncio.wait_for(self._end.wait(), timeout=max(0.0, due - self.clock()))
                    break  # the load ended first
                except TimeoutError:
                    pass
                if self._stuck:  # the key's rotation needs an operator: report it once, start none
                    self.counts["skipped"] += 1
                    continue
                if self._current is not None and not self._current.done():
                    self.counts["skipped"] += 1
                    if self._current_id not in self._late:  # one late row per rotation
                        self._late.add(self._current_id)
                        self._row(
                            "late",
                            self._current_id,
                            f"still running when rotation {number} was due; rotation {number} skipped"
                            " (one rotation per key at a time; later ones too while it runs)",
                        )
                    continue
                self._current_id = f"rot-{number}"
                self._current = asyncio.create_task(self._rotate(self._current_id))
            await self._end.wait()
        finally:
            if self._current is not None and not self._current.done():
                self._current.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self._current

    async def _rotate(self, rid: str) -> None:
        from rekey.client import (
            BLOCKED,
            DONE,
            RekeyClientError,
            RotationBlocked,
            RotationFailed,
        )

        self.counts["started"] += 1
        try:
            handle = await self.client.start_rotation(
                self.key_ref, grace=self.grace, started_by=f"rekey stress run {self.run_id}"
            )
        except RekeyClientError as exc:
            self._row("start", rid, "could not start")
            self._row("failed", rid, f"start refused: {_one_line(exc)}")
            return
        how = "started" if handle.started else "attached to the running rotation"
        self._row("start", rid, f"{handle.id} ({how})", phase="PREPARING", rewrapped=0, total=0)
        phase, done, last = "PREPARING", 0, 0.0
        final: Any = None
        try:
            try:
                async for final in handle.watch(interval=WATCH_INTERVAL_S):
                    if final.phase != phase and final.phase != DONE:
                        phase, done = final.phase, final.rewrapped
                        self._row(
                            "phase", rid, phase=final.phase, rewrapped=final.rewrapped, total=final.total
                        )
                    elif final.rewrapped != done and self.clock() - last >= PROGRESS_EVERY_S:
                        done, last = final.rewrapped, self.clock()
                        self._row("progress", rid, rewrapped=final.rewrapped, total=final.total)
            except RotationBlocked as exc:
                where = exc.progress.blocked_in or phase
                reason = exc.progress.blocked_reason or _one_line(exc)
                message = f"blocked: {reason}"
                if not handle.started:  # an operator's rotation: not ours to abort
                    self._stuck = f"{handle.id} is BLOCKED and was not started by this run"
                else:
                    try:
                        await handle.abort()  # so that the next interval can start one
                    except RekeyClientError as exc:
                        self._stuck = f"{handle.id} is BLOCKED and its abort was refused: {_one_line(exc)}"
                if self._stuck:
                    message = f"{self._stuck}; no further rotations this run ({message})"
                self._row("failed", rid, message[:300], phase=where)
                return
            except RotationFailed as exc:
                self._row("failed", rid, _one_line(exc))
                return
            except RekeyClientError as exc:
                if self.stopped():
                    self._row("unfinished", rid, f"run interrupted in {phase}: {_one_line(exc)}"[:300])
                else:
                    self._row("failed", rid, f"cannot watch: {_one_line(exc)}")
                return
        except asyncio.CancelledError:
            self._row("unfinished", rid, f"still running when the load ended (in {phase})")
            raise
        if final is not None and final.phase == DONE:
            self._row(
                "done",
                rid,
                f"version {final.new_version}",
                phase=DONE,
                rewrapped=final.rewrapped,
                total=final.total,
            )
        else:
            ended = final.phase if final is not None else "?"
            if ended == BLOCKED:
                ended = f"BLOCKED in {final.blocked_in}: {final.blocked_reason}"
            self._row("failed", rid, f"ended {ended}"[:300])


# ---------------------------------------------------------------------------------- the run


def _new_run_id() -> str:
    return f"{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}-{secrets.token_hex(3)}"


def _prepare_out(out: Path, *, force: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if force:  # check_out made sure that this is a previous run, without symbolic links
        for name in [*RUN_FILES, *filter(_is_leftover_tmp, os.listdir(out))]:
            with contextlib.suppress(FileNotFoundError):
                (out / name).unlink()
        if (out / EVENTS).is_dir() and not (out / EVENTS).is_symlink():
            shutil.rmtree(out / EVENTS)


def run_stress(
    options: RunOptions,
    *,
    settings: Settings | None = None,
    observer: RunObserver | None = None,
    stop: threading.Event | None = None,
) -> RunOutcome:
    """Run the stress test ``options`` describe (see the module's docstring) and return its
    outcome. ``settings``: the configured settings, used without a profile (required then).
    ``stop``: set it (the first Ctrl-C) to end the load early; the run is finalized with
    ``interrupted`` and exit code 130.

    `StressRunError` (exit 2) for bad options or a missing Temporal/worker, before anything
    is written; `StressSetupFailed` (exit 1) if the local stack, the worker, the key or the
    blobs cannot be set up."""
    checked = check_options(options)
    observer = observer or RunObserver()
    stop = stop or threading.Event()
    if options.profile is None:
        if settings is None:
            raise StressRunError("a run without --profile needs the configured settings")
        if options.rotate_every is not None:
            check_configured_temporal(settings)
        # The key before the run directory: a --key that does not exist writes nothing.
        key = _run_key(checked, settings)
    else:
        key = None  # made on the profile's backend, once it runs
    out = options.out
    _prepare_out(out, force=options.force)
    loop = _Loop()
    try:
        with contextlib.ExitStack() as stack:
            built = _build_stack(checked, settings, loop, stack, observer, out)
            return _run(checked, built, loop, observer, stop, key)
    finally:
        loop.close()


def _run_key(checked: CheckedOptions, settings: Settings) -> tuple[str, bool]:
    try:
        return _key(
            settings, checked.backend, checked.key_name, create_given=checked.options.profile is not None
        )
    except StressRunError:
        raise
    except Exception as exc:
        raise StressSetupFailed(f"cannot set up the key on {checked.backend}: {_one_line(exc)}") from None


def _build_stack(
    checked: CheckedOptions,
    settings: Settings | None,
    loop: _Loop,
    stack: contextlib.ExitStack,
    observer: RunObserver,
    out: Path,
) -> Stack:
    options = checked.options
    if options.profile is None:
        assert settings is not None  # nosec B101 # checked by run_stress
        built = Stack(settings)
        if options.rotate_every is not None:
            from rekey.client import RekeyClient

            built.client = loop.call(lambda: RekeyClient.connect(settings))
        return built

    from emulators.profiles import ProfileError, start_local
    from rekey.client import RekeyClient, data_converter
    from rekey.config import ConfigError, load_settings
    from rekey.devstack.temporal import start_dev_server

    workdir = Path(tempfile.mkdtemp(prefix="rekey-stress-"))
    stack.callback(shutil.rmtree, workdir, True)
    home = workdir / "home"
    observer.note(f"starting the {options.profile} profile's backend (local, throttled)")
    try:
        local = stack.enter_context(
            start_local(options.profile, workdir / "backend", rate=options.throttle_rate)
        )
    except ProfileError as exc:
        raise StressRunError(f"--profile: {exc}") from None
    except Exception as exc:
        raise StressSetupFailed(f"cannot start the {options.profile} backend: {_one_line(exc)}") from None
    try:
        run_settings = load_settings(home, environ={}, **local.settings)
    except ConfigError as exc:
        raise StressSetupFailed(f"the {options.profile} backend's settings: {exc}") from None
    described = local.describe()
    # Endpoints only: a token (OpenBao's root token, even a dev one) is not for a run directory.
    endpoints = {k: v for k, v in dict(described.get("endpoints") or {}).items() if "token" not in k}
    built = Stack(run_settings, throttle={**described, "endpoints": endpoints}, local=local)
    if options.rotate_every is None:
        return built
    observer.note("starting a private Temporal dev server and a rekey worker")
    try:
        env = loop.call(lambda: start_dev_server(data_converter=data_converter(run_settings)))
    except Exception as exc:
        raise StressSetupFailed(f"cannot start a Temporal dev server: {_one_line(exc)}") from None
    stack.callback(_quietly, lambda: loop.call(env.shutdown, timeout=30))
    address = env.client.service_client.config.target_host
    run_settings = load_settings(home, environ={}, temporal_address=address, **local.settings)
    built.settings = run_settings
    built.client = RekeyClient(env.client, adapters=lambda ref: _adapter(run_settings, ref))
    log_path = out / WORKER_LOG
    pid = stack.enter_context(_worker(run_settings, log_path))
    loop.call(lambda: _wait_for_worker(built.client, pid, log_path))
    return built


def _adapter(settings: Settings, key_ref: str) -> Any:
    from rekey.backends import adapter_for

    return adapter_for(settings, key_ref)


def _run(
    checked: CheckedOptions,
    built: Stack,
    loop: _Loop,
    observer: RunObserver,
    stop: threading.Event,
    key: tuple[str, bool] | None,
) -> RunOutcome:
    from rekey.stress.generator import LoadPlan, WorkloadSpec, run_load

    options = checked.options
    out = options.out
    run_id = _new_run_id()
    key_ref, created = key if key is not None else _run_key(checked, built.settings)
    observer.note(
        f"{'created a fresh key' if created else 'using key'} {key_ref} for this run"
        + (" (left in place afterwards)" if created and options.profile is None else "")
    )
    if checked.blobs:
        observer.note(f"storing {checked.blobs} sealed blobs under {key_ref} for the rotations to re-wrap")
        try:
            seed_blobs(built.settings, key_ref, checked.blobs, run_id, stop=stop)
        except Exception as exc:
            raise StressSetupFailed(f"cannot store the blobs under {key_ref}: {_one_line(exc)}") from None
    if stop.is_set():
        raise Interrupted("interrupted before the load started: nothing recorded")

    meta: dict[str, Any] = {
        "format": FORMAT,
        "run_id": run_id,
        "label": options.label,
        "backend": checked.backend,
        "key_ref": key_ref,
        "profile": options.profile,
        "strategy": options.strategy,
        "rate": float(options.rate),
        "duration": float(options.duration),
        "ramp": float(options.ramp),
        "mix": dict(options.mix),
        "processes": options.processes,
        "concurrency": options.concurrency,
        "rotate_every": options.rotate_every,
        "rotation_grace": checked.rotation_grace,
        "blobs": checked.blobs,
        "fail_on": options.fail_on,
        "started_at": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "t0_unix": None,
        "throttle": built.throttle,
        "rekey_version": _rekey_version(),
    }
    _write_json_atomic(out / META, meta)
    rotations_file = JsonlWriter(out / ROTATIONS)
    incidents_path = out / INCIDENTS

    def on_incident(incident: dict[str, Any]) -> None:
        write_incident(incidents_path, incident)
        observer.incident(incident)

    detector = IncidentDetector(options.rotate_every, on_incident=on_incident)
    t0_box: list[float] = []
    started = threading.Event()

    def clock() -> float:
        return time.time() - t0_box[0] if t0_box else 0.0

    def record_rotation(row: dict[str, Any]) -> None:
        rotations_file.append(row)
        observer.rotation(row)
        detector.on_rotation(row)

    rotator: Rotator | None = None
    rotating: Any = None
    if options.rotate_every is not None and built.client is not None:
        rotator = Rotator(
            built.client,
            key_ref,
            every=options.rotate_every,
            grace=checked.rotation_grace or 0.0,
            until=options.duration,
            run_id=run_id,
            record=record_rotation,
            clock=clock,
            stopped=stop.is_set,
        )

    def on_start(t0: float) -> None:
        t0_box.append(t0)
        meta["t0_unix"] = t0
        meta["started_at"] = (
            datetime.fromtimestamp(t0, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
        )
        _write_json_atomic(out / META, meta)
        started.set()
        observer.started(meta)
        nonlocal rotating
        if rotator is not None:
            rotating = loop.submit(rotator.run)

    def on_second(row: dict[str, Any]) -> None:
        detector.on_second(row)
        observer.second(row)

    plan = LoadPlan(
        rate=float(options.rate),
        duration=float(options.duration),
        ramp=float(options.ramp),
        mix=dict(options.mix),
        processes=options.processes,
        concurrency=options.concurrency,
    )
    workload = WorkloadSpec(
        key_ref=key_ref, strategy=options.strategy, settings=_settings_fields(built.settings)
    )
    try:
        result = run_load(plan, workload, out, on_start=on_start, on_second=on_second, stop=stop)
    finally:
        if rotator is not None:
            loop.loop.call_soon_threadsafe(rotator.end)
            if rotating is not None:
                with contextlib.suppress(Exception):
                    rotating.result(timeout=30)
    interrupted = bool(result.interrupted or stop.is_set())
    elapsed = float(result.elapsed) if result.elapsed and result.elapsed > 0 else float(options.duration)
    detector.finish(elapsed)
    try:
        summary = conclude(out, checked.thresholds, elapsed=elapsed, interrupted=interrupted)
    except RunDirError as exc:  # e.g. not one operation completed (all still in flight at the end)
        raise StressSetupFailed(f"the run recorded nothing to summarize: {exc}") from None
    _write_json_atomic(out / SUMMARY, summary)
    code = EXIT_INTERRUPTED if interrupted else threshold_exit_code(summary.get("thresholds", []))
    counts = dict(rotator.counts) if rotator is not None else {}
    return RunOutcome(out, summary, code, interrupted, key_ref, created, counts)
