"""
The shell and Python examples of C{README.md} and C{docs/*.rst}, found as a
reader finds them, for L{tests.test_docs_examples} to run.

Examples are:

  - in Markdown, fenced blocks whose language is C{sh}, C{bash}, C{shell},
    C{console} or C{python};
  - in reStructuredText, C{.. code-block:: LANG} (or C{code} or
    C{sourcecode}) directives with one of those languages.

A C{console} block's commands are its lines that start with C{$ } (with the
lines that continue them, after a trailing backslash, C{|} or C{&&}); its
other lines are output.  A block that cannot run where the test runs is
marked by a comment on the line before it (blank lines may come between):
C{.. not-run: REASON} in reStructuredText, C{<!-- not-run: REASON -->} in
Markdown.

A literal block (C{::}) with a line that starts with C{$ } is a command
written without a language: L{undeclared} finds those, so that no command
escapes the test by a missing C{code-block}.
"""

from __future__ import annotations

import re
from pathlib import Path

from attrs import frozen

ROOT = Path(__file__).resolve().parent.parent

#: Languages run as shell, and as Python.
SHELL = frozenset({"sh", "bash", "shell", "console"})
PYTHON = frozenset({"python", "py", "python3"})

_FENCE = re.compile(r"^(\s*)```\s*([\w+-]*)\s*$")
_MD_NOT_RUN = re.compile(r"^\s*<!--\s*not-run:(.*?)-->\s*$")
_DIRECTIVE = re.compile(r"^(\s*)\.\.\s+(?:code-block|code|sourcecode)::\s*(\S*)\s*$")
_RST_NOT_RUN = re.compile(r"^\s*\.\.\s+not-run:(.*)$")
_OPTION = re.compile(r"^\s*:[\w-]+:")


@frozen
class Example:
    """
    One example.

    @ivar path: the page, relative to the root of the checkout.
    @ivar line: the line (from 1) of its first line of code.
    @ivar language: C{"shell"} or C{"python"}.
    @ivar code: what to run: for a console block, its commands only.
    @ivar notRun: L{None} if it runs; else the reason given (maybe empty).
    """

    path: str
    line: int
    language: str
    code: str
    notRun: str | None

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


def pages() -> list[Path]:
    """
    The pages whose examples are run: C{README.md} and every C{docs/*.rst}.
    """
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.rst"))]


def consoleCommands(text: str) -> str:
    """
    The commands of a console block: its C{$ } lines and the lines that
    continue them (after a trailing backslash, C{|} or C{&&}).
    """
    commands: list[str] = []
    continued = False
    for line in text.splitlines():
        if continued:
            commands.append(line)
        elif line.startswith("$ ") or line == "$":
            commands.append(line[2:])
        else:
            continue
        continued = line.rstrip().endswith(("\\", "|", "&&"))
    return "\n".join(commands) + "\n"


def _kind(language: str) -> str | None:
    language = language.lower()
    if language in SHELL:
        return "shell"
    if language in PYTHON:
        return "python"
    return None


def _dedent(lines: list[str]) -> str:
    indents = [len(x) - len(x.lstrip()) for x in lines if x.strip()]
    cut = min(indents, default=0)
    return "\n".join(x[cut:] for x in lines).strip("\n") + "\n"


def _markdown(path: Path, name: str) -> list[Example]:
    lines = path.read_text(encoding="utf-8").splitlines()
    found: list[Example] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        language = m.group(2)
        start = i + 1
        end = start
        while end < len(lines) and not _FENCE.match(lines[end]):
            end += 1
        kind = _kind(language)
        if kind is not None:
            j = i - 1
            while j >= 0 and not lines[j].strip():
                j -= 1
            mark = _MD_NOT_RUN.match(lines[j]) if j >= 0 else None
            code = _dedent(lines[start:end])
            if language.lower() == "console":
                code = consoleCommands(code)
            found.append(
                Example(
                    name,
                    start + 1,
                    kind,
                    code,
                    mark.group(1).strip() if mark else None,
                )
            )
        i = end + 1
    return found


def _rstBody(lines: list[str], start: int, indent: int) -> tuple[int, int]:
    """
    The lines C{[first, end)} of the body of a directive or literal block
    that starts after line C{start}, indented more than C{indent}.
    """
    i = start
    while i < len(lines) and (not lines[i].strip() or _OPTION.match(lines[i])):
        if lines[i].strip() and len(lines[i]) - len(lines[i].lstrip()) <= indent:
            break
        i += 1
    first = i
    while i < len(lines):
        line = lines[i]
        if line.strip() and len(line) - len(line.lstrip()) <= indent:
            break
        i += 1
    end = i
    while end > first and not lines[end - 1].strip():
        end -= 1
    return first, end


def _rst(path: Path, name: str) -> list[Example]:
    lines = path.read_text(encoding="utf-8").splitlines()
    found: list[Example] = []
    for i, line in enumerate(lines):
        m = _DIRECTIVE.match(line)
        if not m:
            continue
        kind = _kind(m.group(2))
        if kind is None:
            continue
        first, end = _rstBody(lines, i + 1, len(m.group(1)))
        j = i - 1
        while j >= 0 and not lines[j].strip():
            j -= 1
        mark = _RST_NOT_RUN.match(lines[j]) if j >= 0 else None
        code = _dedent(lines[first:end])
        if m.group(2).lower() == "console":
            code = consoleCommands(code)
        found.append(
            Example(
                name, first + 1, kind, code, mark.group(1).strip() if mark else None
            )
        )
    return found


def examples(page: Path) -> list[Example]:
    """
    The examples of one page, in the order a reader meets them.
    """
    name = page.relative_to(ROOT).as_posix()
    if page.suffix == ".md":
        return _markdown(page, name)
    return _rst(page, name)


def undeclared(page: Path) -> list[str]:
    """
    Where a reStructuredText page has a literal block (C{::}) with a C{$ }
    command line: a command that no test would run.
    """
    if page.suffix != ".rst":
        return []
    name = page.relative_to(ROOT).as_posix()
    lines = page.read_text(encoding="utf-8").splitlines()
    found: list[str] = []
    for i, line in enumerate(lines):
        stripped = line.rstrip()
        if not stripped.endswith("::") or _DIRECTIVE.match(line):
            continue
        if stripped.lstrip().startswith(".. ") and not stripped.lstrip().startswith(
            ".. not-run"
        ):
            # Another directive (``.. toctree::``, ``.. list-table::``).
            continue
        indent = len(line) - len(line.lstrip())
        first, end = _rstBody(lines, i + 1, indent)
        if any(x.lstrip().startswith("$ ") for x in lines[first:end]):
            found.append(f"{name}:{first + 1}")
    return found
