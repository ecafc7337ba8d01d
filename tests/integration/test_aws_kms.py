"""The AWS KMS adapter against a real moto server process (both rotation modes)."""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import boto3
import pytest
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    ReadTimeoutError,
    SSLError,
)
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from attestation.claims import Claims
from attestation.nitro import NitroVerifier
from attestation.policy import parse_policy
from attestation.token import ResultSigner
from kms_adapters.aws_errors import map_aws_error
from kms_adapters.aws_kms import NATIVE_NOTE, AwsKmsAdapter
from kms_adapters.aws_nitro import RECIPIENT_SID
from kms_adapters.contract import KmsAdapter, RotationMode
from kms_adapters.errors import (
    AnswerLost,
    InvalidCiphertext,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    PolicyDenied,
    Throttled,
    Unavailable,
    VersionDisabled,
)
from kms_adapters.governor import Governor
from kms_adapters.release import MemoryReleasePolicyStore, ReleasePolicy, open_released
from sealing.handoff import HandoffKeyPair, fingerprint
from tests.fixtures.nitro import PCR0, NitroTestCA
from tests.fixtures.ports import free_port

T = TypeVar("T")
DER, SPKI = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo

pytestmark = pytest.mark.integration

CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
REGION = "us-east-1"
SIGNER = "83" * 32


@pytest.fixture
def moto_url(moto_server: str) -> str:
    return moto_server


@pytest.fixture
def store() -> MemoryReleasePolicyStore:
    return MemoryReleasePolicyStore()


@pytest.fixture
def make(moto_url: str, store: MemoryReleasePolicyStore) -> Callable[..., AwsKmsAdapter]:
    governor = Governor(f"moto-{secrets.token_hex(4)}")

    def factory(name: str, **kwargs: object) -> AwsKmsAdapter:
        return AwsKmsAdapter(
            name,
            endpoint_url=moto_url,
            region=REGION,
            release_store=store,
            credentials=CREDENTIALS,
            governor=governor,
            **kwargs,  # type: ignore[arg-type]
        )

    return factory


def _name() -> str:
    return f"t-{secrets.token_hex(4)}"


@pytest.mark.parametrize("mode", ["key-per-version", "native"])
def test_create_is_idempotent_and_recorded_on_the_key(
    make: Callable[..., AwsKmsAdapter], mode: RotationMode
) -> None:
    name = _name()
    adapter = make(name)
    assert isinstance(adapter, KmsAdapter)
    info, created = adapter.create(rotation_mode=mode)
    assert created and info.rotation_mode == mode and info.primary_version == 1
    assert info.key_type == "SYMMETRIC_DEFAULT" and info.key_ref == f"aws:{name}"
    again, created_again = adapter.create()
    assert not created_again and again.versions == info.versions
    # another worker reads the mode back from the key's tags
    other = make(name)
    assert other.describe().rotation_mode == mode
    with pytest.raises(InvalidRequest, match="rotation mode"):
        other.create(rotation_mode="native" if mode == "key-per-version" else "key-per-version")


def test_default_mode_is_key_per_version(make: Callable[..., AwsKmsAdapter]) -> None:
    info, _ = make(_name()).create()
    assert info.rotation_mode == "key-per-version" and info.notes == ()


