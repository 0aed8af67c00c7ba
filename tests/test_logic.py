"""Logic modules driven directly, without pytest glue, against the real server."""

from __future__ import annotations

import ast
import asyncio
import os
import re
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
import pytest_asyncio

from conftest import SERVER_URL
from pytest_pgtemplate import fingerprint, naming, reset, settings
from pytest_pgtemplate.admin import Admin, run_lock
from pytest_pgtemplate.db import InlineLoop, connect, parse_url
from pytest_pgtemplate.errors import ConfigError, PgTemplateError

SRC = Path(__file__).parent.parent / "src" / "pytest_pgtemplate"


# -- settings ---------------------------------------------------------------


def resolve(cli=None, env=None, ini=None) -> settings.Settings:
    return settings.resolve(cli=cli or {}, env=env or {}, ini=ini or {}, rootdir=Path("/proj"))


def test_cli_beats_env_beats_ini_beats_default_and_sources_are_kept() -> None:
    s = resolve(
        cli={"pgt_reset": "none"},
        env={"PGTEMPLATE_RESET": "truncate", "PGTEMPLATE_PREFIX": "envp"},
        ini={"pgtemplate_reset": "truncate", "pgtemplate_prefix": "inip", "pgtemplate_keep": "yes"},
    )
    assert (s.reset, s.source("reset")) == ("none", "--pgt-reset")
    assert (s.prefix, s.source("prefix")) == ("envp", "PGTEMPLATE_PREFIX")
    assert (s.keep, s.source("keep")) == (True, "pgtemplate_keep")
    assert (s.rebuild, s.source("rebuild")) == (False, "default")


def test_relative_alembic_ini_is_relative_to_rootdir() -> None:
    assert resolve(ini={"pgtemplate_alembic_ini": "db/alembic.ini"}).alembic_ini == Path(
        "/proj/db/alembic.ini"
    )


def test_bad_values_name_the_option_and_every_spelling() -> None:
    with pytest.raises(ConfigError, match=(
        r"invalid value 'maybe' for keep \(from PGTEMPLATE_KEEP\): expected one of 1/0, true/false, "
        r"yes/no, on/off\. Set --pgt-keep / PGTEMPLATE_KEEP / pgtemplate_keep to a valid value\."
    )):
        resolve(env={"PGTEMPLATE_KEEP": "maybe"})
    with pytest.raises(ConfigError, match=r"invalid value '-1' for timeout"):
        resolve(cli={"pgt_timeout": "-1"})


@pytest.mark.parametrize("prefix", ["Upper", "with'quote", "x" * 17, "1abc", "", 'a"b'])
def test_unsafe_prefixes_are_refused(prefix: str) -> None:
    with pytest.raises(ConfigError, match="invalid database name prefix"):
        resolve(cli={"pgt_prefix": prefix} if prefix else {}, ini={"pgtemplate_prefix": "Bad"})


def test_extra_databases_parse_into_their_own_settings() -> None:
    s = resolve(
        cli={"pgt_reset": "rollback"},
        ini={"pgtemplate_alembic_ini": "main.ini", "pgtemplate_seed": "app:seed",
             "pgtemplate_databases": "\n  analytics alembic_ini=an/alembic.ini env=AN_URL  # comment\n"
                                     "\n  audit metadata=app.audit:Base.metadata reset=clone seed=app:s2\n"},
    )
    assert s.database_names == ("default", "analytics", "audit")
    analytics = s.for_database("analytics")
    assert (analytics.alembic_ini, analytics.env, analytics.reset) == (
        Path("/proj/an/alembic.ini"), "AN_URL", "rollback")
    assert analytics.seed is None  # the default database's migrator keys are not inherited
    assert analytics.source("alembic_ini") == "pgtemplate_databases (analytics)"
    assert analytics.source("reset") == "--pgt-reset"
    audit = s.for_database("audit")
    assert (audit.metadata, audit.reset, audit.seed, audit.alembic_ini) == (
        "app.audit:Base.metadata", "clone", "app:s2", None)
    assert (audit.prefix, audit.database) == (s.prefix, "audit")
    assert s.for_database("default") is s
    # The CLI / environment spelling separates databases with ';'.
    assert resolve(env={"PGTEMPLATE_DATABASES": "a migrate=m:f; b migrate=m:g"}).database_names == (
        "default", "a", "b")


@pytest.mark.parametrize(("spec", "message"), [
    ("Analytics migrate=m:f", "database name 'Analytics': use 1-16 lowercase"),
    ("default migrate=m:f", "database name 'default'"),
    ("a migrate=m:f;a migrate=m:g", "database 'a' is declared twice"),
    ("a env=X", "database 'a' needs one of alembic_ini=, metadata= or migrate= to build its "
                "template (it sets none)"),
    ("a migrate=m:f metadata=m:md", "database 'a' needs one of alembic_ini=, metadata= or migrate= "
                                    "to build its template (it sets metadata, migrate)"),
    ("a migrate=m:f prefix=x", "database 'a': 'prefix=x' is not key=value with a key among alembic_ini, "),
    ("a migrate=m:f reset=sometimes", "database 'a': reset='sometimes': expected one of truncate"),
    ("sync migrate=m:f", "database 'sync': its fixture pg_sync_url would be database 'default''s too"),
    ("a migrate=m:f; a_sync migrate=m:g", "database 'a_sync': its fixture pg_a_sync_url would be "
                                          "database 'a''s too"),
    ("a migrate=m:f env=X; b migrate=m:g env=X", "databases 'a' and 'b' both set env=X"),
])
def test_bad_database_declarations_say_what_is_wrong(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=r"invalid value .* for databases \(from PGTEMPLATE_DATABASES\): "
                       + re.escape(message)):
        resolve(env={"PGTEMPLATE_DATABASES": spec})
    with pytest.raises(ConfigError, match=re.escape(
            "database 'a' (from pgtemplate_databases) and the default database (from PGTEMPLATE_ENV) "
            "both set the environment variable DATABASE_URL; give each its own.")):
        resolve(env={"PGTEMPLATE_ENV": "DATABASE_URL"},
                ini={"pgtemplate_databases": "a migrate=m:f env=DATABASE_URL"})


