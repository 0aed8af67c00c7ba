from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import delete, func, insert, select, text, update
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from shop import services
from shop.models import (
    AuditLog,
    Coupon,
    CouponRedemption,
    Customer,
    Order,
    OrderItem,
    OrderStatus,
    Payment,
)

from .support import PRICE, SKU, STOCK, count, stock


async def test_placing_an_order_prices_the_items_and_takes_them_from_stock(
    pg_session: AsyncSession, order: Order
) -> None:
    assert order.id == 1
    assert order.status is OrderStatus.PENDING
    assert order.subtotal_cents == PRICE["BK-PY-COOK"] + 2 * PRICE["AUD-SPK-MINI"] == 10448
    assert order.discount_cents == 0
    assert order.total_cents == 10448
    assert sorted((item.product_id, item.quantity) for item in order.items) == [
        (SKU["AUD-SPK-MINI"], 2),
        (SKU["BK-PY-COOK"], 1),
    ]
    assert await stock(pg_session, "BK-PY-COOK") == STOCK["BK-PY-COOK"] - 1
    assert await stock(pg_session, "AUD-SPK-MINI") == STOCK["AUD-SPK-MINI"] - 2


async def test_repeated_lines_of_one_product_are_merged(
    pg_sessionmaker: async_sessionmaker[AsyncSession], customer: Customer
) -> None:
    placed = await services.place_order(
        pg_sessionmaker, customer.id, [(SKU["ELEC-HUB-7"], 1), (SKU["ELEC-HUB-7"], 2)]
    )

    assert [(item.product_id, item.quantity) for item in placed.items] == [(SKU["ELEC-HUB-7"], 3)]
    assert placed.total_cents == 3 * PRICE["ELEC-HUB-7"]


async def test_a_shortage_of_one_item_rejects_the_whole_order(
    pg_session: AsyncSession, pg_sessionmaker: async_sessionmaker[AsyncSession], customer: Customer
) -> None:
    with pytest.raises(services.OutOfStockError, match="BK-PG-INT: 4 requested, 3 in stock"):
        await services.place_order(pg_sessionmaker, customer.id, {SKU["ELEC-HUB-7"]: 1, SKU["BK-PG-INT"]: 4})

    assert await stock(pg_session, "ELEC-HUB-7") == STOCK["ELEC-HUB-7"]
    assert await count(pg_session, Order) == 0
    assert await count(pg_session, AuditLog) == 0


async def test_a_sold_out_product_cannot_be_ordered(
    pg_sessionmaker: async_sessionmaker[AsyncSession], customer: Customer
) -> None:
    with pytest.raises(services.OutOfStockError) as raised:
        await services.place_order(pg_sessionmaker, customer.id, {SKU["KIT-KNIFE-20"]: 1})

    assert (raised.value.sku, raised.value.available) == ("KIT-KNIFE-20", 0)


@pytest.mark.parametrize(
    ("lines", "error"),
    [
        ({}, services.EmptyOrderError),
        ({999: 1}, services.NotFoundError),
        ({SKU["ELEC-HUB-7"]: 0}, services.ShopError),
    ],
    ids=["empty", "unknown-product", "zero-quantity"],
)
async def test_malformed_orders_are_refused(
    pg_session: AsyncSession,
    pg_sessionmaker: async_sessionmaker[AsyncSession],
    customer: Customer,
    lines: dict[int, int],
    error: type[Exception],
) -> None:
    with pytest.raises(error):
        await services.place_order(pg_sessionmaker, customer.id, lines)

    assert await count(pg_session, Order) == 0


async def test_a_percentage_coupon_is_applied_and_counted(
    pg_session: AsyncSession, pg_sessionmaker: async_sessionmaker[AsyncSession], customer: Customer
) -> None:
    placed = await services.place_order(
        pg_sessionmaker, customer.id, {SKU["BK-PY-COOK"]: 1}, coupon_code=" welcome10 "
    )

    # 10 % of 44.50 is 4.45.
    assert (placed.subtotal_cents, placed.discount_cents, placed.total_cents) == (4450, 445, 4005)
    welcome = await pg_session.scalar(select(Coupon).where(Coupon.code == "WELCOME10"))
    assert welcome is not None
    assert welcome.times_redeemed == 1
    redemption = await pg_session.scalar(select(CouponRedemption))
    assert redemption is not None
    assert (redemption.order_id, redemption.customer_id) == (placed.id, customer.id)


