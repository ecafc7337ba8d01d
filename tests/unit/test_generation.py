"""Generation manifests: validation with one-line errors naming the field, and diffs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sealing.generation import ManifestError, diff, load_manifest, parse_manifest

BASE: dict[str, Any] = {
    "id": "app-v1",
    "platform": "sgx",
    "measurement": "aa" * 32,
    "signer": "bb" * 32,
    "product_id": 7,
    "svn": 3,
    "debug": False,
    "tcb": "UpToDate",
}


def manifest(**changes: Any) -> Any:
    return parse_manifest(BASE | changes)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"svn": "three"}, "svn"),
        ({"svn": -1}, "svn"),
        ({"svn": 1.5}, "svn"),
        ({"svn": True}, "svn"),
        ({"product_id": 70000}, "product_id"),
        ({"platform": "sgx2"}, "platform"),
        ({"measurement": "zz" * 32}, "measurement"),
        ({"measurement": "aa" * 31}, "measurement"),
        ({"signer": "bb" * 20}, "signer"),
        ({"debug": "yes"}, "debug"),
        ({"id": "has space"}, "id"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_invalid_fields_are_named(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(ManifestError) as info:
        parse_manifest(BASE | changes, "m.yaml")
    message = str(info.value)
    assert f"'{field}'" in message and message.startswith("m.yaml: ")
    assert "\n" not in message


def test_missing_field_is_named() -> None:
    document = dict(BASE)
    del document["signer"]
    with pytest.raises(ManifestError, match="field 'signer' is missing"):
        parse_manifest(document)


def test_platform_measurement_sizes() -> None:
    assert manifest(platform="tdx", measurement="cc" * 48).measurement == "cc" * 48
    with pytest.raises(ManifestError, match="tdx measurements are 48 bytes"):
        manifest(platform="tdx")


def test_hex_is_normalised() -> None:
    assert manifest(measurement="0x" + "AB" * 32).measurement == "ab" * 32


def test_load_yaml_json_and_bad_files(tmp_path: Path) -> None:
    yaml_file = tmp_path / "m.yaml"
    yaml_file.write_text(
        "\n".join(f"{k}: {v!r}" if isinstance(v, str) else f"{k}: {str(v).lower()}" for k, v in BASE.items())
    )
    assert load_manifest(yaml_file).id == "app-v1"
    json_file = tmp_path / "m.json"
    json_file.write_text('{"id": "x", "platform": "sim"}')
    with pytest.raises(ManifestError, match="field 'measurement' is missing"):
        load_manifest(json_file)
    with pytest.raises(ManifestError, match="no such file"):
        load_manifest(tmp_path / "absent.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("id: [unclosed\n")
    with pytest.raises(ManifestError, match="not valid YAML or JSON"):
        load_manifest(broken)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just a string\n")
    with pytest.raises(ManifestError, match="mapping"):
        load_manifest(scalar)


def test_diff_of_a_patch() -> None:
    old = manifest()
    new = manifest(id="app-v2", measurement="cc" * 32, svn=4)
    result = diff(old, new)
    changed = {f.field for f in result.fields if f.changed}
    assert changed == {"measurement", "svn"}
    assert result.measurement_changed and not result.signer_changed
    assert not result.svn_lowered and not result.debug_enabled
    assert result.flags() == ["measurement changed: MRENCLAVE-bound state needs an attested handoff"]


def test_diff_flags_downgrade_signer_and_debug() -> None:
    result = diff(manifest(), manifest(id="bad", signer="dd" * 32, svn=2, debug=True))
    assert result.svn_lowered and result.signer_changed and result.debug_enabled
    data = result.to_dict()
    assert data["svn_lowered"] is True
    assert any("downgrade" in f for f in data["flags"])
    markdown = result.to_markdown()
    assert "| svn | `3` | `2` | changed |" in markdown
    assert "debug switched on" in markdown