def test_env_setting_takes_an_optional_scheme_or_parts() -> None:
    from pytest_pgtemplate.appenv import EnvEntry, app_url, parse_env

    assert resolve(env={"PGTEMPLATE_ENV": " DB_URL=postgresql+psycopg2 "}).env == "DB_URL=postgresql+psycopg2"
    assert parse_env("DB_URL=postgresql+psycopg2") == [EnvEntry("DB_URL", scheme="postgresql+psycopg2")]
    assert parse_env("DB_URL") == [EnvEntry("DB_URL")]
    url = parse_url("postgresql://u:pw@h:5/db", "test")
    assert app_url(url, "postgres://old@x/y") == "postgres://u:pw@h:5/db"  # the variable's own
    assert app_url(url, "postgres://old@x/y", "postgresql+psycopg2") == "postgresql+psycopg2://u:pw@h:5/db"
    assert app_url(url, None) == "postgresql+asyncpg://u:pw@h:5/db"
    assert resolve(env={"PGTEMPLATE_ENV": "DB_URL = postgresql"}).env == "DB_URL=postgresql"
    # Parts: one variable each, several per setting, comma or line separated.
    spec = resolve(env={"PGTEMPLATE_ENV": "H={host},\n P={port}, DSN=postgresql://{user}@{host}/{database}"}).env
    assert spec == "H={host}, P={port}, DSN=postgresql://{user}@{host}/{database}"
    values = {e.name: e.value(url, None) for e in parse_env(str(spec))}
    assert values == {"H": "h", "P": "5", "DSN": "postgresql://u@h/db"}
    trust = parse_url("postgresql://postgres@h/db", "test")
    assert parse_env("PW={password}")[0].value(trust, "old") == ""  # no password: empty, not 'None'
    for bad, why in (("DB-URL", "is not an environment variable name"),
                     ("DB_URL=mysql", "after '=' give a PostgreSQL URL scheme"),
                     ("DB_URL=postgresql://", "after '=' give a PostgreSQL URL scheme"),
                     ("DB_URL=postgresqlx", "after '=' give a PostgreSQL URL scheme"),
                     ("DB_NAME={name}", "unknown field {name}"),
                     ("A={host}, A={port}", "A is named twice")):
        with pytest.raises(ConfigError, match=why):
            resolve(env={"PGTEMPLATE_ENV": bad})


def test_a_worker_takes_its_controllers_word_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from pytest_pgtemplate import startup

    monkeypatch.setenv(startup.CONTROLLER_ENV, f'{{"pid": {os.getppid()}, "pgtemplate_url": "u"}}')
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw3")
    monkeypatch.setenv("PYTEST_XDIST_TESTRUNUID", "run1")
    assert startup._from_controller() == {
        "pid": os.getppid(), "pgtemplate_url": "u", "testrunuid": "run1", "workerid": "gw3"}
    # A pytest run inside this process (pytester) afterwards is not the worker.
    assert startup._from_controller() is None
    # Nor is a child of another process that inherited the variable.
    monkeypatch.setenv(startup.CONTROLLER_ENV, f'{{"pid": {os.getppid() + 1}}}')
    assert startup._from_controller() is None


# -- naming -----------------------------------------------------------------


def test_ident_quotes_and_refuses_names_postgres_would_truncate() -> None:
    assert naming.ident('we"ird') == '"we""ird"'
    assert naming.sql("DROP DATABASE {}", "a b") == 'DROP DATABASE "a b"'
    with pytest.raises(ConfigError, match="longer than 63 bytes"):
        naming.ident("é" * 32)


def test_longest_names_fit_and_differ() -> None:
    fp = "f" * 64
    prefix = "p" * 16
    names = {
        naming.template_name(prefix, fp),
        naming.build_name(prefix, fp, uuid.uuid4().hex),
        naming.worker_name(prefix, uuid.uuid4().hex, "gw123456789"),
        naming.worker_name(prefix, uuid.uuid4().hex, "gw123456789", "x" * 16),
        naming.clone_name(prefix, uuid.uuid4().hex, "gw123456789", 99999, "x" * 16),
        naming.clone_name(prefix, uuid.uuid4().hex, "gw123456789", 10**9, "x" * 16),
    }
    assert len(names) == 6
    assert all(len(n.encode()) <= 63 for n in names)
    assert naming.template_name("a", "1" * 20 + "x") != naming.template_name("a", "1" * 19 + "y")


def test_marker_round_trip_and_foreign_comments() -> None:
    marker = naming.Marker.new(naming.TEMPLATE, "abc", "run1", "pgt")
    assert naming.Marker.parse(marker.text()) == marker
    assert naming.Marker.parse("pytest-pgtemplate {not json") is None
    assert naming.Marker.parse("created by hand") is None
    assert naming.Marker.parse(None) is None


# -- fingerprint ------------------------------------------------------------


def test_fingerprint_changes_with_bytes_and_renames_not_with_location(tmp_path: Path) -> None:
    def fp(root: Path) -> str:
        return fingerprint.compute(fingerprint.tree_inputs(root, "scripts"), server_major=15)

    a = tmp_path / "a"
    (a / "versions").mkdir(parents=True)
    (a / "versions" / "0001.py").write_text("x = 1\n")
    (a / "versions" / "__pycache__").mkdir()
    (a / "versions" / "__pycache__" / "0001.cpython-311.pyc").write_bytes(b"junk")
    base = fp(a)
    b = tmp_path / "elsewhere" / "b"
    b.parent.mkdir()
    (a).rename(b)
    assert fp(b) == base  # moving the project keeps the fingerprint
    (b / "versions" / "__pycache__" / "0001.cpython-311.pyc").write_bytes(b"other junk")
    assert fp(b) == base
    (b / "versions" / "0001.py").rename(b / "versions" / "0001_renamed.py")
    assert fp(b) != base
    inputs = fingerprint.tree_inputs(b, "scripts")
    assert fingerprint.compute(inputs, server_major=15) != fingerprint.compute(inputs, server_major=16)


