"""What one stress operation does, in the process that runs it, and how its outcome is classed.

`WorkloadSpec` (picklable) says which key and strategy; each generator process calls
`Workload.build` to make its own adapter:

- ``governor``: ``rekey.backends.adapter_for(settings, key_ref)``, the endpoint's normal governor;
- ``sdk-default``: aws/azure ``PassThroughGovernor(endpoint, attempts=1, counts=False)`` and the
  adapter built with ``sdk_retries=True`` (the SDK's own retries, counted by its hooks); vault
  (hvac has no retries) ``PassThroughGovernor(endpoint, attempts=1)``;
- ``naive``: ``PassThroughGovernor(endpoint, attempts=10)``: a retryable error resent at once, up
  to 10 attempts, SDK retries off.

The ``null`` backend (``null:NAME``) is an in-process fake with the adapter's wrap, unwrap,
rewrap and version_of, answering after ``WorkloadSpec.null_delay``: the generator's self-test and
benchmark. Its versions can be changed while a run goes on through a small JSON state file named
by the ``null_state`` entry of ``WorkloadSpec.settings`` (``{"primary": 2, "disabled": [1]}``),
which every process re-reads when it changes (see `NullAdapter`).

One op (`Workload.execute`): ``wrap`` wraps a fresh random 32-byte DEK (dropped at once);
``unwrap`` and ``rewrap`` draw a ciphertext from a ring of this process's recent wraps on the
newest version it has seen (a newer version empties the ring; a rewrap's result joins it). The
ring holds wrapped ciphertexts only: no DEK or plaintext is kept or logged. Before the run each
process wraps a few DEKs to fill the ring; should it still be empty, an unwrap or rewrap is done
as a wrap (and recorded as one). Each op runs inside ``kms_adapters.governor.accounting()``,
which counts its attempts, throttled attempts and time spent waiting.

Outcome classes (`classify`, the names of ``rekey.stress.summary.OUTCOMES``): ``Throttled`` ->
throttled, ``Unavailable`` (``AnswerLost``, ``CircuitOpen``) -> unavailable, ``VersionDisabled``
-> version_disabled, ``NotFound`` -> not_found, ``PermissionDenied``/``PolicyDenied`` -> denied,
``InvalidCiphertext``/``InvalidRequest`` (and the sealing layer's ``InvalidWrappedKey``) ->
invalid, anything else -> error.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol

from kms_adapters.accounting import accounting, record_attempt
from kms_adapters.errors import (
    InvalidCiphertext,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    PolicyDenied,
    Throttled,
    Unavailable,
    VersionDisabled,
)
from kms_adapters.governor import Governor, PassThroughGovernor
from sealing.errors import InvalidWrappedKey, KeyServiceUnavailable, UnknownKey, UnknownKeyVersion
from sealing.keywrap import DEK_BYTES, WrappedKey

STRATEGIES: Final = ("governor", "sdk-default", "naive")
BACKENDS: Final = ("vault", "aws", "azure", "null")
NAIVE_ATTEMPTS: Final = 10
PRESEED: Final = 8
"""Wraps each process makes before the run to fill its ring."""


class WorkloadError(ValueError):
    """A workload that cannot be built (unknown strategy or backend, bad settings); one line."""

    exit_code = 2


@dataclass(frozen=True)
class WorkloadSpec:
    """What every generator process builds its adapter from (picklable)."""

    key_ref: str
    """``vault:name`` | ``aws:name`` | ``azure:name`` | ``null:name``."""
    strategy: str
    """governor | sdk-default | naive."""
    settings: Mapping[str, Any] = field(default_factory=dict)
    """rekey Settings fields (``home`` as str) to rebuild Settings in the child (``null``: only
    the optional ``null_state`` path)."""
    null_delay: float = 0.0
    """The null backend answers after this fixed delay (s)."""
    ring: int = 1024
    """unwrap/rewrap draw from the last ``ring`` own wraps on the newest version."""

    @property
    def backend(self) -> str:
        return self.key_ref.partition(":")[0]

    def check(self) -> None:
        """`WorkloadError` for what no process could build (before any process starts)."""
        backend, sep, name = self.key_ref.partition(":")
        if not sep or not name:
            raise WorkloadError(f"key reference {self.key_ref!r} is not backend:name")
        if backend not in BACKENDS:
            raise WorkloadError(f"unknown backend {backend!r} (known: {', '.join(BACKENDS)})")
        if self.strategy not in STRATEGIES:
            raise WorkloadError(f"unknown strategy {self.strategy!r} (known: {', '.join(STRATEGIES)})")
        if not (isinstance(self.null_delay, int | float) and 0 <= self.null_delay < 3600):
            raise WorkloadError(f"null_delay must be seconds >= 0, not {self.null_delay!r}")
        if isinstance(self.ring, bool) or not isinstance(self.ring, int) or self.ring < 1:
            raise WorkloadError(f"ring must be a whole number >= 1, not {self.ring!r}")


class OpAdapter(Protocol):
    """The part of ``KmsAdapter`` a stress op uses."""

    def wrap(self, dek: bytes) -> WrappedKey: ...

    def unwrap(self, wrapped: bytes) -> bytes: ...

    def rewrap(self, wrapped: bytes) -> WrappedKey: ...

    def version_of(self, wrapped: bytes) -> int: ...


# -- the null backend ---------------------------------------------------------------------------

_NULL_PREFIX: Final = b"null:v"


class NullAdapter:
    """An in-process fake KMS key: answers after ``delay`` seconds, never sees the network.

    Versions: ``primary`` (new wraps and rewraps use it) and a set of ``disabled`` ones (unwrap and
    rewrap of their ciphertexts raise ``VersionDisabled``; a wrap while the primary is disabled
    too). Change them with `rotate`, `disable_version`, `enable_version`, or from another process
    through the JSON ``state_file`` (``{"primary": n, "disabled": [..]}``, re-read at most every
    ``poll`` s when its mtime changes). A ciphertext is ``null:v<version>:<16 random bytes hex>``:
    the DEK is not in it and is dropped at once; unwrap answers 32 zero bytes."""

    backend = "null"

    def __init__(
        self, name: str, *, delay: float = 0.0, state_file: str | None = None, poll: float = 0.02
    ) -> None:
        self._ref = f"null:{name}"
        self._delay = float(delay)
        self._lock = threading.Lock()
        self._primary = 1
        self._disabled: frozenset[int] = frozenset()
        self._state_file = Path(state_file) if state_file else None
        self._poll = poll
        self._checked = 0.0
        self._mtime: int | None = None
        self.calls = 0

    @property
    def key_ref(self) -> str:
        return self._ref

    # versions
    def rotate(self) -> int:
        with self._lock:
            self._primary += 1
            return self._primary

    def disable_version(self, version: int) -> None:
        with self._lock:
            self._disabled = self._disabled | {version}

    def enable_version(self, version: int) -> None:
        with self._lock:
            self._disabled = self._disabled - {version}

    @property
    def primary(self) -> int:
        self._refresh()
        return self._primary

    def _refresh(self) -> None:
        if self._state_file is None:
            return
        now = time.monotonic()
        if now - self._checked < self._poll:
            return
        self._checked = now
        try:
            mtime = self._state_file.stat().st_mtime_ns
            if mtime == self._mtime:
                return
            state = json.loads(self._state_file.read_text(encoding="utf-8"))
            primary = int(state.get("primary", self._primary))
            disabled = frozenset(int(v) for v in state.get("disabled", ()))
        except (OSError, ValueError, TypeError, AttributeError):
            return  # absent or being written: keep the last state
        with self._lock:
            self._mtime, self._primary, self._disabled = mtime, primary, disabled

    def _answer(self) -> None:
        record_attempt()  # one request "sent", as a governed call would count it
        self.calls += 1
        if self._delay > 0:
            time.sleep(self._delay)
        self._refresh()

    def _new(self) -> WrappedKey:
        version = self._primary
        if version in self._disabled:
            raise VersionDisabled(f"{self._ref}: primary version {version} is disabled")
        return WrappedKey(b"%s%d:%s" % (_NULL_PREFIX, version, os.urandom(16).hex().encode()), version)

    def version_of(self, wrapped: bytes) -> int:
        if not wrapped.startswith(_NULL_PREFIX):
            raise InvalidCiphertext(f"{self._ref}: not a null ciphertext")
        try:
            return int(wrapped[len(_NULL_PREFIX) :].split(b":", 1)[0])
        except ValueError:
            raise InvalidCiphertext(f"{self._ref}: not a null ciphertext") from None

    def _check(self, wrapped: bytes) -> None:
        version = self.version_of(wrapped)
        if version > self._primary or version < 1:
            raise InvalidCiphertext(f"{self._ref}: no version {version}")
        if version in self._disabled:
            raise VersionDisabled(f"{self._ref}: version {version} is disabled")

    def wrap(self, dek: bytes) -> WrappedKey:
        if len(dek) != DEK_BYTES:
            raise InvalidRequest(f"{self._ref}: a DEK is {DEK_BYTES} bytes")
        self._answer()
        return self._new()

    def unwrap(self, wrapped: bytes) -> bytes:
        self._answer()
        self._check(wrapped)
        return bytes(DEK_BYTES)

    def rewrap(self, wrapped: bytes) -> WrappedKey:
        self._answer()
        self._check(wrapped)
        return self._new()


# -- building the adapter -------------------------------------------------------------------------


def _settings(values: Mapping[str, Any]) -> Any:
    from rekey.config import ConfigError, Settings

    fields: dict[str, Any] = {
        k: (tuple(v) if isinstance(v, list) else v) for k, v in values.items() if k != "null_state"
    }
    try:
        return Settings(**fields)
    except (TypeError, ConfigError) as exc:
        raise WorkloadError(f"settings the workload cannot use: {exc}") from None


def _endpoint(settings: Any, backend: str) -> str:
    return str(
        {"vault": settings.vault_addr, "aws": settings.aws_endpoint, "azure": settings.azure_vault_url}[
            backend
        ]
    )


def build_adapter(spec: WorkloadSpec) -> OpAdapter:
    """The adapter of ``spec`` for this process, with the strategy's governor (module docstring)."""
    spec.check()
    backend, _, name = spec.key_ref.partition(":")
    if backend == "null":
        state = spec.settings.get("null_state")
        return NullAdapter(name, delay=spec.null_delay, state_file=str(state) if state else None)
    from rekey.backends import adapter_for  # the KMS SDKs: only in processes that use them

    settings = _settings(spec.settings)
    endpoint = _endpoint(settings, backend)
    governor: Governor | None = None
    sdk_retries = False
    if spec.strategy == "sdk-default":
        if backend == "vault":
            governor = PassThroughGovernor(endpoint, attempts=1)
        else:
            governor = PassThroughGovernor(endpoint, attempts=1, counts=False)
            sdk_retries = True
    elif spec.strategy == "naive":
        governor = PassThroughGovernor(endpoint, attempts=NAIVE_ATTEMPTS)
    adapter: OpAdapter = adapter_for(settings, spec.key_ref, governor=governor, sdk_retries=sdk_retries)
    return adapter


