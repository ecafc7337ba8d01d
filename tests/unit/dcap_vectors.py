"""The real SGX and TDX quotes of vectors/sgx and vectors/tdx, with what PROVENANCE.md says of each.

Three samples come with dcap-qvl's collateral JSON, and the dcap-rs one with the derived file of
that form (``dcaprs_collateral_v2.derived.json``); for the go-tdx-guest sample the collateral is
assembled here from the Intel PCS responses next to it (``pcs_collateral``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

VECTORS = Path(__file__).resolve().parents[2] / "vectors"
SGX = VECTORS / "sgx"
TDX = VECTORS / "tdx"


def at(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


@dataclass(frozen=True)
class Sample:
    name: str
    platform: str
    quote: Path
    collateral: str | None  # dcap-qvl collateral JSON
    at: datetime  # inside the validity window
    not_before: datetime | None = None  # the window, where PROVENANCE gives it
    not_after: datetime | None = None

    @property
    def evidence(self) -> bytes:
        return self.quote.read_bytes()


def _signed_value(path: Path, key: str) -> tuple[str, str]:
    """The exact signed text of a PCS ``{"<key>": {...}, "signature": "..."}`` body, and the signature."""
    body = path.read_text().strip()
    prefix = '{"' + key + '":'
    assert body.startswith(prefix), path
    end = body.rindex(',"signature":"')
    return body[len(prefix) : end], json.loads(body)["signature"]


def pem_chain(quote: bytes) -> list[bytes]:
    return re.findall(rb"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----\n?", quote, re.S)


def pcs_collateral(
    tcb_info: Path, qe_identity: Path, signing_chain: str, pck_crl: Path, root_crl: Path, pck_crl_chain: str
) -> str:
    tcb_text, tcb_signature = _signed_value(tcb_info, "tcbInfo")
    qe_text, qe_signature = _signed_value(qe_identity, "enclaveIdentity")
    return json.dumps(
        {
            "tcb_info": tcb_text,
            "tcb_info_signature": tcb_signature,
            "tcb_info_issuer_chain": signing_chain,
            "qe_identity": qe_text,
            "qe_identity_signature": qe_signature,
            "qe_identity_issuer_chain": signing_chain,
            "pck_crl_issuer_chain": pck_crl_chain,
            "root_ca_crl": root_crl.read_bytes().hex(),
            "pck_crl": pck_crl.read_bytes().hex(),
        }
    )


def dcaprs_collateral() -> str:
    """dcap-rs's Intel PCS collateral for FMSPC 00606a000000 (TCB info v2), in the collateral JSON
    form: ``dcaprs_collateral_v2.derived.json`` (scripts/derive_dcap_collateral.py)."""
    return (SGX / "dcaprs_collateral_v2.derived.json").read_text()


def gotdxguest_collateral() -> str:
    return pcs_collateral(
        TDX / "gotdxguest_tcbinfo_tdx_50806f000000.json",
        TDX / "gotdxguest_qeidentity_td_qe.json",
        (TDX / "gotdxguest_tcbinfo_issuer_chain.derived.pem").read_text(),
        TDX / "gotdxguest_pckcrl_platform.der",
        TDX / "gotdxguest_rootcrl.der",
        (TDX / "gotdxguest_pckcrl_issuer_chain.derived.pem").read_text(),
    )


SGX_QVL = Sample(
    "sgx-dcapqvl",
    "sgx",
    SGX / "dcapqvl_sgx_quote_v3.dat",
    (SGX / "dcapqvl_sgx_quote_v3_collateral.json").read_text(),
    at("2025-07-19T10:01:17Z"),
    at("2025-06-19T10:56:11Z"),
    at("2025-07-19T10:01:18Z"),
)
TDX_QVL = Sample(
    "tdx-dcapqvl-v4",
    "tdx",
    TDX / "dcapqvl_tdx_quote_v4.dat",
    (TDX / "dcapqvl_tdx_quote_v4_collateral.json").read_text(),
    at("2025-07-19T10:00:34Z"),
    at("2025-06-19T10:32:27Z"),
    at("2025-07-19T10:00:35Z"),
)
TDX_QVL_V5 = Sample(
    "tdx-dcapqvl-v5-outdated",
    "tdx",
    TDX / "dcapqvl_tdx_quote_v5_outdated.dat",
    (TDX / "dcapqvl_tdx_quote_v5_outdated_collateral.json").read_text(),
    at("2026-03-01T00:00:00Z"),
    at("2026-02-18T10:58:51Z"),
    at("2026-03-20T10:41:15Z"),
)
TDX_GO = Sample(
    "tdx-gotdxguest-v4",
    "tdx",
    TDX / "gotdxguest_tdx_quote_v4_spr_e4.dat",
    gotdxguest_collateral(),
    at("2023-07-01T01:00:00Z"),
)
SGX_DCAPRS = Sample(
    "sgx-dcaprs-v2",
    "sgx",
    SGX / "dcaprs_sgx_quote_v3.derived.bin",
    dcaprs_collateral(),
    datetime.fromtimestamp(1739419232).astimezone(),  # dcap-rs PINNED_TIME, 2025-02-13T04:00:32Z
    at("2025-02-13T03:40:28Z"),  # the PCK CRL's thisUpdate
    at("2025-03-15T03:29:42Z"),  # the TCB info's nextUpdate
)
SGX_OCCLUM = Sample(
    "sgx-occlum-v2",
    "sgx",
    SGX / "trustee_occlum_sgx_quote_v3.dat",
    dcaprs_collateral(),  # our own cross-source pairing (same FMSPC), not an upstream test
    SGX_DCAPRS.at,
    SGX_DCAPRS.not_before,
    SGX_DCAPRS.not_after,
)

#: Verifiable end to end: with dcap-qvl (TCB info v3) or with attestation.dcap_appraisal_v2.
VERIFIABLE = (SGX_QVL, SGX_DCAPRS, SGX_OCCLUM, TDX_QVL)
#: The samples whose collateral is TCB info v2.
TCB_INFO_V2 = (SGX_DCAPRS, SGX_OCCLUM)
ALL = (SGX_QVL, SGX_DCAPRS, SGX_OCCLUM, TDX_QVL, TDX_QVL_V5, TDX_GO)
