"""The HTTP API: users, their notebooks, notes with tags, and a paginated note search.

Every route gets its session from ``get_session`` (``notes_api.db``), the app's one and only
way to the database. Uniqueness is left to the database: a unique violation on commit
becomes a 409, whichever request got there first.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Annotated, TypeVar

from fastapi import Depends, FastAPI, HTTPException, Query, Response, status
from sqlalchemy import func, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import selectinload

from .db import engine, get_session
from .models import Note, Notebook, Tag, User
from .schemas import (
    Health,
    NotebookCreate,
    NotebookOut,
    NoteCreate,
    NoteOut,
    NotePage,
    NoteUpdate,
    TagCreate,
    TagOut,
    UserCreate,
    UserOut,
)

UNIQUE_VIOLATION = "23505"  # SQLSTATE
UNPROCESSABLE = 422  # Unprocessable Content (its name in fastapi.status differs across Starlette versions)


@asynccontextmanager
async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
    yield
    await engine.dispose()  # server shutdown: close the pooled connections


app = FastAPI(title="notes-api", lifespan=lifespan)

Session = Annotated[AsyncSession, Depends(get_session)]
Row = TypeVar("Row", User, Notebook, Tag)


async def commit_or_409(session: AsyncSession, detail: str) -> None:
    try:
        await session.commit()
    except IntegrityError as exc:
        await session.rollback()
        if getattr(exc.orig, "sqlstate", None) == UNIQUE_VIOLATION:
            raise HTTPException(status.HTTP_409_CONFLICT, detail) from exc
        raise


async def get_or_404(session: AsyncSession, model: type[Row], ident: int) -> Row:
    row = await session.get(model, ident)
    if row is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"{model.__name__.lower()} {ident} not found")
    return row


async def load_note(session: AsyncSession, note_id: int) -> Note:
    note = await session.scalar(
        select(Note)
        .where(Note.id == note_id)
        .options(selectinload(Note.tags))
        .execution_options(populate_existing=True)
    )
    if note is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"note {note_id} not found")
    return note


async def tags_named(session: AsyncSession, names: Sequence[str]) -> list[Tag]:
    wanted = set(names)
    tags = list(await session.scalars(select(Tag).where(Tag.name.in_(wanted))))
    missing = wanted - {tag.name for tag in tags}
    if missing:
        raise HTTPException(UNPROCESSABLE, f"unknown tags: {', '.join(sorted(missing))}")
    return tags


@app.get("/health")
async def health(session: Session) -> Health:
    database = await session.scalar(text("SELECT current_database()"))
    return Health(status="ok", database=str(database))


# --- users -------------------------------------------------------------------------------


@app.post("/users", status_code=status.HTTP_201_CREATED)
async def create_user(body: UserCreate, session: Session) -> UserOut:
    user = User(email=body.email, display_name=body.display_name)
    session.add(user)
    await commit_or_409(session, f"email {body.email} is already registered")
    await session.refresh(user)
    return UserOut.model_validate(user)


@app.get("/users/{user_id}")
async def get_user(user_id: int, session: Session) -> UserOut:
    return UserOut.model_validate(await get_or_404(session, User, user_id))


@app.delete("/users/{user_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_user(user_id: int, session: Session) -> Response:
    # Their notebooks and notes go with them (ON DELETE CASCADE).
    await session.delete(await get_or_404(session, User, user_id))
    await session.commit()
    return Response(status_code=status.HTTP_204_NO_CONTENT)


# --- notebooks ---------------------------------------------------------------------------


@app.post("/users/{user_id}/notebooks", status_code=status.HTTP_201_CREATED)
async def create_notebook(user_id: int, body: NotebookCreate, session: Session) -> NotebookOut:
    await get_or_404(session, User, user_id)
    notebook = Notebook(owner_id=user_id, name=body.name)
    session.add(notebook)
    await commit_or_409(session, f"user {user_id} already has a notebook named {body.name!r}")
    await session.refresh(notebook)
    return NotebookOut.model_validate(notebook)


@app.get("/users/{user_id}/notebooks")
async def list_notebooks(user_id: int, session: Session) -> list[NotebookOut]:
    await get_or_404(session, User, user_id)
    notebooks = await session.scalars(
        select(Notebook).where(Notebook.owner_id == user_id).order_by(Notebook.name)
    )
    return [NotebookOut.model_validate(notebook) for notebook in notebooks]


# --- tags --------------------------------------------------------------------------------


@app.get("/tags")
async def list_tags(session: Session) -> list[TagOut]:
    tags = await session.scalars(select(Tag).order_by(Tag.builtin.desc(), Tag.name))
    return [TagOut.model_validate(tag) for tag in tags]


@app.post("/tags", status_code=status.HTTP_201_CREATED)
async def create_tag(body: TagCreate, session: Session) -> TagOut:
    tag = Tag(name=body.name, color=body.color, builtin=False)
    session.add(tag)
    await commit_or_409(session, f"tag {body.name!r} already exists")
    await session.refresh(tag)
    return TagOut.model_validate(tag)


@app.delete("/tags/{tag_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_tag(tag_id: int, session: Session) -> Response:
    # Its notes lose the tag (ON DELETE CASCADE on note_tags).
    await session.delete(await get_or_404(session, Tag, tag_id))
    await session.commit()
    return Response(status_code=status.HTTP_204_NO_CONTENT)


# --- notes -------------------------------------------------------------------------------


@app.post("/notebooks/{notebook_id}/notes", status_code=status.HTTP_201_CREATED)
async def create_note(notebook_id: int, body: NoteCreate, session: Session) -> NoteOut:
    await get_or_404(session, Notebook, notebook_id)
    note = Note(
        notebook_id=notebook_id,
        title=body.title,
        body=body.body,
        pinned=body.pinned,
        tags=await tags_named(session, body.tags),
    )
    session.add(note)
    await session.commit()
    return NoteOut.of(await load_note(session, note.id))


@app.get("/notes/{note_id}")
async def get_note(note_id: int, session: Session) -> NoteOut:
    return NoteOut.of(await load_note(session, note_id))


@app.patch("/notes/{note_id}")
async def update_note(note_id: int, body: NoteUpdate, session: Session) -> NoteOut:
    note = await load_note(session, note_id)
    changes = body.model_dump(exclude_unset=True, exclude={"tags"})
    for field, value in changes.items():
        if value is not None:
            setattr(note, field, value)
    if body.tags is not None:
        note.tags = await tags_named(session, body.tags)
    await session.commit()
    return NoteOut.of(await load_note(session, note_id))


@app.delete("/notes/{note_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_note(note_id: int, session: Session) -> Response:
    note = await load_note(session, note_id)
    await session.delete(note)
    await session.commit()
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@app.get("/notes")
async def search_notes(
    session: Session,
    q: Annotated[str | None, Query(max_length=200, description="text in the title or body")] = None,
    tag: Annotated[str | None, Query(description="only notes with this tag")] = None,
    notebook_id: int | None = None,
    pinned: bool | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> NotePage:
    """Notes, pinned first, newest first; ``total`` counts every match, not just this page."""
    query = select(Note)
    if q:
        query = query.where(
            Note.title.icontains(q, autoescape=True) | Note.body.icontains(q, autoescape=True)
        )
    if tag is not None:
        query = query.where(Note.tags.any(Tag.name == tag))
    if notebook_id is not None:
        query = query.where(Note.notebook_id == notebook_id)
    if pinned is not None:
        query = query.where(Note.pinned.is_(pinned))
    total = await session.scalar(select(func.count()).select_from(query.subquery()))
    page = await session.scalars(
        query.options(selectinload(Note.tags))
        .order_by(Note.pinned.desc(), Note.id.desc())
        .limit(limit)
        .offset(offset)
    )
    return NotePage(items=[NoteOut.of(note) for note in page], total=total or 0, limit=limit, offset=offset)
