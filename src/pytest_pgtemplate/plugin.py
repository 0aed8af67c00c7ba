"""pytest glue: options, the marker, hooks.  The database logic lives in the other modules."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import time
import types
import uuid
from collections.abc import Callable, Coroutine, Generator
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import pytest
from sqlalchemy.engine import URL

from .admin import Admin
from .appenv import point_env
from .db import LoopThread, parse_url, where
from .errors import ConfigError, PgTemplateError
from .fixtures import ANYIO_TWINS, Engines, common_fixtures, fixture_name, fixtures_for
from .migrators import HookSeed, make_migrator
from .report import Summary, format_summary, worker_payload
from .runtime import Runtime
from .settings import DEFAULT_DATABASE, OPTIONS, RESET_STRATEGIES, Settings, resolve
from .sweep import describe, sweep
from .template import status

if TYPE_CHECKING:
    from .embedded import EmbeddedServer
    from .migrate import Migrator

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
        self.engines: dict[str, Engines] = {}
        self.started = time.perf_counter()
        # Databases every test gets, asked for or not (see pgtemplate_env).
        self.app_databases: list[str] = []
        self.warned: set[str] = set()  # warnings given once per process
        self._runtimes: dict[str, Runtime] = {}
        self.seed_hook: Callable[[str], tuple[Migrator, ...]] = lambda database: ()
        self.summary = Summary()

    def controller_info(self) -> dict[str, object]:
        """What an xdist worker needs to know of the controller's server."""
        info = {
            "pgtemplate_url": self.server if self.embedded else None,
            "pgtemplate_error": self.embedded_error,
            "pgtemplate_server": self.server_description,
        }
        return {key: value for key, value in info.items() if value is not None}

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

    def runtime(self, config: pytest.Config, database: str = DEFAULT_DATABASE) -> Runtime:
        """The runtime of one database (the default one, or an extra one), made on first use."""
        runtime = self._runtimes.get(database)
        if runtime is None:
            self.start_embedded()
            if self.embedded_error is not None:
                raise PgTemplateError(self.embedded_error)
            assert self.server is not None
            url = parse_url(self.server, self.server_source)
            runtime = Runtime(self.settings.for_database(database), url, run_id=self.run_id,
                              worker=self.worker, clone_strategy=self.clone_strategy,
                              notify=notify_terminal, seeds=self.seed_hook(database))
            self._runtimes[database] = runtime
        return runtime

    def engines_for(self, database: str) -> Engines:
        return self.engines.setdefault(database, Engines())

    def call(self, request: pytest.FixtureRequest, func: Callable[[], T]) -> T:
        """Run ``func``; a PgTemplateError fails the test with our message alone (the
        driver's traceback stays chained, shown with --tb=long)."""
        try:
            return func()
        except PgTemplateError as exc:
            if not any(r.timings.template for r in self._runtimes.values()) or exc.setting == "url":
                # No database could be set up: later tests would fail the same way.
                request.session.shouldstop = "pytest-pgtemplate could not set up the database"
            if request.config.option.tbstyle == "long":
                raise
            raise pytest.fail.Exception(str(exc), pytrace=False) from None

    def current_databases(self) -> list[str]:
        return [r.current_name for r in self._runtimes.values() if r.current_name is not None]

    def finish(self) -> list[str]:
        """Tear down; returns the URLs of kept databases."""
        for engines in self.engines.values():
            engines.close()
        kept_urls: list[str] = []
        for runtime in self._runtimes.values():
            self.summary.merge(worker_payload(runtime))
            kept, problems = runtime.close()
            for problem in problems:
                notify_terminal(f"cleanup of {runtime.current_name or 'the worker database'} incomplete: "
                                f"{problem} (the next run's sweep drops what is left)")
            if kept is not None:
                kept_urls.append(kept.url.set(drivername="postgresql").render_as_string(hide_password=True))
        return kept_urls


def _run_once(coro: Coroutine[Any, Any, T]) -> T:
    loop = LoopThread()
    try:
        return loop.run(coro)
    finally:
        loop.close()


