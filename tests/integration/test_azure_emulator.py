"""The Azure Key Vault emulator through the unmodified azure-keyvault-keys SDK (and raw HTTPS where
the SDK hides what Key Vault answers)."""

from __future__ import annotations

import base64
import http.client
import json
import os
import secrets
import signal
import ssl
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
import pytest
from azure.core.exceptions import HttpResponseError, ResourceExistsError, ResourceNotFoundError
from azure.keyvault.keys import KeyClient, KeyReleasePolicy, KeyRotationLifetimeAction, KeyRotationPolicy
from azure.keyvault.keys.crypto import CryptographyClient, EncryptionAlgorithm, KeyWrapAlgorithm
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap, aes_key_unwrap_with_padding

from emulators.azure_keyvault import AzureKeyVaultEmulator
from kms_adapters.azure_hsm import RemoteCryptographyClient, StaticTokenCredential
from tests.fixtures.azure import AzureKeyVault

pytestmark = pytest.mark.integration

AUTHORITY = "https://attest.example/rekey"


def _name(prefix: str = "k") -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


def _raw(
    url: str,
    ca_file: str,
    method: str,
    path: str,
    body: Any = None,
    token: str | None = "t",  # noqa: S107
) -> tuple[int, dict[str, str], Any]:
    """One HTTPS request without the SDK: (status, headers, JSON body or None)."""
    host, port = url.removeprefix("https://").split(":")
    conn = http.client.HTTPSConnection(host, int(port), context=ssl.create_default_context(cafile=ca_file))
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        conn.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
        response = conn.getresponse()
        data = response.read()
        return response.status, dict(response.getheaders()), json.loads(data) if data else None
    finally:
        conn.close()


def _remote(kv: AzureKeyVault | AzureKeyVaultEmulator, key_id: str) -> CryptographyClient:
    """A CryptographyClient that always asks the service (see test_sdk_wraps_oct_locally_...)."""
    ca = kv.ca_file
    return RemoteCryptographyClient(
        key_id, StaticTokenCredential(), verify_challenge_resource=False, connection_verify=ca, retry_total=0
    )


@pytest.fixture
def client(azure_keyvault: AzureKeyVault) -> KeyClient:
    return azure_keyvault.key_client()


@pytest.fixture
def own_emulator(tmp_path: Path) -> Iterator[Callable[..., AzureKeyVaultEmulator]]:
    """Start dedicated emulators (for throttling, challenge and restart tests); all stopped after."""
    started: list[AzureKeyVaultEmulator] = []

    def start(state: Path | None = None, **options: Any) -> AzureKeyVaultEmulator:
        options.setdefault("limits", {"create": 0, "manage": 0, "read": 0})
        emulator = AzureKeyVaultEmulator(state or tmp_path / "state", **options)
        emulator.start()
        started.append(emulator)
        return emulator

    yield start
    for emulator in started:
        emulator.stop()


def _client_for(emulator: AzureKeyVaultEmulator, **options: Any) -> KeyClient:
    settings: dict[str, Any] = {"verify_challenge_resource": False, "connection_verify": emulator.ca_file}
    settings.setdefault("retry_total", 0)
    settings.update(options)
    return KeyClient(emulator.url, StaticTokenCredential(), **settings)


def test_bearer_challenge_then_success(own_emulator: Callable[..., AzureKeyVaultEmulator]) -> None:
    emulator = own_emulator()
    status, headers, body = _raw(
        emulator.url, emulator.ca_file, "GET", "/keys?api-version=2025-07-01", token=None
    )
    assert status == 401
    assert headers["WWW-Authenticate"] == (
        f'Bearer authorization="https://login.microsoftonline.com/{emulator.tenant}", '
        'resource="https://vault.azure.net"'
    )
    assert body["error"]["code"] == "Unauthorized"

    # A new host for the SDK's process-wide challenge cache: its first request is sent without
    # body or token, answered 401, then repeated with the token.
    emulator.reset_stats()
    key = _client_for(emulator).create_key(_name(), "oct-HSM", size=256)
    assert key.id.startswith(f"{emulator.url}/keys/")
    stats = emulator.stats()
    assert stats["unauthorized"] == 1 and stats["statuses"] == {"401": 1, "200": 1}
    assert stats["classes"]["create"]["served"] == 1


