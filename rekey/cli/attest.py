"""``rekey attest verify``: check attestation evidence, optionally against a policy."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
import sys
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from attestation.claims import Claims
from attestation.errors import NonceMismatch, PolicyDenied
from attestation.platform import PlatformVerifier
from attestation.platforms import (
    PLATFORMS,
    MissingMaterial,
    claims_platform,
    decode_evidence_file,
    make_verifier,
)
from attestation.policy import load_policy
from attestation.token import ResultSigner, verify_result
from attestation.verifier import Verifier
from rekey.cli.context import settings, sim_host_dir
from rekey.cli.files import InputFileError, read_input
from rekey.cli.output import EXIT_DENIED, CliError, emit_json, err, json_option, out, printable, table
from sealing.handoff import report_data_for
from sealing.tee.sim import SimHost


class InvalidOptionValue(CliError):
    """An option's value is not of the form it must have (a time, hex)."""


@click.group("attest")
def cli() -> None:
    """Attestation evidence and results."""


_HEX = re.compile(r"(?:[0-9a-fA-F]{2})+")


def parse_nonce(text: str) -> bytes:
    """A ``--nonce``: ``hex:...`` or ``base64:...`` explicitly; bare, hex when it is an even
    number of hex digits, else standard base64 (what an agent's ``/v1/nonce`` answers; its
    32-byte nonces end in ``=``, so they are never read as hex)."""
    kind, sep, rest = text.partition(":")
    if sep and kind in ("hex", "base64"):
        text = rest
    else:
        kind = "hex" if _HEX.fullmatch(text) else "base64"
    if kind == "hex":
        if not _HEX.fullmatch(text):
            raise InvalidOptionValue("--nonce hex:... must be an even number of hex digits")
        nonce = bytes.fromhex(text)
    else:
        try:
            nonce = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidOptionValue(
                "--nonce must be hex or base64 (optionally prefixed hex: or base64:)"
            ) from None
    if not 1 <= len(nonce) <= 64:
        raise InvalidOptionValue(f"--nonce must be 1 to 64 bytes, not {len(nonce)}")
    return nonce


def _read_evidence(path: Path) -> tuple[bytes, bytes]:
    """Raw evidence, or the JSON an agent's /v1/attest returns (evidence + public key)."""
    raw = read_input(path)
    if raw[:1] == b"{":
        try:
            document = json.loads(raw)
            return base64.b64decode(document["evidence"], validate=True), base64.b64decode(
                document.get("public_key", ""), validate=True
            )
        except (ValueError, KeyError, TypeError):
            raise InputFileError(
                f"{path}: JSON evidence needs base64 'evidence' (and 'public_key')"
            ) from None
    return raw, b""


def _verify(
    evidence: bytes,
    public_key: bytes,
    *,
    platform: str,
    platform_verifier: PlatformVerifier,
    policy_path: Path | None,
    nonce: bytes | None,
    at: datetime,
) -> dict[str, Any]:
    """Claims of verified evidence; with a policy, also the signed attestation result when the
    evidence came with the public key it binds (an agent's /v1/attest answer): a result token
    names that key. Evidence on its own (a published quote, report or document) is appraised
    against the policy without a token."""
    platform = claims_platform(platform)
    if policy_path is None or not public_key:
        policy = load_policy(policy_path) if policy_path is not None else None
        claims = platform_verifier.verify(evidence, at=at)
        if nonce is not None and bytes.fromhex(claims.report_data) != report_data_for(nonce, public_key):
            raise NonceMismatch("evidence does not bind the nonce (and public key)")
        if nonce is not None:
            claims = replace(claims, nonce=nonce.hex())
        if policy is not None:
            decision = policy.evaluate(claims, now=at, nonce_checked=nonce is not None)
            if not decision.allowed:
                raise PolicyDenied(decision.reasons)
        no_token = None  # no signed result without the evidence's public key, or without a policy
        if policy is not None:
            return {"allowed": True, "policy": policy.id, "claims": claims.to_dict(), "token": no_token}
        return {"allowed": True, "claims": claims.to_dict(), "token": no_token}
    policy = load_policy(policy_path)
    signer = ResultSigner.load_or_create(settings().home / "verifier" / "es256.pem")
    verifier = Verifier({platform: platform_verifier}, signer, clock=lambda: at)
    token = asyncio.run(
        verifier.verify(
            evidence,
            platform=platform,
            expected_nonce=nonce,
            policy=policy,
            audience="rekey",
            cnf_public_key=public_key,
        )
    )
    verified = verify_result(
        token, public_key=signer.public_key, audience="rekey", policy_id=policy.id, now=at
    )
    return {"allowed": True, "policy": policy.id, "claims": verified.claims.to_dict(), "token": token}


_NEEDS = {"collateral": ("sgx", "tdx", "sev-snp"), "jwks": ("maa",)}


