"""``--pgt-check-downgrade``: upgrade, downgrade to base, upgrade again, same schema?

Run only when a template is (re)built, on a scratch database of its own, so it costs
nothing while the fingerprint holds.  A downgrade that raises is named by revision;
one that leaves the schema different is shown by what differs.
"""

from __future__ import annotations

import asyncio
from importlib.resources import files

from sqlalchemy.engine import URL

from .db import connect
from .errors import PgTemplateError
from .migrate import AlembicMigrator, require_alembic_ran, run_in_fresh_thread

# Every schema object a migration can leave behind, rendered to comparable text.
SCHEMA_SQL = (files(__package__) / "sql" / "schema.sql").read_text()

SHOWN = 8  # differences listed in the message


def schema_of(url: URL, *, require_migrated: bool = False) -> set[str]:
    """The schema of the database at ``url`` as a set of lines; with ``require_migrated``,
    first proof that Alembic migrated that very database."""
    found: list[set[str]] = []

    async def read() -> None:
        conn = await connect(url)
        try:
            if require_migrated:
                await require_alembic_ran(conn, str(url.database))
            found.append({r[0] for r in await conn.fetch(SCHEMA_SQL)})
        finally:
            await conn.close()

    run_in_fresh_thread(lambda: asyncio.run(read()))
    return found[0]


def check_downgrade(migrator: AlembicMigrator, url: URL) -> None:
    """Upgrade, downgrade base, upgrade again on ``url`` (a scratch database): the two
    upgraded schemas must be the same.  Raises PgTemplateError saying what went wrong."""
    migrator.migrate(url)
    before = schema_of(url, require_migrated=True)  # before any downgrade
    try:
        migrator.downgrade_all(url)
        migrator.migrate(url)
    except PgTemplateError as exc:
        raise PgTemplateError(
            f"pytest-pgtemplate: --pgt-check-downgrade: {str(exc).removeprefix('pytest-pgtemplate: ')}"
        ) from exc
    after = schema_of(url)
    if before != after:
        lost = sorted(before - after)[:SHOWN]
        gained = sorted(after - before)[:SHOWN]
        diff = "".join(f"\n  - {line}" for line in lost) + "".join(f"\n  + {line}" for line in gained)
        raise PgTemplateError(
            "pytest-pgtemplate: --pgt-check-downgrade: after downgrade base and upgrade heads the "
            f"schema differs from a plain upgrade (- only before, + only after):{diff}\n"
            "Fix the downgrade() of the revisions that create or change these objects."
        )
