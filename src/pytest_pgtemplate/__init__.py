"""pytest-pgtemplate: every test gets a clean, fully migrated PostgreSQL database."""

import time as _time

IMPORT_STARTED = _time.perf_counter()  # for --pgt-profile: the plugin's import starts here

from .errors import PgTemplateError  # noqa: E402

__all__ = ["PgTemplateError"]
__version__ = "0.3.0"
