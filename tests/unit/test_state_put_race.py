"""`SealedState.put` lets the plaintext go once it is sealed (so a large put does not hold it
during the store write); a put that loses a race re-seals from its own blob. Each test runs on
SQLite and on a real PostgreSQL (``store_url``)."""

from __future__ import annotations

from typing import Any

import pytest

from sealing import envelope
from sealing.keywrap import LocalKeyWrapper
from sealing.state import SealedState
from sealing.store import BlobRecord, BlobSummary, SealedStateStore
from sealing.witness import DirectoryWitness

NS, NAME, GEN = "default", "item", "gen-1"


class Racing:
    """A store whose next insert or compare-and-swap first lets ``other`` put ``value`` (the
    concurrent writer), then does its own."""

    def __init__(self, store: SealedStateStore, other: SealedState, value: bytes) -> None:
        self._store, self._other, self._value = store, other, value
        self.raced = 0

    def _race(self) -> None:
        if not self.raced:
            self.raced += 1
            self._other.put(namespace=NS, name=NAME, data=self._value, key_ref="vault:orders", generation=GEN)

    def insert(self, **kwargs: Any) -> BlobRecord | BlobSummary:
        self._race()
        return self._store.insert(**kwargs)

    def compare_and_swap(self, *args: Any, **kwargs: Any) -> BlobRecord | BlobSummary:
        self._race()
        return self._store.compare_and_swap(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def summary(store: SealedStateStore) -> BlobSummary:
    (only,) = store.summaries(NS)
    return only


@pytest.mark.parametrize("first", [None, b"before"])
def test_a_put_that_loses_a_race_still_stores_its_own_value_above_the_winner(
    store: SealedStateStore, wrapper: LocalKeyWrapper, witness: DirectoryWitness, first: bytes | None
) -> None:
    plain = SealedState(store, lambda _ref: wrapper, witness)
    if first is not None:
        plain.put(namespace=NS, name=NAME, data=first, key_ref="vault:orders", generation=GEN)
    racing = Racing(store, plain, b"the other writer's value")
    losing = SealedState(racing, lambda _ref: wrapper, witness)  # type: ignore[arg-type]
    record = losing.put(
        namespace=NS, name=NAME, data=b"ours, sealed again", key_ref="vault:orders", generation=GEN
    )
    assert racing.raced == 1
    assert plain.get(namespace=NS, name=NAME) == b"ours, sealed again"
    stored = store.get_by_name(NS, NAME)
    assert record == summary(store)  # the summary returned is of the row written
    # One above the winner's version (which was one above the first value's, if any).
    assert envelope.parse(stored.blob).header.version == (3 if first is not None else 2)
    assert envelope.plaintext_size(stored.blob) == len(b"ours, sealed again")


def test_replacing_a_value_returns_the_summary_of_the_row_written(
    store: SealedStateStore, wrapper: LocalKeyWrapper, witness: DirectoryWitness
) -> None:
    state = SealedState(store, lambda _ref: wrapper, witness)
    state.put(namespace=NS, name=NAME, data=b"one", key_ref="vault:orders", generation=GEN)
    record = state.put(
        namespace=NS, name=NAME, data=b"two" * 1000, key_ref="vault:orders", generation="gen-2"
    )
    assert record == summary(store)
    assert state.get(namespace=NS, name=NAME) == b"two" * 1000