def test_alembic_fingerprint_does_not_depend_on_where_the_project_lives(tmp_path: Path) -> None:
    from pytest_pgtemplate.migrate import AlembicMigrator

    def project(root: Path) -> str:
        (root / "migrations" / "versions").mkdir(parents=True)
        (root / "migrations" / "env.py").write_text("pass\n")
        (root / "migrations" / "versions" / "0001.py").write_text("revision = '0001'\ndown_revision = None\n")
        (root / "alembic.ini").write_text(  # alembic init's own way of writing it
            "[alembic]\nscript_location = %(here)s/migrations\npath_separator = os\n"
            "version_locations = %(here)s/migrations/versions\n")
        inputs = AlembicMigrator(root / "alembic.ini").inputs()
        return fingerprint.compute(inputs, server_major=15)

    assert project(tmp_path / "checkout-1") == project(tmp_path / "ci" / "checkout-2")


@pytest.mark.parametrize("location", ["%(here)s/migrations", "migrations", "./sub/../migrations", "ABS"])
def test_alembic_script_dir_is_found_as_alembic_finds_it_without_importing_it(
        tmp_path: Path, location: str) -> None:
    """The fingerprint of a warm run reads alembic.ini itself (Alembic's import is ~0.15 s
    per process); where it resolves the migrations must be where Alembic does."""
    (tmp_path / "migrations" / "versions").mkdir(parents=True)
    (tmp_path / "sub").mkdir()
    (tmp_path / "migrations" / "env.py").write_text("pass\n")
    location = str(tmp_path / "migrations") if location == "ABS" else location
    (tmp_path / "alembic.ini").write_text(f"[alembic]\nscript_location = {location}\n")
    code = (
        "import sys\nfrom pathlib import Path\nfrom pytest_pgtemplate.migrate import AlembicMigrator\n"
        f"m = AlembicMigrator(Path({str(tmp_path / 'alembic.ini')!r}))\n"
        "found = m.script_dir(); m.inputs()\n"
        "assert not any(name.split('.')[0] == 'alembic' for name in sys.modules), 'alembic imported'\n"
        "print(found.resolve())\n"
        "print(Path(m._script(m._config()).dir).resolve())\n"
    )
    # A fresh interpreter in another directory: Alembic itself resolves paths against the cwd.
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=tmp_path / "sub").stdout.split("\n")
    assert out[0] == out[1] == str((tmp_path / "migrations").resolve())


def test_alembic_script_dir_as_a_package_resource_is_left_to_alembic(tmp_path: Path) -> None:
    from pytest_pgtemplate.migrate import AlembicMigrator

    pkg = tmp_path / "scratchpkg_pgt"
    (pkg / "migrations" / "versions").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "migrations" / "env.py").write_text("pass\n")
    (tmp_path / "alembic.ini").write_text("[alembic]\nscript_location = scratchpkg_pgt:migrations\n")
    sys.path.insert(0, str(tmp_path))
    try:
        found = AlembicMigrator(tmp_path / "alembic.ini").script_dir()
        assert found.resolve() == (pkg / "migrations").resolve()
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("scratchpkg_pgt", None)


# -- reset ------------------------------------------------------------------


def test_fk_levels_put_parents_first_and_survive_cycles() -> None:
    levels = reset.fk_levels([(2, 1), (3, 2), (3, 1), (4, 5), (5, 4)])
    assert levels[2] == 1
    assert levels[3] == 2
    assert {levels[4], levels[5]} <= {0, 1}


@pytest_asyncio.fixture
async def scratch_db() -> AsyncIterator[asyncpg.Connection]:
    name = "scratch_pgt_" + uuid.uuid4().hex[:8]
    server = parse_url(SERVER_URL, "test")
    dsn = server.render_as_string(hide_password=False)
    admin = await asyncpg.connect(dsn)
    await admin.execute(naming.sql("CREATE DATABASE {}", name))
    conn = await asyncpg.connect(server.set(database=name).render_as_string(hide_password=False))
    try:
        yield conn
    finally:
        await conn.close()
        await admin.execute(naming.sql("DROP DATABASE {} WITH (FORCE)", name))
        await admin.close()


SCHEMA = """
CREATE TABLE parent (id serial PRIMARY KEY, label text);
CREATE TABLE child (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                    parent_id int REFERENCES parent(id), doubled int GENERATED ALWAYS AS (id * 2) STORED);
INSERT INTO parent (label) VALUES ('ref1'), ('ref2');
INSERT INTO child (parent_id) VALUES (1);
CREATE SCHEMA tenant;
CREATE TABLE tenant.note (id serial PRIMARY KEY, body text);
CREATE FUNCTION audit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN INSERT INTO tenant.note (body) VALUES ('audit'); RETURN NEW; END $$;
CREATE TRIGGER parent_audit AFTER INSERT ON parent FOR EACH ROW EXECUTE FUNCTION audit();
""" + "".join(f"CREATE TABLE untouched_{i} (id serial PRIMARY KEY);\n" for i in range(20))


async def snapshot(conn: asyncpg.Connection) -> tuple[object, ...]:
    return tuple(await conn.fetchrow(
        "SELECT (SELECT string_agg(id || label, ',' ORDER BY id) FROM parent),"
        " (SELECT string_agg(id || ':' || parent_id || ':' || doubled, ',' ORDER BY id) FROM child),"
        " (SELECT count(*) FROM tenant.note), nextval('parent_id_seq'), nextval('tenant.note_id_seq')"
    ))


@pytest.mark.asyncio
@pytest.mark.parametrize("replica", [True, False], ids=["replica", "fk-closure"])
async def test_reset_restores_template_rows_and_sequences_touching_only_dirty_tables(
    scratch_db: asyncpg.Connection, replica: bool
) -> None:
    conn = scratch_db
    await conn.execute(SCHEMA)
    assert await reset.install(conn) == 23
    before = await snapshot(conn)  # advances the two sequences, marks nothing dirty
    await conn.execute("SELECT setval('parent_id_seq', 2), setval('tenant.note_id_seq', 1, false)")
    await conn.execute("INSERT INTO parent (label) VALUES ('new')")  # trigger writes tenant.note
    await conn.execute("UPDATE parent SET label = 'changed' WHERE id = 1")
    await conn.execute("DELETE FROM child")
    await conn.execute("INSERT INTO child (parent_id) VALUES (3)")
    dirty = {r[0] for r in await conn.fetch("SELECT relid::regclass::text FROM _pgtemplate.dirty")}
    assert dirty == {"parent", "child", "tenant.note"}

    resetter = reset.TruncateReset(conn, "scratch", timeout=2)
    if not replica:
        resetter.replica = False
    await resetter.reset()
    assert await snapshot(conn) == before
    assert await conn.fetchval("SELECT count(*) FROM _pgtemplate.dirty") == 0
    await resetter.reset()  # a clean database: nothing to do
    assert resetter.stats.tables == 3
    assert len(resetter.stats.seconds) == 2


