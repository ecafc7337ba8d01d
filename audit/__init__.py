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
    load_or_create_signing_key,
    load_public_key,
    load_signing_key,
    public_key_path_for,
    trusted_public_keys,
)
from audit.log import AuditLog
from audit.verify import VerifyReport, verify_records

__all__ = [
    "GENESIS_HASH",
    "AuditError",
    "AuditLog",
    "AuditRecord",
    "VerifyReport",
    "audit_dir",
    "canonical_bytes",
    "canonical_json",
    "check_details",
    "check_text",
    "default_actor",
    "default_signing_key_path",
    "format_time",
    "key_id_of",
    "load_or_create_signing_key",
    "load_public_key",
    "load_signing_key",
    "public_key_path_for",
    "trusted_public_keys",
    "verify_records",
]