def test_api_version_required(azure_keyvault: AzureKeyVault) -> None:
    url, ca = azure_keyvault.url, azure_keyvault.ca_file
    assert _raw(url, ca, "GET", "/keys")[2]["error"]["code"] == "BadParameter"
    status, _, body = _raw(url, ca, "GET", "/keys?api-version=1.0")
    assert status == 400 and "not recognized" in body["error"]["message"]
    for version in ("7.4", "7.6-preview.2", "2025-07-01"):
        assert _raw(url, ca, "GET", f"/keys?api-version={version}")[0] == 200


def test_oct_key_lifecycle(azure_keyvault: AzureKeyVault, client: KeyClient) -> None:
    name = _name()
    created = client.create_key(name, "oct-HSM", size=256, tags={"team": "payments"})
    assert created.key_type == "oct-HSM" and created.key.k is None
    assert sorted(created.key_operations or []) == ["decrypt", "encrypt", "unwrapKey", "wrapKey"]
    assert created.properties.tags == {"team": "payments"} and created.properties.enabled
    assert created.properties.recovery_level == "Recoverable+Purgeable"
    assert created.properties.created_on is not None and created.properties.created_on.tzinfo is not None

    rotated = [client.rotate_key(name) for _ in range(2)]
    latest = client.get_key(name)
    assert latest.properties.version == rotated[-1].properties.version
    assert client.get_key(name, created.properties.version).id == created.id

    # Paging: 3 versions, 2 per page; the SDK follows nextLink.
    listed = list(client.list_properties_of_key_versions(name, max_page_size=2))
    assert {p.version for p in listed} == {
        created.properties.version,
        *(r.properties.version for r in rotated),
    }
    assert all(not p.exportable for p in listed)

    updated = client.update_key_properties(name, created.properties.version, enabled=False, tags={"a": "b"})
    assert updated.properties.enabled is False and updated.properties.tags == {"a": "b"}
    assert client.get_key(name, created.properties.version).properties.enabled is False
    assert client.get_key(name).properties.enabled is True  # other versions untouched

    # wrap/unwrap (A256KW) and encrypt/decrypt (A256GCM) on the service
    crypto = _remote(azure_keyvault, latest.id)
    dek = secrets.token_bytes(32)
    wrapped = crypto.wrap_key(KeyWrapAlgorithm.aes_256, dek)
    assert len(wrapped.encrypted_key) == 40 and wrapped.key_id == latest.id
    assert crypto.unwrap_key(KeyWrapAlgorithm.aes_256, wrapped.encrypted_key).key == dek
    padded = crypto.wrap_key(KeyWrapAlgorithm.ckm_aes_key_wrap_pad, b"odd length!")
    assert (
        crypto.unwrap_key(KeyWrapAlgorithm.ckm_aes_key_wrap_pad, padded.encrypted_key).key == b"odd length!"
    )
    plain = CryptographyClient(latest, StaticTokenCredential(), **azure_keyvault.client_options())
    sealed = plain.encrypt(EncryptionAlgorithm.a256_gcm, b"hello", additional_authenticated_data=b"ctx")
    assert sealed.iv is not None and sealed.tag is not None and len(sealed.iv) == 12
    opened = plain.decrypt(
        EncryptionAlgorithm.a256_gcm,
        sealed.ciphertext,
        iv=sealed.iv,
        authentication_tag=sealed.tag,
        additional_authenticated_data=b"ctx",
    )
    assert opened.plaintext == b"hello"


def test_rsa_keys(azure_keyvault: AzureKeyVault, client: KeyClient) -> None:
    key = client.create_rsa_key(_name("rsa"), size=2048, hardware_protected=True)
    assert key.key_type == "RSA-HSM" and key.key.n is not None and len(key.key.n) == 256
    big = client.create_rsa_key(_name("rsa"), size=3072, hardware_protected=True)
    assert big.key.n is not None and len(big.key.n) == 384

    # The SDK wraps and encrypts with the public key locally; unwrap/decrypt go to the service.
    stats = azure_keyvault.emulator.stats()["classes"]
    crypto = CryptographyClient(key, StaticTokenCredential(), **azure_keyvault.client_options())
    dek = secrets.token_bytes(32)
    wrapped = crypto.wrap_key(KeyWrapAlgorithm.rsa_oaep_256, dek)
    assert crypto.unwrap_key(KeyWrapAlgorithm.rsa_oaep_256, wrapped.encrypted_key).key == dek
    sealed = crypto.encrypt(EncryptionAlgorithm.rsa_oaep, b"secret")
    assert crypto.decrypt(EncryptionAlgorithm.rsa_oaep, sealed.ciphertext).plaintext == b"secret"
    after = azure_keyvault.emulator.stats()["classes"]
    assert after["rsa2048"]["served"] - stats["rsa2048"]["served"] == 2
    assert after["rsa2048-public"]["served"] == stats["rsa2048-public"]["served"]

    # ... and the service's own RSA-OAEP-256 wrap unwraps with it too.
    remote = _remote(azure_keyvault, key.id)
    assert (
        remote.unwrap_key(
            KeyWrapAlgorithm.rsa_oaep_256, remote.wrap_key(KeyWrapAlgorithm.rsa_oaep_256, dek).encrypted_key
        ).key
        == dek
    )


