"""The README stays true: its option reference matches the code, its commands are CI's."""

from __future__ import annotations

import re
from pathlib import Path

from pytest_pgtemplate.settings import OPTIONS

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()


def reference_rows() -> dict[str, tuple[str, str]]:
    rows = {}
    for line in README.splitlines():
        match = re.match(r"\| `(--pgt-[a-z-]+)` \| `(PGTEMPLATE_[A-Z_]+)` \| `(pgtemplate_[a-z_]+)` \|", line)
        if match:
            rows[match.group(1)] = (match.group(2), match.group(3))
    return rows


def test_every_option_is_in_the_readme_reference_and_nothing_else() -> None:
    expected = {opt.flag: (opt.env, opt.ini) for opt in OPTIONS}
    assert reference_rows() == expected


def test_ci_runs_the_readme_commands() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'readme_command 1' in ci
    assert 'readme_command 2' in ci
    commands = re.findall(r"^# ([12])\..*\n(.+)$", README, flags=re.MULTILINE)
    assert [n for n, _ in commands] == ["1", "2"]
    assert "pytest -n auto" in commands[0][1]
    assert "examples/shop" in commands[0][1]
