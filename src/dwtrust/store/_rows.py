"""
What the SQL stores (SQLite and PostgreSQL) share: the columns of their
tables, the queries that need no parameters, and turning rows into values.

A key's record is two things joined: its row in C{peers} (when it was seen,
how often, from where, and a pending request if it has one) and the newest
row of its history in C{decisions}, which is append-only: a decision is
never updated or deleted, and the one with the highest C{sequence} is the
key's newest.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .._identity import PeerIdentity
from ._interface import KeyRecord, KeyState, Pin

PEER_COLUMNS = (
    "fingerprint, org, service, algorithm, public_key, state, first_seen,"
    " last_seen, attempts, source, decided_by, decision, request_id, expires"
)
#: The columns of one decision in a key's history.
DECISION_COLUMNS = (
    "fingerprint, sequence, org, service, algorithm, public_key, state,"
    " decided_by, sent_by, recorded_at, decision"
)
PIN_COLUMNS = "address, org, service, algorithm, public_key, fingerprint, first_seen"


def _prefixed(columns: str, table: str) -> str:
    return ", ".join(f"{table}.{c.strip()}" for c in columns.split(","))


#: A key's newest decision: one parameter, the fingerprint.  The
#: placeholder is C{{p}}, to be formatted with the driver's (C{?} or C{%s}).
SELECT_NEWEST_DECISION = (
    f"SELECT {DECISION_COLUMNS} FROM decisions WHERE fingerprint = {{p}}"
    " ORDER BY sequence DESC LIMIT 1"
)

#: Records as L{combinedRecord} reads them: the C{peers} row joined with
#: its newest decision.  Add a C{WHERE} on C{p.} columns, and an order.
SELECT_RECORDS = (
    f"SELECT {_prefixed(PEER_COLUMNS, 'p')}, {_prefixed(DECISION_COLUMNS, 'd')}"
    " FROM peers p LEFT JOIN decisions d ON d.fingerprint = p.fingerprint"
    " AND d.sequence = (SELECT MAX(m.sequence) FROM decisions m"
    " WHERE m.fingerprint = p.fingerprint)"
)

#: Every pending request, oldest first.
SELECT_PENDING = (
    f"{SELECT_RECORDS} WHERE p.state = 'pending' ORDER BY p.first_seen, p.fingerprint"
)
#: Every key with a decision, oldest first.
SELECT_DECIDED = (
    f"{SELECT_RECORDS} WHERE p.state != 'pending' ORDER BY p.first_seen, p.fingerprint"
)

_PEER_WIDTH = len(PEER_COLUMNS.split(","))


def insertDecision(placeholder: str) -> str:
    """
    The statement that appends one decision to a key's history, with the
    driver's C{placeholder} (C{?} or C{%s}), for the parameters that
    L{decisionRow} gives.
    """
    marks = ", ".join([placeholder] * len(DECISION_COLUMNS.split(",")))
    return f"INSERT INTO decisions ({DECISION_COLUMNS}) VALUES ({marks})"


def decisionRow(
    peer: PeerIdentity,
    sequence: int,
    state: KeyState,
    decidedBy: str,
    sentBy: str,
    now: float,
    decision: bytes,
) -> tuple[Any, ...]:
    """
    The parameters of L{insertDecision}, in L{DECISION_COLUMNS}' order.
    """
    return (
        peer.fingerprint,
        sequence,
        peer.org,
        peer.service,
        peer.algorithm,
        peer.publicKey.blob,
        state.value,
        decidedBy,
        sentBy,
        now,
        decision,
    )


def combinedRecord(
    peer: Sequence[Any] | None, decision: Sequence[Any] | None
) -> KeyRecord | None:
    """
    The record of a key from its C{peers} row (L{PEER_COLUMNS}) and its
    newest decision (L{DECISION_COLUMNS}), either of which may be missing.

    The state is the pending request's, if the key has one, and otherwise
    the newest decision's; whoever reads the record checks the decision
    itself before acting on it.
    """
    if decision is not None and decision[0] is None:
        decision = None  # a LEFT JOIN that found no decision
    if peer is None and decision is None:
        return None
    if peer is None:
        assert decision is not None
        (fingerprint, _, org, service, algorithm, publicKey) = decision[:6]
        recordedAt = float(decision[9])
        base = [
            fingerprint,
            org,
            service,
            algorithm,
            publicKey,
            decision[6],
            recordedAt,
            recordedAt,
            0,
            "",
            decision[7],
            b"",
            "",
            0.0,
        ]
    else:
        base = list(peer)
    base[4] = bytes(base[4])
    base[8] = int(base[8])
    sequence, sentBy, blob = -1, "", b""
    if decision is not None:
        sequence, sentBy, blob = int(decision[1]), decision[8], bytes(decision[10])
        if base[5] != KeyState.pending.value:
            base[5] = decision[6]
            base[10] = decision[7]
    base[5] = KeyState(base[5])
    base[11] = blob
    return KeyRecord(*[*base, sequence, sentBy])


def recordOf(row: Sequence[Any]) -> KeyRecord:
    """
    The record in a row of L{SELECT_RECORDS}.  (Drivers hand binary columns
    back as C{bytes}, C{memoryview} or C{bytearray}.)
    """
    record = combinedRecord(row[:_PEER_WIDTH], row[_PEER_WIDTH:])
    assert record is not None
    return record


def pinOf(row: Sequence[Any]) -> Pin:
    """
    The pin in a row of L{PIN_COLUMNS}.
    """
    values = list(row)
    values[4] = bytes(values[4])
    return Pin(*values)
