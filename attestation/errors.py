"""Typed attestation errors. Exit codes follow the CLI: 2 malformed or unverifiable evidence,
3 a policy denial."""

from __future__ import annotations


class AttestationError(Exception):
    exit_code = 2


class MalformedEvidence(AttestationError):
    """The evidence cannot be parsed (wrong size, bad encoding, missing chain)."""


class EvidenceSignatureInvalid(AttestationError):
    """The evidence signature does not verify with the attestation key in its chain."""


class ChainInvalid(AttestationError):
    """The certificate chain does not lead to a trusted root, or a certificate is not valid at the time."""


class NonceMismatch(AttestationError):
    """The evidence does not bind the nonce the verifier expected."""


class PolicyDenied(AttestationError):
    """The claims do not satisfy the policy. ``reasons`` lists every reason in words."""

    exit_code = 3

    def __init__(self, reasons: list[str]) -> None:
        self.reasons = list(reasons)
        super().__init__("denied by policy: " + "; ".join(self.reasons))


class TokenInvalid(AttestationError):
    """An attestation-result token failed verification (signature, expiry, audience, policy)."""


class TokenNonceMismatch(TokenInvalid, NonceMismatch):
    """A presented token was issued for another nonce than the one the caller expects now (an old
    token replayed against a fresh challenge)."""


class RetryAfter(AttestationError):
    """Admission control: the verifier is at capacity; try again after ``seconds``."""

    exit_code = 75  # EX_TEMPFAIL

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        super().__init__(f"verifier at capacity; retry after {seconds:.1f}s")
