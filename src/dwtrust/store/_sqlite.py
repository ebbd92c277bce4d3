"""
The embedded trust store: one SQLite file, reached through
L{twisted.enterprise.adbapi} so that no query runs on the reactor thread.

The schema carries its version in C{PRAGMA user_version} and is migrated
forward, one step at a time, when the store opens.  The journal is in WAL mode
with C{synchronous=NORMAL}: a committed decision survives the process being
killed at any moment (the WAL is written before the commit returns); only a
crash of the whole machine can lose the last commits, and saves an fsync on
every connection.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Sequence
from typing import Any

from twisted.enterprise import adbapi
from twisted.internet import threads
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from zope.interface import implementer

from .._identity import PeerIdentity
from ._attempts import AttemptCounter, Rows
from ._cache import ReadCache
from ._interface import (
    DecisionConflict,
    IKnownServices,
    ITrustStore,
    KeyRecord,
    KeyState,
    Pin,
    StoreChange,
    checkPendingCaps,
    sourceHost,
)
from ._rows import (
    PEER_COLUMNS,
    PIN_COLUMNS,
    SELECT_DECIDED,
    SELECT_NEWEST_DECISION,
    SELECT_PENDING,
    SELECT_RECORDS,
    combinedRecord,
    decisionRow,
    insertDecision,
    pinOf,
    recordOf,
)

_SELECT_PEER = f"SELECT {PEER_COLUMNS} FROM peers WHERE fingerprint = ?"
_SELECT_NEWEST = SELECT_NEWEST_DECISION.format(p="?")
_INSERT_DECISION = insertDecision("?")

#: Each entry takes the schema from its index to the next version.
MIGRATIONS: Sequence[str] = [
    """
    CREATE TABLE peers (
        fingerprint TEXT PRIMARY KEY,
        org TEXT NOT NULL,
        service TEXT NOT NULL,
        algorithm TEXT NOT NULL,
        public_key BLOB NOT NULL,
        state TEXT NOT NULL CHECK (state IN
            ('pending', 'approved', 'denied', 'revoked', 'blocked')),
        first_seen REAL NOT NULL,
        last_seen REAL NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        source TEXT NOT NULL,
        decided_by TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX peers_by_service ON peers (org, service);
    CREATE TABLE known_services (
        address TEXT PRIMARY KEY,
        org TEXT NOT NULL,
        service TEXT NOT NULL,
        algorithm TEXT NOT NULL,
        public_key BLOB NOT NULL,
        fingerprint TEXT NOT NULL,
        first_seen REAL NOT NULL
    );
    CREATE INDEX known_services_by_service ON known_services (org, service);
    """,
    """
    ALTER TABLE peers ADD COLUMN decision BLOB NOT NULL DEFAULT x'';
    ALTER TABLE peers ADD COLUMN request_id TEXT NOT NULL DEFAULT '';
    ALTER TABLE peers ADD COLUMN expires REAL NOT NULL DEFAULT 0;
    ALTER TABLE peers ADD COLUMN source_host TEXT NOT NULL DEFAULT '';
    CREATE INDEX peers_pending_by_source ON peers (source_host)
        WHERE state = 'pending';
    CREATE TABLE owners (
        fingerprint TEXT PRIMARY KEY,
        registration BLOB NOT NULL
    );
    """,
    # Version 3: each key's decisions, append-only, in order.  A decision
    # stored before has no place in history: it becomes sequence 0.
    """
    CREATE TABLE decisions (
        fingerprint TEXT NOT NULL,
        sequence INTEGER NOT NULL,
        org TEXT NOT NULL,
        service TEXT NOT NULL,
        algorithm TEXT NOT NULL,
        public_key BLOB NOT NULL,
        state TEXT NOT NULL,
        decided_by TEXT NOT NULL,
        sent_by TEXT NOT NULL,
        recorded_at REAL NOT NULL,
        decision BLOB NOT NULL,
        PRIMARY KEY (fingerprint, sequence)
    );
    INSERT INTO decisions
        SELECT fingerprint, 0, org, service, algorithm, public_key, state,
            decided_by, '', last_seen, decision
        FROM peers WHERE state != 'pending' AND length(decision) > 0;
    UPDATE peers SET decision = x'';
    CREATE TRIGGER decisions_are_not_updated BEFORE UPDATE ON decisions
    BEGIN SELECT RAISE(ABORT, 'decisions are append-only'); END;
    CREATE TRIGGER decisions_are_not_deleted BEFORE DELETE ON decisions
    BEGIN SELECT RAISE(ABORT, 'decisions are append-only'); END;
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)


