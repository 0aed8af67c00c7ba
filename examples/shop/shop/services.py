"""Use cases of the shop, as async functions over SQLAlchemy sessions.

Functions that take an ``AsyncSession`` work inside the caller's session and commit when
their use case is complete, like a request handler would. Functions that take an
``async_sessionmaker`` run one or more units of work of their own (``place_order`` must
lock stock rows in a transaction nobody else is using; ``cancel_stale_orders`` commits per
order). Objects they return are read back after the commit, so they are complete whether
or not the sessionmaker expires objects on commit.

Errors of the domain are ``ShopError`` subclasses; constraint violations that the database
catches first (duplicate SKU, rating out of range, ...) surface as ``IntegrityError``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import TypeVar

from sqlalchemy import exists, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import selectinload

from shop.models import (
    PAYMENT_METHODS,
    Address,
    Category,
    Coupon,
    CouponRedemption,
    Customer,
    Inventory,
    Order,
    OrderItem,
    OrderStatus,
    Payment,
    Product,
    Review,
)

_M = TypeVar("_M")

# Orders in these states have been paid for and not given back.
REVENUE_STATUSES = (OrderStatus.PAID, OrderStatus.SHIPPED, OrderStatus.DELIVERED)

ALLOWED_TRANSITIONS: Mapping[OrderStatus, frozenset[OrderStatus]] = {
    OrderStatus.PENDING: frozenset({OrderStatus.PAID, OrderStatus.CANCELLED}),
    OrderStatus.PAID: frozenset({OrderStatus.SHIPPED, OrderStatus.REFUNDED}),
    OrderStatus.SHIPPED: frozenset({OrderStatus.DELIVERED}),
    OrderStatus.DELIVERED: frozenset({OrderStatus.REFUNDED}),
    OrderStatus.CANCELLED: frozenset(),
    OrderStatus.REFUNDED: frozenset(),
}


class ShopError(Exception):
    """Base class of the errors a use case reports to its caller."""


class NotFoundError(ShopError):
    def __init__(self, kind: str, key: object) -> None:
        super().__init__(f"{kind} {key!r} not found")
        self.kind = kind
        self.key = key


class DuplicateCustomerError(ShopError):
    def __init__(self, email: str) -> None:
        super().__init__(f"a customer with email {email!r} already exists")
        self.email = email


class InactiveCustomerError(ShopError):
    pass


class EmptyOrderError(ShopError):
    pass


class OutOfStockError(ShopError):
    def __init__(self, sku: str, requested: int, available: int) -> None:
        super().__init__(f"{sku}: {requested} requested, {available} in stock")
        self.sku = sku
        self.requested = requested
        self.available = available


class CouponError(ShopError):
    """The coupon exists but cannot be applied to this order."""


class InvalidTransitionError(ShopError):
    def __init__(self, order_id: int, current: OrderStatus, target: OrderStatus) -> None:
        super().__init__(f"order {order_id} cannot go from {current.value} to {target.value}")
        self.order_id = order_id
        self.current = current
        self.target = target


class PaymentError(ShopError):
    pass


@dataclass(frozen=True, slots=True)
class RatingSummary:
    average: Decimal | None
    count: int


@dataclass(frozen=True, slots=True)
class TopSeller:
    sku: str
    name: str
    units_sold: int
    revenue_cents: int


# -- customers ---------------------------------------------------------------------------


async def create_customer(
    session: AsyncSession, *, email: str, full_name: str, phone: str | None = None
) -> Customer:
    """Register a customer; emails are compared case-insensitively (stored lower-case)."""
    customer = Customer(email=email.strip().lower(), full_name=full_name.strip(), phone=phone)
    session.add(customer)
    try:
        await session.commit()
    except IntegrityError as exc:
        await session.rollback()
        raise DuplicateCustomerError(customer.email) from exc
    await session.refresh(customer)
    return customer


async def add_address(
    session: AsyncSession,
    customer_id: int,
    *,
    label: str,
    line1: str,
    city: str,
    postal_code: str,
    country_code: str,
    line2: str | None = None,
    make_default: bool = False,
) -> Address:
    """Add an address; the customer's first address becomes the default one."""
    customer = await _get(session, Customer, customer_id)
    has_default = await session.scalar(
        select(exists().where(Address.customer_id == customer.id, Address.is_default))
    )
    is_default = make_default or not has_default
    if is_default and has_default:
        await _clear_default_address(session, customer.id)
    address = Address(
        customer_id=customer.id,
        label=label,
        line1=line1,
        line2=line2,
        city=city,
        postal_code=postal_code,
        country_code=country_code.upper(),
        is_default=is_default,
    )
    session.add(address)
    await session.commit()
    await session.refresh(address)
    return address


