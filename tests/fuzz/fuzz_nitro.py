"""Fuzz NitroVerifier: any exception other than an AttestationError is a crash.

Run: ``python tests/fuzz/fuzz_nitro.py -atheris_runs=20000`` (from the repository root).

Each input picks a mode: raw bytes as evidence; a real document from vectors/nitro/ with bytes
overwritten; a real document cut and followed by fuzz bytes; or a document signed by a test CA
whose payload fields take fuzz-chosen CBOR values (so that the fields reach the claims code with
a valid signature).
"""

from __future__ import annotations

import base64
import contextlib
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import atheris

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

with atheris.instrument_imports():
    from attestation.errors import AttestationError
    from attestation.nitro import NitroVerifier

from tests.fixtures.nitro import NitroTestCA  # noqa: E402

VECTORS = REPO / "vectors" / "nitro"
SAMPLES: list[tuple[bytes, datetime]] = []
for name, millis in [
    ("blocky_nitro_attestation.b64", 1725719859545),
    ("blocky_nitro_attestation_debug.b64", 1725719886508),
    ("evervault_nondebug_doc_18-1-23.derived.cbor", 1674047239280),
    ("evervault_valid_attestation_doc.b64", 1695049410860),
    ("evervault_beta_valid_attestation_doc.cbor", 1665651482136),
]:
    raw = (VECTORS / name).read_bytes()
    SAMPLES.append(
        (base64.b64decode(raw) if name.endswith(".b64") else raw, datetime.fromtimestamp(millis / 1000, UTC))
    )

PINNED = NitroVerifier()
TEST_AT = datetime(2026, 11, 27, 12, tzinfo=UTC)
TEST_CA = NitroTestCA.create(TEST_AT)
TEST_VERIFIER = NitroVerifier(root_pem=TEST_CA.root_pem)
FIELDS = (
    "module_id",
    "digest",
    "timestamp",
    "pcrs",
    "certificate",
    "cabundle",
    "public_key",
    "user_data",
    "nonce",
)


def _value(fdp: atheris.FuzzedDataProvider, depth: int = 0) -> Any:
    kind = fdp.ConsumeIntInRange(0, 8 if depth < 3 else 5)
    if kind == 0:
        return fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 1100))
    if kind == 1:
        return fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 64))
    if kind == 2:
        return fdp.ConsumeInt(9)
    if kind == 3:
        return fdp.ConsumeBool()
    if kind == 4:
        return None
    if kind == 5:
        return fdp.ConsumeRegularFloat()
    if kind == 6:
        return [_value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 4))]
    if kind == 7:
        return {
            fdp.ConsumeIntInRange(-2, 40): _value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 4))
        }
    return {
        fdp.ConsumeUnicodeNoSurrogates(8): _value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 4))
    }


def _signed_with_fuzzed_fields(fdp: atheris.FuzzedDataProvider) -> bytes:
    overrides: dict[str, Any] = {}
    for _ in range(fdp.ConsumeIntInRange(1, 3)):
        field = FIELDS[fdp.ConsumeIntInRange(0, len(FIELDS) - 1)]
        if field == "pcrs" and fdp.ConsumeBool():
            overrides[field] = {
                fdp.ConsumeIntInRange(-1, 33): fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64))
                for _ in range(fdp.ConsumeIntInRange(0, 34))
            }
        else:
            overrides[field] = _value(fdp)
    return TEST_CA.document(TEST_AT, **overrides)


def TestOneInput(data: bytes) -> None:  # atheris' name
    fdp = atheris.FuzzedDataProvider(data)
    mode = fdp.ConsumeIntInRange(0, 3)
    verifier, at = PINNED, TEST_AT
    if mode == 0:
        evidence = fdp.ConsumeBytes(fdp.remaining_bytes())
    elif mode in (1, 2):
        sample, at = SAMPLES[fdp.ConsumeIntInRange(0, len(SAMPLES) - 1)]
        if mode == 1:
            document = bytearray(sample)
            for _ in range(fdp.ConsumeIntInRange(1, 8)):
                document[fdp.ConsumeIntInRange(0, len(document) - 1)] = fdp.ConsumeIntInRange(0, 255)
            evidence = bytes(document)
        else:
            evidence = sample[: fdp.ConsumeIntInRange(0, len(sample))] + fdp.ConsumeBytes(
                fdp.remaining_bytes()
            )
        if fdp.ConsumeBool():
            evidence = base64.b64encode(evidence)
    else:
        verifier = TEST_VERIFIER
        try:
            evidence = _signed_with_fuzzed_fields(fdp)
        except Exception:  # values cbor2 cannot encode: not an input the verifier sees
            return
    at += timedelta(seconds=fdp.ConsumeIntInRange(-10, 10))
    with contextlib.suppress(AttestationError):
        verifier.chain_cache_key(evidence)
    with contextlib.suppress(AttestationError):
        verifier.verify(evidence, at=at)


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
