"""
The audit log fills in an event's message itself, faster than Twisted's
C{formatEvent}, and must say exactly what C{formatEvent} says; and its
observer writes dwtrust's events only.
"""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from twisted.logger import formatEvent

from dwtrust.tap import AuditObserver, auditLine


class Named:
    name = "acme/billing"

    def describe(self) -> str:
        return "a caller"


EVENTS: list[dict[str, Any]] = [
    {"log_format": "plain text", "event": "dwtrust.x"},
    {"log_format": "{a} and {b!r}", "a": 1, "b": "two", "event": "dwtrust.x"},
    {"log_format": "{peer.name} at {seconds:.1f} s", "peer": Named(), "seconds": 2.25},
    {"log_format": "{peer.describe()}", "peer": Named()},
    {"log_format": "{missing} field", "event": "dwtrust.x"},
    {"log_format": "{{braces}} {a}", "a": "kept"},
    {"log_format": None, "event": "dwtrust.x"},
]


@pytest.mark.parametrize("event", EVENTS)
def test_textAsTwistedSaysIt(event: dict[str, Any]) -> None:
    """
    The C{text} of an audit line is what C{formatEvent} makes of the event,
    whether the format is plain, uses conversions, attributes or calls, or
    cannot be filled in.
    """
    event = {"log_time": 0.0, **event}
    assert json.loads(auditLine(event))["text"] == formatEvent(event)


def test_observerWritesDwtrustEventsOnly() -> None:
    """
    The audit observer writes an event whose name starts with C{dwtrust.},
    and nothing else.
    """
    written = io.StringIO()
    observer = AuditObserver(written)
    observer({"log_time": 0.0, "log_format": "kept", "event": "dwtrust.kept"})
    observer({"log_time": 0.0, "log_format": "dropped", "event": "other.event"})
    observer({"log_time": 0.0, "log_format": "dropped"})
    lines = written.getvalue().splitlines()
    assert [json.loads(line)["event"] for line in lines] == ["dwtrust.kept"]
