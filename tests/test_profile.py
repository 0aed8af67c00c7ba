"""--pgt-profile: per-test phases, the plugin's share of them, and the startup split."""

from __future__ import annotations

import re
import time

from conftest import Project
from pytest_pgtemplate import profile


def test_a_profiler_splits_tests_into_phases_and_the_plugins_share() -> None:
    p = profile.Profiler(marks={"import_start": time.perf_counter() - 0.5,
                                "imported": time.perf_counter() - 0.3})
    p.mark("first_setup")
    p.add("setup", 0.010)
    p.phase_done("setup", 0.015)
    p.phase_done("call", 0.100)
    p.add("teardown", 0.004)
    p.phase_done("teardown", 0.005)
    p.phase_done("setup", 0.002)  # a second test: the plugin's share starts from zero again
    p.phase_done("call", 0.050)
    p.phase_done("teardown", 0.001)
    assert p.plugin == {"setup": [0.010, 0.0], "teardown": [0.004, 0.0]}
    assert p.startup["plugin_setup"] == 0.010
    assert abs(p.startup["other_setup"] - 0.005) < 1e-9
    assert abs(p.startup["import"] - 0.2) < 0.01
    assert p.startup["before"] >= 0  # Linux: the process's age is known

    run: dict[str, object] = {}
    profile.merge(run, p.to_dict())
    profile.merge(run, p.to_dict())
    lines = profile.format_profile(run, resets=[0.001, 0.003])
    assert lines[0] == "profile of 4 tests, per test:"
    assert lines[2].startswith("  call     p50 100.0 ms, mean 75.0 ms, total 0.30 s")
    assert lines[3].endswith("; resets (part of the plugin's fixtures, 2 of them) p50 3.0 ms, mean 2.0 ms, "
                             "total 0.00 s")
    assert "(the slowest of 2 processes)" in lines[4]


def test_process_age_is_the_time_since_the_process_started() -> None:
    age = profile.process_age()
    assert age is not None
    assert 0 < age < 3600


def seconds(text: str, label: str) -> float:
    match = re.search(label + r" p50 [\d.]+ ms, mean [\d.]+ ms, total ([\d.]+) s", text)
    assert match, label
    return float(match.group(1))


def test_the_summary_shows_the_profile_under_xdist_and_in_one_process(project: Project) -> None:
    project.pytester.makepyfile(test_inner='''
        import pytest
        from sqlalchemy import text

        @pytest.mark.parametrize("i", range(6))
        async def test_write(pg_session, i):
            await pg_session.execute(text("insert into customer (name) values ('x')"))
            await pg_session.commit()
    ''')
    for args, processes in ((["-n", "2"], 2), (["-p", "no:xdist"], 1)):
        result = project.run(*args, "--pgt-profile")
        result.assert_outcomes(passed=6)
        text = result.stdout.str()
        assert "profile of 6 tests, per test:" in text
        # The plugin's fixtures are part of setup and teardown; resets part of the teardown's.
        assert seconds(text, "setup   ") >= seconds(text, "setup   .*; in the plugin's fixtures")
        teardown_plugin = seconds(text, "teardown.*; in the plugin's fixtures")
        assert seconds(text, "teardown") >= teardown_plugin >= seconds(text, r"resets \(part of the plugin's "
                                                                       r"fixtures, 6 of them\)")
        # Function-scoped loops (the inner project's): a connection per test, and the advice.
        result.stdout.fnmatch_lines(["  connections opened by the plugin's async engine: 6 (about one "
                                     "per test: function-scoped event loops*"])
        which = " (the slowest of 2 processes)" if processes == 2 else ""
        result.stdout.fnmatch_lines([
            f"  startup  * s from the process's start to its first test's call{which}: Python and pytest "
            "before the plugin * s, the plugin's import * s, configure and collection * s, the plugin's "
            "fixtures (template, worker database, engine) * s, other fixtures * s"])
    assert "profile of" not in project.run("-p", "no:xdist").stdout.str()
