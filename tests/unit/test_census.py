"""The blob census: `SealedStateStore.census` (on SQLite and PostgreSQL) counts the blobs each
KMS key version still wraps and each generation holds, hardware-sealed blobs under their
generation only; `rekey key show` and `rekey generation list` print it (table and --json), also
after a rotation moved blobs to a new version, and the numbers are what `rekey state list`
lists. `key show` without a store shows 0 and creates none."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import yaml
from sqlalchemy import event
from sqlalchemy.engine import Engine

import rekey.cli.key
from kms_adapters.contract import KeyInfo, KeyVersionInfo
from sealing import envelope
from sealing.keywrap import LocalKeyWrapper, RewrapOutcome, WrappedKey
from sealing.rotation import rewrap_range
from sealing.store import NewBlob, SealedStateStore
from tests.fixtures.cli import MANIFEST, run_cli

V2 = MANIFEST | {"id": "app-v2", "measurement": "33" * 32, "svn": 3}
KEY = "vault:orders"


@pytest.fixture
def store(store_url: str) -> Iterator[SealedStateStore]:
    with SealedStateStore(store_url) as s:
        yield s


def _blob(namespace: str, name: str, key_ref: str, version: int, generation: str) -> NewBlob:
    return NewBlob(namespace, name, key_ref, version, generation, b"\x00sealed-" + name.encode())


def _tee(name: str, generation: str, host: str = "host-a") -> NewBlob:
    return NewBlob("ns", name, "tee:sim", 0, generation, b"\x00tee", kind="tee", host=host)


def test_census_counts_per_key_version_and_per_generation(store: SealedStateStore) -> None:
    assert (store.census().by_key_version, store.census().by_generation) == ({}, {})
    store.insert_many(
        [_blob("ns", f"o{i}", KEY, 1 + i % 3, "g1" if i < 4 else "g2") for i in range(7)]
        + [_blob("other", "o0", "aws:users", 1, "g2"), _tee("t0", "g1"), _tee("t1", "g3", "host-b")]
    )
    census = store.census()
    assert census.by_key_version == {(KEY, 1): 3, (KEY, 2): 2, (KEY, 3): 2, ("aws:users", 1): 1}
    assert census.by_generation == {"g1": 5, "g2": 4, "g3": 1}  # the tee blobs count here only
    assert census.of_key(KEY) == {1: 3, 2: 2, 3: 2} and census.of_key("vault:none") == {}
    # The same blobs as the listing, and the same numbers as the per-key counts the sweeps use.
    listed = [s for s in store.summaries() if s.kind == "kms"]
    assert Counter((s.key_ref, s.key_version) for s in listed) == census.by_key_version
    assert Counter(s.generation for s in store.summaries()) == census.by_generation
    assert census.of_key(KEY) == store.count_by_key_version(KEY)
    moved = store.get_by_name("ns", "o0")
    store.compare_and_swap(moved.blob_id, moved.row_version, blob=moved.blob, key_version=4, generation="g3")
    store.delete(store.get_by_name("ns", "t0").blob_id, 1)
    after = store.census()
    assert after.of_key(KEY) == {1: 2, 2: 2, 3: 2, 4: 1}
    assert after.by_generation == {"g1": 3, "g2": 4, "g3": 2}


def test_the_census_reads_indexes_not_rows_on_sqlite(tmp_path: Path) -> None:
    """The census statement scans the two sweep indexes (covering) and looks rows up only for
    the ``tee:`` key refs: no scan of the table, which would read every blob's bytes."""
    statements: list[tuple[str, object]] = []

    def seen(_conn: object, _cursor: object, statement: str, params: object, *_rest: object) -> None:
        statements.append((statement, params))

    with SealedStateStore(f"sqlite:///{tmp_path / 'state.db'}") as store:
        store.insert_many([_blob("ns", "o", KEY, 1, "g1"), _tee("t", "g1")])
        event.listen(Engine, "before_cursor_execute", seen)
        try:
            census = store.census()
        finally:
            event.remove(Engine, "before_cursor_execute", seen)
        assert (census.by_key_version, census.by_generation) == ({(KEY, 1): 1}, {"g1": 2})
        ((statement, params),) = [s for s in statements if "GROUP BY" in s[0]]
        with store.transaction("plan") as conn:
            plan = [row[-1] for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, params)]  # type: ignore[arg-type]
    reads = [step for step in plan if step.startswith(("SCAN", "SEARCH"))]
    assert len(reads) == 4, plan
    assert all("COVERING INDEX" in step or step.endswith("(key_ref=?)") for step in reads), plan


class _Kms:
    """An in-process Transit-like key with the adapter's batch call (for `rewrap_range`)."""

    def __init__(self) -> None:
        self.key = LocalKeyWrapper(KEY)

    @property
    def key_ref(self) -> str:
        return KEY

    def rewrap(self, wrapped: bytes) -> WrappedKey:
        return self.key.rewrap(wrapped)

    def rewrap_batch(self, wrapped: Sequence[bytes]) -> list[RewrapOutcome]:
        return [RewrapOutcome(i, wrapped=self.key.rewrap(w)) for i, w in enumerate(wrapped)]


class _Adapter:
    """What `rekey key show` asks of a backend: the key's versions (1 and 2, 2 primary)."""

    def describe(self) -> KeyInfo:
        versions = (KeyVersionInfo(1, "enabled", False), KeyVersionInfo(2, "enabled", True))
        return KeyInfo(KEY, "aes256-gcm96", "native", versions)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("REKEY_HOME", str(home))
    monkeypatch.setenv("COLUMNS", "220")
    monkeypatch.setattr(rekey.cli.key, "adapter_for", lambda _settings, _ref: _Adapter())
    for manifest in (MANIFEST, V2):
        (tmp_path / f"{manifest['id']}.yaml").write_text(yaml.safe_dump(manifest))
    return home


