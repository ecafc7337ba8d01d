"""The per-platform evidence verifier contract: one module per platform implements it."""

from __future__ import annotations

from datetime import datetime
from typing import Protocol

from attestation.claims import Claims


class PlatformVerifier(Protocol):
    platform: str

    def verify(self, evidence: bytes, *, at: datetime) -> Claims:
        """Check the evidence's chain (at time ``at``) and signature; return its claims.

        Raises ``MalformedEvidence``, ``ChainInvalid`` or ``EvidenceSignatureInvalid``. Does not
        check nonces or policy: the verifier core does that for every platform alike.
        """
        ...

    def chain_cache_key(self, evidence: bytes) -> bytes:
        """What instances share (e.g. the DER of the attestation-key certificate chain), so the
        core can cache verified chains per platform key or chip."""
        ...