@pytest.mark.asyncio
async def test_reset_terminates_a_session_left_running_and_keeps_idle_ones(
    scratch_db: asyncpg.Connection,
) -> None:
    conn = scratch_db
    await conn.execute("CREATE TABLE t (id int)")
    await reset.install(conn)
    await conn.execute("INSERT INTO t VALUES (1)")
    dsn = parse_url(SERVER_URL, "test").set(database=await conn.fetchval("SELECT current_database()"))
    idle = await asyncpg.connect(dsn.render_as_string(hide_password=False))
    busy = await asyncpg.connect(dsn.render_as_string(hide_password=False))
    try:
        blocker = asyncio.ensure_future(
            busy.execute("BEGIN; LOCK TABLE t IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep(30)")
        )
        await asyncio.sleep(0.3)
        resetter = reset.TruncateReset(conn, "scratch", timeout=5)
        await resetter.reset()
        assert resetter.stats.terminated == 1
        assert await conn.fetchval("SELECT count(*) FROM t") == 0
        assert await idle.fetchval("SELECT 1") == 1  # an idle pooled connection survives
        with pytest.raises(asyncpg.exceptions.ConnectionDoesNotExistError):
            await blocker
    finally:
        idle.terminate()
        busy.terminate()


@pytest.mark.asyncio
async def test_admin_refuses_to_drop_unmarked_databases(scratch_db: asyncpg.Connection) -> None:
    name = await scratch_db.fetchval("SELECT current_database()")
    admin = await Admin.open(parse_url(SERVER_URL, "test"))
    try:
        assert await admin.drop_ours(name) is False
        assert (await admin.info(name)) is not None
    finally:
        await admin.close()


@pytest.mark.asyncio
async def test_sweep_spares_a_database_its_owner_kept_after_the_sweep_listed_it() -> None:
    """The owner's run ends between the sweep's listing and its lock: it marked its worker
    database kept, so the sweep, which saw a dead run's worker database, must not drop it."""
    from pytest_pgtemplate.sweep import _drop_if_unused

    name = "scratch_pgt_" + uuid.uuid4().hex[:8]
    run = uuid.uuid4().hex
    admin = await Admin.open(parse_url(SERVER_URL, "test"))
    try:
        await admin.create(name, naming.Marker.new(naming.WORKER, "f" * 12, run, "scratch"))
        [listed] = [row for row in await admin.databases() if row.name == name]
        await admin.mark(name, naming.Marker.new(naming.KEPT, "f" * 12, run, "scratch"))
        assert await _drop_if_unused(admin, listed, run_lock(run)) is False
        assert await admin.info(name) is not None
        [again] = [row for row in await admin.databases() if row.name == name]
        assert await _drop_if_unused(admin, again, run_lock(run)) is True
        assert await admin.info(name) is None
    finally:
        await admin.conn.execute(naming.sql("DROP DATABASE IF EXISTS {}", name))
        await admin.close()


@pytest.mark.asyncio
async def test_a_spare_is_taken_once_and_not_while_anyone_is_connected_to_it() -> None:
    from pytest_pgtemplate.sweep import sweep

    prefix = "scratch_" + uuid.uuid4().hex[:6]
    spare, taker, other = naming.spare_name(prefix, "f" * 12, "a" * 8), f"{prefix}_w_x", f"{prefix}_w_y"
    run = uuid.uuid4().hex
    admin = await Admin.open(parse_url(SERVER_URL, "test"))
    owner = await Admin.open(parse_url(SERVER_URL, "test"))  # keeps other runs' sweeps away meanwhile
    await owner.hold_shared(run_lock(run))
    try:
        await admin.create(spare, naming.Marker.new(naming.WORKER, "f" * 12, run, prefix))
        await admin.mark(spare, naming.Marker.new(naming.SPARE, "f" * 12, run, prefix, source="t@1"))
        worker = naming.Marker.new(naming.WORKER, "f" * 12, "run2", prefix)
        assert await admin.take_spare("t@2", prefix, taker, worker) is None  # another build's
        still_there = await connect(parse_url(SERVER_URL, "test"), spare)
        try:
            assert await admin.take_spare("t@1", prefix, taker, worker) is None  # in use: passed over
        finally:
            await still_there.close()
        taken = await admin.take_spare("t@1", prefix, taker, worker)
        assert taken is not None
        assert (taken.kind, taken.source) == (naming.SPARE, "t@1")
        assert await admin.info(spare) is None
        info = await admin.info(taker)
        assert info is not None
        assert info.marker == worker
        assert await admin.take_spare("t@1", prefix, other, worker) is None  # taken: nothing left
        # A spare of a template build that is gone is swept (no template "t" exists here).
        await admin.park(taker, spare, naming.Marker.new(naming.SPARE, "f" * 12, run, prefix, source="t@1"))
        await owner.close()
        assert spare in (await sweep(admin, prefix=prefix, keep_templates=2, include_kept=False)).dropped
        assert await admin.info(spare) is None
    finally:
        for name in (spare, taker, other):
            await admin.conn.execute(naming.sql("DROP DATABASE IF EXISTS {}", name))
        await admin.close()
        if not owner.conn.is_closed():
            await owner.close()


# -- code rules -------------------------------------------------------------


# -- the private loop ------------------------------------------------------------


def test_inline_loop_runs_on_the_callers_thread_or_a_helper_inside_a_running_loop() -> None:
    import threading

    loop = InlineLoop()
    try:
        async def where() -> str:
            return threading.current_thread().name

        assert loop.run(where()) == threading.current_thread().name

        async def inside_a_running_loop() -> str:  # as from a user's async fixture
            return loop.run(where())

        assert asyncio.run(inside_a_running_loop()) == "pytest-pgtemplate-db"
        with pytest.raises(TimeoutError):
            loop.run(asyncio.sleep(5), timeout=0.05)
        with pytest.raises(ZeroDivisionError):
            loop.run(_divide())
        assert loop.run(where())  # still usable after errors
    finally:
        loop.close()


