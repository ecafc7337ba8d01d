"""Benchmark: seal/unseal through the v1 envelope against raw AES-256-GCM, in the same run.

The envelope's extra work per blob is a fresh DEK, a DEK wrap/unwrap, header encoding and
parsing, and the bounds-checked parse. The DEK is wrapped by the in-process
``LocalKeyWrapper`` (an AES-GCM wrap in memory) so that the figure measures the envelope,
not the network round trip to a KMS; the KMS cost is measured by the KMS benchmarks.

Ratio = envelope throughput / raw throughput; 1.0 means no overhead. The raw baseline's
``AESGCM.encrypt`` returns bytes that pyo3 zero-fills before the AES pass writes them (about
16 us of its 83 us at 1 MiB here); the envelope encrypts into a zeroed bytearray, the same
cost, so the ratio is the per-blob constant (header, DEK, wrap, key schedule) against the body.

    python -m loadtest.bench_sealing [--seconds 1.0] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sealing.envelope import open_blob, seal
from sealing.keywrap import LocalKeyWrapper

SIZES = {"4 KiB": 4096, "1 MiB": 1 << 20}


def _rate(fn: Callable[[], object], seconds: float) -> float:
    """Operations per second: the median of 5 timed rounds of about ``seconds / 5`` each."""
    fn()  # warm up
    rounds = []
    for _ in range(5):
        count, start = 0, time.perf_counter()
        deadline = start + seconds / 5
        while True:
            fn()
            count += 1
            now = time.perf_counter()
            if now >= deadline:
                break
        rounds.append(count / (now - start))
    return statistics.median(rounds)


def run(seconds: float) -> list[dict[str, object]]:
    wrapper = LocalKeyWrapper("local:bench")
    results: list[dict[str, object]] = []
    for label, size in SIZES.items():
        data = os.urandom(size)
        key = AESGCM.generate_key(bit_length=256)
        aead = AESGCM(key)
        nonce = os.urandom(12)
        aad = b"\x00" * 96  # about the size of a real header
        raw_ct = aead.encrypt(nonce, data, aad)
        blob = bytes(seal(data, wrapper, namespace="bench", name="item", generation="gen-1"))
        assert open_blob(blob, wrapper) == data

        def raw_seal(data: bytes = data, aad: bytes = aad, aead: AESGCM = aead) -> bytes:
            # Raw baseline: what any envelope must do at least (fresh nonce, one AES-GCM pass).
            return aead.encrypt(os.urandom(12), data, aad)

        def raw_open(
            ct: bytes = raw_ct, nonce: bytes = nonce, aad: bytes = aad, aead: AESGCM = aead
        ) -> bytes:
            return aead.decrypt(nonce, ct, aad)

        def env_seal(data: bytes = data) -> bytearray:
            return seal(data, wrapper, namespace="bench", name="item", generation="gen-1")

        def env_open(blob: bytes = blob) -> bytes:
            return open_blob(blob, wrapper)

        for op, raw_fn, env_fn in (("seal", raw_seal, env_seal), ("unseal", raw_open, env_open)):
            raw_rate = _rate(raw_fn, seconds)
            env_rate = _rate(env_fn, seconds)
            results.append(
                {
                    "size": label,
                    "operation": op,
                    "raw_ops_per_s": round(raw_rate, 1),
                    "envelope_ops_per_s": round(env_rate, 1),
                    "envelope_mib_per_s": round(env_rate * size / (1 << 20), 1),
                    "ratio_to_raw": round(env_rate / raw_rate, 3),
                }
            )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=2.0, help="time per measurement (default 2)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args()
    results = run(args.seconds)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"{'size':<7} {'op':<7} {'raw ops/s':>12} {'envelope ops/s':>15} {'MiB/s':>8} {'ratio':>6}")
    for r in results:
        print(
            f"{r['size']:<7} {r['operation']:<7} {r['raw_ops_per_s']:>12,.0f}"
            f" {r['envelope_ops_per_s']:>15,.0f}"
            f" {r['envelope_mib_per_s']:>8,.0f} {r['ratio_to_raw']:>6.3f}"
        )
    print("ratio = envelope throughput / raw AES-256-GCM throughput, same run (goal for 1 MiB: >= 0.9)")


if __name__ == "__main__":
    main()
