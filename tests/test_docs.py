"""The docs stay true: every option is documented in the generated reference, the site builds
under ``mkdocs build --strict``, the names the pages use exist, and README's commands are CI's."""

from __future__ import annotations

import html
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from pytest_pgtemplate.settings import OPTIONS, Option

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()
PAGES = sorted((ROOT / "docs").glob("*.md"))
NO_MKDOCS = "mkdocs is not installed: pip install -e '.[docs]' (the test extra has it)"


@pytest.fixture(scope="module")
def hooks() -> ModuleType:
    pytest.importorskip("mkdocs", reason=NO_MKDOCS)
    spec = importlib.util.spec_from_file_location("pgt_docs_hooks", ROOT / "docs" / "hooks.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("mkdocs", reason=NO_MKDOCS)
    pytest.importorskip("material", reason=NO_MKDOCS)
    out = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
         "--site-dir", str(out)],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        check=False, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def page_text(site: Path, page: str) -> str:
    """The visible text of a built page's article, whitespace collapsed."""
    source = (site / page / "index.html").read_text()
    article = source[source.index("<article"):source.index("</article>")]
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", article)).split())


def squeezed(text: str) -> str:
    return "".join(text.split())


def sections(reference: str) -> dict[str, str]:
    parts = re.split(r"^### `(--pgt-[a-z-]+)`.*$", reference, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_every_option_has_help_and_a_reference_section_with_its_three_names_and_default(
        hooks: ModuleType) -> None:
    by_flag = sections(hooks.render_options(OPTIONS))
    assert list(by_flag) == [opt.flag for opt in OPTIONS]
    for opt in OPTIONS:
        section = by_flag[opt.flag]
        assert opt.help.strip(), opt.name
        assert f"| environment | `{opt.env}` |" in section
        assert f"| ini key | `{opt.ini}` |" in section
        assert f"| default | {hooks.default_text(opt)} |" in section
        assert hooks._escape(opt.help) in section


def test_an_option_without_help_text_stops_the_reference(hooks: ModuleType) -> None:
    with pytest.raises(ValueError, match=r"^option 'nameless' has no help text in settings\.OPTIONS$"):
        hooks.render_options((*OPTIONS, Option("nameless", " ")))


def test_defaults_read_as_words(hooks: ModuleType) -> None:
    by_name = {opt.name: hooks.default_text(opt) for opt in OPTIONS}
    assert by_name["url"] == "not set"
    assert by_name["keep"] == "off"
    assert by_name["reset"] == "`truncate`"
    assert by_name["timeout"] == "`300`"
    assert by_name["alembic_x"] == "not set"


def test_the_site_publishes_pages_and_assets_not_the_hooks(site: Path) -> None:
    assert not list(site.rglob("*.py"))
    assert not list(site.rglob("__pycache__"))


def test_the_site_builds_under_strict_and_its_reference_shows_every_option_and_its_help(site: Path) -> None:
    text = page_text(site, "configuration")
    for opt in OPTIONS:
        for name in (opt.flag, opt.env, opt.ini):
            assert name in text
        assert " ".join(opt.help.split()) in text, opt.name


def test_the_site_includes_the_bench_results_chart_and_changelog_from_their_files(site: Path) -> None:
    assert (site / "assets" / "chart.png").read_bytes() == (ROOT / "bench" / "chart.png").read_bytes()
    performance = page_text(site, "performance")
    assert 'src="../assets/chart.png"' in (site / "performance" / "index.html").read_text()
    results = (ROOT / "bench" / "RESULTS.md").read_text()
    for heading in re.findall(r"^## (.+)$", results, flags=re.MULTILINE):
        assert squeezed(heading.replace("`", "")) in squeezed(performance)
    changelog = page_text(site, "changelog")
    for heading in re.findall(r"^## (.+)$", (ROOT / "CHANGELOG.md").read_text(), flags=re.MULTILINE):
        assert heading in changelog


def test_every_option_name_the_readme_and_pages_mention_exists() -> None:
    flags = {opt.flag for opt in OPTIONS} | {"--pgt-list", "--pgt-gc"}
    envs = {opt.env for opt in OPTIONS} | {"PGTEMPLATE_TEST_URL"}
    inis = {opt.ini for opt in OPTIONS}
    for path in (ROOT / "README.md", *PAGES):
        text = path.read_text()
        assert set(re.findall(r"--pgt-[a-z-]*[a-z]", text)) <= flags, path.name
        assert set(re.findall(r"PGTEMPLATE_[A-Z_]*[A-Z]", text)) <= envs, path.name
        assert set(re.findall(r"(?<![_a-z])pgtemplate_[a-z_]*[a-z]", text)) <= inis, path.name


def test_the_readme_links_into_the_docs_and_every_link_resolves() -> None:
    targets = re.findall(r"\]\(((?!https?:|#)[^)#]+)\)", README)
    assert "docs/configuration.md" in targets
    for target in targets:
        assert (ROOT / target).exists(), target


def test_ci_builds_the_docs_and_runs_the_readme_commands() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'readme_command 1' in ci
    assert 'readme_command 2' in ci
    assert re.search(r"tox .*-e [a-z0-9,-]*\bdocs\b", ci)
    commands = re.findall(r"^# ([12])\..*\n(.+)$", README, flags=re.MULTILINE)
    assert [n for n, _ in commands] == ["1", "2"]
    assert "pytest -n auto" in commands[0][1]
    assert "examples/shop" in commands[0][1]
    assert ".[test]" in commands[1][1]  # the test extra brings mkdocs, so the build test runs
