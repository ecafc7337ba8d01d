"""The coverage-guided fuzzers (atheris) over every evidence parser and verifier, one process per
harness (``tests/fuzz/fuzz_*.py``). ``make test`` runs each for a few hundred inputs, so a harness
that no longer starts or crashes at once fails the suite; ``make soak`` runs each for a bounded
time (``FUZZ_SECONDS``, default 120) or 1,000,000 inputs, whichever ends first. A crash (any
exception other than an ``AttestationError``) makes atheris exit non-zero and leave a
``crash-*`` file with the input, in the test's temporary directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HARNESSES = sorted(Path(__file__).parent.glob("fuzz_*.py"))
ROOT = Path(__file__).resolve().parents[2]


def _fuzz(harness: Path, tmp_path: Path, *args: str, timeout: float) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, str(harness), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    crashes = sorted(p.name for p in tmp_path.glob("crash-*"))
    assert result.returncode == 0 and not crashes, (crashes, result.stderr[-3000:])


def test_every_platform_has_a_harness() -> None:
    names = {p.stem for p in HARNESSES}
    assert {"fuzz_dcap", "fuzz_sev_snp", "fuzz_nitro", "fuzz_maa"} <= names, names


@pytest.mark.parametrize("harness", HARNESSES, ids=[p.stem for p in HARNESSES])
def test_harness_runs_clean_briefly(harness: Path, tmp_path: Path) -> None:
    _fuzz(harness, tmp_path, "-atheris_runs=300", timeout=120)


@pytest.mark.soak
@pytest.mark.parametrize("harness", HARNESSES, ids=[p.stem for p in HARNESSES])
def test_harness_runs_clean_for_a_bounded_time(harness: Path, tmp_path: Path) -> None:
    seconds = int(os.environ.get("FUZZ_SECONDS", "120"))
    _fuzz(harness, tmp_path, "-atheris_runs=1000000", f"-max_total_time={seconds}", timeout=seconds + 300)
