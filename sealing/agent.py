"""The enclave agent: the part of rekey that runs inside a workload's TEE.

It attests (evidence binding a verifier's nonce and the agent's HPKE public key), seals and
unseals with the platform's sealing keys, and hands hardware-sealed secrets to the next
generation: ``export`` checks the new enclave's evidence against the migration policy (same
signer and product, SVN not lower, not debug, TCB up to date), unseals, and encrypts each
secret to the new enclave's attested key; ``import`` decrypts such a package inside the new
enclave and reseals under its own identity. The importer issues a single-use import nonce that
the exporter's package evidence binds together with the items, so a recorded package imports at
most once (and never after the importer restarts). No answer carries a plaintext secret except
``unseal``, which the transport restricts to the local caller.

The agent is typed against the enclave interface (``sealing.tee.platform.Enclave``), so it runs
unchanged on every platform that implements it; ``sealing.tee.sim`` is the one without hardware.
This module is transport-free; ``rekey/agent_server.py`` puts it on HTTP.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Protocol

from attestation.claims import Claims
from attestation.errors import NonceMismatch, PolicyDenied
from attestation.platform import PlatformVerifier
from attestation.policy import CLOCK_SKEW
from attestation.ratls import CERT_LIFETIME, RatlsIdentity, make_identity
from sealing import envelope
from sealing.envelope import SealingPolicy
from sealing.errors import InvalidWrappedKey, SealingError, TamperedBlob
from sealing.generation import GenerationManifest
from sealing.handoff import (
    PROTOCOL,
    SUITE_NAME,
    HandoffError,
    HandoffKeyPair,
    ItemLabel,
    fingerprint,
    release_info,
    report_data_for,
    seal_to,
)
from sealing.names import check_name, check_namespace
from sealing.tee.platform import SEAL_POLICIES, Enclave, SealPolicyName

_POLICY_NAMES: dict[SealingPolicy, SealPolicyName] = {value: name for name, value in SEAL_POLICIES.items()}
EXPORT_CONTEXT = b"rekey-export-v2"
PACKAGE_VERSION = 2  # v2: the exporter's evidence binds the importer's nonce
NONCE_TTL = timedelta(minutes=5)
# Outstanding nonces are bounded per caller (the caller's own oldest one is evicted, never another
# caller's) and overall by the number of callers, so a flood from one caller cannot block another's
# handoff and memory stays bounded.
MAX_NONCES_PER_CALLER = 64
MAX_NONCE_CALLERS = 64
MAX_SEAL_VERSION: Final = 1 << 48
"""The highest blob version an agent seals (far below `sealing.envelope.MAX_BLOB_VERSION`): a
stored blob it sealed can always be replaced by one a version higher."""


def _now() -> datetime:
    return datetime.now(UTC)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: Any, what: str) -> bytes:
    if not isinstance(text, str):
        raise HandoffError(f"{what} must be a base64 string")
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise HandoffError(f"{what} is not valid base64") from None


class KmsUnavailable(SealingError):
    """The agent cannot reach a KMS for this key (it has no KMS settings, or not for that
    backend): it opens and re-binds hardware-sealed state only."""


class GenerationMismatch(SealingError):
    """A KMS-wrapped blob bound to another generation than the agent's (its header says which):
    the agent does not open it, whatever the key's release policy admits."""


class KeyReleaser(Protocol):
    """The attested release gate of one KMS key, as the agent uses it
    (`kms_adapters.contract.KmsAdapter` is one): ``release`` answers the DEK encrypted to the
    recipient key (HPKE, `sealing.handoff.release_info`), never in plaintext."""

    def version_of(self, wrapped: bytes) -> int: ...

    def release(self, wrapped: bytes, attestation_result: str, recipient_public_key: bytes) -> bytes: ...


@dataclass(frozen=True)
class Attestation:
    evidence: bytes
    public_key: bytes


def migration_reasons(own: GenerationManifest, peer: Claims, *, peer_is_newer: bool) -> list[str]:
    """Why ``peer`` may not take (or give) this agent's sealed state; empty when it may.

    Export (``peer_is_newer``): the peer must not have a lower SVN. Import: the exporter must
    not have a higher one (state only moves forward)."""
    reasons = []
    if peer.platform != own.platform:
        reasons.append(f"platform {peer.platform} is not {own.platform}")
    if peer.signer != own.signer:
        reasons.append(f"signer {peer.signer[:16]}… is not this enclave's signer {own.signer[:16]}…")
    if peer.product_id != own.product_id:
        reasons.append(f"product id {peer.product_id} is not {own.product_id}")
    if peer_is_newer and peer.svn < own.svn:
        reasons.append(f"svn {peer.svn} is below this enclave's svn {own.svn}")
    if not peer_is_newer and peer.svn > own.svn:
        reasons.append(f"exporter svn {peer.svn} is above this enclave's svn {own.svn}")
    if peer.debug:
        reasons.append("debug enclave not allowed")
    if peer.tcb_status != "UpToDate":
        reasons.append(f"TCB status {peer.tcb_status} is not allowed (allowed: UpToDate)")
    return reasons


def _package_report_data(import_nonce: bytes, items: list[dict[str, str]]) -> bytes:
    """What the exporter's evidence binds: SHA-256(context || len(nonce) || nonce || items) || zeros."""
    canonical = json.dumps(items, sort_keys=True, separators=(",", ":")).encode()
    material = EXPORT_CONTEXT + len(import_nonce).to_bytes(1, "big") + import_nonce + canonical
    return hashlib.sha256(material).digest() + bytes(32)


def _item_identity(item: dict[str, Any]) -> tuple[uuid.UUID | None, int]:
    """The blob id and version a handed-off item keeps (none given: a fresh id, version 1)."""
    raw_id, raw_version = item.get("blob_id"), item.get("version", "1")
    try:
        blob_id = None if raw_id is None else uuid.UUID(str(raw_id))
        version = int(str(raw_version)) if str(raw_version).isdigit() else 0
    except ValueError:
        raise HandoffError("handoff item has an invalid blob id") from None
    if not 1 <= version <= envelope.MAX_BLOB_VERSION:
        raise HandoffError("handoff item has an invalid version")
    return blob_id, version


class _NoncePool:
    """Single-use nonces with a lifetime, bounded per caller: each caller keeps at most
    ``MAX_NONCES_PER_CALLER`` outstanding (a new one evicts that caller's own oldest, never
    another caller's), and at most ``MAX_NONCE_CALLERS`` callers hold nonces at once. A nonce is
    spent only by the caller it was issued to."""

    def __init__(self, clock: Callable[[], datetime]) -> None:
        self._clock = clock
        self._nonces: dict[str, OrderedDict[bytes, datetime]] = {}
        self._lock = threading.Lock()

    def issue(self, caller: str = "") -> bytes:
        now = self._clock()
        nonce = secrets.token_bytes(32)
        with self._lock:
            for name in list(self._nonces):
                queue = self._nonces[name]
                while queue and next(iter(queue.values())) <= now:
                    queue.popitem(last=False)
                if not queue and name != caller:
                    del self._nonces[name]
            own = self._nonces.get(caller)
            if own is None:
                if len(self._nonces) >= MAX_NONCE_CALLERS:
                    raise HandoffError("too many callers hold nonces; try again later")
                own = self._nonces[caller] = OrderedDict()
            while len(own) >= MAX_NONCES_PER_CALLER:
                own.popitem(last=False)
            own[nonce] = now + NONCE_TTL
        return nonce

    def consume(self, nonce: bytes, what: str, caller: str = "") -> None:
        with self._lock:
            own = self._nonces.get(caller)
            expiry = own.pop(nonce, None) if own is not None else None
        if expiry is None or expiry <= self._clock():
            raise NonceMismatch(f"{what} was not issued to this caller, has expired, or was already used")


