"""What the template is built from, whatever the migrator: editing it rebuilds the template."""

from __future__ import annotations

import pytest

from conftest import ISOLATION_SUITE, Project, render_revision

# A migrate function that runs Alembic itself, with an alembic.ini it names.
MIGRATE_WITH_ALEMBIC = '''
from alembic import command
from alembic.config import Config


def migrate(url):
    cfg = Config("db/alembic.ini")
    cfg.set_main_option("script_location", "db/migrations")
    cfg.set_main_option("sqlalchemy.url", url.set(drivername="postgresql+asyncpg")
                        .render_as_string(hide_password=False))
    command.upgrade(cfg, "head")
'''


def test_editing_a_revision_behind_a_migrate_function_rebuilds_the_template(project: Project) -> None:
    path = project.pytester.path
    (path / "db").mkdir()
    (path / "alembic.ini").rename(path / "db" / "alembic.ini")
    (path / "migrations").rename(path / "db" / "migrations")
    (path / "dbsetup.py").write_text(MIGRATE_WITH_ALEMBIC)
    project.pytester.makepyfile(test_inner=ISOLATION_SUITE)
    run = ("-p", "no:xdist", "--pgt-migrate", "dbsetup:migrate")
    project.run(*run).assert_outcomes(passed=11)
    quiet = project.run(*run, "-q")  # no header under -q: the summary says what matters
    quiet.assert_outcomes(passed=11)
    quiet.stdout.fnmatch_lines([
        f"server: postgres@127.0.0.1:5432/postgres (PGTEMPLATE_URL); reset=truncate, prefix={project.prefix}",
        "template *: reused"])
    assert project.migrations_run() == 1  # same inputs: reused
    revision = path / "db" / "migrations" / "versions" / "0002_rev.py"
    revision.write_text(revision.read_text().replace(
        "ALTER TABLE customer ADD COLUMN country text", "ALTER TABLE customer ADD COLUMN note text, "
        "ADD COLUMN country text"))
    result = project.run(*run)
    result.assert_outcomes(passed=11)
    result.stdout.fnmatch_lines(["template *: built in * s (by main)"])
    assert project.migrations_run() == 2


SEED_FROM_FILE = '''
import json
from pathlib import Path

import psycopg


def seed(url):
    rows = json.loads((Path(__file__).parent / "data" / "countries.json").read_text())
    with psycopg.connect(url.set(drivername="postgresql").render_as_string(hide_password=False)) as conn:
        conn.execute("DELETE FROM country")
        for code, name in rows:
            conn.execute("INSERT INTO country VALUES (%s, %s)", (code, name))
'''

SEEDED_SUITE = '''
from sqlalchemy import text

def test_seeded(pg_sync_session):
    names = pg_sync_session.execute(text("select string_agg(name, ',' order by code) from country")).scalar()
    (__import__("pathlib").Path(__file__).parent / "names").write_text(names)
'''


def test_declared_fingerprint_files_rebuild_the_template_when_edited(project: Project) -> None:
    path = project.pytester.path
    (path / "seeds.py").write_text(SEED_FROM_FILE)
    (path / "data").mkdir()
    (path / "data" / "countries.json").write_text('[["fr", "France"]]')
    project.pytester.makepyfile(test_inner=SEEDED_SUITE)
    run = ("-p", "no:xdist", "--pgt-seed", "seeds:seed", "--pgt-fingerprint-files", "data/*.json")
    project.run(*run).assert_outcomes(passed=1)
    assert (path / "names").read_text() == "France"
    (path / "data" / "countries.json").write_text('[["fr", "France"], ["es", "Spain"]]')
    project.run(*run).assert_outcomes(passed=1)
    assert (path / "names").read_text() == "Spain,France"


def test_a_fingerprint_glob_matching_nothing_names_the_setting(project: Project) -> None:
    project.pytester.makepyfile(test_inner="def test_db(pg_url):\n    pass\n")
    result = project.run("-p", "no:xdist", "--pgt-fingerprint-files", "data/*.jsn")
    assert result.ret != 0
    result.stdout.fnmatch_lines([
        "*pytest-pgtemplate: 'data/*.jsn' (from --pgt-fingerprint-files / PGTEMPLATE_FINGERPRINT_FILES / "
        f"pgtemplate_fingerprint_files) matches no file under {project.pytester.path}; fix the glob "
        "(relative to the rootdir).*"])


@pytest.mark.parametrize("value", ["a.json,b.json", "a.json\n  b.json\n"])
def test_fingerprint_files_are_comma_or_line_separated(value: str) -> None:
    from pathlib import Path

    from pytest_pgtemplate.settings import resolve

    settings = resolve(cli={}, env={}, ini={"pgtemplate_fingerprint_files": value}, rootdir=Path("/r"))
    assert settings.fingerprint_files == ("a.json", "b.json")


