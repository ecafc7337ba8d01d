"""Issue 12 finding 2: a key reference planted in the store must not reach any other OpenBao path.

A record's key ref chooses the wrapper before the blob is authenticated, so someone with write
access to the store could plant ``vault:x/../../../sys/seal`` (which sealed OpenBao when read)
or ``vault:x/../../keys/orders/rotate`` (which rotated key ``orders``). Each test plants such a
record directly in the store, reads it through ``rekey state get`` and checks that the read is
refused with a typed error and that OpenBao is untouched.

The OpenBao here is this module's own (not the session one): on code with the hole the first
test seals it.
"""

from __future__ import annotations

import base64
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from emulators.servers import OpenBao, openbao_dev
from kms_adapters.errors import InvalidRequest
from kms_adapters.keyref import InvalidKeyRef
from kms_adapters.release import MemoryReleasePolicyStore
from kms_adapters.vault_transit import VaultTransitAdapter
from rekey.backends import adapter_for
from rekey.config import load_settings
from sealing import envelope
from sealing.keywrap import WrappedKey
from sealing.state import SealedState
from sealing.store import SealedStateStore
from tests.fixtures.cli import MANIFEST, run_cli

pytestmark = pytest.mark.integration


HOSTILE_REFS = ["vault:x/../../../sys/seal", "vault:x/../../keys/orders/rotate"]


@pytest.fixture(scope="module")
def bao() -> Iterator[OpenBao]:
    with openbao_dev() as server:
        server.client().secrets.transit.create_key(name="orders", mount_point="transit")
        yield server


@pytest.fixture
def home(tmp_path: Path, bao: OpenBao, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("REKEY_HOME", str(home))
    monkeypatch.setenv("REKEY_VAULT_ADDR", bao.addr)
    monkeypatch.setenv("REKEY_VAULT_TOKEN", bao.token)
    monkeypatch.setenv("COLUMNS", "200")
    return home


@dataclass
class FakeWrapper:
    """Builds a well-formed blob whose header names ``key_ref`` (what a store writer can do)."""

    key_ref: str

    def wrap(self, dek: bytes) -> WrappedKey:
        return WrappedKey(b"vault:v1:" + base64.b64encode(os.urandom(60)), 1)

    def unwrap(self, wrapped: bytes) -> bytes:
        raise AssertionError("not used")

    def rewrap(self, wrapped: bytes) -> WrappedKey:
        raise AssertionError("not used")

    def version_of(self, wrapped: bytes) -> int:
        return 1


def plant(home: Path, key_ref: str, name: str = "evil") -> None:
    """Write a record naming ``key_ref`` straight into the store, bypassing every API check."""
    blob_id = uuid.uuid4()
    blob = envelope.seal(
        b"x", FakeWrapper(key_ref), namespace="default", name=name, generation="app-v1", blob_id=blob_id
    )
    store = SealedStateStore(load_settings(home, environ={}).store_url)
    try:
        store.insert(
            blob_id=str(blob_id),
            namespace="default",
            name=name,
            key_ref=key_ref,
            key_version=1,
            generation="app-v1",
            blob=bytes(blob),
        )
    finally:
        store.close()


def assert_openbao_untouched(bao: OpenBao) -> None:
    client = bao.client()
    assert not client.sys.is_sealed(), "a planted key ref sealed OpenBao"
    key = client.secrets.transit.read_key(name="orders", mount_point="transit")["data"]
    assert key["latest_version"] == 1, "a planted key ref rotated transit key orders"


@pytest.fixture
def rekey(capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str, str]]:
    def run(*args: str) -> tuple[int, str, str]:
        return run_cli(capsys, *args)

    return run


@pytest.mark.parametrize("key_ref", HOSTILE_REFS)
def test_planted_key_ref_is_refused_on_read(
    home: Path, tmp_path: Path, bao: OpenBao, key_ref: str, rekey: Callable[..., tuple[int, str, str]]
) -> None:
    manifest = tmp_path / "v1.yaml"
    manifest.write_text(yaml.safe_dump(MANIFEST))
    assert rekey("generation", "register", str(manifest))[0] == 0
    source = tmp_path / "in"
    source.write_bytes(b"legit state")
    assert (
        rekey(
            "state",
            "put",
            "--key",
            "vault:orders",
            "--generation",
            "app-v1",
            "--name",
            "ok",
            "--in",
            str(source),
        )[0]
        == 0
    )
    plant(home, key_ref)

    code, _, err = rekey("state", "get", "--name", "evil", "--out", str(tmp_path / "out"))
    assert_openbao_untouched(bao)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: key reference "), err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()

    # The library read path (what workers use) refuses it with the typed error too.
    settings = load_settings(home)
    store = SealedStateStore(settings.store_url)
    try:
        state = SealedState(store, lambda ref: adapter_for(settings, ref))
        with pytest.raises(InvalidKeyRef):
            state.get(namespace="default", name="evil")
        assert state.get(namespace="default", name="ok") == b"legit state"
    finally:
        store.close()
    assert_openbao_untouched(bao)


@pytest.mark.parametrize("name", ["x/../../../sys/seal", "x/../../keys/orders/rotate", "../orders", "a/b"])
def test_transit_adapter_refuses_a_name_that_is_not_one_safe_segment(bao: OpenBao, name: str) -> None:
    with pytest.raises(InvalidKeyRef):
        VaultTransitAdapter(bao.client(), name, release_store=MemoryReleasePolicyStore())
    assert_openbao_untouched(bao)


@pytest.mark.parametrize("mount", ["transit/../sys", "../sys", "transit/", "", "a b"])
def test_transit_adapter_refuses_an_unsafe_mount(bao: OpenBao, mount: str) -> None:
    with pytest.raises(InvalidRequest):
        VaultTransitAdapter(
            bao.client(), "orders", mount_point=mount, release_store=MemoryReleasePolicyStore()
        )


def test_allowed_keys_refuses_a_well_formed_ref_the_configuration_does_not_know(
    home: Path, tmp_path: Path, bao: OpenBao, rekey: Callable[..., tuple[int, str, str]]
) -> None:
    home.mkdir(parents=True)
    (home / "rekey.toml").write_text('allowed_keys = ["vault:orders"]\n')
    manifest = tmp_path / "v1.yaml"
    manifest.write_text(yaml.safe_dump(MANIFEST))
    assert rekey("generation", "register", str(manifest))[0] == 0
    source = tmp_path / "in"
    source.write_bytes(b"legit state")
    assert (
        rekey(
            "state",
            "put",
            "--key",
            "vault:orders",
            "--generation",
            "app-v1",
            "--name",
            "ok",
            "--in",
            str(source),
        )[0]
        == 0
    )
    code, _, err = rekey(
        "state", "put", "--key", "vault:other", "--generation", "app-v1", "--name", "o", "--in", str(source)
    )
    assert code == 2 and "not in allowed_keys" in err, err
    plant(home, "vault:other")
    code, _, err = rekey("state", "get", "--name", "evil", "--out", str(tmp_path / "out"))
    assert code == 2 and "not in allowed_keys" in err, err
    assert not (tmp_path / "out").exists()
    code, _, err = rekey("state", "get", "--name", "ok", "--out", str(tmp_path / "out"))
    assert code == 0, err
    assert (tmp_path / "out").read_bytes() == b"legit state"
    assert_openbao_untouched(bao)
