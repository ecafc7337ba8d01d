"""Appraisal policy: which claims may be released keys.

A policy is a YAML or JSON document::

    id: payments-release          # policy id, goes into result tokens
    rules:
      - platform: sgx              # sim | sgx | sev-snp | tdx | nitro
        measurements: [<hex>, ...] # EITHER an allowlist of measurements ...
        signer: <hex>              # ... OR signer + product_id + min_svn (all three)
        product_id: 1
        min_svn: 2
        debug_allowed: false       # default false
        tcb_statuses: [UpToDate]   # default [UpToDate]
        max_evidence_age: 5m       # optional; 30s, 5m, 1h, 1d or combined (1h30m)
        nonce_required: true       # default true
        details:                   # optional: platform fields that must equal (Claims.details)
          rtmr1: <hex>             #   e.g. TDX RTMRs, SEV-SNP host_data, Nitro pcr1..pcr15

Validation is strict: unknown fields are errors, hex values must be quoted strings (YAML would
read ``1234`` as a number and drop leading zeros), integers and booleans must be real integers
and booleans, durations need a unit, and duplicate keys in the file are refused. Every problem
becomes one ``PolicyError`` whose one-line message names the field (``rules[0].min_svn: ...``).

Rules are tried in order; the first rule whose every condition holds allows. ``Decision.rule_index``
is the 0-based index into ``Policy.rules``; reasons number rules from 1 as a reader of the file
counts them (``rule 1: ...`` is ``rules[0]``).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    model_validator,
)

from attestation.claims import Claims
from attestation.errors import AttestationError

__all__ = [
    "NO_SIGNER_WHEN_ZERO",
    "TCB_STATUSES",
    "Decision",
    "Policy",
    "PolicyError",
    "Rule",
    "format_duration",
    "load_policy",
    "parse_duration",
    "parse_policy",
    "parse_policy_text",
]

PLATFORMS = ("sim", "sgx", "sev-snp", "tdx", "nitro")
Platform = Literal["sim", "sgx", "sev-snp", "tdx", "nitro"]

#: TCB statuses a rule may allow (the Intel/AMD appraisal vocabulary the platform verifiers map to).
TCB_STATUSES = frozenset(
    {
        "UpToDate",
        "SWHardeningNeeded",
        "ConfigurationNeeded",
        "ConfigurationAndSWHardeningNeeded",
        "OutOfDate",
        "OutOfDateConfigurationNeeded",
        "Revoked",
    }
)

#: Platforms whose signer field is all zeros when the build has none (SEV-SNP without an ID key,
#: TDX without MROWNER, an unsigned Nitro image's PCR8): a signer rule there must name one.
NO_SIGNER_WHEN_ZERO = frozenset({"sev-snp", "tdx", "nitro"})

#: Evidence dated further in the future than this is refused by rules that limit evidence age.
CLOCK_SKEW = timedelta(seconds=60)

_MAX_POLICY_BYTES = 1 << 20


class PolicyError(AttestationError):
    """The policy document is invalid. The message is one line and names the field."""


# --------------------------------------------------------------------------------------------
# Field types
# --------------------------------------------------------------------------------------------

_HEX_RE = re.compile(r"[0-9a-f]+")
_DURATION_RE = re.compile(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")


def _hex(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be a quoted hex string, not {type(value).__name__}")
    text = value.strip().lower()
    if text.startswith("0x"):
        text = text[2:]
    if not text:
        raise ValueError("must be a non-empty hex string")
    if not _HEX_RE.fullmatch(text):
        raise ValueError("must be a hex string (0-9, a-f)")
    if len(text) % 2:
        raise ValueError("must be a hex string with an even number of digits")
    return text


def parse_duration(value: object) -> timedelta:
    """``30s``, ``5m``, ``1h``, ``1d`` or combinations in that order (``1h30m``); > 0."""
    if isinstance(value, timedelta):
        result = value
    elif isinstance(value, str):
        text = value.strip()
        match = _DURATION_RE.fullmatch(text)
        if not text or match is None:
            raise ValueError(f"{value!r} is not a duration like 30s, 5m, 1h or 1h30m")
        days, hours, minutes, seconds = (int(part) if part else 0 for part in match.groups())
        result = timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)
    else:
        raise ValueError(f"must be a duration string like 30s, 5m or 1h, not {type(value).__name__}")
    if result <= timedelta(0):
        raise ValueError("must be longer than zero")
    return result


def format_duration(delta: timedelta) -> str:
    """``timedelta(minutes=7, seconds=3)`` -> ``7m3s``; whole seconds, rounded down."""
    total = int(delta.total_seconds())
    sign = "-" if total < 0 else ""
    total = abs(total)
    if total == 0:
        return "0s"
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count, total = divmod(total, size)
        if count:
            parts.append(f"{count}{unit}")
    return sign + "".join(parts)


def _tcb_status(value: object) -> object:
    if isinstance(value, str) and value not in TCB_STATUSES:
        raise ValueError(f"unknown TCB status {value!r} (known: {', '.join(sorted(TCB_STATUSES))})")
    return value


Hex = Annotated[str, BeforeValidator(_hex)]
Duration = Annotated[timedelta, BeforeValidator(parse_duration)]
TcbStatus = Annotated[StrictStr, BeforeValidator(_tcb_status)]
DetailName = Annotated[StrictStr, Field(pattern=r"^[a-z][a-z0-9_]{0,31}$")]


class Rule(BaseModel):
    """One rule of a policy. Hex values are normalised to lowercase without ``0x``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    platform: Platform
    measurements: tuple[Hex, ...] | None = Field(default=None, min_length=1)
    signer: Hex | None = None
    product_id: StrictInt | None = Field(default=None, ge=0)
    min_svn: StrictInt | None = Field(default=None, ge=0)
    debug_allowed: StrictBool = False
    tcb_statuses: tuple[TcbStatus, ...] = Field(default=("UpToDate",), min_length=1)
    max_evidence_age: Duration | None = None
    nonce_required: StrictBool = True
    details: dict[DetailName, Hex] | None = Field(default=None, min_length=1, max_length=48)

    @model_validator(mode="after")
    def _one_kind(self) -> Rule:
        identity = {"signer": self.signer, "product_id": self.product_id, "min_svn": self.min_svn}
        given = [name for name, value in identity.items() if value is not None]
        if self.measurements is not None and given:
            raise ValueError(
                "give either measurements or signer + product_id + min_svn, not both "
                f"(also got {', '.join(given)})"
            )
        if self.measurements is None:
            if not given:
                raise ValueError("needs either measurements or signer + product_id + min_svn")
            zero_signer = self.signer is not None and not self.signer.strip("0")
            if zero_signer and self.platform in NO_SIGNER_WHEN_ZERO:
                raise ValueError(
                    f"signer is all zeros: {self.platform} evidence without a signer (no ID key, no"
                    " owner, an unsigned image) names no one, so this rule would admit any workload;"
                    " give measurements"
                )
            missing = [name for name in identity if name not in given]
            if missing:
                raise ValueError(f"signer, product_id and min_svn go together; missing {', '.join(missing)}")
        return self

    @property
    def kind(self) -> Literal["measurements", "signer"]:
        return "measurements" if self.measurements is not None else "signer"

    def canonical(self) -> dict[str, Any]:
        age = self.max_evidence_age
        return {
            "platform": self.platform,
            "measurements": sorted(set(self.measurements)) if self.measurements is not None else None,
            "signer": self.signer,
            "product_id": self.product_id,
            "min_svn": self.min_svn,
            "debug_allowed": self.debug_allowed,
            "tcb_statuses": sorted(set(self.tcb_statuses)),
            "max_evidence_age": format_duration(age) if age is not None else None,
            "nonce_required": self.nonce_required,
        } | ({"details": dict(sorted(self.details.items()))} if self.details else {})


