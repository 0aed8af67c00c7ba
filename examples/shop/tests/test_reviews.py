from __future__ import annotations

from decimal import Decimal

import pytest
from sqlalchemy import delete
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from shop import services
from shop.models import Customer, Order, Product, Review

from .support import SKU, count


async def test_a_review_after_delivery_is_a_verified_purchase(
    pg_session: AsyncSession, customer: Customer, order: Order
) -> None:
    await services.pay_order(pg_session, order.id, method="card", provider_ref="ch_rev")
    await services.ship_order(pg_session, order.id)
    await services.deliver_order(pg_session, order.id)

    review = await services.add_review(
        pg_session,
        customer_id=customer.id,
        product_id=SKU["BK-PY-COOK"],
        rating=5,
        title="Every recipe works",
    )

    assert review.id == 1
    assert review.is_verified_purchase is True
    assert review.body == ""


async def test_a_review_before_delivery_is_not_verified(
    pg_session: AsyncSession, customer: Customer, order: Order
) -> None:
    review = await services.add_review(
        pg_session, customer_id=customer.id, product_id=SKU["BK-PY-COOK"], rating=4, title="Soon"
    )

    assert review.is_verified_purchase is False


async def test_a_customer_reviews_a_product_only_once(pg_session: AsyncSession, customer: Customer) -> None:
    await services.add_review(
        pg_session, customer_id=customer.id, product_id=SKU["OUT-TENT-2P"], rating=2, title="Leaks"
    )

    with pytest.raises(IntegrityError, match="uq_reviews_product_id_customer_id"):
        await services.add_review(
            pg_session, customer_id=customer.id, product_id=SKU["OUT-TENT-2P"], rating=5, title="Dry"
        )


@pytest.mark.parametrize("rating", [0, 6, -1])
async def test_a_rating_outside_one_to_five_violates_the_check_constraint(
    pg_session: AsyncSession, customer: Customer, rating: int
) -> None:
    with pytest.raises(IntegrityError, match="ck_reviews_rating_range"):
        await services.add_review(
            pg_session, customer_id=customer.id, product_id=SKU["ELEC-HUB-7"], rating=rating, title="?"
        )


async def test_the_product_rating_averages_all_reviews(
    pg_session: AsyncSession, customer: Customer, other_customer: Customer
) -> None:
    third = await services.create_customer(pg_session, email="alan@example.com", full_name="Alan")
    for reviewer, rating in ((customer, 5), (other_customer, 4), (third, 4)):
        await services.add_review(
            pg_session,
            customer_id=reviewer.id,
            product_id=SKU["AUD-HP-200"],
            rating=rating,
            title=f"{rating} stars",
        )

    summary = await services.product_rating(pg_session, SKU["AUD-HP-200"])

    assert summary == services.RatingSummary(average=Decimal("4.33"), count=3)
    assert third.id == 3


async def test_an_unreviewed_product_has_no_average(pg_session: AsyncSession) -> None:
    summary = await services.product_rating(pg_session, SKU["KIT-PRESS-1L"])

    assert summary == services.RatingSummary(average=None, count=0)


async def test_deleting_a_product_deletes_its_reviews(pg_session: AsyncSession, customer: Customer) -> None:
    await services.add_review(
        pg_session, customer_id=customer.id, product_id=SKU["KIT-KNIFE-20"], rating=5, title="Sharp"
    )

    await pg_session.execute(delete(Product).where(Product.sku == "KIT-KNIFE-20"))
    await pg_session.commit()

    assert await count(pg_session, Review) == 0


async def test_top_sellers_count_units_of_paid_orders_only(
    pg_session: AsyncSession,
    pg_sessionmaker: async_sessionmaker[AsyncSession],
    customer: Customer,
    other_customer: Customer,
) -> None:
    paid_orders = [
        await services.place_order(
            pg_sessionmaker, customer.id, {SKU["AUD-SPK-MINI"]: 3, SKU["BK-PY-COOK"]: 1}
        ),
        await services.place_order(
            pg_sessionmaker, other_customer.id, {SKU["AUD-SPK-MINI"]: 1, SKU["BK-PG-INT"]: 2}
        ),
    ]
    for number, paid in enumerate(paid_orders):
        await services.pay_order(pg_session, paid.id, method="card", provider_ref=f"ch_top_{number}")
    # Pending and cancelled orders do not count, however large.
    await services.place_order(pg_sessionmaker, customer.id, {SKU["ELEC-HUB-7"]: 20})
    cancelled = await services.place_order(pg_sessionmaker, customer.id, {SKU["OUT-TENT-2P"]: 5})
    await services.cancel_order(pg_session, cancelled.id)

    top = await services.top_sellers(pg_session, limit=2)

    assert top == [
        services.TopSeller("AUD-SPK-MINI", "Mini Bluetooth speaker", 4, 4 * 2999),
        services.TopSeller("BK-PG-INT", "PostgreSQL Internals", 2, 2 * 5200),
    ]
