from __future__ import annotations

import pytest
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from shop import services
from shop.models import Address, Customer, Order, Review

from .support import SKU, count


async def test_new_customer_gets_server_defaults_and_a_normalised_email(pg_session: AsyncSession) -> None:
    created = await services.create_customer(
        pg_session, email="  Ada.Lovelace@Example.COM ", full_name=" Ada Lovelace "
    )

    assert created.id == 1
    assert created.email == "ada.lovelace@example.com"
    assert created.full_name == "Ada Lovelace"
    assert created.is_active is True
    assert created.phone is None
    assert created.created_at.tzinfo is not None


async def test_registering_an_email_twice_is_refused_whatever_its_case(
    pg_session: AsyncSession, customer: Customer
) -> None:
    with pytest.raises(services.DuplicateCustomerError, match=r"ada@example\.com"):
        await services.create_customer(pg_session, email="ADA@example.com", full_name="Impostor")

    names = (await pg_session.scalars(select(Customer.full_name))).all()
    assert names == ["Ada Lovelace"]


async def test_duplicate_email_violates_the_unique_constraint(
    pg_session: AsyncSession, customer: Customer
) -> None:
    pg_session.add(Customer(email=customer.email, full_name="Bypassing the service"))
    with pytest.raises(IntegrityError, match="uq_customers_email"):
        await pg_session.commit()
    await pg_session.rollback()

    # The session is usable again and the first customer was committed for good.
    assert await count(pg_session, Customer) == 1


async def test_the_first_address_becomes_the_default_and_later_ones_do_not(
    pg_session: AsyncSession, customer: Customer, address: Address
) -> None:
    office = await services.add_address(
        pg_session,
        customer.id,
        label="office",
        line1="1 Poultry",
        city="London",
        postal_code="EC2R 8EJ",
        country_code="GB",
    )

    assert address.is_default is True
    assert office.is_default is False
    assert address.country_code == "GB"


async def test_setting_a_new_default_address_clears_the_old_one(
    pg_session: AsyncSession, customer: Customer, address: Address
) -> None:
    office = await services.add_address(
        pg_session,
        customer.id,
        label="office",
        line1="1 Poultry",
        city="London",
        postal_code="EC2R 8EJ",
        country_code="GB",
    )

    await services.set_default_address(pg_session, customer.id, office.id)

    defaults = await pg_session.scalars(
        select(Address.label).where(Address.customer_id == customer.id, Address.is_default)
    )
    assert defaults.all() == ["office"]


async def test_a_second_default_address_violates_the_partial_unique_index(
    pg_session: AsyncSession, customer: Customer, address: Address
) -> None:
    pg_session.add(
        Address(
            customer_id=customer.id,
            label="holiday",
            line1="Rue de Rivoli 1",
            city="Paris",
            postal_code="75001",
            country_code="FR",
            is_default=True,
        )
    )
    with pytest.raises(IntegrityError, match="uq_addresses_default_per_customer"):
        await pg_session.commit()


async def test_a_one_letter_country_code_violates_the_check_constraint(
    pg_session: AsyncSession, customer: Customer
) -> None:
    with pytest.raises(IntegrityError, match="ck_addresses_country_code_iso2"):
        await services.add_address(
            pg_session,
            customer.id,
            label="home",
            line1="1 Main St",
            city="Springfield",
            postal_code="12345",
            country_code="U",
        )


async def test_deleting_a_customer_cascades_to_addresses_and_reviews(
    pg_session: AsyncSession, customer: Customer, other_customer: Customer, address: Address
) -> None:
    await services.add_review(
        pg_session, customer_id=customer.id, product_id=SKU["BK-PY-COOK"], rating=5, title="Great"
    )
    await services.add_review(
        pg_session, customer_id=other_customer.id, product_id=SKU["BK-PY-COOK"], rating=3, title="Ok"
    )

    # Plain SQL, so that it is the database's ON DELETE CASCADE at work, not the ORM's.
    await pg_session.execute(delete(Customer).where(Customer.id == customer.id))
    await pg_session.commit()

    assert await count(pg_session, Address) == 0
    reviewers = await pg_session.scalars(select(Review.customer_id))
    assert reviewers.all() == [other_customer.id]


async def test_a_customer_with_orders_cannot_be_deleted(
    pg_session: AsyncSession, customer: Customer, order: Order
) -> None:
    with pytest.raises(IntegrityError, match="fk_orders_customer_id_customers"):
        await pg_session.execute(delete(Customer).where(Customer.id == customer.id))
    await pg_session.rollback()

    assert await count(pg_session, Customer) == 1


async def test_a_deactivated_customer_keeps_their_orders_but_cannot_place_new_ones(
    pg_session: AsyncSession,
    pg_sessionmaker: async_sessionmaker[AsyncSession],
    customer: Customer,
    order: Order,
) -> None:
    await services.deactivate_customer(pg_session, customer.id)

    with pytest.raises(services.InactiveCustomerError):
        await services.place_order(pg_sessionmaker, customer.id, {SKU["BK-PG-INT"]: 1})
    history = await services.order_history(pg_session, customer.id)
    assert [placed.id for placed in history] == [order.id]
