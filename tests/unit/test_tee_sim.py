"""Simulated TEE: the host directory, evidence layout, EGETKEY semantics and sealing scenarios."""

from __future__ import annotations

import base64
import os
import re
import stat
import struct
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sealing import envelope
from sealing.envelope import SealingPolicy
from sealing.errors import SealedBlobError, SealingError, TamperedBlob, UnsupportedFormat
from sealing.generation import parse_manifest
from sealing.keywrap import LocalKeyWrapper, WrappedKey
from sealing.tee import sim as sim_tee
from sealing.tee.platform import SealKeyMismatch, SealKeyRefused, SealKeyWrapper
from sealing.tee.sim import (
    DEFAULT_CPU_SVN,
    EnclaveIdentity,
    KeyRequest,
    SimEnclave,
    SimHost,
    SimHostError,
)

MEASUREMENT_V1 = bytes.fromhex("11" * 32)
MEASUREMENT_V2 = bytes.fromhex("22" * 32)
SIGNER = bytes.fromhex("aa" * 32)
OTHER_SIGNER = bytes.fromhex("bb" * 32)
SECRET = b"database password: hunter2"

V1 = EnclaveIdentity(measurement=MEASUREMENT_V1, signer=SIGNER, product_id=7, svn=1)
V2 = EnclaveIdentity(measurement=MEASUREMENT_V2, signer=SIGNER, product_id=7, svn=2)


@pytest.fixture(scope="module")
def host_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sim") / "host"


@pytest.fixture
def host(host_dir: Path) -> Iterator[SimHost]:
    # A fresh object per test over one directory, so a test that raises cpu_svn affects only itself.
    yield SimHost.load_or_create(host_dir)


def _seal(enclave: SimEnclave, policy: sim_tee.SealPolicyName, data: bytes = SECRET) -> bytes:
    return enclave.seal(data, policy, namespace="payments", name="ledger-key", generation="gen-1")


# ----------------------------------------------------------------------------- host directory


def test_host_directory_is_private_and_complete(host: SimHost, host_dir: Path) -> None:
    assert host.host_dir == host_dir
    assert stat.S_IMODE(host_dir.stat().st_mode) == 0o700
    names = sorted(p.name for p in host_dir.iterdir())
    assert names == sorted(sim_tee.HOST_FILES)
    for path in host_dir.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path.name
    assert len((host_dir / sim_tee.ROOT_SECRET_FILE).read_bytes()) == 32
    # No staging directories are left beside it.
    assert [p.name for p in host_dir.parent.iterdir()] == ["host"]


def test_certificates(host: SimHost) -> None:
    root = x509.load_pem_x509_certificate(host.root_ca_pem())
    assert b"PRIVATE" not in host.root_ca_pem()
    assert root.subject.rfc4514_string() == "CN=rekey sim root CA"
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert root.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    root.verify_directly_issued_by(root)
    assert root.not_valid_after_utc - root.not_valid_before_utc >= timedelta(days=3650)
    assert isinstance(root.public_key(), ec.EllipticCurvePublicKey)

    platform = x509.load_der_x509_certificate(host.platform_cert_der)
    platform.verify_directly_issued_by(root)
    assert not platform.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usage = platform.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_cert_sign
    assert platform.not_valid_after_utc - platform.not_valid_before_utc >= timedelta(days=1825)
    assert platform.not_valid_after_utc < root.not_valid_after_utc
    key = platform.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1)


def test_reload_reuses_everything(host: SimHost, host_dir: Path) -> None:
    blob = _seal(host.enclave(V1), "mrenclave")
    again = SimHost.load_or_create(host_dir)
    assert again.root_ca_pem() == host.root_ca_pem()
    assert again.platform_cert_der == host.platform_cert_der
    assert again.enclave(V1).unseal(blob) == SECRET


def test_an_existing_empty_directory_becomes_a_host(tmp_path: Path) -> None:
    target = tmp_path / "empty"
    target.mkdir(mode=0o755)
    host = SimHost.load_or_create(target)
    assert stat.S_IMODE(target.stat().st_mode) == 0o700
    assert host.enclave(V1).unseal(_seal(host.enclave(V1), "mrsigner")) == SECRET


