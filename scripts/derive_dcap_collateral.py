"""Rebuild vectors/sgx/dcaprs_collateral_v2.derived.json from the dcap-rs files next to it.

    python scripts/derive_dcap_collateral.py           # write the file
    python scripts/derive_dcap_collateral.py --check   # exit 1 unless the file is byte for byte this

The result is the collateral JSON form the SGX verifier reads (dcap-qvl's ``QuoteCollateralV3``
keys), for the dcap-rs quote (FMSPC 00606a000000) and its Intel PCS responses:

* ``tcb_info``: the exact text of the ``tcbInfo`` object of the PCS body
  ``{"tcbInfo":{...},"signature":"..."}`` (the signature is over those bytes, so the substring is
  cut out raw, never re-serialised); ``tcb_info_signature``: the body's ``signature``;
* ``qe_identity`` and ``qe_identity_signature``: likewise from the ``enclaveIdentity`` body;
* ``tcb_info_issuer_chain`` and ``qe_identity_issuer_chain``: ``dcaprs_tcb_signing_chain.pem``
  (TCB Signing cert, Root CA) as it is;
* ``pck_crl_issuer_chain``: the PCK Platform CA and Root CA, the second and third certificate of
  the quote's own PCK chain (dcap-rs ships no separate copy), each PEM block as in the quote;
* ``root_ca_crl`` and ``pck_crl``: the DER CRLs, lowercase hex.

Before writing, the script checks both signatures over the cut-out texts with the TCB Signing
key, so a wrong cut cannot go unnoticed. Output: JSON, two-space indent, keys in the order above,
one trailing newline.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

SGX = Path(__file__).resolve().parents[1] / "vectors" / "sgx"
OUTPUT = SGX / "dcaprs_collateral_v2.derived.json"
_PEM_BLOCK = re.compile(rb"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----\n?", re.S)


def signed_text(path: Path, key: str) -> tuple[str, str]:
    """The raw text of the ``key`` object of a PCS body, and the body's signature (hex)."""
    body = path.read_text(encoding="utf-8")
    prefix = '{"' + key + '":'
    marker = ',"signature":"'
    if not body.startswith(prefix) or body.count(marker) != 1:
        raise SystemExit(f"{path.name} is not a PCS {key} body")
    end = body.index(marker)
    text = body[len(prefix) : end]
    signature = json.loads(body)["signature"]
    if json.loads(text) != json.loads(body)[key] or body[end:] != f'{marker}{signature}"}}':
        raise SystemExit(f"{path.name}: the cut-out {key} text is not the body's {key}")
    return text, signature


def _check_signature(text: str, signature: str, chain: str, what: str) -> None:
    signer = x509.load_pem_x509_certificates(chain.encode())[0].public_key()
    if not isinstance(signer, ec.EllipticCurvePublicKey):
        raise SystemExit(f"the {what} signer's key is not an EC key")
    raw = bytes.fromhex(signature)
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    signer.verify(der, text.encode(), ec.ECDSA(hashes.SHA256()))  # raises InvalidSignature
    print(f"{what}: signature verifies over {len(text)} bytes", file=sys.stderr)


def derive() -> bytes:
    tcb_text, tcb_signature = signed_text(SGX / "dcaprs_tcbinfo_sgx_v2_00606a000000.json", "tcbInfo")
    qe_text, qe_signature = signed_text(SGX / "dcaprs_qeidentity_qe_v2.json", "enclaveIdentity")
    signing_chain = (SGX / "dcaprs_tcb_signing_chain.pem").read_text(encoding="ascii")
    _check_signature(tcb_text, tcb_signature, signing_chain, "tcbInfo")
    _check_signature(qe_text, qe_signature, signing_chain, "enclaveIdentity")
    pck_chain = _PEM_BLOCK.findall((SGX / "dcaprs_sgx_quote_v3.derived.bin").read_bytes())
    if len(pck_chain) != 3:
        raise SystemExit("the dcap-rs quote does not carry a PCK chain of three certificates")
    document = {
        "tcb_info": tcb_text,
        "tcb_info_signature": tcb_signature,
        "tcb_info_issuer_chain": signing_chain,
        "qe_identity": qe_text,
        "qe_identity_signature": qe_signature,
        "qe_identity_issuer_chain": signing_chain,
        "pck_crl_issuer_chain": b"".join(pck_chain[1:]).decode("ascii"),
        "root_ca_crl": (SGX / "dcaprs_intel_root_ca_crl.der").read_bytes().hex(),
        "pck_crl": (SGX / "dcaprs_pck_platform_crl.der").read_bytes().hex(),
    }
    return (json.dumps(document, indent=2) + "\n").encode("ascii")


def main(argv: list[str]) -> int:
    data = derive()
    if argv == ["--check"]:
        if OUTPUT.read_bytes() != data:
            print(f"{OUTPUT.name} differs from what the dcap-rs files give", file=sys.stderr)
            return 1
        print(f"{OUTPUT.name} is up to date", file=sys.stderr)
        return 0
    if argv:
        print(__doc__, file=sys.stderr)
        return 2
    OUTPUT.write_bytes(data)
    print(f"wrote {OUTPUT.name} ({len(data)} bytes)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
