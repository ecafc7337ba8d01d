"""Shared fixtures. Each real server lives in its own plugin module under tests/fixtures/."""

pytest_plugins = [
    "tests.fixtures.postgres",
    "tests.fixtures.openbao",
]
