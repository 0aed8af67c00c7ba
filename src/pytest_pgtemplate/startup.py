"""pytest glue at startup: settings, who this process is, and each database's URL handed
to the app (environment variables, the worker-URL hook) before its code is imported."""

from __future__ import annotations

import functools
import json
import os
import types
import uuid

import pytest
from sqlalchemy.engine import URL

from .appenv import point_env
from .errors import ConfigError, PgTemplateError
from .fixtures import common_fixtures, fixtures_for
from .migrate import Migrator
from .migrators import HookSeed
from .settings import DEFAULT_DATABASE, OPTIONS, Settings, resolve
from .state import STATE_KEY, PluginState, has_migrator


def early_setup(early_config: pytest.Config) -> None:
    """Before any conftest.py is imported: settings, and each database's environment
    variable (``pgtemplate_env``), so an app whose engine is built at import time, even
    when a conftest.py imports it, uses the worker database."""
    ns = early_config.known_args_namespace
    if any(getattr(ns, flag, False) for flag in ("pgt_list", "pgt_gc", "help", "version")):
        return
    state = new_state(early_config, resolve_settings(early_config, early=True))
    early_config.stash[STATE_KEY] = state
    point_env_vars(early_config, state)
    # Before the conftests too: the plugin's autouse fixtures are then set up before theirs
    # and torn down (the reset) after theirs, even for a conftest in the rootdir.
    register_fixtures(early_config, state.settings)


# The xdist controller tells its workers, through their inherited environment, what they
# need before their conftest.py files are imported (workerinput arrives only later).
CONTROLLER_ENV = "PYTEST_PGTEMPLATE_CONTROLLER"


def new_state(config: pytest.Config, settings: Settings) -> PluginState:
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
    # Once: a pytest run inside this worker's process (pytester) is not the worker.
    del os.environ[CONTROLLER_ENV]
    return info


def tell_workers(state: PluginState) -> None:
    """Controller, before xdist starts its workers: start the embedded server (if the
    project can build a database at all) and leave its URL in the workers' environment."""
    if has_migrator(state.settings):
        state.start_embedded()
    os.environ[CONTROLLER_ENV] = json.dumps({"pid": os.getpid(), **state.controller_info()})


def register_fixtures(config: pytest.Config, settings: Settings) -> None:
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
    """The ``pytest_pgtemplate_seed`` implementations, as a seed step of ``database``
    (asked for when the template is built: conftest.py files are loaded by then)."""
    impls = config.hook.pytest_pgtemplate_seed.get_hookimpls()
    if not impls:
        return ()
    ordered = tuple((impl.function, tuple(impl.argnames)) for impl in reversed(impls))
    return (HookSeed(ordered, database, {"config": config}),)


def point_env_vars(config: pytest.Config, state: PluginState) -> None:
    """Each database's ``pgtemplate_env`` variable: its worker database's URL in this
    process (in the xdist controller, a placeholder no test uses).  Such databases are set
    up and reset for every test, asked for or not."""
    for database in state.settings.database_names:
        env = state.settings.for_database(database).env
        if env is not None:
            point_env(env, _planned_url(config, state, database), state.settings.rootdir)
            _found_by_app(config, state, database)


def call_worker_url_hook(config: pytest.Config, state: PluginState) -> None:
    """After conftest.py files are loaded, before test modules are imported."""
    if not config.hook.pytest_pgtemplate_worker_url.get_hookimpls():
        return
    for database in state.settings.database_names:
        url = _planned_url(config, state, database)
        answers = config.hook.pytest_pgtemplate_worker_url(url=url, config=config, database=database)
        # The app found this database through the hook: an implementation said True, or
        # (the default database; hooks written for one database return nothing) none said False.
        claimed = True in answers or (database == DEFAULT_DATABASE and False not in answers)
        if claimed:
            _found_by_app(config, state, database)


def _found_by_app(config: pytest.Config, state: PluginState, database: str) -> None:
    state.runtime(config, database).app_found = True


def _planned_url(config: pytest.Config, state: PluginState, database: str) -> URL:
    try:
        return state.runtime(config, database).planned_database()
    except PgTemplateError as exc:
        raise pytest.UsageError(str(exc)) from None


def resolve_settings(config: pytest.Config, *, early: bool = False) -> Settings:
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
