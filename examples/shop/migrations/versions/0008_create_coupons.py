"""create coupons and coupon_redemptions, add discounts to orders

Revision ID: 0008
Revises: 0007
Create Date: 2024-02-20 17:44:12.418820
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "coupons",
        sa.Column("id", sa.Integer(), sa.Identity(), nullable=False),
        sa.Column("code", sa.String(length=32), nullable=False),
        sa.Column("description", sa.String(length=200), nullable=False),
        sa.Column("percent_off", sa.Integer(), nullable=True),
        sa.Column("amount_off_cents", sa.Integer(), nullable=True),
        sa.Column("min_subtotal_cents", sa.Integer(), server_default="0", nullable=False),
        sa.Column("max_redemptions", sa.Integer(), nullable=True),
        sa.Column("times_redeemed", sa.Integer(), server_default="0", nullable=False),
        sa.Column("valid_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("is_active", sa.Boolean(), server_default=sa.true(), nullable=False),
        sa.CheckConstraint("percent_off BETWEEN 1 AND 100", name="ck_coupons_percent_off_range"),
        sa.CheckConstraint("amount_off_cents > 0", name="ck_coupons_amount_off_positive"),
        sa.CheckConstraint(
            "(percent_off IS NULL) <> (amount_off_cents IS NULL)",
            name="ck_coupons_exactly_one_discount",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_coupons"),
        sa.UniqueConstraint("code", name="uq_coupons_code"),
    )

    op.add_column("orders", sa.Column("coupon_id", sa.Integer(), nullable=True))
    op.add_column(
        "orders",
        sa.Column("discount_cents", sa.Integer(), server_default="0", nullable=False),
    )
    op.create_foreign_key(
        "fk_orders_coupon_id_coupons",
        "orders",
        "coupons",
        ["coupon_id"],
        ["id"],
        ondelete="SET NULL",
    )
    op.create_check_constraint("ck_orders_discount_not_negative", "orders", "discount_cents >= 0")
    op.create_check_constraint(
        "ck_orders_total_consistent", "orders", "total_cents = subtotal_cents - discount_cents"
    )

    op.create_table(
        "coupon_redemptions",
        sa.Column("id", sa.Integer(), sa.Identity(), nullable=False),
        sa.Column("coupon_id", sa.Integer(), nullable=False),
        sa.Column("customer_id", sa.Integer(), nullable=False),
        sa.Column("order_id", sa.Integer(), nullable=False),
        sa.Column(
            "redeemed_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["coupon_id"],
            ["coupons.id"],
            name="fk_coupon_redemptions_coupon_id_coupons",
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["customer_id"],
            ["customers.id"],
            name="fk_coupon_redemptions_customer_id_customers",
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["order_id"],
            ["orders.id"],
            name="fk_coupon_redemptions_order_id_orders",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_coupon_redemptions"),
        sa.UniqueConstraint("coupon_id", "customer_id", name="uq_coupon_redemptions_coupon_id_customer_id"),
        sa.UniqueConstraint("order_id", name="uq_coupon_redemptions_order_id"),
    )


def downgrade() -> None:
    op.drop_table("coupon_redemptions")
    op.drop_constraint("ck_orders_total_consistent", "orders", type_="check")
    op.drop_constraint("ck_orders_discount_not_negative", "orders", type_="check")
    op.drop_constraint("fk_orders_coupon_id_coupons", "orders", type_="foreignkey")
    op.drop_column("orders", "discount_cents")
    op.drop_column("orders", "coupon_id")
    op.drop_table("coupons")
