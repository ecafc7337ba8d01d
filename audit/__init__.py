"""The signed, hash-chained audit log of key operations: records and their canonical encoding
(`audit.format`), the table and its migrations (`audit.schema`), appending and reading
(`audit.log`), verification (`audit.verify`) and key files (`audit.keys`).

The byte format, the worked example, concurrency, verification and keys are specified in
docs/audit-log-format.md.
"""

from audit.errors import AuditError
from audit.format import (
    GENESIS_HASH,
    AuditRecord,
    canonical_bytes,
    canonical_json,
    check_details,
    check_text,
    default_actor,
    format_time,
    key_id_of,
)
from audit.keys import (
    audit_dir,
    default_signing_key_path,
    found_public_keys,
    load_or_create_signing_key,
    load_public_key,
    load_signing_key,
    public_key_path_for,
    trusted_public_keys,
)
from audit.log import HEAD_KIND, AuditLog, head_subject
from audit.verify import Head, VerifyReport, parse_head, verify_records

__all__ = [
    "GENESIS_HASH",
    "HEAD_KIND",
    "AuditError",
    "AuditLog",
    "AuditRecord",
    "Head",
    "VerifyReport",
    "audit_dir",
    "canonical_bytes",
    "canonical_json",
    "check_details",
    "check_text",
    "default_actor",
    "default_signing_key_path",
    "format_time",
    "found_public_keys",
    "head_subject",
    "key_id_of",
    "load_or_create_signing_key",
    "load_public_key",
    "load_signing_key",
    "parse_head",
    "public_key_path_for",
    "trusted_public_keys",
    "verify_records",
]
