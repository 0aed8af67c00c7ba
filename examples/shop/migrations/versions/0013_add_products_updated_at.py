"""add products.updated_at, kept current by a trigger

Revision ID: 0013
Revises: 0012
Create Date: 2024-04-22 16:36:09.813264
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TOUCH_UPDATED_AT = """
CREATE FUNCTION touch_updated_at() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    -- Whatever the UPDATE says, updated_at is the time of the change.
    NEW.updated_at := now();
    RETURN NEW;
END;
$$
"""

PRODUCTS_TOUCH_TRIGGER = """
CREATE TRIGGER products_touch_updated_at
BEFORE UPDATE ON products
FOR EACH ROW EXECUTE FUNCTION touch_updated_at()
"""


def upgrade() -> None:
    op.add_column(
        "products",
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
        ),
    )
    # Existing rows were last changed when they were created.
    op.execute("UPDATE products SET updated_at = created_at")
    op.execute(TOUCH_UPDATED_AT)
    op.execute(PRODUCTS_TOUCH_TRIGGER)


def downgrade() -> None:
    op.execute("DROP TRIGGER products_touch_updated_at ON products")
    op.execute("DROP FUNCTION touch_updated_at()")
    op.drop_column("products", "updated_at")
