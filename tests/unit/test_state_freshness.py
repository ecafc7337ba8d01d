"""Rollback of sealed state (issue 12, finding 5): with write access to the store, putting back
an older row (from a backup, an older generation, or after a delete) must not return the old
plaintext. Every test performs the attack with plain SQL behind the store's back, on SQLite and
on a real PostgreSQL (the ``store_url`` fixture runs each test on both)."""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import delete, update
from sqlalchemy.engine import Engine

from sealing import envelope
from sealing.errors import StaleBlob, TamperedBlob
from sealing.keywrap import LocalKeyWrapper
from sealing.signing import FileSigner
from sealing.state import BLOB_KIND, SealedState, blob_subject
from sealing.store import SealedStateStore, sealed_blobs
from sealing.witness import DirectoryWitness, WitnessError
from tests.fixtures.freshness import crashing_witness as _advance_fails
from tests.fixtures.freshness import restore_row as _restore
from tests.fixtures.freshness import stored_row as _row

NS, NAME = "payments", "ledger-key"
OLD, NEW = b"OLD-SECRET-v1", b"NEW-SECRET-v2"


def _put(state: SealedState, data: bytes, generation: str = "gen-1") -> None:
    state.put(namespace=NS, name=NAME, data=data, key_ref="vault:orders", generation=generation)


def _assert_refused(state: SealedState, stored: int, checkpoint: int) -> None:
    with pytest.raises(StaleBlob) as caught:
        state.get(namespace=NS, name=NAME)
    message = str(caught.value)
    assert f"{NS}/{NAME}" in message and "\n" not in message
    assert f"stored version {stored}" in message and f"checkpoint version {checkpoint}" in message
    assert "SECRET" not in message
    assert isinstance(caught.value, TamperedBlob)


def test_restored_older_row_is_refused(
    state: SealedState,
    raw: Engine,
    witness: DirectoryWitness,
    store: SealedStateStore,
    wrapper: LocalKeyWrapper,
) -> None:
    _put(state, OLD)
    backup = _row(raw)
    _put(state, NEW)
    assert state.get(namespace=NS, name=NAME) == NEW
    current = witness.latest(BLOB_KIND, blob_subject(NS, NAME))
    assert current is not None and current.order == 2 and current.body["blob_id"] == backup["blob_id"]
    # The restored row is genuine (same blob id, authenticated header and body): only its
    # version, inside the authenticated header, gives it away.
    _restore(raw, backup)
    _assert_refused(state, 1, 2)
    # Also with the row version bumped to look current.
    _restore(raw, backup | {"row_version": 99})
    _assert_refused(state, 1, 2)
    # Without the freshness check the attack works: this is what the witness prevents.
    unchecked = SealedState(store, lambda _ref: wrapper)
    assert unchecked.get(namespace=NS, name=NAME) == OLD


def test_row_from_an_older_generation_is_refused(state: SealedState, raw: Engine) -> None:
    _put(state, OLD, "gen-1")
    gen1 = _row(raw)
    _put(state, NEW, "gen-2")
    assert _row(raw)["generation"] == "gen-2"
    _restore(raw, gen1)
    _assert_refused(state, 1, 2)


def test_deleted_then_restored_row_is_refused(
    state: SealedState, raw: Engine, witness: DirectoryWitness
) -> None:
    _put(state, OLD)
    _put(state, NEW)
    backup = _row(raw)
    state.delete(namespace=NS, name=NAME)
    tomb = witness.latest(BLOB_KIND, blob_subject(NS, NAME))
    assert tomb is not None and tomb.order == 3 and tomb.body["deleted"] is True
    _restore(raw, backup)  # the last value before the delete
    with pytest.raises(StaleBlob, match=r"deleted blob.*stored version 2, checkpoint version 3"):
        state.get(namespace=NS, name=NAME)
    # Re-creating the name (the restored row removed) never reuses a version.
    with raw.begin() as conn:
        conn.execute(delete(sealed_blobs))
    _put(state, b"again")
    assert state.get(namespace=NS, name=NAME) == b"again"
    assert envelope.parse(_row(raw)["blob"]).header.version == 4
    assert _row(raw)["blob_id"] != backup["blob_id"]


