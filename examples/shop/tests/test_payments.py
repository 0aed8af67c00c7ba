from __future__ import annotations

import pytest
from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from shop import services
from shop.models import Customer, Order, OrderStatus, Payment

from .support import SKU, STOCK, stock


async def test_paying_captures_the_full_total_and_marks_the_order_paid(
    pg_session: AsyncSession, order: Order
) -> None:
    payment = await services.pay_order(
        pg_session, order.id, method="card", provider_ref="ch_3PXx", amount_cents=10448
    )

    assert payment.id == 1
    assert (payment.order_id, payment.amount_cents, payment.status) == (order.id, 10448, "captured")
    status = await pg_session.scalar(select(Order.status).where(Order.id == order.id))
    assert status is OrderStatus.PAID


async def test_an_order_cannot_be_paid_twice(pg_session: AsyncSession, order: Order) -> None:
    await services.pay_order(pg_session, order.id, method="card", provider_ref="ch_first")

    with pytest.raises(services.InvalidTransitionError, match="from paid to paid"):
        await services.pay_order(pg_session, order.id, method="card", provider_ref="ch_second")
    await pg_session.rollback()

    refs = await pg_session.scalars(select(Payment.provider_ref))
    assert refs.all() == ["ch_first"]


async def test_a_partial_payment_is_refused(pg_session: AsyncSession, order: Order) -> None:
    with pytest.raises(services.PaymentError, match="totals 10448 cents, 10000 were paid"):
        await services.pay_order(
            pg_session, order.id, method="card", provider_ref="ch_short", amount_cents=10000
        )


async def test_an_unknown_payment_method_is_refused_by_service_and_database(
    pg_session: AsyncSession, order: Order
) -> None:
    with pytest.raises(services.PaymentError, match="unknown payment method 'cash'"):
        await services.pay_order(pg_session, order.id, method="cash", provider_ref="till-1")

    with pytest.raises(IntegrityError, match="ck_payments_method_known"):
        await pg_session.execute(
            insert(Payment).values(order_id=order.id, amount_cents=100, method="cash", provider_ref="till-1")
        )


async def test_a_provider_reference_is_unique(
    pg_session: AsyncSession,
    pg_sessionmaker: async_sessionmaker[AsyncSession],
    customer: Customer,
    order: Order,
) -> None:
    second = await services.place_order(pg_sessionmaker, customer.id, {SKU["ELEC-HUB-7"]: 1})
    await services.pay_order(pg_session, order.id, method="card", provider_ref="ch_same")

    with pytest.raises(IntegrityError, match="uq_payments_provider_ref"):
        await services.pay_order(pg_session, second.id, method="card", provider_ref="ch_same")


async def test_refunding_a_paid_order_restocks_and_refunds_the_payment(
    pg_session: AsyncSession, order: Order
) -> None:
    await services.pay_order(pg_session, order.id, method="gift_card", provider_ref="gc_77")

    refunded = await services.refund_order(pg_session, order.id)

    assert refunded.status is OrderStatus.REFUNDED
    assert [payment.status for payment in refunded.payments] == ["refunded"]
    assert await stock(pg_session, "BK-PY-COOK") == STOCK["BK-PY-COOK"]
    assert await stock(pg_session, "AUD-SPK-MINI") == STOCK["AUD-SPK-MINI"]


async def test_refunding_a_delivered_order_does_not_restock(pg_session: AsyncSession, order: Order) -> None:
    await services.pay_order(pg_session, order.id, method="card", provider_ref="ch_deliv")
    await services.ship_order(pg_session, order.id)
    await services.deliver_order(pg_session, order.id)

    await services.refund_order(pg_session, order.id)

    assert await stock(pg_session, "BK-PY-COOK") == STOCK["BK-PY-COOK"] - 1


async def test_a_pending_order_cannot_be_shipped(pg_session: AsyncSession, order: Order) -> None:
    with pytest.raises(services.InvalidTransitionError, match="from pending to shipped"):
        await services.ship_order(pg_session, order.id)


async def test_lifetime_value_counts_paid_orders_only(
    pg_session: AsyncSession, pg_sessionmaker: async_sessionmaker[AsyncSession], customer: Customer
) -> None:
    kept = await services.place_order(pg_sessionmaker, customer.id, {SKU["OUT-TENT-2P"]: 1})
    refunded = await services.place_order(pg_sessionmaker, customer.id, {SKU["BK-PG-INT"]: 1})
    cancelled = await services.place_order(pg_sessionmaker, customer.id, {SKU["ELEC-HUB-7"]: 1})
    await services.place_order(pg_sessionmaker, customer.id, {SKU["AUD-HP-200"]: 1})  # unpaid
    await services.pay_order(pg_session, kept.id, method="card", provider_ref="ch_a")
    await services.pay_order(pg_session, refunded.id, method="card", provider_ref="ch_b")
    await services.refund_order(pg_session, refunded.id)
    await services.cancel_order(pg_session, cancelled.id)

    assert await services.customer_lifetime_value(pg_session, customer.id) == 18900