#: Seconds between checks for changes made by other processes, while the
#: store is watched (see L{SQLiteStore.watch}).
WATCH_INTERVAL = 0.25


class StoreError(Exception):
    """
    The store cannot be opened or used: the message says why.
    """


def _configure(connection: sqlite3.Connection) -> None:
    """
    Set up a connection: WAL journal, full syncs, and waiting (not failing)
    while another process holds a lock.  Runs in a thread, never on the
    reactor.
    """
    connection.execute("PRAGMA busy_timeout = 5000")
    # Switching a new file to WAL needs it to ourselves, and SQLite reports a
    # concurrent opener as "locked" at once rather than through the busy
    # timeout, so retry for a while.
    for attempt in range(100):
        try:
            connection.execute("PRAGMA journal_mode = WAL")
            break
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or attempt == 99:
                raise
            time.sleep(0.05)
    connection.execute("PRAGMA synchronous = NORMAL")


def _refuseNewer(connection: sqlite3.Connection) -> None:
    (version,) = connection.execute("PRAGMA user_version").fetchone()
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"the trust store has schema version {version}, newer than"
            f" this dwtrust's {SCHEMA_VERSION}; upgrade dwtrust"
        )


def _statements(script: str) -> list[str]:
    """
    The statements of a migration script, in order (a trigger's body, from
    C{BEGIN} to C{END;}, is part of its statement).
    """
    statements, current = [], ""
    for piece in script.split(";"):
        current += piece + ";"
        if sqlite3.complete_statement(current):
            if current.strip(" \n;"):
                statements.append(current)
            current = ""
    return statements


def migrate(connection: sqlite3.Connection) -> int:
    """
    Bring the schema up to L{SCHEMA_VERSION}, one step per transaction, so
    that several processes opening the same file at once migrate it once.

    @param connection: a connection in autocommit mode
        (C{isolation_level=None}).
    @return: the version it was at.
    @raise StoreError: if the file has a newer schema than this code knows.
    """
    (start,) = connection.execute("PRAGMA user_version").fetchone()
    for step in range(SCHEMA_VERSION):
        connection.execute("BEGIN IMMEDIATE")
        try:
            _refuseNewer(connection)
            (version,) = connection.execute("PRAGMA user_version").fetchone()
            if version == step:
                for statement in _statements(MIGRATIONS[step]):
                    connection.execute(statement)
                connection.execute(f"PRAGMA user_version = {step + 1}")
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        connection.execute("COMMIT")
    return int(start)


def migrateFile(path: str) -> int:
    """
    Open the SQLite file at C{path} (creating it) and L{migrate} it.  Blocks:
    run it in a thread.
    """
    try:
        connection = sqlite3.connect(path, isolation_level=None, timeout=5.0)
    except sqlite3.Error as e:
        raise StoreError(f"cannot open the trust store {path}: {e}") from None
    try:
        # Refuse a newer schema before anything (even the switch to WAL mode)
        # writes to the file.
        _refuseNewer(connection)
        _configure(connection)
        return migrate(connection)
    except sqlite3.DatabaseError as e:
        raise StoreError(f"cannot use the trust store {path}: {e}") from None
    finally:
        connection.close()


