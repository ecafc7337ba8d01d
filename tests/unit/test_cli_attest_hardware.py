"""``rekey attest verify --platform sgx|tdx|sev-snp|nitro|maa`` and ``rekey generation register
--from-evidence`` on the real samples of ``vectors/`` (each at a time inside its validity, as
``vectors/samples.json`` lists them): the claims the provenance states, exit 2 outside the
validity or for the wrong material, 3 when a policy denies, and nothing stored on a refusal."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.fixtures.cli import run_cli

VECTORS = Path(__file__).resolve().parents[2] / "vectors"
SAMPLES: list[dict[str, Any]] = json.loads((VECTORS / "samples.json").read_text())["samples"]


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("REKEY_HOME", str(home))
    monkeypatch.setenv("COLUMNS", "200")
    return home


def material(sample: dict[str, Any]) -> list[str]:
    args = [str(VECTORS / sample["evidence"]), "--platform", sample["platform"]]
    for key in ("collateral", "jwks"):
        if sample.get(key):
            args += [f"--{key}", str(VECTORS / sample[key])]
    return args


def one_error(result: tuple[int, str, str], code: int, text: str) -> None:
    got, _out, err = result
    lines = err.strip().splitlines()
    assert got == code, (got, err)
    assert len(lines) == 1 and lines[0].startswith("error: ") and text in lines[0], err


@pytest.mark.parametrize("sample", SAMPLES, ids=[s["platform"] for s in SAMPLES])
def test_every_platforms_sample_verifies_with_its_claims(
    home: Path, capsys: pytest.CaptureFixture[str], sample: dict[str, Any]
) -> None:
    code, out, err = run_cli(capsys, "attest", "verify", *material(sample), "--at", sample["at"], "--json")
    assert code == 0, err
    claims = json.loads(out)["claims"]
    assert claims["platform"] == ("sgx" if sample["platform"] == "maa" else sample["platform"])
    assert claims["measurement"] == sample["measurement"]
    assert claims["debug"] is sample["debug"]
    if sample["tcb_status"]:
        assert claims["tcb_status"] == sample["tcb_status"]
    # The table form shows the same claims, details one row each.
    code, out, err = run_cli(capsys, "attest", "verify", *material(sample), "--at", sample["at"])
    assert code == 0 and sample["measurement"] in out and "details." in out, err
    assert not home.exists()  # verifying stores nothing


@pytest.mark.parametrize("sample", SAMPLES, ids=[s["platform"] for s in SAMPLES])
def test_every_sample_fails_outside_its_validity(
    capsys: pytest.CaptureFixture[str], sample: dict[str, Any]
) -> None:
    for at in ("2049-06-01T00:00:00Z", "2015-01-01T00:00:00Z"):
        code, _out, err = run_cli(capsys, "attest", "verify", *material(sample), "--at", at)
        assert code == 2, (at, err)
        assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err


def test_missing_or_misplaced_material_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    sgx, maa = SAMPLES[0], next(s for s in SAMPLES if s["platform"] == "maa")
    evidence = str(VECTORS / sgx["evidence"])
    one_error(
        run_cli(capsys, "attest", "verify", evidence, "--platform", "sgx"), 2, "needs --collateral FILE"
    )
    one_error(
        run_cli(capsys, "attest", "verify", str(VECTORS / maa["evidence"]), "--platform", "maa"),
        2,
        "needs --jwks",
    )
    jwks = str(VECTORS / maa["jwks"])
    one_error(
        run_cli(capsys, "attest", "verify", evidence, "--platform", "nitro", "--jwks", jwks),
        2,
        "--jwks is for --platform maa",
    )
    # Evidence of one platform handed to another's verifier: refused, one line, no crash.
    tdx = next(s for s in SAMPLES if s["platform"] == "tdx")
    one_error(
        run_cli(
            capsys,
            "attest",
            "verify",
            evidence,
            "--platform",
            "tdx",
            "--collateral",
            str(VECTORS / tdx["collateral"]),
            "--at",
            sgx["at"],
        ),
        2,
        "",
    )


def test_a_policy_denies_real_evidence_with_its_reasons(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    snp = next(s for s in SAMPLES if s["platform"] == "sev-snp")
    policy = tmp_path / "p.yaml"
    policy.write_text(
        yaml.safe_dump(
            {
                "id": "snp-prod",
                "rules": [
                    {
                        "platform": "sev-snp",
                        "measurements": [snp["measurement"]],
                        "nonce_required": False,
                        "details": {"host_data": "ff" * 32},
                    }
                ],
            }
        )
    )
    code, out, err = run_cli(
        capsys, "attest", "verify", *material(snp), "--at", snp["at"], "--policy", str(policy), "--json"
    )
    assert code == 3, err
    reasons = json.loads(out)["reasons"]
    assert any("debug enclave not allowed" in r for r in reasons), reasons
    assert any("host_data" in r for r in reasons), reasons


def stored_generations(home: Path) -> list[tuple[str, str]]:
    if not (home / "state.db").exists():
        return []
    with sqlite3.connect(home / "state.db") as conn:
        return sorted(conn.execute("SELECT generation_id, document FROM generations").fetchall())


def test_generation_register_from_evidence_registers_what_the_evidence_proves(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tdx = next(s for s in SAMPLES if s["platform"] == "tdx")
    args = ["generation", "register", "--from-evidence", *material(tdx), "--at", tdx["at"], "--id", "td-v1"]
    # Outside the evidence's validity: nothing registered, not even a store.
    args_late = [*args[:-4], "--at", "2049-01-01T00:00:00Z", "--id", "td-v1"]
    one_error(run_cli(capsys, *args_late), 2, "")
    assert stored_generations(home) == []
    code, out, err = run_cli(capsys, *args, "--json")
    assert code == 0, err
    registered = json.loads(out)
    assert registered["measurement"] == tdx["measurement"] and registered["platform"] == "tdx"
    assert registered["details"]["rtmr0"].startswith("44c0197b")
    assert run_cli(capsys, *args)[0] == 0  # idempotent for the same evidence
    code, out, err = run_cli(capsys, "generation", "show", "td-v1")
    assert code == 0 and "details.rtmr1" in out, err
    # A second build registered from its own manifest differs in RTMR2 only: the diff says so.
    changed = dict(registered)
    del changed["created"], changed["supersedes"]
    changed["id"] = "td-v2"
    changed["details"] = dict(registered["details"], rtmr2="00" * 48)
    manifest = home / "td-v2.yaml"
    manifest.write_text(yaml.safe_dump(changed))
    assert run_cli(capsys, "generation", "register", str(manifest))[0] == 0
    code, out, err = run_cli(capsys, "generation", "diff", "td-v1", "td-v2", "--json")
    assert code == 0, err
    fields = {f["field"]: f for f in json.loads(out)["fields"]}
    assert fields["details.rtmr2"]["changed"] and not fields["details.rtmr1"]["changed"]
    assert not fields["measurement"]["changed"]


def test_generation_register_options_go_together(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tdx = next(s for s in SAMPLES if s["platform"] == "tdx")
    evidence = str(VECTORS / tdx["evidence"])
    one_error(run_cli(capsys, "generation", "register"), 2, "give a MANIFEST")
    one_error(
        run_cli(capsys, "generation", "register", "--from-evidence", evidence, "--id", "x"), 2, "--platform"
    )
    one_error(
        run_cli(capsys, "generation", "register", "m.yaml", "--platform", "tdx"),
        2,
        "only with --from-evidence",
    )
    one_error(
        run_cli(
            capsys,
            "generation",
            "register",
            "m.yaml",
            "--from-evidence",
            evidence,
            "--platform",
            "tdx",
            "--id",
            "x",
        ),
        2,
        "not both",
    )
    hostile = [*material(tdx), "--at", tdx["at"], "--id", "../../etc/passwd"]
    one_error(run_cli(capsys, "generation", "register", "--from-evidence", *hostile), 2, "id")
    assert stored_generations(home) == []


def test_a_nitro_build_registers_with_its_identity_pcrs_only(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    nitro = next(s for s in SAMPLES if s["platform"] == "nitro")
    args = [
        "generation",
        "register",
        "--from-evidence",
        *material(nitro),
        "--at",
        nitro["at"],
        "--id",
        "enc-1",
    ]
    code, out, err = run_cli(capsys, *args, "--json")
    assert code == 0, err
    registered = json.loads(out)
    # PCR1 (kernel) and PCR2 (application) name the build; the document's nonce, user data and
    # public key (1 KiB each in this sample) and the instance's PCR3/PCR4 do not.
    assert sorted(registered["details"]) == ["pcr1", "pcr2"]
    assert registered["details"]["pcr1"].startswith("0343b056")


@pytest.mark.parametrize("platform", ["sgx", "tdx", "sev-snp", "maa"])
def test_unreadable_collateral_or_jwks_is_one_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], platform: str
) -> None:
    sample = next(s for s in SAMPLES if s["platform"] == platform)
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"\x00not collateral\xff" * 10)
    option = "--jwks" if platform == "maa" else "--collateral"
    code, _out, err = run_cli(
        capsys,
        "attest",
        "verify",
        str(VECTORS / sample["evidence"]),
        "--platform",
        platform,
        option,
        str(garbage),
    )
    one_error((code, _out, err), 2, option)