def _platform_verifier(
    platform: str, host_dir: Path | None, collateral_path: Path | None, jwks_path: Path | None
) -> PlatformVerifier:
    """The verifier for ``--platform``, with the material its evidence is checked against."""
    for option, path in (("collateral", collateral_path), ("jwks", jwks_path)):
        if path is not None and platform not in _NEEDS[option]:
            raise click.UsageError(
                f"--{option} is for --platform {' or '.join(_NEEDS[option])}, not {platform}"
            )
    root = None
    if platform == "sim":
        trusted = sim_host_dir(host_dir)
        if not trusted.exists():
            raise CliError(
                f"no sim host at {trusted}: its root CA is what sim evidence is verified against"
                " (rekey agent serve creates it; or pass --host-dir)"
            )
        root = SimHost.load(trusted).root_ca_pem()
    elif host_dir is not None:
        raise click.UsageError(f"--host-dir is for --platform sim, not {platform}")
    collateral = read_input(collateral_path) if collateral_path is not None else None
    jwks = read_input(jwks_path) if jwks_path is not None else None
    try:
        return make_verifier(platform, collateral=collateral, jwks=jwks, sim_root_pem=root)
    except ValueError as exc:  # collateral or JWKS that cannot be read
        option = "--jwks" if platform == "maa" else "--collateral"
        raise click.UsageError(f"{option}: {printable(str(exc))}") from None
    except MissingMaterial:
        option = "--jwks FILE" if platform == "maa" else "--collateral FILE"
        what = {"maa": "the provider's JWKS", "sev-snp": "the VCEK/VLEK certificate"}.get(
            platform, "the quote's collateral (PCS JSON)"
        )
        raise click.UsageError(f"--platform {platform} needs {option}: {what}") from None


def parse_at(at_text: str | None) -> datetime:
    """``--at``: an ISO 8601 time (UTC when it names no zone); now without it."""
    try:
        at = datetime.fromisoformat(at_text) if at_text else datetime.now(UTC)
    except ValueError:
        raise InvalidOptionValue(f"--at {at_text!r} is not an ISO 8601 time") from None
    return at if at.tzinfo else at.replace(tzinfo=UTC)


def verified_claims(
    evidence_path: Path,
    platform: str,
    *,
    collateral_path: Path | None,
    jwks_path: Path | None,
    at: datetime,
    host_dir: Path | None = None,
) -> Claims:
    """The claims of the evidence in a file, verified (chain, signature, collateral) at ``at``;
    no policy. Errors are the typed attestation errors (exit 2)."""
    verifier = _platform_verifier(platform, host_dir, collateral_path, jwks_path)
    if platform == "sim":
        evidence = _read_evidence(evidence_path)[0]
    else:
        evidence = decode_evidence_file(platform, read_input(evidence_path))
    return verifier.verify(evidence, at=at)


@cli.command("verify")
@click.argument("evidence_path", metavar="EVIDENCE", type=click.Path(path_type=Path))
@click.option("--platform", type=click.Choice(PLATFORMS), required=True, help="Evidence platform.")
@click.option(
    "--collateral",
    "collateral_path",
    type=click.Path(path_type=Path),
    default=None,
    help="sgx/tdx: the quote's collateral (PCS JSON); sev-snp: the VCEK or VLEK certificate (PEM or DER).",
)
@click.option(
    "--jwks",
    "jwks_path",
    type=click.Path(path_type=Path),
    default=None,
    help="maa: the attestation provider's signing keys (JWKS JSON).",
)
@click.option(
    "--policy",
    "policy_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Policy (YAML/JSON); with it, a signed attestation result is issued.",
)
@click.option(
    "--nonce",
    "nonce_text",
    default=None,
    metavar="NONCE",
    help="Nonce the evidence must bind: hex, or base64 as /v1/nonce answers (hex: or base64: says which).",
)
@click.option(
    "--at", "at_text", default=None, metavar="TIME", help="Verify as of this ISO 8601 time (default now)."
)
@click.option(
    "--host-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Simulated host whose root CA is trusted (default <home>/sim-host).",
)
@json_option
def verify(
    evidence_path: Path,
    platform: str,
    policy_path: Path | None,
    nonce_text: str | None,
    at_text: str | None,
    host_dir: Path | None,
    json_out: bool,
    collateral_path: Path | None = None,
    jwks_path: Path | None = None,
) -> None:
    """Verify evidence; exit 0 allowed, 3 denied by policy, 2 malformed or unverifiable.

    Real platforms' roots are pinned (Intel SGX Root CA, AMD ARKs, AWS Nitro root G1); most
    published samples' certificates and collateral have expired, so pass --at with a time
    inside their validity."""
    at = parse_at(at_text)
    nonce = parse_nonce(nonce_text) if nonce_text is not None else None
    if platform == "sim":
        evidence, public_key = _read_evidence(evidence_path)
    else:
        evidence, public_key = decode_evidence_file(platform, read_input(evidence_path)), b""
    platform_verifier = _platform_verifier(platform, host_dir, collateral_path, jwks_path)
    try:
        result = _verify(
            evidence,
            public_key,
            platform=platform,
            platform_verifier=platform_verifier,
            policy_path=policy_path,
            nonce=nonce,
            at=at,
        )
    except PolicyDenied as exc:
        if json_out:
            emit_json({"allowed": False, "reasons": exc.reasons})
        else:
            err.print("denied by policy:", markup=False)
            for reason in exc.reasons:
                err.print(f"  - {reason}", markup=False)
        sys.exit(EXIT_DENIED)
    if json_out:
        emit_json(result)
        return
    claims = table("claim", "value")
    for key, value in result["claims"].items():
        if key == "details":
            for name, item in sorted(value.items()):
                claims.add_row(f"details.{name}", item)
        elif key == "advisories":
            claims.add_row(key, ", ".join(value) if value else "none")
        else:
            claims.add_row(key, "not checked" if key == "nonce" and value is None else str(value))
    out.print(claims)
    if result.get("token"):
        out.print(f"attestation result (ES256 JWT, policy {result['policy']}):")
        out.print(result["token"], markup=False)
