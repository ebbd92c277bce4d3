"""
What every part of the C{dwtrust} command shares: exit statuses, the
identity options, durations, addresses and printable text.
"""

from __future__ import annotations

import datetime
import os
from typing import Any

from twisted.python.filepath import FilePath

from .._options import GNUOptions, positive
from .._sidecar import remoteDescription
from .._wrap import STORE_FILE

DEFAULT_IDENTITY = os.path.join("~", ".dwtrust")

#: Exit statuses.
OK, FAILED, USAGE, REFUSED = 0, 1, 2, 3

#: The coercion of a positive number of seconds, for options.
_positive = positive


class CommandError(Exception):
    """
    A command could not do its job; the message says why.
    """


class _IdentityOptions(GNUOptions):
    optParameters: list[list[Any]] = [
        ["identity", "i", DEFAULT_IDENTITY, "The identity directory."],
    ]

    def postOptions(self) -> None:
        self["identity"] = os.path.expanduser(self["identity"])

    @property
    def directory(self) -> FilePath[str]:
        return FilePath(self["identity"])


class _AddressOptions(_IdentityOptions):
    optParameters = [
        *_IdentityOptions.optParameters,
        ["store", None, None, f"The SQLite trust store [IDENTITY/{STORE_FILE}]."],
    ]

    def parseArgs(self, address: str) -> None:  # type: ignore[override]
        self["address"] = address

    @property
    def store(self) -> FilePath[str]:
        return FilePath(self["store"] or self.directory.child(STORE_FILE).path)


def _duration(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600}
    scale = units.get(text[-1:].lower(), 0)
    try:
        number = float(text[:-1] if scale else text)
    except ValueError:
        raise ValueError(
            f"{text} is not a duration (seconds, or a number with s, m or h)"
        ) from None
    if not 0 < number < float("inf"):
        raise ValueError(f"{text} is not a positive duration")
    return number * (scale or 1)


_duration.coerceDoc = "Seconds, or a number with s, m or h."  # type: ignore[attr-defined]


def _address(address: str) -> tuple[str, str]:
    """
    The endpoint description and pin name for C{HOST:PORT} (or an endpoint
    description, used as it is).
    """
    return remoteDescription(address), address


def _printable(text: object) -> str:
    """
    C{text} with control characters escaped, so that nothing a peer or
    another owner chose can move a terminal's cursor or hide a line.
    """
    return "".join(
        c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
        for c in str(text)
    )


def isoTime(when: float) -> str:
    """
    A POSIX time as ISO 8601 UTC, to the second; C{-} for none.
    """
    if not when:
        return "-"
    moment = datetime.datetime.fromtimestamp(when, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")
