"""The Intel SGX extension of a PCK certificate (OID 1.2.840.113741.1.13.1), read with a small
DER reader over ``cryptography``'s opaque extension value, for ``attestation.dcap_appraisal_v2``.

The extension is a SEQUENCE of (OID, value) pairs; the TCB appraisal reads the TCB (.2: a
SEQUENCE of pairs: component SVNs .2.1-.2.16 INTEGER, PCESVN .2.17 INTEGER, CPUSVN .2.18 OCTET
STRING of 16), the PCE-ID (.3, OCTET STRING of 2) and the FMSPC (.4, OCTET STRING of 6); the other
entries (PPID, SGX type, platform instance, configuration) are skipped. The reader takes one-byte
tags and minimal definite lengths only, an OID named twice is refused, and every problem is a
one-line ``ChainInvalid``: no ``IndexError`` or ``ValueError`` escapes for any bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509

from attestation.dcap_collateral import CERT_ERRORS
from attestation.errors import ChainInvalid

__all__ = ["SGX_EXTENSION_OID", "SgxExtension", "parse_sgx_extension"]

SGX_EXTENSION_OID = x509.ObjectIdentifier("1.2.840.113741.1.13.1")
_SGX = SGX_EXTENSION_OID.dotted_string
_TCB, _PCE_ID, _FMSPC = f"{_SGX}.2", f"{_SGX}.3", f"{_SGX}.4"
_COMPONENTS = 16
_PCE_SVN, _CPU_SVN = f"{_TCB}.17", f"{_TCB}.18"
_INTEGER, _OCTET_STRING, _OID, _SEQUENCE = 0x02, 0x04, 0x06, 0x30
_MAX_EXTENSION_BYTES = 4096


@dataclass(frozen=True)
class SgxExtension:
    """What the TCB appraisal reads of a PCK certificate's Intel SGX extension."""

    comp_svns: tuple[int, ...]  # SGX TCB component SVNs 1..16
    pce_svn: int
    cpu_svn: bytes
    pce_id: bytes
    fmspc: bytes


def _malformed(what: str) -> ChainInvalid:
    return ChainInvalid(f"the PCK leaf certificate's Intel SGX extension is malformed ({what})")


def _tlvs(data: bytes) -> list[tuple[int, bytes]]:
    """The DER items of ``data`` in order: one-byte tags, minimal definite lengths."""
    items: list[tuple[int, bytes]] = []
    pos = 0
    while pos < len(data):
        if len(data) - pos < 2:
            raise _malformed("truncated item")
        tag, first = data[pos], data[pos + 1]
        pos += 2
        if tag & 0x1F == 0x1F:
            raise _malformed("multi-byte tag")
        length = first
        if first & 0x80:
            count = first & 0x7F
            if not 1 <= count <= 2 or len(data) - pos < count:
                raise _malformed("bad length")
            length = int.from_bytes(data[pos : pos + count], "big")
            if length < 0x80 or (count == 2 and length < 0x100):
                raise _malformed("non-minimal length")
            pos += count
        if length > len(data) - pos:
            raise _malformed("item runs past its container")
        items.append((tag, data[pos : pos + length]))
        pos += length
    return items


def _oid(content: bytes) -> str:
    if not content or content[-1] & 0x80 or len(content) > 32:
        raise _malformed("bad object identifier")
    arcs: list[int] = []
    value = 0
    for index, byte in enumerate(content):
        if value == 0 and byte == 0x80 and (index == 0 or not content[index - 1] & 0x80):
            raise _malformed("non-minimal object identifier")
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            arcs.append(value)
            value = 0
    first = min(arcs[0] // 40, 2)
    return ".".join(str(arc) for arc in (first, arcs[0] - 40 * first, *arcs[1:]))


def _uint(tag: int, content: bytes, what: str) -> int:
    if tag != _INTEGER or not 1 <= len(content) <= 3 or content[0] & 0x80:
        raise _malformed(f"{what} is not a small non-negative INTEGER")
    if len(content) > 1 and content[0] == 0 and not content[1] & 0x80:
        raise _malformed(f"{what} is a non-minimal INTEGER")
    return int.from_bytes(content, "big")


def _octets(tag: int, content: bytes, size: int, what: str) -> bytes:
    if tag != _OCTET_STRING or len(content) != size:
        raise _malformed(f"{what} is not an OCTET STRING of {size} bytes")
    return content


def _pairs(content: bytes, what: str) -> dict[str, tuple[int, bytes]]:
    """A SEQUENCE OF SEQUENCE {OID, value} as OID -> (tag, content); an OID twice is malformed."""
    pairs: dict[str, tuple[int, bytes]] = {}
    for tag, item in _tlvs(content):
        parts = _tlvs(item) if tag == _SEQUENCE else []
        if len(parts) != 2 or parts[0][0] != _OID:
            raise _malformed(f"{what} holds something other than (OID, value) pairs")
        oid = _oid(parts[0][1])
        if oid in pairs:
            raise _malformed(f"{what} names {oid} twice")
        pairs[oid] = parts[1]
    return pairs


def parse_sgx_extension(cert: x509.Certificate) -> SgxExtension:
    """The Intel SGX extension of a PCK certificate. Raises ``ChainInvalid``."""
    try:
        value = cert.extensions.get_extension_for_oid(SGX_EXTENSION_OID).value
    except x509.ExtensionNotFound:
        raise ChainInvalid("the PCK leaf certificate has no Intel SGX extension") from None
    except CERT_ERRORS:
        raise _malformed("the extensions cannot be read") from None
    if not isinstance(value, x509.UnrecognizedExtension) or len(value.value) > _MAX_EXTENSION_BYTES:
        raise _malformed("not an opaque value of a sensible size")
    outer = _tlvs(value.value)
    if len(outer) != 1 or outer[0][0] != _SEQUENCE:
        raise _malformed("not one SEQUENCE")
    fields = _pairs(outer[0][1], "the extension")
    for oid in (_TCB, _PCE_ID, _FMSPC):
        if oid not in fields:
            raise _malformed(f"{oid} is missing")
    tcb_tag, tcb_content = fields[_TCB]
    if tcb_tag != _SEQUENCE:
        raise _malformed("the TCB is not a SEQUENCE")
    tcb = _pairs(tcb_content, "the TCB")
    names = [f"{_TCB}.{index}" for index in range(1, _COMPONENTS + 1)]
    for oid in (*names, _PCE_SVN, _CPU_SVN):
        if oid not in tcb:
            raise _malformed(f"the TCB lacks {oid}")
    comp_svns = tuple(_uint(*tcb[oid], what=f"TCB component {oid}") for oid in names)
    if any(svn > 0xFF for svn in comp_svns):
        raise _malformed("a TCB component SVN is over 255")
    pce_svn = _uint(*tcb[_PCE_SVN], what="the PCESVN")
    if pce_svn > 0xFFFF:
        raise _malformed("the PCESVN is over 65535")
    return SgxExtension(
        comp_svns=comp_svns,
        pce_svn=pce_svn,
        cpu_svn=_octets(*tcb[_CPU_SVN], size=16, what="the CPUSVN"),
        pce_id=_octets(*fields[_PCE_ID], size=2, what="the PCE-ID"),
        fmspc=_octets(*fields[_FMSPC], size=6, what="the FMSPC"),
    )
