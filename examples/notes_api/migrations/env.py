"""Alembic environment of notes-api: the URL comes from the app's own settings.

``alembic.ini`` holds no ``sqlalchemy.url``: ``alembic upgrade head`` migrates whatever
DATABASE_URL names, the very database the app connects to, read by the app's own
``Settings`` class (which also turns a ``postgres://`` URL into an asyncpg one).

The settings are read afresh (``Settings.from_env()``), not taken from the module-level
``notes_api.settings.settings``: that object was built when ``notes_api`` was first imported.
Under pytest that happens when the test modules are imported, with DATABASE_URL naming the
worker database; pytest-pgtemplate points DATABASE_URL at the template database only while
it migrates it.
"""

import asyncio
from logging.config import fileConfig

from alembic import context
from sqlalchemy import pool
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from notes_api.models import Base
from notes_api.settings import Settings

config = context.config

if config.config_file_name is not None:
    fileConfig(config.config_file_name)

target_metadata = Base.metadata


def database_url() -> str:
    return Settings.from_env().database_url


def run_migrations_offline() -> None:
    """Emit the migrations as SQL (``alembic upgrade head --sql``) without connecting."""
    context.configure(
        url=database_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def do_run_migrations(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata)
    with context.begin_transaction():
        context.run_migrations()


async def run_async_migrations() -> None:
    engine = create_async_engine(database_url(), poolclass=pool.NullPool)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(do_run_migrations)
    finally:
        await engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    asyncio.run(run_async_migrations())
