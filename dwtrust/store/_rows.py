"""
What the SQL stores (SQLite and PostgreSQL) share: the columns of their
tables, the queries that need no parameters, and turning rows into values.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ._interface import KeyRecord, KeyState, Pin

PEER_COLUMNS = (
    "fingerprint, org, service, algorithm, public_key, state, first_seen,"
    " last_seen, attempts, source, decided_by, decision, request_id, expires"
)
PIN_COLUMNS = "address, org, service, algorithm, public_key, fingerprint, first_seen"

#: Every pending request, oldest first.
SELECT_PENDING = (
    f"SELECT {PEER_COLUMNS} FROM peers WHERE state = 'pending'"
    " ORDER BY first_seen, fingerprint"
)
#: Every key with a decision, oldest first.
SELECT_DECIDED = (
    f"SELECT {PEER_COLUMNS} FROM peers WHERE state != 'pending'"
    " ORDER BY first_seen, fingerprint"
)


def recordOf(row: Sequence[Any]) -> KeyRecord:
    """
    The record in a row of L{PEER_COLUMNS}.  (Drivers hand binary columns
    back as C{bytes}, C{memoryview} or C{bytearray}.)
    """
    values = list(row)
    values[4] = bytes(values[4])
    values[5] = KeyState(values[5])
    values[8] = int(values[8])
    values[11] = bytes(values[11])
    return KeyRecord(*values)


def pinOf(row: Sequence[Any]) -> Pin:
    """
    The pin in a row of L{PIN_COLUMNS}.
    """
    values = list(row)
    values[4] = bytes(values[4])
    return Pin(*values)
