from __future__ import annotations

from datetime import datetime, timezone

import pytest
from sqlalchemy import delete, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from shop import services
from shop.models import Category, Customer, Inventory, Product

from .support import SKU, STOCK, count, stock


async def test_a_category_lists_its_active_products_by_name(pg_session: AsyncSession) -> None:
    books = await services.list_products_in_category(pg_session, "books")

    assert [product.sku for product in books] == ["BK-PG-INT", "BK-PY-COOK"]
    assert [product.inventory.quantity for product in books if product.inventory] == [3, 12]


async def test_a_parent_category_includes_its_subcategories(pg_session: AsyncSession) -> None:
    electronics = await services.list_products_in_category(pg_session, "electronics")
    own_only = await services.list_products_in_category(
        pg_session, "electronics", include_subcategories=False
    )

    assert {product.sku for product in electronics} == {"ELEC-HUB-7", "AUD-HP-200", "AUD-SPK-MINI"}
    assert [product.sku for product in own_only] == ["ELEC-HUB-7"]


async def test_in_stock_only_hides_sold_out_products(pg_session: AsyncSession) -> None:
    everything = await services.list_products_in_category(pg_session, "home-kitchen")
    available = await services.list_products_in_category(pg_session, "home-kitchen", in_stock_only=True)

    assert [product.sku for product in everything] == ["KIT-KNIFE-20", "KIT-PRESS-1L"]
    assert [product.sku for product in available] == ["KIT-PRESS-1L"]


async def test_deactivated_products_are_not_listed(pg_session: AsyncSession) -> None:
    await pg_session.execute(update(Product).where(Product.sku == "OUT-TENT-2P").values(is_active=False))
    await pg_session.commit()

    assert await services.list_products_in_category(pg_session, "outdoor") == []


async def test_an_unknown_category_is_reported(pg_session: AsyncSession) -> None:
    with pytest.raises(services.NotFoundError, match="category 'garden' not found"):
        await services.list_products_in_category(pg_session, "garden")


async def test_a_new_product_continues_the_identity_after_the_seeded_ones(
    pg_session: AsyncSession,
) -> None:
    kettle = await services.create_product(
        pg_session,
        sku="KIT-KETTLE-17",
        name="Kettle, 1.7 l",
        category_slug="home-kitchen",
        price_cents=3450,
        stock=7,
    )

    assert kettle.id == 9
    assert kettle.is_active is True
    assert kettle.description == ""
    assert await stock(pg_session, "KIT-KETTLE-17") == 7
    kitchen = await services.list_products_in_category(pg_session, "home-kitchen")
    assert [product.sku for product in kitchen] == ["KIT-KNIFE-20", "KIT-PRESS-1L", "KIT-KETTLE-17"]


async def test_a_duplicate_sku_violates_the_unique_constraint(pg_session: AsyncSession) -> None:
    with pytest.raises(IntegrityError, match="uq_products_sku"):
        await services.create_product(
            pg_session, sku="BK-PY-COOK", name="Pirated copy", category_slug="books", price_cents=1
        )


async def test_a_negative_price_violates_the_check_constraint(pg_session: AsyncSession) -> None:
    with pytest.raises(IntegrityError, match="ck_products_price_not_negative"):
        await services.change_price(pg_session, SKU["BK-PY-COOK"], -100)


async def test_a_price_change_bumps_updated_at_through_the_trigger(pg_session: AsyncSession) -> None:
    before = await pg_session.scalar(select(Product.updated_at).where(Product.id == SKU["ELEC-HUB-7"]))

    hub = await services.change_price(pg_session, SKU["ELEC-HUB-7"], 3499)

    assert hub.price_cents == 3499
    assert before is not None
    assert hub.updated_at > before


async def test_the_trigger_overrides_an_explicit_updated_at(pg_session: AsyncSession) -> None:
    long_ago = datetime(2000, 1, 1, tzinfo=timezone.utc)
    await pg_session.execute(
        update(Product).where(Product.sku == "OUT-TENT-2P").values(price_cents=17900, updated_at=long_ago)
    )
    await pg_session.commit()

    updated_at = await pg_session.scalar(select(Product.updated_at).where(Product.sku == "OUT-TENT-2P"))
    assert updated_at is not None
    assert updated_at > long_ago
    now = await pg_session.scalar(text("SELECT now()"))
    assert now is not None
    assert updated_at <= now


async def test_restocking_adds_units_and_stock_can_never_go_negative(pg_session: AsyncSession) -> None:
    assert await services.restock(pg_session, SKU["KIT-KNIFE-20"], 6) == 6

    with pytest.raises(IntegrityError, match="ck_inventory_quantity_not_negative"):
        await services.restock(pg_session, SKU["KIT-KNIFE-20"], -7)
    await pg_session.rollback()

    assert await stock(pg_session, "KIT-KNIFE-20") == 6


async def test_products_at_their_reorder_level_are_reported_lowest_stock_first(
    pg_session: AsyncSession, pg_sessionmaker: async_sessionmaker[AsyncSession], customer: Customer
) -> None:
    assert await services.products_to_reorder(pg_session) == [("KIT-KNIFE-20", 0)]

    await services.place_order(pg_sessionmaker, customer.id, {SKU["BK-PG-INT"]: 2})

    assert await services.products_to_reorder(pg_session) == [
        ("KIT-KNIFE-20", 0),
        ("BK-PG-INT", STOCK["BK-PG-INT"] - 2),
    ]


async def test_a_category_with_products_cannot_be_deleted(pg_session: AsyncSession) -> None:
    with pytest.raises(IntegrityError, match="fk_products_category_id_categories"):
        await pg_session.execute(delete(Category).where(Category.slug == "books"))


async def test_deleting_a_parent_category_detaches_its_subcategory(pg_session: AsyncSession) -> None:
    audio_id = select(Category.id).where(Category.slug == "audio").scalar_subquery()
    # Move the only product of 'electronics' out of it, so it can be deleted.
    await pg_session.execute(update(Product).where(Product.sku == "ELEC-HUB-7").values(category_id=audio_id))
    await pg_session.execute(delete(Category).where(Category.slug == "electronics"))
    await pg_session.commit()

    audio = await pg_session.scalar(select(Category).where(Category.slug == "audio"))
    assert audio is not None
    assert audio.parent_id is None
    assert len(await services.list_products_in_category(pg_session, "audio")) == 3


async def test_deleting_a_product_cascades_to_its_inventory(pg_session: AsyncSession) -> None:
    await pg_session.execute(delete(Product).where(Product.sku == "KIT-KNIFE-20"))
    await pg_session.commit()

    assert await pg_session.get(Inventory, SKU["KIT-KNIFE-20"]) is None
    assert await count(pg_session, Inventory) == len(STOCK) - 1
