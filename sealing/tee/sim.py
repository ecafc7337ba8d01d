"""Simulated TEE, platform ``sim``: SGX-like evidence and sealing keys without TEE hardware.

Specified byte by byte in docs/sim-evidence-format.md.

``SimEnclave`` implements the enclave interface (``sealing.tee.platform.Enclave``): this module
holds what is sim-specific (identity, evidence, key requests and their derivation); sealing and
unsealing over the envelope are the interface's shared code.

A *sim host* stands for one machine with a TEE: a directory holding a 32-byte root secret
(the CPU's fused sealing secret), a sim root CA (Intel's root, in SGX terms) and a platform
attestation key with a certificate issued by that root (the quoting enclave's key). A
``SimEnclave`` is one enclave launched on a host with an ``EnclaveIdentity``.

What behaves like SGX, because the rest of rekey depends on it:

- ``report`` produces evidence modelled on the SGX REPORT body, signed by the platform key;
  ``attestation.sim.SimVerifier`` checks it against the root CA.
- ``seal_key`` has EGETKEY semantics (Intel SDM 39.4.3.1): the MRENCLAVE policy binds the key
  to the measurement, the MRSIGNER policy to signer + product id; both bind the requested ISV
  SVN and CPU SVN and the DEBUG attribute, and an enclave may derive keys for its own or a
  lower SVN / CPU SVN only, never a higher one.
- ``seal`` (shared) stores the key request in the sealed blob's header (as the SGX SDK does), so a
  patched enclave with a higher SVN, or one on a newer microcode (CPU SVN), re-derives the
  key an older one sealed under.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import stat
import struct
import tempfile
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import ClassVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import NameOID

from sealing.errors import SealingError
from sealing.generation import GenerationManifest
from sealing.private_file import PrivateFileError, PrivateFileMissing, read_private
from sealing.tee.platform import (
    SEAL_KEY_BYTES,
    Enclave,
    PlatformIdentity,
    SealKeyRefused,
    SealPolicyName,
    check_report_data,
    check_u16,
    tee_key_ref,
)

PLATFORM = "sim"
TEE_KEY_REF = tee_key_ref(PLATFORM)  # key_ref of every sim-sealed blob
DEFAULT_CPU_SVN = bytes([0x02] * 16)
ROOT_SECRET_BYTES = 32
MAX_HOST_FILE_BYTES = 64 * 1024  # PEM keys and certificates, the 32-byte secret
MEASUREMENT_BYTES = 32
SIGNER_BYTES = 32
CPU_SVN_BYTES = 16
ATTRIBUTES_BYTES = 16
KEY_ID_BYTES = 32
ATTRIBUTE_DEBUG = 0x02  # byte 0, bit 1, as SGX ATTRIBUTES.DEBUG

EVIDENCE_MAGIC = b"RKSE"
EVIDENCE_VERSION = 1
# magic, version, reserved, measurement, signer, product id, svn, cpu svn, attributes,
# report data, timestamp (ms since epoch): everything the signature covers.
EVIDENCE_SIGNED = struct.Struct(">4sHH32s32sHH16s16s64sQ")
_U16 = struct.Struct(">H")

ROOT_CA_SUBJECT = "rekey sim root CA"
PLATFORM_CERT_SUBJECT = "rekey sim platform attestation key"
ROOT_CA_VALIDITY = timedelta(days=3652)  # ~10 years
PLATFORM_CERT_VALIDITY = timedelta(days=1826)  # ~5 years
_BACKDATE = timedelta(minutes=5)  # tolerate small clock differences between host and verifier

# Host directory layout. Every file is created 0600 with O_EXCL; the directory is 0700.
ROOT_SECRET_FILE = "root_secret"  # noqa: S105 (a file name, not a secret)  # nosec B105
ROOT_CA_KEY_FILE = "root_ca.key.pem"
ROOT_CA_CERT_FILE = "root_ca.pem"
PLATFORM_KEY_FILE = "platform.key.pem"
PLATFORM_CERT_FILE = "platform.pem"
HOST_FILES = (ROOT_SECRET_FILE, ROOT_CA_KEY_FILE, ROOT_CA_CERT_FILE, PLATFORM_KEY_FILE, PLATFORM_CERT_FILE)

# The host id (SimHost.host_id): derived from the root CA's public key, never from the root secret.
HOST_ID_PREFIX = "sim-"
HOST_ID_CONTEXT = b"rekey-sim host-id v1\x00"

# Key derivation (docs/sim-evidence-format.md, "Sealing keys").
SEAL_KEY_SALT = b"rekey-sim seal-key v1"

_POLICY_CODES: dict[str, int] = {"mrenclave": 1, "mrsigner": 2}
_POLICY_NAMES: dict[int, SealPolicyName] = {1: "mrenclave", 2: "mrsigner"}
# policy code, isv svn, cpu svn, key id
_KEY_REQUEST = struct.Struct(">BH16s32s")
KEY_REQUEST_BYTES = _KEY_REQUEST.size  # 51


class SimHostError(SealingError):
    """A sim host directory is incomplete, unreadable or readable by other users."""

    exit_code = 2


def _check_bytes(value: object, size: int, label: str) -> None:
    if not isinstance(value, bytes) or len(value) != size:
        raise ValueError(f"{label} must be {size} bytes")


@dataclass(frozen=True, repr=False)
class EnclaveIdentity(PlatformIdentity):
    """What the hardware measures and reports for one sim enclave (SGX-sized fields).

    ``cpu_svn`` None means "the host's CPU SVN at launch" (``SimHost.cpu_svn``)."""

    platform: ClassVar[str] = PLATFORM

    cpu_svn: bytes | None = None

    def __post_init__(self) -> None:
        _check_bytes(self.measurement, MEASUREMENT_BYTES, "measurement")
        _check_bytes(self.signer, SIGNER_BYTES, "signer")
        super().__post_init__()
        if self.cpu_svn is not None:
            _check_bytes(self.cpu_svn, CPU_SVN_BYTES, "cpu_svn")

    @classmethod
    def from_manifest(cls, manifest: GenerationManifest, *, cpu_svn: bytes | None = None) -> EnclaveIdentity:
        if manifest.platform != PLATFORM:
            raise ValueError(f"generation {manifest.id} is for platform {manifest.platform!r}, not 'sim'")
        signer = bytes.fromhex(manifest.signer)
        if len(signer) != SIGNER_BYTES:
            raise ValueError(f"generation {manifest.id}: a sim signer is {SIGNER_BYTES} bytes")
        return cls(
            measurement=bytes.fromhex(manifest.measurement),
            signer=signer,
            product_id=manifest.product_id,
            svn=manifest.svn,
            debug=manifest.debug,
            cpu_svn=cpu_svn,
        )

    @property
    def attributes(self) -> bytes:
        """The 16-byte ATTRIBUTES field: only DEBUG (byte 0, bit 1) is ever set."""
        return bytes([ATTRIBUTE_DEBUG if self.debug else 0]) + bytes(ATTRIBUTES_BYTES - 1)

    def __repr__(self) -> str:
        cpu = self.cpu_svn.hex() if self.cpu_svn is not None else "host"
        return (
            f"EnclaveIdentity(measurement={self.measurement.hex()}, signer={self.signer.hex()},"
            f" product_id={self.product_id}, svn={self.svn}, debug={self.debug}, cpu_svn={cpu})"
        )


@dataclass(frozen=True, repr=False)
class KeyRequest:
    """An EGETKEY-style seal key request. Stored (encoded) in the sealed blob's header; not secret."""

    policy: SealPolicyName
    isv_svn: int
    cpu_svn: bytes
    key_id: bytes

    def __post_init__(self) -> None:
        if self.policy not in _POLICY_CODES:
            raise ValueError("policy must be 'mrenclave' or 'mrsigner'")
        check_u16(self.isv_svn, "isv_svn")
        _check_bytes(self.cpu_svn, CPU_SVN_BYTES, "cpu_svn")
        _check_bytes(self.key_id, KEY_ID_BYTES, "key_id")

    @property
    def svn(self) -> int:
        """The ISV SVN the key is for (``SealKeyRequest.svn``)."""
        return self.isv_svn

    def encode(self) -> bytes:
        """Canonical 51 bytes: policy (1 = mrenclave, 2 = mrsigner), isv svn (u16), cpu svn (16),
        key id (32)."""
        return _KEY_REQUEST.pack(_POLICY_CODES[self.policy], self.isv_svn, self.cpu_svn, self.key_id)

    @classmethod
    def decode(cls, raw: bytes) -> KeyRequest:
        """Inverse of ``encode``; raises ``ValueError`` on anything else."""
        if len(raw) != KEY_REQUEST_BYTES:
            raise ValueError(f"a sim key request is {KEY_REQUEST_BYTES} bytes, got {len(raw)}")
        code, isv_svn, cpu_svn, key_id = _KEY_REQUEST.unpack(raw)
        policy = _POLICY_NAMES.get(code)
        if policy is None:
            raise ValueError(f"unknown key request policy {code}")
        return cls(policy, isv_svn, cpu_svn, key_id)

    def __repr__(self) -> str:
        return (
            f"KeyRequest(policy={self.policy}, isv_svn={self.isv_svn}, cpu_svn={self.cpu_svn.hex()},"
            f" key_id={self.key_id.hex()})"
        )


