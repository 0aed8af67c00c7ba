"""pytest glue: options, the marker, hooks.  The database logic lives in the other modules."""

from __future__ import annotations

import contextlib
import os
import sys
import time
import uuid
from collections.abc import Callable, Coroutine, Generator
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import pytest
from sqlalchemy.engine import URL

from .admin import Admin
from .appenv import point_env
from .db import LoopThread, parse_url, where
from .errors import ConfigError, PgTemplateError
from .fixtures import (  # noqa: F401  (fixtures are found in the plugin module's namespace)
    Engines,
    _pgt_app_database,
    _pgt_app_session_database,
    _pgt_async_bind,
    _pgt_database,
    _pgt_strategy,
    pg_engine,
    pg_session,
    pg_sessionmaker,
    pg_sync_engine,
    pg_sync_session,
    pg_sync_url,
    pg_url,
)
from .report import Summary, format_summary, worker_payload
from .runtime import Runtime
from .settings import OPTIONS, RESET_STRATEGIES, Settings, resolve
from .sweep import describe, sweep

if TYPE_CHECKING:
    from .embedded import EmbeddedServer

# pytest captures fd 2 during tests, and xdist workers' stdout is not the terminal:
# keep the terminal's stderr, as it was when the plugin loaded, for progress notes.
try:
    _TERMINAL_FD: int | None = os.dup(2)
except OSError:
    _TERMINAL_FD = None


def notify_terminal(message: str) -> None:
    """A progress note on the terminal, past pytest's capture and xdist's workers."""
    line = f"pytest-pgtemplate [pid {os.getpid()}]: {message}\n".encode()
    if _TERMINAL_FD is not None:
        with contextlib.suppress(OSError):
            os.write(_TERMINAL_FD, line)

T = TypeVar("T")



class PluginState:
    """What the plugin keeps per pytest process (in ``config.stash``).

    The server is the URL the user gave, else an embedded cluster: started lazily by
    a single process, or by the xdist controller when it configures its first worker
    (the workers get its URL, or the error that prevented it, through ``workerinput``).
    """

    def __init__(self, settings: Settings, *, run_id: str, worker: str,
                 workerinput: dict[str, object] | None) -> None:
        self.settings = settings
        self.run_id = run_id
        self.worker = worker
        self.server: str | None = settings.url
        self.server_source = settings.source("url")
        self.embedded: EmbeddedServer | None = None
        self.embedded_error: str | None = None
        self.server_description: str | None = None
        self.clone_strategy: str | None = None
        if settings.url is None and workerinput is not None:
            self.server = _opt_str(workerinput.get("pgtemplate_url"))
            self.embedded_error = _opt_str(workerinput.get("pgtemplate_error"))
            self.server_description = _opt_str(workerinput.get("pgtemplate_server"))
            self.server_source = "embedded server of the xdist controller"
            self.clone_strategy = "file_copy"
        self.engines = Engines()
        self.started = time.perf_counter()
        self.app_integration = False  # every test gets the database (see pgtemplate_env)
        self._runtime: Runtime | None = None
        self.summary = Summary()

    def start_embedded(self) -> None:
        """Start the embedded server if no URL is configured (once; errors are kept)."""
        if self.server is not None or self.embedded_error is not None:
            return
        from .embedded import start

        try:
            self.embedded = start(self.settings.pg_bin, self.settings.source("pg_bin"),
                                  cache_root=self.settings.embedded_dir)
        except PgTemplateError as exc:
            self.embedded_error = str(exc)
            return
        self.server = self.embedded.url
        self.server_source = "embedded server"
        self.server_description = self.embedded.describe()
        self.clone_strategy = "file_copy"  # fsync is off there: copying files is fastest

    def runtime(self, config: pytest.Config) -> Runtime:
        if self._runtime is None:
            self.start_embedded()
            if self.embedded_error is not None:
                raise PgTemplateError(self.embedded_error)
            assert self.server is not None
            url = parse_url(self.server, self.server_source)
            self._runtime = Runtime(self.settings, url, run_id=self.run_id, worker=self.worker,
                                    clone_strategy=self.clone_strategy, notify=notify_terminal)
        return self._runtime

    def call(self, request: pytest.FixtureRequest, func: Callable[[], T]) -> T:
        """Run ``func``; a PgTemplateError fails the test with our message alone (the
        driver's traceback stays chained, shown with --tb=long)."""
        try:
            return func()
        except PgTemplateError as exc:
            if self._runtime is None or self._runtime.timings.template is None or exc.setting == "url":
                # No database could be set up: later tests would fail the same way.
                request.session.shouldstop = "pytest-pgtemplate could not set up the database"
            if request.config.option.tbstyle == "long":
                raise
            raise pytest.fail.Exception(str(exc), pytrace=False) from None

    def current_database(self) -> str | None:
        return None if self._runtime is None else self._runtime.current_name

    def finish(self) -> list[str]:
        """Tear down; returns the URLs of kept databases."""
        self.engines.close()
        if self._runtime is None:
            return []
        runtime = self._runtime
        self.summary.merge(worker_payload(runtime))
        kept, problems = runtime.close()
        for problem in problems:
            notify_terminal(f"cleanup of {runtime.current_name or 'the worker database'} incomplete: "
                            f"{problem} (the next run's sweep drops what is left)")
        if kept is None:
            return []
        return [kept.url.set(drivername="postgresql").render_as_string(hide_password=True)]


