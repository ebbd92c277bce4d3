"""
The Twisted dropin, found the way Twisted finds it: C{twistd} lists the
C{dwtrust} plugin and shows its options, and the plugin system offers the
C{dwtrust:} endpoint string parsers.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from twisted.application.service import IServiceMaker
from twisted.internet.interfaces import (
    IStreamClientEndpointStringParserWithReactor,
    IStreamServerEndpointStringParser,
)
from twisted.plugin import getPlugins

import dwtrust
import twisted.plugins
from dwtrust._endpoints import ClientParser, ServerParser
from dwtrust.tap import Options

from .processes import TWISTD

ROOT = Path(__file__).resolve().parent.parent
DROPINS = ROOT / "src" / "twisted" / "plugins"
OPTIONS = [
    "--identity",
    "--org",
    "--service",
    "--algorithm",
    "--listen",
    "--forward",
    "--approver",
    "--store",
    "--timeout",
    "--decision-timeout",
]


def twistd(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    """
    Run C{twistd ARGS...} with C{home} as its home directory.
    """
    return subprocess.run(
        [TWISTD, *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "HOME": str(home)},
        cwd=home,
        check=False,
    )


def test_twistdListsPlugin(tmp_path: Path) -> None:
    """
    C{twistd --help} lists C{dwtrust} among its commands, with its
    description.
    """
    done = twistd("--help", home=tmp_path)
    assert done.returncode == 0, done.stderr
    assert re.search(r"^\s+dwtrust\s+Zero-trust", done.stdout, re.M), done.stdout


def test_twistdDwtrustHelp(tmp_path: Path) -> None:
    """
    C{twistd dwtrust --help} shows every option of the daemon, and does
    nothing else: no identity is created.
    """
    done = twistd("dwtrust", "--help", home=tmp_path)
    assert done.returncode == 0, done.stderr
    for option in OPTIONS:
        assert re.search(rf"^\s+(-\w, )?{option}=", done.stdout, re.M), (
            f"{option} missing from:\n{done.stdout}"
        )
    assert "Traceback" not in done.stdout + done.stderr
    assert not (tmp_path / ".dwtrust").exists()


def test_serviceMakerPlugin() -> None:
    """
    The plugin system offers one C{dwtrust} service maker, whose options are
    the daemon's.
    """
    makers = [m for m in getPlugins(IServiceMaker) if m.tapname == "dwtrust"]
    assert len(makers) == 1, makers
    assert isinstance(makers[0].options(), Options)


def test_serverParserPlugin() -> None:
    """
    The plugin system offers exactly one server endpoint string parser with
    the prefix C{dwtrust}: dwtrust's.
    """
    parsers = [
        p
        for p in getPlugins(IStreamServerEndpointStringParser)
        if p.prefix == "dwtrust"
    ]
    assert len(parsers) == 1, parsers
    assert isinstance(parsers[0], ServerParser)


def test_clientParserPlugin() -> None:
    """
    The plugin system offers exactly one client endpoint string parser with
    the prefix C{dwtrust}: dwtrust's.
    """
    parsers = [
        p
        for p in getPlugins(IStreamClientEndpointStringParserWithReactor)
        if p.prefix == "dwtrust"
    ]
    assert len(parsers) == 1, parsers
    assert isinstance(parsers[0], ClientParser)


def test_dropinDirectory() -> None:
    """
    C{src/twisted/plugins/} holds the dropin and no C{__init__.py}, so it does
    not shadow Twisted's own C{twisted.plugins} package: that package is
    still Twisted's, and the dropin directory is on its search path.
    """
    assert (DROPINS / "dwtrust_plugin.py").is_file()
    assert not (DROPINS / "__init__.py").exists()
    assert Path(twisted.plugins.__file__).resolve().parent != DROPINS
    searched = {Path(p).resolve() for p in twisted.plugins.__path__}
    assert DROPINS in searched, searched
    assert Path(dwtrust.__file__).resolve().parent == ROOT / "src" / "dwtrust"
