"""Shared fixtures. Each real server lives in its own plugin module under tests/fixtures/."""

pytest_plugins = [
    "tests.fixtures.postgres",
    "tests.fixtures.openbao",
    "tests.fixtures.moto",
    "tests.fixtures.azure",
    "tests.fixtures.temporal",
    "tests.fixtures.fault_proxy",
    "tests.fixtures.freshness",  # store, raw, signer, witness, wrapper, state (modules may override)
    "tests.fixtures.adapters",  # last: it builds on the server fixtures above
]