def test_key_per_version_lifecycle(make: Callable[..., AwsKmsAdapter]) -> None:
    name = _name()
    key = make(name)
    key.create()
    dek = secrets.token_bytes(32)
    old = key.wrap(dek)
    assert old.key_version == 1 and old.ciphertext.startswith(b"aws:v1:")
    assert key.version_of(old.ciphertext) == 1 and key.unwrap(old.ciphertext) == dek

    info = key.rotate()
    assert info.primary_version == 2 and [v.version for v in info.versions] == [1, 2]
    assert info.versions[0].native_id != info.versions[1].native_id  # one KMS key per version
    assert key.unwrap(old.ciphertext) == dek  # the old version still unwraps
    new = key.wrap(dek)
    assert new.key_version == 2

    moved = key.rewrap(old.ciphertext)
    assert moved.key_version == 2 and key.version_of(moved.ciphertext) == 2
    assert key.unwrap(moved.ciphertext) == dek

    relabeled = new.ciphertext.replace(b"aws:v2:", b"aws:v1:", 1)  # a v2 ciphertext posing as v1
    outcomes = key.rewrap_batch([old.ciphertext, b"garbage", new.ciphertext, relabeled])
    assert [o.index for o in outcomes] == [0, 1, 2, 3]
    assert outcomes[0].wrapped is not None and outcomes[0].wrapped.key_version == 2
    assert isinstance(outcomes[1].error, InvalidCiphertext) and outcomes[1].wrapped is None
    assert outcomes[2].wrapped is not None and outcomes[2].wrapped.key_version == 2
    assert isinstance(outcomes[3].error, InvalidCiphertext)

    with pytest.raises(InvalidRequest, match="primary"):
        key.disable_version(2)
    info = key.disable_version(1)
    assert info.state_of(1) == "disabled" and info.state_of(2) == "enabled"
    with pytest.raises(VersionDisabled, match="disabled"):
        key.unwrap(old.ciphertext)
    with pytest.raises(VersionDisabled):
        key.rewrap(old.ciphertext)
    assert key.unwrap(moved.ciphertext) == dek
    # a second worker (no cache) reads the state from KMS
    with pytest.raises(VersionDisabled):
        make(name).unwrap(old.ciphertext)
    assert key.enable_version(1).state_of(1) == "enabled"
    assert key.unwrap(old.ciphertext) == dek

    with pytest.raises(InvalidRequest, match="primary"):
        key.destroy_below(3)
    info = key.destroy_below(2)
    assert info.state_of(1) == "pending_deletion" and info.state_of(2) == "enabled"
    with pytest.raises(VersionDisabled, match="scheduled for deletion"):
        key.unwrap(old.ciphertext)
    assert key.destroy_below(2).state_of(1) == "pending_deletion"  # idempotent
    assert key.unwrap(moved.ciphertext) == dek

    info = key.cancel_destroy(1)
    assert info.state_of(1) == "enabled"
    assert key.unwrap(old.ciphertext) == dek


def test_native_lifecycle(make: Callable[..., AwsKmsAdapter]) -> None:
    key = make(_name())
    info, _ = key.create(rotation_mode="native")
    assert info.notes == (NATIVE_NOTE,)
    dek = secrets.token_bytes(32)
    old = key.wrap(dek)
    assert old.ciphertext.startswith(b"aws:v1:")

    info = key.rotate()
    assert info.primary_version == 2 and [v.state for v in info.versions] == ["enabled", "enabled"]
    assert len({v.native_id for v in info.versions}) == 1  # one KMS key for every version
    assert any("cannot retire old key material" in note for note in info.notes)
    assert key.unwrap(old.ciphertext) == dek
    new = key.wrap(dek)
    assert new.key_version == 2
    moved = key.rewrap(old.ciphertext)
    assert moved.key_version == 2 and key.unwrap(moved.ciphertext) == dek
    outcomes = key.rewrap_batch([old.ciphertext, b"aws:v1:Zm9v", new.ciphertext])
    assert outcomes[0].wrapped is not None and outcomes[0].wrapped.key_version == 2
    assert isinstance(outcomes[1].error, InvalidCiphertext)
    assert outcomes[2].wrapped is not None

    with pytest.raises(InvalidRequest, match="native rotation cannot retire old key material"):
        key.disable_version(1)
    with pytest.raises(InvalidRequest, match="native rotation cannot retire old key material"):
        key.destroy_below(2)
    with pytest.raises(InvalidCiphertext, match="never had"):
        key.unwrap(old.ciphertext.replace(b"aws:v1:", b"aws:v3:", 1))


def test_garbage_and_foreign_ciphertexts(make: Callable[..., AwsKmsAdapter]) -> None:
    key, other = make(_name()), make(_name())
    key.create()
    other.create()
    good = key.wrap(b"\x01" * 32).ciphertext
    blob = base64.b64decode(good[len(b"aws:v1:") :])
    garbage = [
        b"garbage",
        b"",
        b"vault:v1:" + good[len(b"aws:v1:") :],
        b"aws:v1:!!not-base64!!",
        b"aws:v1:",
        b"aws:v1:" + base64.b64encode(b"short"),
        good[:-8] + b"AAAAAAAA",  # altered
        b"aws:v1:" + base64.b64encode(blob[:-1] + bytes([blob[-1] ^ 1])),  # flipped bit
        good.replace(b"aws:v1:", b"aws:v7:", 1),  # a version that never existed
        other.wrap(b"\x02" * 32).ciphertext,  # another key's ciphertext
    ]
    for item in garbage:
        with pytest.raises(InvalidCiphertext):
            key.unwrap(item)
    assert all(isinstance(o.error, InvalidCiphertext) for o in key.rewrap_batch(garbage))


