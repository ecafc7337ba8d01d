"""One contract, every backend: the same tests against OpenBao, moto's KMS server and the Azure
Key Vault emulator through the real SDKs."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from datetime import UTC, datetime

import pytest

from attestation.claims import Claims
from attestation.policy import parse_policy
from attestation.token import ResultSigner
from kms_adapters.contract import KmsAdapter
from kms_adapters.errors import InvalidCiphertext, InvalidRequest, NotFound, PolicyDenied, VersionDisabled
from kms_adapters.release import MemoryReleasePolicyStore, ReleasePolicy, open_released
from sealing.handoff import HandoffKeyPair, fingerprint

pytestmark = pytest.mark.integration

SIGNER = "83" * 32
BACKENDS = ["vault", "aws", "azure"]


@pytest.fixture(params=BACKENDS)
def make_adapter(request: pytest.FixtureRequest) -> Callable[[str], KmsAdapter]:
    """A factory of adapters on one backend, each key under a fresh name."""
    store = MemoryReleasePolicyStore()
    factory: Callable[[str, MemoryReleasePolicyStore], KmsAdapter] = request.getfixturevalue(
        f"{request.param}_adapter_factory"
    )
    return lambda name: factory(name, store)


@pytest.fixture
def key(make_adapter: Callable[[str], KmsAdapter]) -> KmsAdapter:
    adapter = make_adapter(f"contract-{secrets.token_hex(4)}")
    info, created = adapter.create()
    assert created and info.primary_version == 1
    return adapter


def test_create_is_idempotent(key: KmsAdapter) -> None:
    info, created = key.create()
    assert not created and [v.version for v in info.versions] == [1]


def test_the_adapter_exposes_the_governor_its_calls_go_through(key: KmsAdapter) -> None:
    before = key.governor.snapshot()
    key.wrap(secrets.token_bytes(32))
    after = key.governor.snapshot()
    assert after.successes > before.successes and after.throttled >= before.throttled


def test_wrap_rotate_rewrap_disable_destroy(key: KmsAdapter) -> None:
    dek = secrets.token_bytes(32)
    old = key.wrap(dek)
    assert old.key_version == 1 and key.version_of(old.ciphertext) == 1
    assert key.unwrap(old.ciphertext) == dek

    info = key.rotate()
    assert info.primary_version == 2
    assert key.unwrap(old.ciphertext) == dek  # the old version still unwraps
    new = key.wrap(dek)
    assert new.key_version == 2

    moved = key.rewrap(old.ciphertext)
    assert moved.key_version == 2 and key.version_of(moved.ciphertext) == 2
    assert key.unwrap(moved.ciphertext) == dek

    outcomes = key.rewrap_batch([old.ciphertext, b"garbage", new.ciphertext])
    assert [o.index for o in outcomes] == [0, 1, 2]
    assert outcomes[0].wrapped is not None and outcomes[0].wrapped.key_version == 2
    assert isinstance(outcomes[1].error, InvalidCiphertext)
    assert outcomes[2].wrapped is not None

    info = key.disable_version(1)
    assert info.state_of(1) == "disabled" and info.state_of(2) == "enabled"
    with pytest.raises(VersionDisabled):
        key.unwrap(old.ciphertext)
    assert key.unwrap(moved.ciphertext) == dek

    info = key.destroy_below(2)
    assert info.state_of(1) in ("destroyed", "pending_deletion")
    with pytest.raises(VersionDisabled):
        key.unwrap(old.ciphertext)
    assert key.unwrap(moved.ciphertext) == dek


def test_a_second_rotation_retires_and_destroys_after_a_first_one_did(key: KmsAdapter) -> None:
    """Two rotations in a row, each disabling and destroying the version before: the second
    one's disable and destroy must work on a key whose oldest version is already destroyed
    (Transit once refused it, which left the second rotation blocked in RETIRING)."""
    dek = secrets.token_bytes(32)
    for old, new in ((1, 2), (2, 3)):
        assert key.rotate().primary_version == new
        on_new = key.wrap(dek).ciphertext
        info = key.disable_version(old)
        assert info.state_of(old) == "disabled" and info.state_of(new) == "enabled"
        info = key.destroy_below(new)
        assert info.state_of(old) in ("destroyed", "pending_deletion"), info
        assert key.unwrap(on_new) == dek
    info = key.describe()
    assert info.primary_version == 3
    assert [info.state_of(v) in ("destroyed", "pending_deletion") for v in (1, 2)] == [True, True]


def test_enable_version_undoes_disable(key: KmsAdapter) -> None:
    dek = secrets.token_bytes(32)
    key.rotate()
    on_v2 = key.wrap(dek).ciphertext
    key.rotate()
    assert key.disable_version(2).state_of(2) == "disabled"
    with pytest.raises(VersionDisabled):
        key.unwrap(on_v2)

    info = key.enable_version(2)
    assert info.state_of(2) == "enabled" and info.primary_version == 3
    assert key.unwrap(on_v2) == dek
    assert key.enable_version(2).state_of(2) == "enabled"  # already enabled: a no-op
    with pytest.raises(InvalidRequest):
        key.enable_version(9)  # never existed
    key.destroy_below(2)
    with pytest.raises(InvalidRequest):
        key.enable_version(1)  # destroyed (or pending deletion) stays so
    assert key.unwrap(on_v2) == dek


def test_garbage_ciphertext(key: KmsAdapter) -> None:
    good = key.wrap(b"\x01" * 32).ciphertext
    for garbage in (b"garbage", b"", good[:-8] + b"AAAAAAAA", good.replace(b":v1:", b":v7:", 1)):
        with pytest.raises(InvalidCiphertext):
            key.unwrap(garbage)


def test_unknown_key(make_adapter: Callable[[str], KmsAdapter]) -> None:
    missing = make_adapter(f"absent-{secrets.token_hex(4)}")
    with pytest.raises(NotFound):
        missing.describe()
    with pytest.raises(NotFound):
        missing.wrap(b"\x00" * 32)


def _claims(svn: int, debug: bool = False) -> Claims:
    return Claims(
        platform="sim",
        measurement="aa" * 32,
        signer=SIGNER,
        product_id=1,
        svn=svn,
        debug=debug,
        tcb_status="UpToDate",
        report_data="00" * 64,
        evidence_digest="00" * 32,
        evidence_time=datetime.now(UTC),
        nonce="01",
    )


def test_release_allowed_and_denied_by_policy(key: KmsAdapter) -> None:
    verifier = ResultSigner.generate()
    policy = parse_policy(
        {"id": "release", "rules": [{"platform": "sim", "signer": SIGNER, "product_id": 1, "min_svn": 2}]}
    )
    key.set_release_policy(ReleasePolicy(policy, verifier.public_pem()))
    dek = secrets.token_bytes(32)
    wrapped = key.wrap(dek).ciphertext
    recipient = HandoffKeyPair()

    def token(
        claims: Claims, bound_key: bytes = recipient.public_bytes, signer: ResultSigner = verifier
    ) -> str:
        return signer.issue(
            claims,
            policy_id="release",
            policy_digest=policy.digest,
            cnf_key_hash=fingerprint(bound_key),
            audience="rekey-kms",
            now=datetime.now(UTC),
        )

    released = key.release(wrapped, token(_claims(svn=2)), recipient.public_bytes)
    assert dek not in released
    assert open_released(released, recipient, key.key_ref) == dek

    with pytest.raises(PolicyDenied) as denied:
        key.release(wrapped, token(_claims(svn=1, debug=True)), recipient.public_bytes)
    assert any("svn 1 is below the minimum 2" in r for r in denied.value.reasons)
    assert any("debug" in r for r in denied.value.reasons)
    other = HandoffKeyPair()
    with pytest.raises(PolicyDenied, match="not the key bound"):
        key.release(wrapped, token(_claims(svn=2)), other.public_bytes)
    with pytest.raises(PolicyDenied, match="attestation result rejected"):
        key.release(wrapped, token(_claims(svn=2), signer=ResultSigner.generate()), recipient.public_bytes)
