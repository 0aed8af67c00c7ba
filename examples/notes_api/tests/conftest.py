"""Fixtures of the notes-api test suite.

Nothing here creates tables, overrides FastAPI dependencies or patches the engine. With
``pgtemplate_env = "DATABASE_URL"`` (pyproject.toml), pytest-pgtemplate sets DATABASE_URL to
this process's worker database before the test modules import the app, so the engine that
``notes_api.db`` creates at import time, and ``get_session`` with it, use that database; every
test (not only those asking for a plugin fixture) gets it reset to the template afterwards.

The plugin sets DATABASE_URL before pytest imports any conftest.py, so importing the app
at the top of this file, as here, is fine.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from notes_api.db import engine
from notes_api.main import app

from .support import Json, create_notebook, create_user


@pytest.fixture(autouse=True)
async def _app_engine_per_test() -> AsyncIterator[None]:
    """Dispose of the app's engine after each test, on the test's own event loop.

    The engine is created at import time, lives as long as the process and pools its
    connections; pytest-asyncio gives each test a new event loop, and an asyncpg connection
    belongs to the loop that opened it. Without this, the next test would be handed a pooled
    connection of a closed loop and fail with "Event loop is closed" or "attached to a
    different loop".

    Real FastAPI suites fix this one of two ways: a test-only ``NullPool`` (a setting such as
    ``DB_POOL=null``), or disposing of the app's engine after each test. We dispose: the app
    runs exactly as in production, needs no test-only setting, and the requests of one test
    share one pooled connection (NullPool would connect once per request). Disposing here, on
    the loop that opened the connections, closes them cleanly instead of abandoning them.
    """
    yield
    await engine.dispose()


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    """The app in process, through its real dependencies (httpx does not run the lifespan)."""
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        yield client


@pytest.fixture
async def user(client: httpx.AsyncClient) -> Json:
    return await create_user(client)


@pytest.fixture
async def notebook(client: httpx.AsyncClient, user: Json) -> Json:
    return await create_notebook(client, user["id"])
