"""AzureHsmAdapter through the real azure-keyvault-keys SDK against the Key Vault emulator."""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jwt
import pytest

from attestation.claims import Claims
from attestation.policy import parse_policy
from attestation.token import ResultSigner
from emulators.azure_keyvault import AzureKeyVaultEmulator
from kms_adapters.azure_hsm import TAG_DESTROYED, TAG_VERSION, AzureHsmAdapter, StaticTokenCredential
from kms_adapters.contract import KmsAdapter
from kms_adapters.errors import (
    InvalidCiphertext,
    InvalidRequest,
    NotFound,
    PolicyDenied,
    Throttled,
    VersionDisabled,
)
from kms_adapters.governor import Governor
from kms_adapters.release import MemoryReleasePolicyStore, ReleasePolicy, open_released
from sealing.handoff import HandoffKeyPair, fingerprint
from tests.fixtures.azure import AzureKeyVault

pytestmark = pytest.mark.integration

SIGNER = "5a" * 32
Factory = Callable[..., AzureHsmAdapter]


@pytest.fixture
def make_adapter(azure_keyvault: AzureKeyVault) -> Iterator[Factory]:
    """Adapters on the session emulator, each on a fresh key name and its own governor."""
    made: list[AzureHsmAdapter] = []

    def make(key_type: Any = "oct-HSM", *, name: str | None = None, **options: Any) -> AzureHsmAdapter:
        options.setdefault("release_store", MemoryReleasePolicyStore())
        options.setdefault("governor", Governor(f"azure-test-{secrets.token_hex(4)}"))
        adapter = AzureHsmAdapter(
            name or f"hsm-{secrets.token_hex(4)}",
            vault_url=azure_keyvault.url,
            credential=StaticTokenCredential(),
            connection_verify=azure_keyvault.ca_file,
            key_type=key_type,
            **options,
        )
        made.append(adapter)
        return adapter

    yield make
    for adapter in made:
        adapter.close()


def _served(kv: AzureKeyVault, klass: str) -> int:
    return int(kv.emulator.stats()["classes"][klass]["served"])


@pytest.mark.parametrize(("key_type", "klass"), [("oct-HSM", "wrap"), ("RSA-HSM", "rsa2048-public")])
def test_create_wrap_unwrap(
    azure_keyvault: AzureKeyVault, make_adapter: Factory, key_type: str, klass: str
) -> None:
    key = make_adapter(key_type)
    assert isinstance(key, KmsAdapter) and key.key_ref.startswith("azure:hsm-")
    info, created = key.create()
    assert created and info.key_type == key_type and info.rotation_mode == "native"
    assert [(v.version, v.state, v.primary) for v in info.versions] == [(1, "enabled", True)]
    assert info.versions[0].native_id and info.versions[0].created_at is not None
    again, created = key.create()
    assert not created and [v.native_id for v in again.versions] == [v.native_id for v in info.versions]

    before = _served(azure_keyvault, klass)
    dek = secrets.token_bytes(32)
    wrapped = key.wrap(dek)
    assert wrapped.key_version == 1 and key.version_of(wrapped.ciphertext) == 1
    assert wrapped.ciphertext.startswith(f"azure:v1:{info.versions[0].native_id}:".encode())
    assert _served(azure_keyvault, klass) == before + 1  # wrapped by the service, never locally
    assert key.unwrap(wrapped.ciphertext) == dek


