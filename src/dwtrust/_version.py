"""
dwtrust's version, from the installed metadata.
"""

from __future__ import annotations

from importlib import metadata as _metadata


def _version() -> str:
    """
    The installed distribution's version; in a plain checkout, not
    installed, the one its setup.cfg declares.
    """
    try:
        return _metadata.version("dwtrust")
    except _metadata.PackageNotFoundError:
        import configparser
        import os

        config = configparser.ConfigParser()
        here = os.path.dirname(os.path.abspath(__file__))
        config.read(os.path.join(here, os.pardir, os.pardir, "setup.cfg"))
        return config.get("metadata", "version", fallback="0+unknown")


#: dwtrust's version.
__version__ = _version()

__all__ = ["__version__"]
