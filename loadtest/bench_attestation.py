"""Benchmark: an attestation storm through the verifier core, shared caches on against caches off.

A rolling update makes every enclave of a fleet re-attest at once, each with fresh evidence (its
own nonce and key), so whole results cannot be cached. What instances share is the platform's
certificate chain (one per host here; per chip or per platform key on hardware). The verifier core
caches verified chains and verifies a chain once for all concurrent evidences that carry it.

The benchmark produces ``--evidences`` fresh sim evidences spread over ``--hosts`` simulated hosts
(every one with its own nonce and HPKE-sized key, so no two are alike), then lets ``--callers``
concurrent callers (asyncio tasks, closed loop: each sends its next request when the previous one
is answered) push all of them through ``Verifier.verify`` against a policy that admits them, twice
in the same run:

* **cached**: the verifier as rekey runs it (chain cache, chain single flight);
* **uncached**, the baseline: the same verifier, platform verifier and admission limits, but the
  platform verifier offers only ``verify`` (no chain cache key), so every evidence verifies its
  chain again, as a verifier without storm control does.

Both runs are made for two chain cost models (``--chain``, default both):

* **sim**: the sim chain as it is, one platform certificate signed by the host's P-256 root
  (about 0.1 ms to verify). It costs less than what every evidence needs anyway (its own P-256
  signature, about 60 us, and an ES256 result token, about 30 us), so no chain cache can make
  this model much more than twice as fast: (per-evidence + chain) / per-evidence.
* **dcap**: the sim chain plus the collateral an Intel DCAP quote verifier checks for every quote
  (``loadtest.dcap_collateral``): the PCK chain to a pinned root, the TCB Signing certificate, the
  root's and the Platform CA's CRLs, a signed 18 KB TCB Info and a signed QE Identity document,
  eight more P-256 signatures, parsed and checked for real, about 1 ms, with each evidence's CPU
  SVN matched against the TCB levels. This is what a storm costs on SGX or TDX hardware; the
  per-evidence work stays the sim's, which is DCAP's (one P-256 quote signature). Not modelled:
  fetching collateral from a PCCS (a round trip per quote without a cache), and SEV-SNP, whose
  VCEK->ASK->ARK chain (three RSA-PSS 4096 signatures and an RSA-signed CRL, about 0.3 ms here)
  is cheaper than its per-report ECDSA P-384 check (about 0.4 ms), so there the cache saves the
  KDS fetches more than CPU.

Reported for each: verifications per second, process CPU time per verification (steadier than
throughput on a shared machine), chain verifications (goal for the cached run: at most one per
host, plus refreshes when a chain's cache entry expires, which a run this short never reaches),
p50/p99/max latency per call, and the cached/uncached ratios. Latencies are exact percentiles of
every call (10,000 samples fit in memory; an HDR histogram would only round them). Every call must
succeed; a failure ends the benchmark with an error.

    python -m loadtest.bench_attestation [--evidences 10000] [--hosts 10] [--callers 64]
        [--chain sim|dcap|both] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from attestation.claims import Claims
from attestation.errors import ChainInvalid
from attestation.policy import Policy, parse_policy
from attestation.sim import SimVerifier, VerifiedChain
from attestation.token import ResultSigner
from attestation.verifier import Verifier
from loadtest.dcap_collateral import HostCollateral, TcbLevel, make_collateral, make_root, tcb_status
from sealing.handoff import report_data_for
from sealing.tee.sim import EnclaveIdentity, SimHost

SIGNER = bytes.fromhex("5a" * 32)
PRODUCT_ID = 7
SVN = 3
PUBLIC_KEY_BYTES = 1216  # the size of an agent's ML-KEM-768 + X25519 handoff key
AUDIENCE = "rekey-bench"


@dataclass(frozen=True)
class Request:
    evidence: bytes
    nonce: bytes
    public_key: bytes


@dataclass(frozen=True)
class Fleet:
    hosts: list[SimHost]
    requests: list[Request]
    trusted_root_der: bytes  # the DCAP model's root, one for the fleet as Intel's is
    collateral: dict[bytes, HostCollateral]  # per platform certificate (DER)


@dataclass(frozen=True)
class ModelChain:
    """A verified sim chain and, in the DCAP model, the host's verified collateral."""

    sim: VerifiedChain
    tcb_levels: tuple[TcbLevel, ...] | None
    not_after: datetime


