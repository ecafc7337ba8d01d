"""`rekey state put` of large inputs, against a real OpenBao and a real SQLite store: a size limit
(max_blob_bytes) refused before the input is read, and a peak memory of about twice the input
(the plaintext and the blob while sealing; SQLite's own two copies of the blob while writing it,
the blob itself handed over), not three to eight times; the peak also on a real PostgreSQL."""

from __future__ import annotations

import io
import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from rekey.config import DEFAULT_MAX_BLOB_BYTES, MAX_BLOB_BYTES
from sealing.store import SealedStateStore
from tests.fixtures.cli import MANIFEST, run_cli
from tests.fixtures.openbao import OpenBao

pytestmark = pytest.mark.integration

KEY = "vault:put-size"
Run = Callable[..., tuple[int, str, str]]


@pytest.fixture
def home(tmp_path: Path, openbao: OpenBao, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("REKEY_HOME", str(home))
    monkeypatch.setenv("REKEY_VAULT_ADDR", openbao.addr)
    monkeypatch.setenv("REKEY_VAULT_TOKEN", openbao.token)
    monkeypatch.delenv("REKEY_MAX_BLOB_BYTES", raising=False)
    return home


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str]) -> Run:
    return lambda *args: run_cli(capsys, *args)


@pytest.fixture
def ready(home: Path, tmp_path: Path, run: Run) -> Path:
    assert run("key", "create", KEY)[0] == 0
    manifest = tmp_path / "v1.yaml"
    manifest.write_text(yaml.safe_dump(MANIFEST))
    assert run("generation", "register", str(manifest))[0] == 0
    return home


def put_args(source: str, name: str = "item") -> list[str]:
    return ["state", "put", "--key", KEY, "--generation", "app-v1", "--name", name, "--in", source]


def rows(home: Path) -> list[tuple[object, ...]]:
    with sqlite3.connect(home / "state.db") as conn:
        return conn.execute("SELECT name, row_version, blob FROM sealed_blobs ORDER BY name").fetchall()


def one_error_line(code: int, err: str, *texts: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for text in texts:
        assert text in lines[0], err


def test_the_default_limit_refuses_a_larger_file_before_reading_it(
    ready: Path, tmp_path: Path, run: Run
) -> None:
    small = tmp_path / "small.bin"
    small.write_bytes(b"kept")
    assert run(*put_args(str(small)))[0] == 0
    before = rows(ready)
    # A sparse file of 1 TiB: reading it would not end in a test's time (or memory).
    huge = tmp_path / "huge.bin"
    with huge.open("wb") as handle:
        handle.truncate(1 << 40)
    code, _, err = run(*put_args(str(huge)))
    one_error_line(code, err, str(huge), f"{1 << 40} bytes", str(DEFAULT_MAX_BLOB_BYTES), "max_blob_bytes")
    assert rows(ready) == before


def test_a_configured_limit_holds_for_files_and_stdin(
    ready: Path, tmp_path: Path, run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    (ready / "rekey.toml").write_text("max_blob_bytes = 1000\n")
    at_limit = tmp_path / "at.bin"
    at_limit.write_bytes(os.urandom(1000))
    code, out, err = run(*put_args(str(at_limit)))
    assert code == 0, err
    assert "(1000 bytes)" in out
    before = rows(ready)
    over = tmp_path / "over.bin"
    over.write_bytes(os.urandom(1001))
    code, _, err = run(*put_args(str(over)))
    one_error_line(code, err, "1001 bytes", "limit of 1000", "max_blob_bytes")
    # stdin has no size: refused once more than the limit has arrived.
    with over.open("rb") as raw:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(raw))
        code, _, err = run(*put_args("-"))
    one_error_line(code, err, "stdin", "more than 1000 bytes", "max_blob_bytes")
    assert rows(ready) == before
    # The environment overrides the file.
    monkeypatch.setenv("REKEY_MAX_BLOB_BYTES", "2000")
    assert run(*put_args(str(over)))[0] == 0


@pytest.mark.parametrize("value", ["0", "-1", "lots", str(MAX_BLOB_BYTES + 1)])
def test_a_bad_limit_is_an_error_naming_the_setting(
    ready: Path, tmp_path: Path, run: Run, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    source = tmp_path / "in.bin"
    source.write_bytes(b"x")
    monkeypatch.setenv("REKEY_MAX_BLOB_BYTES", value)
    code, _, err = run(*put_args(str(source)))
    one_error_line(code, err, "max_blob_bytes")
    monkeypatch.delenv("REKEY_MAX_BLOB_BYTES")
    assert not any(name == "item" for name, *_ in rows(ready))


# Runs the CLI in a fresh interpreter: the peak resident memory of `state put` above what the
# process held before it (Linux: /proc/self/clear_refs resets the peak, VmHWM reports it).
PEAK_RUNNER = """
import sys
from rekey.cli import main
import rekey.cli.state, sealing.state, sealing.store, kms_adapters.vault_transit  # before the baseline


def peak() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))


with open("/proc/self/clear_refs", "w") as refs:
    refs.write("5")
base = peak()
try:
    main(sys.argv[1:])
except SystemExit as exc:
    if exc.code:
        raise
print(peak() - base)
"""

SIZE = 50 * 1024 * 1024
#: Twice the input at most. Sealing holds the plaintext and the blob; writing (on SQLite) holds
#: the database's copy of the blob, taken from the handed-over one, which is then freed, and the
#: row built from that copy (sealing.store.BlobHandover). Replacing a name fetches only the head
#: of the blob it replaces, though SQLite loads the whole value to cut it (with the plaintext:
#: twice again). Measured 2.07 (2.02 at 200 MiB); the margin is the allocator's and the header's.
#: Before: 3x with the blob bound as a parameter (held by Python, bound, and in the row), and
#: before that 4x for a new name and 8x when replacing one. PostgreSQL gets the blob in the write
#: itself: 2.05 for a new name, 2.06 replacing it (before: 3.05, and 7.04 with the replaced blob
#: read whole).
BOUND = 2.5


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset")
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_put_peaks_at_about_twice_the_input(
    backend: str, request: pytest.FixtureRequest, home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{home.resolve() / 'state.db'}"
    if backend == "postgresql":
        url = request.getfixturevalue("postgres_url")
        monkeypatch.setenv("REKEY_STORE_URL", url)
    request.getfixturevalue("ready")
    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(SIZE))
    peaks = []
    for _ in ("new name", "replacing it"):
        done = subprocess.run(
            [sys.executable, "-c", PEAK_RUNNER, *put_args(str(source), name="big")],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "REKEY_MAX_BLOB_BYTES": str(SIZE)},
        )
        assert done.returncode == 0, done.stderr
        peaks.append(int(done.stdout.strip().splitlines()[-1]) / SIZE)
    assert all(peak < BOUND for peak in peaks), peaks
    with SealedStateStore(url, create=False) as store:
        assert [s.row_version for s in store.summaries() if s.name == "big"] == [2]
