"""Generations: one measured build of a workload, described by a manifest, and how two differ.

A manifest (YAML or JSON) names the platform and the identity the hardware reports for the
build: measurement (MRENCLAVE / launch digest / MRTD / PCR0), signer (MRSIGNER / ID-key
digest / PCR8), product id, security version (SVN), debug flag and TCB level. ``diff`` says
what an upgrade from one generation to another changes, and flags what matters for sealed
state: a new measurement (MRENCLAVE-sealed data needs a handoff), a new signer (the sealing
authority changed), a lower SVN (a downgrade) and debug switched on.

``details`` holds the platform's own fields that name a build beyond those (TDX RTMRs, owner and
config ids; SEV-SNP host data, family and image ids, policy, VMPL; Nitro PCR1 and PCR2: see
``attestation.platforms.IDENTITY_DETAILS``), by the names ``Claims.details`` uses; evidence of the
generation must match each (release policies, attested TLS and migrations check them).
``manifest_from_claims`` builds a manifest from verified evidence, so a deploy pipeline registers
exactly what runs. A manifest without details has the canonical form it always had.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from attestation.claims import Claims
from attestation.platforms import identity_details

Platform = Literal["sim", "sgx", "sev-snp", "tdx", "nitro"]

_DETAIL_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")
_DETAIL_VALUE = re.compile(r"[A-Za-z0-9._:/+=-]{0,256}")
MAX_DETAILS = 48

# Bytes of measurement per platform: SGX MRENCLAVE is SHA-256; SNP, TDX and Nitro use SHA-384.
_MEASUREMENT_BYTES: dict[str, int] = {"sim": 32, "sgx": 32, "sev-snp": 48, "tdx": 48, "nitro": 48}


class ManifestError(Exception):
    """A manifest file cannot be read or does not validate. The message names the field."""

    exit_code = 2


class GenerationManifest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)

    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
    platform: Platform
    measurement: str
    signer: str
    product_id: int = Field(ge=0, le=0xFFFF)
    svn: int = Field(ge=0, le=0xFFFF)
    debug: bool = False
    tcb: str = Field(default="UpToDate", min_length=1, max_length=64)
    details: dict[str, str] = Field(default_factory=dict)

    @field_validator("details", mode="before")
    @classmethod
    def _details(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            raise ValueError("must be a mapping of names to strings")
        if len(value) > MAX_DETAILS:
            raise ValueError(f"at most {MAX_DETAILS} details")
        for name, item in value.items():
            if not isinstance(name, str) or not _DETAIL_NAME.fullmatch(name):
                raise ValueError("names are lowercase letters, digits and _ (at most 32)")
            if not isinstance(item, str) or not _DETAIL_VALUE.fullmatch(item):
                raise ValueError(f"{name}: must be a string of at most 256 plain characters (hex for bytes)")
        return {name: item.lower() if _is_hex(item) else item for name, item in value.items()}

    @field_validator("measurement", "signer", mode="before")
    @classmethod
    def _hex(cls, value: Any) -> str:
        if not isinstance(value, str):
            raise ValueError("must be a hex string")
        text = value.lower().removeprefix("0x")
        try:
            bytes.fromhex(text)
        except ValueError:
            raise ValueError("must be a hex string") from None
        if not text:
            raise ValueError("must not be empty")
        return text

    @field_validator("product_id", "svn", mode="before")
    @classmethod
    def _integer(cls, value: Any) -> Any:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError("must be an integer")
        return value

    @field_validator("debug", mode="before")
    @classmethod
    def _boolean(cls, value: Any) -> Any:
        if not isinstance(value, bool):
            raise ValueError("must be true or false")
        return value

    @model_validator(mode="after")
    def _sizes(self) -> GenerationManifest:
        want = _MEASUREMENT_BYTES[self.platform]
        if len(self.measurement) != 2 * want:
            raise ValueError(
                f"measurement: {self.platform} measurements are {want} bytes ({2 * want} hex digits)"
            )
        if len(self.signer) not in (64, 96):
            raise ValueError("signer: must be 32 or 48 bytes (64 or 96 hex digits)")
        return self

    def to_dict(self) -> dict[str, Any]:
        """The manifest's fields; ``details`` only when there are some (the form manifests had
        before details existed, so registered manifests keep comparing equal)."""
        data = self.model_dump()
        if not data["details"]:
            del data["details"]
        return data

    def canonical_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))


def _is_hex(text: str) -> bool:
    return bool(text) and all(c in "0123456789abcdefABCDEF" for c in text)


def manifest_from_claims(
    claims: Claims, generation_id: str, *, source: str = "evidence"
) -> GenerationManifest:
    """The manifest of the build whose verified evidence gave ``claims``. Raises ``ManifestError``
    when the evidence's identity does not make a valid manifest (a sim-sized measurement, say)."""
    document = {
        "id": generation_id,
        "platform": claims.platform,
        "measurement": claims.measurement,
        "signer": claims.signer,
        "product_id": claims.product_id,
        "svn": claims.svn,
        "debug": claims.debug,
        "tcb": claims.tcb_status,
        "details": identity_details(claims.platform, claims.details),
    }
    return parse_manifest(document, source)


