"""Appraisal policy: parsing, validation errors that name the field, and evaluation reasons."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from attestation.claims import Claims
from attestation.errors import AttestationError
from attestation.policy import (
    Decision,
    Policy,
    PolicyError,
    format_duration,
    load_policy,
    parse_duration,
    parse_policy,
    parse_policy_text,
)

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
MEAS_A = "1a2b" * 16
MEAS_B = "3c4d" * 16
SIGNER = "5e6f" * 16
OTHER_SIGNER = "7a8b" * 16

POLICY_YAML = f"""
id: payments-release
rules:
  - platform: sim
    measurements: ["{MEAS_A}", "{MEAS_B.upper()}"]
    max_evidence_age: 5m
  - platform: sim
    signer: "{SIGNER}"
    product_id: 1
    min_svn: 4
    tcb_statuses: [UpToDate, SWHardeningNeeded]
    nonce_required: true
  - platform: sgx
    signer: "0x{SIGNER}"
    product_id: 7
    min_svn: 0
    debug_allowed: true
    nonce_required: false
"""


def make_claims(**overrides: Any) -> Claims:
    base = Claims(
        platform="sim",
        measurement=MEAS_A,
        signer=SIGNER,
        product_id=1,
        svn=4,
        debug=False,
        tcb_status="UpToDate",
        report_data="00" * 64,
        evidence_digest="ee" * 32,
        evidence_time=NOW - timedelta(minutes=1),
    )
    return replace(base, **overrides)


@pytest.fixture
def policy() -> Policy:
    return parse_policy_text(POLICY_YAML)


# -- parsing ------------------------------------------------------------------------------------


def test_parses_the_documented_shape(policy: Policy) -> None:
    assert policy.id == "payments-release"
    assert len(policy.rules) == 3
    first, second, third = policy.rules
    assert first.kind == "measurements"
    assert first.measurements == (MEAS_A, MEAS_B)  # hex normalised to lowercase
    assert first.max_evidence_age == timedelta(minutes=5)
    assert first.debug_allowed is False and first.nonce_required is True
    assert first.tcb_statuses == ("UpToDate",)
    assert second.kind == "signer" and second.min_svn == 4
    assert third.signer == SIGNER  # 0x prefix dropped
    assert len(policy.digest) == 64
    assert "payments-release" in repr(policy)


def test_digest_is_canonical(policy: Policy) -> None:
    data = policy.to_dict()
    # Same meaning, different spelling: key order, hex case, allowlist order, durations.
    rules = data["rules"]
    rules[0]["measurements"] = [MEAS_B.upper(), MEAS_A]
    rules[0]["max_evidence_age"] = "300s"
    rules[2]["max_evidence_age"] = None
    respelled = {
        "rules": [{k: v for k, v in reversed(r.items()) if v is not None} for r in rules],
        "id": data["id"],
    }
    assert parse_policy(respelled).digest == policy.digest
    assert parse_policy(respelled) == policy

    rules[1]["min_svn"] = 5
    changed = {"id": data["id"], "rules": [{k: v for k, v in r.items() if v is not None} for r in rules]}
    assert parse_policy(changed).digest != policy.digest


def test_load_policy_yaml_and_json(tmp_path: Path, policy: Policy) -> None:
    yaml_path = tmp_path / "policy.yaml"
    yaml_path.write_text(POLICY_YAML)
    json_path = tmp_path / "policy.json"
    json_path.write_text(json.dumps(parse_policy_text(POLICY_YAML).to_dict()))
    loaded = load_policy(yaml_path)
    assert loaded.digest == policy.digest
    assert load_policy(yaml_path) is loaded  # memoised by content
    assert load_policy(json_path).digest == policy.digest


VALID_RULE: dict[str, Any] = {"platform": "sim", "measurements": [MEAS_A]}


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        ({"rules": [VALID_RULE]}, "id: required field is missing"),
        ({"id": "p", "rules": []}, "rules: must not be empty"),
        ({"id": "p", "rules": [VALID_RULE], "version": 2}, "version: unknown field"),
        ({"id": "p", "rules": [{**VALID_RULE, "debug": True}]}, "rules[0].debug: unknown field"),
        ({"id": "p", "rules": [{**VALID_RULE, "platform": "sgx2"}]}, "rules[0].platform: Input should be"),
        ({"id": "p", "rules": [{"platform": "sim"}]}, "rules[0]: needs either measurements or signer"),
        (
            {"id": "p", "rules": [{**VALID_RULE, "signer": SIGNER, "product_id": 1, "min_svn": 1}]},
            "rules[0]: give either measurements or signer + product_id + min_svn, not both",
        ),
        (
            {"id": "p", "rules": [{"platform": "sim", "signer": SIGNER, "product_id": 1}]},
            "rules[0]: signer, product_id and min_svn go together; missing min_svn",
        ),
        (
            {"id": "p", "rules": [{"platform": "sim", "measurements": []}]},
            "rules[0].measurements: must not be empty",
        ),
        (
            {"id": "p", "rules": [{"platform": "sim", "measurements": ["xyz1"]}]},
            "rules[0].measurements[0]: must be",
        ),
        ({"id": "p", "rules": [{"platform": "sim", "measurements": ["abc"]}]}, "even number of digits"),
        ({"id": "p", "rules": [{"platform": "sim", "measurements": [1234]}]}, "must be a quoted hex string"),
        (
            {
                "id": "p",
                "rules": [VALID_RULE, {"platform": "sim", "signer": SIGNER, "product_id": 1, "min_svn": -1}],
            },
            "rules[1].min_svn: Input should be greater than or equal to 0",
        ),
        (
            {"id": "p", "rules": [{"platform": "sim", "signer": SIGNER, "product_id": "1", "min_svn": 1}]},
            "rules[0].product_id: Input should be a valid integer",
        ),
        (
            {"id": "p", "rules": [{**VALID_RULE, "debug_allowed": "no"}]},
            "rules[0].debug_allowed: Input should be",
        ),
        (
            {"id": "p", "rules": [{**VALID_RULE, "max_evidence_age": "5 minutes"}]},
            "rules[0].max_evidence_age:",
        ),
        (
            {"id": "p", "rules": [{**VALID_RULE, "max_evidence_age": 300}]},
            "rules[0].max_evidence_age: must be",
        ),
        ({"id": "p", "rules": [{**VALID_RULE, "max_evidence_age": "0s"}]}, "longer than zero"),
        (
            {"id": "p", "rules": [{**VALID_RULE, "tcb_statuses": ["UptoDate"]}]},
            "rules[0].tcb_statuses[0]: unknown",
        ),
        (
            {"id": "p", "rules": [{**VALID_RULE, "tcb_statuses": []}]},
            "rules[0].tcb_statuses: must not be empty",
        ),
        ({"id": "p", "rules": [{**VALID_RULE, "nonce_required": None}]}, "rules[0].nonce_required:"),
        ({"id": "", "rules": [VALID_RULE]}, "id: must not be empty"),
    ],
)
def test_invalid_policy_names_the_field(document: dict[str, Any], expected: str) -> None:
    with pytest.raises(PolicyError) as caught:
        parse_policy(document)
    message = str(caught.value)
    assert expected in message
    assert "\n" not in message
    assert isinstance(caught.value, AttestationError)


def test_every_error_is_reported_on_one_line() -> None:
    document = {"id": "p", "rules": [{"platform": "nope", "measurements": ["zz"], "extra": 1}]}
    with pytest.raises(PolicyError) as caught:
        parse_policy(document)
    message = str(caught.value)
    assert "\n" not in message
    for field in ("rules[0].platform", "rules[0].measurements[0]", "rules[0].extra"):
        assert field in message


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("dup.yaml", "id: p\nrules: []\nid: q\n", "duplicate key 'id' at line 3"),
        ("dup.json", '{"id": "p", "id": "q", "rules": []}', "duplicate key 'id'"),
        ("broken.yaml", "id: [\n", "not valid YAML"),
        ("broken.json", '{"id": "p",', "not valid JSON"),
        ("empty.yaml", "", "the document is empty"),
        ("list.yaml", "- a\n- b\n", "must be a mapping"),
        (
            "field.yaml",
            f"id: p\nrules:\n  - platform: sim\n    measurements: [{MEAS_A}]\n    min_svn: x\n",
            "min_svn",
        ),
    ],
)
def test_bad_policy_files(tmp_path: Path, name: str, text: str, expected: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    assert expected in str(caught.value)
    assert str(path) in str(caught.value)
    assert "\n" not in str(caught.value)


def test_missing_policy_file(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read policy"):
        load_policy(tmp_path / "absent.yaml")


def test_unquoted_numeric_hex_in_yaml_is_refused() -> None:
    text = "id: p\nrules:\n  - platform: sim\n    measurements: [0123]\n"
    with pytest.raises(PolicyError, match=r"rules\[0\]\.measurements\[0\]: must be a quoted hex string"):
        parse_policy_text(text)


# -- evaluation ---------------------------------------------------------------------------------


def test_measurement_rule_allows(policy: Policy) -> None:
    decision = policy.evaluate(make_claims(), now=NOW, nonce_checked=True)
    assert decision == Decision(allowed=True, rule_index=0, reasons=[])


def test_second_allowlist_entry_and_case_insensitive_claims(policy: Policy) -> None:
    decision = policy.evaluate(make_claims(measurement=MEAS_B.upper()), now=NOW, nonce_checked=True)
    assert decision.allowed and decision.rule_index == 0


def test_signer_rule_allows_when_measurement_unknown(policy: Policy) -> None:
    claims = make_claims(measurement="99" * 32, svn=9, tcb_status="SWHardeningNeeded")
    decision = policy.evaluate(claims, now=NOW, nonce_checked=True)
    assert decision.allowed and decision.rule_index == 1 and decision.reasons == []


def test_first_matching_rule_wins(policy: Policy) -> None:
    # Satisfies both rule 1 and rule 2: rule 1 is reported.
    assert policy.evaluate(make_claims(svn=10), now=NOW, nonce_checked=True).rule_index == 0


def test_denial_lists_every_reason_of_every_rule_for_the_platform(policy: Policy) -> None:
    claims = make_claims(
        measurement="99" * 32,
        signer=OTHER_SIGNER,
        product_id=2,
        svn=3,
        debug=True,
        tcb_status="OutOfDate",
        evidence_time=NOW - timedelta(minutes=7),
    )
    decision = policy.evaluate(claims, now=NOW, nonce_checked=False)
    assert not decision.allowed and decision.rule_index is None
    assert decision.reasons == [
        "rule 1: debug enclave not allowed",
        f"rule 1: measurement {'99' * 32} is not in the allowlist",
        "rule 1: TCB status OutOfDate is not allowed (allowed: UpToDate)",
        "rule 1: evidence is 7m old, older than the maximum 5m",
        "rule 1: no nonce was checked but the rule requires one",
        "rule 2: debug enclave not allowed",
        f"rule 2: signer {OTHER_SIGNER} is not {SIGNER}",
        "rule 2: product id 2 is not 1",
        "rule 2: svn 3 is below the minimum 4",
        "rule 2: TCB status OutOfDate is not allowed (allowed: UpToDate, SWHardeningNeeded)",
        "rule 2: no nonce was checked but the rule requires one",
    ]  # rule 3 is for sgx: not listed


@pytest.mark.parametrize(
    ("overrides", "nonce_checked", "reason"),
    [
        ({"svn": 3, "measurement": "00" * 32}, True, "rule 2: svn 3 is below the minimum 4"),
        ({"debug": True}, True, "rule 1: debug enclave not allowed"),
        ({"measurement": "00" * 32, "product_id": 2}, True, "rule 2: product id 2 is not 1"),
        ({}, False, "rule 1: no nonce was checked but the rule requires one"),
        (
            {"evidence_time": None, "product_id": 2},
            True,
            "rule 1: evidence carries no time but the rule limits its age to 5m",
        ),
        (
            {"evidence_time": NOW + timedelta(minutes=10), "product_id": 2},
            True,
            "rule 1: evidence is dated 10m in the future",
        ),
        (
            {"evidence_time": NOW - timedelta(hours=1, minutes=2, seconds=3), "product_id": 2},
            True,
            "rule 1: evidence is 1h2m3s old, older than the maximum 5m",
        ),
    ],
)
def test_single_reasons(policy: Policy, overrides: dict[str, Any], nonce_checked: bool, reason: str) -> None:
    decision = policy.evaluate(make_claims(**overrides), now=NOW, nonce_checked=nonce_checked)
    assert not decision.allowed
    assert reason in decision.reasons


def test_evidence_at_exactly_max_age_and_naive_evidence_time(policy: Policy) -> None:
    exact = make_claims(evidence_time=NOW - timedelta(minutes=5))
    assert policy.evaluate(exact, now=NOW, nonce_checked=True).allowed
    naive = make_claims(evidence_time=(NOW - timedelta(minutes=1)).replace(tzinfo=None))
    assert policy.evaluate(naive, now=NOW, nonce_checked=True).allowed


def test_no_rule_for_platform(policy: Policy) -> None:
    decision = policy.evaluate(make_claims(platform="tdx"), now=NOW, nonce_checked=True)
    assert decision == Decision(allowed=False, rule_index=None, reasons=["no rule for platform tdx"])


def test_rule_without_nonce_requirement_and_debug_allowed(policy: Policy) -> None:
    claims = make_claims(platform="sgx", product_id=7, svn=0, debug=True)
    decision = policy.evaluate(claims, now=NOW, nonce_checked=False)
    assert decision.allowed and decision.rule_index == 2


def test_naive_now_is_refused(policy: Policy) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        policy.evaluate(make_claims(), now=NOW.replace(tzinfo=None), nonce_checked=True)


# -- durations ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "delta"),
    [
        ("30s", timedelta(seconds=30)),
        ("5m", timedelta(minutes=5)),
        ("1h", timedelta(hours=1)),
        ("2d", timedelta(days=2)),
        ("1h30m", timedelta(minutes=90)),
    ],
)
def test_parse_duration(text: str, delta: timedelta) -> None:
    assert parse_duration(text) == delta
    assert format_duration(delta) == text


@given(st.integers(min_value=1, max_value=10**8))
def test_duration_round_trip(seconds: int) -> None:
    delta = timedelta(seconds=seconds)
    assert parse_duration(format_duration(delta)) == delta