def _run_once(coro: Coroutine[Any, Any, T]) -> T:
    loop = LoopThread()
    try:
        return loop.run(coro)
    finally:
        loop.close()


def has_migrator(settings: Settings) -> bool:
    return any((settings.metadata, settings.migrate, settings.alembic_ini, settings.env)) or (
        settings.rootdir / "alembic.ini"
    ).is_file()


def _opt_str(value: object) -> str | None:
    return None if value is None else str(value)


STATE_KEY = pytest.StashKey[PluginState]()


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
    settings = _resolve(config)
    state = PluginState(settings, run_id=uuid.uuid4().hex, worker="main", workerinput=None)
    try:
        state.start_embedded()
        if state.embedded_error is not None:
            raise PgTemplateError(state.embedded_error)
        assert state.server is not None
        url = parse_url(state.server, state.server_source)
        lines = _run_once(_command(url, settings, gc=bool(config.getoption("pgt_gc"))))
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
            return await describe(admin) or [f"no databases of pytest-pgtemplate on {where(url)}"]
        result = await sweep(admin, keep_templates=settings.keep_templates, include_kept=True)
        if result.skipped:
            return ["another process is sweeping right now; nothing done"]
        return [f"dropped {name}" for name in result.dropped] or ["nothing to drop"]
    finally:
        await admin.close()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "pgtemplate(reset=...): per-test reset strategy (" + "|".join(RESET_STRATEGIES) + ")",
    )
    settings = _resolve(config)
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None:
        run_id, worker = str(workerinput["testrunuid"]), str(workerinput["workerid"])
    else:
        run_id, worker = uuid.uuid4().hex, "main"
    state = PluginState(settings, run_id=run_id, worker=worker, workerinput=workerinput)
    config.stash[STATE_KEY] = state
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(XdistHooks(state), "pgtemplate-xdist")
    is_controller = workerinput is None and getattr(config.option, "dist", "no") != "no"
    wants_url = settings.env is not None or bool(
        config.hook.pytest_pgtemplate_worker_url.get_hookimpls())
    if wants_url and not is_controller:
        _point_app_at_worker_database(config, state)


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    from . import hooks

    pluginmanager.add_hookspecs(hooks)


