"""AMD SEV-SNP attestation report: the 1184-byte ``ATTESTATION_REPORT`` structure of AMD's SEV-SNP
firmware ABI specification (report versions 2 and 3), parsed without interpretation.

Layout (offsets in hex, little-endian integers)::

    000 version u32          004 guest_svn u32        008 policy u64
    010 family_id [16]       020 image_id [16]        030 vmpl u32
    034 signature_algo u32   038 current_tcb u64      040 platform_info u64
    048 key_info u32: bit 0 author_key_en, bit 1 mask_chip_key, bits 4:2 signing_key (0 VCEK, 1 VLEK)
    04C reserved u32         050 report_data [64]     090 measurement [48]
    0C0 host_data [32]       0E0 id_key_digest [48]   110 author_key_digest [48]
    140 report_id [32]       160 report_id_ma [32]    180 reported_tcb u64
    188 (v3) cpuid family, model, stepping u8 each; reserved up to 1A0
    1A0 chip_id [64]         1E0 committed_tcb u64
    1E8 current build, minor, major u8, reserved u8
    1EC committed build, minor, major u8, reserved u8
    1F0 launch_tcb u64       1F8 reserved up to 2A0
    2A0 signature: r [72], s [72] (little-endian; only the low 48 bytes carry a P-384 value),
        reserved up to 4A0

The signature (ECDSA P-384 with SHA-384) covers bytes 000..29F.

TCB_VERSION (u64) is decoded per product: Milan and Genoa ``[bl, tee, 0, 0, 0, 0, snp, ucode]``,
Turin ``[fmc, bl, tee, snp, 0, 0, 0, ucode]`` (byte 0 first).

Every function here raises only ``MalformedEvidence`` on hostile input.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from attestation.errors import MalformedEvidence

REPORT_SIZE = 0x4A0  # 1184
SIGNED_SIZE = 0x2A0  # bytes 0..0x29F are signed
SUPPORTED_VERSIONS = (2, 3)
SIG_ALGO_ECDSA_P384_SHA384 = 1
POLICY_DEBUG = 1 << 19
ECDSA_COMPONENT_SIZE = 72  # r and s fields, little-endian
P384_SIZE = 48
SIG_R_OFFSET = 0x2A0
SIG_S_OFFSET = 0x2E8
SIG_END = SIG_S_OFFSET + ECDSA_COMPONENT_SIZE  # 0x330; reserved zeros from here to 0x4A0

SIGNING_KEY_VCEK = 0
SIGNING_KEY_VLEK = 1

PRODUCTS = ("Milan", "Genoa", "Turin")

_HEAD = struct.Struct("<IIQ16s16sIIQQI4s64s48s32s48s48s32s32sQ")  # 0x000 .. 0x188
_CPUID = struct.Struct("<BBB21s")  # 0x188 .. 0x1A0
_TAIL = struct.Struct("<64sQBBBBBBBBQ")  # 0x1A0 .. 0x1F8

#: Field boundaries (start offsets) in the report, for tests that truncate at each one.
FIELD_OFFSETS = (
    0x000, 0x004, 0x008, 0x010, 0x020, 0x030, 0x034, 0x038, 0x040, 0x048, 0x04C, 0x050, 0x090,
    0x0C0, 0x0E0, 0x110, 0x140, 0x160, 0x180, 0x188, 0x18B, 0x1A0, 0x1E0, 0x1E8, 0x1EC, 0x1F0,
    0x1F8, 0x2A0, 0x2E8, 0x330, 0x4A0,
)  # fmt: skip


@dataclass(frozen=True)
class TcbVersion:
    """One TCB_VERSION decoded for a product; ``fmc`` is None before Turin."""

    bootloader: int
    tee: int
    snp: int
    microcode: int
    fmc: int | None = None

    def components(self) -> tuple[int, ...]:
        return (self.fmc or 0, self.bootloader, self.tee, self.snp, self.microcode)

    def describe(self) -> str:
        fmc = f"fmc={self.fmc} " if self.fmc is not None else ""
        return f"{fmc}bl={self.bootloader} tee={self.tee} snp={self.snp} ucode={self.microcode}"


def decode_tcb(raw: bytes, product: str) -> TcbVersion:
    """Decode the 8 TCB_VERSION bytes (as they sit in the report) for ``product``."""
    if len(raw) != 8:
        raise MalformedEvidence("a TCB version is 8 bytes")
    if product == "Turin":
        return TcbVersion(bootloader=raw[1], tee=raw[2], snp=raw[3], microcode=raw[7], fmc=raw[0])
    if product in ("Milan", "Genoa"):
        return TcbVersion(bootloader=raw[0], tee=raw[1], snp=raw[6], microcode=raw[7])
    raise MalformedEvidence(f"no TCB layout for product {product!r}")


def encode_tcb(tcb: TcbVersion) -> bytes:
    if tcb.fmc is not None:
        return bytes((tcb.fmc, tcb.bootloader, tcb.tee, tcb.snp, 0, 0, 0, tcb.microcode))
    return bytes((tcb.bootloader, tcb.tee, 0, 0, 0, 0, tcb.snp, tcb.microcode))


@dataclass(frozen=True)
class SnpReport:
    """The fields of one attestation report; binary fields as bytes, TCBs as their raw 8 bytes."""

    raw: bytes
    version: int
    guest_svn: int
    policy: int
    family_id: bytes
    image_id: bytes
    vmpl: int
    signature_algo: int
    current_tcb: bytes
    platform_info: int
    key_info: int
    report_data: bytes
    measurement: bytes
    host_data: bytes
    id_key_digest: bytes
    author_key_digest: bytes
    report_id: bytes
    report_id_ma: bytes
    reported_tcb: bytes
    cpuid_family: int | None  # v3 only
    cpuid_model: int | None
    cpuid_stepping: int | None
    chip_id: bytes
    committed_tcb: bytes
    current_version: tuple[int, int, int]  # major, minor, build
    committed_version: tuple[int, int, int]
    launch_tcb: bytes
    signature_r: int  # as integers (converted from little-endian)
    signature_s: int

    @property
    def signed(self) -> bytes:
        return self.raw[:SIGNED_SIZE]

    @property
    def author_key_en(self) -> bool:
        return bool(self.key_info & 0x1)

    @property
    def mask_chip_key(self) -> bool:
        return bool(self.key_info & 0x2)

    @property
    def signing_key(self) -> int:
        return (self.key_info >> 2) & 0x7

    @property
    def debug(self) -> bool:
        return bool(self.policy & POLICY_DEBUG)


def parse_report(data: bytes) -> SnpReport:
    """Parse exactly one report (1184 bytes). Structure only: size, version, reserved signature
    bytes. Field values are interpreted by the verifier after the signature has been checked."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise MalformedEvidence("an SEV-SNP report must be bytes")
    raw = bytes(data)
    if len(raw) != REPORT_SIZE:
        raise MalformedEvidence(f"an SEV-SNP report is {REPORT_SIZE} bytes, not {len(raw)}")
    head = _HEAD.unpack_from(raw, 0)
    version = head[0]
    if version not in SUPPORTED_VERSIONS:
        raise MalformedEvidence(f"SEV-SNP report version {version} is not supported (2 and 3 are)")
    r_le = raw[SIG_R_OFFSET : SIG_R_OFFSET + ECDSA_COMPONENT_SIZE]
    s_le = raw[SIG_S_OFFSET : SIG_S_OFFSET + ECDSA_COMPONENT_SIZE]
    # The unsigned bytes admit one encoding only: zero-extended r and s, zero reserved bytes.
    if any(r_le[P384_SIZE:]) or any(s_le[P384_SIZE:]) or any(raw[SIG_END:]):
        raise MalformedEvidence("SEV-SNP report has non-zero bytes in the unused part of its signature")
    family, model, stepping, _ = _CPUID.unpack_from(raw, 0x188)
    (
        chip_id,
        _committed_tcb,
        cur_build,
        cur_minor,
        cur_major,
        _,
        com_build,
        com_minor,
        com_major,
        _,
        _launch_tcb,
    ) = _TAIL.unpack_from(raw, 0x1A0)
    v3 = version >= 3
    return SnpReport(
        raw=raw,
        version=version,
        guest_svn=head[1],
        policy=head[2],
        family_id=head[3],
        image_id=head[4],
        vmpl=head[5],
        signature_algo=head[6],
        current_tcb=raw[0x38:0x40],
        platform_info=head[8],
        key_info=head[9],
        report_data=head[11],
        measurement=head[12],
        host_data=head[13],
        id_key_digest=head[14],
        author_key_digest=head[15],
        report_id=head[16],
        report_id_ma=head[17],
        reported_tcb=raw[0x180:0x188],
        cpuid_family=family if v3 else None,
        cpuid_model=model if v3 else None,
        cpuid_stepping=stepping if v3 else None,
        chip_id=chip_id,
        committed_tcb=raw[0x1E0:0x1E8],
        current_version=(cur_major, cur_minor, cur_build),
        committed_version=(com_major, com_minor, com_build),
        launch_tcb=raw[0x1F0:0x1F8],
        signature_r=int.from_bytes(r_le, "little"),
        signature_s=int.from_bytes(s_le, "little"),
    )


