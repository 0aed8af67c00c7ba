"""rename addresses.zip to postal_code

Revision ID: 0009
Revises: 0008
Create Date: 2024-03-04 10:19:27.934518
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.alter_column("addresses", "zip", new_column_name="postal_code")


def downgrade() -> None:
    op.alter_column("addresses", "postal_code", new_column_name="zip")