def test_unknown_key(make: Callable[..., AwsKmsAdapter]) -> None:
    missing = make(_name())
    with pytest.raises(NotFound):
        missing.describe()
    with pytest.raises(NotFound):
        missing.wrap(b"\x00" * 32)
    with pytest.raises(NotFound):
        missing.rotate()
    with pytest.raises(NotFound):
        missing.unwrap(b"aws:v1:" + base64.b64encode(b"x" * 64))


def test_invalid_names_are_refused(moto_url: str, store: MemoryReleasePolicyStore) -> None:
    with pytest.raises(InvalidRequest, match="alias characters"):
        AwsKmsAdapter("orders.v2", endpoint_url=moto_url, region=REGION, release_store=store)


def test_endpoint_down_is_unavailable(store: MemoryReleasePolicyStore) -> None:
    down = AwsKmsAdapter(
        "anything",
        endpoint_url=f"http://127.0.0.1:{free_port()}",
        region=REGION,
        release_store=store,
        credentials=CREDENTIALS,
        governor=Governor("down", max_attempts=1),
    )
    with pytest.raises(Unavailable) as caught:
        down.describe()
    assert caught.value.retryable
    with pytest.raises(Unavailable):
        down.wrap(b"\x00" * 32)


def _client_error(code: str, status: int = 400, message: str = "x") -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": message}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "Decrypt",
    )


@pytest.mark.parametrize(
    ("exc", "op", "expected"),
    [
        (_client_error("ThrottlingException"), "decrypt", Throttled),
        (_client_error("LimitExceededException", message="Rate exceeded"), "encrypt", Throttled),
        (_client_error("LimitExceededException", message="too many keys"), "create_key", InvalidRequest),
        (_client_error("NotFoundException"), "describe_key", NotFound),
        (_client_error("DisabledException"), "decrypt", VersionDisabled),
        (_client_error("KMSInvalidStateException"), "decrypt", VersionDisabled),
        (_client_error("KMSInvalidStateException"), "cancel_key_deletion", InvalidRequest),
        (_client_error("InvalidCiphertextException"), "decrypt", InvalidCiphertext),
        (_client_error("IncorrectKeyException"), "re_encrypt", InvalidCiphertext),
        (
            _client_error("AccessDeniedException", message="User is not authorized"),
            "decrypt",
            PermissionDenied,
        ),
        (_client_error("AccessDeniedException", message=""), "decrypt", InvalidCiphertext),
        (_client_error("AccessDeniedException", message=""), "describe_key", PermissionDenied),
        (_client_error("KMSInternalException", 500), "encrypt", AnswerLost),  # may have been applied
        (_client_error("Whatever", 503), "encrypt", AnswerLost),
        (_client_error("ValidationException"), "create_alias", InvalidRequest),
        (EndpointConnectionError(endpoint_url="http://x"), "encrypt", Unavailable),
        (ReadTimeoutError(endpoint_url="http://x"), "encrypt", AnswerLost),
        (ConnectionClosedError(endpoint_url="http://x"), "create_key", AnswerLost),
        (ConnectTimeoutError(endpoint_url="http://x"), "create_key", Unavailable),  # never sent
        (SSLError(endpoint_url="http://x", error="handshake"), "create_key", Unavailable),
    ],
)
def test_error_mapping(exc: Exception, op: str, expected: type[Exception]) -> None:
    mapped = map_aws_error(exc, op, "aws:k")
    assert type(mapped) is expected
    assert "http://x" not in str(mapped)


def _claims(svn: int) -> Claims:
    return Claims(
        platform="sim",
        measurement="aa" * 32,
        signer=SIGNER,
        product_id=1,
        svn=svn,
        debug=False,
        tcb_status="UpToDate",
        report_data="00" * 64,
        evidence_digest="00" * 32,
        evidence_time=datetime.now(UTC),
        nonce="01",
    )


