"""Atheris harness for the DCAP quote parser and the SGX/TDX verifiers.

    python tests/fuzz/fuzz_dcap.py -atheris_runs=20000

Each input is either raw bytes for the parser and the verifiers, or edits (overwritten bytes,
inserted length fields, a cut) applied to one of the real quotes of vectors/, so the fuzzer
reaches past the header into the signature data and the PCK chain. The SGX quotes are verified
against TCB info v3 collateral (dcap-qvl) and, the dcap-rs and Occlum quotes, against the dcap-rs
TCB info v2 collateral (``attestation.dcap_appraisal_v2``, which also reads the PCK leaf's SGX
extension itself). Every path is verified at the quote's own time, directly and against the
untouched quote's cached chain. Any exception other than an ``AttestationError`` is a crash.
"""

from __future__ import annotations

import contextlib
import sys
from datetime import datetime
from pathlib import Path

import atheris
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

with atheris.instrument_imports(include=["attestation"]):
    from attestation import dcap_pck_extension
    from attestation.dcap import SgxDcapVerifier, TdxVerifier
    from attestation.dcap_quote import parse_quote
    from attestation.errors import AttestationError

VECTORS = ROOT / "vectors"


def _at(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


SGX_VERIFIER = SgxDcapVerifier((VECTORS / "sgx" / "dcapqvl_sgx_quote_v3_collateral.json").read_text())
SGX_V2_VERIFIER = SgxDcapVerifier((VECTORS / "sgx" / "dcaprs_collateral_v2.derived.json").read_text())
TDX_VERIFIER = TdxVerifier((VECTORS / "tdx" / "dcapqvl_tdx_quote_v4_collateral.json").read_text())
SGX_AT = _at("2025-07-19T10:01:17Z")
SGX_V2_AT = _at("2025-02-13T04:00:32Z")
TDX_AT = _at("2025-07-19T10:00:34Z")
DCAPRS_QUOTE = (VECTORS / "sgx" / "dcaprs_sgx_quote_v3.derived.bin").read_bytes()
OCCLUM_QUOTE = (VECTORS / "sgx" / "trustee_occlum_sgx_quote_v3.dat").read_bytes()
SEEDS = [
    (SGX_VERIFIER, SGX_AT, (VECTORS / "sgx" / "dcapqvl_sgx_quote_v3.dat").read_bytes()),
    (SGX_VERIFIER, SGX_AT, OCCLUM_QUOTE),
    (SGX_V2_VERIFIER, SGX_V2_AT, DCAPRS_QUOTE),
    (SGX_V2_VERIFIER, SGX_V2_AT, OCCLUM_QUOTE),
    (TDX_VERIFIER, TDX_AT, (VECTORS / "tdx" / "dcapqvl_tdx_quote_v4.dat").read_bytes()),
    (TDX_VERIFIER, TDX_AT, (VECTORS / "tdx" / "dcapqvl_tdx_quote_v5_outdated.dat").read_bytes()),
]


def _fields(seed: bytes) -> list[int]:
    """Where the seed's length and type fields are: the edits aim there half of the time."""
    quote = parse_quote(seed)
    signed = len(quote.signed)
    qe = seed.index(quote.qe_report)
    auth = qe + 448
    cert = auth + 2 + len(quote.qe_auth_data)
    return [0, 2, 4, 48, 50, signed, signed + 132, signed + 134, qe - 6, qe - 4, auth, cert, cert + 2]


FIELDS = {id(seed): _fields(seed) for _, _, seed in SEEDS}
CHAINS = {
    id(SGX_VERIFIER): SGX_VERIFIER.verify_chain(SEEDS[0][2], SGX_AT),
    id(SGX_V2_VERIFIER): SGX_V2_VERIFIER.verify_chain(DCAPRS_QUOTE, SGX_V2_AT),
    id(TDX_VERIFIER): TDX_VERIFIER.verify_chain(SEEDS[4][2], TDX_AT),
}


LEAF_KEY = ec.generate_private_key(ec.SECP256R1())
_REAL_LEAF = x509.load_pem_x509_certificate(
    DCAPRS_QUOTE[DCAPRS_QUOTE.index(b"-----BEGIN CERTIFICATE-----") :].split(b"-----END CERTIFICATE-----")[0]
    + b"-----END CERTIFICATE-----\n"
)
_EXTENSION = _REAL_LEAF.extensions.get_extension_for_oid(dcap_pck_extension.SGX_EXTENSION_OID).value
assert isinstance(_EXTENSION, x509.UnrecognizedExtension)
EXTENSION = _EXTENSION.value


def _edited(fdp: atheris.FuzzedDataProvider, seed: bytes) -> bytes:
    data = bytearray(seed)
    for _ in range(fdp.ConsumeIntInRange(1, 3)):
        action = fdp.ConsumeIntInRange(0, 3)
        if fdp.ConsumeBool():
            position = fdp.PickValueInList(FIELDS[id(seed)])
        else:
            position = fdp.ConsumeIntInRange(0, max(len(data) - 1, 0))
        if action == 0:  # overwrite a few bytes
            chunk = fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 4))
            data[position : position + len(chunk)] = chunk
        elif action == 1:  # a length field set to an edge value
            value = fdp.PickValueInList([0, 1, 0xFF, 0xFFFF, 0xFFFFFFFF, len(data), len(data) + 1])
            width = fdp.PickValueInList([2, 4])
            data[position : position + width] = (value & ((1 << (8 * width)) - 1)).to_bytes(width, "little")
        elif action == 2:  # cut
            del data[position:]
        else:  # insert
            data[position:position] = fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 16))
    return bytes(data)


