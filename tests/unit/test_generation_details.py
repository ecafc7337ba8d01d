"""A generation's ``details`` (the rest of a real build's identity: TDX RTMRs, SEV-SNP host data,
Nitro PCR1/PCR2) are enforced wherever its identity is: release-policy rules, the migration's
attestation of the new agent, attested TLS expectations; and a signer that is all zeros (a
build without one) never becomes a signer rule that would admit any workload."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import pytest

from attestation.claims import Claims
from attestation.platforms import IDENTITY_DETAILS, identity_details
from attestation.policy import PolicyError, parse_policy
from rekey.ratls_transport import peer_policy
from sealing.generation import details_reasons, manifest_from_claims, parse_manifest
from sealing.kms_migration import generation_policy, rule_admits

RTMR = {"rtmr1": "11" * 48, "rtmr2": "22" * 48}
TD = {
    "id": "td-v1",
    "platform": "tdx",
    "measurement": "aa" * 48,
    "signer": "00" * 48,
    "product_id": 0,
    "svn": 0,
    "details": RTMR,
}


def claims(**changes: object) -> Claims:
    base = Claims(
        platform="tdx",
        measurement="aa" * 48,
        signer="00" * 48,
        product_id=0,
        svn=0,
        debug=False,
        tcb_status="UpToDate",
        report_data="00" * 64,
        evidence_digest="ee" * 32,
        evidence_time=None,
        details=tuple(sorted({**RTMR, "rtmr3": "33" * 48, "mrseam": "44" * 48, "fmspc": "00" * 6}.items())),
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def test_manifests_from_evidence_keep_identity_details_only() -> None:
    manifest = manifest_from_claims(claims(), "td-v1")
    assert manifest.details == RTMR  # not rtmr3 (runtime), not the platform's fmspc or mrseam
    assert set(manifest.details) <= set(IDENTITY_DETAILS["tdx"])
    nitro = {"pcr1": "01" * 48, "pcr4": "04" * 48, "nonce": "ab" * 1024, "public_key": "cd" * 300}
    assert identity_details("nitro", tuple(nitro.items())) == {"pcr1": "01" * 48}


def test_a_release_rule_from_a_manifest_requires_its_details() -> None:
    manifest = parse_manifest(TD)
    policy = generation_policy(manifest)
    now = datetime.now(UTC)
    assert policy.evaluate(claims(), now=now, nonce_checked=True).allowed
    other_app = claims(details=(("rtmr1", "11" * 48), ("rtmr2", "99" * 48)))  # same firmware (MRTD)
    decision = policy.evaluate(other_app, now=now, nonce_checked=True)
    assert not decision.allowed and any("rtmr2" in r for r in decision.reasons)
    assert rule_admits(policy.rules[0], manifest)
    assert not rule_admits(policy.rules[0], parse_manifest(TD | {"details": {"rtmr1": "11" * 48}}))
    assert details_reasons(manifest, claims()) == []
    assert [r.split(" ")[0] for r in details_reasons(manifest, other_app)] == ["rtmr2"]
    assert "has no rtmr1" in details_reasons(manifest, claims(details=()))[0]


def test_a_manifest_without_details_keeps_its_canonical_form() -> None:
    plain = parse_manifest({k: v for k, v in TD.items() if k != "details"})
    assert '"details"' not in plain.canonical_json()
    assert "details" not in generation_policy(plain).rules[0].canonical()


@pytest.mark.parametrize("platform", ["tdx", "sev-snp", "nitro"])
def test_an_all_zero_signer_is_never_a_signer_rule(platform: str) -> None:
    with pytest.raises(PolicyError, match="signer is all zeros"):
        parse_policy(
            {"id": "p", "rules": [{"platform": platform, "signer": "00" * 48, "product_id": 0, "min_svn": 0}]}
        )
    size = 48
    manifest = parse_manifest(TD | {"platform": platform, "measurement": "aa" * size, "details": {}})
    rule = peer_policy(manifest).rules[0]
    assert rule.kind == "measurements" and rule.measurements == ("aa" * size,)
    # A real signer is still a signer rule.
    signed = parse_manifest(TD | {"platform": platform, "signer": "5e" * 48, "details": {}})
    assert peer_policy(signed).rules[0].kind == "signer"


def test_attested_tls_expectations_carry_the_details() -> None:
    rule = peer_policy(parse_manifest(TD)).rules[0]
    assert rule.details == RTMR
