"""pytest-pgtemplate: every test gets a clean, fully migrated PostgreSQL database."""

from .errors import PgTemplateError

__all__ = ["PgTemplateError"]
__version__ = "0.3.0"
