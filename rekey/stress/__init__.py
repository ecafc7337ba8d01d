"""The HSM stress harness: open-loop load through the KMS adapters, rotations under load,
incidents, thresholds, and the report (``rekey stress``)."""
