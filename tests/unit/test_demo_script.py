"""scripts/demo.sh (what `make demo` runs) with a stand-in `rekey` on PATH: both read-backs show
the errors of `rekey state get`, and a read-back that fails fails the demo."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

DEMO = Path(__file__).resolve().parents[2] / "scripts" / "demo.sh"

STUB = r"""#!/usr/bin/env bash
# Stand-in for rekey: `state get` copies the demo's input back, except FAIL_NAME once rotated.
set -u
if [ "$1 $2" = "rotate start" ]; then touch "$REKEY_HOME/rotated"; exit 0; fi
if [ "$1 $2" = "state get" ]; then
  shift 2
  while [ $# -gt 0 ]; do
    case "$1" in --name) name=$2; shift 2;; --out) out=$2; shift 2;; *) shift;; esac
  done
  if [ "$name" = "$FAIL_NAME" ] && { [ "$FAIL_WHEN" = always ] || [ -e "$REKEY_HOME/rotated" ]; }; then
    echo "error: stand-in refuses to unseal $name" >&2; exit 2
  fi
  cp "$REKEY_HOME/demo/$name" "$out"; echo "wrote some bytes to $out" >&2
fi
exit 0
"""


def run_demo(tmp_path: Path, fail_name: str, fail_when: str) -> subprocess.CompletedProcess[str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "rekey"
    stub.write_text(STUB)
    stub.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "REKEY_HOME": str(tmp_path / "home"),
        "FAIL_NAME": fail_name,
        "FAIL_WHEN": fail_when,
    }
    return subprocess.run(["bash", str(DEMO)], env=env, capture_output=True, text=True, timeout=120)


def test_the_demo_passes_when_everything_reads_back(tmp_path: Path) -> None:
    done = run_demo(tmp_path, fail_name="", fail_when="never")
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("ledger.bin: byte-identical") == 2
    assert "Demo done" in done.stdout


def test_an_error_of_the_read_back_after_the_rotations_is_shown_and_fails_the_demo(tmp_path: Path) -> None:
    done = run_demo(tmp_path, fail_name="ledger.bin", fail_when="rotated")
    assert "error: stand-in refuses to unseal ledger.bin" in done.stderr
    assert done.returncode != 0
    assert "Demo done" not in done.stdout
    # The other files are still checked, and the failing one is named.
    assert done.stdout.count("model-weights.bin: byte-identical") == 2
    assert "ledger.bin: could not be read back" in done.stdout


def test_an_error_of_the_first_read_back_is_shown_and_fails_the_demo(tmp_path: Path) -> None:
    done = run_demo(tmp_path, fail_name="credentials.txt", fail_when="always")
    assert "error: stand-in refuses to unseal credentials.txt" in done.stderr
    assert done.returncode != 0 and "Demo done" not in done.stdout
