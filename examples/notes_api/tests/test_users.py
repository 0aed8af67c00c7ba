"""Users: registration, lookup, deletion; duplicates are refused by the database (409)."""

from __future__ import annotations

import httpx
from sqlalchemy import func, select

from notes_api.db import SessionLocal
from notes_api.models import User

from .support import Json, create_notebook, create_user


async def test_register_and_fetch_a_user(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/users", json={"email": "  Ada@Example.com ", "display_name": "Ada Lovelace"}
    )

    assert response.status_code == 201
    user = response.json()
    assert (user["id"], user["email"], user["display_name"]) == (1, "ada@example.com", "Ada Lovelace")
    assert (await client.get(f"/users/{user['id']}")).json() == user


async def test_unknown_user_is_404(client: httpx.AsyncClient) -> None:
    response = await client.get("/users/4242")

    assert response.status_code == 404
    assert response.json() == {"detail": "user 4242 not found"}


async def test_an_email_registers_once(client: httpx.AsyncClient, user: Json) -> None:
    response = await client.post("/users", json={"email": "ADA@example.com", "display_name": "Someone Else"})

    assert response.status_code == 409
    assert response.json() == {"detail": "email ada@example.com is already registered"}
    async with SessionLocal() as session:
        assert await session.scalar(select(func.count()).select_from(User)) == 1


async def test_a_malformed_email_is_422(client: httpx.AsyncClient) -> None:
    response = await client.post("/users", json={"email": "not-an-email", "display_name": "X"})

    assert response.status_code == 422


async def test_deleting_a_user_deletes_their_notebooks(client: httpx.AsyncClient, notebook: Json) -> None:
    grace = await create_user(client, "grace@example.com", "Grace Hopper")
    await create_notebook(client, grace["id"], "Work")

    assert (await client.delete(f"/users/{notebook['owner_id']}")).status_code == 204

    assert (await client.get(f"/users/{notebook['owner_id']}/notebooks")).status_code == 404
    assert [nb["owner_id"] for nb in (await client.get(f"/users/{grace['id']}/notebooks")).json()] == [
        grace["id"]
    ]
    assert (await client.delete(f"/users/{notebook['owner_id']}")).status_code == 404
