"""Extensions: the embedded server runs binaries that have what the migrations create."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import Project
from pytest_pgtemplate import embedded, extensions
from pytest_pgtemplate.errors import ConfigError, PgTemplateError
from test_embedded_plugin import embedded_dir, run_as_nobody

__all__ = ["embedded_dir"]  # a fixture used here

SIX = ("btree_gist", "citext", "hstore", "pg_trgm", "pgcrypto", "uuid-ossp")

EXTENSIONS_REVISION = '''
op.execute('CREATE EXTENSION IF NOT EXISTS "uuid-ossp"')
op.execute("CREATE EXTENSION IF NOT EXISTS pgcrypto")
op.execute("create extension if not exists citext")
op.execute("CREATE EXTENSION pg_trgm")
op.execute("CREATE EXTENSION IF NOT EXISTS hstore WITH SCHEMA public")
op.execute("CREATE EXTENSION btree_gist")
op.execute("""CREATE TABLE member (
    id uuid PRIMARY KEY DEFAULT uuid_generate_v4(),
    email citext NOT NULL UNIQUE,
    secret text NOT NULL DEFAULT crypt('pw', gen_salt('bf', 4)),
    attrs hstore,
    room int, during tsrange,
    EXCLUDE USING gist (room WITH =, during WITH &&))""")
op.execute("CREATE INDEX member_email_trgm ON member USING gin ((email::text) gin_trgm_ops)")
'''

EXTENSIONS_SUITE = '''
import pytest
from sqlalchemy import text


@pytest.mark.parametrize("i", range(4))
def test_the_extensions_work(pg_sync_session, i):
    s = pg_sync_session
    s.execute(text("insert into member (email, attrs, room, during) values "
                   "('Ann@X.org', 'a=>1', 1, '[2020-01-01, 2020-01-02)')"))
    assert s.execute(text("select count(*) from member where email = 'ann@x.org'")).scalar() == 1
    assert s.execute(text("select secret = crypt('pw', secret) from member")).scalar()
    assert s.execute(text("select attrs -> 'a' from member")).scalar() == "1"
    assert s.execute(text("select similarity('ann', 'anne') > 0")).scalar()
    s.commit()
'''


def extensions_project(project: Project) -> None:
    for revision in (project.pytester.path / "migrations" / "versions").iterdir():
        revision.unlink()
    project.add_revision("0001", None, EXTENSIONS_REVISION)
    project.pytester.makepyfile(test_inner=EXTENSIONS_SUITE)


def test_create_extension_statements_are_found_in_migration_code() -> None:
    source = (b'op.execute("CREATE EXTENSION IF NOT EXISTS \\"uuid-ossp\\"")\n'
              b"op.execute('create extension pgcrypto')\n"
              b'conn.execute(text("CREATE  EXTENSION IF NOT EXISTS citext WITH SCHEMA public"))\n'
              b'op.execute("CREATE EXTENSION \\"Odd\\"; CREATE EXTENSION plpgsql")\n'
              b"# creates no extension\n")
    assert extensions.required([("versions/0001.py", source)]) == {"uuid-ossp", "pgcrypto", "citext", "Odd"}


def test_the_extension_directory_of_the_wheel_and_of_system_binaries() -> None:
    for origin, bin_dir in embedded._candidates([]):
        found = embedded._probe(bin_dir, origin, [])
        if found is not None:
            where = extensions.extension_dir(found.bin_dir, found.major)
            assert where is not None, origin
            assert (where / "plpgsql.control").is_file(), origin


def test_binaries_are_chosen_by_the_extensions_the_migrations_need() -> None:
    first = embedded.find_binaries(None)
    if not extensions.missing(first.bin_dir, first.major, SIX):
        pytest.skip("the first binaries found have every extension: nothing to choose")
    chosen = embedded.find_binaries(None, needs=frozenset(SIX))
    assert chosen.bin_dir != first.bin_dir
    assert extensions.missing(chosen.bin_dir, chosen.major, SIX) == []
    lacking = ", ".join(extensions.missing(first.bin_dir, first.major, SIX))
    assert chosen.why == f"has {', '.join(SIX)}: {first.origin} lacks {lacking}"


def test_no_binaries_with_the_extension_is_one_clear_error() -> None:
    with pytest.raises(PgTemplateError) as info:
        embedded.find_binaries(None, needs=frozenset({"scratch_no_such_extension"}))
    text = str(info.value)
    assert text.startswith(
        "pytest-pgtemplate: no PostgreSQL binaries for the embedded server have the extensions the "
        "migrations create (scratch_no_such_extension); tried:\n")
    assert "): lacks extension scratch_no_such_extension\n" in text
    assert text.endswith(
        "or set --pgt-pg-bin / PGTEMPLATE_PG_BIN / pgtemplate_pg_bin to the bin directory of one that "
        "has them, or give a server URL with --pgt-url / PGTEMPLATE_URL / pgtemplate_url.")


def test_explicit_binaries_without_the_extension_name_it() -> None:
    first = embedded.find_binaries(None)
    with pytest.raises(ConfigError, match=(
            r"pytest-pgtemplate: --pgt-pg-bin: PostgreSQL \S+ in \S+ lacks the extension\(s\) "
            r"scratch_no_such_extension that the migrations create; install its contrib extensions")):
        embedded.find_binaries(first.bin_dir, needs=frozenset({"scratch_no_such_extension"}))


def test_a_build_failing_on_a_missing_extension_says_what_to_do() -> None:
    assert extensions.hint(Exception('extension "postgis" is not available')).startswith(
        " The server has no extension postgis: on a server you run, install its package")
    assert extensions.unavailable_in(
        'could not open extension control file "/x/share/extension/uuid-ossp.control"') == "uuid-ossp"
    assert extensions.hint(Exception("relation x does not exist")) == ""


def test_zero_config_serves_the_extensions_real_migrations_create(
    project: Project, embedded_dir: Path
) -> None:
    extensions_project(project)
    result = project.run("-n", "2")
    result.assert_outcomes(passed=4)
    first = embedded.find_binaries(None)
    if extensions.missing(first.bin_dir, first.major, SIX):  # e.g. the wheel: say why not it
        result.stdout.fnmatch_lines([
            f"server: embedded PostgreSQL * (*; has {', '.join(SIX)}: {first.origin} lacks *)*"])


def test_zero_config_extensions_as_a_normal_user(project: Project, embedded_dir: Path) -> None:
    extensions_project(project)
    result = run_as_nobody(project, embedded_dir)
    assert "4 passed" in result.stdout, result.stdout + result.stderr
