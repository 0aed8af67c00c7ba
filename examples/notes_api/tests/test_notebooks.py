"""Notebooks: a user's names are unique (409), other users may reuse them."""

from __future__ import annotations

import httpx

from .support import Json, create_notebook, create_user


async def test_create_and_list_notebooks(client: httpx.AsyncClient, user: Json) -> None:
    for name in ("Work", "Ideas", "Recipes"):
        await create_notebook(client, user["id"], name)

    response = await client.get(f"/users/{user['id']}/notebooks")

    assert response.status_code == 200
    assert [(nb["name"], nb["owner_id"]) for nb in response.json()] == [
        ("Ideas", user["id"]),
        ("Recipes", user["id"]),
        ("Work", user["id"]),
    ]


async def test_notebook_of_an_unknown_user_is_404(client: httpx.AsyncClient) -> None:
    response = await client.post("/users/77/notebooks", json={"name": "Work"})

    assert response.status_code == 404
    assert response.json() == {"detail": "user 77 not found"}


async def test_notebook_names_are_unique_per_user(client: httpx.AsyncClient, notebook: Json) -> None:
    again = await client.post(f"/users/{notebook['owner_id']}/notebooks", json={"name": notebook["name"]})
    grace = await create_user(client, "grace@example.com", "Grace Hopper")
    graces = await client.post(f"/users/{grace['id']}/notebooks", json={"name": notebook["name"]})

    assert again.status_code == 409
    assert again.json() == {"detail": f"user {notebook['owner_id']} already has a notebook named 'Work'"}
    assert graces.status_code == 201
