"""Tags: the built-in ones come from a data migration; names are unique (409)."""

from __future__ import annotations

import httpx

from .support import BUILTIN_TAGS, Json, create_note, tag_rows


async def test_the_builtin_tags_are_there(client: httpx.AsyncClient) -> None:
    response = await client.get("/tags")

    assert response.status_code == 200
    assert tag_rows(response.json()) == BUILTIN_TAGS


async def test_a_new_tag_is_listed_after_the_builtin_ones(client: httpx.AsyncClient) -> None:
    response = await client.post("/tags", json={"name": "Reading-List", "color": "#10B981"})

    assert response.status_code == 201
    assert response.json() == {"id": 6, "name": "reading-list", "color": "#10b981", "builtin": False}
    assert tag_rows((await client.get("/tags")).json()) == [
        *BUILTIN_TAGS,
        (6, "reading-list", "#10b981", False),
    ]


async def test_a_tag_name_is_taken_once(client: httpx.AsyncClient) -> None:
    response = await client.post("/tags", json={"name": "todo"})

    assert response.status_code == 409
    assert response.json() == {"detail": "tag 'todo' already exists"}


async def test_deleting_a_tag_untags_its_notes(client: httpx.AsyncClient, notebook: Json) -> None:
    note = await create_note(client, notebook["id"], "Call the bank", tags=["todo", "inbox"])

    assert (await client.delete("/tags/2")).status_code == 204  # todo
    assert (await client.delete("/tags/2")).status_code == 404

    assert (await client.get(f"/notes/{note['id']}")).json()["tags"] == ["inbox"]
