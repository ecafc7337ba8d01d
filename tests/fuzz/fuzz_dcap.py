"""Atheris harness for the DCAP quote parser and the SGX/TDX verifiers.

    python tests/fuzz/fuzz_dcap.py -atheris_runs=20000

Each input is either raw bytes for the parser and both verifiers, or edits (overwritten bytes,
inserted length fields, a cut) applied to one of the real quotes of vectors/, so the fuzzer
reaches past the header into the signature data and the PCK chain. Both paths are verified at
the quote's own time, directly and against the untouched quote's cached chain. Any exception
other than an ``AttestationError`` is a crash.
"""

from __future__ import annotations

import contextlib
import sys
from datetime import datetime
from pathlib import Path

import atheris

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

with atheris.instrument_imports(include=["attestation"]):
    from attestation.dcap import SgxDcapVerifier, TdxVerifier
    from attestation.dcap_quote import parse_quote
    from attestation.errors import AttestationError

VECTORS = ROOT / "vectors"


def _at(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


SGX_VERIFIER = SgxDcapVerifier((VECTORS / "sgx" / "dcapqvl_sgx_quote_v3_collateral.json").read_text())
TDX_VERIFIER = TdxVerifier((VECTORS / "tdx" / "dcapqvl_tdx_quote_v4_collateral.json").read_text())
SGX_AT = _at("2025-07-19T10:01:17Z")
TDX_AT = _at("2025-07-19T10:00:34Z")
SEEDS = [
    (SGX_VERIFIER, SGX_AT, (VECTORS / "sgx" / "dcapqvl_sgx_quote_v3.dat").read_bytes()),
    (SGX_VERIFIER, SGX_AT, (VECTORS / "sgx" / "trustee_occlum_sgx_quote_v3.dat").read_bytes()),
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
    id(TDX_VERIFIER): TDX_VERIFIER.verify_chain(SEEDS[2][2], TDX_AT),
}


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
    if fdp.ConsumeBool():
        raw = fdp.ConsumeBytes(fdp.remaining_bytes())
        _check(SGX_VERIFIER, SGX_AT, raw)
        _check(TDX_VERIFIER, TDX_AT, raw)
        return
    verifier, at, seed = SEEDS[fdp.ConsumeIntInRange(0, len(SEEDS) - 1)]
    _check(verifier, at, _edited(fdp, seed))


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
