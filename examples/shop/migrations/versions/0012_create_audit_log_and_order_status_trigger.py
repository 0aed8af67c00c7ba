"""create audit_log and a trigger that records order status changes

Revision ID: 0012
Revises: 0011
Create Date: 2024-04-03 12:14:55.480327
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

AUDIT_ORDER_STATUS = """
CREATE FUNCTION audit_order_status() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO audit_log (table_name, row_id, action, details)
        VALUES (TG_TABLE_NAME, NEW.id, 'order_created',
                jsonb_build_object('status', NEW.status, 'total_cents', NEW.total_cents));
    ELSIF NEW.status IS DISTINCT FROM OLD.status THEN
        INSERT INTO audit_log (table_name, row_id, action, details)
        VALUES (TG_TABLE_NAME, NEW.id, 'status_changed',
                jsonb_build_object('from', OLD.status, 'to', NEW.status));
    END IF;
    RETURN NULL;
END;
$$
"""

ORDERS_AUDIT_TRIGGER = """
CREATE TRIGGER orders_audit_status
AFTER INSERT OR UPDATE OF status ON orders
FOR EACH ROW EXECUTE FUNCTION audit_order_status()
"""


def upgrade() -> None:
    op.create_table(
        "audit_log",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("table_name", sa.String(length=63), nullable=False),
        sa.Column("row_id", sa.BigInteger(), nullable=False),
        sa.Column("action", sa.String(length=32), nullable=False),
        sa.Column(
            "details",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column(
            "db_user",
            sa.String(length=63),
            server_default=sa.text("CURRENT_USER"),
            nullable=False,
        ),
        sa.Column(
            "changed_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name="pk_audit_log"),
    )
    op.create_index("ix_audit_log_table_name_row_id", "audit_log", ["table_name", "row_id"])
    op.execute(AUDIT_ORDER_STATUS)
    op.execute(ORDERS_AUDIT_TRIGGER)


def downgrade() -> None:
    op.execute("DROP TRIGGER orders_audit_status ON orders")
    op.execute("DROP FUNCTION audit_order_status()")
    op.drop_index("ix_audit_log_table_name_row_id", table_name="audit_log")
    op.drop_table("audit_log")
