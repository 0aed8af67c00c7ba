"""The database: one pooled AsyncEngine per process, created when this module is imported.

This is the pattern pytest-pgtemplate's ``pgtemplate_env`` exists for: nothing in the tests
replaces this engine or overrides ``get_session``; DATABASE_URL already names the right
database when the tests import the app.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from .settings import settings

engine: AsyncEngine = create_async_engine(
    settings.database_url,
    pool_size=settings.db_pool_size,
    pool_pre_ping=True,
    echo=settings.db_echo,
)

SessionLocal = async_sessionmaker(engine, expire_on_commit=False)


async def get_session() -> AsyncIterator[AsyncSession]:
    """FastAPI dependency: one session per request, closed (rolled back if uncommitted) after it."""
    async with SessionLocal() as session:
        yield session