class _PolicyDocument(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: StrictStr = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")
    rules: list[Rule] = Field(min_length=1)


# --------------------------------------------------------------------------------------------
# Policy and evaluation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    allowed: bool
    rule_index: int | None  # 0-based index into Policy.rules of the allowing rule
    reasons: list[str] = field(default_factory=list)  # why not, in words; empty when allowed


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


class Policy:
    """A validated, immutable policy, compiled for evaluation. Build with ``parse_policy`` or
    ``load_policy``."""

    __slots__ = ("_allowlists", "_canonical", "digest", "id", "rules")

    def __init__(self, document: _PolicyDocument) -> None:
        self.id: str = document.id
        self.rules: tuple[Rule, ...] = tuple(document.rules)
        self._allowlists: tuple[frozenset[str] | None, ...] = tuple(
            frozenset(rule.measurements) if rule.measurements is not None else None for rule in self.rules
        )
        self._canonical = json.dumps(
            {"id": self.id, "rules": [rule.canonical() for rule in self.rules]},
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=True,
        ).encode()
        #: lowercase hex SHA-256 of ``canonical_json()``; equal for documents that mean the same
        self.digest: str = hashlib.sha256(self._canonical).hexdigest()

    def canonical_json(self) -> bytes:
        return self._canonical

    def to_dict(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self._canonical)
        return result

    def __repr__(self) -> str:
        return f"Policy(id={self.id!r}, digest={self.digest[:16]}…, rules={len(self.rules)})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Policy) and other.digest == self.digest

    def __hash__(self) -> int:
        return hash(self.digest)

    def evaluate(self, claims: Claims, *, now: datetime, nonce_checked: bool) -> Decision:
        """Try the rules in order. ``now`` must be timezone-aware; a naive ``claims.evidence_time``
        is taken as UTC. ``nonce_checked``: the caller checked a fresh nonce against the report data."""
        if now.tzinfo is None:
            raise ValueError("now must be a timezone-aware datetime")
        reasons: list[str] = []
        found = False
        for index, rule in enumerate(self.rules):
            if rule.platform != claims.platform:
                continue
            found = True
            failures = self._check(index, rule, claims, now, nonce_checked)
            if not failures:
                return Decision(allowed=True, rule_index=index, reasons=[])
            reasons.extend(f"rule {index + 1}: {failure}" for failure in failures)
        if not found:
            reasons.append(f"no rule for platform {claims.platform}")
        return Decision(allowed=False, rule_index=None, reasons=reasons)

    def _check(self, index: int, rule: Rule, claims: Claims, now: datetime, nonce_checked: bool) -> list[str]:
        failures: list[str] = []
        if claims.debug and not rule.debug_allowed:
            failures.append("debug enclave not allowed")
        allowlist = self._allowlists[index]
        if allowlist is not None:
            measurement = claims.measurement.lower()
            if measurement not in allowlist:
                failures.append(f"measurement {measurement} is not in the allowlist")
        else:
            signer = claims.signer.lower()
            if signer != rule.signer:
                failures.append(f"signer {signer} is not {rule.signer}")
            if claims.product_id != rule.product_id:
                failures.append(f"product id {claims.product_id} is not {rule.product_id}")
            if rule.min_svn is not None and claims.svn < rule.min_svn:
                failures.append(f"svn {claims.svn} is below the minimum {rule.min_svn}")
        if claims.tcb_status not in rule.tcb_statuses:
            failures.append(
                f"TCB status {claims.tcb_status} is not allowed (allowed: {', '.join(rule.tcb_statuses)})"
            )
        if rule.max_evidence_age is not None:
            limit = format_duration(rule.max_evidence_age)
            if claims.evidence_time is None:
                failures.append(f"evidence carries no time but the rule limits its age to {limit}")
            else:
                age = now - _aware(claims.evidence_time)
                if age > rule.max_evidence_age:
                    failures.append(f"evidence is {format_duration(age)} old, older than the maximum {limit}")
                elif age < -CLOCK_SKEW:
                    failures.append(f"evidence is dated {format_duration(-age)} in the future")
        for name, want in (rule.details or {}).items():
            got = claims.detail(name)
            if got is None:
                failures.append(f"the evidence has no {name}")
            elif got.lower() != want:
                failures.append(f"{name} {got.lower()} is not {want}")
        if rule.nonce_required and not nonce_checked:
            failures.append("no nonce was checked but the rule requires one")
        return failures


# --------------------------------------------------------------------------------------------
# Parsing and loading
# --------------------------------------------------------------------------------------------


def _location(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text or "policy"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _error_message(error: Mapping[str, Any]) -> str:
    loc: tuple[int | str, ...] = tuple(error.get("loc", ()))
    kind = error.get("type", "")
    # pydantic puts the failing Annotated validator or union member in the location; drop those.
    loc = tuple(p for p in loc if not (isinstance(p, str) and ("[" in p or p.startswith("function-"))))
    if kind == "extra_forbidden":
        return f"{_location(loc)}: unknown field"
    if kind == "missing":
        return f"{_location(loc)}: required field is missing"
    if kind in ("too_short", "string_too_short") and error.get("ctx", {}).get("min_length") == 1:
        return f"{_location(loc)}: must not be empty"
    message = str(error.get("msg", "invalid"))
    for prefix in ("Value error, ", "Assertion failed, "):
        if message.startswith(prefix):
            message = message[len(prefix) :]
    return _one_line(f"{_location(loc)}: {message}")


def parse_policy(document: Mapping[str, Any]) -> Policy:
    """Validate a policy document (a mapping, e.g. from ``yaml.safe_load``)."""
    if not isinstance(document, Mapping):
        raise PolicyError(f"policy: must be a mapping with id and rules, not {type(document).__name__}")
    try:
        validated = _PolicyDocument.model_validate(dict(document))
    except ValidationError as exc:
        messages: list[str] = []
        for error in exc.errors():
            message = _error_message(error)
            if message not in messages:
                messages.append(message)
        raise PolicyError("; ".join(messages)) from None
    return Policy(validated)


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (a second ``measurements:`` must not win silently)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            duplicate = key in seen
        except TypeError:  # unhashable; construct_mapping reports it
            continue
        if duplicate:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _json_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _yaml_error(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        return _one_line(f"{exc.problem or exc.context or 'invalid YAML'}{where}")
    return _one_line(str(exc))


def parse_policy_text(text: str | bytes, *, fmt: Literal["yaml", "json"] = "yaml") -> Policy:
    """Parse a policy from YAML (a superset of JSON) or strict JSON text."""
    try:
        if fmt == "json":
            document = json.loads(text, object_pairs_hook=_json_pairs)
        else:
            document = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass  # nosec B506
    except yaml.YAMLError as exc:
        raise PolicyError(f"policy: not valid YAML: {_yaml_error(exc)}") from None
    except ValueError as exc:  # json.JSONDecodeError is a ValueError, as is a duplicate key
        raise PolicyError(f"policy: not valid JSON: {_one_line(str(exc))}") from None
    if document is None:
        raise PolicyError("policy: the document is empty")
    return parse_policy(document)


_cache_lock = threading.Lock()
_cache: OrderedDict[tuple[str, bytes], Policy] = OrderedDict()
_CACHE_SIZE = 64


def load_policy(path: str | Path) -> Policy:
    """Load a policy file: ``.json`` as strict JSON, anything else as YAML.

    Policies are memoised by file content, so callers may load the policy for every request."""
    path = Path(path)
    fmt: Literal["yaml", "json"] = "json" if path.suffix.lower() == ".json" else "yaml"
    try:
        with path.open("rb") as handle:
            data = handle.read(_MAX_POLICY_BYTES + 1)
    except OSError as exc:
        raise PolicyError(f"cannot read policy {path}: {exc.strerror or exc}") from None
    if len(data) > _MAX_POLICY_BYTES:
        raise PolicyError(f"policy {path} is larger than {_MAX_POLICY_BYTES} bytes")
    key = (fmt, hashlib.sha256(data).digest())
    with _cache_lock:
        cached = _cache.get(key)
        if cached is not None:
            _cache.move_to_end(key)
            return cached
    try:
        policy = parse_policy_text(data, fmt=fmt)
    except PolicyError as exc:
        raise PolicyError(f"{path}: {exc}") from None
    with _cache_lock:
        _cache[key] = policy
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return policy