@pytest.mark.parametrize("key_type", ["oct-HSM", "RSA-HSM"])
def test_rotate_rewrap_disable_destroy(
    azure_keyvault: AzureKeyVault, make_adapter: Factory, key_type: str
) -> None:
    key = make_adapter(key_type)
    key.create()
    dek = secrets.token_bytes(32)
    old = key.wrap(dek)

    # Three rotations within about a second: Key Vault's whole-second created stamps tie,
    # the numbering must still follow creation order.
    for expected in (2, 3, 4):
        info = key.rotate()
        assert info.primary_version == expected
        assert [v.version for v in info.versions] == list(range(1, expected + 1))
    assert key.unwrap(old.ciphertext) == dek  # old versions still unwrap
    fresh = make_adapter(key_type, name=key.name)  # another worker rebuilds the same numbering
    assert [v.native_id for v in fresh.describe().versions] == [v.native_id for v in info.versions]

    new = key.wrap(dek)
    assert new.key_version == 4
    moved = key.rewrap(old.ciphertext)
    assert moved.key_version == 4 and key.unwrap(moved.ciphertext) == dek

    outcomes = key.rewrap_batch([old.ciphertext, b"garbage", new.ciphertext, old.ciphertext[:-6] + b"AAAA=="])
    assert [o.index for o in outcomes] == [0, 1, 2, 3]
    assert outcomes[0].wrapped is not None and outcomes[0].wrapped.key_version == 4
    assert isinstance(outcomes[1].error, InvalidCiphertext)
    assert outcomes[2].wrapped is not None and key.unwrap(outcomes[2].wrapped.ciphertext) == dek
    assert isinstance(outcomes[3].error, InvalidCiphertext)

    with pytest.raises(InvalidRequest, match="primary"):
        key.disable_version(4)
    info = key.disable_version(1)
    assert [v.state for v in info.versions] == ["disabled", "enabled", "enabled", "enabled"]
    with pytest.raises(VersionDisabled):
        key.unwrap(old.ciphertext)
    info = key.enable_version(1)
    assert info.state_of(1) == "enabled" and key.unwrap(old.ciphertext) == dek

    with pytest.raises(InvalidRequest, match="primary"):
        key.destroy_below(5)
    info = key.destroy_below(3)
    assert [v.state for v in info.versions] == ["destroyed", "destroyed", "enabled", "enabled"]
    with pytest.raises(VersionDisabled):
        key.unwrap(old.ciphertext)
    with pytest.raises(InvalidRequest, match="destroyed"):
        key.enable_version(1)
    assert key.unwrap(moved.ciphertext) == dek
    # Key Vault keeps the versions: disabled and tagged, with rekey's own tags kept.
    with azure_keyvault.key_client() as keys:
        props = {p.version: p for p in keys.list_properties_of_key_versions(key.name)}
    first = props[info.versions[0].native_id]
    assert first.enabled is False and first.tags == {TAG_VERSION: "1", TAG_DESTROYED: "true"}


def test_garbage_and_mismatched_ciphertexts(make_adapter: Factory) -> None:
    key = make_adapter()
    key.create()
    key.rotate()
    good = key.wrap(b"\x01" * 32).ciphertext
    number, version_id, body = good.split(b":", 4)[1:4]
    assert number == b"v2"
    other = secrets.token_hex(16).encode()
    for garbage in (
        b"",
        b"garbage",
        b"vault:v2:" + version_id + b":" + body,
        good[:-8] + b"AAAAAAA=",  # altered: the service refuses to unwrap it
        good.replace(b":v2:", b":v1:", 1),  # the number does not match the version id
        good.replace(version_id, other, 1),  # no such version
        b"azure:v2:" + version_id + b":not base64!",
        b"azure:v2:" + version_id + b":",
    ):
        with pytest.raises(InvalidCiphertext):
            key.unwrap(garbage)
    with pytest.raises(InvalidCiphertext):
        key.version_of(b"azure:vX:abc:def")


def test_unknown_key(make_adapter: Factory) -> None:
    missing = make_adapter()
    with pytest.raises(NotFound):
        missing.describe()
    with pytest.raises(NotFound):
        missing.wrap(b"\x00" * 32)
    with pytest.raises(NotFound):
        missing.unwrap(b"azure:v1:" + b"0" * 32 + b":" + base64.b64encode(b"\x00" * 40))
    with pytest.raises(InvalidRequest):
        make_adapter(name="no_underscores")
    with pytest.raises(InvalidRequest):
        make_adapter().create(rotation_mode="key-per-version")


def test_throttled_with_retry_after(tmp_path: Path) -> None:
    emulator = AzureKeyVaultEmulator(tmp_path, limits={"wrap": 5, "create": 0, "manage": 0, "read": 0})
    emulator.start()
    try:
        key = AzureHsmAdapter(
            "throttled",
            vault_url=emulator.url,
            credential=StaticTokenCredential(),
            connection_verify=emulator.ca_file,
            release_store=MemoryReleasePolicyStore(),
            governor=Governor("azure-throttle-test", max_attempts=1),  # surface the 429 itself
        )
        key.create()

        def until_throttled() -> Throttled:
            for _ in range(50):
                try:
                    key.wrap(b"\x03" * 32)
                except Throttled as exc:
                    return exc
            raise AssertionError("never throttled")

        first = until_throttled()
        assert first.retryable and first.retry_after is not None and first.retry_after >= 1.0
        emulator.retry_after = False
        assert until_throttled().retry_after is None
        key.close()
    finally:
        emulator.stop()


