"""Request and response bodies (pydantic 2)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, StringConstraints

from .models import Note

# Patterns are matched before to_lower applies: they accept both cases.

Email = Annotated[
    str,
    StringConstraints(
        strip_whitespace=True, to_lower=True, max_length=320, pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$"
    ),
]
Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100)]
Title = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
TagName = Annotated[
    str,
    StringConstraints(
        strip_whitespace=True, to_lower=True, max_length=40, pattern=r"^[a-zA-Z0-9][a-zA-Z0-9-]*$"
    ),
]
Color = Annotated[str, StringConstraints(to_lower=True, pattern=r"^#[0-9a-fA-F]{6}$")]


class UserCreate(BaseModel):
    email: Email
    display_name: Name


class UserOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    email: str
    display_name: str
    created_at: datetime


class NotebookCreate(BaseModel):
    name: Name


class NotebookOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    owner_id: int
    name: str
    created_at: datetime


class TagCreate(BaseModel):
    name: TagName
    color: Color = "#6b7280"


class TagOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    color: str
    builtin: bool


class NoteCreate(BaseModel):
    title: Title
    body: str = ""
    pinned: bool = False
    tags: list[TagName] = []


class NoteUpdate(BaseModel):
    """A partial update: fields left out are kept."""

    title: Title | None = None
    body: str | None = None
    pinned: bool | None = None
    tags: list[TagName] | None = None


class NoteOut(BaseModel):
    id: int
    notebook_id: int
    title: str
    body: str
    pinned: bool
    tags: list[str]
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, note: Note) -> NoteOut:
        return cls(
            id=note.id,
            notebook_id=note.notebook_id,
            title=note.title,
            body=note.body,
            pinned=note.pinned,
            tags=[tag.name for tag in note.tags],
            created_at=note.created_at,
            updated_at=note.updated_at,
        )


class NotePage(BaseModel):
    items: list[NoteOut]
    total: int
    limit: int
    offset: int


class Health(BaseModel):
    status: str
    database: str