def details_reasons(manifest: GenerationManifest, claims: Claims) -> list[str]:
    """Why ``claims`` are not of ``manifest``'s build as far as its details go (each detail the
    manifest names must be the evidence's); empty when they all match."""
    reasons = []
    for name, want in sorted(manifest.details.items()):
        got = claims.detail(name)
        if got is None:
            reasons.append(f"the evidence has no {name} but {manifest.id} names one")
        elif got.lower() != want.lower():
            reasons.append(f"{name} {got[:16]}… is not {manifest.id}'s {want[:16]}…")
    return reasons


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    location = ".".join(str(p) for p in error["loc"])
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "missing":
        return f"field '{location}' is missing"
    if error["type"] == "extra_forbidden":
        return f"field '{location}' is not a manifest field"
    if not location and ": " in message:  # a model-level check names its field itself
        location, message = message.split(": ", 1)
    return f"field '{location}': {message}"


def parse_manifest(document: Any, source: str = "manifest") -> GenerationManifest:
    if not isinstance(document, dict):
        raise ManifestError(f"{source}: a manifest is a mapping of fields, got {type(document).__name__}")
    try:
        return GenerationManifest.model_validate(document)
    except ValidationError as exc:
        raise ManifestError(f"{source}: {_first_error(exc)}") from None


def load_manifest(path: Path) -> GenerationManifest:
    """Read a YAML or JSON manifest; every failure is a one-line ``ManifestError``."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ManifestError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: cannot read: {exc}") from None
    try:
        document = yaml.safe_load(text)  # JSON is YAML, so one parser reads both
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ManifestError(f"{path}: not valid YAML or JSON{where}") from None
    return parse_manifest(document, str(path))


@dataclass(frozen=True)
class FieldChange:
    field: str
    old: Any
    new: Any

    @property
    def changed(self) -> bool:
        return bool(self.old != self.new)


@dataclass(frozen=True)
class GenerationDiff:
    old: GenerationManifest
    new: GenerationManifest
    fields: tuple[FieldChange, ...]

    def _changed(self, name: str) -> bool:
        return any(f.field == name and f.changed for f in self.fields)

    @property
    def measurement_changed(self) -> bool:
        return self._changed("measurement")

    @property
    def signer_changed(self) -> bool:
        return self._changed("signer")

    @property
    def svn_lowered(self) -> bool:
        return self.new.svn < self.old.svn

    @property
    def debug_enabled(self) -> bool:
        return self.new.debug and not self.old.debug

    def flags(self) -> list[str]:
        flags = []
        if self.measurement_changed:
            flags.append("measurement changed: MRENCLAVE-bound state needs an attested handoff")
        if self.signer_changed:
            flags.append("signer changed: the sealing authority changed")
        if self.svn_lowered:
            flags.append(f"SVN lowered {self.old.svn} -> {self.new.svn}: a downgrade")
        if self.debug_enabled:
            flags.append("debug switched on: enclave memory is readable by the host")
        if self._changed("platform"):
            flags.append("platform changed")
        if self._changed("product_id"):
            flags.append("product id changed")
        return flags

    def to_dict(self) -> dict[str, Any]:
        return {
            "old": self.old.id,
            "new": self.new.id,
            "fields": [
                {"field": f.field, "old": f.old, "new": f.new, "changed": f.changed} for f in self.fields
            ],
            "measurement_changed": self.measurement_changed,
            "signer_changed": self.signer_changed,
            "svn_lowered": self.svn_lowered,
            "debug_enabled": self.debug_enabled,
            "flags": self.flags(),
        }

    def to_markdown(self) -> str:
        lines = [
            f"### Generation {self.old.id} -> {self.new.id}",
            "",
            "| field | old | new | |",
            "|---|---|---|---|",
        ]
        for f in self.fields:
            lines.append(f"| {f.field} | `{f.old}` | `{f.new}` | {'changed' if f.changed else ''} |")
        lines.append("")
        lines.extend(f"- **{flag}**" for flag in self.flags()) if self.flags() else lines.append("No flags.")
        return "\n".join(lines) + "\n"


_DIFF_FIELDS = ("platform", "measurement", "signer", "product_id", "svn", "debug", "tcb")


def diff(old: GenerationManifest, new: GenerationManifest) -> GenerationDiff:
    """Field by field; each detail either side has is one more field, ``details.NAME`` (None where
    a side lacks it), so two real builds compare RTMR by RTMR or PCR by PCR."""
    changes = [FieldChange(name, getattr(old, name), getattr(new, name)) for name in _DIFF_FIELDS]
    for name in sorted(set(old.details) | set(new.details)):
        changes.append(FieldChange(f"details.{name}", old.details.get(name), new.details.get(name)))
    return GenerationDiff(old, new, tuple(changes))
