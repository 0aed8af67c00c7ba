"""add customers.phone and customers.is_active

Revision ID: 0007
Revises: 0006
Create Date: 2024-02-02 13:05:48.771903
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("customers", sa.Column("phone", sa.String(length=32), nullable=True))
    # The server default fills existing rows, so NOT NULL holds right away.
    op.add_column(
        "customers",
        sa.Column("is_active", sa.Boolean(), server_default=sa.true(), nullable=False),
    )


def downgrade() -> None:
    op.drop_column("customers", "is_active")
    op.drop_column("customers", "phone")
