"""pytest glue: the report header (server, settings and, per database, its template)."""

from __future__ import annotations

import pytest

from .admin import Admin
from .db import parse_url, where
from .errors import ConfigError, PgTemplateError
from .migrators import make_migrator
from .settings import DEFAULT_DATABASE, OPTIONS
from .state import STATE_KEY, PluginState, has_migrator, run_once
from .template import status


def header_lines(config: pytest.Config) -> list[str]:
    state = config.stash.get(STATE_KEY, None)
    if state is None or getattr(config, "workerinput", None) is not None:
        return []
    s = state.settings
    builds = has_migrator(s)
    # The embedded server is started here only by the xdist controller (for its workers):
    # a single process starts it when a test first needs it (none may: -k, unit tests).
    if state.embedded is not None:
        server = f"{state.server_description} ({state.server_source})"
    elif state.server is None:
        server = "embedded (no --pgt-url / PGTEMPLATE_URL / pgtemplate_url), started on first use"
    else:
        try:
            server = f"{where(parse_url(state.server, state.server_source))} ({state.server_source})"
        except ConfigError:
            server = f"unparsable URL ({state.server_source})"
    lines = [f"pgtemplate: server {server}; " + ", ".join(
        s.describe(name) for name in ("reset", "prefix", "durable"))]
    if builds:
        lines.extend(template_lines(state))
    if config.option.verbose > 0:
        lines.append("pgtemplate: " + ", ".join(
            s.describe(opt.name) for opt in OPTIONS if opt.name not in ("url", "reset", "prefix", "durable")))
    return lines

def template_lines(state: PluginState) -> list[str]:
    """Per database: its template, and whether this run reuses it or builds it."""
    if state.server is None:
        if state.embedded_error is None:
            return ["pgtemplate: template checked when a test first needs it"]
        return [f"pgtemplate: template not checked: {state.embedded_error}"]
    try:
        url = parse_url(state.server, state.server_source)
    except ConfigError:
        return []

    async def check() -> list[str]:
        admin = await Admin.open(url)
        try:
            lines = []
            for database in state.settings.database_names:
                settings = state.settings.for_database(database)
                migrator = make_migrator(settings, state.seed_hook(database))
                label = "" if database == DEFAULT_DATABASE else f" ({database}, reset={settings.reset})"
                lines.append(f"pgtemplate: template{label} "
                             f"{await status(admin, migrator, settings.prefix, settings.rebuild)}; "
                             f"built by {migrator.describe()}")
            return lines
        finally:
            await admin.close()

    try:
        return run_once(check())
    except Exception as exc:
        text = str(exc) if isinstance(exc, PgTemplateError) else f"{type(exc).__name__}: {exc}"
        first = text.removeprefix("pytest-pgtemplate: ").splitlines()[0]
        first = first if len(first) <= 160 else first[:157] + "..."
        return [f"pgtemplate: template not checked ({first}); the first test that needs it says more"]