def _claims(svn: int, debug: bool = False) -> Claims:
    return Claims(
        platform="sim",
        measurement="aa" * 32,
        signer=SIGNER,
        product_id=7,
        svn=svn,
        debug=debug,
        tcb_status="UpToDate",
        report_data="00" * 64,
        evidence_digest="00" * 32,
        evidence_time=datetime.now(UTC),
        nonce="01",
    )


def test_release_gate_and_secure_key_release(azure_keyvault: AzureKeyVault, make_adapter: Factory) -> None:
    verifier: ResultSigner = azure_keyvault.verifier  # the emulator trusts its tokens
    policy = parse_policy(
        {"id": "hsm-release", "rules": [{"platform": "sim", "signer": SIGNER, "product_id": 7, "min_svn": 2}]}
    )
    recipient = HandoffKeyPair()

    def token(claims: Claims, signer: ResultSigner = verifier) -> str:
        return signer.issue(
            claims,
            policy_id=policy.id,
            policy_digest=policy.digest,
            cnf_key_hash=fingerprint(recipient.public_bytes),
            audience="rekey-kms",
            now=datetime.now(UTC),
        )

    key = make_adapter()
    key.set_release_policy(ReleasePolicy(policy, verifier.public_pem()))  # before create: exportable
    info, created = key.create()
    assert created and info.release_policy_id == "hsm-release"
    native = key.native_release_policy(ReleasePolicy(policy, verifier.public_pem()))
    assert native == {
        "version": "1.0.0",
        "anyOf": [
            {
                "authority": verifier.issuer,
                "allOf": [
                    {"claim": "claims.signer", "equals": SIGNER},
                    {"claim": "claims.product_id", "equals": 7},
                    {"claim": "claims.platform", "equals": "sim"},
                    {"claim": "claims.debug", "equals": False},
                    {"claim": "claims.tcb_status", "equals": "UpToDate"},
                ],
            }
        ],
    }
    with azure_keyvault.key_client() as keys:
        current = keys.get_key(key.name)
    assert current.properties.exportable is True and current.properties.release_policy is not None
    assert json.loads(current.properties.release_policy.encoded_policy or b"") == native

    # Our gate: HPKE to the attested recipient key.
    dek = secrets.token_bytes(32)
    wrapped = key.wrap(dek).ciphertext
    released = key.release(wrapped, token(_claims(svn=2)), recipient.public_bytes)
    assert open_released(released, recipient, key.key_ref) == dek
    with pytest.raises(PolicyDenied):
        key.release(wrapped, token(_claims(svn=1)), recipient.public_bytes)

    # Key Vault's Secure Key Release after our gate: a JWS with the key (in the clear from the
    # emulator, since our tokens carry no x-ms-runtime key to wrap it to).
    answer = key.release_key_material(token(_claims(svn=3)), recipient_public_key=recipient.public_bytes)
    body = jwt.decode(answer, options={"verify_signature": False})
    assert body["response"]["key"]["key"]["kid"].endswith(info.versions[0].native_id)
    assert "k" in body["response"]["key"]["key"]
    assert key.release_key_material(token(_claims(svn=2))).count(".") == 2
    releases = azure_keyvault.emulator.stats()["classes"]["release"]["served"]
    with pytest.raises(PolicyDenied, match="svn 1 is below"):
        key.release_key_material(token(_claims(svn=1)))
    with pytest.raises(PolicyDenied, match="attestation result rejected"):
        key.release_key_material(token(_claims(svn=2), signer=ResultSigner.generate()))
    assert azure_keyvault.emulator.stats()["classes"]["release"]["served"] == releases  # never asked

    # The service applies its own policy: a debug enclave passes a gate that allows debug ...
    lax = parse_policy(
        {
            "id": "lax",
            "rules": [
                {"platform": "sim", "signer": SIGNER, "product_id": 7, "min_svn": 0, "debug_allowed": True}
            ],
        }
    )
    key.release_store.put(key.key_ref, ReleasePolicy(lax, verifier.public_pem()))
    with pytest.raises(PolicyDenied, match="Key Vault refused"):  # ... but not the native policy
        key.release_key_material(token(_claims(svn=2, debug=True)))

    # A key created before any release policy is not exportable: Key Vault will not release it.
    plain = make_adapter()
    plain.create()
    plain.set_release_policy(ReleasePolicy(policy, verifier.public_pem()))
    with pytest.raises(InvalidRequest, match="not exportable"):
        plain.release_key_material(token(_claims(svn=2)))
