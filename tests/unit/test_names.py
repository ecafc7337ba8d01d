"""Allowed names (sealing.names): refused at every entry of the sealing layer, nothing stored."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import update

from sealing.keywrap import LocalKeyWrapper
from sealing.names import MAX_NAME_CHARS, InvalidName, check_generation_id, check_name, check_namespace
from sealing.state import SealedState
from sealing.store import NewBlob, SealedStateStore, sealed_blobs

HOSTILE = [
    "",
    "a\nb",
    "item\n",
    "x" * 1000,
    "x" * (MAX_NAME_CHARS + 1),
    "../etc",
    "..",
    ".",
    ".hidden",
    "a/b",
    "a b",
    "a\x00b",
    "[red]x[/]",
    "é",
    "-x",
    "--name",
]
GOOD = ["a", "item-1", "App_v1.2", "x" * MAX_NAME_CHARS, "_x", "a..b", "9"]


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_names_are_refused(value: str) -> None:
    for check in (check_name, check_namespace):
        with pytest.raises(InvalidName) as caught:
            check(value)
        assert caught.value.exit_code == 2
        message = str(caught.value)
        assert "\n" not in message and len(message) < 200


@pytest.mark.parametrize("value", GOOD)
def test_allowed_names(value: str) -> None:
    assert check_name(value) == value and check_namespace(value) == value


def test_generation_ids() -> None:
    assert check_generation_id("app-v1:2.3_x") == "app-v1:2.3_x"
    for bad in ("", "-x", "a\n", "a/b", "g" * 129, "../etc"):
        with pytest.raises(InvalidName):
            check_generation_id(bad)
    with pytest.raises(InvalidName, match="must be a string"):
        check_name(5)


@pytest.fixture
def state(tmp_path: Path) -> tuple[SealedState, SealedStateStore]:
    store = SealedStateStore(f"sqlite:///{tmp_path / 'state.db'}")
    store.put_generation("g1", "{}")
    wrapper = LocalKeyWrapper()
    return SealedState(store, lambda _ref: wrapper), store


def _count(store: SealedStateStore) -> int:
    return len(store.summaries())


@pytest.mark.parametrize("value", HOSTILE)
def test_sealed_state_refuses_hostile_names_and_stores_nothing(
    state: tuple[SealedState, SealedStateStore], value: str
) -> None:
    sealed, store = state
    with pytest.raises(InvalidName):
        sealed.put(namespace="default", name=value, data=b"d", key_ref="local:k", generation="g1")
    with pytest.raises(InvalidName):
        sealed.put(namespace=value, name="item", data=b"d", key_ref="local:k", generation="g1")
    with pytest.raises(InvalidName):
        sealed.get(namespace=value, name="item")
    with pytest.raises(InvalidName):
        sealed.get(namespace="default", name=value)
    with pytest.raises(InvalidName):
        sealed.delete(namespace="default", name=value)
    with pytest.raises(InvalidName):
        sealed.accept(namespace="default", names=[value])
    assert _count(store) == 0


@pytest.mark.parametrize("value", HOSTILE)
def test_store_writes_refuse_hostile_names(tmp_path: Path, value: str) -> None:
    store = SealedStateStore(f"sqlite:///{tmp_path / 'state.db'}")
    good = {"namespace": "ns", "name": "n", "key_ref": "local:k", "key_version": 1, "generation": "g1"}
    for field in ("namespace", "name", "generation"):
        with pytest.raises(InvalidName):
            store.insert(**(good | {field: value}), blob=b"x")  # type: ignore[arg-type]
        with pytest.raises(InvalidName):
            store.insert_many([NewBlob(**(good | {field: value}), blob=b"x")])  # type: ignore[arg-type]
    assert _count(store) == 0


def test_a_row_stored_with_an_old_name_stays_listed_but_is_refused_by_name(
    state: tuple[SealedState, SealedStateStore],
) -> None:
    sealed, store = state
    record = sealed.put(namespace="default", name="item", data=b"d", key_ref="local:k", generation="g1")
    with store.transaction("plant a pre-rule name", write=True) as conn:
        conn.execute(update(sealed_blobs).where(sealed_blobs.c.blob_id == record.blob_id).values(name="a\nb"))
    assert [s.name for s in store.summaries()] == ["a\nb"]
    assert store.get(record.blob_id).name == "a\nb"
    with pytest.raises(InvalidName):
        sealed.get(namespace="default", name="a\nb")
