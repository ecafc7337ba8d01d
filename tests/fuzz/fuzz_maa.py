"""Fuzz MaaVerifier: any exception other than an AttestationError is a crash.

Run: ``python tests/fuzz/fuzz_maa.py -atheris_runs=20000`` (from the repository root).

Each input picks a mode: raw bytes as the token; the real token from vectors/maa/ with characters
overwritten; the real token's segments with one replaced by base64url of fuzz bytes (header or
payload JSON the fuzzer controls); or a token signed by a test key whose claims take fuzz-chosen
JSON values (so that they reach the claims code with a valid signature).
"""

from __future__ import annotations

import base64
import contextlib
import sys
from pathlib import Path
from typing import Any

import atheris

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

with atheris.instrument_imports():
    from attestation.errors import AttestationError
    from attestation.maa import MaaVerifier

from tests.fixtures.maa import IAT, JWKS, TOKEN, TestSigner, real_claims  # noqa: E402

REAL = MaaVerifier(JWKS)
SIGNER = TestSigner()
TEST_VERIFIER = MaaVerifier(SIGNER.jwks())
CLAIMS = sorted(real_claims())
SEGMENTS = TOKEN.split(b".")


def _json_value(fdp: atheris.FuzzedDataProvider, depth: int = 0) -> Any:
    kind = fdp.ConsumeIntInRange(0, 7 if depth < 3 else 5)
    if kind == 0:
        return fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 140))
    if kind == 1:
        return fdp.ConsumeInt(9)
    if kind == 2:
        return fdp.ConsumeRegularFloat()
    if kind == 3:
        return fdp.ConsumeBool()
    if kind == 4:
        return None
    if kind == 5:
        return fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64)).hex()
    if kind == 6:
        return [_json_value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 4))]
    return {
        fdp.ConsumeUnicodeNoSurrogates(8): _json_value(fdp, depth + 1)
        for _ in range(fdp.ConsumeIntInRange(0, 4))
    }


def TestOneInput(data: bytes) -> None:  # atheris' name
    fdp = atheris.FuzzedDataProvider(data)
    mode = fdp.ConsumeIntInRange(0, 3)
    verifier = REAL
    if mode == 0:
        token = fdp.ConsumeBytes(fdp.remaining_bytes())
    elif mode == 1:
        mutated = bytearray(TOKEN)
        for _ in range(fdp.ConsumeIntInRange(1, 8)):
            mutated[fdp.ConsumeIntInRange(0, len(mutated) - 1)] = fdp.ConsumeIntInRange(0, 255)
        token = bytes(mutated)
    elif mode == 2:
        segments = list(SEGMENTS)
        index = fdp.ConsumeIntInRange(0, 2)
        segments[index] = base64.urlsafe_b64encode(fdp.ConsumeBytes(fdp.remaining_bytes())).rstrip(b"=")
        token = b".".join(segments)
    else:
        verifier = TEST_VERIFIER
        overrides = {}
        for _ in range(fdp.ConsumeIntInRange(1, 4)):
            overrides[CLAIMS[fdp.ConsumeIntInRange(0, len(CLAIMS) - 1)]] = _json_value(fdp)
        token = SIGNER.token(overrides)
    at = IAT if fdp.ConsumeBool() else IAT.replace(year=2023 + fdp.ConsumeIntInRange(-5, 30))
    with contextlib.suppress(AttestationError):
        verifier.chain_cache_key(token)
    with contextlib.suppress(AttestationError):
        verifier.verify(token, at=at)


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