# ---------------------------------------------------------------------------------------------
# Host


def _write_new(path: Path, data: bytes) -> None:
    """Create ``path`` 0600; fail if it exists, so a secret is never written into someone's file."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def write_new_host(directory: Path) -> None:
    """Write a fresh host (root secret, root CA, platform key and certificate) into ``directory``,
    an empty private directory (``SimHost.load_or_create`` gives it one and renames it into place)."""
    now = datetime.now(UTC).replace(microsecond=0) - _BACKDATE
    root_key = ec.generate_private_key(ec.SECP256R1())
    root_ski = x509.SubjectKeyIdentifier.from_public_key(root_key.public_key())
    root_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(ROOT_CA_SUBJECT))
        .issuer_name(_name(ROOT_CA_SUBJECT))
        .public_key(root_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + ROOT_CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(root_ski, critical=False)
        .sign(root_key, hashes.SHA256())
    )
    platform_key = ec.generate_private_key(ec.SECP256R1())
    platform_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(PLATFORM_CERT_SUBJECT))
        .issuer_name(root_cert.subject)
        .public_key(platform_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + PLATFORM_CERT_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(platform_key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(root_ski), critical=False
        )
        .sign(root_key, hashes.SHA256())
    )
    _write_new(directory / ROOT_SECRET_FILE, os.urandom(ROOT_SECRET_BYTES))
    _write_new(directory / ROOT_CA_KEY_FILE, _pem_private(root_key))
    _write_new(directory / ROOT_CA_CERT_FILE, root_cert.public_bytes(serialization.Encoding.PEM))
    _write_new(directory / PLATFORM_KEY_FILE, _pem_private(platform_key))
    _write_new(directory / PLATFORM_CERT_FILE, platform_cert.public_bytes(serialization.Encoding.PEM))
    _fsync_dir(directory)


def host_id_of(root_ca_pem: bytes) -> str:
    """The host id of the simulated host whose root CA this is (see `SimHost.host_id`): public,
    so a verifier can tell which host's root it holds without reading any of the host's secrets."""
    root_public = x509.load_pem_x509_certificate(root_ca_pem).public_key()
    spki = root_public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return HOST_ID_PREFIX + hashlib.sha256(HOST_ID_CONTEXT + spki).hexdigest()[:32]


class SimHost:
    """One simulated TEE machine, kept in a directory. Create with ``load_or_create``."""

    def __init__(
        self,
        host_dir: Path,
        root_secret: bytes,
        root_ca_pem: bytes,
        platform_key: ec.EllipticCurvePrivateKey,
        platform_cert: x509.Certificate,
    ) -> None:
        self._host_dir = host_dir
        self._root_secret = root_secret
        self._root_ca_pem = root_ca_pem
        self._platform_key = platform_key
        self._platform_cert_der = platform_cert.public_bytes(serialization.Encoding.DER)
        self._cpu_svn = DEFAULT_CPU_SVN
        self._host_id = host_id_of(root_ca_pem)

    @classmethod
    def load_or_create(cls, host_dir: Path) -> SimHost:
        """Load the host in ``host_dir``, creating it first if the directory is missing or empty.

        Creation is atomic: the host is written into a private temporary directory beside
        ``host_dir`` and renamed into place, so a reader never sees a half-written host. When
        two processes create the same host at once, one rename wins and the other process
        discards its copy and loads the winner's.
        """
        host_dir = Path(host_dir)
        if host_dir.exists() and not host_dir.is_dir():
            raise SimHostError(f"sim host directory {host_dir} is not a directory")
        if not host_dir.is_dir() or not any(host_dir.iterdir()):
            try:
                host_dir.parent.mkdir(parents=True, exist_ok=True)
                staging = Path(tempfile.mkdtemp(prefix=f".{host_dir.name}.", dir=host_dir.parent))  # 0700
            except OSError as exc:
                raise SimHostError(
                    f"cannot create the sim host directory {host_dir}: {exc.strerror}"
                ) from None
            renamed = False
            try:
                write_new_host(staging)
                try:
                    # Replaces a missing or empty directory; fails if another process got there first.
                    os.rename(staging, host_dir)
                    renamed = True
                except OSError as exc:
                    if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                        raise
                _fsync_dir(host_dir.parent)
            finally:
                if not renamed:
                    shutil.rmtree(staging, ignore_errors=True)
        return cls._load(host_dir)

    @classmethod
    def load(cls, host_dir: Path) -> SimHost:
        """Load the existing host in ``host_dir``; `SimHostError` if there is none (nothing is
        created: a verifier trusts a host that exists, it does not make one)."""
        return cls._load(Path(host_dir))

    @classmethod
    def _load(cls, host_dir: Path) -> SimHost:
        try:
            dir_mode = host_dir.stat().st_mode
        except FileNotFoundError:
            raise SimHostError(f"sim host directory {host_dir} does not exist") from None
        except OSError as exc:
            raise SimHostError(f"cannot read the sim host directory {host_dir}: {exc.strerror}") from None
        if not stat.S_ISDIR(dir_mode):
            raise SimHostError(f"sim host directory {host_dir} is not a directory")
        if dir_mode & 0o077:
            raise SimHostError(
                f"sim host directory {host_dir} is accessible by group or others"
                f" (mode {stat.S_IMODE(dir_mode):o}); it must be 0700"
            )
        contents: dict[str, bytes] = {}
        for name in HOST_FILES:
            path = host_dir / name
            # Opened once without following a symlink; type, owner and mode checked on that
            # descriptor and the content read from it (no check-then-read race on the path).
            try:
                contents[name] = read_private(path, limit=MAX_HOST_FILE_BYTES)
            except PrivateFileMissing:
                raise SimHostError(f"{host_dir} is not a sim host directory: {name} is missing") from None
            except PrivateFileError as exc:
                raise SimHostError(str(exc)) from None
        root_secret = contents[ROOT_SECRET_FILE]
        if len(root_secret) != ROOT_SECRET_BYTES:
            raise SimHostError(f"{host_dir / ROOT_SECRET_FILE} must hold {ROOT_SECRET_BYTES} bytes")
        try:
            x509.load_pem_x509_certificate(contents[ROOT_CA_CERT_FILE])
            platform_cert = x509.load_pem_x509_certificate(contents[PLATFORM_CERT_FILE])
            platform_key = serialization.load_pem_private_key(contents[PLATFORM_KEY_FILE], password=None)
        except (ValueError, TypeError):
            # The parser's message could quote key bytes; name only the directory.
            raise SimHostError(f"{host_dir} holds a certificate or key that does not parse") from None
        if not isinstance(platform_key, ec.EllipticCurvePrivateKey) or not isinstance(
            platform_key.curve, ec.SECP256R1
        ):
            raise SimHostError(f"{host_dir / PLATFORM_KEY_FILE} is not an ECDSA P-256 key")
        if platform_cert.public_key() != platform_key.public_key():
            raise SimHostError(f"{host_dir / PLATFORM_CERT_FILE} does not certify {PLATFORM_KEY_FILE}")
        return cls(host_dir, root_secret, contents[ROOT_CA_CERT_FILE], platform_key, platform_cert)

    @property
    def host_dir(self) -> Path:
        return self._host_dir

    @property
    def host_id(self) -> str:
        """This host's id: ``sim-`` and 32 hex digits of SHA-256 over the root CA's public key
        (SubjectPublicKeyInfo, DER). Public, so it reveals nothing of the root secret, and
        stable for as long as the host directory lives (every enclave launched from it, every
        restart); another host directory has another root CA and so another id."""
        return self._host_id

    def root_ca_pem(self) -> bytes:
        """The sim root CA certificate (public), for ``attestation.sim.SimVerifier``."""
        return self._root_ca_pem

    @property
    def platform_cert_der(self) -> bytes:
        """The platform attestation key's certificate, as evidence carries it."""
        return self._platform_cert_der

    @property
    def cpu_svn(self) -> bytes:
        """The CPU SVN enclaves launched from now on get. Raise it to simulate a microcode update."""
        return self._cpu_svn

    @cpu_svn.setter
    def cpu_svn(self, value: bytes) -> None:
        _check_bytes(value, CPU_SVN_BYTES, "cpu_svn")
        self._cpu_svn = value

    def enclave(self, identity: EnclaveIdentity) -> SimEnclave:
        """Launch an enclave with ``identity`` on this host."""
        return SimEnclave(self, identity)

    def _derive_seal_key(self, info: bytes) -> bytes:
        return HKDF(algorithm=hashes.SHA256(), length=SEAL_KEY_BYTES, salt=SEAL_KEY_SALT, info=info).derive(
            self._root_secret
        )

    def _sign(self, data: bytes) -> bytes:
        return self._platform_key.sign(data, ec.ECDSA(hashes.SHA256()))

    def __repr__(self) -> str:
        return f"SimHost({str(self._host_dir)!r}, cpu_svn={self._cpu_svn.hex()})"


