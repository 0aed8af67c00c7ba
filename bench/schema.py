"""The benchmark's schema, as plain data: what the generator writes and the micro-benchmark writes to.

Three fixed tables (``countries`` and ``currencies``, filled by a data migration, and
``audit_log``, filled by a plpgsql trigger) plus groups of up to four FK-linked tables,
``gNN_account <- gNN_order <- gNN_line / gNN_payment``, until the requested count is
reached.  Every ``gNN_order`` has an ``order_status`` enum column and the audit trigger.
"""

from __future__ import annotations

from dataclasses import dataclass

ROLES = ("account", "order", "line", "payment")
FIXED_TABLES = ("countries", "currencies", "audit_log")
REFERENCE_TABLES = ("countries", "currencies")
ORDER_STATUSES = ("pending", "paid", "shipped", "cancelled")

COUNTRIES: tuple[tuple[str, str], ...] = (
    ("AR", "Argentina"), ("AU", "Australia"), ("BR", "Brazil"), ("CA", "Canada"),
    ("CH", "Switzerland"), ("CN", "China"), ("DE", "Germany"), ("ES", "Spain"),
    ("FR", "France"), ("GB", "United Kingdom"), ("IN", "India"), ("IT", "Italy"),
    ("JP", "Japan"), ("KE", "Kenya"), ("MX", "Mexico"), ("NL", "Netherlands"),
    ("NO", "Norway"), ("PL", "Poland"), ("SE", "Sweden"), ("US", "United States"),
)
CURRENCIES: tuple[tuple[str, str], ...] = (
    ("EUR", "Euro"), ("USD", "US dollar"), ("GBP", "Pound sterling"), ("JPY", "Yen"),
    ("CHF", "Swiss franc"), ("SEK", "Swedish krona"), ("BRL", "Real"), ("INR", "Rupee"),
)


@dataclass(frozen=True, slots=True)
class Group:
    """One cluster of FK-linked tables; ``roles`` is a prefix of ``ROLES``."""

    index: int
    roles: tuple[str, ...]

    def table(self, role: str) -> str:
        return f"g{self.index:02d}_{role}"

    def model(self, role: str) -> str:
        return f"G{self.index:02d}{role.capitalize()}"

    @property
    def tables(self) -> tuple[str, ...]:
        return tuple(self.table(role) for role in self.roles)


@dataclass(frozen=True, slots=True)
class Schema:
    tables: int
    groups: tuple[Group, ...]

    @property
    def table_names(self) -> tuple[str, ...]:
        return FIXED_TABLES + tuple(t for g in self.groups for t in g.tables)


def build_schema(tables: int) -> Schema:
    """A schema of exactly ``tables`` application tables (alembic_version not counted)."""
    if tables < len(FIXED_TABLES) + 1:
        raise ValueError(f"need at least {len(FIXED_TABLES) + 1} tables, got {tables}")
    remaining = tables - len(FIXED_TABLES)
    groups: list[Group] = []
    while remaining > 0:
        size = min(len(ROLES), remaining)
        groups.append(Group(len(groups), ROLES[:size]))
        remaining -= size
    return Schema(tables, tuple(groups))