def _shown(capsys: pytest.CaptureFixture[str]) -> tuple[dict[int, int], dict[int, str]]:
    """``key show``: blobs per version from --json, and from the table (its last column)."""
    code, out, err = run_cli(capsys, "key", "show", KEY, "--json")
    assert code == 0, err
    as_json = {v["version"]: v["blobs"] for v in json.loads(out)["versions"]}
    code, out, err = run_cli(capsys, "key", "show", KEY)
    assert code == 0 and "blobs" in out.splitlines()[1], out
    rows = {int(line.split()[0]): line.split()[-1] for line in out.splitlines()[2:]}
    return as_json, rows


def _listed(capsys: pytest.CaptureFixture[str]) -> dict[str, int]:
    code, out, err = run_cli(capsys, "generation", "list", "--json")
    assert code == 0, err
    blobs = {g["id"]: g["blobs"] for g in json.loads(out)}
    lines = run_cli(capsys, "generation", "list")[1].splitlines()
    assert lines[0].split()[-1] == "blobs", lines
    # Each row ends with its generation's count.
    assert {line.split()[0]: int(line.split()[-1]) for line in lines[1:]} == blobs, lines
    return blobs


def _state_listed(capsys: pytest.CaptureFixture[str]) -> tuple[Counter[int], Counter[str]]:
    code, out, err = run_cli(capsys, "state", "list", "--json")
    assert code == 0, err
    items = json.loads(out)
    by_version = Counter(i["key_version"] for i in items if i["kind"] == "kms" and i["key_ref"] == KEY)
    return by_version, Counter(i["generation"] for i in items)


def test_key_show_without_a_store_shows_0_and_creates_none(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    as_json, rows = _shown(capsys)
    assert as_json == {1: 0, 2: 0}
    assert rows == {1: "0", 2: "0"}
    assert not home.exists() or not (home / "state.db").exists()


def test_key_show_and_generation_list_count_the_blobs_before_and_after_a_rotation(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for generation in ("app-v1", "app-v2"):
        assert run_cli(capsys, "generation", "register", str(home.parent / f"{generation}.yaml"))[0] == 0
    kms = _Kms()
    rows = []
    for i in range(12):
        name, generation = f"n{i:02d}", "app-v1" if i < 8 else "app-v2"
        blob = bytes(envelope.seal(b"secret", kms.key, namespace="ns", name=name, generation=generation))
        rows.append(NewBlob("ns", name, KEY, 1, generation, blob, str(envelope.parse(blob).header.blob_id)))
    rows += [_tee("t0", "app-v2"), _tee("t1", "app-v2", "host-b")]
    with SealedStateStore(f"sqlite:///{home / 'state.db'}") as sealed_store:
        sealed_store.insert_many(rows)

    as_json, table_rows = _shown(capsys)
    assert as_json == {1: 12, 2: 0}  # version 2 exists at the KMS but wraps nothing yet
    assert table_rows == {1: "12", 2: "0"}
    assert _listed(capsys) == {"app-v1": 8, "app-v2": 6}
    by_version, by_generation = _state_listed(capsys)
    assert (by_version, by_generation) == (Counter({1: 12}), Counter({"app-v1": 8, "app-v2": 6}))

    kms.key.rotate()
    with SealedStateStore(f"sqlite:///{home / 'state.db'}") as sealed_store:
        done = rewrap_range(sealed_store, kms, below_version=2, start=None, end=None, limit=5, chunk=5)  # type: ignore[arg-type]
    assert done.rewrapped == 5  # a part of the sweep: both versions still wrap blobs

    as_json, table_rows = _shown(capsys)
    assert as_json == {1: 7, 2: 5}
    assert table_rows == {1: "7", 2: "5"}
    assert _listed(capsys) == {"app-v1": 8, "app-v2": 6}  # a re-wrap keeps the generation
    by_version, by_generation = _state_listed(capsys)
    assert dict(by_version) == as_json and dict(by_generation) == _listed(capsys)


def test_key_show_notes_blobs_under_a_version_the_key_does_not_list(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with SealedStateStore(f"sqlite:///{home / 'state.db'}") as sealed_store:
        sealed_store.insert_many([_blob("ns", "old", KEY, 7, "app-v1"), _blob("ns", "new", KEY, 2, "app-v1")])
    code, out, _ = run_cli(capsys, "key", "show", KEY, "--json")
    data = json.loads(out)
    assert code == 0 and {v["version"]: v["blobs"] for v in data["versions"]} == {1: 0, 2: 1}
    assert "stored blobs under versions the key does not list: 1 under version 7" in data["notes"]


def test_key_show_without_a_readable_store_says_so_in_a_note(
    home: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(
        "REKEY_STORE_URL", "postgresql+psycopg://rekey:hunter2@127.0.0.1:1/rekey?connect_timeout=2"
    )
    code, out, err = run_cli(capsys, "key", "show", KEY, "--json")
    data = json.loads(out)
    assert code == 0 and [v["blobs"] for v in data["versions"]] == [None, None], err
    assert [n for n in data["notes"] if n.startswith("blob counts unavailable: ")], data["notes"]
    assert "hunter2" not in out + err
    code, out, _ = run_cli(capsys, "key", "show", KEY)
    assert code == 0 and [line.split()[-1] for line in out.splitlines()[2:4]] == ["-", "-"], out
