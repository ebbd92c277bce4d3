"""
An instance's own memory of the newest decision it has seen about each key:
in memory, and in a SQLite file of its own in the identity directory, out of
the shared trust store's reach.

It is what makes trust never go backwards: a decision older than the one
remembered here is refused, whatever the store, another instance or the
control channel says.  Nothing is read at start-up but a marker; a key's
entry is read from the file the first time it is asked about, and kept.
"""

from __future__ import annotations

import os
import sqlite3
from typing import Any

from twisted.enterprise import adbapi
from twisted.internet import threads
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath

from .._decision import DecisionError, SignedDecision
from ._sqlite import _pool

#: The file's name in the identity directory.
NEWEST_FILE = "newest-decisions.sqlite3"
#: The most entries kept in memory besides those not yet written.
MAX_CACHED = 100_000

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS newest ("
    " fingerprint TEXT PRIMARY KEY, sequence INTEGER NOT NULL,"
    " decision BLOB NOT NULL)",
    "CREATE TABLE IF NOT EXISTS marks (name TEXT PRIMARY KEY)",
)
#: A write never replaces a newer entry, even one another process wrote.
_UPSERT = (
    "INSERT INTO newest (fingerprint, sequence, decision) VALUES (?, ?, ?)"
    " ON CONFLICT (fingerprint) DO UPDATE SET sequence = excluded.sequence,"
    " decision = excluded.decision WHERE excluded.sequence > newest.sequence"
)
#: The mark that version 1 decisions were carried over (see
#: L{dwtrust._authority.Decisions.carryOver}).
CARRIED_OVER = "carried-over-v1"


class NewestError(Exception):
    """
    The file cannot be opened or used: the message says why.
    """


def _prepare(path: str) -> bool:
    """
    Create the file (0600) and its tables if need be.  Blocks.

    @return: whether the version 1 decisions were carried over already.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        os.close(fd)
        os.chmod(path, 0o600)
        connection = sqlite3.connect(path, isolation_level=None, timeout=5.0)
        try:
            connection.execute("PRAGMA busy_timeout = 5000")
            for statement in _SCHEMA:
                connection.execute(statement)
            row = connection.execute(
                "SELECT 1 FROM marks WHERE name = ?", (CARRIED_OVER,)
            ).fetchone()
        finally:
            connection.close()
    except (OSError, sqlite3.Error) as e:
        raise NewestError(f"cannot use {path}: {e}") from None
    return row is not None


class NewestDecisions:
    """
    The newest decision seen about each key.

    @ivar carriedOver: whether this instance carried its store's version 1
        decisions over to version 2 (after which a version 1 approval counts
        for nothing).
    """

    log = Logger()

    def __init__(self, pool: adbapi.ConnectionPool | None, carriedOver: bool) -> None:
        self._pool = pool
        self.carriedOver = carriedOver
        #: Read from the file, or remembered: None where the file has none.
        self._known: dict[str, SignedDecision | None] = {}
        #: Remembered and not written yet; never dropped before it is.
        self._unwritten: dict[str, SignedDecision] = {}

    @classmethod
    def inMemory(cls) -> NewestDecisions:
        """
        A memory with no file: it forgets everything when the process ends.
        """
        return cls(None, False)

    @classmethod
    def fromPath(cls, path: FilePath[str]) -> NewestDecisions:
        """
        Open (creating) the file at C{path} at once.  Blocks: call it only
        before the reactor runs, and L{open} otherwise.

        @raise NewestError: if it cannot be used.
        """
        return cls(_pool(path), _prepare(path.path))

    @classmethod
    def open(cls, path: FilePath[str]) -> Deferred[NewestDecisions]:
        preparing: Deferred[bool] = threads.deferToThread(_prepare, path.path)
        return preparing.addCallback(lambda done: cls(_pool(path), done))

    def close(self) -> Deferred[None]:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()
        return succeed(None)

    def get(self, fingerprint: str) -> Deferred[SignedDecision | None]:
        """
        The newest decision seen about C{fingerprint}, if any.
        """
        if fingerprint in self._unwritten:
            return succeed(self._unwritten[fingerprint])
        if fingerprint in self._known or self._pool is None:
            return succeed(self._known.get(fingerprint))

        def read(cursor: Any) -> bytes | None:
            cursor.execute(
                "SELECT decision FROM newest WHERE fingerprint = ?", (fingerprint,)
            )
            row = cursor.fetchone()
            return None if row is None else bytes(row[0])

        def decoded(encoded: bytes | None) -> SignedDecision | None:
            newest = None
            if encoded is not None:
                try:
                    newest = SignedDecision.decode(encoded)
                except DecisionError as e:
                    self.log.warn(
                        "dwtrust: the newest decision remembered about"
                        " {fingerprint} does not parse: {error}",
                        event="dwtrust.newest.damaged",
                        fingerprint=fingerprint,
                        error=str(e),
                    )
            # Remembered meanwhile: that is newer than the file.
            if fingerprint in self._unwritten:
                return self._unwritten[fingerprint]
            if fingerprint in self._known:
                return self._known[fingerprint]
            self._keep(fingerprint, newest)
            return newest

        reading: Deferred[bytes | None] = self._pool.runInteraction(read)
        return reading.addCallback(decoded)

    def _keep(self, fingerprint: str, decision: SignedDecision | None) -> None:
        if len(self._known) >= MAX_CACHED:
            self._known.clear()
        self._known[fingerprint] = decision

    def remember(self, decision: SignedDecision) -> Deferred[None]:
        """
        Remember C{decision} as the newest about its key, at once in memory
        and soon in the file, unless a newer one is remembered already (the
        caller checks the order; this only never goes backwards).

        @return: a L{Deferred} that fires once it is written.
        """
        fingerprint = decision.fingerprint
        current = self._unwritten.get(fingerprint, self._known.get(fingerprint))
        if current is not None and current.sequence >= decision.sequence:
            return succeed(None)
        self._unwritten[fingerprint] = decision
        if self._pool is None:
            self._known[fingerprint] = self._unwritten.pop(fingerprint)
            return succeed(None)

        def write(cursor: Any) -> None:
            cursor.execute(_UPSERT, (fingerprint, decision.sequence, decision.encode()))

        def written(result: object) -> None:
            if self._unwritten.get(fingerprint) is decision:
                del self._unwritten[fingerprint]
                self._keep(fingerprint, decision)
            if isinstance(result, Failure):
                # It stays in memory (in _known) for as long as the process
                # runs; only a restart can forget it.
                self._known[fingerprint] = decision
                self.log.warn(
                    "dwtrust: cannot write the newest decision about"
                    " {fingerprint} to this instance's own file: {error};"
                    " it is kept in memory",
                    event="dwtrust.newest.unwritten",
                    fingerprint=fingerprint,
                    error=result.getErrorMessage(),
                )

        writing: Deferred[None] = self._pool.runInteraction(write)
        return writing.addBoth(written)

    def markCarriedOver(self) -> Deferred[None]:
        self.carriedOver = True
        if self._pool is None:
            return succeed(None)
        marking: Deferred[None] = self._pool.runOperation(
            "INSERT OR IGNORE INTO marks (name) VALUES (?)", (CARRIED_OVER,)
        )
        return marking
