"""The same database through the synchronous twins (psycopg 3, ``Session``)."""

from __future__ import annotations

import pytest
from sqlalchemy import URL, Engine, delete, func, insert, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from shop.models import AuditLog, Category, Coupon, Customer, Order, OrderStatus, Product

from .support import EMPTY_TABLES, EXPECTED_REFERENCE, PRICE, reference_rows_sync


def assert_clean_start_sync(session: Session) -> None:
    assert reference_rows_sync(session) == EXPECTED_REFERENCE
    for table in EMPTY_TABLES:
        rows = session.scalar(select(func.count()).select_from(text(table)))
        assert rows == 0, f"{table} has {rows} rows left over from another test"


@pytest.mark.parametrize("name", ["Barbara Liskov", "Edsger Dijkstra"])
def test_a_sync_test_also_starts_clean_and_numbers_customers_from_one(
    pg_sync_session: Session, name: str
) -> None:
    assert_clean_start_sync(pg_sync_session)

    pg_sync_session.add(Customer(email=f"{name.split()[0].lower()}@example.com", full_name=name))
    pg_sync_session.commit()

    rows = pg_sync_session.execute(select(Customer.id, Customer.full_name)).all()
    assert [tuple(row) for row in rows] == [(1, name)]


def test_the_sync_session_sees_server_defaults(pg_sync_session: Session) -> None:
    customer = Customer(email="barbara@example.com", full_name="Barbara Liskov")
    pg_sync_session.add(customer)
    pg_sync_session.commit()

    assert customer.is_active is True
    assert customer.created_at is not None


def test_the_audit_trigger_fires_for_sync_writes_too(pg_sync_session: Session) -> None:
    assert_clean_start_sync(pg_sync_session)
    customer = Customer(email="edsger@example.com", full_name="Edsger Dijkstra")
    pg_sync_session.add(customer)
    pg_sync_session.flush()
    order = Order(
        customer_id=customer.id, subtotal_cents=PRICE["OUT-TENT-2P"], total_cents=PRICE["OUT-TENT-2P"]
    )
    pg_sync_session.add(order)
    pg_sync_session.flush()
    order.status = OrderStatus.CANCELLED
    pg_sync_session.commit()

    actions = pg_sync_session.execute(
        select(AuditLog.id, AuditLog.action, AuditLog.details).order_by(AuditLog.id)
    ).all()
    assert [tuple(action) for action in actions] == [
        (1, "order_created", {"status": "pending", "total_cents": 18900}),
        (2, "status_changed", {"from": "pending", "to": "cancelled"}),
    ]


def test_a_duplicate_coupon_code_violates_the_unique_constraint(pg_sync_session: Session) -> None:
    pg_sync_session.add(Coupon(code="WELCOME10", description="again", percent_off=50))

    with pytest.raises(IntegrityError, match="uq_coupons_code"):
        pg_sync_session.commit()


def test_a_coupon_must_have_exactly_one_kind_of_discount(pg_sync_session: Session) -> None:
    with pytest.raises(IntegrityError, match="ck_coupons_exactly_one_discount"):
        pg_sync_session.execute(
            insert(Coupon).values(code="BOTH", description="both kinds", percent_off=5, amount_off_cents=500)
        )


def test_vandalising_the_reference_data_through_the_sync_engine(pg_sync_engine: Engine) -> None:
    with pg_sync_engine.begin() as connection:
        connection.execute(update(Product).values(price_cents=1, name="clearance"))
        connection.execute(delete(Coupon).where(Coupon.code == "WELCOME10"))
        connection.execute(update(Category).values(parent_id=None))

    with pg_sync_engine.connect() as connection:
        prices = connection.scalars(select(Product.price_cents).distinct()).all()
        coupons = connection.scalar(select(func.count()).select_from(Coupon))
    assert (prices, coupons) == ([1], 2)


def test_after_sync_vandalism_the_reference_data_is_back(pg_sync_session: Session) -> None:
    assert_clean_start_sync(pg_sync_session)


def test_sync_and_async_urls_name_the_same_database(
    pg_url: URL, pg_sync_url: URL, pg_sync_engine: Engine
) -> None:
    with pg_sync_engine.connect() as connection:
        current = connection.scalar(text("SELECT current_database()"))

    assert pg_sync_url.database == pg_url.database == current
    assert pg_sync_url.drivername == "postgresql+psycopg"


# Two sessions on two connections must see each other's commits: that needs real commits,
# so this test keeps the truncate reset even when the run uses --pgt-reset rollback.
@pytest.mark.pgtemplate(reset="truncate")
async def test_a_sync_commit_is_visible_to_the_async_session(
    pg_sync_session: Session, pg_session: AsyncSession
) -> None:
    pg_sync_session.add(Customer(email="both@example.com", full_name="Both Worlds"))
    pg_sync_session.commit()

    emails = (await pg_session.scalars(select(Customer.email))).all()
    assert emails == ["both@example.com"]
