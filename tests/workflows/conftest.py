"""The ``rotation`` fixture: a worker with stub activities on the time-skipping server."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest_asyncio
from temporalio.testing import WorkflowEnvironment

from tests.workflows.stubs import Fleet, Rotation, rotating


@pytest_asyncio.fixture(loop_scope="session")
async def rotation(temporal_time_skipping_env: WorkflowEnvironment) -> AsyncIterator[Rotation]:
    async with rotating(temporal_time_skipping_env, Fleet()) as rotation:
        yield rotation
