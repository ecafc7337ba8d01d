"""Trusted execution environments: the enclave interface and one module per platform.

``platform`` is the interface every platform implements (identity, evidence over 64 bytes of
report data, sealing-key derivation) and the sealing built on it; ``sim`` is the simulated TEE
(SGX sealing semantics without hardware). Real platforms (SGX under Gramine, SEV-SNP, TDX,
Nitro) are added as modules beside it.
"""
