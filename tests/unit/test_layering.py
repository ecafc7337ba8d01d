"""The package layering of the README's "Layout" holds: import-linter's contracts in
pyproject.toml (layers, no Temporal in the domain packages, no cryptography or SDK in workflows,
standalone emulators, no product import of loadtest or tests, a CLI over rekey.client) are kept.

`make lint` runs the same check; running it here makes CI enforce it too."""

from __future__ import annotations

import subprocess
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_import_contract_is_kept() -> None:
    lint_imports = Path(sysconfig.get_path("scripts")) / "lint-imports"
    result = subprocess.run(
        [str(lint_imports), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout
