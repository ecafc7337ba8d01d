"""The verifier core under attestation storms, with a fake platform verifier.

Concurrency is made deterministic with events, never with sleeps: the fake verifier can be held
at a ``threading.Event`` gate and reports each entry on a semaphore the test waits on (the waits
have generous timeouts only so a bug fails the test instead of hanging it).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from attestation.claims import Claims
from attestation.errors import (
    ChainInvalid,
    MalformedEvidence,
    NonceMismatch,
    PolicyDenied,
    RetryAfter,
    TokenInvalid,
    TokenNonceMismatch,
)
from attestation.policy import Policy, parse_policy
from attestation.token import ResultSigner, verify_result
from attestation.verifier import Verifier, expected_report_data

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
MEAS = "1a2b" * 16
NONCE = b"fresh-nonce-0123456789abcdef"
KEY = b"-----enclave public key 1-----"
OTHER_KEY = b"-----enclave public key 2-----"
WAIT = 30  # seconds; a safety net against hangs, never a synchronisation device


class Clock:
    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta


@dataclass(frozen=True)
class FakeChain:
    name: str
    not_after: datetime | None = None


class FakePlatform:
    """Fake evidence: JSON with chain, measurement, svn, debug, report_data, time and a serial."""

    def __init__(self, platform: str = "sim", *, gate: threading.Event | None = None) -> None:
        self.platform = platform
        self.gate = gate
        self.entered = threading.Semaphore(0)
        self.calls: Counter[str] = Counter()
        self.bad_chains: set[str] = set()
        self._lock = threading.Lock()

    def _enter(self, what: str) -> None:
        with self._lock:
            self.calls[what] += 1
        self.entered.release()
        if self.gate is not None:
            assert self.gate.wait(WAIT), "test gate never opened"

    @staticmethod
    def parse(evidence: bytes) -> dict[str, Any]:
        try:
            document: dict[str, Any] = json.loads(evidence)
        except ValueError:
            raise MalformedEvidence("not fake evidence") from None
        return document

    def claims(self, evidence: bytes) -> Claims:
        doc = self.parse(evidence)
        return Claims(
            platform=doc.get("platform", self.platform),
            measurement=doc["measurement"],
            signer="00" * 32,
            product_id=1,
            svn=doc["svn"],
            debug=doc["debug"],
            tcb_status="UpToDate",
            report_data=doc["report_data"],
            evidence_digest=hashlib.sha256(evidence).hexdigest(),
            evidence_time=datetime.fromisoformat(doc["time"]),
        )

    def verify(self, evidence: bytes, *, at: datetime) -> Claims:
        self._enter("verify")
        if self.parse(evidence)["chain"] in self.bad_chains:
            raise ChainInvalid("revoked")
        return self.claims(evidence)

    def chain_cache_key(self, evidence: bytes) -> bytes:
        return str(self.parse(evidence)["chain"]).encode()


class CachingFakePlatform(FakePlatform):
    def __init__(self, platform: str = "sim", *, gate: threading.Event | None = None) -> None:
        super().__init__(platform, gate=gate)
        self.chain_gate: threading.Event | None = None
        self.chain_entered = threading.Semaphore(0)
        self.not_after: datetime | None = None

    def verify_chain(self, evidence: bytes, at: datetime) -> object:
        with self._lock:
            self.calls["verify_chain"] += 1
        self.chain_entered.release()
        if self.chain_gate is not None:
            assert self.chain_gate.wait(WAIT)
        name = self.parse(evidence)["chain"]
        if name in self.bad_chains:
            raise ChainInvalid(f"chain {name} is revoked")
        return FakeChain(name, self.not_after)

    def verify_with_chain(self, evidence: bytes, chain: object, at: datetime) -> Claims:
        self._enter("verify_with_chain")
        assert isinstance(chain, FakeChain) and chain.name == self.parse(evidence)["chain"]
        return self.claims(evidence)


def make_evidence(
    nonce: bytes | None = NONCE,
    key: bytes = KEY,
    *,
    serial: int = 0,
    chain: str = "chip-1",
    measurement: str = MEAS,
    debug: bool = False,
    time: datetime = T0,
    **extra: Any,
) -> bytes:
    document = {
        "chain": chain,
        "measurement": measurement,
        "svn": 3,
        "debug": debug,
        "report_data": expected_report_data(nonce, key).hex(),
        "time": time.isoformat(),
        "serial": serial,
        **extra,
    }
    return json.dumps(document).encode()


def make_policy(**rule: Any) -> Policy:
    return parse_policy(
        {
            "id": "release",
            "rules": [{"platform": "sim", "measurements": [MEAS], "max_evidence_age": "5m", **rule}],
        }
    )


POLICY = make_policy()
SIGNER = ResultSigner.generate()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def make_verifier(clock: Clock) -> Iterator[Callable[..., Verifier]]:
    made: list[Verifier] = []

    def make(*platforms: FakePlatform, **options: Any) -> Verifier:
        options.setdefault("clock", clock)
        verifier = Verifier({p.platform: p for p in platforms}, SIGNER, **options)
        made.append(verifier)
        return verifier

    yield make
    for verifier in made:
        verifier.close()


def request(**overrides: Any) -> dict[str, Any]:
    return {
        "platform": "sim",
        "expected_nonce": NONCE,
        "policy": POLICY,
        "audience": "kms",
        "cnf_public_key": KEY,
        **overrides,
    }


async def entered(semaphore: threading.Semaphore) -> None:
    assert await asyncio.to_thread(semaphore.acquire, True, WAIT), "the fake verifier was never entered"


# -- the pipeline -------------------------------------------------------------------------------


async def test_verify_issues_a_bound_token(make_verifier: Callable[..., Verifier], clock: Clock) -> None:
    verifier = make_verifier(FakePlatform())
    token = await verifier.verify(make_evidence(), **request())
    result = verify_result(
        token, public_key=SIGNER.public_key, audience="kms", policy_id="release", now=clock()
    )
    assert result.cnf_key_hash == hashlib.sha256(KEY).hexdigest()
    assert result.policy_digest == POLICY.digest
    assert result.claims.nonce == NONCE.hex()
    assert result.claims.measurement == MEAS
    assert result.expires_at == T0 + timedelta(minutes=5)
    assert verifier.stats()["verified"] == 1


async def test_caching_platform_pipeline(make_verifier: Callable[..., Verifier]) -> None:
    fake = CachingFakePlatform()
    verifier = make_verifier(fake)
    await verifier.verify(make_evidence(), **request())
    assert fake.calls == Counter({"verify_chain": 1, "verify_with_chain": 1})


class InlineFakePlatform(CachingFakePlatform):
    verify_with_chain_inline = True

    def __init__(self) -> None:
        super().__init__()
        self.threads: Counter[str] = Counter()

    def verify_chain(self, evidence: bytes, at: datetime) -> object:
        self.threads["verify_chain", threading.current_thread() is threading.main_thread()] += 1
        return super().verify_chain(evidence, at)

    def verify_with_chain(self, evidence: bytes, chain: object, at: datetime) -> Claims:
        on_loop = threading.current_thread() is threading.main_thread()
        self.threads["verify_with_chain", on_loop] += 1
        return super().verify_with_chain(evidence, chain, at)


async def test_a_cheap_check_against_a_cached_chain_runs_on_the_loop(
    make_verifier: Callable[..., Verifier],
) -> None:
    """A platform verifier that declares ``verify_with_chain_inline`` has its per-evidence check
    run on the event loop (no thread hand-off); the chain is still verified in the pool, and a
    verifier that does not declare it keeps every check in the pool."""
    inline, pooled = InlineFakePlatform(), InlineFakePlatform()
    pooled.verify_with_chain_inline = False  # type: ignore[misc]
    for fake in (inline, pooled):
        verifier = make_verifier(fake)
        for serial in range(3):
            await verifier.verify(make_evidence(serial=serial), **request())
    assert inline.threads == Counter({("verify_chain", False): 1, ("verify_with_chain", True): 3})
    assert pooled.threads == Counter({("verify_chain", False): 1, ("verify_with_chain", False): 3})


@pytest.mark.parametrize(
    ("evidence", "overrides", "match"),
    [
        (make_evidence(nonce=b"another nonce"), {}, "does not bind the nonce and the key"),
        (make_evidence(key=OTHER_KEY), {}, "does not bind the nonce and the key"),
        (make_evidence(), {"cnf_public_key": OTHER_KEY}, "does not bind the nonce and the key"),
        (make_evidence(nonce=None), {}, "does not bind the nonce and the key"),
        (make_evidence(), {"expected_nonce": None}, "does not bind the key"),
        (make_evidence(report_data="ab" * 32), {}, "report data is 32 bytes"),
    ],
)
async def test_nonce_and_key_binding(
    make_verifier: Callable[..., Verifier], evidence: bytes, overrides: dict[str, Any], match: str
) -> None:
    verifier = make_verifier(FakePlatform())
    with pytest.raises(NonceMismatch, match=match):
        await verifier.verify(evidence, **request(**overrides))
    assert verifier.stats()["failed"] == 1


async def test_without_nonce_binds_the_key_and_the_policy_decides(
    make_verifier: Callable[..., Verifier],
) -> None:
    verifier = make_verifier(FakePlatform())
    evidence = make_evidence(nonce=None)
    with pytest.raises(PolicyDenied) as caught:
        await verifier.verify(evidence, **request(expected_nonce=None))
    assert caught.value.reasons == ["rule 1: no nonce was checked but the rule requires one"]
    relaxed = make_policy(nonce_required=False)
    token = await verifier.verify(evidence, **request(expected_nonce=None, policy=relaxed))
    assert SIGNER.verify(token, audience="kms", policy_id="release", now=T0).claims.nonce is None


async def test_policy_denial_lists_reasons(make_verifier: Callable[..., Verifier]) -> None:
    verifier = make_verifier(FakePlatform())
    evidence = make_evidence(measurement="99" * 32, debug=True, time=T0 - timedelta(minutes=7))
    with pytest.raises(PolicyDenied) as caught:
        await verifier.verify(evidence, **request())
    assert caught.value.reasons == [
        "rule 1: debug enclave not allowed",
        f"rule 1: measurement {'99' * 32} is not in the allowlist",
        "rule 1: evidence is 7m old, older than the maximum 5m",
    ]
    assert caught.value.exit_code == 3
    assert verifier.stats()["denied"] == 1 and verifier.stats()["verified"] == 0


async def test_bad_requests(make_verifier: Callable[..., Verifier]) -> None:
    verifier = make_verifier(FakePlatform(), max_evidence_size=4096)
    with pytest.raises(MalformedEvidence, match="no verifier for platform 'tdx'"):
        await verifier.verify(make_evidence(), **request(platform="tdx"))
    with pytest.raises(MalformedEvidence, match="larger than 4096"):
        await verifier.verify(b"x" * 4097, **request())
    with pytest.raises(MalformedEvidence, match="not fake evidence"):
        await verifier.verify(b"garbage", **request())
    with pytest.raises(ValueError, match="expected_nonce must not be empty"):
        await verifier.verify(make_evidence(nonce=b""), **request(expected_nonce=b""))
    with pytest.raises(MalformedEvidence, match="returned claims for 'tdx'"):
        await verifier.verify(make_evidence(platform="tdx"), **request())


def test_registration_must_match_the_platform() -> None:
    with pytest.raises(ValueError, match="registered for 'sgx' is for 'sim'"):
        Verifier({"sgx": FakePlatform("sim")}, SIGNER)


# -- single flight ------------------------------------------------------------------------------


async def test_200_identical_verifications_call_the_platform_once(
    make_verifier: Callable[..., Verifier],
) -> None:
    gate = threading.Event()
    fake = FakePlatform(gate=gate)
    verifier = make_verifier(fake)
    evidence = make_evidence()
    tasks = [asyncio.create_task(verifier.verify(evidence, **request())) for _ in range(200)]
    try:
        await entered(fake.entered)  # the one verification is in the platform verifier ...
        stats = verifier.stats()
        assert stats["single_flight_joins"] == 199  # ... and everyone else is waiting for it
        assert stats["in_flight"] == 1 and stats["running"] == 1
    finally:
        gate.set()
    tokens = await asyncio.gather(*tasks)
    assert len(set(tokens)) == 1
    assert fake.calls["verify"] == 1
    stats = verifier.stats()
    assert stats["verified"] == 1 and stats["rejected"] == 0 and stats["in_flight"] == 0


async def test_single_flight_key_includes_nonce_audience_and_key(
    make_verifier: Callable[..., Verifier],
) -> None:
    gate = threading.Event()
    fake = FakePlatform(gate=gate)
    verifier = make_verifier(fake)
    evidence = make_evidence()
    tasks = [
        asyncio.create_task(verifier.verify(evidence, **request())),
        asyncio.create_task(verifier.verify(evidence, **request(audience="vault"))),
        asyncio.create_task(verifier.verify(evidence, **request(expected_nonce=b"other nonce"))),
        asyncio.create_task(verifier.verify(evidence, **request(cnf_public_key=OTHER_KEY))),
        asyncio.create_task(verifier.verify(evidence, **request(policy=make_policy(debug_allowed=True)))),
    ]
    gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert fake.calls["verify"] == 5
    assert verifier.stats()["single_flight_joins"] == 0
    assert isinstance(results[0], str) and isinstance(results[1], str) and isinstance(results[4], str)
    assert isinstance(results[2], NonceMismatch) and isinstance(results[3], NonceMismatch)


async def test_a_failure_is_shared_but_not_remembered(make_verifier: Callable[..., Verifier]) -> None:
    gate = threading.Event()
    fake = FakePlatform(gate=gate)
    fake.bad_chains.add("chip-1")
    verifier = make_verifier(fake)
    evidence = make_evidence()
    tasks = [asyncio.create_task(verifier.verify(evidence, **request())) for _ in range(3)]
    gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, ChainInvalid) for r in results)
    assert fake.calls["verify"] == 1
    fake.bad_chains.clear()  # e.g. the collateral was refreshed: the next attempt verifies afresh
    await verifier.verify(evidence, **request())
    assert fake.calls["verify"] == 2


# -- chain cache --------------------------------------------------------------------------------


async def test_200_evidences_sharing_a_chain_verify_it_once(make_verifier: Callable[..., Verifier]) -> None:
    fake = CachingFakePlatform()
    fake.chain_gate = threading.Event()
    verifier = make_verifier(fake, max_queue=256)
    tasks = [asyncio.create_task(verifier.verify(make_evidence(serial=i), **request())) for i in range(200)]
    try:
        await entered(fake.chain_entered)
    finally:
        fake.chain_gate.set()
    tokens = await asyncio.gather(*tasks)
    assert len(set(tokens)) == 200
    assert fake.calls["verify_chain"] == 1
    assert fake.calls["verify_with_chain"] == 200
    stats = verifier.stats()
    assert stats["chain_cache_hits"] == 199 and stats["chain_cache_misses"] == 1
    assert stats["chain_cache_size"] == 1 and stats["verified"] == 200 and stats["single_flight_joins"] == 0


async def test_a_bad_chain_verdict_is_shared(make_verifier: Callable[..., Verifier]) -> None:
    fake = CachingFakePlatform()
    fake.bad_chains.add("chip-1")
    verifier = make_verifier(fake, max_concurrent=10)
    tasks = [asyncio.create_task(verifier.verify(make_evidence(serial=i), **request())) for i in range(10)]
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, ChainInvalid) for r in results)
    assert fake.calls["verify_chain"] == 1 and fake.calls["verify_with_chain"] == 0
    assert verifier.stats()["chain_cache_size"] == 0  # failures are not cached


async def test_chain_entries_expire(make_verifier: Callable[..., Verifier], clock: Clock) -> None:
    fake = CachingFakePlatform()
    fake.not_after = T0 + timedelta(minutes=10)
    verifier = make_verifier(fake, chain_ttl=timedelta(hours=1))

    async def attest(serial: int) -> None:
        await verifier.verify(make_evidence(serial=serial, time=clock()), **request())

    await attest(1)
    clock.advance(timedelta(minutes=9))
    await attest(2)
    assert fake.calls["verify_chain"] == 1
    clock.advance(timedelta(minutes=1))  # at the chain's not_after
    await attest(3)
    assert fake.calls["verify_chain"] == 2

    fake.not_after = None  # now only the TTL limits the entry
    clock.advance(timedelta(seconds=1))
    verifier.invalidate_chains("sim")
    await attest(4)
    clock.advance(timedelta(minutes=59, seconds=59))
    await attest(5)
    assert fake.calls["verify_chain"] == 3
    clock.advance(timedelta(seconds=1))
    await attest(6)
    assert fake.calls["verify_chain"] == 4


async def test_chain_cache_is_a_bounded_lru(make_verifier: Callable[..., Verifier]) -> None:
    fake = CachingFakePlatform()
    verifier = make_verifier(fake, chain_cache_size=2)
    for serial, chain in enumerate(["a", "b", "a", "c", "a", "b"]):
        await verifier.verify(make_evidence(serial=serial, chain=chain), **request())
    # a, b miss; a hits (a is now newest); c misses and evicts b; a hits; b misses again.
    assert fake.calls["verify_chain"] == 4
    assert verifier.stats()["chain_cache_hits"] == 2
    assert verifier.stats()["chain_cache_size"] == 2
    assert verifier.invalidate_chains() == 2


# -- admission control --------------------------------------------------------------------------


async def test_sixth_call_is_refused_at_once(make_verifier: Callable[..., Verifier]) -> None:
    gate = threading.Event()
    fake = FakePlatform(gate=gate)
    verifier = make_verifier(fake, max_concurrent=2, max_queue=3, retry_after=2.0, retry_jitter=0.5)
    tasks = [asyncio.create_task(verifier.verify(make_evidence(serial=i), **request())) for i in range(5)]
    try:
        await entered(fake.entered)
        await entered(fake.entered)
        stats = verifier.stats()
        assert stats["running"] == 2 and stats["queued"] == 3

        # The sixth call raises before it ever suspends: no pile-up, no waiting.
        sixth = verifier.verify(make_evidence(serial=5), **request())
        with pytest.raises(RetryAfter) as caught:
            sixth.send(None)
        sixth.close()
        assert 2.0 <= caught.value.seconds < 3.0
        assert caught.value.exit_code == 75
        assert verifier.stats()["rejected"] == 1

        # Identical evidence joins its flight instead of needing a slot of its own.
        joined = asyncio.create_task(verifier.verify(make_evidence(serial=4), **request()))
        tasks.append(joined)
    finally:
        gate.set()
    tokens = await asyncio.gather(*tasks)
    assert tokens[4] == tokens[5]
    assert fake.calls["verify"] == 5
    stats = verifier.stats()
    assert stats["verified"] == 5 and stats["single_flight_joins"] == 1 and stats["rejected"] == 1
    assert stats["running"] == 0 and stats["queued"] == 0
    await verifier.verify(make_evidence(serial=6), **request())  # capacity is back


async def test_a_queued_call_whose_callers_all_left_gives_its_place_back(
    make_verifier: Callable[..., Verifier],
) -> None:
    gate = threading.Event()
    fake = FakePlatform(gate=gate)
    verifier = make_verifier(fake, max_concurrent=1, max_queue=1)
    running = asyncio.create_task(verifier.verify(make_evidence(serial=0), **request()))
    queued = asyncio.create_task(verifier.verify(make_evidence(serial=1), **request()))
    try:
        await entered(fake.entered)
        assert verifier.stats()["in_flight"] == 2  # the running verification and the queued one
        assert verifier.stats()["queued"] == 1
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        # Its leader task ends (cancelled) once nobody waits for it, while the running one is
        # still held at the gate: so it ended without ever running.
        for _ in range(100):
            if verifier.stats()["in_flight"] == 1:
                break
            await asyncio.sleep(0)
        assert verifier.stats()["in_flight"] == 1
        assert verifier.stats()["queued"] == 0
    finally:
        gate.set()
    await running
    assert fake.calls["verify"] == 1  # the abandoned verification never ran
    assert verifier.stats()["queued"] == 0 and verifier.stats()["in_flight"] == 0
    await verifier.verify(make_evidence(serial=2), **request())


async def test_many_tasks_many_evidences(make_verifier: Callable[..., Verifier]) -> None:
    fake = CachingFakePlatform()
    verifier = make_verifier(fake, max_concurrent=4, max_queue=1000)
    evidences = [make_evidence(serial=i % 250, chain=f"chip-{i % 250 % 7}") for i in range(500)]
    tokens = await asyncio.gather(*(verifier.verify(e, **request()) for e in evidences))
    assert len(set(tokens)) == 250
    stats = verifier.stats()
    assert stats["verified"] + stats["single_flight_joins"] == 500
    assert fake.calls["verify_chain"] == 7
    assert stats["running"] == stats["queued"] == stats["in_flight"] == 0


# -- accepting tokens ---------------------------------------------------------------------------


async def test_still_valid_token_is_accepted_without_touching_evidence(
    make_verifier: Callable[..., Verifier], clock: Clock
) -> None:
    fake = FakePlatform()
    verifier = make_verifier(fake)
    token = await verifier.verify(make_evidence(), **request())
    assert fake.calls["verify"] == 1
    clock.advance(timedelta(minutes=4))  # 60 s left, more than the 30 s required
    assert await verifier.accept_or_verify(token, make_evidence(serial=1), **request()) == token
    assert await verifier.accept_or_verify(token, None, **request()) == token
    assert fake.calls["verify"] == 1
    assert verifier.stats()["tokens_accepted"] == 2


@pytest.mark.parametrize(
    ("advance", "overrides"),
    [
        (timedelta(minutes=5), {}),  # expired
        (timedelta(minutes=4, seconds=31), {}),  # 29 s left: too little to be worth accepting
        (timedelta(0), {"audience": "vault"}),
        (timedelta(0), {"policy": make_policy(debug_allowed=True)}),  # same id, changed policy
        (timedelta(0), {"cnf_public_key": OTHER_KEY}),  # someone else's token
    ],
)
async def test_token_not_good_enough_triggers_reverification(
    make_verifier: Callable[..., Verifier], clock: Clock, advance: timedelta, overrides: dict[str, Any]
) -> None:
    fake = FakePlatform()
    verifier = make_verifier(fake)
    token = await verifier.verify(make_evidence(), **request())
    clock.advance(advance)
    key = overrides.get("cnf_public_key", KEY)
    fresh = await verifier.accept_or_verify(
        token, make_evidence(key=key, time=clock()), **request(**overrides)
    )
    assert fresh != token
    assert fake.calls["verify"] == 2
    assert verifier.stats()["tokens_refused"] == 1
    with pytest.raises(TokenInvalid):
        await verifier.accept_or_verify(token, None, **request(**overrides))


async def test_old_token_does_not_satisfy_a_fresh_nonce(make_verifier: Callable[..., Verifier]) -> None:
    """Issue 12 finding 9: a token issued for one challenge must not answer another."""
    fake = FakePlatform()
    verifier = make_verifier(fake)
    old = await verifier.verify(make_evidence(), **request())  # answers NONCE
    fresh_nonce = b"a-later-challenge-0123456789"
    with pytest.raises(TokenNonceMismatch, match="another nonce") as refused:
        await verifier.accept_or_verify(old, None, **request(expected_nonce=fresh_nonce))
    assert isinstance(refused.value, NonceMismatch) and isinstance(refused.value, TokenInvalid)
    assert verifier.stats()["tokens_refused"] == 1
    # With evidence for the fresh nonce the caller re-attests instead of reusing the old token.
    renewed = await verifier.accept_or_verify(
        old, make_evidence(nonce=fresh_nonce), **request(expected_nonce=fresh_nonce)
    )
    assert renewed != old
    assert fake.calls["verify"] == 2
    # Evidence for the old nonce does not help either.
    with pytest.raises(NonceMismatch):
        await verifier.accept_or_verify(old, make_evidence(), **request(expected_nonce=fresh_nonce))
    # The same nonce still accepts the token; no expected nonce accepts it too.
    assert await verifier.accept_or_verify(old, None, **request()) == old
    assert await verifier.accept_or_verify(old, None, **request(expected_nonce=None)) == old


async def test_token_without_nonce_does_not_satisfy_a_nonce(make_verifier: Callable[..., Verifier]) -> None:
    fake = FakePlatform()
    verifier = make_verifier(fake)
    no_nonce_policy = make_policy(nonce_required=False)
    unbound = await verifier.verify(
        make_evidence(nonce=None), **request(expected_nonce=None, policy=no_nonce_policy)
    )
    with pytest.raises(TokenNonceMismatch, match="without a nonce"):
        await verifier.accept_or_verify(unbound, None, **request(policy=no_nonce_policy))
    with pytest.raises(ValueError, match="must not be empty"):
        await verifier.accept_or_verify(unbound, None, **request(expected_nonce=b""))


async def test_garbage_or_foreign_token_falls_back_to_evidence(
    make_verifier: Callable[..., Verifier],
) -> None:
    fake = FakePlatform()
    verifier = make_verifier(fake)
    other = ResultSigner.generate()
    claims = fake.claims(make_evidence())
    foreign = other.issue(
        claims,
        policy_id="release",
        policy_digest=POLICY.digest,
        cnf_key_hash=hashlib.sha256(KEY).hexdigest(),
        audience="kms",
        now=T0,
    )
    for token in ("not a token", foreign, None):
        await verifier.accept_or_verify(token, make_evidence(), **request())
    assert fake.calls["verify"] == 3
    with pytest.raises(MalformedEvidence, match="neither a token nor evidence"):
        await verifier.accept_or_verify(None, None, **request())
