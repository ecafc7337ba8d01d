"""Parser for Intel DCAP ECDSA quotes: SGX quote v3, TDX quote v4 and v5.

Structure only: this module checks sizes, versions and the nesting of the signature data, and
returns the fields; it verifies nothing (``attestation.dcap`` does). Every problem is a one-line
``MalformedEvidence``; no ``IndexError`` or ``struct.error`` escapes for any input.

Layouts (little-endian), after Intel's "SGX ECDSA Quote Library API" and "TDX DCAP Quoting
Library API":

* header (48): version u16, attestation key type u16, TEE type u32, QE SVN u16, PCE SVN u16,
  QE vendor id (16), user data (20);
* body: v3: SGX enclave report (384); v4: TDX TD report 1.0 (584); v5: body type u16, body size
  u32, then the body: 1 SGX enclave report (384), 2 TD report 1.0 (584), 3 TD report 1.5 (648);
* signature data length u32, then the signature data: quote signature (64, raw r||s over
  header||body; for v5 over header||body type||body size||body), attestation key (64, raw x||y),
  and the QE report certification data: QE report (384), QE report signature (64), QE auth data
  length u16 and bytes, certification data type u16 (5: a PEM PCK chain) and size u32 and bytes.
  v3 carries those fields directly; v4/v5 wrap them in certification data type 6 (type u16,
  size u32).

Bytes after the signature data are accepted (some quote buffers carry padding) but are not part
of the parsed quote: ``Quote.raw`` ends with the signature data, and nothing after it is read.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from attestation.errors import MalformedEvidence

__all__ = [
    "ATTESTATION_KEY_ECDSA_P256",
    "BODY_SGX",
    "BODY_TD10",
    "BODY_TD15",
    "HEADER_SIZE",
    "INTEL_QE_VENDOR_ID",
    "MAX_QUOTE_BYTES",
    "TEE_SGX",
    "TEE_TDX",
    "Quote",
    "SgxReport",
    "TdReport",
    "parse_quote",
    "parse_sgx_report",
]

HEADER_SIZE = 48
SGX_REPORT_SIZE = 384
TD10_SIZE = 584
TD15_SIZE = 648
SIGNATURE_SIZE = 64
ATTESTATION_KEY_SIZE = 64
QE_REPORT_SIZE = 384
TEE_SGX = 0x00000000
TEE_TDX = 0x00000081
ATTESTATION_KEY_ECDSA_P256 = 2
INTEL_QE_VENDOR_ID = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")
BODY_SGX, BODY_TD10, BODY_TD15 = 1, 2, 3
_BODY_SIZES = {BODY_SGX: SGX_REPORT_SIZE, BODY_TD10: TD10_SIZE, BODY_TD15: TD15_SIZE}
CERT_DATA_PCK_CHAIN = 5
CERT_DATA_QE_REPORT = 6
#: Real quotes are about 5 KiB; the PCK chain is three certificates.
MAX_QUOTE_BYTES = 64 * 1024

_HEADER = struct.Struct("<HHIHH16s20s")
_SGX_REPORT = struct.Struct("<16sI28s16s32s32s32s96sHH60s64s")
_TD10 = struct.Struct("<16s48s48s8s8s8s48s48s48s48s48s48s48s48s64s")
_TD15_TAIL = struct.Struct("<16s48s")


@dataclass(frozen=True)
class SgxReport:
    """An SGX enclave report (ISV enclave report in a v3 quote)."""

    cpu_svn: bytes
    misc_select: int
    attributes: bytes
    mr_enclave: bytes
    mr_signer: bytes
    isv_prod_id: int
    isv_svn: int
    report_data: bytes

    @property
    def debug(self) -> bool:
        """ATTRIBUTES.DEBUG: bit 1 of the little-endian flags."""
        return bool(self.attributes[0] & 0x02)


@dataclass(frozen=True)
class TdReport:
    """A TDX TD report body (TDREPORT 1.0; the 1.5 body adds ``tee_tcb_svn2`` and ``mr_service_td``)."""

    tee_tcb_svn: bytes
    mr_seam: bytes
    mr_signer_seam: bytes
    seam_attributes: bytes
    td_attributes: bytes
    xfam: bytes
    mr_td: bytes
    mr_config_id: bytes
    mr_owner: bytes
    mr_owner_config: bytes
    rtmr: tuple[bytes, bytes, bytes, bytes]
    report_data: bytes
    tee_tcb_svn2: bytes | None = None
    mr_service_td: bytes | None = None

    @property
    def debug(self) -> bool:
        """TD attributes TUD.DEBUG: bit 0 of the little-endian attributes."""
        return bool(self.td_attributes[0] & 0x01)


@dataclass(frozen=True)
class Quote:
    raw: bytes  # the quote up to the end of its signature data (trailing bytes cut off)
    trailing: int  # how many bytes followed the signature data in the buffer
    version: int
    attestation_key_type: int
    tee_type: int
    qe_svn: int
    pce_svn: int
    qe_vendor_id: bytes
    user_data: bytes
    header: bytes
    body_type: int  # BODY_SGX, BODY_TD10 or BODY_TD15
    body: bytes
    signed: bytes  # what the quote signature covers
    report: SgxReport | TdReport
    signature: bytes
    attestation_key: bytes
    qe_report: bytes
    qe_report_signature: bytes
    qe_auth_data: bytes
    cert_data_type: int
    cert_data: bytes  # the PCK chain, PEM (NUL-terminated in most quotes)


class _Reader:
    """Bounds-checked reads from ``data[pos:end]``; a short read is ``MalformedEvidence``."""

    def __init__(self, data: bytes, pos: int, end: int) -> None:
        self.data = data
        self.pos = pos
        self.end = end

    def take(self, size: int, what: str) -> bytes:
        if size < 0 or self.pos + size > self.end:
            raise MalformedEvidence(
                f"DCAP quote is truncated in its {what} ({self.end - self.pos} bytes left, {size} needed)"
            )
        chunk = self.data[self.pos : self.pos + size]
        self.pos += size
        return chunk

    def u16(self, what: str) -> int:
        return int.from_bytes(self.take(2, what), "little")

    def u32(self, what: str) -> int:
        return int.from_bytes(self.take(4, what), "little")


def _sgx_report(body: bytes) -> SgxReport:
    (cpu_svn, misc, _r1, attributes, mr_enclave, _r2, mr_signer, _r3, prod, svn, _r4, report_data) = (
        _SGX_REPORT.unpack(body)
    )
    return SgxReport(cpu_svn, misc, attributes, mr_enclave, mr_signer, prod, svn, report_data)


def parse_sgx_report(body: bytes) -> SgxReport:
    """An SGX report of 384 bytes (an enclave's or the QE's). Raises ``MalformedEvidence``."""
    if len(body) != SGX_REPORT_SIZE:
        raise MalformedEvidence(f"an SGX report is {SGX_REPORT_SIZE} bytes, not {len(body)}")
    return _sgx_report(body)


def _td_report(body: bytes) -> TdReport:
    fields = _TD10.unpack_from(body)
    svn2: bytes | None = None
    service: bytes | None = None
    if len(body) == TD15_SIZE:
        svn2, service = _TD15_TAIL.unpack_from(body, TD10_SIZE)
    return TdReport(
        tee_tcb_svn=fields[0],
        mr_seam=fields[1],
        mr_signer_seam=fields[2],
        seam_attributes=fields[3],
        td_attributes=fields[4],
        xfam=fields[5],
        mr_td=fields[6],
        mr_config_id=fields[7],
        mr_owner=fields[8],
        mr_owner_config=fields[9],
        rtmr=(fields[10], fields[11], fields[12], fields[13]),
        report_data=fields[14],
        tee_tcb_svn2=svn2,
        mr_service_td=service,
    )


def parse_quote(evidence: bytes) -> Quote:
    """Split a DCAP quote into its fields. Raises ``MalformedEvidence``."""
    if not isinstance(evidence, bytes | bytearray | memoryview):
        raise MalformedEvidence("DCAP quote must be bytes")
    data = bytes(evidence)
    if len(data) > MAX_QUOTE_BYTES:
        raise MalformedEvidence(f"DCAP quote is larger than {MAX_QUOTE_BYTES} bytes")
    reader = _Reader(data, 0, len(data))
    header = reader.take(HEADER_SIZE, "header")
    version, key_type, tee_type, qe_svn, pce_svn, vendor, user_data = _HEADER.unpack(header)
    if version == 3:
        body_type, prefix = BODY_SGX, b""
    elif version == 4:
        body_type, prefix = BODY_TD10, b""
    elif version == 5:
        prefix = reader.take(6, "body descriptor")
        body_type = int.from_bytes(prefix[:2], "little")
        body_size = int.from_bytes(prefix[2:], "little")
        if _BODY_SIZES.get(body_type) != body_size:
            raise MalformedEvidence(
                f"DCAP quote v5 body type {body_type} of {body_size} bytes is not supported"
            )
    else:
        raise MalformedEvidence(
            f"DCAP quote version {version} is not supported (this build reads 3, 4 and 5)"
        )
    if (tee_type == TEE_SGX) != (body_type == BODY_SGX) or tee_type not in (TEE_SGX, TEE_TDX):
        raise MalformedEvidence(
            f"DCAP quote v{version} has TEE type {tee_type:#x}, which does not fit its body"
        )
    body = reader.take(_BODY_SIZES[body_type], "report body")
    signed = header + prefix + body
    report = _sgx_report(body) if body_type == BODY_SGX else _td_report(body)

    sig_len = reader.u32("signature data length")
    sig = _Reader(data, reader.pos, reader.pos + sig_len)
    if sig.end > len(data):
        raise MalformedEvidence(
            f"DCAP quote signature data length {sig_len} runs past the quote"
            f" ({len(data) - reader.pos} bytes left)"
        )
    signature = sig.take(SIGNATURE_SIZE, "quote signature")
    attestation_key = sig.take(ATTESTATION_KEY_SIZE, "attestation key")
    qe = sig
    if version >= 4:
        outer_type = sig.u16("certification data type")
        outer_size = sig.u32("certification data size")
        if outer_type != CERT_DATA_QE_REPORT:
            raise MalformedEvidence(
                f"DCAP quote certification data type {outer_type} is not supported (6, QE report, expected)"
            )
        qe = _Reader(data, sig.pos, sig.pos + outer_size)
        if qe.end != sig.end:
            raise MalformedEvidence(
                "DCAP quote QE report certification data does not fill the signature data"
            )
    qe_report = qe.take(QE_REPORT_SIZE, "QE report")
    qe_report_signature = qe.take(SIGNATURE_SIZE, "QE report signature")
    auth_len = qe.u16("QE auth data length")
    qe_auth_data = qe.take(auth_len, "QE auth data")
    cert_type = qe.u16("PCK certification data type")
    cert_size = qe.u32("PCK certification data size")
    if cert_type != CERT_DATA_PCK_CHAIN:
        raise MalformedEvidence(
            f"DCAP quote PCK certification data type {cert_type} is not supported (5, a PEM chain, expected)"
        )
    cert_data = qe.take(cert_size, "PCK certificate chain")
    if qe.pos != sig.end:
        raise MalformedEvidence(f"DCAP quote signature data has {sig.end - qe.pos} bytes after the PCK chain")
    return Quote(
        raw=data[: sig.end],
        trailing=len(data) - sig.end,
        version=version,
        attestation_key_type=key_type,
        tee_type=tee_type,
        qe_svn=qe_svn,
        pce_svn=pce_svn,
        qe_vendor_id=vendor,
        user_data=user_data,
        header=header,
        body_type=body_type,
        body=body,
        signed=signed,
        report=report,
        signature=signature,
        attestation_key=attestation_key,
        qe_report=qe_report,
        qe_report_signature=qe_report_signature,
        qe_auth_data=qe_auth_data,
        cert_data_type=cert_type,
        cert_data=cert_data,
    )