def test_a_blob_of_the_checkpoints_version_but_another_id_is_refused(
    state: SealedState, raw: Engine, store: SealedStateStore, wrapper: LocalKeyWrapper
) -> None:
    """Two old (version 0) incarnations of a name: once one is anchored, the other, restored,
    is not the blob its checkpoint names."""
    _put(SealedState(store, lambda _ref: wrapper), b"seed")
    row = _row(raw)
    _restore(raw, row | {"blob": _legacy_blob(wrapper, row["blob_id"], NEW)})
    assert state.get(namespace=NS, name=NAME) == NEW  # anchored at version 0, this blob id
    other_id = str(uuid.uuid4())
    _restore(raw, row | {"blob_id": other_id, "blob": _legacy_blob(wrapper, other_id, OLD)})
    with pytest.raises(
        StaleBlob, match="not the blob its checkpoint names: stored version 0, checkpoint version 0"
    ):
        state.get(namespace=NS, name=NAME)
    # A row that vanished without a tombstone and a put re-creating the name: a new blob id
    # above the checkpoint, accepted; the restored first incarnation is then below it.
    with raw.begin() as conn:
        conn.execute(delete(sealed_blobs))
    _put(state, b"fresh")
    assert _row(raw)["blob_id"] not in (row["blob_id"], other_id)
    assert state.get(namespace=NS, name=NAME) == b"fresh"
    _restore(raw, row | {"blob": _legacy_blob(wrapper, row["blob_id"], NEW)})
    _assert_refused(state, 0, 1)


def test_crash_between_store_write_and_checkpoint_keeps_the_current_blob_readable(
    state: SealedState,
    raw: Engine,
    store: SealedStateStore,
    wrapper: LocalKeyWrapper,
    witness: DirectoryWitness,
) -> None:
    _put(state, OLD)
    backup = _row(raw)
    crashing = SealedState(store, lambda _ref: wrapper, _advance_fails(witness))
    with pytest.raises(WitnessError, match="simulated crash"):
        _put(crashing, NEW)
    # The store committed version 2, the checkpoint stayed at 1: the current blob reads ...
    assert envelope.parse(_row(raw)["blob"]).header.version == 2
    assert witness.latest(BLOB_KIND, blob_subject(NS, NAME)).order == 1  # type: ignore[union-attr]
    assert state.get(namespace=NS, name=NAME) == NEW
    # ... and that read caught the checkpoint up, so the old row is refused from now on.
    assert witness.latest(BLOB_KIND, blob_subject(NS, NAME)).order == 2  # type: ignore[union-attr]
    _restore(raw, backup)
    _assert_refused(state, 1, 2)


def _tamper_cases(tmp_path: Path, witness: DirectoryWitness, state: SealedState) -> Iterator[str]:
    path = witness.path_of(BLOB_KIND, blob_subject(NS, NAME))
    good = path.read_bytes()
    # 1. edited: the order lowered to the restored row's version
    doc = json.loads(good)
    doc["statement"]["order"] = 1
    path.write_text(json.dumps(doc))
    yield "bad signature"
    # 2. moved from another blob: a genuine checkpoint of another name, at version 1
    state.put(namespace=NS, name="other", data=b"x", key_ref="vault:orders", generation="gen-1")
    shutil.copyfile(witness.path_of(BLOB_KIND, blob_subject(NS, "other")), path)
    yield "another subject"
    # 3. signed by a key that is not pinned: the attacker's own witness wrote it
    forger = DirectoryWitness(tmp_path / "witness", FileSigner(Ed25519PrivateKey.generate()))
    path.unlink()
    forger.advance(BLOB_KIND, blob_subject(NS, NAME), 1, {"blob_id": doc["statement"]["body"]["blob_id"]})
    yield "not pinned"


def test_tampered_checkpoint_is_refused(
    state: SealedState, raw: Engine, witness: DirectoryWitness, tmp_path: Path
) -> None:
    _put(state, OLD)
    backup = _row(raw)
    _put(state, NEW)
    _restore(raw, backup)
    for why in _tamper_cases(tmp_path, witness, state):
        with pytest.raises(WitnessError, match=why):
            state.get(namespace=NS, name=NAME)
        with pytest.raises(WitnessError, match=why):  # nor does a put write over it
            _put(state, b"over")


def _legacy_blob(wrapper: LocalKeyWrapper, blob_id: str, data: bytes) -> bytes:
    """A blob as sealed before blob versions existed: no tag 0x09 (version 0)."""
    template = envelope.parse(
        envelope.seal(b"", wrapper, namespace=NS, name=NAME, generation="gen-1", blob_id=uuid.UUID(blob_id))
    )
    header = template.header._replace(version=0)
    encoded = header.encode()
    aad = b"RKSB\x01\x00" + len(encoded).to_bytes(2, "big") + encoded
    dek = AESGCM.generate_key(bit_length=256)
    wrapped = wrapper.wrap(dek)
    nonce = bytes(12)
    body = AESGCM(dek).encrypt(nonce, data, aad)
    return envelope.SealedBlob(header, wrapped.key_version, wrapped.ciphertext, nonce, body, aad).to_bytes()


