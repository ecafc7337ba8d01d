"""A private Temporal dev server started by `rekey.devstack.temporal.start_dev_server` keeps
standard output to its caller: a benchmark's or a command's ``--json`` stays parseable."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.integration

SCRIPT = textwrap.dedent(
    """
    import asyncio, json, os, sys
    from rekey.devstack.temporal import start_dev_server

    async def main() -> None:
        env = await start_dev_server(data_converter=None)
        try:
            await asyncio.sleep(1.5)  # the server prints its banner a moment after it answers
            print(json.dumps({"address": env.client.service_client.config.target_host}))
        finally:
            await env.shutdown()

    asyncio.run(main())
    sys.stdout.flush()
    os._exit(0)  # the SDK's core thread can crash the interpreter's finalisation (not under test)
    """
)


def test_the_dev_servers_banner_goes_to_standard_error() -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 1, done.stdout  # the caller's line only
    assert json.loads(lines[0])["address"].startswith("127.0.0.1:")
    assert "level=" in done.stderr  # the server's own log lines went there
