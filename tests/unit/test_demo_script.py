"""scripts/demo.sh (what `make demo` runs) with a stand-in `rekey` on PATH: both read-backs show
the errors of `rekey state get`, and a read-back that fails fails the demo; the patch step reads
the migrated state through the new agents, shows the old one refused, and stops every agent it
started, also when the demo fails."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

DEMO = Path(__file__).resolve().parents[2] / "scripts" / "demo.sh"

STUB = r"""#!/usr/bin/env bash
# Stand-in for rekey: `state get` copies the demo's input back, except FAIL_NAME once rotated.
set -u
if [ "$1 $2" = "rotate start" ]; then touch "$REKEY_HOME/rotated"; exit 0; fi
if [ "$1 $2" = "agent serve" ]; then
  echo "rekey agent for generation stand-in listening on http://127.0.0.1:1"
  echo "caller token in /dev/null"
  echo "registered as agent stand-in on host sim-0"
  echo $$ >> "$REKEY_HOME/agent-pids"
  exec sleep 300
fi
if [ "$1 $2" = "state get" ]; then
  shift 2
  state_dir=
  while [ $# -gt 0 ]; do
    case "$1" in
      --name) name=$2; shift 2;; --out) out=$2; shift 2;; --state-dir) state_dir=$2; shift 2;; *) shift;;
    esac
  done
  if [ "$name" = "$FAIL_NAME" ] && { [ "$FAIL_WHEN" = always ] || [ -e "$REKEY_HOME/rotated" ]; }; then
    echo "error: stand-in refuses to unseal $name" >&2; exit 2
  fi
  case "$state_dir" in *payments-v1*) echo "error: stand-in old agent refuses $name" >&2; exit 2;; esac
  source=$REKEY_HOME/demo/$name
  [ -e "$source" ] || source=$source.bin
  cp "$source" "$out"
  echo "wrote some bytes to $out" >&2
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
    done = subprocess.run(["bash", str(DEMO)], env=env, capture_output=True, text=True, timeout=120)
    assert_agents_stopped(tmp_path / "home")
    return done


def assert_agents_stopped(home: Path) -> None:
    pids = (home / "agent-pids").read_text().split() if (home / "agent-pids").exists() else []
    for pid in pids:
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            continue
        os.kill(int(pid), 9)
        raise AssertionError(f"the demo left agent {pid} running")


def test_the_demo_passes_when_everything_reads_back(tmp_path: Path) -> None:
    done = run_demo(tmp_path, fail_name="", fail_when="never")
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("ledger.bin: byte-identical") == 2
    assert "Demo done" in done.stdout
    # The patch: four agents, the migrated state read back through payments-v2, v1 refused.
    assert len((tmp_path / "home" / "agent-pids").read_text().split()) == 4
    assert all(f"sealed-{h}-{i}: byte-identical" in done.stdout for h in "ab" for i in "12")
    assert "error: stand-in old agent refuses sealed-a-1" in done.stderr
    assert "refused, as expected" in done.stdout


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