class FleetVerifier:
    """The ``sim`` platform verifier of a fleet: each sim host has its own root CA, so this trusts
    every host's root and hands an evidence to the ``SimVerifier`` of the host whose platform
    certificate it carries (a dictionary lookup). Chain verifications are counted (thread-safe:
    the core runs them in its thread pool). ``caching=False`` hides ``verify_chain`` and
    ``verify_with_chain``, so the core calls ``verify`` (chain and signature) for every evidence.

    ``chain="dcap"`` makes a chain verification also check the host's DCAP-shaped collateral
    (``loadtest.dcap_collateral``: eight more P-256 signatures, two CRLs, two JSON documents) and
    each evidence's CPU SVN against the TCB levels found there, which must say ``UpToDate``."""

    platform = "sim"

    def __init__(self, fleet: Fleet, *, caching: bool, chain: str) -> None:
        self._by_cert = {host.platform_cert_der: SimVerifier(host.root_ca_pem()) for host in fleet.hosts}
        self._fleet = fleet
        self._dcap = chain == "dcap"
        self._lock = threading.Lock()
        self.chain_verifications = 0
        if caching:
            self.verify_chain = self._verify_chain
            self.verify_with_chain = self._verify_with_chain
            self.verify_with_chain_inline = SimVerifier.verify_with_chain_inline

    def _host_verifier(self, evidence: bytes) -> SimVerifier:
        cert = next(iter(self._by_cert.values())).chain_cache_key(evidence)  # parses the structure
        verifier = self._by_cert.get(cert)
        if verifier is None:
            raise ChainInvalid("the evidence carries the platform certificate of no host of this fleet")
        return verifier

    def _count(self) -> None:
        with self._lock:
            self.chain_verifications += 1

    def verify(self, evidence: bytes, *, at: datetime) -> Claims:
        return self._verify_with_chain(evidence, self._verify_chain(evidence, at), at)

    def _verify_chain(self, evidence: bytes, at: datetime) -> ModelChain:
        self._count()
        sim = self._host_verifier(evidence).verify_chain(evidence, at)
        if not self._dcap:
            return ModelChain(sim, None, sim.not_after)
        levels, not_after = self._fleet.collateral[sim.cert_der].check(self._fleet.trusted_root_der, at)
        return ModelChain(sim, levels, min(sim.not_after, not_after))

    def _verify_with_chain(self, evidence: bytes, chain: object, at: datetime) -> Claims:
        if not isinstance(chain, ModelChain):
            raise ChainInvalid("not a chain of this fleet")
        if at > chain.not_after:
            raise ChainInvalid("the chain or its collateral expired")
        claims = self._host_verifier(evidence).verify_with_chain(evidence, chain.sim, at)
        if chain.tcb_levels is not None:
            status = tcb_status(chain.tcb_levels, bytes.fromhex(claims.cpu_svn))
            if status != "UpToDate":
                raise ChainInvalid(f"the platform's TCB is {status}")
        return claims

    def chain_cache_key(self, evidence: bytes) -> bytes:
        return next(iter(self._by_cert.values())).chain_cache_key(evidence)


def make_fleet(root: Path, hosts: int, evidences: int) -> Fleet:
    """``hosts`` sim hosts (each its own root secret, platform key and root CA, and DCAP-model
    collateral) and ``evidences`` fresh evidences of one enclave build, round-robin over the hosts."""
    fleet = [SimHost.load_or_create(root / f"host-{index}") for index in range(hosts)]
    root_key, root_cert = make_root()
    collateral = {
        host.platform_cert_der: make_collateral(root_key, root_cert, host.cpu_svn) for host in fleet
    }
    identity = EnclaveIdentity(os.urandom(32), SIGNER, product_id=PRODUCT_ID, svn=SVN)
    enclaves = [host.enclave(identity) for host in fleet]
    requests = []
    for index in range(evidences):
        nonce, public_key = os.urandom(32), os.urandom(PUBLIC_KEY_BYTES)
        evidence = enclaves[index % hosts].report(report_data_for(nonce, public_key))
        requests.append(Request(evidence, nonce, public_key))
    return Fleet(fleet, requests, root_cert.public_bytes(serialization.Encoding.DER), collateral)


def fleet_policy() -> Policy:
    return parse_policy(
        {
            "id": "bench-fleet",
            "rules": [
                {"platform": "sim", "signer": SIGNER.hex(), "product_id": PRODUCT_ID, "min_svn": SVN},
            ],
        }
    )


async def storm(
    fleet: Fleet, *, callers: int, caching: bool, max_concurrent: int, chain: str = "sim"
) -> dict[str, Any]:
    requests = fleet.requests
    platform = FleetVerifier(fleet, caching=caching, chain=chain)
    policy = fleet_policy()
    # A queue as deep as the callers: this benchmark measures verification, not admission control.
    verifier = Verifier(
        {"sim": platform}, ResultSigner.generate(), max_concurrent=max_concurrent, max_queue=callers
    )
    latencies: list[float] = []
    pending = iter(requests)

    async def caller() -> None:
        for request in pending:  # one shared iterator: every request is sent exactly once
            started = time.perf_counter()
            await verifier.verify(
                request.evidence,
                platform="sim",
                expected_nonce=request.nonce,
                policy=policy,
                audience=AUDIENCE,
                cnf_public_key=request.public_key,
            )
            latencies.append(time.perf_counter() - started)

    started, cpu_started = time.perf_counter(), time.process_time()
    try:
        await asyncio.gather(*(caller() for _ in range(callers)))
    finally:
        verifier.close()
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    stats = verifier.stats()
    if stats["verified"] != len(requests):
        raise RuntimeError(f"{stats['verified']} of {len(requests)} verifications succeeded: {stats}")
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    return {
        "chain": chain,
        "mode": "cached" if caching else "uncached",
        "verifications": stats["verified"],
        "seconds": round(elapsed, 3),
        "per_s": round(len(requests) / elapsed, 1),
        "cpu_us": round(cpu / len(requests) * 1e6, 1),
        "chain_verifications": platform.chain_verifications,
        "chain_cache_hits": stats["chain_cache_hits"],
        "p50_ms": round(cuts[49] * 1000, 2),
        "p99_ms": round(cuts[98] * 1000, 2),
        "max_ms": round(max(latencies) * 1000, 2),
    }