async def set_default_address(session: AsyncSession, customer_id: int, address_id: int) -> None:
    address = await _get(session, Address, address_id)
    if address.customer_id != customer_id:
        raise NotFoundError("address", address_id)
    # Clear first: the partial unique index allows one default per customer at any moment.
    await _clear_default_address(session, customer_id)
    address.is_default = True
    await session.commit()


async def deactivate_customer(session: AsyncSession, customer_id: int) -> None:
    """Close the account: orders stay for the books, no new ones can be placed."""
    customer = await _get(session, Customer, customer_id)
    customer.is_active = False
    await session.commit()


async def customer_lifetime_value(session: AsyncSession, customer_id: int) -> int:
    """Cents paid by the customer for orders that were neither cancelled nor refunded."""
    total = await session.scalar(
        select(func.coalesce(func.sum(Order.total_cents), 0)).where(
            Order.customer_id == customer_id, Order.status.in_(REVENUE_STATUSES)
        )
    )
    return int(total or 0)


# -- catalog -----------------------------------------------------------------------------


async def create_product(
    session: AsyncSession,
    *,
    sku: str,
    name: str,
    category_slug: str,
    price_cents: int,
    stock: int = 0,
    description: str = "",
) -> Product:
    category = await _category_by_slug(session, category_slug)
    product = Product(
        sku=sku,
        name=name,
        description=description,
        category_id=category.id,
        price_cents=price_cents,
        inventory=Inventory(quantity=stock),
    )
    session.add(product)
    await session.commit()
    await session.refresh(product)
    return product


async def restock(session: AsyncSession, product_id: int, quantity: int) -> int:
    """Add (or, negative, remove) units; returns the new stock level."""
    inventory = await session.get(Inventory, product_id, with_for_update=True)
    if inventory is None:
        raise NotFoundError("inventory of product", product_id)
    inventory.quantity += quantity
    new_quantity = inventory.quantity
    await session.commit()
    return new_quantity


async def change_price(session: AsyncSession, product_id: int, price_cents: int) -> Product:
    product = await _get(session, Product, product_id)
    product.price_cents = price_cents
    await session.commit()
    # updated_at is set by a trigger: read it back.
    await session.refresh(product)
    return product


async def list_products_in_category(
    session: AsyncSession,
    slug: str,
    *,
    include_subcategories: bool = True,
    in_stock_only: bool = False,
) -> list[Product]:
    """Active products of a category (and its descendants), sorted by name."""
    category = await _category_by_slug(session, slug)
    category_ids = select(Category.id).where(Category.id == category.id)
    if include_subcategories:
        tree = select(Category.id).where(Category.id == category.id).cte(recursive=True)
        tree = tree.union_all(select(Category.id).where(Category.parent_id == tree.c.id))
        category_ids = select(tree.c.id)
    query = (
        select(Product)
        .where(Product.category_id.in_(category_ids), Product.is_active)
        .options(selectinload(Product.inventory))
        .order_by(Product.name)
    )
    if in_stock_only:
        query = query.join(Inventory).where(Inventory.quantity > 0)
    return list(await session.scalars(query))


async def products_to_reorder(session: AsyncSession) -> list[tuple[str, int]]:
    """(sku, stock) of active products at or below their reorder level, lowest stock first."""
    rows = await session.execute(
        select(Product.sku, Inventory.quantity)
        .join(Inventory)
        .where(Product.is_active, Inventory.quantity <= Inventory.reorder_level)
        .order_by(Inventory.quantity, Product.sku)
    )
    return [(sku, quantity) for sku, quantity in rows]


# -- orders ------------------------------------------------------------------------------