# -- the JSON form (serde of the virtee ``sev`` crate's AttestationReport, as trustee sends it) ---


def _int(obj: dict[str, Any], name: str, bits: int, *, optional: bool = False) -> int:
    value = obj.get(name)
    if value is None and optional:
        return 0
    if type(value) is not int or not 0 <= value < (1 << bits):
        raise MalformedEvidence(f"SEV-SNP JSON report field {name} is not a {bits}-bit unsigned integer")
    return value


def json_bytes(value: object, size: int | None, name: str) -> bytes:
    """A JSON list of byte values (the serde form of ``[u8; N]`` and ``Vec<u8>``)."""
    if not isinstance(value, list) or (size is not None and len(value) != size):
        raise MalformedEvidence(f"SEV-SNP JSON field {name} is not a list of {size or 'some'} bytes")
    if not all(type(item) is int and 0 <= item <= 255 for item in value):
        raise MalformedEvidence(f"SEV-SNP JSON field {name} has an element that is not a byte")
    return bytes(value)


def _fixed(obj: dict[str, Any], name: str, size: int) -> bytes:
    return json_bytes(obj.get(name), size, name)


def _tcb(obj: dict[str, Any], name: str) -> bytes:
    value = obj.get(name)
    if not isinstance(value, dict):
        raise MalformedEvidence(f"SEV-SNP JSON report field {name} is not a TCB object")
    fmc = value.get("fmc")
    tcb = TcbVersion(
        bootloader=_int(value, "bootloader", 8),
        tee=_int(value, "tee", 8),
        snp=_int(value, "snp", 8),
        microcode=_int(value, "microcode", 8),
        fmc=None if fmc is None else _int(value, "fmc", 8),
    )
    return encode_tcb(tcb)


