"""The app's own engine reaches this worker's migrated database, and no other.

pytest-pgtemplate set DATABASE_URL before these modules were imported (``pgtemplate_env``);
``notes_api.db`` built its engine from it at import time.
"""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import URL, make_url, text
from sqlalchemy.engine import Connection
from sqlalchemy.pool import QueuePool

from notes_api.db import engine
from notes_api.models import Base
from notes_api.settings import DEFAULT_DATABASE_URL, settings

ALEMBIC_INI = Path(__file__).parents[1] / "alembic.ini"


async def test_database_url_names_this_workers_database(pg_url: URL) -> None:
    url = make_url(os.environ["DATABASE_URL"])
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")

    assert url.drivername == "postgresql+asyncpg"
    assert url.database != make_url(DEFAULT_DATABASE_URL).database
    # pgt_w_<run>_<worker>: one database per xdist worker (gw0, gw1, ...), "main" without xdist.
    assert url.database is not None
    assert url.database.endswith(f"_{worker}")
    assert url.database == pg_url.database  # the database the plugin resets after each test
    assert settings.database_url == os.environ["DATABASE_URL"]


async def test_the_apps_engine_is_connected_to_that_database(client: httpx.AsyncClient) -> None:
    expected = make_url(os.environ["DATABASE_URL"]).database

    async with engine.connect() as connection:
        current = await connection.scalar(text("SELECT current_database()"))

    assert current == expected == engine.url.database
    assert (await client.get("/health")).json() == {"status": "ok", "database": expected}


@pytest.mark.parametrize("round_", [1, 2, 3])
async def test_each_test_gets_fresh_app_connections_on_its_own_loop(
    client: httpx.AsyncClient, round_: int
) -> None:
    # Every round runs on a new event loop, yet the app's process-wide engine serves it: the
    # connections the previous round pooled were disposed of on its loop (conftest.py).
    pool = engine.pool
    assert isinstance(pool, QueuePool)
    assert (pool.checkedin(), pool.checkedout()) == (0, 0)

    for _ in range(3):
        assert (await client.get("/health")).status_code == 200

    assert (pool.checkedin(), pool.checkedout()) == (1, 0)  # the requests shared one connection


async def test_the_database_is_migrated_to_head() -> None:
    head = ScriptDirectory.from_config(Config(str(ALEMBIC_INI))).get_current_head()

    async with engine.connect() as connection:
        versions = (await connection.scalars(text("SELECT version_num FROM alembic_version"))).all()

    assert head is not None
    assert versions == [head]


async def test_the_models_match_the_migrations() -> None:
    def differences(connection: Connection) -> list[object]:
        return list(compare_metadata(MigrationContext.configure(connection), Base.metadata))

    async with engine.connect() as connection:
        assert await connection.run_sync(differences) == []
