"""``loadtest/bench_evidence.py`` at a tiny size: every platform's sample is measured, the three
rates are positive and the ratios are the rates' ratios; bad arguments are refused."""

from __future__ import annotations

import json

import pytest

from loadtest import bench_evidence


def test_every_platform_is_measured_and_the_ratios_follow_the_rates(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert bench_evidence.main(["--seconds", "0.02", "--repeat", "1", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert {r["platform"] for r in results} == {"sgx", "tdx", "sev-snp", "nitro", "maa"}
    for r in results:
        assert r["cache_off_per_s"] > 0 and r["cache_on_per_s"] > 0 and r["one_signature_per_s"] > 0
        assert r["cache_ratio"] == pytest.approx(r["cache_on_per_s"] / r["cache_off_per_s"])
        assert r["signature_ratio"] == pytest.approx(r["cache_on_per_s"] / r["one_signature_per_s"])
        assert r["has_chain"] is (r["platform"] != "maa")


def test_bad_arguments_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    for args in (["--seconds", "0"], ["--repeat", "0"], ["--platform", "sim"]):
        with pytest.raises(SystemExit) as exited:
            bench_evidence.main(args)
        assert exited.value.code == 2
