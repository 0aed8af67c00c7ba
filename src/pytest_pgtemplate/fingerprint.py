"""The fingerprint: a hash of everything that decides a template's content.

Same fingerprint, same template.  Inputs are (label, bytes) pairs; labels are
relative paths or option names, so moving the project elsewhere keeps the hash,
while renaming a migration file or changing one byte of it changes it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

from .naming import FORMAT_VERSION

SKIP_DIRS = frozenset({"__pycache__", ".mypy_cache", ".pytest_cache", ".ruff_cache"})
SKIP_SUFFIXES = frozenset({".pyc", ".pyo"})


def compute(inputs: Iterable[tuple[str, bytes]], *, server_major: int, role: str = "") -> str:
    """Hex digest over the inputs (order-independent), the server's major version, the
    role that owns what gets built (another role could not use it), and the plugin's
    template format version."""
    h = hashlib.sha256()
    h.update(f"format={FORMAT_VERSION}\0server={server_major}\0role={role}\0".encode())
    for label, data in sorted(inputs):
        h.update(len(label).to_bytes(8, "big") + label.encode())
        h.update(len(data).to_bytes(8, "big") + data)
    return h.hexdigest()


def tree_inputs(root: Path, label: str) -> list[tuple[str, bytes]]:
    """Every file below ``root`` (paths relative to it, prefixed by ``label``), skipping
    caches and compiled files."""
    found: list[tuple[str, bytes]] = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part in SKIP_DIRS or part.startswith(".") for part in rel.parts):
            continue
        if path.is_file() and path.suffix not in SKIP_SUFFIXES:
            found.append((f"{label}/{rel.as_posix()}", path.read_bytes()))
    return found
