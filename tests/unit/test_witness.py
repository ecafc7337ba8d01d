"""The signing primitives and the freshness witness (sealing.signing, sealing.witness)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sealing.signing import (
    FileSigner,
    SigningError,
    check_fingerprint,
    fingerprint,
    key_id_of,
    pinned_keys,
    verify_digest,
)
from sealing.witness import DirectoryWitness, WitnessError

DIGEST = bytes(range(32))


def test_file_signer_signature_verifies_and_binds_the_digest() -> None:
    signer = FileSigner(Ed25519PrivateKey.generate())
    sig = signer.sign(DIGEST)
    assert verify_digest(signer.public_key, sig, DIGEST)
    assert not verify_digest(signer.public_key, sig, bytes(32))
    assert not verify_digest(FileSigner(Ed25519PrivateKey.generate()).public_key, sig, DIGEST)
    with pytest.raises(SigningError):
        signer.sign(b"short")


def test_p256_keys_verify_prehashed_signatures() -> None:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import utils

    private = ec.generate_private_key(ec.SECP256R1())
    sig = private.sign(DIGEST, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
    assert verify_digest(private.public_key(), sig, DIGEST)
    assert not verify_digest(private.public_key(), sig, bytes(32))
    with pytest.raises(SigningError):
        key_id_of(ec.generate_private_key(ec.SECP384R1()).public_key())


def test_only_pinned_fingerprints_are_trusted() -> None:
    mine = Ed25519PrivateKey.generate().public_key()
    planted = Ed25519PrivateKey.generate().public_key()
    assert fingerprint(mine).startswith("sha256:")
    assert fingerprint(mine)[7:23] == key_id_of(mine)
    trusted = pinned_keys([mine, planted], [fingerprint(mine).upper().replace("SHA256:", "sha256:")])
    assert list(trusted) == [key_id_of(mine)]
    for bad in ("", "sha256:abc", "md5:" + "0" * 64, 5, "sha256:" + "g" * 64):
        with pytest.raises(SigningError):
            check_fingerprint(bad)


def test_checkpoints_only_move_forward(tmp_path: Path) -> None:
    witness = DirectoryWitness(tmp_path / "w", FileSigner(Ed25519PrivateKey.generate()))
    assert witness.latest("blob", "ns/a") is None
    assert witness.advance("blob", "ns/a", 2, {"id": "x"}).order == 2
    kept = witness.advance("blob", "ns/a", 1, {"id": "old"})
    assert (kept.order, kept.body) == (2, {"id": "x"})
    latest = witness.latest("blob", "ns/a")
    assert latest is not None and latest.order == 2
    assert (tmp_path / "w").stat().st_mode & 0o777 == 0o700
    assert witness.path_of("blob", "ns/a").stat().st_mode & 0o777 == 0o600


def test_edited_moved_or_foreign_checkpoints_are_refused(tmp_path: Path) -> None:
    signer = FileSigner(Ed25519PrivateKey.generate())
    witness = DirectoryWitness(tmp_path, signer)
    witness.advance("blob", "a", 5, {"v": 1})
    witness.advance("blob", "b", 1, {"v": 1})
    path_a, path_b = witness.path_of("blob", "a"), witness.path_of("blob", "b")
    # moved: b's file replaced by a's (a higher order under another subject)
    path_b.write_bytes(path_a.read_bytes())
    with pytest.raises(WitnessError, match="another subject"):
        witness.latest("blob", "b")
    # edited: order lowered
    doc = json.loads(path_a.read_text())
    doc["statement"]["order"] = 1
    path_a.write_text(json.dumps(doc))
    with pytest.raises(WitnessError, match="bad signature"):
        witness.latest("blob", "a")
    with pytest.raises(WitnessError):  # a corrupt checkpoint is never silently replaced
        witness.advance("blob", "a", 9, {"v": 2})
    # re-signed by a key that is not pinned
    other = DirectoryWitness(tmp_path / "other", FileSigner(Ed25519PrivateKey.generate()))
    other.advance("blob", "a", 1, {"v": 0})
    path_a.write_bytes(other.path_of("blob", "a").read_bytes())
    with pytest.raises(WitnessError, match="not pinned"):
        DirectoryWitness(tmp_path, None).latest("blob", "a")
    path_a.write_bytes(b"not json")
    with pytest.raises(WitnessError, match="not valid JSON"):
        witness.latest("blob", "a")


def test_a_symlinked_checkpoint_is_not_followed(tmp_path: Path) -> None:
    witness = DirectoryWitness(tmp_path, FileSigner(Ed25519PrivateKey.generate()))
    witness.advance("blob", "a", 1, {})
    path = witness.path_of("blob", "a")
    target = tmp_path / "elsewhere.json"
    target.write_bytes(path.read_bytes())
    path.unlink()
    path.symlink_to(target)
    with pytest.raises(WitnessError, match="cannot read"):
        witness.latest("blob", "a")


def test_read_only_witness_refuses_to_write_and_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(WitnessError, match="without a signing key"):
        DirectoryWitness(tmp_path, None).advance("blob", "a", 1, {})
    witness = DirectoryWitness(tmp_path, FileSigner(Ed25519PrivateKey.generate()))
    for kind, subject, order in (("Blob", "a", 1), ("blob", "", 1), ("blob", "a", -1), ("../x", "a", 1)):
        with pytest.raises(ValueError):
            witness.advance(kind, subject, order, {})


def test_concurrent_advances_keep_the_highest(tmp_path: Path) -> None:
    witness = DirectoryWitness(tmp_path, FileSigner(Ed25519PrivateKey.generate()))
    threads = [
        threading.Thread(target=witness.advance, args=("audit-head", "log", n, {"n": n}))
        for n in range(1, 41)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    latest = witness.latest("audit-head", "log")
    assert latest is not None and (latest.order, latest.body) == (40, {"n": 40})