def has_migrator(settings: Settings) -> bool:
    return any((settings.metadata, settings.migrate, settings.alembic_ini, settings.env,
                settings.databases)) or (settings.rootdir / "alembic.ini").is_file()


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


# The xdist controller tells its workers, through their inherited environment, what they
# need before their conftest.py files are imported (workerinput arrives only later).
CONTROLLER_ENV = "PYTEST_PGTEMPLATE_CONTROLLER"


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config) -> None:
    """Before any conftest.py is imported: settings, and each database's environment
    variable (``pgtemplate_env``), so an app whose engine is built at import time, even
    when a conftest.py imports it, uses the worker database."""
    ns = early_config.known_args_namespace
    if getattr(ns, "pgt_list", False) or getattr(ns, "pgt_gc", False):
        return
    state = _new_state(early_config, _resolve(early_config, early=True))
    early_config.stash[STATE_KEY] = state
    _point_env_vars(early_config, state)


def _new_state(config: pytest.Config, settings: Settings) -> PluginState:
    """This process's state; who it is (run, worker) from xdist's workerinput, or before
    that exists, from the environment its controller gave it."""
    workerinput = getattr(config, "workerinput", None)
    if workerinput is None:
        workerinput = _from_controller()
    if workerinput is not None:
        run_id, worker = str(workerinput["testrunuid"]), str(workerinput["workerid"])
    else:
        run_id, worker = uuid.uuid4().hex, "main"
    state = PluginState(settings, run_id=run_id, worker=worker, workerinput=workerinput)
    state.seed_hook = functools.partial(_seed_hook, config)
    return state


def _from_controller() -> dict[str, object] | None:
    """In an xdist worker (a child of the controller that set CONTROLLER_ENV): what its
    workerinput will say.  Other processes inheriting the variable are not its workers."""
    try:
        info = json.loads(os.environ.get(CONTROLLER_ENV, ""))
    except ValueError:
        return None
    is_worker = "PYTEST_XDIST_WORKER" in os.environ
    if not isinstance(info, dict) or info.get("pid") != os.getppid() or not is_worker:
        return None
    info["testrunuid"] = os.environ.get("PYTEST_XDIST_TESTRUNUID", "")
    info["workerid"] = os.environ["PYTEST_XDIST_WORKER"]
    return info


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "pgtemplate(reset=...): per-test reset strategy (" + "|".join(RESET_STRATEGIES) + ")",
    )
    state = config.stash.get(STATE_KEY, None)
    workerinput = getattr(config, "workerinput", None)
    if state is None or (workerinput is not None and (state.run_id, state.worker) != (
            str(workerinput["testrunuid"]), str(workerinput["workerid"]))):
        state = _new_state(config, _resolve(config))  # loaded by -p, or a mismatch
        config.stash[STATE_KEY] = state
    _register_fixtures(config, state.settings)
    is_controller = workerinput is None and getattr(config.option, "dist", "no") != "no"
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(XdistHooks(state), "pgtemplate-xdist")
        if is_controller:
            _tell_workers(state)
    _point_env_vars(config, state)  # again: the same values, unless the early hook did not run
    if not is_controller:
        _call_worker_url_hook(config, state)


def _tell_workers(state: PluginState) -> None:
    """Controller, before xdist starts its workers: start the embedded server (if the
    project can build a database at all) and leave its URL in the workers' environment."""
    if has_migrator(state.settings):
        state.start_embedded()
    os.environ[CONTROLLER_ENV] = json.dumps({"pid": os.getpid(), **state.controller_info()})


def _register_fixtures(config: pytest.Config, settings: Settings) -> None:
    """Every database's fixtures, as plugins (pytest finds fixtures in registered plugins)."""
    namespaces = {"pgtemplate-fixtures": common_fixtures()}
    for database in settings.database_names:
        namespaces[f"pgtemplate-fixtures-{database}"] = fixtures_for(database)
    for name, fixtures in namespaces.items():
        if config.pluginmanager.get_plugin(name) is None:
            module = types.ModuleType(name.replace("-", "_"))
            module.__dict__.update(fixtures)
            config.pluginmanager.register(module, name)


