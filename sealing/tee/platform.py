"""The enclave interface: what a TEE platform implements for rekey, and the sealing built on it.

rekey needs three things of the TEE it runs in, and a platform module (``sealing/tee/<name>.py``)
provides exactly these by subclassing ``Enclave``:

``identity`` (a ``PlatformIdentity``)
    What the hardware measures and reports: platform name, measurement (SGX MRENCLAVE, SEV-SNP
    launch digest, TDX MRTD, Nitro PCR0), signer (MRSIGNER, ID-key digest, Nitro PCR8; TDX has
    no signer of its own: the deployment picks MROWNER or MRCONFIGID), product id, SVN and the
    debug flag: the fields of a generation manifest (``sealing.generation``). Platform modules
    subclass it for their own fields (the sim's CPU SVN, SNP's reported TCB, TDX's RTMRs).

``report(report_data)``
    Evidence binding exactly ``REPORT_DATA_BYTES`` (64) bytes chosen by rekey (a nonce and the
    agent's handoff key, see ``sealing.handoff.report_data_for``), in the platform's own format,
    for the matching ``attestation.<platform>`` verifier: an SGX quote from Gramine's
    ``/dev/attestation/user_report_data`` + ``quote`` pseudo-files, an SNP or TDX report from
    Linux configfs-tsm (``/sys/kernel/config/tsm/report/<entry>/inblob`` + ``outblob``), a Nitro
    attestation document from the NSM. Call ``check_report_data`` first.

Sealing keys, for platforms that have them (``can_seal``)
    ``new_key_request(policy)`` describes a key for this enclave's own identity under a policy
    (``"mrenclave"``: bound to the measurement; ``"mrsigner"``: to signer and product id, so a
    patched build opens it); ``seal_key(request)`` derives the 32-byte key, refusing with
    ``SealKeyRefused`` what the hardware refuses (a higher SVN or TCB than the enclave's);
    ``decode_key_request(raw)`` reads a request back from a sealed blob (``ValueError`` if
    malformed). A request is platform data that ``encode``s to bytes and names its ``policy``
    and ``svn`` (``SealKeyRequest``). SGX under Gramine reads ``/dev/attestation/keys/
    _sgx_mrenclave`` or ``_sgx_mrsigner`` (16-byte keys for the current SVN only: its requests
    carry just the policy, it refuses an older SVN, and it stretches the key to 32 bytes);
    SEV-SNP sends MSG_KEY_REQ on ``/dev/sev-guest`` (root key, guest field select, guest SVN
    and TCB version: the request is that message).
    TDX and Nitro have no hardware sealing key: they leave ``can_seal`` False and inherit the
    key methods, which raise ``SealingUnsupported``; their state is sealed with a KMS key the
    release gate of the KMS adapters hands out after attestation.

Shared code, written once here, so a platform module holds only platform-specific code:
``Enclave.seal`` and ``Enclave.unseal`` run the v1 envelope (``sealing.envelope``) with the key
request in the header (tag 08), key ref ``tee:<platform>``, sealing policy TEE_MRENCLAVE or
TEE_MRSIGNER, and the blob's DEK wrapped by ``SealKeyWrapper`` under the derived key:

    "tee:v<svn>:" base64( key check (8) | nonce (12) | AES-256-GCM(seal key, DEK) (32) | tag (16) )

with ASCII ``rekey-<platform> dek-wrap v1`` + the encoded request as associated data and the
key check = HMAC-SHA256(seal key, ``rekey-<platform> key-check v1``)[:8], which tells a key from
another identity (``SealKeyMismatch``) from an altered wrapped DEK (``TamperedBlob``). The
slot's key version is the request's SVN (so an enclave with SVN 0 cannot seal). The sim's
format (docs/sim-evidence-format.md) is this one with ``<platform>`` = ``sim``.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import os
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Generic, Literal, Protocol, TypeVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sealing import envelope
from sealing.envelope import SealingPolicy
from sealing.errors import (
    InvalidWrappedKey,
    KeyWrapError,
    SealedBlobError,
    SealingError,
    TamperedBlob,
    UnsupportedFormat,
)
from sealing.keywrap import DEK_BYTES, WrappedKey, parse_versioned_prefix

REPORT_DATA_BYTES = 64
SEAL_KEY_BYTES = 32  # AES-256 (SGX's seal keys are 128-bit; the envelope uses AES-256 throughout)
KEY_CHECK_BYTES = 8
_NONCE_BYTES = 12
_TAG_BYTES = 16
_WRAPPED_RAW_BYTES = KEY_CHECK_BYTES + _NONCE_BYTES + DEK_BYTES + _TAG_BYTES

SealPolicyName = Literal["mrenclave", "mrsigner"]
SEAL_POLICIES: dict[SealPolicyName, SealingPolicy] = {
    "mrenclave": SealingPolicy.TEE_MRENCLAVE,
    "mrsigner": SealingPolicy.TEE_MRSIGNER,
}


class SealingUnsupported(SealingError):
    """The platform has no hardware sealing key (TDX, Nitro): seal with a released KMS key."""


class SealKeyRefused(SealingError):
    """The enclave may not derive the requested key: its SVN or TCB is above the enclave's."""


