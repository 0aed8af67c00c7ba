"""What the migrations put in every database, and small helpers that go through the API.

The expected rows are written out by hand on purpose: they are what a reader of
``0004_seed_builtin_tags.py`` expects, not a copy taken from the database.

Nothing here imports ``notes_api.db``: ``conftest.py`` imports this module before the plugin
has pointed DATABASE_URL at the worker database (see there).
"""

from __future__ import annotations

from typing import Any

import httpx

# GET /tags: the built-in tags first, by name; (id, name, color, builtin).
BUILTIN_TAGS = [
    (5, "archive", "#9ca3af", True),
    (3, "idea", "#f59e0b", True),
    (1, "inbox", "#6b7280", True),
    (4, "reference", "#3b82f6", True),
    (2, "todo", "#ef4444", True),
]

# Rows per table right after the migrations: what every test starts with.
TEMPLATE_COUNTS = {"users": 0, "notebooks": 0, "notes": 0, "tags": len(BUILTIN_TAGS), "note_tags": 0}

Json = dict[str, Any]


def tag_rows(tags: list[Json]) -> list[tuple[object, ...]]:
    return [(tag["id"], tag["name"], tag["color"], tag["builtin"]) for tag in tags]


def created(response: httpx.Response) -> Json:
    assert response.status_code == httpx.codes.CREATED, response.text
    body: Json = response.json()
    return body


async def create_user(
    client: httpx.AsyncClient, email: str = "ada@example.com", name: str = "Ada Lovelace"
) -> Json:
    return created(await client.post("/users", json={"email": email, "display_name": name}))


async def create_notebook(client: httpx.AsyncClient, user_id: int, name: str = "Work") -> Json:
    return created(await client.post(f"/users/{user_id}/notebooks", json={"name": name}))


async def create_note(
    client: httpx.AsyncClient,
    notebook_id: int,
    title: str,
    body: str = "",
    *,
    tags: list[str] | None = None,
    pinned: bool = False,
) -> Json:
    payload = {"title": title, "body": body, "tags": tags or [], "pinned": pinned}
    return created(await client.post(f"/notebooks/{notebook_id}/notes", json=payload))
