"""Notes: CRUD, tags, and the paginated search."""

from __future__ import annotations

import httpx
import pytest

from .support import Json, create_note, create_notebook


async def test_create_and_fetch_a_note(client: httpx.AsyncClient, notebook: Json) -> None:
    note = await create_note(client, notebook["id"], "Groceries", "eggs, flour", tags=["todo", "inbox"])

    assert note["id"] == 1
    assert (note["notebook_id"], note["title"], note["body"], note["pinned"]) == (
        notebook["id"],
        "Groceries",
        "eggs, flour",
        False,
    )
    assert note["tags"] == ["inbox", "todo"]
    assert (await client.get(f"/notes/{note['id']}")).json() == note


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/notes/99"), ("PATCH", "/notes/99"), ("DELETE", "/notes/99"), ("POST", "/notebooks/99/notes")],
)
async def test_unknown_note_or_notebook_is_404(client: httpx.AsyncClient, method: str, path: str) -> None:
    response = await client.request(
        method, path, json={"title": "x"} if method in ("PATCH", "POST") else None
    )

    assert response.status_code == 404
    assert response.json()["detail"] in ("note 99 not found", "notebook 99 not found")


async def test_an_unknown_tag_is_refused_and_nothing_is_saved(
    client: httpx.AsyncClient, notebook: Json
) -> None:
    response = await client.post(
        f"/notebooks/{notebook['id']}/notes", json={"title": "Plan", "tags": ["todo", "someday", "later"]}
    )

    assert response.status_code == 422
    assert response.json() == {"detail": "unknown tags: later, someday"}
    assert (await client.get("/notes")).json()["total"] == 0


async def test_update_a_note_partially(client: httpx.AsyncClient, notebook: Json) -> None:
    note = await create_note(client, notebook["id"], "Draft", "first words", tags=["idea"])

    response = await client.patch(
        f"/notes/{note['id']}", json={"title": "Essay", "pinned": True, "tags": ["todo"]}
    )

    assert response.status_code == 200
    updated = response.json()
    assert (updated["title"], updated["body"], updated["pinned"], updated["tags"]) == (
        "Essay",
        "first words",
        True,
        ["todo"],
    )
    assert updated["created_at"] == note["created_at"]
    assert updated["updated_at"] >= note["updated_at"]


async def test_delete_a_note(client: httpx.AsyncClient, notebook: Json) -> None:
    note = await create_note(client, notebook["id"], "Ephemeral", tags=["inbox"])

    assert (await client.delete(f"/notes/{note['id']}")).status_code == 204

    assert (await client.get(f"/notes/{note['id']}")).status_code == 404
    assert (await client.get("/notes", params={"tag": "inbox"})).json()["total"] == 0


async def test_search_pages_through_every_match_once(client: httpx.AsyncClient, notebook: Json) -> None:
    for n in range(1, 26):
        await create_note(client, notebook["id"], f"Meeting {n:02d}", "minutes")
    pinned = await create_note(client, notebook["id"], "Meeting agenda template", pinned=True)
    await create_note(client, notebook["id"], "Shopping", "no match here")

    pages = [
        (await client.get("/notes", params={"q": "meeting", "limit": 10, "offset": offset})).json()
        for offset in (0, 10, 20, 30)
    ]

    assert [page["total"] for page in pages] == [26, 26, 26, 26]
    assert [len(page["items"]) for page in pages] == [10, 10, 6, 0]
    titles = [note["title"] for page in pages for note in page["items"]]
    # Pinned first, then newest first; no note twice, none left out.
    assert titles[0] == pinned["title"]
    assert titles[1:] == [f"Meeting {n:02d}" for n in range(25, 0, -1)]


async def test_search_filters_combine(client: httpx.AsyncClient, user: Json, notebook: Json) -> None:
    personal = await create_notebook(client, user["id"], "Personal")
    await create_note(client, notebook["id"], "Quarterly report", "50% done", tags=["todo"])
    await create_note(client, notebook["id"], "Report template", tags=["reference"])
    await create_note(client, personal["id"], "Tax REPORT", "due in April", tags=["todo"])
    await create_note(client, personal["id"], "Holiday", "100% relaxing", tags=["idea"])

    async def titles(**params: str | int) -> list[str]:
        response = await client.get("/notes", params=params)
        assert response.status_code == 200, response.text
        return [note["title"] for note in response.json()["items"]]

    assert await titles(q="report") == ["Tax REPORT", "Report template", "Quarterly report"]
    assert await titles(q="report", tag="todo") == ["Tax REPORT", "Quarterly report"]
    assert await titles(q="report", tag="todo", notebook_id=notebook["id"]) == ["Quarterly report"]
    assert await titles(q="%") == ["Holiday", "Quarterly report"]  # LIKE wildcards are literal
    assert await titles(tag="archive") == []
    assert (await client.get("/notes", params={"limit": 0})).status_code == 422
