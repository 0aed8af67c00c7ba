"""add 'refunded' to the order_status enum

Revision ID: 0015
Revises: 0014
Create Date: 2024-06-11 14:02:57.339108
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# As created in 0012.
ORDERS_AUDIT_TRIGGER = """
CREATE TRIGGER orders_audit_status
AFTER INSERT OR UPDATE OF status ON orders
FOR EACH ROW EXECUTE FUNCTION audit_order_status()
"""


def upgrade() -> None:
    # Allowed inside a transaction since PostgreSQL 12, as long as this transaction does not
    # use the new value.
    op.execute("ALTER TYPE order_status ADD VALUE 'refunded' AFTER 'cancelled'")


def downgrade() -> None:
    # PostgreSQL cannot drop an enum value: swap the type for one without it. Refunded
    # orders become cancelled, the closest status the old code understands. The audit
    # trigger of 0012 lists the column (UPDATE OF status), which blocks the type change
    # while it exists.
    op.execute("UPDATE orders SET status = 'cancelled' WHERE status = 'refunded'")
    op.execute("DROP TRIGGER orders_audit_status ON orders")
    op.execute("ALTER TYPE order_status RENAME TO order_status_old")
    op.execute("CREATE TYPE order_status AS ENUM ('pending', 'paid', 'shipped', 'delivered', 'cancelled')")
    op.execute("ALTER TABLE orders ALTER COLUMN status DROP DEFAULT")
    op.execute("ALTER TABLE orders ALTER COLUMN status TYPE order_status USING status::text::order_status")
    op.execute("ALTER TABLE orders ALTER COLUMN status SET DEFAULT 'pending'")
    op.execute("DROP TYPE order_status_old")
    op.execute(ORDERS_AUDIT_TRIGGER)
