"""seed the built-in tags

A data migration: every database built from the migrations starts with these tags, so the
app (and every test) may rely on them. It uses a table stub rather than the ORM model, which
describes the schema at head, not at this revision.

Revision ID: 0004
Revises: 0003
Create Date: 2024-05-13 16:20:18.007731
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

tags = sa.table(
    "tags",
    sa.column("name", sa.String()),
    sa.column("color", sa.String()),
    sa.column("builtin", sa.Boolean()),
)

# (name, color)
BUILTIN_TAGS = [
    ("inbox", "#6b7280"),
    ("todo", "#ef4444"),
    ("idea", "#f59e0b"),
    ("reference", "#3b82f6"),
    ("archive", "#9ca3af"),
]


def upgrade() -> None:
    op.bulk_insert(tags, [{"name": name, "color": color, "builtin": True} for name, color in BUILTIN_TAGS])


def downgrade() -> None:
    op.execute(tags.delete().where(tags.c.name.in_([name for name, _ in BUILTIN_TAGS])))
