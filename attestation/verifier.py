"""The verifier core: evidence in, attestation-result token out, built for attestation storms.

During a rolling update thousands of enclaves attest at once, each with fresh evidence, so caching
whole results is not enough. The core therefore

* caches what instances share: verified certificate chains, per ``(platform, chain_cache_key)``,
  for platform verifiers that implement ``CachingPlatformVerifier`` (bounded LRU; an entry lives
  until the chain's ``not_after`` or ``chain_ttl``, whichever is first). Concurrent evidences with
  the same chain wait for one chain verification instead of each doing their own;
* verifies identical evidence in flight once (single flight keyed by platform, evidence digest,
  nonce, policy digest, audience and confirmation key): concurrent identical calls share a result;
* accepts a still-valid token of its own instead of re-attesting (``accept_or_verify``);
* admits at most ``max_concurrent`` verifications at once and ``max_queue`` waiting; past that a
  call fails at once with ``RetryAfter`` (seconds jittered upward so refused callers do not come
  back in lockstep) rather than piling up.

Policies need no cache here: a ``Policy`` is compiled once when parsed, and ``load_policy``
memoises by file content.

One ``Verifier`` serves one event loop; any number of tasks on it may call it concurrently. Platform
verification (CPU-bound crypto) runs in a thread pool of ``max_concurrent`` threads, but for the
signature check against a cached chain of a platform verifier that declares it cheap
(``verify_with_chain_inline``), which runs on the loop.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import logging
import random
from collections import OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, TypeVar, cast

from attestation.claims import Claims
from attestation.errors import (
    AttestationError,
    ChainInvalid,
    MalformedEvidence,
    NonceMismatch,
    PolicyDenied,
    RetryAfter,
    TokenInvalid,
    TokenNonceMismatch,
)
from attestation.platform import PlatformVerifier
from attestation.policy import Policy
from attestation.token import ResultSigner

__all__ = ["CachingPlatformVerifier", "Verifier", "expected_report_data", "utcnow"]

log = logging.getLogger(__name__)

T = TypeVar("T")

REPORT_DATA_SIZE = 64


def utcnow() -> datetime:
    return datetime.now(UTC)


class CachingPlatformVerifier(PlatformVerifier, Protocol):
    """Optional extension of ``PlatformVerifier`` that lets the core cache verified chains.

    ``verify_chain`` checks the certificate chain in the evidence (at ``at``) and returns an opaque
    object for the verified chain; the core caches it per ``chain_cache_key(evidence)`` and then
    calls ``verify_with_chain`` for each evidence with that key, which must check the evidence's
    signature against the attestation key of the *given* chain object (never against a chain
    re-read from the evidence), so ``chain_cache_key`` must cover every byte that ``verify_chain``
    relied on (e.g. the DER of the whole chain).

    If the chain object has a ``not_after`` (timezone-aware datetime: the earliest expiry in the
    chain, or of the collateral it was checked against), the cache entry ends there; if it has a
    ``not_before``, the entry is not used for an earlier ``at``.

    A verifier whose ``verify_with_chain`` is one signature check (tens of microseconds) may set
    a class attribute ``verify_with_chain_inline = True``: the core then calls it on the event
    loop, as it signs result tokens, instead of handing it to a thread, a hand-off that costs
    about as much as the check. ``verify_chain`` and ``verify`` always run in the thread pool.
    """

    def verify_chain(self, evidence: bytes, at: datetime) -> object: ...

    def verify_with_chain(self, evidence: bytes, chain: object, at: datetime) -> Claims: ...


def expected_report_data(expected_nonce: bytes | None, cnf_public_key: bytes) -> bytes:
    """``SHA-256(nonce || cnf_public_key)`` (``SHA-256(cnf_public_key)`` without a nonce), padded
    with zeros to 64 bytes: what the enclave must have bound into its evidence."""
    material = (expected_nonce or b"") + cnf_public_key
    return hashlib.sha256(material).digest().ljust(REPORT_DATA_SIZE, b"\0")


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


@dataclass
class _ChainEntry:
    chain: object
    expires_at: datetime
    not_before: datetime | None

    def usable(self, at: datetime) -> bool:
        if at >= self.expires_at:
            return False
        return self.not_before is None or at >= self.not_before


class _Flight:
    """One verification in flight, shared by every caller with the same key."""

    __slots__ = ("started", "task", "waiters")

    def __init__(self) -> None:
        self.task: asyncio.Task[str] | None = None
        self.waiters = 0
        self.started = False


_COUNTERS = (
    "verified",  # verifications that issued a token
    "denied",  # verifications the policy denied
    "failed",  # other verification failures (malformed, chain, signature, nonce binding)
    "rejected",  # calls refused with RetryAfter
    "single_flight_joins",  # calls that joined an identical verification in flight
    "chain_cache_hits",  # verifications that reused a verified chain (cached or in flight)
    "chain_cache_misses",  # chain verifications started
    "platform_verifications",  # calls to the platform verifier's verify / verify_with_chain
    "tokens_accepted",  # accept_or_verify: the presented token was still good
    "tokens_refused",  # accept_or_verify: a token was presented but not good enough
)


class Verifier:
    def __init__(
        self,
        platforms: Mapping[str, PlatformVerifier],
        signer: ResultSigner,
        *,
        max_concurrent: int = 8,
        max_queue: int = 64,
        retry_after: float = 1.0,
        clock: Callable[[], datetime] = utcnow,
        retry_jitter: float = 0.5,
        chain_cache_size: int = 4096,
        chain_ttl: timedelta = timedelta(hours=1),
        min_token_remaining: timedelta = timedelta(seconds=30),
        max_evidence_size: int = 1 << 20,
        executor: Executor | None = None,
    ) -> None:
        """``retry_after``: the ``RetryAfter.seconds`` hint, stretched by a random factor in
        ``[1, 1 + retry_jitter)``. ``min_token_remaining``: how long a presented token must still be
        valid for ``accept_or_verify`` to accept it. ``executor``: where platform verification
        runs (default: an own pool of ``max_concurrent`` threads, shut down by ``close``)."""
        if max_concurrent < 1 or max_queue < 0:
            raise ValueError("max_concurrent must be >= 1 and max_queue >= 0")
        if chain_cache_size < 0 or retry_after < 0 or retry_jitter < 0:
            raise ValueError("chain_cache_size, retry_after and retry_jitter must not be negative")
        for name, verifier in platforms.items():
            if getattr(verifier, "platform", name) != name:
                raise ValueError(f"the verifier registered for {name!r} is for {verifier.platform!r}")
        self._platforms = dict(platforms)
        self._caching = {
            name: callable(getattr(v, "verify_chain", None))
            and callable(getattr(v, "verify_with_chain", None))
            for name, v in self._platforms.items()
        }
        self._inline = {
            name: self._caching[name] and getattr(v, "verify_with_chain_inline", False) is True
            for name, v in self._platforms.items()
        }
        self._signer = signer
        self._max_concurrent = max_concurrent
        self._max_queue = max_queue
        self._retry_after = retry_after
        self._retry_jitter = retry_jitter
        self._clock = clock
        self._chain_cache_size = chain_cache_size
        self._chain_ttl = chain_ttl
        self._min_token_remaining = min_token_remaining
        self._max_evidence_size = max_evidence_size
        self._own_executor = executor is None
        self._executor: Executor = executor or ThreadPoolExecutor(
            max_workers=max_concurrent, thread_name_prefix="rekey-attest"
        )
        self._slots = asyncio.Semaphore(max_concurrent)  # binds to the loop that first waits on it
        self._admitted = 0  # leaders running or waiting for a slot
        self._running = 0
        self._inflight: dict[tuple[object, ...], _Flight] = {}
        self._chains: OrderedDict[tuple[str, bytes], _ChainEntry] = OrderedDict()
        self._chain_flights: dict[tuple[str, bytes], asyncio.Task[object]] = {}
        self._counts = dict.fromkeys(_COUNTERS, 0)

    # -- lifecycle ------------------------------------------------------------------------------

    def close(self) -> None:
        if self._own_executor:
            self._executor.shutdown(wait=False, cancel_futures=True)

    async def __aenter__(self) -> Verifier:
        return self

    async def __aexit__(self, *_: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Verifier(platforms={sorted(self._platforms)}, kid={self._signer.kid!r}, "
            f"max_concurrent={self._max_concurrent}, max_queue={self._max_queue})"
        )

    # -- metrics and cache control --------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        return {
            **self._counts,
            "running": self._running,
            "queued": self._admitted - self._running,
            "in_flight": len(self._inflight),
            "chain_cache_size": len(self._chains),
        }

    def invalidate_chains(self, platform: str | None = None) -> int:
        """Forget cached chains (all, or one platform's), e.g. after new revocation lists.
        Returns how many entries were dropped."""
        doomed = [key for key in self._chains if platform is None or key[0] == platform]
        for key in doomed:
            del self._chains[key]
        return len(doomed)

    # -- the API --------------------------------------------------------------------------------

    async def verify(
        self,
        evidence: bytes,
        *,
        platform: str,
        expected_nonce: bytes | None,
        policy: Policy,
        audience: str,
        cnf_public_key: bytes,
    ) -> str:
        """Verify evidence, check that its report data binds ``expected_nonce`` and
        ``cnf_public_key`` (see ``expected_report_data``), appraise it with ``policy`` and return a
        signed result token whose ``cnf`` is the hex SHA-256 of ``cnf_public_key``.

        Raises ``RetryAfter`` (at capacity, before any work), ``MalformedEvidence``,
        ``ChainInvalid``, ``EvidenceSignatureInvalid``, ``NonceMismatch`` or ``PolicyDenied``."""
        verifier = self._platforms.get(platform)
        if verifier is None:
            raise MalformedEvidence(f"no verifier for platform {platform!r}")
        if not isinstance(evidence, bytes):
            raise TypeError("evidence must be bytes")
        if len(evidence) > self._max_evidence_size:
            raise MalformedEvidence(f"evidence is larger than {self._max_evidence_size} bytes")
        if expected_nonce is not None and not expected_nonce:
            raise ValueError("expected_nonce must not be empty (pass None for no nonce)")
        if not cnf_public_key:
            raise ValueError("cnf_public_key must not be empty")
        cnf_hash = hashlib.sha256(cnf_public_key).hexdigest()
        key = (
            platform,
            hashlib.sha256(evidence).digest(),
            expected_nonce,
            policy.digest,
            audience,
            cnf_hash,
        )
        flight = self._inflight.get(key)
        if flight is not None:
            self._counts["single_flight_joins"] += 1
        else:
            self._admit()
            flight = _Flight()
            flight.task = asyncio.get_running_loop().create_task(
                self._lead(
                    flight, verifier, evidence, platform, expected_nonce, policy, audience, cnf_public_key
                )
            )
            self._inflight[key] = flight
            flight.task.add_done_callback(functools.partial(self._landed, key, flight))
        return await self._join(flight)

    async def accept_or_verify(
        self,
        token: str | None,
        evidence: bytes | None,
        *,
        platform: str,
        expected_nonce: bytes | None,
        policy: Policy,
        audience: str,
        cnf_public_key: bytes,
    ) -> str:
        """Return ``token`` unchanged if it is one of ours, for ``audience``, ``policy`` (id and
        digest: a changed policy re-attests), ``platform``, ``cnf_public_key`` and (when given)
        ``expected_nonce``, and valid for at least ``min_token_remaining`` more; otherwise
        ``verify`` the evidence. With ``evidence=None`` a token that is not good enough raises
        ``TokenInvalid`` instead (``TokenNonceMismatch``, also a ``NonceMismatch``, when it was
        issued for another nonce)."""
        if expected_nonce is not None and not expected_nonce:
            raise ValueError("expected_nonce must not be empty (pass None for no nonce)")
        if token is not None:
            problem = self._token_problem(token, platform, expected_nonce, policy, audience, cnf_public_key)
            if problem is None:
                self._counts["tokens_accepted"] += 1
                return token
            self._counts["tokens_refused"] += 1
            log.debug("presented token not accepted: %s", problem)
            if evidence is None:
                raise problem
        if evidence is None:
            raise MalformedEvidence("neither a token nor evidence was presented")
        return await self.verify(
            evidence,
            platform=platform,
            expected_nonce=expected_nonce,
            policy=policy,
            audience=audience,
            cnf_public_key=cnf_public_key,
        )

    # -- single flight and admission -------------------------------------------------------------

    def _admit(self) -> None:
        if self._admitted >= self._max_concurrent + self._max_queue:
            self._counts["rejected"] += 1
            seconds = self._retry_after * (1.0 + self._retry_jitter * random.random())  # jitter, not a secret  # nosec B311
            log.debug("at capacity (%d admitted); retry after %.2fs", self._admitted, seconds)
            raise RetryAfter(seconds)
        self._admitted += 1

    def _landed(self, key: tuple[object, ...], flight: _Flight, task: asyncio.Task[str]) -> None:
        # Runs for every leader task, even one cancelled before it started, so the count is exact.
        self._admitted -= 1
        if self._inflight.get(key) is flight:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # retrieved: no "exception was never retrieved" when nobody waits

    async def _join(self, flight: _Flight) -> str:
        task = flight.task
        assert task is not None  # typing only: set before the flight is shared  # nosec B101
        flight.waiters += 1
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            # The last caller gave up: drop the work if it is still queued. Work already running
            # finishes (a thread cannot be interrupted) and keeps its slot until then.
            if flight.waiters == 1 and not flight.started and not task.done():
                task.cancel()
            raise
        finally:
            flight.waiters -= 1

    async def _lead(
        self,
        flight: _Flight,
        verifier: PlatformVerifier,
        evidence: bytes,
        platform: str,
        expected_nonce: bytes | None,
        policy: Policy,
        audience: str,
        cnf_public_key: bytes,
    ) -> str:
        async with self._slots:
            flight.started = True
            self._running += 1
            try:
                token = await self._attest(
                    verifier, evidence, platform, expected_nonce, policy, audience, cnf_public_key
                )
            except PolicyDenied:
                self._counts["denied"] += 1
                raise
            except AttestationError as exc:
                self._counts["failed"] += 1
                log.info("attestation failed on %s: %s: %s", platform, type(exc).__name__, exc)
                raise
            finally:
                self._running -= 1
            self._counts["verified"] += 1
            return token

    # -- the pipeline ---------------------------------------------------------------------------

    async def _attest(
        self,
        verifier: PlatformVerifier,
        evidence: bytes,
        platform: str,
        expected_nonce: bytes | None,
        policy: Policy,
        audience: str,
        cnf_public_key: bytes,
    ) -> str:
        at = self._clock()
        claims = await self._claims(verifier, platform, evidence, at)
        if claims.platform != platform:
            raise MalformedEvidence(f"the {platform} verifier returned claims for {claims.platform!r}")
        self._check_binding(claims, expected_nonce, cnf_public_key)
        if expected_nonce is not None:
            claims = replace(claims, nonce=expected_nonce.hex())
        now = self._clock()
        decision = policy.evaluate(claims, now=now, nonce_checked=expected_nonce is not None)
        if not decision.allowed:
            log.info(
                "policy %s denied %s evidence %s (measurement %s): %s",
                policy.id,
                platform,
                claims.evidence_digest[:16],
                claims.measurement,
                "; ".join(decision.reasons),
            )
            raise PolicyDenied(decision.reasons)
        return self._signer.issue(
            claims,
            policy_id=policy.id,
            policy_digest=policy.digest,
            cnf_key_hash=hashlib.sha256(cnf_public_key).hexdigest(),
            audience=audience,
            now=now,
        )

    @staticmethod
    def _check_binding(claims: Claims, expected_nonce: bytes | None, cnf_public_key: bytes) -> None:
        try:
            report_data = bytes.fromhex(claims.report_data)
        except ValueError:
            raise NonceMismatch("the report data is not hex") from None
        if len(report_data) != REPORT_DATA_SIZE:
            raise NonceMismatch(f"the report data is {len(report_data)} bytes, expected {REPORT_DATA_SIZE}")
        if not hmac.compare_digest(report_data, expected_report_data(expected_nonce, cnf_public_key)):
            what = "the nonce and the key" if expected_nonce is not None else "the key"
            raise NonceMismatch(f"the report data does not bind {what} (SHA-256 of nonce || key expected)")

    async def _in_thread(self, function: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    async def _claims(
        self, verifier: PlatformVerifier, platform: str, evidence: bytes, at: datetime
    ) -> Claims:
        if not self._caching[platform]:
            self._counts["platform_verifications"] += 1
            return await self._in_thread(functools.partial(verifier.verify, evidence, at=at))
        caching = cast(CachingPlatformVerifier, verifier)
        chain_key = (platform, hashlib.sha256(verifier.chain_cache_key(evidence)).digest())
        chain = await self._chain(caching, chain_key, evidence, at)
        self._counts["platform_verifications"] += 1
        if self._inline[platform]:
            return caching.verify_with_chain(evidence, chain, at)
        return await self._in_thread(caching.verify_with_chain, evidence, chain, at)

    async def _chain(
        self, verifier: CachingPlatformVerifier, key: tuple[str, bytes], evidence: bytes, at: datetime
    ) -> object:
        entry = self._chains.get(key)
        if entry is not None:
            if entry.usable(at):
                self._chains.move_to_end(key)
                self._counts["chain_cache_hits"] += 1
                return entry.chain
            del self._chains[key]
        pending = self._chain_flights.get(key)
        if pending is not None:
            try:
                chain = await asyncio.shield(pending)
            except ChainInvalid:
                self._counts["chain_cache_hits"] += 1  # the shared verdict is about the chain itself
                raise
            except AttestationError:
                # The failure was about the leader's evidence, not the chain: check with this one.
                self._counts["chain_cache_misses"] += 1
                return await self._verify_chain(verifier, key, evidence, at)
            self._counts["chain_cache_hits"] += 1
            return chain
        self._counts["chain_cache_misses"] += 1
        task = asyncio.get_running_loop().create_task(self._verify_chain(verifier, key, evidence, at))
        self._chain_flights[key] = task
        task.add_done_callback(functools.partial(self._chain_landed, key))
        return await asyncio.shield(task)

    def _chain_landed(self, key: tuple[str, bytes], task: asyncio.Task[object]) -> None:
        if self._chain_flights.get(key) is task:
            del self._chain_flights[key]
        if not task.cancelled():
            task.exception()

    async def _verify_chain(
        self, verifier: CachingPlatformVerifier, key: tuple[str, bytes], evidence: bytes, at: datetime
    ) -> object:
        chain = await self._in_thread(verifier.verify_chain, evidence, at)
        expires_at = at + self._chain_ttl
        not_after = getattr(chain, "not_after", None)
        if isinstance(not_after, datetime):
            expires_at = min(expires_at, _aware(not_after))
        not_before = getattr(chain, "not_before", None)
        entry = _ChainEntry(
            chain, expires_at, _aware(not_before) if isinstance(not_before, datetime) else None
        )
        if self._chain_cache_size and entry.usable(at):
            self._chains[key] = entry
            self._chains.move_to_end(key)
            while len(self._chains) > self._chain_cache_size:
                self._chains.popitem(last=False)
        return chain

    # -- tokens ---------------------------------------------------------------------------------

    def _token_problem(
        self,
        token: str,
        platform: str,
        expected_nonce: bytes | None,
        policy: Policy,
        audience: str,
        cnf_public_key: bytes,
    ) -> TokenInvalid | None:
        now = self._clock()
        try:
            result = self._signer.verify(token, audience=audience, policy_id=policy.id, now=now)
        except TokenInvalid as exc:
            return exc
        if result.policy_digest != policy.digest:
            return TokenInvalid(f"policy {policy.id} changed since the token was issued")
        if not hmac.compare_digest(result.cnf_key_hash, hashlib.sha256(cnf_public_key).hexdigest()):
            return TokenInvalid("token is bound to another key")
        if result.claims.platform != platform:
            return TokenInvalid(f"token is for platform {result.claims.platform}, not {platform}")
        if expected_nonce is not None:
            # A token answers one challenge: an old token must not satisfy a fresh nonce.
            if result.claims.nonce is None:
                return TokenNonceMismatch("token was issued without a nonce; a fresh nonce is expected")
            if not hmac.compare_digest(result.claims.nonce.encode(), expected_nonce.hex().encode()):
                return TokenNonceMismatch("token was issued for another nonce")
        if result.expires_at - now < self._min_token_remaining:
            return TokenInvalid(f"token expires at {result.expires_at.isoformat()}, too soon to accept")
        return None