async def _divide() -> float:
    return 1 / 0


def test_ctrl_c_during_an_inline_loop_run_stops_the_work_at_an_await() -> None:
    """Ctrl-C must not raise inside the driver's protocol code (a half-read buffer crashed
    the next read): the work is cancelled where it awaits, then KeyboardInterrupt is raised."""
    import signal

    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a plain pytest run
    seen: list[str] = []

    async def interrupted() -> None:
        os.kill(os.getpid(), signal.SIGINT)  # handled before the next line of this coroutine
        seen.append("went on to its next await")
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            seen.append("cancelled there")
            raise

    loop = InlineLoop()
    try:
        with pytest.raises(KeyboardInterrupt):
            loop.run(interrupted())
        assert seen == ["went on to its next await", "cancelled there"]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert loop.run(asyncio.sleep(0, result="usable")) == "usable"
    finally:
        loop.close()
        signal.signal(signal.SIGINT, before)


def test_inline_loop_sees_a_connection_the_server_ended_while_nobody_ran_it() -> None:
    """Between calls nothing runs the loop; the next call first handles what arrived, so a
    backend ended meanwhile shows as a closed connection (as a loop run by a thread would
    have seen), not as an error in the middle of the next statement."""
    loop = InlineLoop()
    other = InlineLoop()
    url = parse_url(SERVER_URL, "test")
    try:
        victim = loop.run(connect(url, "postgres"))
        killer = other.run(connect(url, "postgres"))
        pid = victim.get_server_pid()
        assert other.run(killer.fetchval("SELECT pg_terminate_backend($1)", pid))
        for _ in range(250):  # until the backend's process is gone: its socket is closed then
            if not Path(f"/proc/{pid}").exists():
                break
            other.run(asyncio.sleep(0.02))

        async def nothing() -> None:
            return None

        loop.run(nothing())
        assert victim.is_closed()
        other.run(killer.close())
    finally:
        loop.close()
        other.close()


def _modules() -> list[tuple[Path, ast.Module]]:
    return [(p, ast.parse(p.read_text())) for p in sorted(SRC.glob("*.py"))]


def test_logic_modules_never_import_pytest() -> None:
    glue = {"plugin.py", "fixtures.py", "hooks.py", "state.py", "startup.py", "header.py"}
    for path, tree in _modules():
        if path.name in glue:
            continue
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(n.split(".")[0] in ("pytest", "_pytest", "pytest_asyncio") for n in names), (
                f"{path.name} imports pytest"
            )


def test_the_package_imports_itself_in_a_line_not_a_circle() -> None:
    """Every import between the package's modules (lazy ones inside functions and
    TYPE_CHECKING ones included) points down: no module reaches itself again."""
    names = {path.stem for path, _ in _modules()}
    below: dict[str, set[str]] = {}
    for path, tree in _modules():
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                found |= {node.module} if node.module else {a.name for a in node.names}
        below[path.stem] = found & names

    def cycle_from(start: str, at: str, trail: tuple[str, ...]) -> tuple[str, ...] | None:
        for nxt in sorted(below[at]):
            if nxt == start:
                return (*trail, nxt)
            if nxt not in trail:
                found = cycle_from(start, nxt, (*trail, nxt))
                if found:
                    return found
        return None

    cycles = [" -> ".join(c) for m in sorted(names) if (c := cycle_from(m, m, (m,)))]
    assert cycles == []


SQL_CALLS = {"execute", "fetch", "fetchrow", "fetchval", "executemany"}


def test_sql_is_never_built_with_string_formatting() -> None:
    """Names go through naming.sql(); values are bind parameters.  Any f-string, %-format
    or .format() passed to a query call is a bug."""
    offenders = []
    for path, tree in _modules():
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in SQL_CALLS and node.args):
                continue
            arg = node.args[0]
            formatted = isinstance(arg, ast.JoinedStr) or (
                isinstance(arg, ast.BinOp) and isinstance(arg.op, ast.Mod | ast.Add)
            ) or (isinstance(arg, ast.Call) and isinstance(arg.func, ast.Attribute)
                  and arg.func.attr == "format")
            if formatted:
                offenders.append(f"{path.name}:{node.lineno}")
    assert offenders == []


TRICKY_SCHEMA = """
CREATE TABLE meas (id int, v text) PARTITION BY RANGE (id);
CREATE TABLE meas_p1 PARTITION OF meas FOR VALUES FROM (0) TO (100);
CREATE TABLE meas_p2 PARTITION OF meas FOR VALUES FROM (100) TO (200);
INSERT INTO meas VALUES (1, 'one'), (150, 'one-fifty');
CREATE TABLE base (id int, v text);
CREATE TABLE derived (extra int) INHERITS (base);
INSERT INTO base VALUES (1, 'b');
INSERT INTO derived VALUES (2, 'd', 0);
CREATE TABLE counted (id serial PRIMARY KEY);
CREATE TABLE tt (id int);
CREATE TABLE tt_log (what text);
CREATE FUNCTION log_truncate() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN INSERT INTO tt_log VALUES ('truncated'); RETURN NULL; END $$;
CREATE TRIGGER tt_truncated AFTER TRUNCATE ON tt FOR EACH STATEMENT EXECUTE FUNCTION log_truncate();
CREATE MATERIALIZED VIEW mv AS SELECT count(*) AS n FROM base;
"""


async def scalars(conn: asyncpg.Connection, *queries: str) -> tuple[object, ...]:
    """One scalar subquery each, in one round trip."""
    return tuple(await conn.fetchrow("SELECT " + ", ".join(f"({q})" for q in queries)))


async def tricky_state(conn: asyncpg.Connection) -> tuple[object, ...]:
    return await scalars(
        conn, "SELECT string_agg(id || v, ',' ORDER BY id) FROM meas",
        "SELECT string_agg(id || v, ',' ORDER BY id) FROM ONLY meas_p1",
        "SELECT string_agg(id || v, ',' ORDER BY id) FROM ONLY base",
        "SELECT string_agg(id || v, ',' ORDER BY id) FROM derived",
        "SELECT last_value || ':' || is_called FROM counted_id_seq",
        "SELECT count(*) FROM tt_log", "SELECT n FROM mv",
    )