def test_release_and_release_for_nitro_refused(make: Callable[..., AwsKmsAdapter]) -> None:
    key = make(_name())
    key.create()
    verifier = ResultSigner.generate()
    policy = parse_policy(
        {"id": "release", "rules": [{"platform": "sim", "signer": SIGNER, "product_id": 1, "min_svn": 2}]}
    )
    key.set_release_policy(ReleasePolicy(policy, verifier.public_pem()))
    assert key.describe().release_policy_id == "release"
    dek = secrets.token_bytes(32)
    wrapped = key.wrap(dek).ciphertext
    recipient = HandoffKeyPair()

    def token(svn: int) -> str:
        return verifier.issue(
            _claims(svn),
            policy_id="release",
            policy_digest=policy.digest,
            cnf_key_hash=fingerprint(recipient.public_bytes),
            audience="rekey-kms",
            now=datetime.now(UTC),
        )

    released = key.release(wrapped, token(2), recipient.public_bytes)
    assert dek not in released and open_released(released, recipient, key.key_ref) == dek

    # A Nitro document never rides along with a token for another enclave (see the test below).
    with pytest.raises(PolicyDenied, match="does not verify") as refused:
        key.release_for_nitro(
            wrapped, token(2), recipient.public_bytes, b"attestation document of some enclave"
        )
    assert not refused.value.retryable and dek.hex() not in str(refused.value)
    # The verified path still releases.
    assert (
        open_released(key.release(wrapped, token(2), recipient.public_bytes), recipient, key.key_ref) == dek
    )


class Recipient:
    def __init__(self, public_bytes: bytes) -> None:
        self.public_bytes = public_bytes


@pytest.mark.parametrize("mode", ["key-per-version", "native"])
def test_release_for_nitro_binds_the_verified_document_to_the_result(
    make: Callable[..., AwsKmsAdapter], moto_url: str, mode: RotationMode
) -> None:
    """The document KMS would encrypt to must verify, be the one the result was issued for, carry
    the recipient key and satisfy the policy; the key policy denies other images to KMS itself."""
    now = datetime.now(UTC)
    ca = NitroTestCA.create(now - timedelta(minutes=1))
    nitro = NitroVerifier(root_pem=ca.root_pem)
    key = make(_name(), nitro_verifier=nitro)
    key.create(rotation_mode=mode)
    signer = ResultSigner.generate()
    rule = {
        "platform": "nitro",
        "measurements": [PCR0.hex()],
        "nonce_required": False,
        "details": {"pcr1": "01" * 48},
    }
    policy = parse_policy({"id": "nitro-release", "rules": [rule]})
    key.set_release_policy(ReleasePolicy(policy, signer.public_pem()))
    enclave_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    recipient = Recipient(enclave_key.public_key().public_bytes(DER, SPKI))
    other = Recipient(
        rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key().public_bytes(DER, SPKI)
    )

    def document(public_key: bytes, **fields: object) -> bytes:
        return ca.sign(ca.payload(now, public_key=public_key, **fields))

    def token_for(doc: bytes, cnf: bytes) -> str:
        return signer.issue(
            nitro.verify(doc, at=now),
            policy_id=policy.id,
            policy_digest=policy.digest,
            cnf_key_hash=fingerprint(cnf),
            audience="rekey-kms",
            now=now,
        )

    def statement() -> dict[str, object] | None:
        """rekey's statement in the key policy of the primary version's KMS key."""
        client = boto3.client("kms", region_name=REGION, endpoint_url=moto_url, **CREDENTIALS)
        key_id = client.describe_key(KeyId=key.alias)["KeyMetadata"]["KeyId"]
        raw = client.get_key_policy(KeyId=key_id, PolicyName="default")["Policy"]
        found = [s for s in json.loads(raw)["Statement"] if s.get("Sid") == RECIPIENT_SID]
        return found[0] if found else None

    dek = secrets.token_bytes(32)
    wrapped = key.wrap(dek).ciphertext
    good = document(recipient.public_bytes)
    released = key.release_for_nitro(
        wrapped, token_for(good, recipient.public_bytes), recipient.public_bytes, good
    )
    assert released.scheme == "rsa-oaep"  # moto ignores Recipient: the adapter did what KMS would
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    assert enclave_key.decrypt(released.ciphertext, oaep) == dek

    denied = statement()
    assert denied is not None and denied["Effect"] == "Deny"
    assert denied["Condition"]["StringNotEqualsIgnoreCase"] == {  # type: ignore[index]
        "kms:RecipientAttestation:ImageSha384": [PCR0.hex()]
    }
    zero = bytes(48)
    debug = document(recipient.public_bytes, pcrs={i: zero for i in range(16)})
    foreign_ca = NitroTestCA.create(now - timedelta(minutes=1))
    other_pcr1 = {0: PCR0, 1: b"\x07" * 48}
    refusals = [
        # a good token with another (debug) enclave's document
        (token_for(good, recipient.public_bytes), debug, "not the one"),
        # the document names another key than the recipient's
        (
            token_for(document(other.public_bytes), recipient.public_bytes),
            document(other.public_bytes),
            "public key",
        ),
        # a document from another root
        (
            token_for(good, recipient.public_bytes),
            foreign_ca.sign(foreign_ca.payload(now, public_key=recipient.public_bytes)),
            "does not verify",
        ),
        # PCR1 not the policy's: refused even with a token for that very document
        (
            token_for(document(recipient.public_bytes, pcrs=other_pcr1), recipient.public_bytes),
            document(recipient.public_bytes, pcrs=other_pcr1),
            "pcr1",
        ),
        (token_for(good, recipient.public_bytes), good[:-5], "does not verify"),
    ]
    for token, doc, reason in refusals:
        with pytest.raises(PolicyDenied, match=reason) as refused:
            key.release_for_nitro(wrapped, token, recipient.public_bytes, doc)
        assert dek.hex() not in str(refused.value)
    if mode == "key-per-version":  # a new version's KMS key gets the statement when it is made
        key.rotate()
        assert statement() is not None