async def place_order(
    sessionmaker: async_sessionmaker[AsyncSession],
    customer_id: int,
    lines: Mapping[int, int] | Iterable[tuple[int, int]],
    *,
    coupon_code: str | None = None,
    shipping_address_id: int | None = None,
) -> Order:
    """Create a pending order for ``lines`` ((product id, quantity) pairs, repeats summed).

    In one transaction: locks the stock rows, checks and decrements them, prices the items
    at today's prices, applies the coupon. Either all of it is committed or none of it.
    """
    quantities = Counter[int]()
    for product_id, quantity in lines.items() if isinstance(lines, Mapping) else lines:
        if quantity <= 0:
            raise ShopError(f"quantity of product {product_id} must be positive")
        quantities[product_id] += quantity
    if not quantities:
        raise EmptyOrderError("an order needs at least one item")

    async with sessionmaker() as session, session.begin():
        customer = await _get(session, Customer, customer_id)
        if not customer.is_active:
            raise InactiveCustomerError(f"customer {customer_id} is deactivated")
        if shipping_address_id is not None:
            address = await session.get(Address, shipping_address_id)
            if address is None or address.customer_id != customer_id:
                raise NotFoundError("address", shipping_address_id)

        # Lock in product id order so that concurrent orders cannot deadlock.
        rows = await session.execute(
            select(Product, Inventory)
            .join(Inventory)
            .where(Product.id.in_(quantities))
            .order_by(Product.id)
            .with_for_update(of=Inventory)
        )
        found = {product.id: (product, inventory) for product, inventory in rows}
        items = []
        for product_id, quantity in sorted(quantities.items()):
            if product_id not in found or not found[product_id][0].is_active:
                raise NotFoundError("product", product_id)
            product, inventory = found[product_id]
            if inventory.quantity < quantity:
                raise OutOfStockError(product.sku, quantity, inventory.quantity)
            inventory.quantity -= quantity
            items.append(
                OrderItem(product_id=product_id, quantity=quantity, unit_price_cents=product.price_cents)
            )

        subtotal = sum(item.line_total_cents for item in items)
        coupon = None
        discount = 0
        if coupon_code is not None:
            coupon = await _redeemable_coupon(session, coupon_code, customer_id, subtotal)
            discount = _discount_cents(coupon, subtotal)
            coupon.times_redeemed += 1

        order = Order(
            customer_id=customer_id,
            status=OrderStatus.PENDING,
            shipping_address_id=shipping_address_id,
            coupon_id=coupon.id if coupon is not None else None,
            subtotal_cents=subtotal,
            discount_cents=discount,
            total_cents=subtotal - discount,
            items=items,
        )
        session.add(order)
        await session.flush()
        order_id = order.id
        if coupon is not None:
            session.add(CouponRedemption(coupon_id=coupon.id, customer_id=customer_id, order_id=order_id))
    return await _load_order(sessionmaker, order_id)


async def pay_order(
    session: AsyncSession,
    order_id: int,
    *,
    method: str,
    provider_ref: str,
    amount_cents: int | None = None,
) -> Payment:
    """Record a captured payment of the whole total and mark the order paid."""
    if method not in PAYMENT_METHODS:
        raise PaymentError(f"unknown payment method {method!r}")
    order = await _get_order_for_update(session, order_id)
    _check_transition(order, OrderStatus.PAID)
    if amount_cents is not None and amount_cents != order.total_cents:
        raise PaymentError(f"order {order_id} totals {order.total_cents} cents, {amount_cents} were paid")
    payment = Payment(
        order_id=order.id,
        amount_cents=order.total_cents,
        method=method,
        status="captured",
        provider_ref=provider_ref,
    )
    session.add(payment)
    order.status = OrderStatus.PAID
    await session.commit()
    await session.refresh(payment)
    return payment


async def ship_order(session: AsyncSession, order_id: int) -> Order:
    return await _move(session, order_id, OrderStatus.SHIPPED)


async def deliver_order(session: AsyncSession, order_id: int) -> Order:
    return await _move(session, order_id, OrderStatus.DELIVERED)