def _fw(obj: dict[str, Any], name: str) -> bytes:
    value = obj.get(name)
    if not isinstance(value, dict):
        raise MalformedEvidence(f"SEV-SNP JSON report field {name} is not a version object")
    return bytes((_int(value, "build", 8), _int(value, "minor", 8), _int(value, "major", 8), 0))


def report_from_json(obj: object) -> bytes:
    """Rebuild the raw report from its JSON fields (reserved bytes zero). Whether the rebuild is
    the report the firmware signed is settled by the signature check, as for any report."""
    if not isinstance(obj, dict):
        raise MalformedEvidence("SEV-SNP JSON attestation_report is not an object")
    version = _int(obj, "version", 32)
    signature = obj.get("signature")
    if not isinstance(signature, dict):
        raise MalformedEvidence("SEV-SNP JSON report has no signature object")
    v3 = version >= 3
    parts = [
        struct.pack("<IIQ", version, _int(obj, "guest_svn", 32), _int(obj, "policy", 64)),
        _fixed(obj, "family_id", 16),
        _fixed(obj, "image_id", 16),
        struct.pack("<II", _int(obj, "vmpl", 32), _int(obj, "sig_algo", 32)),
        _tcb(obj, "current_tcb"),
        struct.pack("<QI4x", _int(obj, "plat_info", 64), _int(obj, "key_info", 32)),
        _fixed(obj, "report_data", 64),
        _fixed(obj, "measurement", 48),
        _fixed(obj, "host_data", 32),
        _fixed(obj, "id_key_digest", 48),
        _fixed(obj, "author_key_digest", 48),
        _fixed(obj, "report_id", 32),
        _fixed(obj, "report_id_ma", 32),
        _tcb(obj, "reported_tcb"),
        struct.pack(
            "<BBB21x",
            _int(obj, "cpuid_fam_id", 8, optional=not v3),
            _int(obj, "cpuid_mod_id", 8, optional=not v3),
            _int(obj, "cpuid_step", 8, optional=not v3),
        ),
        _fixed(obj, "chip_id", 64),
        _tcb(obj, "committed_tcb"),
        _fw(obj, "current"),
        _fw(obj, "committed"),
        _tcb(obj, "launch_tcb"),
        bytes(SIG_R_OFFSET - 0x1F8),
        json_bytes(signature.get("r"), ECDSA_COMPONENT_SIZE, "signature.r"),
        json_bytes(signature.get("s"), ECDSA_COMPONENT_SIZE, "signature.s"),
        bytes(REPORT_SIZE - SIG_END),
    ]
    raw = b"".join(parts)
    if len(raw) != REPORT_SIZE:  # pragma: no cover - the layout above is fixed
        raise MalformedEvidence("SEV-SNP JSON report rebuilt to the wrong size")
    return raw