def _seed_hook(config: pytest.Config, database: str) -> tuple[Migrator, ...]:
    """The ``pytest_pgtemplate_seed`` implementations, as a seed step of ``database``."""
    impls = config.hook.pytest_pgtemplate_seed.get_hookimpls()
    if not impls:
        return ()

    def call(url: URL, sync_url: URL) -> list[object]:
        results: list[object] = config.hook.pytest_pgtemplate_seed(
            url=url, sync_url=sync_url, config=config, database=database)
        return results

    return (HookSeed(call, tuple(impl.function for impl in impls)),)


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    from . import hooks

    pluginmanager.add_hookspecs(hooks)


def _point_env_vars(config: pytest.Config, state: PluginState) -> None:
    """Each database's ``pgtemplate_env`` variable: its worker database's URL in this
    process (in the xdist controller, a placeholder no test uses).  Such databases are set
    up and reset for every test, asked for or not."""
    for database in state.settings.database_names:
        env = state.settings.for_database(database).env
        if env is not None:
            point_env(env, _planned_url(config, state, database))
            if database not in state.app_databases:
                state.app_databases.append(database)


def _call_worker_url_hook(config: pytest.Config, state: PluginState) -> None:
    """After conftest.py files are loaded, before test modules are imported."""
    if not config.hook.pytest_pgtemplate_worker_url.get_hookimpls():
        return
    for database in state.settings.database_names:
        url = _planned_url(config, state, database)
        config.hook.pytest_pgtemplate_worker_url(url=url, config=config, database=database)
        if database not in state.app_databases:
            state.app_databases.append(database)


def _planned_url(config: pytest.Config, state: PluginState, database: str) -> URL:
    try:
        return state.runtime(config, database).planned_database().set(drivername="postgresql+asyncpg")
    except PgTemplateError as exc:
        raise pytest.UsageError(str(exc)) from None


def _resolve(config: pytest.Config, *, early: bool = False) -> Settings:
    """The settings; ``early``: before the command line is fully parsed (our own options
    are known by then)."""
    ns = config.known_args_namespace if early else config.option
    try:
        return resolve(
            cli={opt.dest: getattr(ns, opt.dest, None) for opt in OPTIONS},
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
    if state is None or getattr(config, "workerinput", None) is not None:
        return []
    s = state.settings
    if has_migrator(s):
        state.start_embedded()  # a run that builds databases needs it anyway
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
        s.describe(name) for name in ("reset", "prefix") )]
    if has_migrator(s):
        lines.extend(_template_lines(state))
    if config.option.verbose > 0:
        lines.append("pgtemplate: " + ", ".join(
            s.describe(opt.name) for opt in OPTIONS if opt.name not in ("url", "reset", "prefix")))
    return lines


def _template_lines(state: PluginState) -> list[str]:
    """Per database: its template, and whether this run reuses it or builds it."""
    if state.server is None:
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
        return _run_once(check())
    except PgTemplateError as exc:
        first = str(exc).split(". ")[0].removeprefix("pytest-pgtemplate: ")
        return [f"pgtemplate: template not checked ({first}); the first test that needs it says more"]


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
    state = item.config.stash.get(STATE_KEY, None)
    if report.failed and state is not None:
        used = set(getattr(item, "fixturenames", ()))
        names = [fixture_name("_pgt_database", d) for d in state.settings.database_names]
        if used.intersection(names):
            for db in state.current_databases():
                report.sections.append(("pytest-pgtemplate", f"worker database: {db}"))
    return report


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_fixture_setup(fixturedef: pytest.FixtureDef[Any], request: pytest.FixtureRequest) -> Generator[
        None, object, object]:
    """A test run by anyio's plugin gets our async fixtures run by anyio, on its loop:
    pytest-asyncio (strict mode) leaves them alone when they are not marked as its own."""
    twin = ANYIO_TWINS.get(fixturedef.argname)
    if twin is None or "anyio_backend" not in request.fixturenames:
        return (yield)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fixturedef, "func", twin)
        return (yield)