async def cancel_order(session: AsyncSession, order_id: int) -> Order:
    """Cancel an unpaid order: its stock goes back on the shelf, its coupon use is undone."""
    order = await _get_order_for_update(session, order_id)
    _check_transition(order, OrderStatus.CANCELLED)
    await _restock_items(session, order)
    await _release_coupon(session, order)
    order.status = OrderStatus.CANCELLED
    await session.commit()
    return await _get_order(session, order_id)


async def refund_order(session: AsyncSession, order_id: int) -> Order:
    """Refund a paid or delivered order; unshipped goods go back into stock."""
    order = await _get_order_for_update(session, order_id)
    _check_transition(order, OrderStatus.REFUNDED)
    if order.status is OrderStatus.PAID:
        await _restock_items(session, order)
    for payment in order.payments:
        if payment.status == "captured":
            payment.status = "refunded"
    order.status = OrderStatus.REFUNDED
    await session.commit()
    return await _get_order(session, order_id)


async def cancel_stale_orders(
    sessionmaker: async_sessionmaker[AsyncSession],
    *,
    older_than: timedelta,
    now: datetime | None = None,
) -> list[int]:
    """Cancel pending orders created before ``now - older_than``; one transaction each.

    Returns the ids cancelled. An order paid meanwhile is skipped, not an error.
    """
    cutoff = (now or datetime.now(timezone.utc)) - older_than
    async with sessionmaker() as session:
        stale = list(
            await session.scalars(
                select(Order.id)
                .where(Order.status == OrderStatus.PENDING, Order.created_at < cutoff)
                .order_by(Order.id)
            )
        )
    cancelled = []
    for order_id in stale:
        async with sessionmaker() as session:
            try:
                await cancel_order(session, order_id)
            except InvalidTransitionError:
                continue
            cancelled.append(order_id)
    return cancelled


async def order_history(session: AsyncSession, customer_id: int) -> list[Order]:
    """The customer's orders with their items, newest first."""
    result = await session.scalars(
        select(Order)
        .where(Order.customer_id == customer_id)
        .options(selectinload(Order.items))
        .order_by(Order.created_at.desc(), Order.id.desc())
    )
    return list(result)


async def top_sellers(session: AsyncSession, *, limit: int = 5) -> list[TopSeller]:
    """Best-selling products by units in paid, shipped or delivered orders."""
    units = func.sum(OrderItem.quantity)
    rows = await session.execute(
        select(
            Product.sku,
            Product.name,
            units.label("units"),
            func.sum(OrderItem.quantity * OrderItem.unit_price_cents).label("revenue"),
        )
        .join(OrderItem, OrderItem.product_id == Product.id)
        .join(Order, Order.id == OrderItem.order_id)
        .where(Order.status.in_(REVENUE_STATUSES))
        .group_by(Product.id)
        .order_by(units.desc(), Product.sku)
        .limit(limit)
    )
    return [
        TopSeller(sku=sku, name=name, units_sold=int(sold), revenue_cents=int(revenue))
        for sku, name, sold, revenue in rows
    ]


# -- reviews -----------------------------------------------------------------------------


async def add_review(
    session: AsyncSession,
    *,
    customer_id: int,
    product_id: int,
    rating: int,
    title: str,
    body: str = "",
) -> Review:
    """One review per customer and product; flagged verified if they received the product."""
    bought = await session.scalar(
        select(
            exists().where(
                Order.customer_id == customer_id,
                Order.status == OrderStatus.DELIVERED,
                OrderItem.order_id == Order.id,
                OrderItem.product_id == product_id,
            )
        )
    )
    review = Review(
        customer_id=customer_id,
        product_id=product_id,
        rating=rating,
        title=title,
        body=body,
        is_verified_purchase=bool(bought),
    )
    session.add(review)
    await session.commit()
    await session.refresh(review)
    return review


async def product_rating(session: AsyncSession, product_id: int) -> RatingSummary:
    row = (
        await session.execute(
            select(func.round(func.avg(Review.rating), 2), func.count(Review.id)).where(
                Review.product_id == product_id
            )
        )
    ).one()
    average, count = row
    return RatingSummary(average=average, count=count)


# -- helpers -----------------------------------------------------------------------------


async def _get(session: AsyncSession, model: type[_M], key: int) -> _M:
    instance = await session.get(model, key)
    if instance is None:
        raise NotFoundError(model.__name__.lower(), key)
    return instance