async def test_a_fixed_coupon_needs_the_minimum_subtotal(
    pg_sessionmaker: async_sessionmaker[AsyncSession], customer: Customer
) -> None:
    with pytest.raises(services.CouponError, match="needs a subtotal of 3000 cents"):
        await services.place_order(
            pg_sessionmaker, customer.id, {SKU["AUD-SPK-MINI"]: 1}, coupon_code="FIVEOFF"
        )

    placed = await services.place_order(
        pg_sessionmaker, customer.id, {SKU["AUD-SPK-MINI"]: 2}, coupon_code="FIVEOFF"
    )
    assert (placed.subtotal_cents, placed.total_cents) == (5998, 5498)


async def test_an_expired_coupon_is_refused(
    pg_session: AsyncSession, pg_sessionmaker: async_sessionmaker[AsyncSession], customer: Customer
) -> None:
    with pytest.raises(services.CouponError, match="SUMMER20 expired on 2020-09-01"):
        await services.place_order(
            pg_sessionmaker, customer.id, {SKU["OUT-TENT-2P"]: 1}, coupon_code="SUMMER20"
        )

    # The refused order did not take the tent out of stock.
    assert await stock(pg_session, "OUT-TENT-2P") == STOCK["OUT-TENT-2P"]


async def test_a_coupon_can_be_used_once_per_customer(
    pg_sessionmaker: async_sessionmaker[AsyncSession], customer: Customer, other_customer: Customer
) -> None:
    lines = {SKU["ELEC-HUB-7"]: 1}
    await services.place_order(pg_sessionmaker, customer.id, lines, coupon_code="WELCOME10")

    with pytest.raises(services.CouponError, match="already used"):
        await services.place_order(pg_sessionmaker, customer.id, lines, coupon_code="WELCOME10")
    await services.place_order(pg_sessionmaker, other_customer.id, lines, coupon_code="WELCOME10")


async def test_a_used_up_coupon_is_refused(
    pg_session: AsyncSession, pg_sessionmaker: async_sessionmaker[AsyncSession], customer: Customer
) -> None:
    await pg_session.execute(
        update(Coupon).where(Coupon.code == "FIVEOFF").values(times_redeemed=Coupon.max_redemptions)
    )
    await pg_session.commit()

    with pytest.raises(services.CouponError, match="used up"):
        await services.place_order(
            pg_sessionmaker, customer.id, {SKU["OUT-TENT-2P"]: 1}, coupon_code="FIVEOFF"
        )


async def test_cancelling_restocks_the_items_and_gives_the_coupon_back(
    pg_session: AsyncSession, pg_sessionmaker: async_sessionmaker[AsyncSession], customer: Customer
) -> None:
    placed = await services.place_order(
        pg_sessionmaker, customer.id, {SKU["AUD-HP-200"]: 2}, coupon_code="WELCOME10"
    )
    assert await stock(pg_session, "AUD-HP-200") == STOCK["AUD-HP-200"] - 2

    cancelled = await services.cancel_order(pg_session, placed.id)

    assert cancelled.status is OrderStatus.CANCELLED
    assert await stock(pg_session, "AUD-HP-200") == STOCK["AUD-HP-200"]
    assert await count(pg_session, CouponRedemption) == 0
    times = await pg_session.scalar(select(Coupon.times_redeemed).where(Coupon.code == "WELCOME10"))
    assert times == 0


async def test_a_shipped_order_cannot_be_cancelled(pg_session: AsyncSession, order: Order) -> None:
    await services.pay_order(pg_session, order.id, method="card", provider_ref="ch_1")
    await services.ship_order(pg_session, order.id)

    with pytest.raises(services.InvalidTransitionError, match="from shipped to cancelled"):
        await services.cancel_order(pg_session, order.id)


async def test_the_trigger_audits_the_creation_and_every_status_change(
    pg_session: AsyncSession, order: Order
) -> None:
    await services.pay_order(pg_session, order.id, method="paypal", provider_ref="PAY-1")
    await services.ship_order(pg_session, order.id)
    await services.deliver_order(pg_session, order.id)

    entries = await pg_session.execute(
        select(AuditLog.id, AuditLog.table_name, AuditLog.row_id, AuditLog.action, AuditLog.details).order_by(
            AuditLog.id
        )
    )
    assert [tuple(entry) for entry in entries] == [
        (1, "orders", order.id, "order_created", {"status": "pending", "total_cents": 10448}),
        (2, "orders", order.id, "status_changed", {"from": "pending", "to": "paid"}),
        (3, "orders", order.id, "status_changed", {"from": "paid", "to": "shipped"}),
        (4, "orders", order.id, "status_changed", {"from": "shipped", "to": "delivered"}),
    ]
    db_user = await pg_session.scalar(select(AuditLog.db_user).where(AuditLog.id == 1))
    assert db_user == await pg_session.scalar(text("SELECT current_user"))


