"""Blob freshness, continued (issue 12, findings 5 and 6 review): the stored blob's version is
parsed without any key, so a store writer must not be able to push the checkpoint to the maximum
and wedge a name ("version poisoning"); and an operator recovering from a legitimate restore (or a
lost signing key) must have a way back (`SealedState.accept`) that a store writer cannot use.
The attacks are plain SQL behind the store's back, on SQLite and on a real PostgreSQL."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import update
from sqlalchemy.engine import Engine

from sealing import envelope
from sealing.errors import StaleBlob
from sealing.keywrap import LocalKeyWrapper
from sealing.signing import FileSigner
from sealing.state import BLOB_KIND, RESTORED_OVER, AcceptRefused, SealedState, blob_subject
from sealing.store import BlobRecord, SealedStateStore, sealed_blobs
from sealing.witness import DirectoryWitness, WitnessError
from tests.fixtures.freshness import crashing_witness as _advance_fails
from tests.fixtures.freshness import restore_row as _restore
from tests.fixtures.freshness import stored_row as _row

NS, NAME = "payments", "ledger-key"
HUGE = (1 << 64) - 2


def _put(state: SealedState, data: bytes, name: str = NAME) -> None:
    state.put(namespace=NS, name=name, data=data, key_ref="vault:orders", generation="gen-1")


def _poison(raw: Engine, name: str = NAME, version: int = HUGE) -> None:
    """Rewrite the header's version (tag 0x09, 8 bytes) of the stored blob: no key needed."""
    blob = bytearray(_row(raw, name)["blob"])
    at = blob.index(struct.pack(">BH", 0x09, 8)) + 3
    blob[at : at + 8] = struct.pack(">Q", version)
    with raw.begin() as conn:
        conn.execute(update(sealed_blobs).where(sealed_blobs.c.name == name).values(blob=bytes(blob)))
    assert envelope.parse(bytes(blob)).header.version == version


def _order(witness: DirectoryWitness, name: str = NAME) -> int:
    point = witness.latest(BLOB_KIND, blob_subject(NS, name))
    assert point is not None
    return point.order


def _version(raw: Engine, name: str = NAME) -> int:
    return envelope.parse(_row(raw, name)["blob"]).header.version


# ---------------------------------------------------------------------------- version poisoning


def test_forged_stored_version_does_not_poison_the_checkpoint(
    state: SealedState, raw: Engine, witness: DirectoryWitness
) -> None:
    _put(state, b"v1")
    _put(state, b"v2")
    clean = _row(raw)
    _poison(raw)
    _put(state, b"v3-legit")  # the legitimate writer replaces the forged row
    assert _order(witness) == 3 and _version(raw) == 3
    assert state.get(namespace=NS, name=NAME) == b"v3-legit"
    _put(state, b"v4")
    assert _order(witness) == 4
    # The operator's clean backup row (version 2) is refused as stale, not wedged forever ...
    _restore(raw, clean)
    with pytest.raises(StaleBlob, match="checkpoint version 4"):
        state.get(namespace=NS, name=NAME)
    # ... and puts and deletes keep working.
    _put(state, b"v5")
    assert _order(witness) == 5 and state.get(namespace=NS, name=NAME) == b"v5"
    state.delete(namespace=NS, name=NAME)
    assert _order(witness) == 6


def test_forged_version_without_a_checkpoint_is_not_trusted(
    state: SealedState,
    raw: Engine,
    witness: DirectoryWitness,
    store: SealedStateStore,
    wrapper: LocalKeyWrapper,
) -> None:
    _put(state, b"v1")
    witness.path_of(BLOB_KIND, blob_subject(NS, NAME)).unlink()  # witness lost (or never had one)
    _poison(raw)
    _put(state, b"v2")
    assert _version(raw) == 1 and _order(witness) == 1
    # Without a witness at all, the forged version is not taken over either.
    bare = SealedState(store, lambda _ref: wrapper, None)
    _poison(raw)
    bare.put(namespace=NS, name=NAME, data=b"v3", key_ref="vault:orders", generation="gen-1")
    assert _version(raw) == 1
    bare.put(namespace=NS, name=NAME, data=b"v4", key_ref="vault:orders", generation="gen-1")
    assert _version(raw) == 2