async def _category_by_slug(session: AsyncSession, slug: str) -> Category:
    category = await session.scalar(select(Category).where(Category.slug == slug))
    if category is None:
        raise NotFoundError("category", slug)
    return category


async def _clear_default_address(session: AsyncSession, customer_id: int) -> None:
    for address in await session.scalars(
        select(Address).where(Address.customer_id == customer_id, Address.is_default)
    ):
        address.is_default = False
    await session.flush()


async def _get_order_for_update(session: AsyncSession, order_id: int) -> Order:
    return await _get_order(session, order_id, for_update=True)


async def _get_order(session: AsyncSession, order_id: int, *, for_update: bool = False) -> Order:
    """The order with its items and payments, read afresh (the session may hold a stale copy)."""
    query = (
        select(Order)
        .where(Order.id == order_id)
        .options(selectinload(Order.items), selectinload(Order.payments))
        .execution_options(populate_existing=True)
    )
    if for_update:
        query = query.with_for_update(of=Order)
    order = await session.scalar(query)
    if order is None:
        raise NotFoundError("order", order_id)
    return order


async def _load_order(sessionmaker: async_sessionmaker[AsyncSession], order_id: int) -> Order:
    async with sessionmaker() as session:
        return await _get_order(session, order_id)


def _check_transition(order: Order, target: OrderStatus) -> None:
    if target not in ALLOWED_TRANSITIONS[order.status]:
        raise InvalidTransitionError(order.id, order.status, target)


async def _move(session: AsyncSession, order_id: int, target: OrderStatus) -> Order:
    order = await _get_order_for_update(session, order_id)
    _check_transition(order, target)
    order.status = target
    await session.commit()
    return await _get_order(session, order_id)


async def _restock_items(session: AsyncSession, order: Order) -> None:
    for item in sorted(order.items, key=lambda item: item.product_id):
        inventory = await session.get(
            Inventory, item.product_id, with_for_update=True, populate_existing=True
        )
        if inventory is not None:  # no inventory row: the product is no longer stocked
            inventory.quantity += item.quantity


async def _release_coupon(session: AsyncSession, order: Order) -> None:
    if order.coupon_id is None:
        return
    redemption = await session.scalar(select(CouponRedemption).where(CouponRedemption.order_id == order.id))
    if redemption is not None:
        await session.delete(redemption)
        coupon = await session.get(Coupon, order.coupon_id, with_for_update=True)
        if coupon is not None:
            coupon.times_redeemed -= 1


async def _redeemable_coupon(
    session: AsyncSession, code: str, customer_id: int, subtotal_cents: int
) -> Coupon:
    coupon = await session.scalar(select(Coupon).where(Coupon.code == code.strip().upper()).with_for_update())
    if coupon is None:
        raise NotFoundError("coupon", code)
    if not coupon.is_active:
        raise CouponError(f"coupon {coupon.code} is no longer active")
    if coupon.valid_until is not None and coupon.valid_until <= datetime.now(timezone.utc):
        raise CouponError(f"coupon {coupon.code} expired on {coupon.valid_until:%Y-%m-%d}")
    if coupon.max_redemptions is not None and coupon.times_redeemed >= coupon.max_redemptions:
        raise CouponError(f"coupon {coupon.code} has been used up")
    if subtotal_cents < coupon.min_subtotal_cents:
        raise CouponError(f"coupon {coupon.code} needs a subtotal of {coupon.min_subtotal_cents} cents")
    used = await session.scalar(
        select(
            exists().where(
                CouponRedemption.coupon_id == coupon.id,
                CouponRedemption.customer_id == customer_id,
            )
        )
    )
    if used:
        raise CouponError(f"coupon {coupon.code} was already used by this customer")
    return coupon


def _discount_cents(coupon: Coupon, subtotal_cents: int) -> int:
    if coupon.percent_off is not None:
        # Half a cent rounds up, in the customer's favour.
        return min(subtotal_cents, (subtotal_cents * coupon.percent_off + 50) // 100)
    assert coupon.amount_off_cents is not None  # guaranteed by ck_coupons_exactly_one_discount
    return min(subtotal_cents, coupon.amount_off_cents)
