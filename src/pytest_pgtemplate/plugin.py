"""pytest glue: options, the marker, hooks.  The database logic lives in the other modules."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import uuid
from collections.abc import Generator
from typing import Any, Protocol

import pytest

from . import supported

# Before the imports below: with a too-old SQLAlchemy or pytest-asyncio they would fail as a
# traceback naming no version; a usage error says what to upgrade.
if _unsupported := supported.problems():
    raise pytest.UsageError(supported.message(_unsupported))

from sqlalchemy.engine import URL

from . import IMPORT_STARTED, profile
from .admin import Admin
from .appenv import driver_mismatch, env_names
from .db import parse_url, where
from .errors import PgTemplateError
from .guard import guard_tests, unguard_tests
from .header import header_lines
from .naming import fixture_name
from .report import format_summary
from .settings import OPTIONS, RESET_STRATEGIES, Settings
from .startup import (
    CONTROLLER_ENV,
    call_worker_url_hook,
    early_setup,
    new_state,
    point_env_vars,
    register_fixtures,
    resolve_settings,
    tell_workers,
)
from .state import STATE_KEY, PluginState, has_migrator, run_once
from .sweep import describe, sweep


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("pgtemplate", "pytest-pgtemplate: a migrated PostgreSQL database per test")
    for opt in OPTIONS:
        help_text = f"{opt.help} [env {opt.env}, ini {opt.ini}; default: {opt.default}]"
        if opt.kind == "bool":
            group.addoption(opt.flag, dest=opt.dest, action="store_const", const=True,
                            default=None, help=help_text)
        else:
            group.addoption(opt.flag, dest=opt.dest, default=None, help=help_text,
                            metavar=opt.metavar or opt.name.upper(),
                            choices=list(opt.choices) or None)
        parser.addini(opt.ini, help=opt.help, type="string", default="")
    group.addoption("--pgt-list", action="store_true", dest="pgt_list",
                    help="list the databases pytest-pgtemplate created on the server, and exit")
    group.addoption("--pgt-gc", action="store_true", dest="pgt_gc",
                    help="drop leftovers of dead runs (kept ones too) and old unused templates, and exit")


def pytest_cmdline_main(config: pytest.Config) -> int | None:
    """``--pgt-list`` / ``--pgt-gc``: act on the server and exit without running tests."""
    if not (config.getoption("pgt_list") or config.getoption("pgt_gc")):
        return None
    settings = resolve_settings(config)
    state = PluginState(settings, run_id=uuid.uuid4().hex, worker="main", workerinput=None)
    try:
        lines = run_once(_command(state.server_url(), settings, gc=bool(config.getoption("pgt_gc"))))
    except PgTemplateError as exc:
        sys.stderr.write(f"{exc}\n")
        return 1
    finally:
        if state.embedded is not None:
            state.embedded.stop()
    sys.stdout.write("".join(line + "\n" for line in lines))
    return 0


async def _command(url: URL, settings: Settings, *, gc: bool) -> list[str]:
    admin = await Admin.open(url)
    try:
        if not gc:
            found = await describe(admin)
            return [f"databases of pytest-pgtemplate on {where(url)}:", *found] if found else [
                f"no databases of pytest-pgtemplate on {where(url)}"]
        result = await sweep(admin, prefix=settings.prefix, keep_templates=settings.keep_templates,
                             include_kept=True,
                             wait=settings.timeout)
        return [f"dropped {name}" for name in result.dropped + result.pruned] or ["nothing to drop"]
    finally:
        await admin.close()


def pytest_load_initial_conftests(early_config: pytest.Config) -> None:
    """Before any conftest.py is imported (pytest loads them last): see ``startup.early_setup``.

    Not ``tryfirst``: plugins that set environment variables from the configuration
    (pytest-env's ``env``) do so in ``tryfirst`` hooks; a variable the user names in
    ``pgtemplate_env`` must end up with the worker database, whatever the plugins' order.
    """
    early_setup(early_config)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "pgtemplate(reset=...): per-test reset strategy (" + "|".join(RESET_STRATEGIES) + ")",
    )
    if config.option.help or config.option.version:
        return  # nothing to set up; a bad setting must not hide the help
    state = config.stash.get(STATE_KEY, None)
    workerinput = getattr(config, "workerinput", None)
    if state is None or (workerinput is not None and (state.run_id, state.worker) != (
            str(workerinput["testrunuid"]), str(workerinput["workerid"]))):
        state = new_state(config, resolve_settings(config))  # loaded by -p, or a mismatch
        config.stash[STATE_KEY] = state
    register_fixtures(config, state.settings)
    # As xdist decides: workers are started when there is a dist mode and somewhere to run.
    is_controller = (workerinput is None and getattr(config.option, "dist", "no") != "no"
                     and bool(getattr(config.option, "tx", None)) and not config.option.collectonly)
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(XdistHooks(state), "pgtemplate-xdist")
        if is_controller:
            tell_workers(state)
    point_env_vars(config, state)  # again: the same values, unless the early hook did not run
    if not is_controller:
        call_worker_url_hook(config, state)
        guard_tests(state.settings.prefix, state.planned_name(), state.guard_mode)
        if state.settings.profile:
            profile.ACTIVE = profile.Profiler(marks={"import_start": IMPORT_STARTED, "imported": _IMPORTED})


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    if profile.ACTIVE is not None:
        profile.ACTIVE.mark("first_setup")


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    from . import hooks

    pluginmanager.add_hookspecs(hooks)


def pytest_report_header(config: pytest.Config) -> list[str]:
    return header_lines(config)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    state = session.config.stash.get(STATE_KEY, None)
    if state is None:
        return
    kept = state.finish()
    state.summary.kept.extend(kept)
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["pgtemplate"] = state.summary.to_dict()


def pytest_unconfigure(config: pytest.Config) -> None:
    if getattr(config, "workerinput", None) is None and CONTROLLER_ENV in os.environ:
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            if json.loads(os.environ[CONTROLLER_ENV]).get("pid") == os.getpid():
                del os.environ[CONTROLLER_ENV]
    unguard_tests()
    profile.ACTIVE = None
    state = config.stash.get(STATE_KEY, None)
    if state is not None and state.embedded is not None:
        state.embedded.stop()


class WorkerNode(Protocol):
    """What we use of xdist's WorkerController."""

    workerinput: dict[str, object]


class XdistHooks:
    """Hooks that exist only with pytest-xdist: registered when it is active."""

    def __init__(self, state: PluginState) -> None:
        self.state = state

    def pytest_configure_node(self, node: WorkerNode) -> None:
        """Controller: the embedded server's URL (or why it did not start) for each worker.

        The controller cannot see which tests need a database; it starts the server only
        for a project that has a way to build one (a worker would start its own otherwise).
        """
        node.workerinput.update(self.state.controller_info())

    def pytest_testnodedown(self, node: object, error: object) -> None:
        """Controller: gather each worker's numbers for the summary."""
        output = getattr(node, "workeroutput", None)
        if isinstance(output, dict) and "pgtemplate" in output:
            self.state.summary.merge(output["pgtemplate"])


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    state = config.stash.get(STATE_KEY, None)
    if state is None or getattr(config, "workerinput", None) is not None:
        return
    lines = format_summary(state.summary, time.perf_counter() - state.started, state.settings.keep_templates)
    if lines:  # the header's essentials too: -q hides the header
        server = state.server_description or _external_server(state)
        lines.insert(0, f"server: {server}; reset={state.settings.reset}, prefix={state.settings.prefix}")
        if state.settings.profile:
            resets = [s for k, v in state.summary.reset_seconds.items() if k != "clone" for s in v]
            lines += profile.format_profile(state.summary.profile, resets)
    elif state.summary.foreign and has_migrator(state.settings):
        inifile = config.inipath or "no configuration file"
        lines = [f"no test used the plugin's databases, but tests connected to "
                 f"{', '.join(sorted(set(state.summary.foreign)))}: if they were meant to run on this "
                 f"run's databases, point the app at them (pgtemplate_env) in the configuration pytest "
                 f"found from here ({inifile}), or run pytest where that file is"]
    if lines:
        terminalreporter.write_sep("-", "pytest-pgtemplate")
        for line in lines:
            terminalreporter.write_line(line)


def _external_server(state: PluginState) -> str:
    try:
        return f"{where(parse_url(state.server or '', state.server_source))} ({state.server_source})"
    except PgTemplateError:
        return f"unparsable URL ({state.server_source})"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report: pytest.TestReport = yield
    if profile.ACTIVE is not None:
        profile.ACTIVE.phase_done(report.when, report.duration)
    state = item.config.stash.get(STATE_KEY, None)
    if report.failed and state is not None and call.excinfo and item.config.option.tbstyle != "long":
        # Out of connections: our sentence instead of the driver's traceback.
        explained = state.explain(call.excinfo.value)
        if explained is not None:
            report.longrepr = str(explained)
    if report.failed and state is not None:
        used = set(getattr(item, "fixturenames", ()))
        names = [fixture_name("_pgt_database", d) for d in state.settings.database_names]
        if used.intersection(names) or state.app_databases:
            for db in state.current_databases():
                report.sections.append(("pytest-pgtemplate", f"worker database: {db}"))
            if state.terminations:  # the likely cause of a cascade of failures
                report.sections.append(("pytest-pgtemplate", f"earlier, {state.terminations[0]}"))
        if call.excinfo is not None and (hint := _driver_hint(state, call.excinfo.value)):
            report.sections.append(("pytest-pgtemplate", hint))
    return report


def _driver_hint(state: PluginState, exc: BaseException) -> str | None:
    """An engine of the app built from a ``pgtemplate_env`` variable with the wrong kind of
    driver fails deep in SQLAlchemy: say which variable, what it holds, and the fix."""
    needs = driver_mismatch(exc)
    if needs is None:
        return None
    async_only = ("asyncpg", "aiopg", "psycopg_async")
    for database in state.settings.database_names:
        for name in env_names(state.settings.for_database(database).env):
            scheme = os.environ.get(name, "").partition("://")[0]
            driver = scheme.partition("+")[2]
            wrong = driver in async_only if needs == "sync" else driver in ("", "psycopg2", "pg8000")
            if scheme.startswith("postgres") and wrong:
                fix = (f"{name}=postgresql+psycopg2 (or {name}=postgresql+psycopg for psycopg 3)"
                       if needs == "sync" else f"{name}=postgresql+asyncpg")
                return (f"the app's engine is {needs}, but {name} (pgtemplate_env) holds a {scheme}:// "
                        f"URL, a driver of the other kind. Name the scheme it needs: pgtemplate_env = {fix}.")
    return None


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_fixture_setup(fixturedef: pytest.FixtureDef[Any], request: pytest.FixtureRequest) -> Generator[
        None, object, object]:
    """A test run by anyio's plugin gets our async fixtures run by anyio, on its loop:
    pytest-asyncio (strict mode) leaves them alone when they are not marked as its own."""
    twin = getattr(fixturedef.func, "pgtemplate_anyio_twin", None)  # ours, not a user's override
    if twin is None or "anyio_backend" not in request.fixturenames:
        return (yield)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fixturedef, "func", twin)
        return (yield)


_IMPORTED = time.perf_counter()  # for --pgt-profile: the plugin's import ends here
