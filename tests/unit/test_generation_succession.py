"""Successions in the store's generation registry (schema version 9): which generation
supersedes which, recorded with the new generation's registration; every refusal stores
nothing (neither the succession nor the new generation)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator

import pytest
from sqlalchemy import inspect

from sealing.store import SealedStateStore, SuccessionRefused, migrate


@pytest.fixture
def store(store_url: str) -> Iterator[SealedStateStore]:
    with SealedStateStore(store_url) as s:
        yield s


def doc(generation_id: str) -> str:
    return json.dumps({"id": generation_id})


def snapshot(store: SealedStateStore) -> tuple[list[str], dict[str, str]]:
    return [g for g, _, _ in store.list_generations()], store.list_successions()


def test_a_succession_is_recorded_with_the_registration_and_is_idempotent(store: SealedStateStore) -> None:
    assert store.put_generation("v1", doc("v1")) is True
    assert store.put_generation("v2", doc("v2"), supersedes="v1") is True
    assert store.generation_succession("v2") == ("v1", None)
    assert store.generation_succession("v1") == (None, "v2")
    assert store.list_successions() == {"v1": "v2"}
    # The same registration again changes nothing and is not refused.
    assert store.put_generation("v2", doc("v2"), supersedes="v1") is False
    assert store.list_successions() == {"v1": "v2"}
    # A registered generation can be given its predecessor later; chains go on.
    assert store.put_generation("v3", doc("v3")) is True
    assert store.put_generation("v3", doc("v3"), supersedes="v2") is False
    assert store.list_successions() == {"v1": "v2", "v2": "v3"}
    assert store.generation_succession("v2") == ("v1", "v3")
    assert store.generation_succession("v9") == (None, None)


@pytest.mark.parametrize(
    ("new", "old", "message"),
    [
        ("v4", "v9", "generation v9 is not registered"),
        ("v4", "v4", "generation v4 cannot supersede itself"),
        ("v2", "v2", "generation v2 cannot supersede itself"),
        ("v4", "v1", "generation v1 is already superseded by v2"),
        ("v3", "x1", "generation v3 already supersedes v2"),
        ("v1", "v3", r"generation v1 cannot supersede v3: that would be a cycle \(v1 -> v3 -> v2 -> v1\)"),
        ("x1", "v3", None),  # the one that works, for contrast
    ],
)
def test_refused_successions_store_nothing(
    store: SealedStateStore, new: str, old: str, message: str | None
) -> None:
    for gid in ("v1", "x1"):
        store.put_generation(gid, doc(gid))
    store.put_generation("v2", doc("v2"), supersedes="v1")
    store.put_generation("v3", doc("v3"), supersedes="v2")
    before = snapshot(store)
    if message is None:
        store.put_generation(new, doc(new), supersedes=old)
        assert store.list_successions() == before[1] | {old: new}
        return
    with pytest.raises(SuccessionRefused, match=f"^{message}"):
        store.put_generation(new, doc(new), supersedes=old)
    assert snapshot(store) == before  # a new generation (v4) was not registered either


def test_two_successors_at_once_record_one(store_url: str) -> None:
    with SealedStateStore(store_url) as s:
        s.put_generation("v1", doc("v1"))
    outcomes: list[str] = []
    barrier = threading.Barrier(4)

    def register(new: str) -> None:
        with SealedStateStore(store_url) as s:
            barrier.wait()
            try:
                s.put_generation(new, doc(new), supersedes="v1")
                outcomes.append("ok")
            except SuccessionRefused as exc:
                outcomes.append(str(exc))

    threads = [threading.Thread(target=register, args=(f"v2-{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count("ok") == 1, outcomes
    with SealedStateStore(store_url) as s:
        successions = s.list_successions()
        assert list(successions) == ["v1"]
        # The refused registrations stored no generation either.
        assert sorted(g for g, _, _ in s.list_generations()) == ["v1", successions["v1"]]


def test_migration_10_creates_the_successions_table(store_url: str) -> None:
    assert migrate(store_url, 9) == 9
    from sqlalchemy import create_engine

    engine = create_engine(store_url)
    try:
        with engine.connect() as conn:
            assert not inspect(conn).has_table("generation_successions")
        with SealedStateStore(store_url) as s:
            assert s.schema_version >= 10
            s.put_generation("v1", doc("v1"))
            s.put_generation("v2", doc("v2"), supersedes="v1")
        with engine.connect() as conn:
            assert inspect(conn).has_table("generation_successions")
    finally:
        engine.dispose()