class SealKeyMismatch(SealedBlobError):
    """The blob was sealed by a different enclave identity (or on a different host): the key
    this enclave derives from the blob's key request is not the key that sealed it."""


def check_u16(value: object, label: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0xFFFF:
        raise ValueError(f"{label} must be an integer in 0..65535")


def check_report_data(report_data: object) -> None:
    """``ValueError`` unless ``report_data`` is exactly 64 bytes (what every platform binds)."""
    if not isinstance(report_data, bytes) or len(report_data) != REPORT_DATA_BYTES:
        raise ValueError(f"report_data must be exactly {REPORT_DATA_BYTES} bytes")


def tee_key_ref(platform: str) -> str:
    """The key ref in the header of every blob sealed by ``platform``'s sealing keys."""
    return f"tee:{platform}"


@dataclass(frozen=True)
class PlatformIdentity:
    """What the hardware measures and reports for one enclave; ``platform`` is the subclass's.

    Sizes are the platform's to check (a platform module subclasses this)."""

    platform: ClassVar[str]

    measurement: bytes
    signer: bytes
    product_id: int
    svn: int
    debug: bool = False

    def __post_init__(self) -> None:
        for label, value in (("measurement", self.measurement), ("signer", self.signer)):
            if not isinstance(value, bytes) or not value:
                raise ValueError(f"{label} must be non-empty bytes")
        check_u16(self.product_id, "product_id")
        check_u16(self.svn, "svn")
        if not isinstance(self.debug, bool):
            raise ValueError("debug must be a bool")


class SealKeyRequest(Protocol):
    """A platform's sealing-key request: stored (encoded) in the sealed blob's header, not secret."""

    @property
    def policy(self) -> SealPolicyName: ...

    @property
    def svn(self) -> int:
        """The enclave SVN the key is for: the sealed blob's key version."""
        ...

    def encode(self) -> bytes: ...


RequestT = TypeVar("RequestT", bound=SealKeyRequest)


class SealKeyWrapper:
    """Wraps a blob's DEK under an enclave's seal key (the format is in the module docstring).

    The key check value tells a wrong key (``SealKeyMismatch``: another identity sealed the
    blob) from an altered wrapped DEK (``InvalidWrappedKey``, which the envelope reports as
    ``TamperedBlob``)."""

    scheme = "tee"

    def __init__(
        self, platform: str, seal_key: bytes, request: SealKeyRequest, mismatch_message: str = ""
    ) -> None:
        label = platform.encode("ascii")
        self._key_ref = tee_key_ref(platform)
        self._aead = AESGCM(seal_key)
        self._check = hmac.digest(seal_key, b"rekey-%s key-check v1" % label, "sha256")[:KEY_CHECK_BYTES]
        self._svn = request.svn
        self._aad = b"rekey-%s dek-wrap v1" % label + request.encode()
        self._mismatch_message = mismatch_message

    @property
    def key_ref(self) -> str:
        return self._key_ref

    def wrap(self, dek: bytes) -> WrappedKey:
        nonce = os.urandom(_NONCE_BYTES)
        raw = self._check + nonce + self._aead.encrypt(nonce, dek, self._aad)
        return WrappedKey(b"tee:v%d:" % self._svn + base64.b64encode(raw), self._svn)

    def version_of(self, wrapped: bytes) -> int:
        return parse_versioned_prefix(wrapped, self.scheme)[0]

    def unwrap(self, wrapped: bytes) -> bytes:
        version, body = parse_versioned_prefix(wrapped, self.scheme)
        if version != self._svn:
            raise InvalidWrappedKey(f"wrapped DEK names svn {version}, the key request svn {self._svn}")
        try:
            raw = base64.b64decode(body, validate=True)
        except binascii.Error:
            raise InvalidWrappedKey("wrapped DEK is not valid base64") from None
        if len(raw) != _WRAPPED_RAW_BYTES or base64.b64encode(raw) != body:
            # Re-encoding refuses non-canonical base64 (other padding bits), so the slot is not malleable.
            raise InvalidWrappedKey("wrapped DEK has the wrong length or encoding")
        if not hmac.compare_digest(raw[:KEY_CHECK_BYTES], self._check):
            raise SealKeyMismatch(self._mismatch_message or "sealed by a different enclave identity")
        nonce = raw[KEY_CHECK_BYTES : KEY_CHECK_BYTES + _NONCE_BYTES]
        try:
            return self._aead.decrypt(nonce, raw[KEY_CHECK_BYTES + _NONCE_BYTES :], self._aad)
        except InvalidTag:
            raise InvalidWrappedKey("wrapped DEK does not authenticate under the seal key") from None

    def rewrap(self, wrapped: bytes) -> WrappedKey:
        raise KeyWrapError("TEE-sealed blobs are not re-wrapped: unseal and reseal them inside the enclave")


class Enclave(ABC, Generic[RequestT]):
    """One running enclave (TEE guest) of one platform: the interface the agent is typed against.

    Subclasses implement ``identity`` and ``report``; platforms with a sealing key also set
    ``can_seal`` and implement ``new_key_request``, ``decode_key_request`` and ``seal_key``."""

    can_seal: ClassVar[bool] = False

    @property
    @abstractmethod
    def identity(self) -> PlatformIdentity:
        """The identity the hardware reports for this enclave."""

    @property
    def platform(self) -> str:
        return self.identity.platform

    @property
    def host_id(self) -> str | None:
        """The id of the machine this enclave runs on, for platforms whose sealed state is bound
        to one machine (stable across restarts, derived from nothing secret); None if unknown."""
        return None

    @abstractmethod
    def report(self, report_data: bytes) -> bytes:
        """Evidence binding ``report_data`` (exactly 64 bytes) for ``attestation.<platform>``."""

    def new_key_request(self, policy: SealPolicyName) -> RequestT:
        """A request for a fresh sealing key of this enclave's own identity under ``policy``."""
        raise self._unsupported()

    def decode_key_request(self, raw: bytes) -> RequestT:
        """The request ``encode`` wrote; ``ValueError`` for anything else."""
        raise self._unsupported()

    def seal_key(self, request: RequestT) -> bytes:
        """The 32-byte sealing key for ``request``; ``SealKeyRefused`` where the hardware refuses."""
        raise self._unsupported()

    def _checked_seal_key(self, request: RequestT) -> bytes:
        key = self.seal_key(request)
        if len(key) != SEAL_KEY_BYTES:  # e.g. Gramine's 16-byte SGX keys, not stretched to 32
            raise SealingError(f"platform {self.platform} derived a {len(key)}-byte sealing key, not 32")
        return key

    def _unsupported(self) -> SealingUnsupported:
        return SealingUnsupported(
            f"platform {self.platform} has no hardware sealing key: seal with a KMS key instead"
        )

    def seal(
        self,
        data: bytes,
        policy: SealPolicyName,
        *,
        namespace: str,
        name: str,
        generation: str,
        blob_id: uuid.UUID | None = None,
        version: int = 1,
    ) -> bytes:
        """Seal ``data`` under a fresh key for this enclave's own identity and ``policy``;
        ``blob_id`` (default: fresh) and ``version`` go into the authenticated header (the store
        keeps a name's blob id across updates and raises its version, `sealing.state`)."""
        if policy not in SEAL_POLICIES:
            raise ValueError("policy must be 'mrenclave' or 'mrsigner'")
        if not self.can_seal:
            raise self._unsupported()
        if self.identity.svn == 0:
            raise ValueError(
                "an enclave with svn 0 cannot seal: the sealed-blob key slot numbers versions from 1"
                f" and a {self.platform} blob's version is its svn"
            )
        request = self.new_key_request(policy)
        wrapper = SealKeyWrapper(self.platform, self._checked_seal_key(request), request)
        blob = envelope.seal(
            data,
            wrapper,
            namespace=namespace,
            name=name,
            generation=generation,
            policy=SEAL_POLICIES[policy],
            key_request=request.encode(),
            blob_id=blob_id,
            version=version,
        )
        return bytes(blob)

    def unseal(self, blob: bytes | bytearray | memoryview) -> bytes:
        """Open a blob this platform sealed. Every failure is a typed ``SealingError``: the
        envelope's own errors, ``SealKeyRefused`` (sealed by a higher SVN or TCB) or
        ``SealKeyMismatch`` (sealed by another identity or on another host)."""
        if not self.can_seal:
            raise self._unsupported()
        parsed = envelope.parse(blob)
        header = parsed.header
        if header.policy is SealingPolicy.KMS:
            raise UnsupportedFormat(
                f"sealed blob {header.blob_id} is KMS-wrapped: it opens with its KMS key, not in an enclave"
            )
        try:
            request = self.decode_key_request(header.key_request)
        except ValueError:
            raise TamperedBlob(f"sealed blob {header.blob_id} has a malformed key request") from None
        if SEAL_POLICIES[request.policy] is not header.policy:
            raise TamperedBlob(
                f"sealed blob {header.blob_id}: header policy {header.policy.name}"
                f" does not match its key request policy {request.policy}"
            )
        bound = "measurement" if request.policy == "mrenclave" else "signer or product id"
        mismatch = (
            f"sealed blob {header.blob_id} was sealed by a different enclave identity"
            f" ({request.policy} policy: another {bound}, debug attribute or host)"
        )
        wrapper = SealKeyWrapper(self.platform, self._checked_seal_key(request), request, mismatch)
        return envelope.open_parsed(parsed, wrapper)
