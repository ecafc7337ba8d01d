"""The attestation benchmark runs end to end at a small size (it is not part of `make test`
otherwise, and a broken benchmark would go unnoticed until someone needs its figures).

Its timings are not judged here (tests do not time things); what is checked is what the storm
control promises: the cached run verifies each host's chain once, the baseline every evidence's,
for both chain cost models; and that the DCAP cost model really checks its collateral (a model
that skipped a signature would make the baseline look slower than it is)."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from attestation.errors import ChainInvalid
from loadtest import bench_attestation
from loadtest.dcap_collateral import HostCollateral, make_collateral, make_root, tcb_status

CPU_SVN = bytes(range(1, 17))


def test_the_benchmark_compares_cached_and_uncached_storms(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    code = bench_attestation.main(
        ["--evidences", "120", "--hosts", "3", "--callers", "16", "--json", "--out", str(out)]
    )
    assert code == 0
    report = json.loads(out.read_text())
    assert [model["chain"] for model in report["models"]] == ["sim", "dcap"]
    for model in report["models"]:
        cached, uncached = model["results"]
        assert (cached["mode"], uncached["mode"]) == ("cached", "uncached")
        assert cached["chain"] == uncached["chain"] == model["chain"]
        assert cached["verifications"] == uncached["verifications"] == 120
        assert cached["chain_verifications"] == 3 and cached["chain_cache_hits"] == 117
        assert uncached["chain_verifications"] == 120 and uncached["chain_cache_hits"] == 0
        assert model["chain_goal_met"] is True
        for r in (cached, uncached):
            assert 0 < r["p50_ms"] <= r["p99_ms"] <= r["max_ms"] and r["per_s"] > 0 and r["cpu_us"] > 0
    assert report["chain_goal_met"] is True


def test_one_chain_model_can_be_chosen(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    assert (
        bench_attestation.main(["--evidences", "8", "--hosts", "2", "--chain", "dcap", "--out", str(out)])
        == 0
    )
    assert [model["chain"] for model in json.loads(out.read_text())["models"]] == ["dcap"]


def test_more_hosts_than_evidences_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        bench_attestation.main(["--evidences", "2", "--hosts", "3"])
    assert exited.value.code == 2
    assert "--hosts must be between 1 and --evidences" in capsys.readouterr().err


@pytest.fixture(scope="module")
def collateral() -> tuple[bytes, HostCollateral]:
    key, root = make_root()
    return root.public_bytes(serialization.Encoding.DER), make_collateral(key, root, CPU_SVN)


def test_the_dcap_model_accepts_its_collateral_and_finds_the_tcb_level(
    collateral: tuple[bytes, HostCollateral],
) -> None:
    root_der, host = collateral
    now = datetime.now(UTC)
    levels, not_after = host.check(root_der, now)
    assert now < not_after <= now + timedelta(days=31)
    assert tcb_status(levels, CPU_SVN) == "UpToDate"
    assert tcb_status(levels, bytes([0]) + CPU_SVN[1:]) == "OutOfDate"
    assert tcb_status(levels, bytes(16)) == "Revoked"  # below every level


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


@pytest.mark.parametrize(
    "field",
    [
        "platform_ca_der",
        "pck_der",
        "tcb_signing_der",
        "root_crl_der",
        "pck_crl_der",
        "tcb_info",
        "qe_identity",
    ],
)
def test_the_dcap_model_refuses_tampered_collateral(
    collateral: tuple[bytes, HostCollateral], field: str
) -> None:
    """Every signed piece is checked: a flipped bit in the signed bytes of any of them fails."""
    root_der, host = collateral
    value: bytes = getattr(host, field)
    # inside what is signed: after the outer DER headers, or anywhere in the JSON documents
    tampered = dataclasses.replace(host, **{field: _flip(value, 40)})
    with pytest.raises(ChainInvalid):
        tampered.check(root_der, datetime.now(UTC))


def test_the_dcap_model_refuses_another_root_and_stale_collateral(
    collateral: tuple[bytes, HostCollateral],
) -> None:
    root_der, host = collateral
    _, other_root = make_root()
    with pytest.raises(ChainInvalid, match="not the trusted root"):
        host.check(other_root.public_bytes(serialization.Encoding.DER), datetime.now(UTC))
    with pytest.raises(ChainInvalid, match="out of date"):
        host.check(root_der, datetime.now(UTC) + timedelta(days=45))