class _FailsOnce(Governor):
    """A governor whose first ``op`` call fails as a throttle that outlived the retries would."""

    def __init__(self, op: str) -> None:
        super().__init__(f"moto-{secrets.token_hex(4)}")
        self.failing: str | None = op

    def call(self, fn: Callable[[], T], *, op: str = "", idempotent: bool = True) -> T:
        if op == self.failing:
            self.failing = None
            raise Unavailable(f"{op} failed (injected)")
        return super().call(fn, op=op, idempotent=idempotent)


def test_a_retried_rotation_still_puts_the_recipient_statement_on_the_new_key(moto_url: str) -> None:
    governor = _FailsOnce("kms:put_key_policy")
    governor.failing = None  # not yet: the first policy is set normally
    key = AwsKmsAdapter(
        _name(),
        endpoint_url=moto_url,
        region=REGION,
        release_store=MemoryReleasePolicyStore(),
        credentials=CREDENTIALS,
        governor=governor,
    )
    key.create(rotation_mode="key-per-version")
    rule = {"platform": "nitro", "signer": "5e" * 48, "product_id": 0, "min_svn": 0, "nonce_required": False}
    policy = parse_policy({"id": "nitro-signed", "rules": [rule]})
    key.set_release_policy(ReleasePolicy(policy, ResultSigner.generate().public_pem()))
    governor.failing = "kms:put_key_policy"
    with pytest.raises(Unavailable):
        key.rotate()  # version 2's key and alias exist; its key policy was not written
    assert key.rotate().primary_version == 2  # the retry adopts the key and writes it
    client = boto3.client("kms", region_name=REGION, endpoint_url=moto_url, **CREDENTIALS)
    for version in (1, 2):
        key_id = client.describe_key(KeyId=key.version_alias(version))["KeyMetadata"]["KeyId"]
        statements = json.loads(client.get_key_policy(KeyId=key_id, PolicyName="default")["Policy"])[
            "Statement"
        ]
        ours = [s for s in statements if s.get("Sid") == RECIPIENT_SID]
        assert len(ours) == 1, (version, statements)
        # A signer rule's PCR8 lets its images through: only documents matching no rule are denied.
        assert ours[0]["Condition"]["StringNotEqualsIgnoreCase"] == {
            "kms:RecipientAttestation:PCR8": ["5e" * 48]
        }
        assert len(statements) > 1  # the default statements are kept
