"""What the migrations put in every database, and small query helpers for the tests.

The expected rows are written out by hand on purpose: they are what a reader of
``0011_seed_reference_data.py`` expects, not a copy taken from the database.
"""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from shop.models import Base, Category, Coupon, Inventory, Product

# (id, slug, name, parent_id)
CATEGORIES = [
    (1, "electronics", "Electronics", None),
    (2, "audio", "Audio", 1),
    (3, "books", "Books", None),
    (4, "home-kitchen", "Home & Kitchen", None),
    (5, "outdoor", "Outdoor", None),
]

# (id, sku, name, category_id, price_cents, is_active)
PRODUCTS = [
    (1, "ELEC-HUB-7", "USB-C hub, 7 ports", 1, 3999, True),
    (2, "AUD-HP-200", "Over-ear headphones HP-200", 2, 8900, True),
    (3, "AUD-SPK-MINI", "Mini Bluetooth speaker", 2, 2999, True),
    (4, "BK-PY-COOK", "Python Cookbook", 3, 4450, True),
    (5, "BK-PG-INT", "PostgreSQL Internals", 3, 5200, True),
    (6, "KIT-PRESS-1L", "French press, 1 l", 4, 2750, True),
    (7, "KIT-KNIFE-20", "Chef's knife, 20 cm", 4, 6400, True),
    (8, "OUT-TENT-2P", "Two-person tent", 5, 18900, True),
]

# (product_id, quantity, reorder_level)
INVENTORY = [
    (1, 25, 5),
    (2, 10, 3),
    (3, 40, 10),
    (4, 12, 4),
    (5, 3, 2),
    (6, 18, 5),
    (7, 0, 2),
    (8, 5, 2),
]

# (id, code, percent_off, amount_off_cents, min_subtotal_cents, max_redemptions,
#  times_redeemed, valid_until, is_active)
COUPONS = [
    (1, "WELCOME10", 10, None, 0, None, 0, None, True),
    (2, "FIVEOFF", None, 500, 3000, 100, 0, None, True),
    (3, "SUMMER20", 20, None, 0, None, 0, datetime(2020, 9, 1, tzinfo=timezone.utc), True),
]

SKU = {sku: product_id for product_id, sku, *_ in PRODUCTS}
PRICE = {sku: price for _, sku, _, _, price, _ in PRODUCTS}
STOCK = {sku: INVENTORY[product_id - 1][1] for sku, product_id in SKU.items()}

# Tables that the migrations leave empty.
EMPTY_TABLES = [
    "customers",
    "addresses",
    "orders",
    "order_items",
    "payments",
    "coupon_redemptions",
    "reviews",
    "audit_log",
]

REFERENCE_QUERIES = {
    "categories": select(Category.id, Category.slug, Category.name, Category.parent_id).order_by(Category.id),
    "products": select(
        Product.id,
        Product.sku,
        Product.name,
        Product.category_id,
        Product.price_cents,
        Product.is_active,
    ).order_by(Product.id),
    "inventory": select(Inventory.product_id, Inventory.quantity, Inventory.reorder_level).order_by(
        Inventory.product_id
    ),
    "coupons": select(
        Coupon.id,
        Coupon.code,
        Coupon.percent_off,
        Coupon.amount_off_cents,
        Coupon.min_subtotal_cents,
        Coupon.max_redemptions,
        Coupon.times_redeemed,
        Coupon.valid_until,
        Coupon.is_active,
    ).order_by(Coupon.id),
}

EXPECTED_REFERENCE = {
    "categories": CATEGORIES,
    "products": PRODUCTS,
    "inventory": INVENTORY,
    "coupons": COUPONS,
}


async def reference_rows(session: AsyncSession) -> dict[str, list[tuple[object, ...]]]:
    return {
        name: [tuple(row) for row in await session.execute(query)]
        for name, query in REFERENCE_QUERIES.items()
    }


def reference_rows_sync(session: Session) -> dict[str, list[tuple[object, ...]]]:
    return {name: [tuple(row) for row in session.execute(query)] for name, query in REFERENCE_QUERIES.items()}


async def count(session: AsyncSession, model: type[Base]) -> int:
    return (await session.scalar(select(func.count()).select_from(model))) or 0


async def stock(session: AsyncSession, sku: str) -> int:
    quantity = await session.scalar(select(Inventory.quantity).join(Product).where(Product.sku == sku))
    assert quantity is not None, sku
    return quantity


async def assert_clean_start(session: AsyncSession) -> None:
    """The state every test must begin with, whatever ran before it on this worker."""
    assert await reference_rows(session) == EXPECTED_REFERENCE
    for table in EMPTY_TABLES:
        model = Base.metadata.tables[table]
        rows = await session.scalar(select(func.count()).select_from(model))
        assert rows == 0, f"{table} has {rows} rows left over from another test"