def test_sdk_wraps_oct_locally_with_a_random_key(azure_keyvault: AzureKeyVault, client: KeyClient) -> None:
    """Canary for an azure-keyvault-keys 4.11 trap the adapter avoids: a CryptographyClient for an
    oct-HSM key (whose bytes the service never returns) wraps locally with random bytes."""
    key = client.create_key(_name(), "oct-HSM", size=256)
    served = azure_keyvault.emulator.stats()["classes"]["wrap"]["served"]
    crypto = CryptographyClient(key, StaticTokenCredential(), **azure_keyvault.client_options())
    wrapped = crypto.wrap_key(KeyWrapAlgorithm.aes_256, b"\x01" * 32)
    assert azure_keyvault.emulator.stats()["classes"]["wrap"]["served"] == served  # never left the process
    with pytest.raises(HttpResponseError) as refused:
        _remote(azure_keyvault, key.id).unwrap_key(KeyWrapAlgorithm.aes_256, wrapped.encrypted_key)
    assert refused.value.status_code == 400


def test_disabled_version_and_bad_ciphertexts(azure_keyvault: AzureKeyVault, client: KeyClient) -> None:
    key = client.create_key(_name(), "oct-HSM", size=256)
    crypto = _remote(azure_keyvault, key.id)
    wrapped = crypto.wrap_key(KeyWrapAlgorithm.aes_256, secrets.token_bytes(32)).encrypted_key

    for garbage in (b"\x00" * 40, wrapped[:-8] + b"\x00" * 8, b"short"):
        with pytest.raises(HttpResponseError) as bad:
            crypto.unwrap_key(KeyWrapAlgorithm.aes_256, garbage)
        assert bad.value.status_code == 400 and bad.value.error is not None
        assert bad.value.error.code == "BadParameter"

    client.update_key_properties(key.name, key.properties.version, enabled=False)
    with pytest.raises(HttpResponseError) as refused:
        crypto.unwrap_key(KeyWrapAlgorithm.aes_256, wrapped)
    error = refused.value.error
    assert refused.value.status_code == 403 and error is not None
    assert error.code == "Forbidden"
    assert error.message == "Operation unwrapKey is not allowed on a disabled key."
    assert error.innererror == {"code": "KeyDisabled"}

    with pytest.raises(ResourceNotFoundError) as missing:
        client.get_key(_name("absent"))
    assert missing.value.status_code == 404 and missing.value.error is not None
    assert missing.value.error.code == "KeyNotFound"
    with pytest.raises(ResourceNotFoundError):
        _remote(azure_keyvault, f"{azure_keyvault.url}/keys/{key.name}/{'0' * 32}").unwrap_key(
            KeyWrapAlgorithm.aes_256, wrapped
        )


def _attestation_token(signer: ec.EllipticCurvePrivateKey, **claims: Any) -> str:
    now = datetime.now(UTC)
    payload = {"iss": AUTHORITY, "iat": now, "exp": now + timedelta(minutes=5), **claims}
    return jwt.encode(payload, signer, algorithm="ES256")