# -- outcomes -----------------------------------------------------------------------------------


def classify(exc: BaseException) -> str:
    """The outcome class of an op that raised ``exc`` (see the module docstring)."""
    if isinstance(exc, Throttled):
        return "throttled"
    if isinstance(exc, Unavailable | KeyServiceUnavailable):
        return "unavailable"
    if isinstance(exc, VersionDisabled | UnknownKeyVersion):
        return "version_disabled"
    if isinstance(exc, NotFound | UnknownKey):
        return "not_found"
    if isinstance(exc, PermissionDenied | PolicyDenied):
        return "denied"
    if isinstance(exc, InvalidCiphertext | InvalidRequest | InvalidWrappedKey):
        return "invalid"
    return "error"


# -- the ring of recent wraps -------------------------------------------------------------------


class Ring:
    """The last ``size`` ciphertexts wrapped (or re-wrapped) by this process on the newest
    version it has seen; thread-safe. Ciphertexts only."""

    def __init__(self, size: int, rng: random.Random) -> None:
        self._size = size
        self._items: list[bytes] = []
        self._next = 0
        self._version = 0
        self._lock = threading.Lock()
        self._rng = rng

    @property
    def version(self) -> int:
        """The newest version seen (0 before any wrap)."""
        return self._version

    def __len__(self) -> int:
        return len(self._items)

    def add(self, ciphertext: bytes, version: int) -> None:
        with self._lock:
            if version > self._version:
                self._items.clear()
                self._next = 0
                self._version = version
            elif version < self._version:
                return
            if len(self._items) < self._size:
                self._items.append(ciphertext)
            else:
                self._items[self._next] = ciphertext
                self._next = (self._next + 1) % self._size

    def pick(self) -> tuple[bytes, int] | None:
        with self._lock:
            if not self._items:
                return None
            return self._items[int(self._rng.random() * len(self._items))], self._version