def test_concurrent_creation_yields_one_host(tmp_path: Path) -> None:
    target = tmp_path / "nested" / "host"
    barrier = threading.Barrier(6)
    hosts: list[SimHost] = []
    errors: list[BaseException] = []

    def create() -> None:
        try:
            barrier.wait()
            hosts.append(SimHost.load_or_create(target))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=create) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len({h.root_ca_pem() for h in hosts}) == 1
    assert len({h.platform_cert_der for h in hosts}) == 1
    assert sorted(p.name for p in target.parent.iterdir()) == ["host"]  # losers cleaned up
    blob = _seal(hosts[0].enclave(V1), "mrenclave")
    assert all(h.enclave(V1).unseal(blob) == SECRET for h in hosts)


def test_the_loser_of_a_creation_race_loads_the_winner(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "host"
    populate = sim_tee.write_new_host
    winner: list[SimHost] = []
    calls: list[Path] = []

    def racing_populate(directory: Path) -> None:
        calls.append(directory)
        if len(calls) == 1:  # another process finishes creating the host while this one works
            winner.append(SimHost.load_or_create(target))
        populate(directory)

    monkeypatch.setattr(sim_tee, "write_new_host", racing_populate)
    loser = SimHost.load_or_create(target)
    assert len(calls) == 2
    assert loser.root_ca_pem() == winner[0].root_ca_pem()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["host"]


def test_a_foreign_or_incomplete_directory_is_refused(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir(mode=0o700)
    (foreign / "notes.txt").write_text("not a host")
    with pytest.raises(SimHostError, match="root_secret is missing"):
        SimHost.load_or_create(foreign)


def test_secret_files_readable_by_others_are_refused(tmp_path: Path) -> None:
    SimHost.load_or_create(tmp_path / "host")
    secret = tmp_path / "host" / sim_tee.ROOT_SECRET_FILE
    os.chmod(secret, 0o644)
    with pytest.raises(SimHostError, match="must not be accessible by group or others") as caught:
        SimHost.load_or_create(tmp_path / "host")
    assert secret.read_bytes().hex() not in str(caught.value)
    os.chmod(secret, 0o600)
    os.chmod(tmp_path / "host", 0o750)  # noqa: S103 (the point of the test)
    with pytest.raises(SimHostError, match="must be 0700"):
        SimHost.load_or_create(tmp_path / "host")


def test_reprs_hold_no_secrets(host: SimHost, host_dir: Path) -> None:
    secret = (host_dir / sim_tee.ROOT_SECRET_FILE).read_bytes()
    enclave = host.enclave(V1)
    request = KeyRequest("mrsigner", 1, DEFAULT_CPU_SVN, bytes(32))
    seal_key = enclave.seal_key(request)
    for text in (repr(host), repr(enclave), repr(request), repr(V1)):
        assert secret.hex() not in text and seal_key.hex() not in text
        assert repr(secret) not in text and repr(seal_key) not in text
    assert "PRIVATE" not in repr(host)


# ----------------------------------------------------------------------------- identity


def test_identity_validation() -> None:
    with pytest.raises(ValueError, match="measurement"):
        EnclaveIdentity(measurement=b"short", signer=SIGNER, product_id=1, svn=1)
    with pytest.raises(ValueError, match="svn"):
        EnclaveIdentity(measurement=MEASUREMENT_V1, signer=SIGNER, product_id=1, svn=70000)
    with pytest.raises(ValueError, match="cpu_svn"):
        EnclaveIdentity(measurement=MEASUREMENT_V1, signer=SIGNER, product_id=1, svn=1, cpu_svn=b"\x01")
    assert V1.attributes == bytes(16)
    assert EnclaveIdentity(MEASUREMENT_V1, SIGNER, 7, 1, debug=True).attributes == b"\x02" + bytes(15)


def test_identity_from_manifest() -> None:
    document = {
        "id": "payments-v1",
        "platform": "sim",
        "measurement": "11" * 32,
        "signer": "aa" * 32,
        "product_id": 7,
        "svn": 1,
    }
    assert EnclaveIdentity.from_manifest(parse_manifest(document)) == V1
    debug = EnclaveIdentity.from_manifest(parse_manifest({**document, "debug": True}), cpu_svn=bytes(16))
    assert debug.debug and debug.cpu_svn == bytes(16)
    with pytest.raises(ValueError, match="not 'sim'"):
        EnclaveIdentity.from_manifest(parse_manifest({**document, "platform": "sgx"}))
    with pytest.raises(ValueError, match="32 bytes"):
        EnclaveIdentity.from_manifest(parse_manifest({**document, "signer": "aa" * 48}))


def test_enclave_cpu_svn_defaults_to_the_host_at_launch(host: SimHost) -> None:
    assert host.cpu_svn == DEFAULT_CPU_SVN
    assert host.enclave(V1).identity.cpu_svn == DEFAULT_CPU_SVN
    host.cpu_svn = bytes([3] * 16)
    assert host.enclave(V1).identity.cpu_svn == bytes([3] * 16)
    pinned = EnclaveIdentity(MEASUREMENT_V1, SIGNER, 7, 1, cpu_svn=bytes([1] * 16))
    assert host.enclave(pinned).identity.cpu_svn == bytes([1] * 16)
    with pytest.raises(ValueError):
        host.cpu_svn = b"\x03"


# ----------------------------------------------------------------------------- evidence


def test_report_layout(host: SimHost) -> None:
    identity = EnclaveIdentity(MEASUREMENT_V1, SIGNER, 0x0102, 0x0304, debug=True)
    report_data = bytes(range(64))
    at = datetime(2026, 11, 27, 12, 0, 0, 123000, tzinfo=UTC)
    evidence = host.enclave(identity).report(report_data, at=at)
    assert evidence[0:4] == b"RKSE"
    assert evidence[4:6] == b"\x00\x01" and evidence[6:8] == b"\x00\x00"
    assert evidence[8:40] == MEASUREMENT_V1
    assert evidence[40:72] == SIGNER
    assert evidence[72:74] == b"\x01\x02"
    assert evidence[74:76] == b"\x03\x04"
    assert evidence[76:92] == DEFAULT_CPU_SVN
    assert evidence[92:108] == b"\x02" + bytes(15)
    assert evidence[108:172] == report_data
    assert struct.unpack(">Q", evidence[172:180])[0] == int(at.timestamp() * 1000)
    (sig_len,) = struct.unpack(">H", evidence[180:182])
    assert 8 <= sig_len <= 72 and evidence[182] == 0x30  # DER SEQUENCE
    (cert_len,) = struct.unpack(">H", evidence[182 + sig_len : 184 + sig_len])
    assert evidence[184 + sig_len :] == host.platform_cert_der
    assert len(evidence) == 184 + sig_len + cert_len


@pytest.mark.parametrize("report_data", [b"", bytes(63), bytes(65)])
def test_report_data_must_be_64_bytes(host: SimHost, report_data: bytes) -> None:
    with pytest.raises(ValueError, match="64 bytes"):
        host.enclave(V1).report(report_data)


# ----------------------------------------------------------------------------- key derivation


def test_key_request_encoding() -> None:
    request = KeyRequest("mrsigner", 0x0203, bytes(range(16)), bytes(range(100, 132)))
    encoded = request.encode()
    assert encoded == b"\x02" + b"\x02\x03" + bytes(range(16)) + bytes(range(100, 132))
    assert len(encoded) == sim_tee.KEY_REQUEST_BYTES == 51
    assert KeyRequest.decode(encoded) == request
    assert KeyRequest("mrenclave", 1, bytes(16), bytes(32)).encode()[0] == 1
    for bad in (encoded[:-1], encoded + b"\x00", b"\x03" + encoded[1:]):
        with pytest.raises(ValueError):
            KeyRequest.decode(bad)
    with pytest.raises(ValueError):
        KeyRequest("mrsealer", 1, bytes(16), bytes(32))  # type: ignore[arg-type]


def test_seal_keys_follow_egetkey_bindings(host: SimHost) -> None:
    key_id = bytes(range(32))

    def key(identity: EnclaveIdentity, policy: sim_tee.SealPolicyName, svn: int = 1) -> bytes:
        return host.enclave(identity).seal_key(KeyRequest(policy, svn, DEFAULT_CPU_SVN, key_id))

    v2 = V2
    assert key(V1, "mrenclave") == key(V1, "mrenclave")  # deterministic
    assert len(key(V1, "mrenclave")) == 32
    assert key(V1, "mrenclave") != key(V1, "mrsigner")  # the policy is bound
    assert key(V1, "mrenclave") != key(v2, "mrenclave")  # MRENCLAVE binds the measurement
    assert key(V1, "mrsigner") == key(v2, "mrsigner")  # MRSIGNER does not ...
    other_product = EnclaveIdentity(MEASUREMENT_V1, SIGNER, 8, 1)
    other_signer = EnclaveIdentity(MEASUREMENT_V1, OTHER_SIGNER, 7, 1)
    assert key(V1, "mrsigner") != key(other_product, "mrsigner")  # ... but signer + product id
    assert key(V1, "mrsigner") != key(other_signer, "mrsigner")
    debug = EnclaveIdentity(MEASUREMENT_V1, SIGNER, 7, 1, debug=True)
    assert key(V1, "mrenclave") != key(debug, "mrenclave")  # DEBUG is always bound
    assert key(V1, "mrsigner") != key(debug, "mrsigner")
    assert key(v2, "mrsigner", svn=1) != key(v2, "mrsigner", svn=2)  # the requested svn is bound
    enclave = host.enclave(V1)
    assert enclave.seal_key(KeyRequest("mrsigner", 1, DEFAULT_CPU_SVN, key_id)) != enclave.seal_key(
        KeyRequest("mrsigner", 1, bytes([1] * 16), key_id)
    )  # the requested cpu svn is bound
    assert enclave.seal_key(KeyRequest("mrsigner", 1, DEFAULT_CPU_SVN, key_id)) != enclave.seal_key(
        KeyRequest("mrsigner", 1, DEFAULT_CPU_SVN, bytes(32))
    )  # the key id is bound


def test_seal_keys_are_per_host(host: SimHost, tmp_path: Path) -> None:
    request = KeyRequest("mrenclave", 1, DEFAULT_CPU_SVN, bytes(32))
    other = SimHost.load_or_create(tmp_path / "other")
    assert host.enclave(V1).seal_key(request) != other.enclave(V1).seal_key(request)


def test_keys_above_the_enclave_are_refused(host: SimHost) -> None:
    enclave = host.enclave(EnclaveIdentity(MEASUREMENT_V1, SIGNER, 7, 2))
    enclave.seal_key(KeyRequest("mrsigner", 0, DEFAULT_CPU_SVN, bytes(32)))  # lower: allowed
    with pytest.raises(SealKeyRefused, match="key request for svn 3 is above this enclave's svn 2"):
        enclave.seal_key(KeyRequest("mrsigner", 3, DEFAULT_CPU_SVN, bytes(32)))
    lower_everywhere = bytes([1] * 16)
    enclave.seal_key(KeyRequest("mrsigner", 2, lower_everywhere, bytes(32)))
    # Component-wise, as SGX compares CPUSVN: one higher byte is enough to refuse.
    mixed = bytes([1] * 15 + [3])
    with pytest.raises(SealKeyRefused, match="component 15"):
        enclave.seal_key(KeyRequest("mrsigner", 2, mixed, bytes(32)))
    assert issubclass(SealKeyRefused, SealingError)


# ----------------------------------------------------------------------------- sealing


def test_sealed_blob_records_the_key_request(host: SimHost) -> None:
    enclave = host.enclave(V1)
    blob = _seal(enclave, "mrsigner")
    assert SECRET not in blob
    parsed = envelope.parse(blob)
    assert parsed.header.policy is SealingPolicy.TEE_MRSIGNER
    assert parsed.header.key_ref == "tee:sim"
    assert parsed.key_version == 1
    assert parsed.wrapped_dek.startswith(b"tee:v1:")
    request = KeyRequest.decode(parsed.header.key_request)
    assert (request.policy, request.isv_svn, request.cpu_svn) == ("mrsigner", 1, DEFAULT_CPU_SVN)
    other = envelope.parse(_seal(enclave, "mrenclave"))
    assert other.header.policy is SealingPolicy.TEE_MRENCLAVE
    assert KeyRequest.decode(other.header.key_request).key_id != request.key_id  # fresh per blob
    assert enclave.unseal(blob) == SECRET
    assert enclave.unseal(bytearray(blob)) == SECRET


def test_svn_zero_cannot_seal(host: SimHost) -> None:
    with pytest.raises(ValueError, match="svn 0"):
        _seal(host.enclave(EnclaveIdentity(MEASUREMENT_V1, SIGNER, 7, 0)), "mrsigner")


def test_patched_generation_cannot_open_mrenclave_state(host: SimHost) -> None:
    blob = _seal(host.enclave(V1), "mrenclave")
    with pytest.raises(SealKeyMismatch, match="sealed by a different enclave identity") as caught:
        host.enclave(V2).unseal(blob)
    assert isinstance(caught.value, SealedBlobError)
    assert host.enclave(V1).unseal(blob) == SECRET


def test_patched_generation_opens_mrsigner_state_but_not_the_reverse(host: SimHost) -> None:
    v1, v2 = host.enclave(V1), host.enclave(V2)
    assert v2.unseal(_seal(v1, "mrsigner")) == SECRET
    newer = _seal(v2, "mrsigner")
    with pytest.raises(SealKeyRefused, match="key request for svn 2 is above this enclave's svn 1"):
        v1.unseal(newer)


def test_debug_enclave_cannot_open_production_state(host: SimHost) -> None:
    debug = host.enclave(EnclaveIdentity(MEASUREMENT_V1, SIGNER, 7, 1, debug=True))
    for policy in ("mrenclave", "mrsigner"):
        with pytest.raises(SealKeyMismatch):
            debug.unseal(_seal(host.enclave(V1), policy))
    # ... nor the reverse: a production enclave cannot read what a debug one sealed.
    with pytest.raises(SealKeyMismatch):
        host.enclave(V1).unseal(_seal(debug, "mrsigner"))


def test_other_signer_or_product_cannot_open_mrsigner_state(host: SimHost) -> None:
    blob = _seal(host.enclave(V1), "mrsigner")
    for identity in (
        EnclaveIdentity(MEASUREMENT_V1, OTHER_SIGNER, 7, 1),
        EnclaveIdentity(MEASUREMENT_V1, SIGNER, 8, 1),
    ):
        with pytest.raises(SealKeyMismatch, match="mrsigner policy"):
            host.enclave(identity).unseal(blob)


def test_other_host_cannot_open_state(host: SimHost, tmp_path: Path) -> None:
    other = SimHost.load_or_create(tmp_path / "other")
    with pytest.raises(SealKeyMismatch):
        other.enclave(V1).unseal(_seal(host.enclave(V1), "mrenclave"))


def test_microcode_update(host: SimHost) -> None:
    old_cpu = host.enclave(V1)  # launched before the update
    sealed_before = {policy: _seal(old_cpu, policy) for policy in ("mrenclave", "mrsigner")}
    host.cpu_svn = bytes([0x03] * 16)  # microcode update
    new_cpu = host.enclave(V1)
    assert new_cpu.identity.cpu_svn == bytes([0x03] * 16)
    for blob in sealed_before.values():
        assert new_cpu.unseal(blob) == SECRET  # lower cpu svn: allowed
    assert host.enclave(V2).unseal(sealed_before["mrsigner"]) == SECRET  # svn and cpu svn both lower
    sealed_after = _seal(new_cpu, "mrenclave")
    with pytest.raises(SealKeyRefused, match="cpu svn"):
        old_cpu.unseal(sealed_after)
    assert KeyRequest.decode(envelope.parse(sealed_after).header.key_request).cpu_svn == bytes([3] * 16)


def _replace_wrapped_raw(blob: bytes, change: int) -> bytes:
    """Flip one byte inside the base64 payload of the wrapped DEK at raw offset ``change``."""
    parsed = envelope.parse(blob)
    prefix, _, body = parsed.wrapped_dek.rpartition(b":")
    raw = bytearray(base64.b64decode(body))
    raw[change] ^= 0x01
    wrapped = WrappedKey(prefix + b":" + base64.b64encode(bytes(raw)), parsed.key_version)
    return parsed.with_key_slot(wrapped).to_bytes()


def test_altered_wrapped_dek_is_tampering_and_altered_key_check_is_a_mismatch(host: SimHost) -> None:
    enclave = host.enclave(V1)
    blob = _seal(enclave, "mrenclave")
    with pytest.raises(TamperedBlob):
        enclave.unseal(_replace_wrapped_raw(blob, 8 + 12 + 3))  # the DEK ciphertext
    with pytest.raises(SealKeyMismatch):
        enclave.unseal(_replace_wrapped_raw(blob, 0))  # the key check value


def test_header_policy_must_match_the_key_request(host: SimHost) -> None:
    enclave = host.enclave(V1)
    blob = bytearray(_seal(enclave, "mrsigner"))
    parsed = envelope.parse(blob)
    policy_at = blob.index(b"\x06\x00\x01\x03", 8, len(parsed.aad)) + 3
    blob[policy_at] = int(SealingPolicy.TEE_MRENCLAVE)
    with pytest.raises(TamperedBlob, match="does not match its key request policy"):
        enclave.unseal(bytes(blob))


def test_kms_blobs_are_not_for_enclaves(host: SimHost) -> None:
    blob = envelope.seal(SECRET, LocalKeyWrapper("vault:orders"), namespace="n", name="x", generation="g")
    with pytest.raises(UnsupportedFormat, match="KMS"):
        host.enclave(V1).unseal(blob)


def test_tee_blobs_cannot_be_rewrapped(host: SimHost) -> None:
    blob = _seal(host.enclave(V1), "mrsigner")
    request = KeyRequest.decode(envelope.parse(blob).header.key_request)
    wrapper = SealKeyWrapper("sim", host.enclave(V1).seal_key(request), request)
    with pytest.raises(SealingError, match="not re-wrapped"):
        envelope.rewrap(blob, wrapper)


@pytest.fixture(scope="module")
def fuzz_case(tmp_path_factory: pytest.TempPathFactory) -> tuple[SimEnclave, bytes]:
    host = SimHost.load_or_create(tmp_path_factory.mktemp("fuzz") / "host")
    enclave = host.enclave(V1)
    return enclave, _seal(enclave, "mrsigner")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_truncation_or_byte_change_raises_a_sealing_error(
    fuzz_case: tuple[SimEnclave, bytes], data: st.DataObject
) -> None:
    enclave, blob = fuzz_case
    if data.draw(st.booleans(), label="truncate"):
        mutated = blob[: data.draw(st.integers(0, len(blob) - 1), label="length")]
    else:
        at = data.draw(st.integers(0, len(blob) - 1), label="offset")
        flip = data.draw(st.integers(1, 255), label="xor")
        mutated = blob[:at] + bytes([blob[at] ^ flip]) + blob[at + 1 :]
    with pytest.raises(SealingError):
        enclave.unseal(mutated)


def test_host_id_is_stable_per_host_directory_and_public(tmp_path: Path) -> None:
    first = sim_tee.SimHost.load_or_create(tmp_path / "a")
    again = sim_tee.SimHost.load(tmp_path / "a")
    other = sim_tee.SimHost.load_or_create(tmp_path / "b")
    assert first.host_id == again.host_id != other.host_id
    assert re.fullmatch(r"sim-[0-9a-f]{32}", first.host_id)
    secret = (tmp_path / "a" / "root_secret").read_bytes()
    assert secret.hex()[:16] not in first.host_id
    manifest = parse_manifest(
        {
            "id": "g",
            "platform": "sim",
            "measurement": "11" * 32,
            "signer": "22" * 32,
            "product_id": 1,
            "svn": 1,
        }
    )
    assert first.enclave(sim_tee.EnclaveIdentity.from_manifest(manifest)).host_id == first.host_id