def test_secure_key_release(own_emulator: Callable[..., AzureKeyVaultEmulator]) -> None:
    attester = ec.generate_private_key(ec.SECP256R1())
    emulator = own_emulator(
        attestation_verifier=attester.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    client = _client_for(emulator)
    policy = {
        "version": "1.0.0",
        "anyOf": [{"authority": AUTHORITY, "allOf": [{"claim": "tee.debuggable", "equals": False}]}],
    }
    name = _name()
    key = client.create_key(
        name,
        "oct-HSM",
        size=256,
        exportable=True,
        release_policy=KeyReleasePolicy(json.dumps(policy).encode()),
    )
    assert key.properties.exportable is True
    assert key.properties.release_policy is not None
    assert json.loads(key.properties.release_policy.encoded_policy or b"") == policy

    # The key material, wrapped to the runtime key in the token (RSA-OAEP-256 + AES-KWP).
    runtime = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    numbers = runtime.public_key().public_numbers()
    jwk = {
        "kty": "RSA",
        "kid": "TpmEphemeralEncryptionKey",
        "n": base64.urlsafe_b64encode(numbers.n.to_bytes(256, "big")).rstrip(b"=").decode(),
        "e": "AQAB",
    }
    token = _attestation_token(attester, tee={"debuggable": False}, **{"x-ms-runtime": {"keys": [jwk]}})
    released = client.release_key(name, token, algorithm="RSA_AES_KEY_WRAP_256", nonce="n-1")
    header = jwt.get_unverified_header(released.value)
    chain = [x509.load_der_x509_certificate(base64.b64decode(c)) for c in header["x5c"]]
    assert chain[-1].subject == x509.load_pem_x509_certificate(Path(emulator.ca_file).read_bytes()).subject
    body = jwt.decode(released.value, chain[0].public_key(), algorithms=["RS256"])  # type: ignore[arg-type]
    assert body["request"]["enc"] == "RSA_AES_KEY_WRAP_256" and body["request"]["nonce"] == "n-1"
    out = body["response"]["key"]["key"]
    assert out["kid"] == key.id and "k" not in out
    blob = json.loads(base64.urlsafe_b64decode(out["key_hsm"] + "=="))
    wrapped = base64.urlsafe_b64decode(blob["ciphertext"] + "==")
    transport = runtime.decrypt(
        wrapped[:256], padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    )
    material = aes_key_unwrap_with_padding(transport, wrapped[256:])
    assert len(material) == 32
    service_wrapped = _remote(emulator, key.id).wrap_key(KeyWrapAlgorithm.aes_256, b"\x07" * 32).encrypted_key
    assert aes_key_unwrap(material, service_wrapped) == b"\x07" * 32

    # Without a runtime key the emulator releases the material in the clear (Key Vault never does).
    clear = jwt.decode(
        client.release_key(name, _attestation_token(attester, tee={"debuggable": False})).value,
        options={"verify_signature": False},
    )
    assert base64.urlsafe_b64decode(clear["response"]["key"]["key"]["k"] + "==") == material

    refusals = [
        _attestation_token(attester, tee={"debuggable": True}),  # the policy's claim
        _attestation_token(ec.generate_private_key(ec.SECP256R1()), tee={"debuggable": False}),  # signer
        jwt.encode(  # issuer is not the authority
            {
                "iss": "https://evil.example",
                "exp": datetime.now(UTC) + timedelta(minutes=5),
                "tee": {"debuggable": False},
            },
            attester,
            algorithm="ES256",
        ),
    ]
    for bad in refusals:
        with pytest.raises(HttpResponseError) as denied:
            client.release_key(name, bad)
        assert denied.value.status_code == 403
    plain = client.create_key(_name(), "oct-HSM", size=256)
    with pytest.raises(HttpResponseError) as not_exportable:
        client.release_key(plain.name, token)
    assert not_exportable.value.status_code == 400
    with pytest.raises(HttpResponseError):
        client.create_key(_name(), "oct-HSM", size=256, exportable=True)  # exportable needs a policy


def test_rotation_policy(client: KeyClient) -> None:
    name = client.create_key(_name(), "oct-HSM", size=256).name
    default = client.get_key_rotation_policy(name)
    assert [a.action for a in default.lifetime_actions] == ["Notify"]
    policy = KeyRotationPolicy(
        expires_in="P90D",
        lifetime_actions=[KeyRotationLifetimeAction("Rotate", time_after_create="P30D")],
    )
    updated = client.update_key_rotation_policy(name, policy)
    assert updated.expires_in == "P90D" and updated.lifetime_actions[0].time_after_create == "P30D"
    fetched = client.get_key_rotation_policy(name)
    assert fetched.id and fetched.expires_in == "P90D" and fetched.created_on is not None
    assert [(a.action, a.time_after_create) for a in fetched.lifetime_actions] == [("Rotate", "P30D")]


def test_soft_delete_recover_purge(client: KeyClient) -> None:
    name = client.create_key(_name(), "oct-HSM", size=256).name
    deleted = client.begin_delete_key(name, _polling_interval=0).result()
    assert deleted.recovery_id and deleted.scheduled_purge_date is not None
    with pytest.raises(ResourceNotFoundError):
        client.get_key(name)
    assert client.get_deleted_key(name).name == name
    with pytest.raises(ResourceExistsError):
        client.create_key(name, "oct-HSM", size=256)
    assert client.begin_recover_deleted_key(name, _polling_interval=0).result().name == name
    client.begin_delete_key(name, _polling_interval=0).wait()
    client.purge_deleted_key(name)
    with pytest.raises(ResourceNotFoundError):
        client.get_deleted_key(name)
    assert client.create_key(name, "oct-HSM", size=256).name == name  # the name is free again


def test_throttling_with_and_without_retry_after(own_emulator: Callable[..., AzureKeyVaultEmulator]) -> None:
    emulator = own_emulator(limits={"wrap": 5, "create": 0, "manage": 0, "read": 0}, retry_after=True)
    key = _client_for(emulator).create_key(_name(), "oct-HSM", size=256)
    crypto = _remote(emulator, key.id)

    def until_throttled() -> HttpResponseError:
        for _ in range(50):
            try:
                crypto.wrap_key(KeyWrapAlgorithm.aes_256, b"\x02" * 32)
            except HttpResponseError as exc:
                return exc
        raise AssertionError("never throttled")

    throttled = until_throttled()
    assert throttled.status_code == 429 and throttled.error is not None
    assert throttled.error.code == "Throttled"
    assert throttled.response is not None and int(throttled.response.headers["Retry-After"]) >= 1
    emulator.retry_after = False
    throttled = until_throttled()
    assert throttled.status_code == 429
    assert throttled.response is not None and "Retry-After" not in throttled.response.headers
    stats = emulator.stats()["classes"]["wrap"]
    assert stats["limit"] == 5 and stats["served"] >= 5 and stats["throttled"] >= 2

    # azure-core's default retry policy does not repeat a POST answered 429 without Retry-After.
    defaults = _remote_with_default_retries(emulator, key.id)
    before = emulator.stats()["classes"]["wrap"]["throttled"]
    with pytest.raises(HttpResponseError):
        for _ in range(50):
            defaults.wrap_key(KeyWrapAlgorithm.aes_256, b"\x02" * 32)
    assert emulator.stats()["classes"]["wrap"]["throttled"] == before + 1


def _remote_with_default_retries(emulator: AzureKeyVaultEmulator, key_id: str) -> CryptographyClient:
    return RemoteCryptographyClient(
        key_id, StaticTokenCredential(), verify_challenge_resource=False, connection_verify=emulator.ca_file
    )


def test_state_survives_a_restart(tmp_path: Path, own_emulator: Callable[..., AzureKeyVaultEmulator]) -> None:
    state = tmp_path / "persist"
    first = own_emulator(state)
    ca = Path(first.ca_file).read_bytes()
    key = _client_for(first).create_key(_name(), "oct-HSM", size=256, tags={"x": "y"})
    wrapped = _remote(first, key.id).wrap_key(KeyWrapAlgorithm.aes_256, b"\x05" * 32).encrypted_key
    first.stop()
    assert (state / "keys.json").stat().st_mode & 0o777 == 0o600

    second = own_emulator(state)
    assert Path(second.ca_file).read_bytes() == ca  # clients keep trusting the same CA
    again = _client_for(second).get_key(key.name)
    assert again.properties.version == key.properties.version and again.properties.tags == {"x": "y"}
    assert _remote(second, again.id).unwrap_key(KeyWrapAlgorithm.aes_256, wrapped).key == b"\x05" * 32


def test_runs_alone_until_sigterm(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "emulators.azure_keyvault",
            "--port",
            "0",
            "--state-dir",
            str(tmp_path),
            "--limit",
            "wrap=50",
            "--retry-after",
            "off",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    try:
        assert proc.stdout is not None
        lines = dict(proc.stdout.readline().strip().split("=", 1) for _ in range(2))
        url, ca = lines["AZURE_KEYVAULT_URL"], lines["AZURE_KEYVAULT_CA_FILE"]
        assert url.startswith("https://127.0.0.1:") and Path(ca).is_file()
        status, _, stats = _raw(url, ca, "GET", "/_emulator/stats", token=None)
        assert status == 200 and stats["retry_after"] is False
        assert stats["classes"]["wrap"]["limit"] == 50
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(timeout=10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
