"""index orders by (customer_id, created_at) and order_items by product_id

The order history page sorts a customer's orders by date; the composite index replaces the
single-column one. Top-seller reports scan order_items by product.

Revision ID: 0014
Revises: 0013
Create Date: 2024-05-06 10:48:31.065592
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_orders_customer_id_created_at", "orders", ["customer_id", "created_at"])
    op.drop_index("ix_orders_customer_id", table_name="orders")
    op.create_index("ix_order_items_product_id", "order_items", ["product_id"])


def downgrade() -> None:
    op.drop_index("ix_order_items_product_id", table_name="order_items")
    op.create_index("ix_orders_customer_id", "orders", ["customer_id"])
    op.drop_index("ix_orders_customer_id_created_at", table_name="orders")