def ownersInFile(path: str) -> list[bytes]:
    """
    The owner registrations in the (migrated) store at C{path}.  Blocks: for
    start-up, before the reactor runs.
    """
    connection = sqlite3.connect(path, timeout=5.0)
    try:
        rows = connection.execute(
            "SELECT registration FROM owners ORDER BY fingerprint"
        ).fetchall()
    except sqlite3.DatabaseError as e:
        raise StoreError(f"cannot read the owners in {path}: {e}") from None
    finally:
        connection.close()
    return [bytes(row[0]) for row in rows]


def _pool(path: FilePath[str]) -> adbapi.ConnectionPool:
    # One connection: SQLite serialises writers anyway, and one thread keeps
    # the order of operations the order they were asked in.
    return adbapi.ConnectionPool(
        "sqlite3",
        path.path,
        check_same_thread=False,
        cp_min=1,
        cp_max=1,
        cp_openfun=_configure,
        cp_noisy=False,
    )


class _Seen:
    """
    Where a watched store's last look at its file left off: the file's
    C{data_version}, the last row of the decisions' history, the pending
    requests (fingerprint to request id) and the owners' fingerprints.
    """

    def __init__(
        self,
        version: int,
        decisionRow: int,
        requests: dict[str, str],
        owners: frozenset[str],
    ) -> None:
        self.version = version
        self.decisionRow = decisionRow
        self.requests = requests
        self.owners = owners


#: How many of its own writes a watched store remembers, to tell them from
#: other processes' (a write older than that is told again, harmlessly).
_MAX_MINE = 10_000


