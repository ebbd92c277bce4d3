"""Sphinx configuration for dwtrust.

Builds offline: no intersphinx inventories are fetched.  References to other
projects' objects (Twisted, pyOpenSSL, ...) that autodoc produces from type
annotations therefore cannot resolve; they are listed in nitpick_ignore_regex
so that ``sphinx-build -n -W`` still fails on broken references to dwtrust's
own objects and documents.
"""

import configparser
import re
import sys
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parent.parent
# Let autodoc import dwtrust from the checkout even without an install.
sys.path.insert(0, str(_ROOT / "src"))

_setup_cfg = configparser.ConfigParser()
_setup_cfg.read(_ROOT / "setup.cfg", encoding="utf-8")

project = "dwtrust"
author = "the dwtrust authors"
copyright = "the dwtrust authors"
release = _setup_cfg.get("metadata", "version", fallback="0.0.0")
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.viewcode",
]

root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
nitpicky = True

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {
    "members": True,
    "show-inheritance": True,
}

# Offline build: objects of other projects and of the stdlib modules that have
# no built-in Sphinx resolution are not in any inventory we have.
nitpick_ignore_regex = [
    (
        r"py:.*",
        r"(twisted|OpenSSL|cryptography|service_identity|zope|attr|attrs"
        r"|automat|hyperlink|incremental|constantly)(\..*)?",
    ),
    (
        r"py:.*",
        r"(collections|collections\.abc|typing_extensions|pathlib|os|socket"
        r"|ipaddress|datetime|enum|types|logging|sqlite3|json|io)\..*",
    ),
    # Private classes show up in public signatures but are not documented.
    (r"py:class", r"dwtrust\.(.*\.)?_.*"),
    # zope.interface Interfaces are objects, not classes: in evaluated
    # annotations and in show-inheritance they appear as their repr.
    (r"py:class", r".*<InterfaceClass .*"),
]

html_theme = "alabaster"
html_static_path: list[str] = []
html_title = f"dwtrust {release}"


# --- epytext docstrings ------------------------------------------------------
# dwtrust's docstrings follow Twisted's epytext conventions (@param, @ivar,
# @raise, C{code}, L{link}, ...).  Sphinx reads reStructuredText, so autodoc
# docstrings are translated on the fly.  L{...} becomes a literal, not a
# cross-reference: with nitpicky=True an unresolvable link (a private name, an
# object of another project) would fail the -W build.

_FIELD = re.compile(r"^(\s*)@(\w+)(?:\s+([^:]+?))?\s*:(.*)$")
_FIELD_NAMES = {
    "param": "param",
    "type": "type",
    "keyword": "keyword",
    "kwarg": "keyword",
    "return": "returns",
    "returns": "returns",
    "rtype": "rtype",
    "raise": "raises",
    "raises": "raises",
    "ivar": "ivar",
    "cvar": "cvar",
    "var": "var",
    "note": "note",
    "see": "see",
    "since": "since",
}
_INLINE = re.compile(r"([CILBUM])\{([^{}]*)\}")


def _inline(match: re.Match[str]) -> str:
    kind, text = match.group(1), match.group(2).strip()
    if kind == "L":
        # L{label <target>} -> label
        text = re.sub(r"\s*<[^<>]*>$", "", text)
    if not text:
        return ""
    if kind in "CLM":
        out = f"``{text}``"
    elif kind == "I":
        out = f"*{text}*"
    elif kind == "B":
        out = f"**{text}**"
    else:  # U{url}
        out = text
    # reST inline markup must not touch word characters on either side.
    before = match.string[match.start() - 1 : match.start()]
    after = match.string[match.end() : match.end() + 1]
    if before and (before.isalnum() or before in "_"):
        out = "\\ " + out
    if after and (after.isalnum() or after in "_"):
        out = out + "\\ "
    return out


def _epytext_to_rest(
    app: Any, what: str, name: str, obj: object, options: Any, lines: list[str]
) -> None:
    out: list[str] = []
    in_fields = False
    for line in lines:
        while True:
            new = _INLINE.sub(_inline, line)
            if new == line:
                break
            line = new
        m = _FIELD.match(line)
        if m and m.group(2) in _FIELD_NAMES:
            indent, field, arg, body = m.groups()
            if out and out[-1].strip() and not in_fields:
                out.append("")
            label = _FIELD_NAMES[field] + (f" {arg.strip()}" if arg else "")
            out.append(f"{indent}:{label}:{body}")
            in_fields = True
        else:
            if not line.strip():
                in_fields = False
            out.append(line)
    lines[:] = out


def setup(app: Any) -> None:
    app.connect("autodoc-process-docstring", _epytext_to_rest)