@pytest.mark.asyncio
@pytest.mark.parametrize("replica", [True, False], ids=["replica", "no-replica"])
async def test_reset_covers_partitions_inheritance_unused_sequences_truncate_triggers_matviews(
    scratch_db: asyncpg.Connection, replica: bool
) -> None:
    conn = scratch_db
    await conn.execute(TRICKY_SCHEMA)
    await reset.install(conn)
    has_event_triggers = await conn.fetchval("SELECT count(*) FROM pg_event_trigger "
                                             "WHERE evtname LIKE '\\_pgtemplate%'") == 2
    before = await tricky_state(conn)
    await conn.execute("INSERT INTO meas_p1 VALUES (7, 'direct')")  # a partition, not its root
    await conn.execute("UPDATE meas_p2 SET v = 'changed'")
    await conn.execute("UPDATE base SET v = 'changed'")  # changes derived's rows too
    await conn.execute("INSERT INTO counted VALUES (DEFAULT)")
    await conn.execute("SELECT setval('counted_id_seq', 100, false)")
    await conn.execute("INSERT INTO tt VALUES (1)")
    await conn.execute("INSERT INTO base VALUES (3, 'new')")
    await conn.execute("REFRESH MATERIALIZED VIEW mv")
    changed = await tricky_state(conn)
    # All but tt_log changed (its trigger fires on TRUNCATE: the reset must not fire it).
    assert [a != b for a, b in zip(changed, before, strict=True)] == [True] * 5 + [False, True]
    resetter = reset.TruncateReset(conn, "scratch", timeout=2)
    resetter.replica = replica
    assert await resetter.reset() is None  # no schema change reported
    after = await tricky_state(conn)
    if has_event_triggers:
        assert after == before
    else:
        assert after[:6] == before[:6]  # matview refreshes are not seen without superuser


FK_SCHEMA = """
CREATE TABLE country (code text PRIMARY KEY, name text);
INSERT INTO country VALUES ('FR', 'France'), ('DE', 'Germany');
CREATE TABLE account (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                      country text REFERENCES country ON DELETE CASCADE, name text);
INSERT INTO account (country, name) VALUES ('FR', 'seeded');
CREATE TABLE orders (id serial PRIMARY KEY, account_id int NOT NULL REFERENCES account);
CREATE TABLE node (id int PRIMARY KEY, parent int REFERENCES node);
INSERT INTO node VALUES (1, NULL), (2, 1);
CREATE TABLE reading (at int, v text) PARTITION BY RANGE (at);
CREATE TABLE reading_1 PARTITION OF reading FOR VALUES FROM (0) TO (100);
INSERT INTO reading VALUES (5, 'seeded');
"""


async def fk_state(conn: asyncpg.Connection) -> tuple[object, ...]:
    return await scalars(
        conn, "SELECT string_agg(code || name, ',' ORDER BY code) FROM country",
        "SELECT string_agg(id || country || name, ',' ORDER BY id) FROM account",
        "SELECT count(*) FROM orders",
        "SELECT string_agg(id || ':' || coalesce(parent, 0), ',' ORDER BY id) FROM node",
        "SELECT string_agg(at || v, ',') FROM reading",
        "SELECT last_value || ':' || is_called FROM account_id_seq",
        "SELECT last_value || ':' || is_called FROM orders_id_seq",
    )


@pytest.mark.asyncio
@pytest.mark.parametrize("replica", [True, False], ids=["replica", "no-replica"])
async def test_generated_reset_restores_template_rows_of_tables_referencing_a_written_one(
    scratch_db: asyncpg.Connection, replica: bool
) -> None:
    """Writing only ``country`` empties it: ``account``'s template rows reference it (and
    would cascade away), so they go and come back too.  No table here needs the general
    path, with or without the privilege to switch FK checks off."""
    conn = scratch_db
    await conn.execute(FK_SCHEMA)
    await reset.install(conn)
    before = await fk_state(conn)
    await conn.execute("UPDATE country SET name = 'changed' WHERE code = 'DE'")
    await conn.execute("INSERT INTO country VALUES ('IT', 'Italy')")
    await conn.execute("INSERT INTO account (country, name) VALUES ('IT', 'new')")
    await conn.execute("INSERT INTO orders (account_id) VALUES (1), (2)")
    await conn.execute("INSERT INTO node VALUES (3, 2)")
    await conn.execute("UPDATE reading SET v = 'changed'")
    assert all(a != b for a, b in zip(await fk_state(conn), before, strict=True))
    resetter = reset.TruncateReset(conn, "scratch", timeout=2)
    resetter.replica = replica
    await resetter.reset()
    assert await fk_state(conn) == before
    assert resetter.stats.general == 0
    # Only country written: account still comes back whole (its rows were cascaded away).
    await conn.execute("UPDATE country SET name = 'again' WHERE code = 'FR'")
    await resetter.reset()
    assert await fk_state(conn) == before
    assert resetter.stats.general == 0