@implementer(ITrustStore, IKnownServices)
class SQLiteStore:
    """
    The trust store and the client's pins, in one SQLite file.

    It also has L{watch} (the contract of
    L{dwtrust.store.IStoreEvents}), for the processes of one daemon
    sharing the file (C{twistd dwtrust --workers}); it does not declare that
    interface, so that a daemon that is one process does not watch it.
    """

    log = Logger()

    def __init__(
        self,
        pool: adbapi.ConnectionPool,
        now: Callable[[], float] = time.time,
        clock: IReactorTime | None = None,
    ) -> None:
        self._pool = pool
        self._now = now
        if clock is None:
            from twisted.internet import reactor

            clock = reactor
        self._clock: IReactorTime = clock
        self._cache = ReadCache(clock, self._dataVersion)
        # Attempts counted by seen() and not written yet.
        self._attempts = AttemptCounter(clock, self._now, self._writeAttempts)
        # Watching (see watch): who is told, the checks, where they stand,
        # and what this store wrote itself (decisions by fingerprint and
        # sequence, pending requests by id, owners by fingerprint).
        self._watchers: list[Callable[[StoreChange], object]] = []
        self._watching: LoopingCall | None = None
        self._where: _Seen | None = None
        self._mine: set[tuple[str, int]] = set()
        self._myRequests: set[str] = set()
        self._myOwners: set[str] = set()

    def _dataVersion(self) -> Deferred[int]:
        return self._one("PRAGMA data_version", (), lambda row: int(row[0]))

    @classmethod
    def fromPath(
        cls,
        path: FilePath[str],
        now: Callable[[], float] = time.time,
        clock: IReactorTime | None = None,
    ) -> SQLiteStore:
        """
        Open the store at C{path} at once.  This blocks while it migrates the
        file: call it only before the reactor runs (as C{twistd}'s
        C{makeService} does), and L{open} otherwise.

        @raise StoreError: if the file cannot be used.
        """
        migrateFile(path.path)
        return cls(_pool(path), now, clock)

    @classmethod
    def open(
        cls,
        path: FilePath[str],
        now: Callable[[], float] = time.time,
        clock: IReactorTime | None = None,
    ) -> Deferred[SQLiteStore]:
        """
        Open (creating and migrating as needed) the store at C{path}.

        @param clock: schedules the store's own work (writing attempt counts,
            checking for other writers); the reactor by default.
        """

        def migrated(_: object) -> SQLiteStore:
            return cls(_pool(path), now, clock)

        opening: Deferred[int] = threads.deferToThread(migrateFile, path.path)
        return opening.addCallback(migrated)

    def close(self) -> Deferred[None]:
        """
        Write the attempts counted and not written yet, then close.
        """
        self._cache.stop()
        watching, self._watching = self._watching, None
        if watching is not None and watching.running:
            watching.stop()

        def closed(result: object) -> None:
            self._pool.close()

        return self._attempts.flush().addBoth(closed)

    def _one(
        self, sql: str, parameters: tuple[Any, ...], convert: Callable[[Any], Any]
    ) -> Deferred[Any]:
        """
        Run a query in the pool's thread; fire with its first row converted,
        or L{None} if it has none.
        """

        def query(cursor: Any) -> Any:
            cursor.execute(sql, parameters)
            row = cursor.fetchone()
            return None if row is None else convert(row)

        result: Deferred[Any] = self._pool.runInteraction(query)
        return result

    def _all(
        self, sql: str, parameters: tuple[Any, ...], convert: Callable[[Any], Any]
    ) -> Deferred[list[Any]]:
        """
        Run a query in the pool's thread; fire with all its rows converted.
        """

        def query(cursor: Any) -> list[Any]:
            cursor.execute(sql, parameters)
            return [convert(row) for row in cursor.fetchall()]

        result: Deferred[list[Any]] = self._pool.runInteraction(query)
        return result

    # ITrustStore

    def lookup(self, fingerprint: str) -> Deferred[KeyRecord | None]:
        """
        The record of a key: from memory for a decided key read before (see
        L{dwtrust.store._cache}), from the file otherwise.
        """
        cached: KeyRecord | None = self._cache.records.values.get(fingerprint)
        if cached is not None:
            return succeed(cached)
        generation = self._cache.generation

        def keep(record: KeyRecord | None) -> KeyRecord | None:
            if (
                record is not None
                and record.state is not KeyState.pending
                and self._cache.mayKeep(generation)
            ):
                self._cache.records.keep(fingerprint, record)
            return record

        def read(cursor: Any) -> KeyRecord | None:
            return self._fetch(cursor, fingerprint)

        reading: Deferred[KeyRecord | None] = self._pool.runInteraction(read)
        return reading.addCallback(keep)

    def keysFor(self, org: str, service: str) -> Deferred[list[KeyRecord]]:
        return self._all(
            f"{SELECT_RECORDS} WHERE p.org = ? AND p.service = ? ORDER BY p.first_seen",
            (org, service),
            recordOf,
        )

    def record(
        self,
        peer: PeerIdentity,
        state: KeyState,
        source: str,
        decidedBy: str,
        decision: bytes = b"",
        sequence: int = 0,
        sentBy: str = "",
    ) -> Deferred[KeyRecord]:
        now = self._now()
        self._cache.changed(record=peer.fingerprint)
        if self._watchers:
            self._remember(self._mine, (peer.fingerprint, sequence))

        def append(cursor: Any) -> KeyRecord:
            cursor.execute("SAVEPOINT record")
            try:
                cursor.execute(
                    _INSERT_DECISION,
                    decisionRow(
                        peer, sequence, state, decidedBy, sentBy, now, decision
                    ),
                )
            except sqlite3.IntegrityError:
                cursor.execute("ROLLBACK TO record")
                raise DecisionConflict(
                    f"the store already holds decision {sequence} about"
                    f" {peer.fingerprint}"
                ) from None
            finally:
                cursor.execute("RELEASE record")
            cursor.execute(
                f"INSERT INTO peers ({PEER_COLUMNS})"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1, ?, ?, x'', '', 0)"
                " ON CONFLICT (fingerprint) DO UPDATE SET state = excluded.state,"
                " last_seen = excluded.last_seen, source = excluded.source,"
                " decided_by = excluded.decided_by, request_id = '', expires = 0",
                (
                    peer.fingerprint,
                    peer.org,
                    peer.service,
                    peer.algorithm,
                    peer.publicKey.blob,
                    state.value,
                    now,
                    now,
                    source,
                    decidedBy,
                ),
            )
            return self._written(cursor, peer.fingerprint)

        result: Deferred[KeyRecord] = self._pool.runInteraction(append)
        return result.addCallback(self._madeDecision)

    def _madeDecision(self, record: KeyRecord) -> KeyRecord:
        self._announce(StoreChange("decided", record.fingerprint, record, True))
        return record

    def _fetch(self, cursor: Any, fingerprint: str) -> KeyRecord | None:
        cursor.execute(_SELECT_PEER, (fingerprint,))
        peer = cursor.fetchone()
        cursor.execute(_SELECT_NEWEST, (fingerprint,))
        return combinedRecord(peer, cursor.fetchone())

    def _written(self, cursor: Any, fingerprint: str) -> KeyRecord:
        """
        The record of a key just written in this transaction.
        """
        record = self._fetch(cursor, fingerprint)
        assert record is not None
        return record

    def addPending(
        self,
        peer: PeerIdentity,
        source: str,
        requestId: str,
        expires: float,
        maxPerSource: int,
        maxTotal: int,
    ) -> Deferred[tuple[KeyRecord, bool]]:
        now = self._now()
        host = sourceHost(source)
        self._cache.changed(record=peer.fingerprint)
        if self._watchers:
            self._remember(self._myRequests, requestId)

        def add(cursor: Any) -> tuple[KeyRecord, bool]:
            cursor.execute(
                "UPDATE peers SET attempts = attempts + 1, last_seen = ?,"
                " source = ?, source_host = ?"
                " WHERE fingerprint = ? AND state = 'pending'",
                (now, source, host, peer.fingerprint),
            )
            if cursor.rowcount:
                return self._written(cursor, peer.fingerprint), False
            cursor.execute(
                "SELECT COUNT(*), COALESCE(SUM(source_host = ?), 0) FROM peers"
                " WHERE state = 'pending'",
                (host,),
            )
            total, fromSource = cursor.fetchone()
            checkPendingCaps(host, fromSource, total, maxPerSource, maxTotal)
            # A row that is there but not pending is one whose decision did
            # not verify (its policy treats the key as unknown): the request
            # replaces it.
            cursor.execute(
                f"INSERT INTO peers ({PEER_COLUMNS}, source_host)"
                " VALUES (?, ?, ?, ?, ?, 'pending', ?, ?, 1, ?, '', x'', ?, ?, ?)"
                " ON CONFLICT (fingerprint) DO UPDATE SET state = 'pending',"
                " last_seen = excluded.last_seen, attempts = attempts + 1,"
                " source = excluded.source, source_host = excluded.source_host,"
                " decided_by = '', decision = x'', request_id = excluded.request_id,"
                " expires = excluded.expires",
                (
                    peer.fingerprint,
                    peer.org,
                    peer.service,
                    peer.algorithm,
                    peer.publicKey.blob,
                    now,
                    now,
                    source,
                    requestId,
                    expires,
                    host,
                ),
            )
            return self._written(cursor, peer.fingerprint), True

        result: Deferred[tuple[KeyRecord, bool]] = self._pool.runInteraction(add)
        return result.addCallback(self._madeRequest)

    def _madeRequest(self, added: tuple[KeyRecord, bool]) -> tuple[KeyRecord, bool]:
        record, created = added
        if created:
            self._announce(StoreChange("pending", record.fingerprint, record, True))
        return added

    def pending(self) -> Deferred[list[KeyRecord]]:
        return self._all(
            SELECT_PENDING,
            (),
            recordOf,
        )

    def decided(self) -> Deferred[list[KeyRecord]]:
        return self._all(
            SELECT_DECIDED,
            (),
            recordOf,
        )

    def expirePending(self, now: float) -> Deferred[list[KeyRecord]]:
        self._cache.changed()

        def expire(cursor: Any) -> list[KeyRecord]:
            cursor.execute(
                f"{SELECT_RECORDS} WHERE p.state = 'pending' AND p.expires < ?",
                (now,),
            )
            lapsed = [recordOf(row) for row in cursor.fetchall()]
            cursor.execute(
                "DELETE FROM peers WHERE state = 'pending' AND expires < ?", (now,)
            )
            return lapsed

        result: Deferred[list[KeyRecord]] = self._pool.runInteraction(expire)
        return result

    def owners(self) -> Deferred[list[bytes]]:
        return self._all(
            "SELECT registration FROM owners ORDER BY fingerprint",
            (),
            lambda row: bytes(row[0]),
        )

    def addOwner(self, fingerprint: str, registration: bytes) -> Deferred[None]:
        if self._watchers:
            self._remember(self._myOwners, fingerprint)
        result: Deferred[None] = self._pool.runOperation(
            "INSERT OR REPLACE INTO owners (fingerprint, registration) VALUES (?, ?)",
            (fingerprint, registration),
        )

        def added(_: object) -> None:
            self._announce(StoreChange("owner", fingerprint, None, True))

        return result.addCallback(added)

    def seen(self, fingerprint: str, source: str) -> Deferred[None]:
        """
        Count the attempt now; write it, with the others counted meanwhile
        in one transaction, at most a second later (see L{AttemptCounter}), so that
        a known peer's connection costs no trip to the database thread.  The
        L{Deferred} fires once it is written.
        """
        return self._attempts.count(fingerprint, source)

    def _writeAttempts(self, rows: Rows) -> Deferred[None]:
        def write(cursor: Any) -> None:
            cursor.executemany(
                "UPDATE peers SET attempts = attempts + ?, last_seen = ?,"
                " source = ? WHERE fingerprint = ?",
                rows,
            )

        writing: Deferred[None] = self._pool.runInteraction(write)
        return writing

    # Watching (the contract of IStoreEvents)

    def watch(self, watcher: Callable[[StoreChange], object]) -> Callable[[], None]:
        """
        Call C{watcher} (in the reactor thread) with every change from now
        on: this store's own as it makes them, and those of other processes
        sharing the file within L{WATCH_INTERVAL} seconds.  Every check is
        one query (C{PRAGMA data_version}, which tells whether another
        connection committed); only when one did does it read what is new:
        the decisions' history past the last row seen (it is append-only),
        the pending requests and the owners.

        @return: a function that stops it.
        """
        self._watchers.append(watcher)
        if self._watching is None:
            self._watching = LoopingCall(self._checkChanges)
            self._watching.clock = self._clock
            self._watching.start(WATCH_INTERVAL, now=True).addErrback(
                lambda f: self.log.failure("dwtrust: watching the trust store", f)
            )
        return lambda: self._watchers.remove(watcher)

    @staticmethod
    def _remember(mine: set[Any], what: object) -> None:
        if len(mine) >= _MAX_MINE:
            mine.clear()
        mine.add(what)

    def _announce(self, change: StoreChange) -> None:
        for watcher in list(self._watchers):
            try:
                watcher(change)
            except Exception:
                self.log.failure("dwtrust: a store watcher failed")

    def _checkChanges(self) -> Deferred[None]:
        where = self._where
        mine, myRequests = frozenset(self._mine), frozenset(self._myRequests)
        myOwners = frozenset(self._myOwners)

        def read(cursor: Any) -> tuple[_Seen, list[StoreChange], set[Any]]:
            cursor.execute("PRAGMA data_version")
            (version,) = cursor.fetchone()
            if where is not None and version == where.version:
                return where, [], set()
            if where is None:
                cursor.execute("SELECT COALESCE(MAX(rowid), 0) FROM decisions")
                rows, (last,) = [], cursor.fetchone()
            else:
                cursor.execute(
                    "SELECT rowid, fingerprint, sequence FROM decisions"
                    " WHERE rowid > ? ORDER BY rowid",
                    (where.decisionRow,),
                )
                rows = cursor.fetchall()
                last = max([row[0] for row in rows], default=where.decisionRow)
            cursor.execute(
                "SELECT fingerprint, request_id FROM peers WHERE state = 'pending'"
            )
            requests = {str(fp): str(rid) for fp, rid in cursor.fetchall()}
            cursor.execute("SELECT fingerprint FROM owners")
            owners = frozenset(str(row[0]) for row in cursor.fetchall())
            if where is None:
                # The first look: where things stand, nothing to tell.
                return _Seen(version, last, requests, owners), [], set()
            seen: set[Any] = set()
            decided: dict[str, None] = {}
            for _, fingerprint, sequence in rows:
                if (fingerprint, sequence) in mine:
                    seen.add((fingerprint, sequence))
                else:
                    decided[fingerprint] = None
            changes = [
                StoreChange("decided", fp, self._fetch(cursor, fp), False)
                for fp in decided
            ]
            for fingerprint, requestId in requests.items():
                if where.requests.get(fingerprint) == requestId:
                    continue
                if requestId in myRequests:
                    seen.add(requestId)
                    continue
                record = self._fetch(cursor, fingerprint)
                if record is not None and record.state is KeyState.pending:
                    changes.append(StoreChange("pending", fingerprint, record, False))
            for fingerprint in sorted(owners - where.owners):
                if fingerprint in myOwners:
                    seen.add(fingerprint)
                else:
                    changes.append(StoreChange("owner", fingerprint, None, False))
            return _Seen(version, last, requests, owners), changes, seen

        def tell(found: tuple[_Seen, list[StoreChange], set[Any]]) -> None:
            self._where, changes, seen = found
            for what in seen:
                self._mine.discard(what)
                self._myRequests.discard(what)
                self._myOwners.discard(what)
            for change in changes:
                if change.kind == "decided":
                    self._cache.changed(record=change.fingerprint)
                self._announce(change)

        def failed(failure: Failure) -> None:
            if self._watching is None:
                return  # closing
            self.log.warn(
                "dwtrust: cannot check the trust store for other processes'"
                " changes: {error}",
                event="dwtrust.store.watch_failed",
                error=failure.getErrorMessage(),
            )

        checking: Deferred[tuple[_Seen, list[StoreChange], set[Any]]]
        checking = self._pool.runInteraction(read)
        return checking.addCallbacks(tell, failed)

    # IKnownServices

    def pinned(self, address: str) -> Deferred[Pin | None]:
        """
        The pin for C{address}: from memory if it was read before (see
        L{dwtrust.store._cache}), from the file otherwise.
        """
        cached: Pin | None = self._cache.pins.values.get(address)
        if cached is not None:
            return succeed(cached)
        generation = self._cache.generation

        def keep(pin: Pin | None) -> Pin | None:
            if pin is not None and self._cache.mayKeep(generation):
                self._cache.pins.keep(address, pin)
            return pin

        reading: Deferred[Pin | None] = self._one(
            f"SELECT {PIN_COLUMNS} FROM known_services WHERE address = ?",
            (address,),
            pinOf,
        )
        return reading.addCallback(keep)

    def pinnedService(self, org: str, service: str) -> Deferred[list[Pin]]:
        return self._all(
            f"SELECT {PIN_COLUMNS} FROM known_services"
            " WHERE org = ? AND service = ? ORDER BY first_seen",
            (org, service),
            pinOf,
        )

    def pin(self, address: str, peer: PeerIdentity) -> Deferred[Pin]:
        pin = Pin.of(address, peer, self._now())
        self._cache.changed(pin=address)

        def insert(cursor: Any) -> Pin:
            cursor.execute(
                f"INSERT OR REPLACE INTO known_services ({PIN_COLUMNS})"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    pin.address,
                    pin.org,
                    pin.service,
                    pin.algorithm,
                    pin.publicKey,
                    pin.fingerprint,
                    pin.firstSeen,
                ),
            )
            return pin

        result: Deferred[Any] = self._pool.runInteraction(insert)

        return result

    def unpin(self, address: str) -> Deferred[bool]:
        self._cache.changed(pin=address)

        def delete(cursor: Any) -> bool:
            cursor.execute("DELETE FROM known_services WHERE address = ?", (address,))
            return bool(cursor.rowcount)

        result: Deferred[Any] = self._pool.runInteraction(delete)

        return result
