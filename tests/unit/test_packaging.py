"""pyproject.toml metadata in the form current setuptools takes without a deprecation warning."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def test_license_is_an_spdx_string_and_the_build_needs_a_setuptools_that_reads_it() -> None:
    data = tomllib.loads(PYPROJECT.read_text())
    # A table (`{ text = ... }`) is deprecated since setuptools 77; the string form needs >= 77.
    assert data["project"]["license"] == "Apache-2.0"
    requires = data["build-system"]["requires"]
    setuptools = [r for r in requires if re.match(r"setuptools\b", r)]
    assert len(setuptools) == 1
    found = re.fullmatch(r"setuptools>=(\d+)(?:\.\d+)*", setuptools[0].replace(" ", ""))
    assert found and int(found.group(1)) >= 77, setuptools