class EnclaveAgent:
    def __init__(
        self,
        manifest: GenerationManifest,
        enclave: Enclave[Any],
        verifier: PlatformVerifier,
        *,
        clock: Callable[[], datetime] = _now,
        max_evidence_age: timedelta = timedelta(minutes=5),
        releaser: Callable[[str], KeyReleaser] | None = None,
    ) -> None:
        """``releaser``: the release gate of a key ref, with this agent's own KMS settings
        (None: the agent has none and refuses KMS-wrapped state with `KmsUnavailable`)."""
        self.manifest = manifest
        self._releaser = releaser
        self._enclave = enclave
        self._verifier = verifier
        self._clock = clock
        self._max_age = max_evidence_age
        self._keys = HandoffKeyPair()
        self._export_nonces = _NoncePool(clock)  # challenges for a peer that wants our state
        self._import_nonces = _NoncePool(clock)  # what an exporter's package must bind for us

    @property
    def public_key(self) -> bytes:
        return self._keys.public_bytes

    def identity(self) -> dict[str, Any]:
        return self.manifest.to_dict() | {
            "handoff_key_sha256": fingerprint(self.public_key),
            "handoff_suite": SUITE_NAME,
            "host_id": self._enclave.host_id,
        }

    @property
    def host_id(self) -> str | None:
        """The id of the host this agent's enclave runs on (`Enclave.host_id`)."""
        return self._enclave.host_id

    # ------------------------------------------------------------------------- attestation

    def new_nonce(self, caller: str = "") -> bytes:
        """A single-use challenge (for ``caller``) for a peer that wants this agent's state."""
        return self._export_nonces.issue(caller)

    def new_import_nonce(self, caller: str = "") -> bytes:
        """A single-use nonce (for ``caller``) the exporter must bind into the package this
        agent is to import."""
        return self._import_nonces.issue(caller)

    def attest(self, nonce: bytes) -> Attestation:
        if not 1 <= len(nonce) <= 64:
            raise HandoffError("nonce must be 1-64 bytes")
        return Attestation(self._enclave.report(report_data_for(nonce, self.public_key)), self.public_key)

    def ratls_identity(self, lifetime: timedelta = CERT_LIFETIME) -> RatlsIdentity:
        """A fresh TLS key and its RA-TLS certificate: this enclave's evidence binds the key's
        hash (`attestation.ratls`); valid from now for ``lifetime``."""
        return make_identity(
            self.manifest.platform, self._enclave.report, now=self._clock(), lifetime=lifetime
        )

    def _verify_peer(self, evidence: bytes, expected_report_data: bytes) -> Claims:
        now = self._clock()
        claims = self._verifier.verify(evidence, at=now)
        if not hmac.compare_digest(bytes.fromhex(claims.report_data), expected_report_data):
            raise NonceMismatch("peer evidence does not bind the expected nonce and public key")
        if claims.evidence_time is not None:
            if now - claims.evidence_time > self._max_age:
                raise PolicyDenied([f"evidence is older than {int(self._max_age.total_seconds())}s"])
            if claims.evidence_time - now > CLOCK_SKEW:
                raise PolicyDenied(
                    [f"evidence is dated in the future (more than {int(CLOCK_SKEW.total_seconds())}s ahead)"]
                )
        return claims

    # ------------------------------------------------------------------------------ sealing

    def seal(
        self,
        *,
        namespace: str,
        name: str,
        data: bytes,
        policy: SealPolicyName,
        blob_id: uuid.UUID | None = None,
        version: int = 1,
    ) -> bytes:
        """Seal ``data`` in the enclave under (namespace, name), with ``blob_id`` (default:
        fresh) and ``version`` in the header; `InvalidName` (a ValueError: the agent answers 400)
        for a name outside `sealing.names`, and ValueError for a version outside
        1..`MAX_SEAL_VERSION` (so one above any blob an agent sealed is still a valid version)."""
        check_namespace(namespace)
        check_name(name)
        if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= MAX_SEAL_VERSION:
            raise ValueError(f"version must be an integer in 1..{MAX_SEAL_VERSION}")
        return self._enclave.seal(
            data,
            policy,
            namespace=namespace,
            name=name,
            generation=self.manifest.id,
            blob_id=blob_id,
            version=version,
        )

    def unseal(self, blob: bytes) -> bytes:
        return self._enclave.unseal(blob)

    def check(self, blob: bytes, token: str | None = None) -> dict[str, Any]:
        """Open ``blob`` here and answer only that it opened (its namespace, name and version):
        a health gate learns that the new generation can read its state without the
        plaintext ever leaving the enclave. A KMS-wrapped blob opens through the release gate
        with ``token`` (this agent's attestation result)."""
        parsed = envelope.parse(blob)
        if parsed.header.policy is SealingPolicy.KMS:
            if token is None:
                raise HandoffError("a KMS-wrapped blob opens only with an attestation result token")
            self.open_kms(blob, token)  # only a blob bound to this agent's generation
        else:
            self._enclave.unseal(blob)
        header = parsed.header
        return {"opens": True, "namespace": header.namespace, "name": header.name, "version": header.version}

    # ------------------------------------------------------------------- KMS-wrapped state

    def _released_dek(self, parsed: envelope.SealedBlob, token: str) -> bytes:
        """The blob's DEK, released by its key's gate to this agent's attested key and opened
        here. The gate (`KeyReleaser.release`) checks ``token`` against the key's release
        policy; for Transit it unwraps in this process, where the KMS token is."""
        if self._releaser is None:
            raise KmsUnavailable(
                "this agent has no KMS settings: it cannot open or re-bind KMS-wrapped state"
            )
        if not isinstance(token, str) or not token:
            raise HandoffError("an attestation result token is required")
        key_ref = parsed.header.key_ref
        releaser = self._releaser(key_ref)
        try:
            named = releaser.version_of(parsed.wrapped_dek)
        except InvalidWrappedKey:
            raise TamperedBlob("sealed blob key slot does not hold a wrapped DEK for this key") from None
        if named != parsed.key_version:
            raise TamperedBlob(
                f"sealed blob key slot says version {parsed.key_version} but its wrapped DEK is"
                f" version {named}"
            )
        released = releaser.release(parsed.wrapped_dek, token, self.public_key)
        return self._keys.open(released, release_info(key_ref))

    @staticmethod
    def _kms_blob(blob: bytes) -> envelope.SealedBlob:
        parsed = envelope.parse(blob)
        if parsed.header.policy is not SealingPolicy.KMS:
            raise HandoffError(f"sealed blob {parsed.header.blob_id} is hardware-sealed, not KMS-wrapped")
        return parsed

    def _own_kms_blob(self, blob: bytes) -> envelope.SealedBlob:
        """A KMS-wrapped blob bound to this agent's generation (its authenticated header names
        it). A key's release policy admits both generations while a migration moves its state,
        so the policy alone does not keep one generation out of the other's blobs: only
        `rebind` crosses generations, from the one it is asked to."""
        parsed = self._kms_blob(blob)
        if parsed.header.generation != self.manifest.id:
            raise GenerationMismatch(
                f"sealed blob {parsed.header.blob_id} is bound to generation {parsed.header.generation},"
                f" not this agent's {self.manifest.id}: it is not opened here"
            )
        return parsed

    def open_kms(self, blob: bytes, token: str) -> bytes:
        """Open a KMS-wrapped blob bound to this agent's generation through the attested release
        gate (`unseal`'s sibling: the transport gives the plaintext to the authenticated local
        caller only); `GenerationMismatch` for a blob bound to another generation."""
        parsed = self._own_kms_blob(blob)
        return envelope.open_with_dek(parsed, self._released_dek(parsed, token))

    def rebind(self, blobs: list[bytes], *, from_generation: str, token: str) -> list[bytes]:
        """Bind each KMS-wrapped blob of ``from_generation`` to this agent's generation: its DEK
        is released to this agent (``token``: this agent's attestation result), its body
        decrypted under the old header and encrypted again under the same DEK and a header
        naming this generation (`sealing.envelope.rebound`). Nothing but the new blobs leaves
        the agent; all of them or none (a blob of another generation, or a hardware-sealed
        one, refuses the whole batch before any release)."""
        if from_generation == self.manifest.id:
            raise HandoffError(
                f"the blobs are to be re-bound from {from_generation}, this agent's own generation"
            )
        parsed = [self._kms_blob(blob) for blob in blobs]
        for item in parsed:
            if item.header.generation != from_generation:
                raise HandoffError(
                    f"sealed blob {item.header.blob_id} is bound to generation"
                    f" {item.header.generation}, not {from_generation}"
                )
        return [envelope.rebound(item, self._released_dek(item, token), self.manifest.id) for item in parsed]

    # ------------------------------------------------------------------------------ handoff

    def export(
        self,
        *,
        peer_evidence: bytes,
        peer_public_key: bytes,
        nonce: bytes,
        import_nonce: bytes,
        blobs: list[bytes],
        caller: str = "",
    ) -> dict[str, Any]:
        """Hand ``blobs`` to an attested newer generation, encrypted to its key. ``nonce`` is
        this agent's challenge the peer's evidence binds, issued to the same ``caller``;
        ``import_nonce`` is the peer's (``new_import_nonce``), bound into this agent's evidence
        over the package."""
        if not 1 <= len(import_nonce) <= 64:
            raise HandoffError("import nonce must be 1-64 bytes")
        self._export_nonces.consume(nonce, "nonce", caller)
        claims = self._verify_peer(peer_evidence, report_data_for(nonce, peer_public_key))
        reasons = migration_reasons(self.manifest, claims, peer_is_newer=True)
        if reasons:
            raise PolicyDenied(reasons)
        items = []
        for blob in blobs:
            secret = self.unseal(blob)
            header = envelope.parse(blob).header
            label = ItemLabel(header.namespace, header.name, _POLICY_NAMES[header.policy])
            items.append(
                {
                    "namespace": label.namespace,
                    "name": label.name,
                    "policy": label.policy,
                    # The blob keeps its id and version across the hand-off, so the store's row
                    # and the freshness checkpoint still name it (bound by the package evidence).
                    "blob_id": str(header.blob_id),
                    "version": str(header.version),
                    "ciphertext": _b64(seal_to(peer_public_key, label, secret)),
                }
            )
        # The exporter attests to the package too, so the importer knows who sent it, and binds
        # the importer's nonce, so the package imports once.
        evidence = self._enclave.report(_package_report_data(import_nonce, items))
        return {
            "version": PACKAGE_VERSION,
            "suite": SUITE_NAME,
            "recipient_key_sha256": fingerprint(peer_public_key),
            "exporter_generation": self.manifest.id,
            "exporter_evidence": _b64(evidence),
            "import_nonce": _b64(import_nonce),
            "items": items,
        }

    def import_package(self, package: Any, caller: str = "") -> list[tuple[str, str, bytes]]:
        """Decrypt a package sealed for this agent and reseal every item under this identity.

        Returns (namespace, name, new blob) per item. Nothing is returned unless every item
        decrypted: a package is taken whole or not at all. The package's import nonce must be
        one this agent issued and has not seen used: it is spent by this call, whatever the
        outcome, so a package (or a replay of it) imports at most once."""
        if not isinstance(package, dict) or package.get("version") != PACKAGE_VERSION:
            raise HandoffError(f"not a version {PACKAGE_VERSION} handoff package")
        if package.get("recipient_key_sha256") != fingerprint(self.public_key):
            raise HandoffError("handoff package is sealed for another agent")
        items = package.get("items")
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            raise HandoffError("handoff package has no item list")
        import_nonce = _unb64(package.get("import_nonce"), "import nonce")
        self._import_nonces.consume(import_nonce, "import nonce", caller)
        exporter = self._verify_peer(
            _unb64(package.get("exporter_evidence"), "exporter evidence"),
            _package_report_data(import_nonce, items),
        )
        reasons = migration_reasons(self.manifest, exporter, peer_is_newer=False)
        if reasons:
            raise PolicyDenied(reasons)
        opened = []
        for item in items:
            policy = item.get("policy")
            if policy not in ("mrenclave", "mrsigner"):
                raise HandoffError("handoff item has an unknown sealing policy")
            label = ItemLabel(str(item.get("namespace", "")), str(item.get("name", "")), policy)
            if not label.namespace or not label.name:
                raise HandoffError("handoff item lacks a namespace or name")
            blob_id, version = _item_identity(item)
            secret = self._keys.open(_unb64(item.get("ciphertext"), "item ciphertext"), label.info())
            opened.append((label, blob_id, version, secret))
        return [
            (
                label.namespace,
                label.name,
                self.seal(
                    namespace=label.namespace,
                    name=label.name,
                    data=secret,
                    policy=label.policy,
                    blob_id=blob_id,
                    version=version,
                ),
            )
            for label, blob_id, version, secret in opened
        ]


__all__ = [
    "MAX_SEAL_VERSION",
    "PROTOCOL",
    "Attestation",
    "EnclaveAgent",
    "GenerationMismatch",
    "KeyReleaser",
    "KmsUnavailable",
    "migration_reasons",
]
