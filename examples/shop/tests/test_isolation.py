"""Checks that fail if the reset between tests is broken.

Every test here first asserts the state the migrations leave (reference rows exactly as
seeded, everything else empty, identities where the template left them), then writes,
commits and sometimes vandalises. Whichever of these tests run before another on the same
xdist worker, in whatever order, the next one must find the clean state again.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import URL, delete, func, insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from shop import services
from shop.models import AuditLog, Category, Coupon, Customer, Inventory, Order, Product

from .support import EXPECTED_REFERENCE, SKU, assert_clean_start, reference_rows

ALEMBIC_INI = Path(__file__).parents[1] / "alembic.ini"


@pytest.fixture(autouse=True)
async def _starts_clean(pg_session: AsyncSession) -> None:
    """Runs before any other fixture of these tests can write."""
    await assert_clean_start(pg_session)


@pytest.mark.parametrize("channel", ["session", "sessionmaker", "engine"])
async def test_every_test_starts_without_customers_and_numbers_them_from_one(
    pg_session: AsyncSession,
    pg_sessionmaker: async_sessionmaker[AsyncSession],
    pg_engine: AsyncEngine,
    channel: str,
) -> None:
    # The same committed write through each way a test can reach the database.
    email = f"{channel}@example.com"
    if channel == "session":
        await services.create_customer(pg_session, email=email, full_name=channel)
    elif channel == "sessionmaker":
        async with pg_sessionmaker() as other_session:
            await services.create_customer(other_session, email=email, full_name=channel)
    else:
        async with pg_engine.begin() as connection:
            await connection.execute(insert(Customer).values(email=email, full_name=channel))

    rows = (await pg_session.execute(select(Customer.id, Customer.email))).all()
    assert [tuple(row) for row in rows] == [(1, email)]


@pytest.mark.parametrize("round_", [1, 2])
async def test_every_test_starts_with_empty_order_tables_and_fresh_sequences(
    pg_session: AsyncSession, customer: Customer, order: Order, round_: int
) -> None:
    payment = await services.pay_order(pg_session, order.id, method="card", provider_ref=f"ch_round_{round_}")

    # Identity (orders), SERIAL (payments) and BIGSERIAL filled by a trigger (audit_log).
    assert (customer.id, order.id, payment.id) == (1, 1, 1)
    audit_ids = (await pg_session.scalars(select(AuditLog.id).order_by(AuditLog.id))).all()
    assert audit_ids == [1, 2]


async def test_wiping_out_the_reference_data(pg_session: AsyncSession) -> None:
    await pg_session.execute(delete(Coupon))
    await pg_session.execute(delete(Product))  # cascades to inventory
    await pg_session.execute(delete(Category))
    await pg_session.commit()

    assert await reference_rows(pg_session) == {name: [] for name in EXPECTED_REFERENCE}


async def test_rewriting_the_reference_data(
    pg_session: AsyncSession, pg_sessionmaker: async_sessionmaker[AsyncSession], customer: Customer
) -> None:
    await services.place_order(pg_sessionmaker, customer.id, {SKU["BK-PG-INT"]: 3}, coupon_code="WELCOME10")
    await pg_session.execute(update(Product).values(price_cents=Product.price_cents * 2))
    await pg_session.execute(update(Category).values(name=func.upper(Category.name)))
    await pg_session.execute(update(Coupon).values(is_active=False))
    await pg_session.execute(update(Inventory).values(reorder_level=0))
    await pg_session.execute(text("UPDATE alembic_version SET version_num = '0001'"))
    await pg_session.commit()

    assert await reference_rows(pg_session) != EXPECTED_REFERENCE


async def test_truncating_the_reference_tables(pg_session: AsyncSession) -> None:
    await pg_session.execute(text("TRUNCATE categories, products, inventory, coupons CASCADE"))
    await pg_session.commit()

    assert await pg_session.scalar(select(func.count()).select_from(Category)) == 0


@pytest.mark.parametrize("round_", [1, 2])
async def test_the_reference_data_is_exactly_as_migrated(pg_session: AsyncSession, round_: int) -> None:
    # Says it again after the autouse check, in so many words: whichever of the tests above
    # ran before this one, their damage is gone.
    assert await reference_rows(pg_session) == EXPECTED_REFERENCE


async def test_new_rows_continue_after_the_seeded_identities(pg_session: AsyncSession) -> None:
    garden = Category(slug="garden", name="Garden")
    pg_session.add(garden)
    await pg_session.flush()
    pg_session.add(Product(sku="GDN-HOSE-25", name="Hose, 25 m", category_id=garden.id, price_cents=2999))
    pg_session.add(Coupon(code="SPRING15", description="Spring", percent_off=15))
    await pg_session.commit()

    ids = await pg_session.execute(
        select(
            select(Category.id).where(Category.slug == "garden").scalar_subquery(),
            select(Product.id).where(Product.sku == "GDN-HOSE-25").scalar_subquery(),
            select(Coupon.id).where(Coupon.code == "SPRING15").scalar_subquery(),
        )
    )
    assert tuple(ids.one()) == (6, 9, 4)


async def test_the_database_is_migrated_to_the_head_revision(pg_session: AsyncSession) -> None:
    head = ScriptDirectory.from_config(Config(str(ALEMBIC_INI))).get_current_head()

    versions = (await pg_session.scalars(text("SELECT version_num FROM alembic_version"))).all()

    assert head is not None
    assert versions == [head]


async def test_the_worker_database_is_not_the_one_in_alembic_ini(pg_url: URL, pg_engine: AsyncEngine) -> None:
    async with pg_engine.connect() as connection:
        current = await connection.scalar(text("SELECT current_database()"))

    assert current == pg_url.database
    assert pg_url.database != "shop"
    assert pg_url.drivername == "postgresql+asyncpg"