@pytest.mark.asyncio
@pytest.mark.parametrize("replica", [True, False], ids=["replica", "no-replica"])
async def test_tables_the_generated_reset_cannot_handle_take_the_general_path_and_say_why(
    scratch_db: asyncpg.Connection, replica: bool
) -> None:
    conn = scratch_db
    await conn.execute(FK_SCHEMA + """
        CREATE TABLE deleted_log (n int);
        CREATE FUNCTION log_delete() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN INSERT INTO deleted_log VALUES (1); RETURN NULL; END $$;
        CREATE TABLE guarded (id int);
        CREATE TRIGGER guarded_log AFTER DELETE ON guarded FOR EACH STATEMENT EXECUTE FUNCTION log_delete();
        CREATE TABLE cascaded (country text REFERENCES country ON DELETE CASCADE);
        CREATE TRIGGER cascaded_log AFTER DELETE ON cascaded FOR EACH STATEMENT EXECUTE FUNCTION log_delete();
        CREATE TABLE region (code text PRIMARY KEY);
        INSERT INTO region VALUES ('EU');
        CREATE TABLE shop (region text REFERENCES region ON DELETE CASCADE,
                           owner text REFERENCES region ON DELETE SET NULL);
        CREATE TRIGGER shop_log AFTER DELETE OR UPDATE ON shop FOR EACH ROW EXECUTE FUNCTION log_delete();
        CREATE TABLE tree (id int PRIMARY KEY, up int REFERENCES tree ON DELETE SET NULL);
        CREATE TRIGGER tree_log AFTER UPDATE ON tree FOR EACH STATEMENT EXECUTE FUNCTION log_delete();
        CREATE TABLE flags (id int PRIMARY KEY, dirty boolean, targets int);
        INSERT INTO flags VALUES (1, false, 0);
        CREATE TABLE hen (id int PRIMARY KEY, egg int);
        CREATE TABLE egg (id int PRIMARY KEY, hen int REFERENCES hen);
        ALTER TABLE hen ADD FOREIGN KEY (egg) REFERENCES egg DEFERRABLE INITIALLY DEFERRED;
    """)
    await reset.install(conn)
    before = await fk_state(conn)
    await conn.execute("INSERT INTO orders (account_id) VALUES (1)")
    resetter = reset.TruncateReset(conn, "scratch", timeout=2)
    resetter.replica = replica
    await resetter.reset()  # orders alone: the generated statements
    assert resetter.stats.general == 0
    await conn.execute("INSERT INTO guarded VALUES (1)")
    await conn.execute("INSERT INTO orders (account_id) VALUES (1)")
    await resetter.reset()
    assert resetter.stats.general == 1
    assert await conn.fetchval("SELECT count(*) FROM guarded") == 0
    assert await conn.fetchval("SELECT count(*) FROM deleted_log") == 0  # the user's trigger never fired
    assert await fk_state(conn) == before
    await conn.execute("BEGIN; INSERT INTO hen VALUES (1, 1); INSERT INTO egg VALUES (1, 1); COMMIT")
    await resetter.reset()
    assert resetter.stats.general == 2
    assert await conn.fetchval("SELECT (SELECT count(*) FROM hen) + (SELECT count(*) FROM egg)") == 0
    # Emptying country would cascade into cascaded, whose statement trigger fires even when
    # no row matches: country takes the general path, and deleted_log stays empty.
    await conn.execute("UPDATE country SET name = 'x' WHERE code = 'FR'")
    await resetter.reset()
    assert resetter.stats.general == 3
    assert await conn.fetchval("SELECT count(*) FROM deleted_log") == 0
    assert await fk_state(conn) == before
    # Row-level triggers on a table an FK action reaches do not fire (no row of it references
    # the emptied table by then): region keeps the generated path, and deleted_log stays empty.
    await conn.execute("UPDATE region SET code = 'EU'")
    await resetter.reset()
    assert resetter.stats.general == 3
    assert await conn.fetchval("SELECT count(*) FROM deleted_log") == 0
    assert await fk_state(conn) == before
    assert await conn.fetchval("SELECT count(*) FROM region") == 1
    # A self-reference ON DELETE SET NULL runs an UPDATE on the table itself: its statement
    # trigger would fire.
    await conn.execute("INSERT INTO tree VALUES (1, NULL)")
    await resetter.reset()
    assert resetter.stats.general == 4
    assert await conn.fetchval("SELECT count(*) FROM deleted_log") == 0
    assert await conn.fetchval("SELECT count(*) FROM tree") == 0
    # Columns named like the generated function's variables do not clash with them.
    await conn.execute("UPDATE flags SET dirty = true, targets = 5")
    await resetter.reset()
    assert resetter.stats.general == 4
    assert tuple(await conn.fetchrow("SELECT dirty, targets FROM flags")) == (False, 0)
    assert resetter.general_tables == (
        "cascaded (a DELETE trigger or rule), country (its ON DELETE action on public.cascaded fires the "
        "user's statement triggers or rules), egg (a cycle of foreign keys), "
        "guarded (a DELETE trigger or rule), hen (a cycle of foreign keys), shop (a DELETE trigger or rule), "
        "tree (its ON DELETE action on public.tree fires the user's statement triggers or rules)"
    )


def test_general_tables_are_cycles_restricted_self_references_and_tables_with_a_reason() -> None:
    t = [reset.Table(rel, f"t{rel}", False, 0, None, None, "row-level security" if rel == 5 else None)
         for rel in range(1, 7)]
    edges = [(2, 1, "a"), (3, 2, "a"), (1, 3, "a"),  # 1 -> 3 -> 2 -> 1
             (4, 4, "r"), (6, 6, "a"), (6, 1, "a")]
    assert reset.general_tables(t, edges) == {
        1: "a cycle of foreign keys", 2: "a cycle of foreign keys", 3: "a cycle of foreign keys",
        4: "a self-reference ON DELETE RESTRICT", 5: "row-level security",
    }


