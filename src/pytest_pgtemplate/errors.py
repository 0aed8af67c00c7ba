"""The one exception type the plugin raises, and SQLSTATE helpers.

Every message names what failed, the object it failed on, the setting that
controls it and the fix.  The original driver error is chained with ``from``
so ``--tb=long`` still shows it, but the user reads our sentence first.
"""

from __future__ import annotations

from collections.abc import Iterator

# SQLSTATE codes we branch on (never on message text).
OBJECT_IN_USE = "55006"
INVALID_CATALOG_NAME = "3D000"
LOCK_NOT_AVAILABLE = "55P03"
INSUFFICIENT_PRIVILEGE = "42501"
INVALID_PASSWORD = "28P01"  # noqa: S105 (an SQLSTATE)
INVALID_AUTHORIZATION = "28000"
TOO_MANY_CONNECTIONS = "53300"  # max_connections, or a role's / database's CONNECTION LIMIT


class PgTemplateError(Exception):
    """A failure the user can act on; the message says how.

    ``setting`` names the option that controls the failing behaviour, if any,
    so the pytest glue can turn configuration mistakes into usage errors.
    """

    def __init__(self, message: str, *, setting: str | None = None) -> None:
        super().__init__(message)
        self.setting = setting


class PgTemplateWarning(UserWarning):
    """Something the plugin handled but the user should know (e.g. a test's DDL)."""


class ConfigError(PgTemplateError):
    """Bad configuration: reported as a pytest usage error, before any test runs."""


def sqlstate(exc: BaseException) -> str | None:
    """Return the SQLSTATE of a driver error (asyncpg or psycopg), else None."""
    for attr in ("sqlstate", "pgcode"):
        code = getattr(exc, attr, None)
        if isinstance(code, str):
            return code
    diag = getattr(exc, "diag", None)
    code = getattr(diag, "sqlstate", None)
    return code if isinstance(code, str) else None


def find(exc: BaseException, code: str) -> BaseException | None:
    """The first error of SQLSTATE ``code`` in ``exc``'s chain (see ``chain``), else None."""
    return next((e for e in chain(exc) if sqlstate(e) == code), None)


def find_instance(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    """The first ``kind`` in ``exc``'s chain (see ``chain``), else None."""
    return next((e for e in chain(exc) if isinstance(e, kind)), None)


def chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, its causes and contexts (unless suppressed: ``raise ... from None``, as for
    a message already told), and the driver errors SQLAlchemy errors wrap (``orig``)."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        orig = getattr(current, "orig", None)
        context = None if current.__suppress_context__ else current.__context__
        todo += [current.__cause__, context, orig if isinstance(orig, BaseException) else None]
