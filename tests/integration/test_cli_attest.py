"""`rekey attest verify`: exit 0 allowed, 3 denied with every reason, 2 malformed or unverifiable."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from attestation.token import ResultSigner, verify_result
from sealing.handoff import report_data_for
from sealing.tee.sim import EnclaveIdentity, SimHost
from tests.fixtures.cli import run_cli

SIGNER = bytes.fromhex("83" * 32)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("REKEY_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str, str]]:
    return lambda *args: run_cli(capsys, *args)


def evidence_file(
    path: Path, host_dir: Path, *, svn: int = 2, debug: bool = False, nonce: bytes = b"n"
) -> Path:
    enclave = SimHost.load_or_create(host_dir).enclave(
        EnclaveIdentity(bytes(32), SIGNER, product_id=1, svn=svn, debug=debug)
    )
    key = os.urandom(1216)
    evidence = enclave.report(report_data_for(nonce, key))
    path.write_text(
        json.dumps(
            {"evidence": base64.b64encode(evidence).decode(), "public_key": base64.b64encode(key).decode()}
        )
    )
    return path


def policy_file(path: Path, min_svn: int) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "id": "release",
                "rules": [{"platform": "sim", "signer": SIGNER.hex(), "product_id": 1, "min_svn": min_svn}],
            }
        )
    )
    return path


def test_allowed_prints_claims_and_a_token(
    home: Path, tmp_path: Path, run: Callable[..., tuple[int, str, str]]
) -> None:
    evidence = evidence_file(tmp_path / "ev.json", home / "sim-host", nonce=b"\x01\x02")
    code, out, err = run(
        "attest",
        "verify",
        str(evidence),
        "--platform",
        "sim",
        "--nonce",
        "0102",
        "--policy",
        str(policy_file(tmp_path / "p.yaml", 2)),
        "--json",
    )
    assert code == 0, err
    result = json.loads(out)
    assert result["allowed"] and result["claims"]["svn"] == 2
    signer = ResultSigner.load(home / "verifier" / "es256.pem")
    from datetime import UTC, datetime

    verified = verify_result(
        result["token"],
        public_key=signer.public_key,
        audience="rekey",
        policy_id="release",
        now=datetime.now(UTC),
    )
    assert verified.claims.signer == SIGNER.hex()


def test_denied_lists_every_reason(
    home: Path, tmp_path: Path, run: Callable[..., tuple[int, str, str]]
) -> None:
    evidence = evidence_file(tmp_path / "ev.json", home / "sim-host", svn=3, debug=True)
    code, _, err = run(
        "attest",
        "verify",
        str(evidence),
        "--platform",
        "sim",
        "--nonce",
        "6e",
        "--policy",
        str(policy_file(tmp_path / "p.yaml", 4)),
    )
    assert code == 3
    assert "svn 3 is below the minimum 4" in err and "debug enclave not allowed" in err


@pytest.mark.parametrize("case", ["garbage", "other-host", "wrong-nonce", "expired"])
def test_unverifiable_evidence_exits_2(
    home: Path, tmp_path: Path, run: Callable[..., tuple[int, str, str]], case: str
) -> None:
    args = ["--nonce", "6e"]
    if case == "garbage":
        path = tmp_path / "ev.bin"
        path.write_bytes(b"RKSE" + bytes(40))
    elif case == "other-host":
        path = evidence_file(tmp_path / "ev.json", tmp_path / "other-host")
        SimHost.load_or_create(home / "sim-host")
    else:
        path = evidence_file(tmp_path / "ev.json", home / "sim-host")
        if case == "wrong-nonce":
            args = ["--nonce", "ff"]
        else:
            args += ["--at", "2100-01-01T00:00:00+00:00"]
    code, _, err = run("attest", "verify", str(path), "--platform", "sim", *args)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err


NONCE = bytes(range(1, 33))  # 32 bytes, as an agent's /v1/nonce issues


@pytest.mark.parametrize(
    "given",
    [
        NONCE.hex(),
        base64.b64encode(NONCE).decode(),  # what /v1/nonce answers
        "hex:" + NONCE.hex(),
        "base64:" + base64.b64encode(NONCE).decode(),
    ],
)
@pytest.mark.parametrize("with_policy", [False, True])
def test_nonce_in_hex_or_base64_is_checked_and_shown(
    home: Path, tmp_path: Path, run: Callable[..., tuple[int, str, str]], given: str, with_policy: bool
) -> None:
    evidence = evidence_file(tmp_path / "ev.json", home / "sim-host", nonce=NONCE)
    policy = ["--policy", str(policy_file(tmp_path / "p.yaml", 2))] if with_policy else []
    code, out, err = run("attest", "verify", str(evidence), "--platform", "sim", "--nonce", given, *policy)
    assert code == 0, err
    rows = [line.split() for line in out.splitlines()]
    assert ["nonce", NONCE.hex()] in [[cell for cell in row if cell not in "│┃"] for row in rows], out
    code, out, err = run(
        "attest", "verify", str(evidence), "--platform", "sim", "--nonce", given, *policy, "--json"
    )
    assert code == 0, err
    assert json.loads(out)["claims"]["nonce"] == NONCE.hex()


def test_without_a_nonce_the_table_says_none_was_checked(
    home: Path, tmp_path: Path, run: Callable[..., tuple[int, str, str]]
) -> None:
    evidence = evidence_file(tmp_path / "ev.json", home / "sim-host")
    code, out, err = run("attest", "verify", str(evidence), "--platform", "sim")
    assert code == 0, err
    assert "None" not in out and "not checked" in out


@pytest.mark.parametrize(
    "given",
    ["", "hex:", "base64:", "zz", "hex:abc", "hex:QUJD", "base64:!!", "QUJ", "00" * 65, "hex:" + "00" * 65],
)
def test_a_malformed_nonce_is_one_error_line_exit_2(
    home: Path, tmp_path: Path, run: Callable[..., tuple[int, str, str]], given: str
) -> None:
    evidence = evidence_file(tmp_path / "ev.json", home / "sim-host")
    code, out, err = run("attest", "verify", str(evidence), "--platform", "sim", "--nonce", given)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--nonce" in lines[0], err
