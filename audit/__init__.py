"""The signed, hash-chained audit log of key operations (format, append, verify, keys)."""
