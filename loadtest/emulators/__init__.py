"""Local emulators of cloud KMS services, for tests, the dev stack and benchmarks.

``azure_keyvault``: an Azure Key Vault / Managed HSM keys endpoint (HTTPS, bearer challenge,
REST shapes of API version 2025-07-01, per-class throttling with HTTP 429) that the unmodified
``azure-keyvault-keys`` SDK talks to. Emulators keep key material in plain files: never put
real secrets in them.
"""
