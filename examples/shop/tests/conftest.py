"""Fixtures of the shop's test suite.

The database fixtures (``pg_session``, ``pg_sessionmaker``, ``pg_engine``, ``pg_sync_session``,
...) come from pytest-pgtemplate: each test gets this xdist worker's clone of the migrated
template, reset to the template's state after the test. Nothing here creates tables or
deletes rows.
"""

from __future__ import annotations

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from shop import services
from shop.models import Address, Customer, Order

from .support import SKU


@pytest.fixture
async def customer(pg_session: AsyncSession) -> Customer:
    return await services.create_customer(
        pg_session, email="ada@example.com", full_name="Ada Lovelace", phone="+44 20 7946 0000"
    )


@pytest.fixture
async def other_customer(pg_session: AsyncSession) -> Customer:
    return await services.create_customer(pg_session, email="grace@example.com", full_name="Grace Hopper")


@pytest.fixture
async def address(pg_session: AsyncSession, customer: Customer) -> Address:
    return await services.add_address(
        pg_session,
        customer.id,
        label="home",
        line1="12 St James's Square",
        city="London",
        postal_code="SW1Y 4JH",
        country_code="gb",
    )


@pytest.fixture
async def order(
    pg_sessionmaker: async_sessionmaker[AsyncSession], customer: Customer, address: Address
) -> Order:
    """A pending order of one cookbook and two speakers (4450 + 2 * 2999 = 10448 cents)."""
    return await services.place_order(
        pg_sessionmaker,
        customer.id,
        {SKU["BK-PY-COOK"]: 1, SKU["AUD-SPK-MINI"]: 2},
        shipping_address_id=address.id,
    )