def _point_app_at_worker_database(config: pytest.Config, state: PluginState) -> None:
    """Before test modules are imported: the env var and the hook get the worker URL, and
    every test (not only those asking for a fixture) gets the database reset after it."""
    try:
        url = state.runtime(config).planned_database().set(drivername="postgresql+asyncpg")
    except PgTemplateError as exc:
        raise pytest.UsageError(str(exc)) from None
    if state.settings.env is not None:
        point_env(state.settings.env, url)
    config.hook.pytest_pgtemplate_worker_url(url=url, config=config)
    state.app_integration = True


def _resolve(config: pytest.Config) -> Settings:
    try:
        return resolve(
            cli={opt.dest: config.getoption(opt.dest) for opt in OPTIONS},
            env=os.environ,
            ini={opt.ini: config.getini(opt.ini) for opt in OPTIONS},
            rootdir=config.rootpath,
        )
    except ConfigError as exc:
        raise pytest.UsageError(str(exc)) from None


def marker_reset(marker: pytest.Mark) -> str:
    """The ``reset`` of a ``@pytest.mark.pgtemplate(reset=...)`` marker, validated."""

    def signature(*, reset: str) -> str:
        return reset

    try:
        reset = signature(*marker.args, **marker.kwargs)
    except TypeError as exc:
        pytest.fail(
            f"pytest-pgtemplate: bad marker {marker}: {exc}; use @pytest.mark.pgtemplate(reset=...)",
            pytrace=False,
        )
    if reset not in RESET_STRATEGIES:
        pytest.fail(
            f"pytest-pgtemplate: @pytest.mark.pgtemplate(reset={reset!r}): expected one of "
            + ", ".join(RESET_STRATEGIES), pytrace=False,
        )
    return reset


def pytest_report_header(config: pytest.Config) -> list[str]:
    state = config.stash.get(STATE_KEY, None)
    if state is None:
        return []
    s = state.settings
    if state.server is None or state.embedded is not None:
        server = "embedded (no --pgt-url / PGTEMPLATE_URL / pgtemplate_url), started on first use"
    else:
        try:
            server = f"{where(parse_url(state.server, state.server_source))} ({state.server_source})"
        except ConfigError:
            server = f"unparsable URL ({state.server_source})"
    lines = [f"pgtemplate: server {server}; " + ", ".join(
        s.describe(name) for name in ("reset", "prefix") )]
    if config.option.verbose > 0:
        lines.append("pgtemplate: " + ", ".join(
            s.describe(opt.name) for opt in OPTIONS if opt.name not in ("url", "reset", "prefix")))
    return lines


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
        """Controller: start the embedded server before the first worker, pass its URL.

        The controller cannot see which tests need a database; it starts the server only
        for a project that has a way to build one (a worker would start its own otherwise).
        """
        if has_migrator(self.state.settings):
            self.state.start_embedded()
        for key, value in (
            ("pgtemplate_url", self.state.server if self.state.embedded else None),
            ("pgtemplate_error", self.state.embedded_error),
            ("pgtemplate_server", self.state.server_description),
        ):
            if value is not None:
                node.workerinput[key] = value

    def pytest_testnodedown(self, node: object, error: object) -> None:
        """Controller: gather each worker's numbers for the summary."""
        output = getattr(node, "workeroutput", None)
        if isinstance(output, dict) and "pgtemplate" in output:
            self.state.summary.merge(output["pgtemplate"])


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    state = config.stash.get(STATE_KEY, None)
    if state is None or getattr(config, "workerinput", None) is not None:
        return
    lines = format_summary(state.summary, time.perf_counter() - state.started)
    if lines and state.server_description:
        lines.insert(0, f"server: {state.server_description}")
    if lines:
        terminalreporter.write_sep("-", "pytest-pgtemplate")
        for line in lines:
            terminalreporter.write_line(line)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report: pytest.TestReport = yield
    if report.failed and "_pgt_database" in getattr(item, "fixturenames", ()):
        state = item.config.stash.get(STATE_KEY, None)
        db = state.current_database() if state is not None else None
        if db is not None:
            report.sections.append(("pytest-pgtemplate", f"worker database: {db}"))
    return report
