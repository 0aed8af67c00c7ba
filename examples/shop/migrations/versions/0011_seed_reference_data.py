"""seed reference data: categories, launch products with stock, coupons

A data migration: every database built from the migrations starts with these rows, so the
application (and every test) may rely on them. It uses its own table stubs rather than the
ORM models, which describe the schema at head, not at this revision.

Revision ID: 0011
Revises: 0010
Create Date: 2024-03-18 09:00:13.552190
"""

from collections.abc import Sequence
from datetime import datetime, timezone

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

categories = sa.table(
    "categories",
    sa.column("id", sa.Integer()),
    sa.column("slug", sa.String()),
    sa.column("name", sa.String()),
    sa.column("parent_id", sa.Integer()),
)
products = sa.table(
    "products",
    sa.column("id", sa.Integer()),
    sa.column("sku", sa.String()),
    sa.column("name", sa.String()),
    sa.column("description", sa.Text()),
    sa.column("category_id", sa.Integer()),
    sa.column("price_cents", sa.Integer()),
)
inventory = sa.table(
    "inventory",
    sa.column("product_id", sa.Integer()),
    sa.column("quantity", sa.Integer()),
    sa.column("reorder_level", sa.Integer()),
)
coupons = sa.table(
    "coupons",
    sa.column("code", sa.String()),
    sa.column("description", sa.String()),
    sa.column("percent_off", sa.Integer()),
    sa.column("amount_off_cents", sa.Integer()),
    sa.column("min_subtotal_cents", sa.Integer()),
    sa.column("max_redemptions", sa.Integer()),
    sa.column("valid_until", sa.DateTime(timezone=True)),
)

# (slug, name, parent slug); parents first.
CATEGORIES = [
    ("electronics", "Electronics", None),
    ("audio", "Audio", "electronics"),
    ("books", "Books", None),
    ("home-kitchen", "Home & Kitchen", None),
    ("outdoor", "Outdoor", None),
]

# (sku, name, description, category slug, price in cents, stock, reorder level)
PRODUCTS = [
    ("ELEC-HUB-7", "USB-C hub, 7 ports", "HDMI, SD, 3x USB-A, PD 100 W.", "electronics", 3999, 25, 5),
    ("AUD-HP-200", "Over-ear headphones HP-200", "Closed back, 40 mm drivers.", "audio", 8900, 10, 3),
    ("AUD-SPK-MINI", "Mini Bluetooth speaker", "Splash proof, 12 h battery.", "audio", 2999, 40, 10),
    ("BK-PY-COOK", "Python Cookbook", "Recipes for mastering Python 3.", "books", 4450, 12, 4),
    ("BK-PG-INT", "PostgreSQL Internals", "How the storage and planner work.", "books", 5200, 3, 2),
    ("KIT-PRESS-1L", "French press, 1 l", "Borosilicate glass, steel frame.", "home-kitchen", 2750, 18, 5),
    ("KIT-KNIFE-20", "Chef's knife, 20 cm", "Forged, full tang.", "home-kitchen", 6400, 0, 2),
    ("OUT-TENT-2P", "Two-person tent", "Freestanding, 1.9 kg.", "outdoor", 18900, 5, 2),
]

# (code, description, percent off, amount off, min subtotal, max redemptions, valid until)
COUPONS = [
    ("WELCOME10", "10 % off your first order", 10, None, 0, None, None),
    ("FIVEOFF", "5.00 off orders of 30.00 or more", None, 500, 3000, 100, None),
    ("SUMMER20", "Summer sale 2020", 20, None, 0, None, datetime(2020, 9, 1, tzinfo=timezone.utc)),
]


def _category_id(slug: str) -> sa.ScalarSelect[int]:
    return sa.select(categories.c.id).where(categories.c.slug == slug).scalar_subquery()


def _product_id(sku: str) -> sa.ScalarSelect[int]:
    return sa.select(products.c.id).where(products.c.sku == sku).scalar_subquery()


def upgrade() -> None:
    for slug, name, parent in CATEGORIES:
        op.execute(
            categories.insert().values(
                slug=slug,
                name=name,
                parent_id=_category_id(parent) if parent is not None else None,
            )
        )
    op.execute(
        products.insert().values(
            [
                {
                    "sku": sku,
                    "name": name,
                    "description": description,
                    "category_id": _category_id(category),
                    "price_cents": price,
                }
                for sku, name, description, category, price, _, _ in PRODUCTS
            ]
        )
    )
    op.execute(
        inventory.insert().values(
            [
                {"product_id": _product_id(sku), "quantity": stock, "reorder_level": reorder}
                for sku, _, _, _, _, stock, reorder in PRODUCTS
            ]
        )
    )
    op.bulk_insert(
        coupons,
        [
            {
                "code": code,
                "description": description,
                "percent_off": percent,
                "amount_off_cents": amount,
                "min_subtotal_cents": min_subtotal,
                "max_redemptions": max_redemptions,
                "valid_until": valid_until,
            }
            for code, description, percent, amount, min_subtotal, max_redemptions, valid_until in COUPONS
        ],
    )


def downgrade() -> None:
    # Fails (RESTRICT) if orders reference the launch products: delete those orders first.
    op.execute(coupons.delete().where(coupons.c.code.in_([row[0] for row in COUPONS])))
    skus = [row[0] for row in PRODUCTS]
    op.execute(products.delete().where(products.c.sku.in_(skus)))  # cascades to inventory
    for slug, _, _ in reversed(CATEGORIES):
        op.execute(categories.delete().where(categories.c.slug == slug))
