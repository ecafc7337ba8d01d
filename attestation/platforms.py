"""Which verifier checks which evidence: one place that builds a platform verifier from what the
caller has (collateral, a JWKS, the sim host's root), for the CLI, the demo and the benchmarks.

=========  ===============================================  ===================================
name       evidence                                         also needs
=========  ===============================================  ===================================
sim        the simulated enclave's evidence                 the sim host's root CA
sgx        an SGX DCAP quote (v3)                           the quote's collateral (PCS JSON)
tdx        a TDX quote (v4 or v5)                           the quote's collateral (PCS JSON)
sev-snp    an SEV-SNP attestation report (1184 bytes)       the VCEK or VLEK certificate
nitro      a Nitro attestation document (CBOR or base64)    nothing: the chain is in it
maa        a Microsoft Azure Attestation token (JWT)        the attestation provider's JWKS
=========  ===============================================  ===================================

Every real platform's root is pinned in its module; only the sim root comes from the caller.
An MAA token attests an SGX enclave, so its claims (and the policy rules they meet) are ``sgx``.
"""

from __future__ import annotations

import binascii
import re

from attestation.errors import AttestationError, MalformedEvidence
from attestation.platform import PlatformVerifier

__all__ = [
    "IDENTITY_DETAILS",
    "PLATFORMS",
    "MissingMaterial",
    "claims_platform",
    "decode_evidence_file",
    "identity_details",
    "make_verifier",
]

PLATFORMS = ("sim", "sgx", "tdx", "sev-snp", "nitro", "maa")

#: The details that name a build (what a generation is), per platform, beside measurement and
#: signer: on TDX the measurement is MRTD (the firmware) only, so the RTMRs (kernel, command
#: line, application), the owner and config ids, XFAM and the TD attributes say which workload
#: it is; on SEV-SNP the host data, family and image ids, guest policy and VMPL; on Nitro PCR1
#: (kernel) and PCR2 (application). Never per-instance values (nonces, user data, public keys,
#: report or chip ids, Nitro PCR3/PCR4: the instance's role and id) nor values the runtime
#: extends (TDX RTMR3). SGX's MRENCLAVE already covers the enclave's whole image.
IDENTITY_DETAILS: dict[str, tuple[str, ...]] = {
    "sim": (),
    "sgx": (),
    "tdx": ("mrconfigid", "mrowner", "mrownerconfig", "rtmr0", "rtmr1", "rtmr2", "td_attributes", "xfam"),
    "sev-snp": ("family_id", "host_data", "image_id", "policy", "vmpl"),
    "nitro": ("pcr1", "pcr2"),
}


def identity_details(platform: str, details: tuple[tuple[str, str], ...]) -> dict[str, str]:
    """The identity details (``IDENTITY_DETAILS``) among a claims' ``details``."""
    wanted = IDENTITY_DETAILS.get(platform, ())
    return {name: value for name, value in details if name in wanted}


_HEX_TEXT = re.compile(rb"\s*(?:[0-9a-fA-F]{2}\s*)+")


class MissingMaterial(AttestationError):
    """The platform's evidence is verified against material the caller did not give (the
    collateral of a DCAP quote, the VCEK of an SEV-SNP report, the JWKS of an MAA token)."""


def claims_platform(name: str) -> str:
    """The platform the claims (and policy rules) of evidence of kind ``name`` are for."""
    return "sgx" if name == "maa" else name


def decode_evidence_file(name: str, raw: bytes) -> bytes:
    """Evidence as read from a file: binary report and quote platforms also accept the report as
    hex text (how SEV-SNP tools often print it); everything else is passed on as it is (the Nitro
    verifier reads CBOR or base64 itself, the MAA verifier a JWT)."""
    if name in ("sgx", "tdx", "sev-snp") and raw and _HEX_TEXT.fullmatch(raw):
        try:
            return binascii.unhexlify(b"".join(raw.split()))
        except binascii.Error:  # pragma: no cover - the pattern admits only pairs of hex digits
            raise MalformedEvidence(f"{name} evidence is neither binary nor hex text") from None
    return raw


def make_verifier(
    name: str,
    *,
    collateral: bytes | None = None,
    jwks: bytes | None = None,
    sim_root_pem: bytes | None = None,
) -> PlatformVerifier:
    """A verifier for evidence of kind ``name`` (one of ``PLATFORMS``). Raises ``MissingMaterial``
    when the platform needs something that was not given, ``ValueError`` for an unknown name."""
    if name == "sim":
        from attestation.sim import SimVerifier

        if sim_root_pem is None:
            raise MissingMaterial("sim evidence is verified against the sim host's root CA; none was given")
        return SimVerifier(sim_root_pem)
    if name in ("sgx", "tdx"):
        from attestation.dcap import SgxDcapVerifier, TdxVerifier

        if collateral is None:
            raise MissingMaterial(
                f"{name} quotes are verified against their collateral (PCS JSON); none was given"
            )
        return SgxDcapVerifier(collateral) if name == "sgx" else TdxVerifier(collateral)
    if name == "sev-snp":
        from attestation.sev_snp import SevSnpVerifier

        return SevSnpVerifier(collateral)
    if name == "nitro":
        from attestation.nitro import NitroVerifier

        return NitroVerifier()
    if name == "maa":
        from attestation.maa import MaaVerifier

        if jwks is None:
            raise MissingMaterial("MAA tokens are verified against the provider's JWKS; none was given")
        return MaaVerifier(jwks)
    raise ValueError(f"unknown platform {name!r} (known: {', '.join(PLATFORMS)})")