def test_failure_notes_older_than_a_day_are_pruned(tmp_path: Path) -> None:
    import os
    import time

    from pytest_pgtemplate.template import prune_notes

    old, fresh, lock = tmp_path / "a.failed", tmp_path / "b.failed", tmp_path / "c.lock"
    for path in (old, fresh, lock):
        path.write_text("x")
    two_days_ago = time.time() - 2 * 86400
    os.utime(old, (two_days_ago, two_days_ago))
    os.utime(lock, (two_days_ago, two_days_ago))
    prune_notes(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.failed", "c.lock"]


def test_env_py_asks_for_the_shared_connection_only_in_code(tmp_path: Path) -> None:
    from pytest_pgtemplate.migrate import _parse, _reads_shared_connection

    env_py = tmp_path / "env.py"
    env_py.write_text("# we never use config.attributes here\nimport asyncio\nasyncio.run(main())\n")
    assert not _reads_shared_connection(_parse(env_py))
    env_py.write_text("connection = config.attributes.get('connection')\n")
    assert _reads_shared_connection(_parse(env_py))
    env_py.write_text("config.attributes['logger'] = None\n")  # another use of attributes
    assert not _reads_shared_connection(_parse(env_py))


def test_env_py_variables_read_not_written_are_found() -> None:
    from pytest_pgtemplate.migrate import _environment_reads

    tree = ast.parse("import os\nfrom os import environ, getenv\nA = os.environ['A']\n"
                     "B = os.getenv('B') or environ.get('C')\nD = getenv('D')\nos.environ['E'] = 'x'\n")
    assert sorted(_environment_reads(tree)) == ["A", "B", "C", "D"]  # E is written, not read


def test_a_server_too_old_is_refused_naming_version_and_setting() -> None:
    # No PostgreSQL older than 13 can be installed here: the check the admin connection runs
    # on the server's version is driven directly.
    from pytest_pgtemplate.admin import require_server

    url = parse_url("postgresql://app:secret@db.example:5433/postgres", "test")
    with pytest.raises(PgTemplateError, match=re.escape(
        "pytest-pgtemplate: the server at app@db.example:5433/postgres runs PostgreSQL 12; "
        "PostgreSQL 13 or newer is required (DROP DATABASE ... WITH (FORCE)). Point --pgt-url / "
        "PGTEMPLATE_URL / pgtemplate_url at a newer server.")) as caught:
        require_server(12, url)
    assert caught.value.setting == "url"
    require_server(13, url)


def test_paths_from_settings_are_normalised() -> None:
    settings = resolve(ini={"pgtemplate_alembic_ini": "tests/../db/alembic.ini"})
    assert settings.alembic_ini is not None
    assert settings.alembic_ini.as_posix() == "/proj/db/alembic.ini"
    assert ".." not in settings.alembic_ini.parts


# -- what the project says of itself -------------------------------------------------


def test_project_scheme_reads_dotenv_files_then_alembic_ini(tmp_path: Path) -> None:
    from pytest_pgtemplate.appenv import project_scheme

    assert project_scheme("DATABASE_URL", tmp_path) is None
    (tmp_path / "alembic.ini").write_text("[alembic]\nsqlalchemy.url = driver://user:pass@localhost/dbname\n")
    assert project_scheme("DATABASE_URL", tmp_path) is None  # alembic init's placeholder
    (tmp_path / "alembic.ini").write_text("[alembic]\nsqlalchemy.url = postgresql+psycopg2://u@h/db\n")
    assert project_scheme("DATABASE_URL", tmp_path) == "postgresql+psycopg2"
    (tmp_path / ".env.sample").write_text("OTHER_DATABASE_URL=postgresql+asyncpg://x\n"
                                          'DATABASE_URL = "postgresql://u@h/db"\n')
    assert project_scheme("DATABASE_URL", tmp_path) == "postgresql"  # the dotenv file first
    assert project_scheme("OTHER_DATABASE_URL", tmp_path) == "postgresql+asyncpg"
    (tmp_path / ".env").write_text("  export DATABASE_URL=postgresql+psycopg://u@h/db\n")
    assert project_scheme("DATABASE_URL", tmp_path) == "postgresql+psycopg"  # .env before examples


def test_driver_mismatch_follows_the_exception_chain() -> None:
    from pytest_pgtemplate.appenv import driver_mismatch

    class MissingGreenlet(Exception):
        pass

    outer = RuntimeError("the app's error")
    outer.__cause__ = MissingGreenlet("greenlet_spawn has not been called; can't call await_only() here")
    assert driver_mismatch(outer) == "sync"
    assert driver_mismatch(ValueError("The asyncio extension requires an async driver to be used. "
                                      "The loaded 'psycopg2' is not async.")) == "async"
    assert driver_mismatch(ValueError("something else")) is None


def test_script_dirs_finds_alembic_folders_below_the_rootdir_but_not_in_virtualenvs(tmp_path: Path) -> None:
    from pytest_pgtemplate.migrators import script_dirs

    def scripts(path: Path) -> Path:
        (path / "versions").mkdir(parents=True)
        (path / "env.py").write_text("")
        return path

    found = [scripts(tmp_path / "migrations"), scripts(tmp_path / "src" / "app" / "db" / "alembic")]
    scripts(tmp_path / ".venv" / "lib" / "site" / "migrations")
    (tmp_path / "venv").mkdir()
    (tmp_path / "venv" / "pyvenv.cfg").write_text("")
    scripts(tmp_path / "venv" / "pkg" / "migrations")
    scripts(tmp_path / "a" / "b" / "c" / "d" / "e")  # deeper than a project keeps them
    (tmp_path / "notes" / "env.py").parent.mkdir()
    (tmp_path / "notes" / "env.py").write_text("")  # no versions/: not Alembic's
    assert script_dirs(tmp_path) == sorted(p.resolve() for p in found)


def test_fingerprint_caveat_only_for_a_migrate_function_fingerprinted_by_its_module_alone() -> None:
    from pytest_pgtemplate.migrators import fingerprint_caveat

    alone = [("migrate:app.db:migrate", b"src"), ("migrator", b"callable:migrate")]
    assert "covers only the source of app.db:migrate's module" in fingerprint_caveat(alone)
    assert fingerprint_caveat([*alone, ("scripts-of-migrate:migrations/versions/1.py", b"")]) == ""
    assert fingerprint_caveat([*alone, ("file:db/schema.sql", b"")]) == ""
    assert fingerprint_caveat([("seed:app.db:seed", b""), ("migrator", b"callable:seed")]) == ""
    assert fingerprint_caveat([("migrator", b"alembic")]) == ""


def test_a_flask_migrate_env_py_run_by_alembic_gets_the_recipe(tmp_path: Path) -> None:
    from pytest_pgtemplate.migrate import migration_error

    exc = RuntimeError("Working outside of application context.")
    text = str(migration_error(exc, tmp_path))
    assert text.startswith("pytest-pgtemplate: migration failed while running env.py: RuntimeError: "
                           "Working outside of application context. The template was not published")
    assert ("This env.py is Flask-Migrate's: it needs the Flask app. Set pgtemplate_migrate to a function "
            "of yours that runs flask_migrate.upgrade() inside app.app_context()") in text


def test_an_unreadable_alembic_ini_names_the_setting(tmp_path: Path) -> None:
    from pytest_pgtemplate.migrate import AlembicMigrator

    (tmp_path / "alembic.ini").write_text("script_location = migrations\n")  # no section header
    expected = (r"(?s)pytest-pgtemplate: cannot read .*alembic\.ini: .*Fix it, or set "
                r"--pgt-alembic-ini / PGTEMPLATE_ALEMBIC_INI / pgtemplate_alembic_ini")
    with pytest.raises(ConfigError, match=expected):
        AlembicMigrator(tmp_path / "alembic.ini").inputs()