# ---------------------------------------------------------------------------------------------
# Enclave


class SimEnclave(Enclave[KeyRequest]):
    """One enclave running on a ``SimHost``."""

    can_seal: ClassVar[bool] = True

    def __init__(self, host: SimHost, identity: EnclaveIdentity) -> None:
        if identity.cpu_svn is None:
            identity = replace(identity, cpu_svn=host.cpu_svn)
        assert identity.cpu_svn is not None  # typing only: set just above  # nosec B101
        self._host = host
        self._identity = identity
        self._cpu_svn: bytes = identity.cpu_svn

    @property
    def identity(self) -> EnclaveIdentity:
        """The identity, with ``cpu_svn`` resolved."""
        return self._identity

    @property
    def host(self) -> SimHost:
        return self._host

    @property
    def host_id(self) -> str:
        return self._host.host_id

    def report(self, report_data: bytes, *, at: datetime | None = None) -> bytes:
        """Evidence binding ``report_data`` (exactly 64 bytes), signed by the platform key.

        ``at`` is the production time recorded in the evidence (default: now)."""
        check_report_data(report_data)
        when = at or datetime.now(UTC)
        if when.tzinfo is None:
            raise ValueError("at must be timezone-aware")
        millis = int(when.timestamp() * 1000)
        if not 0 <= millis < 2**64:
            raise ValueError("at is out of range")
        ident = self._identity
        signed = EVIDENCE_SIGNED.pack(
            EVIDENCE_MAGIC,
            EVIDENCE_VERSION,
            0,
            ident.measurement,
            ident.signer,
            ident.product_id,
            ident.svn,
            self._cpu_svn,
            ident.attributes,
            report_data,
            millis,
        )
        signature = self._host._sign(signed)
        cert = self._host.platform_cert_der
        return b"".join((signed, _U16.pack(len(signature)), signature, _U16.pack(len(cert)), cert))

    def seal_key(self, request: KeyRequest) -> bytes:
        """EGETKEY: the seal key for ``request``, or ``SealKeyRefused`` if the request asks for
        a higher ISV SVN, or a CPU SVN higher in any component, than this enclave has."""
        ident = self._identity
        if request.isv_svn > ident.svn:
            raise SealKeyRefused(
                f"key request for svn {request.isv_svn} is above this enclave's svn {ident.svn}"
            )
        for index, (wanted, have) in enumerate(zip(request.cpu_svn, self._cpu_svn, strict=True)):
            if wanted > have:
                raise SealKeyRefused(
                    f"key request for cpu svn {request.cpu_svn.hex()} is above this enclave's cpu svn"
                    f" {self._cpu_svn.hex()} (component {index})"
                )
        if request.policy == "mrenclave":
            bound = ident.measurement
        else:
            bound = ident.signer + _U16.pack(ident.product_id)
        info = b"".join(
            (
                bytes([_POLICY_CODES[request.policy]]),
                bound,
                _U16.pack(request.isv_svn),
                request.cpu_svn,
                request.key_id,
                ident.attributes,
            )
        )
        return self._host._derive_seal_key(info)

    def new_key_request(self, policy: SealPolicyName) -> KeyRequest:
        """A request for this enclave's own svn and cpu svn, with a fresh random key id."""
        return KeyRequest(policy, self._identity.svn, self._cpu_svn, os.urandom(KEY_ID_BYTES))

    def decode_key_request(self, raw: bytes) -> KeyRequest:
        return KeyRequest.decode(raw)

    def __repr__(self) -> str:
        return f"SimEnclave({self._identity!r})"
