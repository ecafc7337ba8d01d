"""Sealed state: seal data under a KMS key and keep it in the store, read it back.

This is the one place that joins the envelope, the key wrappers and the store, so that the
CLI and (later) the workload-facing activities share the same checks: the generation must be
registered, a name keeps its blob id across updates, an update is a compare-and-swap, and a
blob is only opened if its authenticated header agrees with the record it came from.

**Freshness** (with a ``witness``, `sealing.witness`). Whoever can write the store can put back
an older row (a backup, an older generation's value, a deleted blob): its header and body are
genuine, so authentication alone cannot tell. So every put writes a blob version into the
authenticated header, one above the name's checkpoint (or above the stored blob's version, if
that is higher and the stored blob opens: a version that merely parses is never taken over, or a
store writer could push the checkpoint to the maximum and wedge the name), and after the
store write commits advances the signed checkpoint ``("blob", namespace NUL name)`` to it; a
delete advances it past the deleted version to a tombstone. A read refuses (`StaleBlob`) a blob
whose version is below its checkpoint's, or equal to it but not the blob the checkpoint names
(or a deleted one), before anything is decrypted.

The guarantee and its limits:

* the store is written first and the witness second, so a crash (or a witness that cannot be
  written) between the two leaves the checkpoint behind the store: the stored blob still reads
  (its version is above the checkpoint) and that read moves the checkpoint up to it. During that
  window a restore of the previous value is not detected; a put that failed to advance the
  checkpoint raises its `WitnessError` after the store write, so the caller learns of it;
* a blob with no checkpoint (sealed before this existed, or the witness directory was lost) is
  trusted on first use: it reads, and the read anchors its checkpoint. With
  ``require_checkpoint`` (setting ``blob_freshness = "strict"``) it is refused instead;
* an attacker who can also write the witness directory (delete a checkpoint, then restore the
  row: trust on first use accepts it; or restore the directory together with the store), or
  who holds the signing key, can still roll back. Keep the witness on another mount or host
  than the store, and the key out of reach of the store's writers;
* without a witness (``witness=None``: benchmarks, some tests) nothing is checked.

After a legitimate restore of the store, `SealedState.accept` (``rekey state accept``, needs
the signing key) re-anchors the checkpoints to the restored blobs; see docs/sealed-blob-format.md,
"Recovery".

A rotation's re-wrap replaces only the key slot, so a blob keeps its version and needs no new
checkpoint.

**Hardware-sealed state** (kind ``tee``). `SealedState.put_sealed` seals through an enclave
(`EnclaveSealer`: an agent, reached by ``rekey``) instead of a KMS key, under the same rules: the
agent's generation must be registered, the name keeps its blob id, the version goes above the
checkpoint, the store write is a compare-and-swap, and the blob the enclave returns must be the one
asked for (id, names, generation, version, policy) before anything is stored.

Freshness is stricter for ``tee`` blobs. The enclave seals whatever (blob id, names, version) its
caller asks for: it cannot know the checkpoint, so any caller of the agent can mint a genuine blob
in another item's identity at any version, and with a store write put it in place. A higher
version therefore proves nothing, and the rule is exact: a ``tee`` put takes version checkpoint + 1
(never derived from the stored blob, so a stored blob at a huge version cannot wedge the item; the
agent also seals versions up to `sealing.agent.MAX_SEAL_VERSION` only) and its checkpoint names
the blob's id, version and SHA-256; a read with a checkpoint opens a ``tee`` blob only if it is
exactly that blob (`StaleBlob` otherwise, before it is sent). Only the witness's signing key makes
a new ``tee`` value current. The cost is the crash window above: a put whose checkpoint was not
written (it raised `WitnessError`) leaves a blob that does not read until the value is put again,
and of two concurrent puts of one item that took the same version, the one whose checkpoint lost
raises `WitnessError` (put it again). Without a checkpoint (trust on first use) the first read
anchors it, as for KMS blobs. The row records the
host the blob is bound to (a sealing key derives from that machine's root key, so the blob opens
nowhere else). `SealedState.get` opens a ``tee`` blob only through an enclave on that host: for
another host it raises `HostMismatch` (naming both) before the blob is sent anywhere, and without
an enclave `EnclaveRequired`. A KMS-wrapped blob opens with the configured KMS credentials, or
through an enclave (`EnclaveSealer.open_kms`: its DEK is released to the enclave's attested key
by the key's release gate, which refuses a generation its release policy does not admit).
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, Literal, Protocol

from sealing import envelope
from sealing.envelope import SealingPolicy
from sealing.errors import SealedBlobError, SealingError, StaleBlob, TamperedBlob
from sealing.keywrap import KeyWrapper
from sealing.names import check_generation_id, check_host_id, check_name, check_namespace
from sealing.store import (
    BlobHandover,
    BlobRecord,
    BlobSummary,
    DuplicateRecord,
    RecordNotFound,
    SealedStateStore,
    StaleRecord,
    SweepRow,
)
from sealing.witness import Checkpoint, ResettableWitness, Witness, WitnessError

PUT_ATTEMPTS = 5
RESTORED_OVER: Final = "restored_over"
"""Checkpoint body field of an accepted restore: the version the checkpoint had reached before."""
BLOB_KIND: Final = "blob"
"""The witness kind of blob checkpoints (subject: `blob_subject`)."""


class UnknownGeneration(SealingError):
    """State was put for a generation nobody registered."""

    exit_code = 2


class HostMismatch(SealingError):
    """A hardware-sealed blob was to be opened by an enclave on another host than the one it is
    bound to (nothing was sent to that enclave)."""

    exit_code = 2


class EnclaveRequired(SealingError):
    """A hardware-sealed blob opens only inside an enclave on its host: no enclave was given."""

    exit_code = 2


class EnclaveOpenUnsupported(SealingError):
    """A KMS-wrapped blob was to be opened through an enclave that cannot do it (kept for
    callers of earlier releases; `SealedState` opens KMS-wrapped blobs through enclaves now)."""

    exit_code = 2


class EnclaveRefused(SealingError):
    """The enclave refused to seal or open (a blob of another identity, a bad request): its
    one-line reason, never a secret."""

    exit_code = 1


class EnclaveUnavailable(SealingError):
    """The enclave could not be reached or did not prove its answer; nothing was stored."""

    exit_code = 1


SealPolicy = Literal["mrenclave", "mrsigner"]
_TEE_POLICIES: Final = {"mrenclave": SealingPolicy.TEE_MRENCLAVE, "mrsigner": SealingPolicy.TEE_MRSIGNER}


class EnclaveSealer(Protocol):
    """An enclave that seals and opens blobs with its hardware sealing keys (an agent).

    ``seal`` and ``unseal`` raise `EnclaveRefused` when the enclave refuses and
    `EnclaveUnavailable` when it cannot be reached."""

    @property
    def host_id(self) -> str: ...

    @property
    def generation(self) -> str: ...

    @property
    def key_ref(self) -> str:
        """``tee:<platform>``: the key ref of every blob it seals."""
        ...

    @property
    def where(self) -> str:
        """How messages name it (e.g. ``the agent at http://127.0.0.1:PORT``)."""
        ...

    def seal(
        self, *, namespace: str, name: str, data: bytes, policy: SealPolicy, blob_id: str, version: int
    ) -> bytes: ...

    def unseal(self, blob: bytes) -> bytes: ...

    def open_kms(self, blob: bytes) -> bytes:
        """Open a KMS-wrapped blob inside the enclave, its DEK released to it through the
        key's attested release gate (refused, `EnclaveRefused`, when the key's release policy
        does not admit the enclave's generation)."""
        ...


def blob_subject(namespace: str, name: str) -> str:
    """The witness subject of (namespace, name): NUL never occurs in either (the store's names
    are text without NUL), so distinct pairs never share a subject."""
    return f"{namespace}\x00{name}"


def _stored_version(record: BlobRecord | SweepRow | None) -> int:
    """The header version of a stored blob, from the whole blob or its head (0 for none, or one
    that does not parse: the put replacing it still goes above the checkpoint)."""
    if record is None:
        return 0
    try:
        if isinstance(record, SweepRow):
            return envelope.header_in_head(record.head, record.length).version
        return envelope.parse(record.blob).header.version
    except SealedBlobError:
        return 0


def _floor(checkpoint: Checkpoint | None) -> int:
    """The highest version ``checkpoint`` rules out: its order, or the order a restore superseded
    (``restored_over``, written by `SealedState.accept`) if that is higher."""
    if checkpoint is None:
        return 0
    over = checkpoint.body.get(RESTORED_OVER)
    if isinstance(over, int) and not isinstance(over, bool) and 0 <= over <= envelope.MAX_BLOB_VERSION:
        return max(checkpoint.order, over)
    return checkpoint.order


def _digest(blob: bytes | bytearray) -> str:
    return hashlib.sha256(blob).hexdigest()


def _check_tee(record: BlobRecord, header: envelope.BlobHeader, checkpoint: Checkpoint | None) -> None:
    """A hardware-sealed blob with a checkpoint reads only if it is exactly the blob the
    checkpoint names: its version, blob id and SHA-256 (any caller of the agent can have it
    seal a blob in this item's identity at any version, so "above the checkpoint" proves
    nothing; only a put, which advances the signed checkpoint, makes a blob current)."""
    if checkpoint is None:
        return  # trust on first use (or refused by strict freshness in _check_fresh)
    if (
        header.version != checkpoint.order
        or checkpoint.body.get("deleted") is True
        or checkpoint.body.get("blob_id") != str(header.blob_id)
        or checkpoint.body.get("sha256") != _digest(record.blob)
    ):
        raise StaleBlob(
            f"sealed blob {record.namespace}/{record.name} is hardware-sealed and is not the blob its"
            f" checkpoint names (stored version {header.version}, checkpoint version"
            f" {checkpoint.order}): put the value again"
        )


def _check_matches(record: BlobRecord, parsed: envelope.SealedBlob) -> None:
    header = parsed.header
    if (
        str(header.blob_id),
        header.namespace,
        header.name,
        header.key_ref,
        header.generation,
    ) != (
        record.blob_id,
        record.namespace,
        record.name,
        record.key_ref,
        record.generation,
    ) or parsed.key_version != record.key_version:
        raise TamperedBlob(
            f"sealed blob {record.namespace}/{record.name} does not match its store record"
            " (blob moved or record altered)"
        )


class AcceptRefused(SealingError):
    """`SealedState.accept` was asked for something it must not do (no witness that can be
    re-anchored, no such item, a blob that does not authenticate); nothing was changed."""

    exit_code = 2


@dataclass(frozen=True)
class Accepted:
    """What `SealedState.accept` did for one item. ``previous``: the checkpoint's version before
    (None if there was none or it did not verify); ``previous_state``: ``"current"`` (nothing to
    do, ``changed`` is False), ``"stale"`` (the checkpoint was ahead: re-anchored), ``"none"``
    (anchored) or ``"unverifiable"`` (signed by a key that is not pinned, or damaged: replaced)."""

    namespace: str
    name: str
    blob_id: str
    version: int
    previous: int | None
    previous_state: str
    changed: bool

    def to_dict(self) -> dict[str, object]:
        return {
            "namespace": self.namespace,
            "name": self.name,
            "blob_id": self.blob_id,
            "version": self.version,
            "previous_version": self.previous,
            "previous_state": self.previous_state,
            "changed": self.changed,
        }


class SealedState:
    def __init__(
        self,
        store: SealedStateStore,
        wrapper_for: Callable[[str], KeyWrapper],
        witness: Witness | None = None,
        *,
        require_checkpoint: bool = False,
    ) -> None:
        """``witness``: where blob checkpoints are kept (None: no freshness check, see the
        module docstring). ``require_checkpoint``: refuse a blob that has no checkpoint instead
        of anchoring it on first read."""
        self._store = store
        self._wrapper_for = wrapper_for
        self._witness = witness
        self._require_checkpoint = require_checkpoint

    def _checkpoint(self, namespace: str, name: str) -> Checkpoint | None:
        if self._witness is None:
            return None
        return self._witness.latest(BLOB_KIND, blob_subject(namespace, name))

    def _next_version(
        self,
        namespace: str,
        name: str,
        existing: BlobRecord | SweepRow | None,
        sealer: EnclaveSealer | None = None,
    ) -> int:
        """One above the checkpoint (and above the versions a restore superseded, see
        `accept`), or above the stored blob's version if that is higher *and* the stored blob
        authenticates: the header's version is parsed without any key, so whoever writes the
        store could otherwise push every later version (and the checkpoint) up to the maximum
        and wedge the name. A higher genuine version is the crash window between a store write
        and its checkpoint; a higher forged one is ignored (the put replaces it)."""
        checkpoint = self._checkpoint(namespace, name)
        floor = _floor(checkpoint)
        if sealer is not None and checkpoint is not None:
            # A hardware-sealed put goes exactly one above the checkpoint: a stored tee blob
            # above it is never one this put must exceed (it would not read, see _check_tee).
            return floor + 1
        claimed = _stored_version(existing)
        stored = (
            claimed if existing is not None and claimed > floor and self._authentic(existing, sealer) else 0
        )
        version = max(floor, stored) + 1
        if version > envelope.MAX_BLOB_VERSION:
            raise TamperedBlob(f"sealed blob {namespace}/{name} has an implausible version; not replacing it")
        return version

    def put(self, *, namespace: str, name: str, data: bytes, key_ref: str, generation: str) -> BlobSummary:
        """Seal ``data`` and store it under (namespace, name), replacing any previous value.
        Returns the summary of the row written.

        Nothing is written unless sealing succeeded, and a concurrent writer is never
        overwritten: the update is a compare-and-swap on the row version read here. With a
        witness, the new blob's version goes above the stored one's and the checkpoint's, and
        the checkpoint advances to it once the store write has committed. `InvalidName`
        (`sealing.names`) for a namespace, name or generation id outside the allowed ones.

        Memory: of the blob replaced only the head is fetched (its header holds the version);
        ``data`` is let go once sealed (a lost race re-seals from the new blob itself), and the
        blob is handed over to the store (`BlobHandover`), never read back. A caller that hands
        over its only reference (``put(data=path.read_bytes(), ...)``) lets the plaintext be
        freed before the store write, so a put peaks at about twice the size of ``data``: the
        plaintext and the blob while sealing (and on SQLite, which loads the whole value to cut
        its head, the plaintext and the blob replaced), the database's two copies of the blob
        while writing it.
        """
        check_namespace(namespace)
        check_name(name)
        check_generation_id(generation)
        try:
            self._store.get_generation(generation)
        except RecordNotFound:
            raise UnknownGeneration(
                f"generation {generation!r} is not registered (rekey generation register MANIFEST)"
            ) from None
        wrapper = self._wrapper_for(key_ref)
        try:
            existing: SweepRow | None = self._store.head_by_name(namespace, name, envelope.MAX_HEAD_BYTES)
        except RecordNotFound:
            existing = None

        def seal_as(plain: bytes, blob_id: str, version: int) -> tuple[BlobHandover, int, str]:
            sealed = envelope.seal(
                plain,
                wrapper,
                namespace=namespace,
                name=name,
                generation=generation,
                blob_id=uuid.UUID(blob_id),
                version=version,
            )
            # The digest the checkpoint records, taken before the store takes the blob over.
            return BlobHandover(sealed), envelope.key_slot(sealed).key_version, _digest(sealed)

        blob_id = existing.blob_id if existing is not None else str(uuid.uuid4())
        version = self._next_version(namespace, name, existing)
        replacing = None if existing is None else existing.row_version
        blob, key_version, digest = seal_as(data, blob_id, version)
        del data
        # A put replaces the value, so losing a race (to a rotation re-wrapping the old value, or
        # to another writer) just means comparing against the newer row version: the new blob
        # does not depend on what it replaces, only its version must stay above the stored one.
        # A write that lost leaves the blob in its handover.
        for attempt in range(PUT_ATTEMPTS):
            try:
                if replacing is None:
                    record = self._store.insert(
                        blob_id=blob_id,
                        namespace=namespace,
                        name=name,
                        key_ref=key_ref,
                        key_version=key_version,
                        generation=generation,
                        blob=blob,
                    )
                else:
                    record = self._store.compare_and_swap(
                        blob_id,
                        replacing,
                        blob=blob,
                        key_version=key_version,
                        key_ref=key_ref,
                        generation=generation,
                        kind="kms",
                    )
                break
            except (StaleRecord, DuplicateRecord):
                if attempt == PUT_ATTEMPTS - 1:
                    raise
                existing = self._store.head_by_name(namespace, name, envelope.MAX_HEAD_BYTES)
                # Another writer created the name meanwhile, or wrote a value at our version (a
                # re-wrap keeps the version, so a rotation's swap does not cost a re-seal).
                if existing.blob_id != blob_id or _stored_version(existing) >= version:
                    blob_id = existing.blob_id
                    version = self._next_version(namespace, name, existing)
                    # The plaintext was let go: our own blob (sealed here, never stored) has it.
                    plain = envelope.open_blob(blob.take(), wrapper)
                    blob, key_version, digest = seal_as(plain, blob_id, version)
                    del plain
                replacing = existing.row_version
        else:  # pragma: no cover - the loop either breaks or raises
            raise AssertionError("unreachable")
        if self._witness is not None:
            # After the commit: a crash here leaves the checkpoint behind the store, which reads
            # accept (and repair); the other order could leave a checkpoint no blob reaches.
            self._witness.advance(
                BLOB_KIND,
                blob_subject(namespace, name),
                version,
                {"blob_id": record.blob_id, "generation": generation, "sha256": digest},
            )
        return record

    def _registered(self, generation: str) -> None:
        check_generation_id(generation)
        try:
            self._store.get_generation(generation)
        except RecordNotFound:
            raise UnknownGeneration(
                f"generation {generation!r} is not registered (rekey generation register MANIFEST)"
            ) from None

    def put_sealed(
        self, *, namespace: str, name: str, data: bytes, policy: SealPolicy, sealer: EnclaveSealer
    ) -> BlobRecord:
        """Seal ``data`` inside ``sealer``'s enclave under ``policy`` and store it under
        (namespace, name) as a ``tee`` blob bound to the enclave's host, for the enclave's
        generation (which must be registered), replacing any previous value as `put` does.

        The blob the enclave returns must carry the blob id, names, generation, version and
        policy asked for (`TamperedBlob` otherwise); nothing is stored unless sealing succeeded."""
        check_namespace(namespace)
        check_name(name)
        if policy not in _TEE_POLICIES:
            raise ValueError("policy must be mrenclave or mrsigner")
        generation = sealer.generation
        host = check_host_id(sealer.host_id)
        self._registered(generation)
        try:
            existing: BlobRecord | None = self._store.get_by_name(namespace, name)
        except RecordNotFound:
            existing = None
        blob_id = existing.blob_id if existing is not None else str(uuid.uuid4())
        version = self._next_version(namespace, name, existing, sealer)
        replacing = None if existing is None else existing.row_version
        existing = None

        def seal_as(blob_id: str, version: int) -> tuple[bytes, int]:
            blob = sealer.seal(
                namespace=namespace, name=name, data=data, policy=policy, blob_id=blob_id, version=version
            )
            try:
                parsed = envelope.parse(blob)
            except SealedBlobError:
                raise TamperedBlob(
                    f"{sealer.where} answered with something that is not a sealed blob"
                ) from None
            header = parsed.header
            if (
                str(header.blob_id),
                header.namespace,
                header.name,
                header.generation,
                header.key_ref,
                header.version,
                header.policy,
            ) != (blob_id, namespace, name, generation, sealer.key_ref, version, _TEE_POLICIES[policy]):
                raise TamperedBlob(f"{sealer.where} answered with another blob than the one asked for")
            return blob, parsed.key_version

        blob, key_version = seal_as(blob_id, version)
        for attempt in range(PUT_ATTEMPTS):
            try:
                if replacing is None:
                    record = self._store.insert(
                        blob_id=blob_id,
                        namespace=namespace,
                        name=name,
                        key_ref=sealer.key_ref,
                        key_version=key_version,
                        generation=generation,
                        blob=blob,
                        kind="tee",
                        host=host,
                    )
                else:
                    record = self._store.compare_and_swap(
                        blob_id,
                        replacing,
                        blob=blob,
                        key_version=key_version,
                        key_ref=sealer.key_ref,
                        generation=generation,
                        kind="tee",
                        host=host,
                    )
                break
            except (StaleRecord, DuplicateRecord):
                if attempt == PUT_ATTEMPTS - 1:
                    raise
                existing = self._store.get_by_name(namespace, name)
                if existing.blob_id != blob_id or _stored_version(existing) >= version:
                    blob_id = existing.blob_id
                    version = self._next_version(namespace, name, existing, sealer)
                    blob, key_version = seal_as(blob_id, version)
                replacing = existing.row_version
                existing = None
        else:  # pragma: no cover - the loop either breaks or raises
            raise AssertionError("unreachable")
        if self._witness is not None:
            digest = _digest(blob)
            kept = self._witness.advance(
                BLOB_KIND,
                blob_subject(namespace, name),
                version,
                {"blob_id": record.blob_id, "generation": generation, "sha256": digest},
            )
            if kept.order == version and kept.body.get("sha256") != digest:
                raise WitnessError(
                    f"the checkpoint of {namespace}/{name} names a concurrent put's blob at version"
                    f" {version}, not this one; put the value again"
                )
        return record

    def delete(self, *, namespace: str, name: str) -> None:
        """Delete the blob stored under (namespace, name); with a witness, its checkpoint then
        becomes a tombstone above the deleted version, so a restored copy of the row is refused."""
        check_namespace(namespace)
        check_name(name)
        record = self._store.get_by_name(namespace, name)
        version = self._next_version(namespace, name, record)
        self._store.delete(record.blob_id, record.row_version)
        if self._witness is not None:
            self._witness.advance(
                BLOB_KIND,
                blob_subject(namespace, name),
                version,
                {"blob_id": record.blob_id, "deleted": True},
            )

    def accept(self, *, namespace: str, names: Sequence[str]) -> list[Accepted]:
        """The operator's recovery after a legitimate restore of the store (or a failover that
        lost commits): make the stored blobs of ``names`` current again. Each stored blob must
        open (so this accepts only genuine blobs, never a forged one); its checkpoint is then
        re-signed (`ResettableWitness.reset`) at the blob's version, remembering the version
        the checkpoint had reached (``restored_over``) so that the values the restore lost stay
        refused and the next put goes above them. Everything is checked before anything is
        written: a refusal (`AcceptRefused`) changes nothing. Needs the signing key, so whoever
        can only write the store cannot do it."""
        check_namespace(namespace)
        for name in names:
            check_name(name)
        witness = self._witness
        if not isinstance(witness, ResettableWitness):
            raise AcceptRefused("no freshness witness that can be re-anchored is configured")
        if not names:
            raise AcceptRefused(f"no sealed state stored in namespace {namespace!r}")
        plans: list[tuple[Accepted, dict[str, object]]] = []
        for name in dict.fromkeys(names):
            try:
                record = self._store.get_by_name(namespace, name)
            except RecordNotFound:
                raise AcceptRefused(f"no sealed state {namespace}/{name} is stored") from None
            try:
                parsed = envelope.parse(record.blob)
                _check_matches(record, parsed)
                envelope.open_parsed(parsed, self._wrapper_for(record.key_ref))
            except (SealedBlobError, ValueError) as exc:
                raise AcceptRefused(
                    f"sealed blob {namespace}/{name} does not authenticate, so it is not accepted: {exc}"
                ) from None
            header = parsed.header
            try:
                checkpoint = witness.latest(BLOB_KIND, blob_subject(namespace, name))
                state = "none" if checkpoint is None else "stale"
            except WitnessError:
                checkpoint, state = None, "unverifiable"
            if checkpoint is not None:
                try:
                    self._check_fresh(header, checkpoint)
                    state = "current"
                except StaleBlob:
                    pass
            body: dict[str, object] = {"blob_id": record.blob_id, "generation": record.generation}
            floor = _floor(checkpoint)
            if floor > header.version:
                body[RESTORED_OVER] = floor
            outcome = Accepted(
                namespace,
                name,
                record.blob_id,
                header.version,
                None if checkpoint is None else checkpoint.order,
                state,
                state != "current",
            )
            plans.append((outcome, body))
        for outcome, body in plans:
            if outcome.changed:
                witness.reset(BLOB_KIND, blob_subject(namespace, outcome.name), outcome.version, body)
        return [outcome for outcome, _body in plans]

    def get(self, *, namespace: str, name: str, sealer: EnclaveSealer | None = None) -> bytes:
        """Open the blob stored under (namespace, name); `InvalidName` for a name outside the
        allowed ones (`sealing.names`), even if a row stored before the rule has it. A
        hardware-sealed blob opens only through ``sealer`` on its host (`HostMismatch`,
        `EnclaveRequired`); a KMS-wrapped one with the configured KMS credentials, or with
        ``sealer`` inside that enclave after an attested release (`EnclaveSealer.open_kms`)."""
        check_namespace(namespace)
        check_name(name)
        return self.open_record(self._store.get_by_name(namespace, name), sealer)

    def _authentic(self, record: BlobRecord | SweepRow, sealer: EnclaveSealer | None = None) -> bool:
        """Whether the stored blob opens (so its header, version included, is genuine). A blob
        that does not match its record or fails authentication, or whose key ref the
        configuration refuses (ValueError: `kms_adapters.keyref.InvalidKeyRef`), is not; a key
        service that cannot be reached raises (nothing is written then). A hardware-sealed blob
        is genuine only if ``sealer`` is on its host and opens it. For a head, the whole blob is
        read, and one written since the head was read is not: the write comparing against the
        head's row version then fails, and the put reads it again."""
        if isinstance(record, SweepRow):
            try:
                whole = self._store.get(record.blob_id)
            except RecordNotFound:
                return False
            if whole.row_version != record.row_version:
                return False
            record = whole
        try:
            parsed = envelope.parse(record.blob)
            _check_matches(record, parsed)
            if record.kind == "tee":
                if sealer is None or sealer.host_id != record.host:
                    return False
                sealer.unseal(record.blob)
            else:
                envelope.open_parsed(parsed, self._wrapper_for(record.key_ref))
        except (SealedBlobError, ValueError, EnclaveRefused):
            return False
        return True

    def open_record(self, record: BlobRecord, sealer: EnclaveSealer | None = None) -> bytes:
        parsed = envelope.parse(record.blob)
        header = parsed.header
        _check_matches(record, parsed)
        item = f"{record.namespace}/{record.name}"
        if (record.kind == "tee") != (header.policy is not SealingPolicy.KMS):
            raise TamperedBlob(f"sealed blob {item} is not of the kind its store record says ({record.kind})")
        if record.kind == "tee":
            if sealer is None:
                raise EnclaveRequired(
                    f"sealed blob {item} is hardware-sealed on host {record.host}: it opens only"
                    " through an agent on that host (--agent URL)"
                )
            if sealer.host_id != record.host:
                raise HostMismatch(
                    f"sealed blob {item} is hardware-sealed on host {record.host}, but {sealer.where}"
                    f" runs on host {sealer.host_id}: it cannot open it (use an agent on {record.host});"
                    " the blob was not sent"
                )

        def open_it() -> bytes:
            if sealer is not None and record.kind == "kms":
                return sealer.open_kms(record.blob)  # through the attested release gate
            if sealer is not None:
                return sealer.unseal(record.blob)
            return envelope.open_parsed(parsed, self._wrapper_for(record.key_ref))

        if self._witness is None:
            return open_it()
        # Refuse a stale blob before anything is unwrapped or decrypted; anchor (or catch up) the
        # checkpoint only after the body authenticated the header's version.
        checkpoint = self._checkpoint(header.namespace, header.name)
        self._check_fresh(header, checkpoint)
        if record.kind == "tee":
            _check_tee(record, header, checkpoint)
        data = open_it()
        if checkpoint is None or header.version > checkpoint.order:
            body = {"blob_id": str(header.blob_id), "generation": header.generation}
            if record.kind == "tee":
                body["sha256"] = _digest(record.blob)
            self._witness.advance(
                BLOB_KIND, blob_subject(header.namespace, header.name), header.version, body
            )
        return data

    def _check_fresh(self, header: envelope.BlobHeader, checkpoint: Checkpoint | None) -> None:
        item = f"{header.namespace}/{header.name}"
        if checkpoint is None:
            if self._require_checkpoint:
                raise StaleBlob(
                    f"sealed blob {item} (version {header.version}) has no freshness checkpoint"
                    " and blob_freshness is strict"
                )
            return  # trust on first use: open_record anchors it
        deleted = checkpoint.body.get("deleted") is True
        floor = _floor(checkpoint)
        if checkpoint.order < header.version <= floor:
            raise StaleBlob(
                f"sealed blob {item} is stale (a value a restore superseded): stored version"
                f" {header.version}, accepted version {checkpoint.order} over version {floor}"
            )
        if header.version < checkpoint.order:
            what = "a deleted blob" if deleted else "an older value"
            raise StaleBlob(
                f"sealed blob {item} is stale ({what}): stored version {header.version},"
                f" checkpoint version {checkpoint.order}"
            )
        if header.version == checkpoint.order and (
            deleted or checkpoint.body.get("blob_id") != str(header.blob_id)
        ):
            raise StaleBlob(
                f"sealed blob {item} is not the blob its checkpoint names: stored version"
                f" {header.version}, checkpoint version {checkpoint.order}"
            )