async def test_updates_that_keep_the_status_are_not_audited(pg_session: AsyncSession, order: Order) -> None:
    await pg_session.execute(update(Order).where(Order.id == order.id).values(status=OrderStatus.PENDING))
    await pg_session.execute(update(Order).where(Order.id == order.id).values(shipping_address_id=None))
    await pg_session.commit()

    assert await count(pg_session, AuditLog) == 1


async def test_the_status_column_only_accepts_enum_labels(pg_session: AsyncSession, order: Order) -> None:
    with pytest.raises(DBAPIError) as raised:
        await pg_session.execute(text("UPDATE orders SET status = 'lost' WHERE id = :id"), {"id": order.id})

    assert raised.value.orig is not None
    assert getattr(raised.value.orig, "sqlstate", None) == "22P02"  # invalid_text_representation


async def test_the_order_status_enum_matches_the_python_enum(pg_session: AsyncSession) -> None:
    labels = await pg_session.scalar(text("SELECT enum_range(NULL::order_status)::text[]"))

    assert labels == [status.value for status in OrderStatus]


async def test_deleting_an_order_cascades_to_items_payments_and_redemptions(
    pg_session: AsyncSession, pg_sessionmaker: async_sessionmaker[AsyncSession], customer: Customer
) -> None:
    placed = await services.place_order(
        pg_sessionmaker, customer.id, {SKU["BK-PG-INT"]: 1}, coupon_code="WELCOME10"
    )
    await services.pay_order(pg_session, placed.id, method="card", provider_ref="ch_cascade")

    await pg_session.execute(delete(Order).where(Order.id == placed.id))
    await pg_session.commit()

    for model in (OrderItem, Payment, CouponRedemption):
        assert await count(pg_session, model) == 0, model.__name__
    # The audit trail outlives the order.
    assert await count(pg_session, AuditLog) == 2


async def test_a_line_must_have_a_positive_quantity(pg_session: AsyncSession, order: Order) -> None:
    with pytest.raises(IntegrityError, match="ck_order_items_quantity_positive"):
        await pg_session.execute(
            insert(OrderItem).values(
                order_id=order.id, product_id=SKU["OUT-TENT-2P"], quantity=0, unit_price_cents=1
            )
        )


async def test_the_total_must_equal_subtotal_minus_discount(pg_session: AsyncSession, order: Order) -> None:
    with pytest.raises(IntegrityError, match="ck_orders_total_consistent"):
        await pg_session.execute(update(Order).where(Order.id == order.id).values(discount_cents=100))


async def test_stale_pending_orders_are_cancelled_and_restocked(
    pg_session: AsyncSession, pg_sessionmaker: async_sessionmaker[AsyncSession], customer: Customer
) -> None:
    old = await services.place_order(pg_sessionmaker, customer.id, {SKU["OUT-TENT-2P"]: 2})
    old_but_paid = await services.place_order(pg_sessionmaker, customer.id, {SKU["OUT-TENT-2P"]: 1})
    fresh = await services.place_order(pg_sessionmaker, customer.id, {SKU["OUT-TENT-2P"]: 1})
    await services.pay_order(pg_session, old_but_paid.id, method="card", provider_ref="ch_paid")
    await pg_session.execute(
        update(Order)
        .where(Order.id.in_([old.id, old_but_paid.id]))
        .values(created_at=func.now() - timedelta(days=3))
    )
    await pg_session.commit()

    cancelled = await services.cancel_stale_orders(pg_sessionmaker, older_than=timedelta(days=1))

    assert cancelled == [old.id]
    statuses = {row.id: row.status for row in await pg_session.execute(select(Order.id, Order.status))}
    assert statuses == {
        old.id: OrderStatus.CANCELLED,
        old_but_paid.id: OrderStatus.PAID,
        fresh.id: OrderStatus.PENDING,
    }
    assert await stock(pg_session, "OUT-TENT-2P") == STOCK["OUT-TENT-2P"] - 2


async def test_the_order_history_lists_newest_first(
    pg_session: AsyncSession, pg_sessionmaker: async_sessionmaker[AsyncSession], customer: Customer
) -> None:
    first = await services.place_order(pg_sessionmaker, customer.id, {SKU["BK-PY-COOK"]: 1})
    second = await services.place_order(pg_sessionmaker, customer.id, {SKU["BK-PG-INT"]: 1})

    history = await services.order_history(pg_session, customer.id)

    assert [placed.id for placed in history] == [second.id, first.id] == [2, 1]
    assert [item.product_id for item in history[0].items] == [SKU["BK-PG-INT"]]
