"""MkDocs hooks: pages built from what the repository already holds, so nothing is kept twice.

- ``<!-- pgt:options -->`` in a page becomes the configuration reference, rendered from
  ``pytest_pgtemplate.settings.OPTIONS`` (the table that also drives ``--pgt-*``, the ini keys
  and the environment variables). An option without help text fails the build.
- ``<!-- pgt:include PATH -->`` on a line of its own becomes the file at ``PATH`` (relative to
  the repository root), without its ``# title`` line (the page has its own).
- ``bench/chart.png`` is published as ``assets/chart.png``.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterable
from pathlib import Path

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files
from mkdocs.structure.pages import Page

from pytest_pgtemplate.settings import OPTIONS, Option

ROOT = Path(__file__).resolve().parent.parent
OPTIONS_MARK = "<!-- pgt:options -->"
INCLUDE = re.compile(r"^<!-- pgt:include (\S+) -->$", flags=re.MULTILINE)
# Published path in the site -> file in the repository.
ASSETS = {"assets/chart.png": "bench/chart.png"}
BOOL_VALUES = "`1`/`0`, `true`/`false`, `yes`/`no`, `on`/`off` (environment and ini)"


def on_files(files: Files, config: MkDocsConfig) -> Files:
    for dest, src in ASSETS.items():
        files.append(File.generated(config, dest, abs_src_path=str(ROOT / src)))
    return files


def on_page_markdown(markdown: str, page: Page, config: MkDocsConfig, files: Files) -> str:
    if OPTIONS_MARK in markdown:
        try:
            markdown = markdown.replace(OPTIONS_MARK, render_options(OPTIONS))
        except ValueError as exc:
            raise PluginError(f"{page.file.src_path}: {exc}") from exc
    return INCLUDE.sub(lambda m: _include(m.group(1), page), markdown)


def render_options(options: Iterable[Option]) -> str:
    """The reference as Markdown: a summary table, then one section per option.

    Raises ``ValueError`` naming the option when one has no help text.
    """
    options = tuple(options)
    for opt in options:
        if not opt.help.strip():
            raise ValueError(f"option {opt.name!r} has no help text in settings.OPTIONS")
    lines = ["| option | environment | ini key | default |", "| --- | --- | --- | --- |"]
    lines += [f"| [`{o.flag}`](#{_anchor(o)}) | `{o.env}` | `{o.ini}` | {default_text(o)} |"
              for o in options]
    for opt in options:
        lines += ["", *_section(opt)]
    return "\n".join(lines) + "\n"


def default_text(opt: Option) -> str:
    """The default as a reader wants it: ``off`` for a flag, ``not set`` for no value."""
    if opt.kind == "bool":
        return "on" if opt.default else "off"
    if opt.default is None or opt.default == ():
        return "not set"
    value = opt.default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"`{value}`"


def _section(opt: Option) -> list[str]:
    usage = opt.flag if opt.kind == "bool" else f"{opt.flag} {opt.metavar or opt.name.upper()}"
    if opt.kind == "bool":
        values = BOOL_VALUES
    elif opt.choices:
        values = ", ".join(f"`{c}`" for c in opt.choices)
    else:
        values = _KIND_VALUES.get(opt.kind, "text")
    return [
        f"### `{opt.flag}` {{#{_anchor(opt)}}}",
        "",
        _escape(opt.help),
        "",
        "| | |",
        "| --- | --- |",
        f"| command line | `{usage}` |",
        f"| environment | `{opt.env}` |",
        f"| ini key | `{opt.ini}` |",
        f"| values | {values} |",
        f"| default | {default_text(opt)} |",
    ]


_KIND_VALUES = {
    "int": "a whole number, 0 or more",
    "float": "a positive number of seconds",
    "path": "a path (relative: to the rootdir)",
    "list": "comma or line separated",
    "env": "comma or line separated entries",
    "databases": "one database per line (or `;`)",
}


def _anchor(opt: Option) -> str:
    return opt.name.replace("_", "-")


def _escape(text: str) -> str:
    """Help texts are plain text: keep ``<uid>``, ``**`` and ``_`` from turning into markup."""
    return re.sub(r"([\\`*_\[\]])", r"\\\1", html.escape(text, quote=False))


def _include(path: str, page: Page) -> str:
    source = ROOT / path
    if not source.is_file():
        raise PluginError(f"{page.file.src_path}: pgt:include of {path}, which does not exist")
    return _without_title(source.read_text())


def _without_title(text: str) -> str:
    """Drop the file's ``# title`` (the page has its own); a later ``# x`` becomes ``## x``."""
    lines = text.splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    out: list[str] = []
    fenced = False
    for line in lines:
        if line.startswith("```"):
            fenced = not fenced
        out.append("#" + line if not fenced and line.startswith("# ") else line)
    return "\n".join(out) + "\n"