def test_blob_without_checkpoint_is_trusted_on_first_use_then_anchored(
    state: SealedState,
    raw: Engine,
    store: SealedStateStore,
    wrapper: LocalKeyWrapper,
    witness: DirectoryWitness,
) -> None:
    """A blob sealed before this feature (version 0, no checkpoint) reads and is anchored; the
    next put goes to version 1 and the legacy row restored is refused. A strict state refuses
    a blob with no checkpoint."""
    _put(SealedState(store, lambda _ref: wrapper), b"seed")  # a row to overwrite, no witness
    row = _row(raw)
    legacy = row | {"blob": _legacy_blob(wrapper, row["blob_id"], OLD)}
    _restore(raw, legacy)
    strict = SealedState(store, lambda _ref: wrapper, witness, require_checkpoint=True)
    with pytest.raises(StaleBlob, match="no freshness checkpoint"):
        strict.get(namespace=NS, name=NAME)
    assert witness.latest(BLOB_KIND, blob_subject(NS, NAME)) is None
    assert state.get(namespace=NS, name=NAME) == OLD  # trust on first use
    anchored = witness.latest(BLOB_KIND, blob_subject(NS, NAME))
    assert anchored is not None and anchored.order == 0 and anchored.body["blob_id"] == row["blob_id"]
    assert strict.get(namespace=NS, name=NAME) == OLD  # anchored now
    _put(state, NEW)
    assert envelope.parse(_row(raw)["blob"]).header.version == 1
    _restore(raw, legacy)
    _assert_refused(state, 0, 1)


def test_lost_witness_directory_does_not_make_the_current_blob_unreadable(
    state: SealedState, witness: DirectoryWitness
) -> None:
    _put(state, OLD)
    _put(state, NEW)
    shutil.rmtree(witness.directory)
    assert state.get(namespace=NS, name=NAME) == NEW  # re-anchored on first use
    assert witness.latest(BLOB_KIND, blob_subject(NS, NAME)).order == 2  # type: ignore[union-attr]


def test_version_survives_a_rewrap_and_put_races(
    state: SealedState, raw: Engine, store: SealedStateStore, wrapper: LocalKeyWrapper
) -> None:
    """A re-wrap (what a rotation does) keeps the header and so the version: the blob still
    reads against its checkpoint; a put after it goes one above."""
    _put(state, OLD)
    _put(state, NEW)
    row = _row(raw)
    wrapper.rotate()
    moved = envelope.rewrap(row["blob"], wrapper)
    assert envelope.parse(moved).header.version == 2
    store.compare_and_swap(row["blob_id"], row["row_version"], blob=moved, key_version=2)
    assert state.get(namespace=NS, name=NAME) == NEW
    _put(state, b"third")
    assert envelope.parse(_row(raw)["blob"]).header.version == 3


def test_stale_check_happens_before_anything_is_unwrapped(
    store: SealedStateStore, raw: Engine, witness: DirectoryWitness, wrapper: LocalKeyWrapper
) -> None:
    calls: list[str] = []

    def resolve(_ref: str) -> LocalKeyWrapper:
        calls.append(_ref)
        return wrapper

    state = SealedState(store, resolve, witness)
    _put(state, OLD)
    backup = _row(raw)
    _put(state, NEW)
    _restore(raw, backup)
    calls.clear()
    with pytest.raises(StaleBlob):
        state.get(namespace=NS, name=NAME)
    assert calls == []


def test_unchecked_state_still_works_without_a_witness(
    store: SealedStateStore, wrapper: LocalKeyWrapper
) -> None:
    plain = SealedState(store, lambda _ref: wrapper)
    _put(plain, OLD)
    _put(plain, NEW)
    assert plain.get(namespace=NS, name=NAME) == NEW


def test_old_blob_written_into_the_current_row_is_refused(state: SealedState, raw: Engine) -> None:
    """Only the blob column put back (the newer row's other columns kept): refused as well."""
    _put(state, OLD)
    old_blob = _row(raw)["blob"]
    _put(state, NEW)
    with raw.begin() as conn:
        conn.execute(update(sealed_blobs).where(sealed_blobs.c.name == NAME).values(blob=old_blob))
    _assert_refused(state, 1, 2)