def test_genuine_blob_without_a_checkpoint_keeps_its_version(
    state: SealedState, raw: Engine, witness: DirectoryWitness
) -> None:
    for data in (b"v1", b"v2", b"v3"):
        _put(state, data)
    witness.path_of(BLOB_KIND, blob_subject(NS, NAME)).unlink()
    _put(state, b"v4")  # the stored blob authenticates: its version counts
    assert _version(raw) == 4 and _order(witness) == 4


def test_crash_window_still_gives_a_strictly_higher_version(
    state: SealedState,
    raw: Engine,
    witness: DirectoryWitness,
    store: SealedStateStore,
    wrapper: LocalKeyWrapper,
) -> None:
    _put(state, b"v1")
    crashing = SealedState(store, lambda _ref: wrapper, _advance_fails(witness))
    for data in (b"v2", b"v3"):
        with pytest.raises(WitnessError, match="simulated crash"):
            _put(crashing, data)
    window = _row(raw)
    assert _version(raw) == 3 and _order(witness) == 1  # genuine blob above its checkpoint
    _put(state, b"v4")
    assert _version(raw) == 4 and _order(witness) == 4  # above the genuine stored version
    _restore(raw, window)
    with pytest.raises(StaleBlob):
        state.get(namespace=NS, name=NAME)


def test_a_forged_version_replaced_while_a_put_authenticates_it_is_not_taken_over(
    state: SealedState,
    raw: Engine,
    witness: DirectoryWitness,
    store: SealedStateStore,
    wrapper: LocalKeyWrapper,
) -> None:
    """A put reads the head of the blob it replaces (the version) and, if that version is above
    the checkpoint, the whole blob to authenticate it. A genuine blob written in between must not
    vouch for the forged version the head claimed."""
    _put(state, b"v1")
    _put(state, b"v2")
    clean = _row(raw)
    _poison(raw)

    class SwapsBeforeReading:
        def get(self, blob_id: str) -> BlobRecord:
            _restore(raw, clean | {"row_version": clean["row_version"] + 5})  # the genuine blob, rewritten
            return store.get(blob_id)

        def __getattr__(self, name: str) -> Any:
            return getattr(store, name)

    racing = SealedState(SwapsBeforeReading(), lambda _ref: wrapper, witness)  # type: ignore[arg-type]
    _put(racing, b"v3-legit")
    assert _version(raw) == 3 and _order(witness) == 3
    assert state.get(namespace=NS, name=NAME) == b"v3-legit"


# ---------------------------------------------------------------------------- accept (recovery)


def test_accept_recovers_a_restored_row_and_keeps_the_lost_values_refused(
    state: SealedState, raw: Engine, witness: DirectoryWitness
) -> None:
    _put(state, b"v1")
    backup = _row(raw)
    _put(state, b"v2")
    lost = _row(raw)
    _put(state, b"v3")
    _restore(raw, backup)  # the legitimate restore from last night's backup
    with pytest.raises(StaleBlob):
        state.get(namespace=NS, name=NAME)
    (done,) = state.accept(namespace=NS, names=[NAME])
    assert (done.version, done.previous, done.previous_state, done.changed) == (1, 3, "stale", True)
    assert state.get(namespace=NS, name=NAME) == b"v1"
    point = witness.latest(BLOB_KIND, blob_subject(NS, NAME))
    assert point is not None and point.order == 1 and point.body[RESTORED_OVER] == 3
    # A value the restore lost, put back by someone with store access, stays refused ...
    _restore(raw, lost)
    with pytest.raises(StaleBlob, match="restore superseded"):
        state.get(namespace=NS, name=NAME)
    _restore(raw, backup)
    # ... and the next put goes above everything ever issued.
    _put(state, b"v-next")
    assert _version(raw) == 4 and _order(witness) == 4
    assert state.get(namespace=NS, name=NAME) == b"v-next"
    # Accepting a current item changes nothing.
    before = witness.path_of(BLOB_KIND, blob_subject(NS, NAME)).read_bytes()
    (again,) = state.accept(namespace=NS, names=[NAME])
    assert (again.previous_state, again.changed) == ("current", False)
    assert witness.path_of(BLOB_KIND, blob_subject(NS, NAME)).read_bytes() == before


