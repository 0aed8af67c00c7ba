"""Settings, read from environment variables when this module is first imported.

The twelve-factor way most FastAPI services are configured: ``settings`` below is built
once, at import time, and ``notes_api.db`` builds the engine from it right away.
``Settings.from_env()`` reads the environment afresh, for code that must see the current
value (the Alembic ``env.py``: see there).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

# Where `uvicorn notes_api.main:app` and `alembic upgrade head` go when nothing is set.
DEFAULT_DATABASE_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/notes"

_TRUE = {"1", "true", "yes", "on"}


def async_database_url(url: str) -> str:
    """``url`` with the asyncpg driver: hosting platforms hand out ``postgres://`` URLs."""
    scheme, sep, rest = url.partition("://")
    if sep and scheme in ("postgres", "postgresql", "postgresql+psycopg", "postgresql+psycopg2"):
        return f"postgresql+asyncpg://{rest}"
    return url


@dataclass(frozen=True, slots=True)
class Settings:
    database_url: str
    db_pool_size: int = 5
    db_echo: bool = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Settings:
        return cls(
            database_url=async_database_url(environ.get("DATABASE_URL") or DEFAULT_DATABASE_URL),
            db_pool_size=int(environ.get("DB_POOL_SIZE", "5")),
            db_echo=environ.get("DB_ECHO", "").lower() in _TRUE,
        )


settings = Settings.from_env()
