"""Trusted execution environments: the enclave interface and one module per platform.

``sim`` is the simulated TEE (SGX sealing semantics without hardware); real platforms are added
as modules beside it.
"""