def test_accept_refuses_bad_input_and_changes_nothing(
    state: SealedState,
    raw: Engine,
    witness: DirectoryWitness,
    store: SealedStateStore,
    wrapper: LocalKeyWrapper,
) -> None:
    _put(state, b"v1", "good")
    good_backup = _row(raw, "good")
    _put(state, b"v2", "good")
    _restore(raw, good_backup)
    _put(state, b"v1")
    _put(state, b"v2")
    files = {n: witness.path_of(BLOB_KIND, blob_subject(NS, n)) for n in ("good", NAME)}
    before = {n: p.read_bytes() for n, p in files.items()}
    cases: list[tuple[list[str], str]] = [([], "no sealed state"), (["absent"], "no sealed state")]
    for names, why in cases:
        with pytest.raises(AcceptRefused, match=why):
            state.accept(namespace=NS, names=names)
    # A forged blob (poisoned version, or any edited byte) is never accepted, even in a batch
    # with a good one: nothing at all is re-anchored.
    _poison(raw, NAME, 1)
    with pytest.raises(AcceptRefused, match="does not authenticate") as caught:
        state.accept(namespace=NS, names=["good", NAME])
    assert caught.value.exit_code == 2 and "\n" not in str(caught.value)
    assert {n: p.read_bytes() for n, p in files.items()} == before
    with pytest.raises(StaleBlob):
        state.get(namespace=NS, name="good")
    with pytest.raises(AcceptRefused, match="no freshness witness"):
        SealedState(store, lambda _ref: wrapper, None).accept(namespace=NS, names=["good"])
    read_only = DirectoryWitness(witness.directory, None, {})
    with pytest.raises(WitnessError, match="signing key"):
        SealedState(store, lambda _ref: wrapper, read_only).accept(namespace=NS, names=["good"])
    assert {n: p.read_bytes() for n, p in files.items()} == before


def test_accept_recovers_from_a_lost_signing_key(
    state: SealedState, store: SealedStateStore, wrapper: LocalKeyWrapper, tmp_path: Path
) -> None:
    _put(state, b"v1")
    _put(state, b"v2")
    new_key = SealedState(
        store,
        lambda _ref: wrapper,
        DirectoryWitness(tmp_path / "witness", FileSigner(Ed25519PrivateKey.generate())),
    )
    with pytest.raises(WitnessError, match="not pinned"):
        new_key.get(namespace=NS, name=NAME)
    (done,) = new_key.accept(namespace=NS, names=[NAME])
    assert (done.previous, done.previous_state, done.version) == (None, "unverifiable", 2)
    assert new_key.get(namespace=NS, name=NAME) == b"v2"
    _put(new_key, b"v3")
    assert new_key.get(namespace=NS, name=NAME) == b"v3"


def test_witness_reset_replaces_whatever_the_order(tmp_path: Path, signer: FileSigner) -> None:
    witness = DirectoryWitness(tmp_path / "w", signer)
    witness.advance("blob", "a", 5, {"v": 5})
    assert witness.advance("blob", "a", 2, {"v": 2}).order == 5  # advance never goes back
    assert witness.reset("blob", "a", 2, {"v": 2}).order == 2
    point = witness.latest("blob", "a")
    assert point is not None and (point.order, point.body) == (2, {"v": 2})
    with pytest.raises(WitnessError, match="signing key"):
        DirectoryWitness(tmp_path / "w", None, {signer.key_id: signer.public_key}).reset("blob", "a", 9, {})
    assert witness.latest("blob", "a") == point