# As Flask-Migrate does it: the script directory is set in code, no alembic.ini is named,
# the one in the folder has no script_location.
MIGRATE_LIKE_FLASK_MIGRATE = '''
from pathlib import Path

from alembic import command
from alembic.config import Config


def migrate(url):
    folder = Path(__file__).parent / "app" / "migrations"
    cfg = Config(str(folder / "alembic.ini"))
    cfg.set_main_option("script_location", str(folder))
    cfg.set_main_option("sqlalchemy.url", url.set(drivername="postgresql+asyncpg")
                        .render_as_string(hide_password=False))
    command.upgrade(cfg, "head")
'''


def test_a_new_revision_behind_a_migrate_function_naming_no_ini_rebuilds_the_template(
        project: Project) -> None:
    path = project.pytester.path
    (path / "app").mkdir()
    (path / "alembic.ini").unlink()
    (path / "migrations").rename(path / "app" / "migrations")
    (path / "app" / "migrations" / "alembic.ini").write_text("[alembic]\n# file_template = x\n")
    (path / "conftest.py").write_text(MIGRATE_LIKE_FLASK_MIGRATE)
    project.pytester.makepyfile(test_inner=ISOLATION_SUITE)
    run = ("-p", "no:xdist", "--pgt-migrate", "conftest:migrate")
    project.run(*run).assert_outcomes(passed=11)
    result = project.run(*run, "-q")
    result.assert_outcomes(passed=11)
    result.stdout.fnmatch_lines(["template *: reused"])
    result.stdout.no_fnmatch_line("*covers only*")
    assert project.migrations_run() == 1
    versions = path / "app" / "migrations" / "versions"
    last = sorted(p.name for p in versions.glob("*.py"))[-1].split("_")[0]
    body = "op.execute('CREATE TABLE extra (id int)')"
    (versions / "0099_rev.py").write_text(render_revision("0099", last, body))
    result = project.run(*run, "-q")
    result.assert_outcomes(passed=11)
    result.stdout.fnmatch_lines(["template *: built in * s (by main)"])


def test_a_migrate_function_whose_migrations_are_not_found_says_its_fingerprint_misses_them(
        project: Project) -> None:
    path = project.pytester.path
    (path / "alembic.ini").unlink()
    (path / "migrations" / "versions").rename(path / "migrations" / "revisions")  # not Alembic's layout
    (path / "dbsetup.py").write_text(
        "import asyncpg\n\nasync def migrate(url):\n"
        "    conn = await asyncpg.connect(url.set(drivername='postgresql').render_as_string(False))\n"
        "    await conn.execute('CREATE TABLE thing (id int)')\n    await conn.close()\n")
    project.pytester.makepyfile(test_inner="def test_db(pg_url):\n    pass\n")
    run = ("-p", "no:xdist", "--pgt-migrate", "dbsetup:migrate")
    project.run(*run).assert_outcomes(passed=1)
    result = project.run(*run, "-q")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["template *: reused; its fingerprint covers only the source of "
                                 "dbsetup:migrate's module (no Alembic migrations found in the project)*"
                                 "pgtemplate_fingerprint_files*"])
    declared = project.run(*run, "-q", "--pgt-fingerprint-files", "migrations/revisions/*.py")
    declared.assert_outcomes(passed=1)
    declared.stdout.no_fnmatch_line("*covers only*")


def test_an_ini_in_a_subfolder_with_paths_from_the_project_top_is_read_as_alembic_c_reads_it(
        project: Project) -> None:
    path = project.pytester.path
    (path / "pkg").mkdir()
    (path / "migrations").rename(path / "pkg" / "migrations")
    (path / "alembic.ini").unlink()
    (path / "pkg" / "migrations" / "alembic.ini").write_text(  # for `alembic -c pkg/migrations/alembic.ini`
        "[alembic]\nscript_location = pkg/migrations\n")
    project.pytester.makepyfile(test_inner=ISOLATION_SUITE)
    result = project.run("-n", "2", "--pgt-alembic-ini", "pkg/migrations/alembic.ini")
    result.assert_outcomes(passed=11)
    assert project.migrations_run() == 1


def test_check_downgrade_with_a_migrate_function_is_refused_naming_both_settings(project: Project) -> None:
    (project.pytester.path / "dbsetup.py").write_text("def migrate(url):\n    pass\n")
    project.pytester.makepyfile(test_inner="def test_db(pg_url):\n    pass\n")
    result = project.run("-p", "no:xdist", "--pgt-migrate", "dbsetup:migrate", "--pgt-check-downgrade")
    assert result.ret != 0
    result.stdout.fnmatch_lines([
        "*pytest-pgtemplate: --pgt-check-downgrade runs Alembic's downgrade, but the template is built "
        "with pgtemplate_migrate, which the plugin cannot undo; unset one of --pgt-check-downgrade / "
        "PGTEMPLATE_CHECK_DOWNGRADE / pgtemplate_check_downgrade or pgtemplate_migrate.*"])
