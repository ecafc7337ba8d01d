"""Platform-neutral claims: what a verifier learned from one piece of evidence."""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any


@dataclass(frozen=True)
class Claims:
    """Claims extracted from verified evidence. Binary values are lowercase hex."""

    platform: str  # sim | sgx | sev-snp | tdx | nitro
    measurement: str  # MRENCLAVE / launch digest / MRTD / PCR0
    signer: str  # MRSIGNER / ID-key digest / PCR8
    product_id: int
    svn: int
    debug: bool
    tcb_status: str  # e.g. UpToDate, OutOfDate, SWHardeningNeeded
    report_data: str  # 64 bytes the enclave bound into its evidence
    evidence_digest: str  # SHA-256 of the raw evidence
    evidence_time: datetime | None  # when the evidence was produced, if the platform says
    nonce: str | None = None  # the verifier's nonce, once checked against report data
    cpu_svn: str = ""  # platform TCB component (SGX CPUSVN), where the platform has one
    advisories: tuple[str, ...] = ()  # TCB advisory ids (INTEL-SA-00615, ...) the appraisal named
    #: the platform's own named fields beyond the neutral ones, sorted by name, values as strings
    #: (hex for binary): e.g. ("mrsigner", ...), ("rtmr0", ...), ("host_data", ...), ("pcr1", ...)
    details: tuple[tuple[str, str], ...] = ()

    def detail(self, name: str) -> str | None:
        return dict(self.details).get(name)

    def to_dict(self) -> dict[str, Any]:
        # Every field is a str, int, bool or None but one: a flat copy, not ``asdict``'s deep copy
        # (which cost a result token a quarter of its issuing time).
        data = {name: getattr(self, name) for name in _FIELD_NAMES}
        data["evidence_time"] = self.evidence_time.isoformat() if self.evidence_time else None
        data["advisories"] = list(self.advisories)
        data["details"] = dict(self.details)
        return data


_FIELD_NAMES = tuple(item.name for item in fields(Claims))