@dataclass
class OpResult:
    """What `Workload.execute` reports of one op (never the DEK)."""

    op: str
    outcome: str
    version: int
    attempts: int
    throttled: int
    waited: float


class Workload:
    """One process's adapter and ring: executes ops."""

    def __init__(self, adapter: OpAdapter, *, ring: int = 1024, seed: int = 0) -> None:
        self.adapter = adapter
        self.ring = Ring(ring, random.Random(seed))  # which ciphertext to reuse, not a secret  # nosec B311

    @classmethod
    def build(cls, spec: WorkloadSpec, *, seed: int = 0) -> Workload:
        return cls(build_adapter(spec), ring=spec.ring, seed=seed)

    def preseed(self, count: int = PRESEED) -> int:
        """Fill the ring with up to ``count`` wraps before the run; stops at the first failure
        (the run will show it). Returns the wraps made."""
        made = 0
        for _ in range(count):
            try:
                wrapped = self.adapter.wrap(os.urandom(DEK_BYTES))
            except Exception:
                break
            self.ring.add(wrapped.ciphertext, wrapped.key_version)
            made += 1
        return made

    def execute(self, op: str) -> OpResult:
        """Run one op inside ``accounting()``; never raises (the outcome class says what happened)."""
        version = self.ring.version
        outcome = "ok"
        with accounting() as acc:
            try:
                picked = None if op == "wrap" else self.ring.pick()
                if picked is None:
                    op = "wrap"
                    wrapped = self.adapter.wrap(os.urandom(DEK_BYTES))
                    version = wrapped.key_version
                    self.ring.add(wrapped.ciphertext, version)
                elif op == "unwrap":
                    ciphertext, version = picked
                    self.adapter.unwrap(ciphertext)  # the DEK is dropped here
                else:
                    ciphertext, version = picked
                    wrapped = self.adapter.rewrap(ciphertext)
                    version = wrapped.key_version
                    self.ring.add(wrapped.ciphertext, version)
            except Exception as exc:
                outcome = classify(exc)
        return OpResult(op, outcome, version, acc.requests, acc.throttled, acc.waited)
