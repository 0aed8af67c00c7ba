"""Checks that fail if the database were not reset between tests.

Every test here starts by asserting the template's state, counted through the app's own
engine: the built-in tags exactly as migrated, every other table empty. Then it commits
through the API, sometimes destructively. Whatever ran before on this xdist worker, in
whatever order, the next test must find the template's state again, identities included.
"""

from __future__ import annotations

import httpx
import pytest
from sqlalchemy import func, select

from notes_api.db import SessionLocal
from notes_api.models import Base

from .support import BUILTIN_TAGS, TEMPLATE_COUNTS, create_note, create_notebook, create_user, tag_rows


async def table_counts() -> dict[str, int]:
    async with SessionLocal() as session:
        return {
            name: await session.scalar(select(func.count()).select_from(table)) or 0
            for name, table in Base.metadata.tables.items()
        }


@pytest.fixture(autouse=True)
async def _starts_from_the_template() -> None:
    assert await table_counts() == TEMPLATE_COUNTS


@pytest.mark.parametrize("attempt", ["first", "again"])
async def test_the_same_user_registers_in_every_test(client: httpx.AsyncClient, attempt: str) -> None:
    # Unique email, committed by the app: only the reset lets the second test pass.
    user = await create_user(client, "ada@example.com", f"Ada ({attempt})")
    notebook = await create_notebook(client, user["id"], "Work")
    note = await create_note(client, notebook["id"], "Hello", tags=["inbox"])

    assert (user["id"], notebook["id"], note["id"]) == (1, 1, 1)  # identities restored too


async def test_wiping_out_the_builtin_tags(client: httpx.AsyncClient) -> None:
    for tag_id, *_ in BUILTIN_TAGS:
        assert (await client.delete(f"/tags/{tag_id}")).status_code == 204

    assert (await client.get("/tags")).json() == []


async def test_the_counts_are_the_templates(client: httpx.AsyncClient) -> None:
    # Said again in so many words, through the API this time: whichever test above ran
    # before this one on this worker, what it committed is gone and what it deleted is back.
    assert tag_rows((await client.get("/tags")).json()) == BUILTIN_TAGS
    assert (await client.get("/notes")).json()["total"] == 0
    assert (await client.get("/users/1")).status_code == 404
    assert await table_counts() == TEMPLATE_COUNTS