CHAINS = ("sim", "dcap")


def run(
    *,
    evidences: int,
    hosts: int,
    callers: int,
    max_concurrent: int,
    chains: tuple[str, ...] = CHAINS,
    workdir: Path | None = None,
) -> dict[str, Any]:
    if not 1 <= hosts <= evidences:
        raise ValueError("--hosts must be between 1 and --evidences")
    models = []
    with tempfile.TemporaryDirectory(prefix="rekey-bench-attest-", dir=workdir) as tmp:
        started = time.perf_counter()
        fleet = make_fleet(Path(tmp), hosts, evidences)
        generated = time.perf_counter() - started
        for chain in chains:
            # The baseline first, then the cached run: neither profits from the other's warm caches.
            options = {"callers": callers, "max_concurrent": max_concurrent, "chain": chain}
            uncached = asyncio.run(storm(fleet, caching=False, **options))  # type: ignore[arg-type]
            cached = asyncio.run(storm(fleet, caching=True, **options))  # type: ignore[arg-type]
            models.append(
                {
                    "chain": chain,
                    "results": [cached, uncached],
                    "throughput_ratio_cached_to_uncached": round(cached["per_s"] / uncached["per_s"], 3),
                    "cpu_ratio_uncached_to_cached": round(uncached["cpu_us"] / cached["cpu_us"], 3),
                    "chain_goal_met": cached["chain_verifications"] <= hosts,
                }
            )
    return {
        "evidences": evidences,
        "hosts": hosts,
        "callers": callers,
        "max_concurrent": max_concurrent,
        "cores": os.cpu_count(),
        "evidence_generation_s": round(generated, 2),
        "models": models,
        "chain_goal_met": all(model["chain_goal_met"] for model in models),
    }


def print_report(report: dict[str, Any]) -> None:
    print(
        f"{report['evidences']:,} fresh sim evidences from {report['hosts']} hosts,"
        f" {report['callers']} concurrent callers, {report['max_concurrent']} verification threads,"
        f" {report['cores']} cores"
    )
    print(
        f"{'chain':<5} {'mode':<9} {'verif/s':>9} {'CPU us':>7} {'chain verifs':>13}"
        f" {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}"
    )
    for model in report["models"]:
        for r in model["results"]:
            print(
                f"{r['chain']:<5} {r['mode']:<9} {r['per_s']:>9,.0f} {r['cpu_us']:>7,.0f}"
                f" {r['chain_verifications']:>13,} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f}"
                f" {r['max_ms']:>8.2f}"
            )
    for model in report["models"]:
        goal = "met" if model["chain_goal_met"] else "MISSED"
        print(
            f"{model['chain']}: cached/uncached throughput"
            f" {model['throughput_ratio_cached_to_uncached']:.3f},"
            f" CPU per verification uncached/cached {model['cpu_ratio_uncached_to_cached']:.3f};"
            f" chain verifications in the cached run <= one per host: {goal}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--evidences", type=int, default=10_000, help="fresh evidences (default 10000)")
    parser.add_argument("--hosts", type=int, default=10, help="simulated hosts (default 10)")
    parser.add_argument("--callers", type=int, default=64, help="concurrent callers (default 64)")
    parser.add_argument(
        "--max-concurrent", type=int, default=8, help="the verifier's verification threads (default 8)"
    )
    parser.add_argument(
        "--chain",
        choices=(*CHAINS, "both"),
        default="both",
        help="chain cost model: sim (the sim chain as it is), dcap (plus DCAP collateral), both (default)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--out", type=Path, help="also write the JSON report to this file")
    args = parser.parse_args(argv)
    if min(args.evidences, args.hosts, args.callers, args.max_concurrent) < 1:
        parser.error("--evidences, --hosts, --callers and --max-concurrent must be at least 1")
    try:
        report = run(
            evidences=args.evidences,
            hosts=args.hosts,
            callers=args.callers,
            max_concurrent=args.max_concurrent,
            chains=CHAINS if args.chain == "both" else (args.chain,),
        )
    except ValueError as exc:
        parser.error(str(exc))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
    return 0 if report["chain_goal_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