def _pck_leaf_edited(fdp: atheris.FuzzedDataProvider) -> None:
    """Fuzzed DER as the PCK leaf's Intel SGX extension value (parsed, never trusted)."""
    value = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 700))
    if fdp.ConsumeBool():  # start from the real value, with a few bytes overwritten
        real = bytearray(EXTENSION)
        start = fdp.ConsumeIntInRange(0, len(real) - 1)
        real[start : start + 8] = value[:8]
        value = bytes(real)
    with contextlib.suppress(AttestationError):
        dcap_pck_extension.parse_sgx_extension(_leaf_with(value))


def _leaf_with(value: bytes) -> x509.Certificate:
    extension = x509.UnrecognizedExtension(dcap_pck_extension.SGX_EXTENSION_OID, value)
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "Intel SGX PCK Certificate")])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(LEAF_KEY.public_key())
        .serial_number(1)
        .not_valid_before(SGX_V2_AT)
        .not_valid_after(SGX_V2_AT)
        .add_extension(extension, critical=False)
    )
    return builder.sign(LEAF_KEY, hashes.SHA256())


def _check(verifier: SgxDcapVerifier | TdxVerifier, at: datetime, evidence: bytes) -> None:
    for call in (
        lambda: parse_quote(evidence),
        lambda: verifier.chain_cache_key(evidence),
        lambda: verifier.verify(evidence, at=at),
        lambda: verifier.verify_with_chain(evidence, CHAINS[id(verifier)], at),
    ):
        with contextlib.suppress(AttestationError):
            call()


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    if fdp.ConsumeIntInRange(0, 7) == 0:
        _pck_leaf_edited(fdp)
        return
    if fdp.ConsumeBool():
        raw = fdp.ConsumeBytes(fdp.remaining_bytes())
        _check(SGX_VERIFIER, SGX_AT, raw)
        _check(SGX_V2_VERIFIER, SGX_V2_AT, raw)
        _check(TDX_VERIFIER, TDX_AT, raw)
        return
    verifier, at, seed = SEEDS[fdp.ConsumeIntInRange(0, len(SEEDS) - 1)]
    _check(verifier, at, _edited(fdp, seed))


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
