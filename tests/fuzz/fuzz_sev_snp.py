"""Fuzz the SEV-SNP report parser and verifier with atheris.

    python tests/fuzz/fuzz_sev_snp.py -atheris_runs=20000

Each input is either raw bytes for ``parse_report`` and ``verify``, or a real sample (report, the
report with its certificates appended, or the JSON form) with a few bytes overwritten, so the
fuzzer spends its time behind the structure checks. Any exception other than ``AttestationError``
is a crash.
"""

from __future__ import annotations

import contextlib
import sys
from datetime import UTC, datetime
from pathlib import Path

import atheris

with atheris.instrument_imports():
    from attestation.errors import AttestationError
    from attestation.sev_snp import SevSnpVerifier
    from attestation.sev_snp_report import parse_report

VECTORS = Path(__file__).resolve().parents[2] / "vectors" / "sev-snp"
AT = datetime(2026, 11, 27, tzinfo=UTC)
REPORT = (VECTORS / "trustee_milan_report.bin").read_bytes()
VCEK = (VECTORS / "trustee_milan_vcek.der").read_bytes()
SEEDS = (
    REPORT,
    REPORT + VCEK,
    REPORT + (VECTORS / "azure_cvm_milan_vcek.pem").read_bytes(),
    (VECTORS / "trustee_e2e_snp_evidence.json").read_bytes(),
)
WITH_COLLATERAL = SevSnpVerifier(VCEK)
WITHOUT = SevSnpVerifier()


def mutate(fdp: atheris.FuzzedDataProvider) -> bytes:
    data = bytearray(SEEDS[fdp.ConsumeIntInRange(0, len(SEEDS) - 1)])
    for _ in range(fdp.ConsumeIntInRange(1, 8)):
        if not data or fdp.remaining_bytes() < 3:
            break
        position = fdp.ConsumeIntInRange(0, len(data) - 1)
        action = fdp.ConsumeIntInRange(0, 2)
        if action == 0:
            data[position] = fdp.ConsumeInt(1) & 0xFF
        elif action == 1:
            del data[position:]
        else:
            data[position:position] = fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 16))
    return bytes(data)


def test_one_input(raw: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(raw)
    mode = fdp.ConsumeIntInRange(0, 3)
    data = fdp.ConsumeBytes(fdp.remaining_bytes()) if mode == 0 else mutate(fdp)
    for call in (
        lambda: parse_report(data),
        lambda: WITH_COLLATERAL.verify(data, at=AT),
        lambda: WITHOUT.verify(data, at=AT),
        lambda: WITHOUT.chain_cache_key(data),
    ):
        with contextlib.suppress(AttestationError):
            call()


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
