"""Storm control with the real sim verifier: a rolling update of many enclaves on one host."""

from __future__ import annotations

import asyncio
import os
from datetime import UTC, datetime
from pathlib import Path

from attestation.policy import parse_policy
from attestation.sim import SimVerifier
from attestation.token import ResultSigner, verify_result
from attestation.verifier import Verifier
from sealing.handoff import report_data_for
from sealing.tee.sim import EnclaveIdentity, SimHost

SIGNER = bytes.fromhex("83" * 32)


async def test_rolling_update_verifies_the_host_chain_once(tmp_path: Path) -> None:
    host = SimHost.load_or_create(tmp_path / "host")
    enclave = host.enclave(EnclaveIdentity(bytes(32), SIGNER, product_id=1, svn=2))
    policy = parse_policy(
        {"id": "fleet", "rules": [{"platform": "sim", "signer": SIGNER.hex(), "product_id": 1, "min_svn": 2}]}
    )
    signer = ResultSigner.generate()
    verifier = Verifier({"sim": SimVerifier(host.root_ca_pem())}, signer, max_concurrent=4, max_queue=1000)
    requests = []
    for _ in range(150):  # every enclave attests with its own nonce and key: no two evidences alike
        nonce, key = os.urandom(32), os.urandom(1216)
        requests.append((enclave.report(report_data_for(nonce, key)), nonce, key))

    tokens = await asyncio.gather(
        *(
            verifier.verify(
                evidence,
                platform="sim",
                expected_nonce=nonce,
                policy=policy,
                audience="kms",
                cnf_public_key=key,
            )
            for evidence, nonce, key in requests
        )
    )
    stats = verifier.stats()
    assert stats["verified"] == 150
    assert stats["chain_cache_misses"] == 1 and stats["chain_cache_hits"] == 149
    result = verify_result(
        tokens[0], public_key=signer.public_key, audience="kms", policy_id="fleet", now=datetime.now(UTC)
    )
    assert result.claims.svn == 2 and result.claims.platform == "sim"
