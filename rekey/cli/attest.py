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

from attestation.errors import NonceMismatch, PolicyDenied
from attestation.policy import load_policy
from attestation.sim import SimVerifier
from attestation.token import ResultSigner, verify_result
from attestation.verifier import Verifier
from rekey.cli.context import settings, sim_host_dir
from rekey.cli.files import InputFileError, read_input
from rekey.cli.output import EXIT_DENIED, CliError, emit_json, err, json_option, out, table
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
    root_ca: bytes,
    policy_path: Path | None,
    nonce: bytes | None,
    at: datetime,
) -> dict[str, Any]:
    """Claims of verified evidence; with a policy, also the signed attestation result."""
    platform_verifier = SimVerifier(root_ca)
    if policy_path is None:
        claims = platform_verifier.verify(evidence, at=at)
        if nonce is not None and bytes.fromhex(claims.report_data) != report_data_for(nonce, public_key):
            raise NonceMismatch("evidence does not bind the nonce (and public key)")
        if nonce is not None:
            claims = replace(claims, nonce=nonce.hex())
        no_token = None  # no signed result without a policy
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


@cli.command("verify")
@click.argument("evidence_path", metavar="EVIDENCE", type=click.Path(path_type=Path))
@click.option("--platform", type=click.Choice(["sim"]), required=True, help="Evidence platform.")
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
) -> None:
    """Verify evidence; exit 0 allowed, 3 denied by policy, 2 malformed or unverifiable."""
    try:
        at = datetime.fromisoformat(at_text) if at_text else datetime.now(UTC)
    except ValueError:
        raise InvalidOptionValue(f"--at {at_text!r} is not an ISO 8601 time") from None
    at = at if at.tzinfo else at.replace(tzinfo=UTC)
    nonce = parse_nonce(nonce_text) if nonce_text is not None else None
    evidence, public_key = _read_evidence(evidence_path)
    trusted = sim_host_dir(host_dir)
    if not trusted.exists():
        raise CliError(
            f"no sim host at {trusted}: its root CA is what sim evidence is verified against"
            " (rekey agent serve creates it; or pass --host-dir)"
        )
    root = SimHost.load(trusted).root_ca_pem()
    try:
        result = _verify(
            evidence,
            public_key,
            platform=platform,
            root_ca=root,
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
        claims.add_row(key, "not checked" if key == "nonce" and value is None else str(value))
    out.print(claims)
    if result.get("token"):
        out.print(f"attestation result (ES256 JWT, policy {result['policy']}):")
        out.print(result["token"], markup=False)
