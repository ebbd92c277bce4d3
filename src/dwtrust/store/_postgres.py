"""
The fleet's trust store: one PostgreSQL database shared by every instance of
a service, with changes announced to all of them by C{LISTEN}/C{NOTIFY}.

Queries run in psycopg's own connection pool (C{psycopg_pool}, at most
C{poolSize} connections, each checked as it is taken, none kept longer than
L{MAX_LIFETIME}), from a Twisted thread pool of as many threads, never on the
reactor thread.  Every write that others must hear about sends its
C{NOTIFY} in its own transaction, so that it is delivered only if the write
commits.  A dedicated connection, outside the pool and in a thread of its
own, listens, and hands each notification to the reactor.  The connections
name themselves to the server (C{application_name}, see
L{APPLICATION_NAME}), so that operators can tell them apart in
C{pg_stat_activity}.

The pool is psycopg_pool's synchronous C{ConnectionPool}, not its
C{AsyncConnectionPool}: that one runs on an asyncio event loop, and the
reactor C{twistd} runs is not asyncio's (nor can a library choose it for the
application), so the synchronous pool's blocking calls run in the Twisted
thread pool, through C{deferToThreadPool}.

The store keeps a bounded cache of the decided records it has read,
refreshed by the notifications.  A lookup of a key in it is answered from
memory while the cache is known to be current: the store sends itself a
heartbeat through the server every L{HEARTBEAT_INTERVAL} seconds, and
notifications arrive in commit order, so while the newest heartbeat heard
was sent less than L{FRESHNESS} seconds ago no answer misses a change
committed longer ago than that (see L{PostgreSQLStore._fresh}).  A
listener whose heartbeats stop coming back for L{LISTENER_STALL} seconds
reconnects.  While the server cannot be reached,
L{PostgreSQLStore.lookup} answers from that cache for keys it holds, and
fails with L{StoreUnavailable} for the others; every write fails with
L{StoreUnavailable}, so that nothing is lost silently.  Both the pool and the
listener reconnect by themselves.  While the store knows the server to be
unavailable, a query waits at most L{UNAVAILABLE_WAIT} for a connection,
and for L{PROBE_INTERVAL} after a query failed, a key in the cache is
answered from it at once (a notification is always read afresh).

Whenever the listener connects (again), the store catches up what it may
have missed while it did not listen: it reads the pending requests and the
keys it has an interest in (those in its cache, and those whose pending
request it knew of, made or counted an attempt on), and announces every
request and every decision it had not heard of, as the notification would
have (see L{PostgreSQLStore._catchUp}).

The schema is the SQLite store's, version for version, and its version is
kept in the one-row table C{dwtrust_schema}.  Each key's decisions are
append-only (see L{dwtrust.store._rows}): the instances only ever insert
into C{decisions}, so their role needs no more than C{SELECT, INSERT} on it
(docs/fleet.rst lists the grants), and triggers refuse C{UPDATE}, C{DELETE}
and C{TRUNCATE} to every role.
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from attrs import evolve
from twisted.internet import threads
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import (
    IDelayedCall,
    IReactorCore,
    IReactorFromThreads,
)
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from .._identity import PeerIdentity
from ._attempts import AttemptCounter, Rows
from ._interface import (
    DecisionConflict,
    IKnownServices,
    IStoreEvents,
    ITrustStore,
    KeyRecord,
    KeyState,
    PendingFull,
    Pin,
    StoreChange,
    sourceHost,
)
from ._open import DEFAULT_POOL_SIZE, StoreUnavailable, redacted
from ._rows import (
    DECISION_COLUMNS,
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
from ._sqlite import SCHEMA_VERSION, StoreError

_INSERT_DECISION = insertDecision("%s")

if TYPE_CHECKING:
    import psycopg
    import psycopg_pool

    Connection = psycopg.Connection[Any]
    Cursor = psycopg.Cursor[Any]
    Pool = psycopg_pool.ConnectionPool[Connection]

T = TypeVar("T")

#: The channel every change is announced on.
CHANNEL = "dwtrust_changes"
#: Advisory lock keys: one for migrations, one for new pending requests.
MIGRATION_LOCK = 0x6477_7472_0001
PENDING_LOCK = 0x6477_7472_0002
#: Decided records kept for outages, at most.
CACHE_SIZE = 100_000
#: Seconds allowed to open a connection, and so the longest a query waits
#: for one from the pool while the server is thought to be available.
CONNECT_TIMEOUT = 5
#: The longest a query waits for a connection while the server is known to
#: be unavailable: long enough for the pool's next attempt to connect (see
#: L{RECONNECT_TIMEOUT}), short enough not to hold up refusals in an outage.
UNAVAILABLE_WAIT = 2.0
#: Seconds after a query failed for want of the server during which keys in
#: the cache are answered from it at once; then one lookup tries the server
#: again (see L{PostgreSQLStore._poolDown}).
PROBE_INTERVAL = 2.0
#: Seconds the pool keeps trying to replace a connection (about once a
#: second) before it gives up until a query needs one again: after an
#: outage, a query finds the server again within about a second.
RECONNECT_TIMEOUT = 2.0
#: The oldest a pooled connection gets before the pool replaces it, in
#: seconds (psycopg_pool takes up to 5% off each, so that they are not all
#: replaced at once).
MAX_LIFETIME = 30 * 60.0
#: What the store's connections call themselves in C{pg_stat_activity}
#: (unless the URL sets C{application_name}): the pool's connections (and
#: the short-lived ones that migrate and read at start-up), and the
#: listener's.
APPLICATION_NAME = "dwtrust"
LISTENER_NAME = "dwtrust-listener"
#: Seconds the pool's own threads are given to stop when the reactor stops
#: with the store open.
SHUTDOWN_WAIT = 1.0
#: The listener's longest wait between attempts to reconnect, in seconds.
MAX_BACKOFF = 2.0
#: Seconds the listener waits for notifications before it checks whether it
#: should stop.
LISTEN_POLL = 0.25
#: Times a transaction that lost a serialization conflict is tried again.
RETRIES = 3
#: Seconds between the heartbeats each store sends itself through the
#: server (a C{NOTIFY} on a channel of its own, see L{PostgreSQLStore.beat}).
HEARTBEAT_INTERVAL = 0.5
#: The cache answers a lookup only while the newest heartbeat this store
#: heard was sent less than this many seconds ago: a change committed
#: earlier than that has been heard (notifications arrive in commit order),
#: so no answer is older than this bound.
FRESHNESS = 2.0
#: Seconds after a heartbeat was committed by which the listener must have
#: heard it; if it has not, the listener's connection is taken for stalled
#: (silently cut, or a server that no longer delivers), and it reconnects.
LISTENER_STALL = 5.0

#: Each entry takes the schema from its index to the next version: the same
#: steps as L{dwtrust.store._sqlite.MIGRATIONS}, in PostgreSQL's types.
MIGRATIONS: Sequence[str] = [
    """
    CREATE TABLE peers (
        fingerprint TEXT PRIMARY KEY,
        org TEXT NOT NULL,
        service TEXT NOT NULL,
        algorithm TEXT NOT NULL,
        public_key BYTEA NOT NULL,
        state TEXT NOT NULL CHECK (state IN
            ('pending', 'approved', 'denied', 'revoked', 'blocked')),
        first_seen DOUBLE PRECISION NOT NULL,
        last_seen DOUBLE PRECISION NOT NULL,
        attempts BIGINT NOT NULL DEFAULT 0,
        source TEXT NOT NULL,
        decided_by TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX peers_by_service ON peers (org, service);
    CREATE TABLE known_services (
        address TEXT PRIMARY KEY,
        org TEXT NOT NULL,
        service TEXT NOT NULL,
        algorithm TEXT NOT NULL,
        public_key BYTEA NOT NULL,
        fingerprint TEXT NOT NULL,
        first_seen DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX known_services_by_service ON known_services (org, service);
    """,
    """
    ALTER TABLE peers ADD COLUMN decision BYTEA NOT NULL DEFAULT '\\x';
    ALTER TABLE peers ADD COLUMN request_id TEXT NOT NULL DEFAULT '';
    ALTER TABLE peers ADD COLUMN expires DOUBLE PRECISION NOT NULL DEFAULT 0;
    ALTER TABLE peers ADD COLUMN source_host TEXT NOT NULL DEFAULT '';
    CREATE INDEX peers_pending_by_source ON peers (source_host)
        WHERE state = 'pending';
    CREATE TABLE owners (
        fingerprint TEXT PRIMARY KEY,
        registration BYTEA NOT NULL
    );
    """,
    # Version 3: each key's decisions, append-only, in order.  A decision
    # stored before has no place in history: it becomes sequence 0.  The
    # instances' role is granted no UPDATE or DELETE on the table (see
    # docs/fleet.rst); the triggers refuse them to every role, the owner's
    # included, unless it drops them first.
    """
    CREATE TABLE decisions (
        fingerprint TEXT NOT NULL,
        sequence BIGINT NOT NULL,
        org TEXT NOT NULL,
        service TEXT NOT NULL,
        algorithm TEXT NOT NULL,
        public_key BYTEA NOT NULL,
        state TEXT NOT NULL,
        decided_by TEXT NOT NULL,
        sent_by TEXT NOT NULL,
        recorded_at DOUBLE PRECISION NOT NULL,
        decision BYTEA NOT NULL,
        PRIMARY KEY (fingerprint, sequence)
    );
    INSERT INTO decisions
        SELECT fingerprint, 0, org, service, algorithm, public_key, state,
            decided_by, '', last_seen, decision
        FROM peers WHERE state != 'pending' AND length(decision) > 0;
    UPDATE peers SET decision = '\\x';
    CREATE FUNCTION dwtrust_decisions_are_append_only() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION 'decisions are append-only';
        END
        $$;
    CREATE TRIGGER decisions_are_not_changed BEFORE UPDATE OR DELETE ON decisions
        FOR EACH ROW EXECUTE FUNCTION dwtrust_decisions_are_append_only();
    CREATE TRIGGER decisions_are_not_truncated BEFORE TRUNCATE ON decisions
        FOR EACH STATEMENT EXECUTE FUNCTION dwtrust_decisions_are_append_only();
    """,
]
assert len(MIGRATIONS) == SCHEMA_VERSION, "the SQLite and PostgreSQL schemas differ"


def _columns(columns: str, table: str) -> str:
    return ", ".join(f"{table}.{column.strip()}" for column in columns.split(","))


#: The records of the keys in an array (one parameter): a row for each,
#: with the C{peers} columns and the newest decision's (L{None} where there
#: is none), for L{combinedRecord}.
_SELECT_KEYS = (
    f"SELECT {_columns(PEER_COLUMNS, 'p')}, {_columns(DECISION_COLUMNS, 'd')}"
    " FROM unnest(%s::text[]) AS k (fingerprint)"
    " LEFT JOIN peers p ON p.fingerprint = k.fingerprint"
    f" LEFT JOIN LATERAL ({SELECT_NEWEST_DECISION.format(p='k.fingerprint')}) d"
    " ON TRUE"
)
_PEER_WIDTH = len(PEER_COLUMNS.split(","))


def driver() -> Any:
    """
    The psycopg module.

    @raise StoreError: if it is not installed, saying how to install it.
    """
    try:
        import psycopg
    except ImportError:
        raise StoreError(
            "a postgresql:// trust store needs psycopg: pip install dwtrust[postgresql]"
        ) from None
    return psycopg


def poolDriver() -> Any:
    """
    The psycopg_pool module.

    @raise StoreError: if it is not installed, saying how to install it.
    """
    try:
        import psycopg_pool
    except ImportError:
        raise StoreError(
            "a postgresql:// trust store needs psycopg-pool:"
            " pip install dwtrust[postgresql]"
        ) from None
    # Its warnings (each failed attempt to connect) would otherwise go to
    # stderr, which twistd logs line by line: the store logs an outage once,
    # itself.  An application that configures logging still gets them.
    logging.getLogger("psycopg.pool").addHandler(_quiet)
    return psycopg_pool


_quiet = logging.NullHandler()


def _named(url: str, name: str) -> dict[str, str]:
    """
    The connection parameter that names a connection C{name} in
    C{pg_stat_activity}, unless C{url} names it already.
    """
    from psycopg.conninfo import conninfo_to_dict

    try:
        given = conninfo_to_dict(url)
    except driver().Error:
        # Connecting will say what is wrong with it.
        given = {}
    return {} if "application_name" in given else {"application_name": name}


def _message(error: BaseException) -> str:
    """
    The first line of a driver error, without the noise.
    """
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def connect(url: str, name: str = APPLICATION_NAME) -> Connection:
    """
    A new autocommit connection to C{url}, called C{name} in
    C{pg_stat_activity}.  Blocks.

    @raise StoreUnavailable: if the server cannot be reached.
    @raise StoreError: if C{url} is not usable.
    """
    psycopg = driver()
    try:
        connection: Connection = psycopg.connect(
            url,
            autocommit=True,
            connect_timeout=CONNECT_TIMEOUT,
            **_named(url, name),
        )
    except psycopg.OperationalError as e:
        raise StoreUnavailable(
            f"the trust store {redacted(url)} is unavailable: {_message(e)}"
        ) from None
    except psycopg.Error as e:
        raise StoreError(
            f"cannot use the trust store {redacted(url)}: {_message(e)}"
        ) from None
    return connection


def _version(connection: Connection) -> int | None:
    """
    The schema version, or L{None} if there is no schema table yet.
    """
    (table,) = connection.execute(
        "SELECT to_regclass('dwtrust_schema')"
    ).fetchone() or (None,)
    if table is None:
        return None
    row = connection.execute("SELECT version FROM dwtrust_schema").fetchone()
    return 0 if row is None else int(row[0])


def _refuseNewer(version: int | None) -> None:
    if version is not None and version > SCHEMA_VERSION:
        raise StoreError(
            f"the trust store has schema version {version}, newer than"
            f" this dwtrust's {SCHEMA_VERSION}; upgrade dwtrust"
        )


def migrate(connection: Connection) -> int:
    """
    Bring the schema up to L{SCHEMA_VERSION}, one step per transaction, each
    under an advisory lock, so that several instances starting at once
    migrate it once.  A database with a newer schema is refused untouched.

    @param connection: an autocommit connection.
    @return: the version it was at (0 for a new database).
    @raise StoreError: if the database has a newer schema than this code
        knows.
    """
    start = _version(connection)
    _refuseNewer(start)
    if start == SCHEMA_VERSION:
        # Nothing to do, and nothing written: an instance whose role may
        # not change the schema (see docs/fleet.rst) opens the store.
        return start
    with connection.transaction():
        connection.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        connection.execute(
            "CREATE TABLE IF NOT EXISTS dwtrust_schema ("
            " single BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (single),"
            " version INTEGER NOT NULL)"
        )
        connection.execute(
            "INSERT INTO dwtrust_schema (single, version) VALUES (TRUE, 0)"
            " ON CONFLICT (single) DO NOTHING"
        )
    for step in range(SCHEMA_VERSION):
        with connection.transaction():
            connection.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            version = _version(connection)
            _refuseNewer(version)
            if version == step:
                # The whole step at once (no parameters, so several
                # statements may go in one query, functions' bodies
                # included).
                connection.execute(MIGRATIONS[step].encode())
                connection.execute(
                    "UPDATE dwtrust_schema SET version = %s", (step + 1,)
                )
    return start or 0


def migrateURL(url: str) -> int:
    """
    Connect to C{url} and L{migrate} its schema.  Blocks: run it in a thread,
    or before the reactor runs.

    @return: the version it was at.
    """
    return _using(url, migrate)


#: What a store knows of a pending request: its identifier and expiry.
Request = tuple[str, float]


def _pendingRequests(connection: Connection) -> dict[str, Request]:
    """
    The pending requests in the store, by fingerprint.
    """
    rows = connection.execute(
        "SELECT fingerprint, request_id, expires FROM peers WHERE state = 'pending'"
    ).fetchall()
    return {str(row[0]): (str(row[1]), float(row[2])) for row in rows}


def _migrateAndRead(connection: Connection) -> dict[str, Request]:
    """
    L{migrate}; then the pending requests there are as the store opens.
    """
    migrate(connection)
    return _pendingRequests(connection)


def _using(url: str, work: Callable[[Connection], T]) -> T:
    """
    Connect to C{url}, and run C{work} with the connection.  Blocks.
    """
    psycopg = driver()
    connection = connect(url)
    try:
        return work(connection)
    except psycopg.OperationalError as e:
        raise StoreUnavailable(
            f"the trust store {redacted(url)} failed: {_message(e)}"
        ) from None
    except psycopg.errors.InsufficientPrivilege as e:
        raise StoreError(
            f"cannot use the trust store {redacted(url)}: {_message(e)} (run"
            " dwtrust migrate as the role that owns the schema, and grant the"
            " instances' role what docs/fleet.rst says)"
        ) from None
    except psycopg.Error as e:
        raise StoreError(
            f"cannot use the trust store {redacted(url)}: {_message(e)}"
        ) from None
    finally:
        connection.close()


def _records(cursor: Cursor, fingerprints: Sequence[str]) -> dict[str, KeyRecord]:
    """
    The records of C{fingerprints} that the store knows (from C{peers}, from
    their decisions, or both), by fingerprint.
    """
    cursor.execute(_SELECT_KEYS, (sorted(set(fingerprints)),))
    found = {}
    for row in cursor.fetchall():
        peer = row[:_PEER_WIDTH]
        record = combinedRecord(None if peer[0] is None else peer, row[_PEER_WIDTH:])
        if record is not None:
            found[record.fingerprint] = record
    return found


def _summary(record: KeyRecord | None) -> tuple[Any, ...] | None:
    """
    What a change to a decided key changes: its state, and its newest
    decision and who made and sent it.
    """
    if record is None:
        return None
    return (
        record.state,
        record.sequence,
        record.decision,
        record.decidedBy,
        record.sentBy,
    )


def _fetch(cursor: Cursor, fingerprint: str) -> KeyRecord:
    record = _records(cursor, [fingerprint]).get(fingerprint)
    assert record is not None, f"{fingerprint} vanished in its own transaction"
    return record


@implementer(ITrustStore, IKnownServices, IStoreEvents)
class PostgreSQLStore:
    """
    The trust store and the client's pins in a PostgreSQL database, shared by
    many instances.

    @ivar origin: this store object's identifier in the notifications, so
        that it knows its own changes.
    """

    log = Logger()

    def __init__(
        self,
        url: str,
        poolSize: int = DEFAULT_POOL_SIZE,
        now: Callable[[], float] = time.time,
        cacheSize: int = CACHE_SIZE,
        reactor: Any = None,
    ) -> None:
        if poolSize < 1:
            raise ValueError("a pool needs at least one connection")
        if reactor is None:
            from twisted.internet import reactor as globalReactor

            reactor = globalReactor
        self._reactor: Any = reactor
        self._url = url
        self.where = redacted(url)
        self._now = now
        self.origin = secrets.token_hex(8)
        self.poolSize = poolSize
        psycopg = driver()
        pools = poolDriver()
        # psycopg's pool holds the connections (opened with the reactor; see
        # _start); as many threads as it has connections at most run the
        # queries, so that no thread waits for another's connection.
        self._pool: Pool = pools.ConnectionPool(
            url,
            kwargs={
                "autocommit": True,
                "connect_timeout": CONNECT_TIMEOUT,
                **_named(url, APPLICATION_NAME),
            },
            min_size=1,
            max_size=poolSize,
            open=False,
            check=pools.ConnectionPool.check_connection,
            max_lifetime=MAX_LIFETIME,
            reconnect_timeout=RECONNECT_TIMEOUT,
            timeout=CONNECT_TIMEOUT,
            name="dwtrust",
            num_workers=2,
        )
        self._driver = psycopg
        self._pools = pools
        self._threads = ThreadPool(0, poolSize, name="dwtrust-postgresql")
        self._shutdown: Any = None
        self._started = False
        self._closed = False
        self._stopping = threading.Event()
        self._listener: threading.Thread | None = None
        self._listening = False
        self._caughtUp = False
        self._listeners: list[Deferred[None]] = []
        self._cache: OrderedDict[str, KeyRecord] = OrderedDict()
        self._cacheSize = cacheSize
        # Lookups in flight, and the changes announced meanwhile, by key: a
        # lookup that raced with a change does not fill the cache.
        self._inflight: dict[str, int] = {}
        self._changed: dict[str, int] = {}
        self._watchers: list[Callable[[StoreChange], object]] = []
        self._available = True
        # When a query last failed for want of the server (L{None} since one
        # succeeded, or the listener connected): see _poolDown.
        self._poolFailedAt: float | None = None
        # Why the listener last failed to connect ("" once it connects).
        self._reason = ""
        self._seenDropped = False
        # Pending requests, by fingerprint: those this store knows of (it
        # announced them, or they were there when it opened; L{None} until
        # the listener first connects if it was not opened with open() or
        # fromURL()), those it made itself, and those it counted an attempt
        # on.  Whatever else is pending when the listener connects again was
        # missed, and is announced then, as is the decision on any of these
        # that was decided meanwhile (see _catchUp).
        self._requests: dict[str, Request] | None = None
        self._made: dict[str, Request] = {}
        self._asked: dict[str, Request] = {}
        # The listener's connections so far: a catch-up that failed is
        # tried again while the connection it was for lasts.
        self._connections = 0
        self._catchUpCall: IDelayedCall | None = None
        # The keys whose cached record lookups may answer from memory while
        # the cache is fresh (see _fresh): each was read from the server
        # after the last change heard about it, while the listener listened.
        self._settled: set[str] = set()
        # The heartbeats (see beat): when each was sent, and when each
        # committed, until heard; and when the newest heard one was sent.
        self.beatChannel = f"dwtrust_beat_{self.origin}"
        self._beats = 0
        self._beatSending = False
        self._beatsSent: dict[int, float] = {}
        self._beatsCommitted: dict[int, float] = {}
        self._freshAt: float | None = None
        self._beating: LoopingCall | None = None
        # Set (by a stalled heartbeat) to have the listener reconnect.
        self._reconnect = threading.Event()
        # Attempts counted by seen() and not written yet.
        self._attempts = AttemptCounter(self._reactor, self._now, self._writeAttempts)

    @classmethod
    def fromURL(
        cls,
        url: str,
        poolSize: int = DEFAULT_POOL_SIZE,
        now: Callable[[], float] = time.time,
    ) -> PostgreSQLStore:
        """
        Open the store at C{url} at once.  This blocks while it migrates the
        schema: call it only before the reactor runs, and L{open} otherwise.

        @raise StoreError: if the database cannot be used.
        """
        requests = _using(url, _migrateAndRead)
        store = cls(url, poolSize, now)
        store._requests = requests
        return store

    @classmethod
    def open(
        cls,
        url: str,
        poolSize: int = DEFAULT_POOL_SIZE,
        now: Callable[[], float] = time.time,
    ) -> Deferred[PostgreSQLStore]:
        """
        Open (creating and migrating as needed) the store at C{url}.
        """

        def opened(requests: dict[str, Request]) -> PostgreSQLStore:
            store = cls(url, poolSize, now)
            store._requests = requests
            return store

        opening: Deferred[dict[str, Request]] = threads.deferToThread(
            _using, url, _migrateAndRead
        )
        return opening.addCallback(opened)

    def ownersNow(self) -> list[bytes]:
        """
        The owner registrations in the store.  Blocks: for start-up, before
        the reactor runs.
        """
        psycopg = driver()
        connection = connect(self._url)
        try:
            rows = connection.execute(
                "SELECT registration FROM owners ORDER BY fingerprint"
            ).fetchall()
        except psycopg.Error as e:
            raise StoreError(
                f"cannot read the owners in {self.where}: {_message(e)}"
            ) from None
        finally:
            connection.close()
        return [bytes(row[0]) for row in rows]

    # Running queries

    def _start(self) -> None:
        """
        Start the pool's threads and the listener, once, when first needed:
        never before the reactor runs (C{twistd} may fork first).
        """
        if self._started:
            return
        self._started = True
        self._pool.open()
        self._threads.start()
        self._shutdown = IReactorCore(self._reactor).addSystemEventTrigger(
            "during", "shutdown", self._closeAtShutdown
        )
        self._listener = threading.Thread(
            target=self._listen, name="dwtrust-postgresql-listen", daemon=True
        )
        self._listener.start()
        self._beating = LoopingCall(self.beat)
        self._beating.clock = self._reactor
        self._beating.start(HEARTBEAT_INTERVAL, now=False)

    def _stopBeating(self) -> None:
        beating, self._beating = self._beating, None
        if beating is not None and beating.running:
            beating.stop()

    def _run(
        self, work: Callable[[Cursor], T], transaction: bool = True
    ) -> Deferred[T]:
        """
        Run C{work} with a cursor, in one transaction, in a pool thread.

        @param transaction: L{False} for C{work} that runs one statement,
            which is a transaction of its own: it saves the round trips of
            C{BEGIN} and C{COMMIT}.
        """
        if self._closed:
            return fail(StoreError(f"the trust store {self.where} is closed"))
        self._start()
        running: Deferred[T] = threads.deferToThreadPool(
            self._reactor, self._threads, self._transact, work, transaction
        )

        def succeeded(result: T) -> T:
            self._poolFailedAt = None
            self._setAvailable(True, "")
            return result

        def failed(failure: Failure) -> Failure:
            if failure.check(StoreUnavailable):
                self._poolFailedAt = time.monotonic()
                self._setAvailable(False, failure.getErrorMessage())
            return failure

        return running.addCallbacks(succeeded, failed)

    def _transact(self, work: Callable[[Cursor], T], transaction: bool = True) -> T:
        """
        In a pool thread: run C{work} in a transaction, on a connection from
        the pool (which checks it first, and replaces it if it was cut), and
        again after a serialization conflict.
        """
        psycopg, pools = self._driver, self._pools
        known = self._poolFailedAt is not None or not self._available
        wait = UNAVAILABLE_WAIT if known else CONNECT_TIMEOUT
        conflicts = 0
        while True:
            try:
                with (
                    self._pool.connection(timeout=wait) as connection,
                    connection.transaction()
                    if transaction
                    else contextlib.nullcontext(),
                    connection.cursor() as cursor,
                ):
                    return work(cursor)
            except pools.PoolClosed:
                raise StoreError(f"the trust store {self.where} is closed") from None
            except pools.PoolTimeout:
                raise StoreUnavailable(
                    f"the trust store {self.where} is unavailable: no connection"
                    f" within {wait:g} s{self._lastReason()}"
                ) from None
            except psycopg.errors.TransactionRollback as e:
                conflicts += 1
                if conflicts >= RETRIES:
                    raise StoreError(
                        f"the trust store {self.where} failed: {_message(e)}"
                    ) from None
            except (psycopg.OperationalError, psycopg.InterfaceError) as e:
                # The pool drops the connection (it is broken) and opens
                # another.
                raise StoreUnavailable(
                    f"the trust store {self.where} is unavailable: {_message(e)}"
                ) from None
            except psycopg.Error as e:
                raise StoreError(
                    f"the trust store {self.where} failed: {_message(e)}"
                ) from None

    def _lastReason(self) -> str:
        """
        Why the listener last failed to connect, if it did, for a message.
        """
        reason = self._reason
        return f" ({reason})" if reason else ""

    def _discard(self, connection: Connection) -> None:
        with contextlib.suppress(Exception):
            connection.close()

    def _closeAtShutdown(self) -> None:
        """
        The reactor stops (and so its thread pools) before the store was
        closed: close it now, in the reactor thread, as Twisted's own thread
        pools are stopped (the pool's workers are given a second).
        """
        self._shutdown = None
        self._closed = True
        self._stopping.set()
        self._stopBeating()
        self._pool.close(timeout=SHUTDOWN_WAIT)
        self._threads.stop()

    def close(self) -> Deferred[None]:
        """
        Write the attempts counted and not written yet; then stop
        listening, close the pool (queries waiting for a connection fail at
        once), and stop the pool's threads.
        """
        if self._closed:
            return succeed(None)
        flushing = self._attempts.flush()
        self._closed = True
        self._stopping.set()
        self._stopBeating()
        if self._catchUpCall is not None and self._catchUpCall.active():
            self._catchUpCall.cancel()
        self._catchUpCall = None
        if self._shutdown is not None:
            IReactorCore(self._reactor).removeSystemEventTrigger(self._shutdown)
            self._shutdown = None
        listener = self._listener
        started = self._started

        def stop() -> None:
            if started:
                self._pool.close(timeout=CONNECT_TIMEOUT)
                self._threads.stop()
            if listener is not None:
                listener.join(CONNECT_TIMEOUT + 1)

        return flushing.addBoth(lambda _: threads.deferToThread(stop))

    def _setAvailable(self, available: bool, reason: str) -> None:
        """
        Note whether the server answers; log each change once.
        """
        if available == self._available:
            return
        self._available = available
        if available:
            self._seenDropped = False
            self.log.info(
                "dwtrust: the trust store {where} is available again",
                event="dwtrust.store.available",
                where=self.where,
            )
        else:
            self.log.warn(
                "dwtrust: the trust store {where} is unavailable ({reason});"
                " known keys are served from the cache, unknown keys are"
                " refused with unavailable",
                event="dwtrust.store.unavailable",
                where=self.where,
                reason=reason,
            )

    # Notifications

    def _listen(self) -> None:
        """
        In the listener's thread: listen on L{CHANNEL}, hand every
        notification to the reactor, and reconnect (with a growing delay)
        whenever the connection is lost, until the store closes.
        """
        psycopg = driver()
        fromThread = IReactorFromThreads(self._reactor).callFromThread
        delay = 0.1
        failedBefore = False
        while not self._stopping.is_set():
            self._reconnect.clear()
            try:
                connection = connect(self._url, LISTENER_NAME)
            except StoreError as e:
                self._reason = str(e).removeprefix(
                    f"the trust store {self.where} is unavailable: "
                )
                if not self._stopping.is_set():
                    fromThread(self._lost, str(e))
                self._stopping.wait(delay)
                delay = min(delay * 2, MAX_BACKOFF)
                continue
            try:
                connection.execute(f"LISTEN {self.beatChannel}")
                connection.execute(f"LISTEN {CHANNEL}")
                self._reason = ""
                if failedBefore:
                    # The pool's connections opened before the loss may be
                    # cut too: the pool replaces them all.
                    self._pool.drain()
                    failedBefore = False
                # Every change from now on is heard; what came before is
                # caught up (in the reactor, after this call).
                fromThread(self._listening_)
                delay = 0.1
                while not (self._stopping.is_set() or self._reconnect.is_set()):
                    for notification in connection.notifies(timeout=LISTEN_POLL):
                        if notification.channel == CHANNEL:
                            fromThread(self._notified, notification.payload)
                        else:
                            fromThread(self._heard, notification.payload)
            except psycopg.Error as e:
                failedBefore = True
                if not self._stopping.is_set():
                    fromThread(self._lost, _message(e))
            finally:
                self._discard(connection)

    def _listening_(self) -> None:
        """
        The listener is (again) connected: catch up what it did not hear
        before.
        """
        self._poolFailedAt = None
        self._deaf()
        self._listening = True
        self._connections += 1
        self._setAvailable(True, "")
        if not self._closed:
            self._catchUp(self._connections)

    def _lost(self, reason: str) -> None:
        self._deaf()
        self._setAvailable(False, reason)

    def _deaf(self) -> None:
        """
        The listener does not (or no longer) hear every change: the cache
        answers nothing more until it has heard a heartbeat again, and then
        only keys read afresh.
        """
        self._listening = False
        self._caughtUp = False
        self._freshAt = None
        self._settled.clear()
        self._beatsSent.clear()
        self._beatsCommitted.clear()

    # Heartbeats

    def beat(self) -> None:
        """
        Every L{HEARTBEAT_INTERVAL}: check that the listener heard the
        heartbeats committed more than L{LISTENER_STALL} ago (and have it
        reconnect if it did not), and send the next one: a C{NOTIFY} on this
        store's own channel, through the pool.  Notifications are delivered
        in the order their transactions commit, so once the listener hears
        a heartbeat sent at time I{t}, every change committed before I{t}
        has been heard (see L{_fresh}).
        """
        if self._closed:
            return
        now = time.monotonic()
        if self._listening and self._beatsCommitted:
            waited = now - min(self._beatsCommitted.values())
            if waited > LISTENER_STALL:
                self.log.warn(
                    "dwtrust: the trust store {where}'s listener heard no"
                    " heartbeat for {seconds:.1f} s; it reconnects, and"
                    " lookups read the server meanwhile",
                    event="dwtrust.store.listener_stalled",
                    where=self.where,
                    seconds=waited,
                )
                self._deaf()
                self._reconnect.set()
                return
        if not self._listening or self._beatSending:
            return
        self._beats += 1
        number = self._beats
        self._beatsSent[number] = now
        self._beatSending = True

        def send(cursor: Cursor) -> None:
            cursor.execute("SELECT pg_notify(%s, %s)", (self.beatChannel, str(number)))

        def committed(_: None) -> None:
            if number in self._beatsSent:
                self._beatsCommitted[number] = time.monotonic()

        def failed(failure: Failure) -> None:
            # The store logs an outage itself.
            self._beatsSent.pop(number, None)

        def sent(_: None) -> None:
            self._beatSending = False

        self._run(send, transaction=False).addCallbacks(committed, failed).addBoth(sent)

    def _heard(self, payload: str) -> None:
        """
        In the reactor: the listener heard heartbeat C{payload}.
        """
        if not self._listening:
            return
        try:
            number = int(payload)
        except ValueError:
            return
        sent = self._beatsSent.get(number)
        if sent is None:
            return  # sent before the listener (re)connected
        for earlier in [n for n in self._beatsSent if n <= number]:
            del self._beatsSent[earlier]
            self._beatsCommitted.pop(earlier, None)
        if self._freshAt is None or sent > self._freshAt:
            self._freshAt = sent

    def _fresh(self) -> bool:
        """
        Whether the cache may answer: the listener listens, has caught up,
        and heard a heartbeat sent less than L{FRESHNESS} seconds ago.
        """
        fresh = self._freshAt
        return (
            fresh is not None
            and self._caughtUp
            and time.monotonic() - fresh < FRESHNESS
        )

    def whenListening(self) -> Deferred[None]:
        """
        A L{Deferred} that fires once the store listens for changes, and has
        caught up what it missed before (at once if it has now).
        """
        if self._listening and self._caughtUp:
            return succeed(None)
        self._start()
        listening: Deferred[None] = Deferred()
        self._listeners.append(listening)
        return listening

    def _catchUp(self, connection: int) -> None:
        """
        The listener has just connected (it is the listener's
        C{connection}th): announce what changed while it did not listen, as
        the notifications would have.  That is every pending request this
        store does not know of yet, and every decision about a key it has
        an interest in (one in its cache, or one whose pending request it
        knew of, made, or counted an attempt on, which may hold a connection
        here) that differs from what it knew.

        On the listener's first connection, if the store was not opened
        with L{open} or L{fromURL}, it only notes the pending requests.  A
        key whose change is heard meanwhile is left to that notification.
        If the store cannot be read, this is tried again while the listener
        stays connected.
        """
        requests = self._requests
        before = dict(requests) if requests is not None else None
        made, asked = dict(self._made), dict(self._asked)
        known = {**asked, **made, **(before or {})}
        interest = sorted(set(self._cache) | set(known))
        counts = self._reading(interest)

        def read(cursor: Cursor) -> tuple[list[KeyRecord], dict[str, KeyRecord]]:
            cursor.execute(SELECT_PENDING)
            pending = [recordOf(row) for row in cursor.fetchall()]
            return pending, _records(cursor, interest)

        def caughtUp(found: tuple[list[KeyRecord], dict[str, KeyRecord]]) -> None:
            pending, records = found
            missed = 0
            if self._requests is None:
                self._requests = {}
            nowPending = {record.fingerprint for record in pending}
            # Requests resolved (decided or lapsed) while nobody listened
            # are forgotten (unless made again meanwhile).
            for now, then in (
                (self._requests, before or {}),
                (self._made, made),
                (self._asked, asked),
            ):
                for fingerprint, request in then.items():
                    if (
                        fingerprint not in nowPending
                        and now.get(fingerprint) == request
                    ):
                        del now[fingerprint]
            for record in pending:
                if before is None:
                    self._requests[record.fingerprint] = (
                        record.requestId,
                        record.expires,
                    )
                else:
                    missed += self._announcePending(record, self._isMine(record))
            for fingerprint in interest:
                if not self._unchanged(fingerprint, counts):
                    continue  # a notification about it tells the watchers
                new = records.get(fingerprint)
                if new is not None and new.state is KeyState.pending:
                    continue
                old = self._cache.get(fingerprint)
                wasPending = fingerprint in known
                self._remember(fingerprint, new)
                if wasPending and new is None:
                    continue  # it lapsed; the instance that expired it says so
                if wasPending or _summary(old) != _summary(new):
                    self._announce(StoreChange("decided", fingerprint, new, False))
                    missed += 1
            if missed:
                self.log.info(
                    "dwtrust: caught up {count} change(s) made while this instance"
                    " did not listen",
                    event="dwtrust.store.caught_up",
                    count=missed,
                )
            if self._listening and self._connections == connection:
                self._caughtUp = True
                listeners, self._listeners = self._listeners, []
                for listener in listeners:
                    listener.callback(None)

        def failed(failure: Failure) -> None:
            self.log.warn(
                "dwtrust: could not catch up the changes made while this"
                " instance did not listen: {reason}; trying again",
                event="dwtrust.store.catch_up_failed",
                reason=failure.getErrorMessage(),
            )
            if not self._closed:
                self._catchUpCall = self._reactor.callLater(MAX_BACKOFF, again)

        def again() -> None:
            self._catchUpCall = None
            if self._listening and not self._closed and self._connections == connection:
                self._catchUp(connection)

        catching: Deferred[None] = self._run(read).addCallbacks(caughtUp, failed)
        catching.addBoth(lambda result: self._doneReading(interest, result))
        catching.addErrback(
            lambda failure: self.log.failure(
                "dwtrust: catching up the store's changes failed", failure
            )
        )

    def _isMine(self, record: KeyRecord) -> bool:
        """
        Whether this store object made the pending request C{record}.
        """
        return self._made.get(record.fingerprint, ("", 0.0))[0] == record.requestId

    def _announcePending(self, record: KeyRecord, local: bool) -> bool:
        """
        Tell the watchers of the pending request C{record}, unless they were
        told of it already (by its notification, or when catching up).

        @return: whether they were told now.
        """
        request = (record.requestId, record.expires)
        if self._requests is None:
            self._requests = {}
        known = self._requests.get(record.fingerprint)
        if known is not None and known[0] == record.requestId:
            return False
        self._requests[record.fingerprint] = request
        self._announce(StoreChange("pending", record.fingerprint, record, local))
        return True

    def _resolved(self, fingerprint: str) -> None:
        """
        The pending request for C{fingerprint}, if any, is decided.
        """
        for requests in (self._requests or {}, self._made, self._asked):
            requests.pop(fingerprint, None)

    def _notified(self, payload: str) -> None:
        """
        In the reactor: a change was announced.  Read the key's record
        afresh (which refreshes the cache) and tell the watchers.
        """
        try:
            facts = json.loads(payload)
            kind, fingerprint = str(facts["kind"]), str(facts["fingerprint"])
            local = facts.get("origin") == self.origin
        except (ValueError, KeyError, TypeError):
            self.log.warn(
                "dwtrust: ignored a malformed notification {payload!r}",
                event="dwtrust.store.bad_notification",
                payload=payload[:200],
            )
            return
        if self._closed:
            return
        self._settled.discard(fingerprint)
        self._noteChange(fingerprint)
        if kind == "owner":
            self._announce(StoreChange(kind, fingerprint, None, local))
            return

        def read(record: KeyRecord | None) -> None:
            if (
                kind == "pending"
                and record is not None
                and record.state is KeyState.pending
            ):
                self._announcePending(record, local)
                return
            if record is not None and record.state is not KeyState.pending:
                self._resolved(fingerprint)
            self._announce(StoreChange(kind, fingerprint, record, local))

        def failed(failure: Failure) -> None:
            self.log.warn(
                "dwtrust: could not read {fingerprint} after a change: {reason}",
                event="dwtrust.store.change_unread",
                fingerprint=fingerprint,
                reason=failure.getErrorMessage(),
            )

        # Read afresh, even while queries fail: the cache is what the
        # notification may change.
        self._lookup(fingerprint).addCallbacks(read, failed)

    def _announce(self, change: StoreChange) -> None:
        for watcher in list(self._watchers):
            try:
                watcher(change)
            except Exception:
                self.log.failure("dwtrust: a store watcher failed")

    def watch(self, watcher: Callable[[StoreChange], object]) -> Callable[[], None]:
        self._watchers.append(watcher)
        if IReactorCore(self._reactor).running:
            self._start()
        else:
            IReactorCore(self._reactor).callWhenRunning(self._startUnlessClosed)
        return lambda: self._watchers.remove(watcher)

    def _startUnlessClosed(self) -> None:
        if not self._closed:
            self._start()

    # The cache

    def _reading(self, fingerprints: Sequence[str]) -> dict[str, int]:
        """
        A read of C{fingerprints} begins: count the changes heard about them
        from now on (see L{_unchanged}), until L{_doneReading}.
        """
        counts = {}
        for fingerprint in fingerprints:
            counts[fingerprint] = self._changed.get(fingerprint, 0)
            self._inflight[fingerprint] = self._inflight.get(fingerprint, 0) + 1
        return counts

    def _unchanged(self, fingerprint: str, counts: dict[str, int]) -> bool:
        """
        Whether no change to C{fingerprint} was heard since L{_reading}
        gave C{counts}: if one was, what was read may be older than it.
        """
        return self._changed.get(fingerprint, 0) == counts[fingerprint]

    def _doneReading(self, fingerprints: Sequence[str], result: T) -> T:
        for fingerprint in fingerprints:
            left = self._inflight.pop(fingerprint) - 1
            if left:
                self._inflight[fingerprint] = left
            else:
                self._changed.pop(fingerprint, None)
        return result

    def _noteChange(self, fingerprint: str) -> None:
        if fingerprint in self._inflight:
            self._changed[fingerprint] = self._changed.get(fingerprint, 0) + 1

    def _remember(self, fingerprint: str, record: KeyRecord | None) -> None:
        """
        Keep C{record} in the cache (forget the key if it is L{None} or
        pending).  A record whose newest decision is older than the cached
        one's was read before the cached one was: the cache keeps the newer.
        """
        if record is None or record.state is KeyState.pending:
            self._cache.pop(fingerprint, None)
            self._settled.discard(fingerprint)
            return
        cached = self._cache.get(fingerprint)
        if cached is not None and cached.sequence > record.sequence:
            self._cache.move_to_end(fingerprint)
            return
        self._cache[fingerprint] = record
        self._cache.move_to_end(fingerprint)
        while len(self._cache) > self._cacheSize:
            evicted, _ = self._cache.popitem(last=False)
            self._settled.discard(evicted)

    def cached(self, fingerprint: str) -> KeyRecord | None:
        """
        The cached record of C{fingerprint}, if there is one.
        """
        return self._cache.get(fingerprint)

    # ITrustStore

    def _poolDown(self) -> bool:
        """
        Whether a query failed for want of the server less than
        L{PROBE_INTERVAL} ago (and none succeeded since): a lookup of a key
        in the cache is then answered from it without waiting for a
        connection.  Once the interval is over, the next caller probes the
        server (and the interval starts again for the others).
        """
        failed = self._poolFailedAt
        if failed is None or self._closed:
            return False
        now = time.monotonic()
        if now - failed < PROBE_INTERVAL:
            return True
        self._poolFailedAt = now
        return False

    def lookup(self, fingerprint: str) -> Deferred[KeyRecord | None]:
        """
        The record of a key: from memory for a decided key read before,
        while the cache is fresh (see L{_fresh}) and nothing was heard about
        the key since; from the server otherwise.
        """
        cached = self._cache.get(fingerprint)
        if cached is not None:
            if fingerprint in self._settled and self._fresh():
                self._cache.move_to_end(fingerprint)
                return succeed(cached)
            if self._poolDown():
                # In an outage, a key in the cache is answered from it at
                # once, rather than after waiting for the pool to connect.
                self._cache.move_to_end(fingerprint)
                return succeed(cached)
        return self._lookup(fingerprint)

    def _lookup(self, fingerprint: str) -> Deferred[KeyRecord | None]:
        """
        Read C{fingerprint}'s record from the server (from the cache only if
        the server cannot be reached).
        """
        counts = self._reading([fingerprint])
        listening = self._connections if self._listening else None

        def query(cursor: Cursor) -> KeyRecord | None:
            return _records(cursor, [fingerprint]).get(fingerprint)

        def found(record: KeyRecord | None) -> KeyRecord | None:
            if self._unchanged(fingerprint, counts):
                self._remember(fingerprint, record)
                if (
                    record is not None
                    and self._cache.get(fingerprint) is record
                    and self._listening
                    and listening == self._connections
                ):
                    # Read while the listener listened, and nothing heard
                    # about it since the read began.
                    self._settled.add(fingerprint)
            return record

        def unavailable(failure: Failure) -> KeyRecord | Failure:
            failure.trap(StoreUnavailable)
            cached = self._cache.get(fingerprint)
            if cached is None:
                return failure
            self._cache.move_to_end(fingerprint)
            return cached

        looking: Deferred[Any] = self._run(query, transaction=False)
        looking.addCallbacks(found, unavailable)
        return looking.addBoth(lambda result: self._doneReading([fingerprint], result))

    def keysFor(self, org: str, service: str) -> Deferred[list[KeyRecord]]:
        return self._all(
            f"{SELECT_RECORDS} WHERE p.org = %s AND p.service = %s"
            " ORDER BY p.first_seen, p.fingerprint",
            (org, service),
            recordOf,
        )

    def _notify(self, cursor: Cursor, kind: str, fingerprint: str) -> None:
        """
        Announce a change, in the transaction that makes it.
        """
        cursor.execute(
            "SELECT pg_notify(%s, %s)",
            (
                CHANNEL,
                json.dumps(
                    {"kind": kind, "fingerprint": fingerprint, "origin": self.origin}
                ),
            ),
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
        """
        Append the decision to the key's history (the instances only ever
        insert into C{decisions}), and make it the state of the key's row in
        C{peers}, creating the row if need be.
        """
        now = self._now()
        psycopg = driver()

        def append(cursor: Cursor) -> tuple[KeyRecord, str | None]:
            # Lock the key's row (if there is one) so that two decisions at
            # once are applied one after the other, each seeing the one
            # before.
            cursor.execute(
                "SELECT 1 FROM peers WHERE fingerprint = %s FOR UPDATE",
                (peer.fingerprint,),
            )
            before = _records(cursor, [peer.fingerprint]).get(peer.fingerprint)
            try:
                cursor.execute(
                    _INSERT_DECISION,
                    decisionRow(
                        peer, sequence, state, decidedBy, sentBy, now, decision
                    ),
                )
            except psycopg.errors.UniqueViolation:
                # The transaction is rolled back: nothing is stored.
                raise DecisionConflict(
                    f"the store already holds decision {sequence} about"
                    f" {peer.fingerprint}"
                ) from None
            cursor.execute(
                f"INSERT INTO peers ({PEER_COLUMNS})"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, 1, %s, %s, '\\x', '', 0)"
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
            self._notify(cursor, "decided", peer.fingerprint)
            return _fetch(cursor, peer.fingerprint), (
                None if before is None else before.state.value
            )

        def stored(result: tuple[KeyRecord, str | None]) -> KeyRecord:
            record, previous = result
            self._noteChange(peer.fingerprint)
            self._remember(peer.fingerprint, record)
            self._resolved(peer.fingerprint)
            self.log.info(
                "dwtrust: stored {state} for {fingerprint} (was {previous}),"
                " decision {sequence} decided by {decided_by}, sent by {sent_by}",
                event="dwtrust.store.decision",
                state=state.value,
                fingerprint=record.fingerprint,
                previous=previous,
                sequence=sequence,
                decided_by=decidedBy,
                sent_by=sentBy,
                store=self.where,
            )
            return record

        return self._run(append).addCallback(stored)

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

        def again(cursor: Cursor) -> bool:
            cursor.execute(
                "UPDATE peers SET attempts = attempts + 1, last_seen = %s,"
                " source = %s, source_host = %s"
                " WHERE fingerprint = %s AND state = 'pending'",
                (now, source, host, peer.fingerprint),
            )
            return bool(cursor.rowcount)

        def add(cursor: Cursor) -> tuple[KeyRecord, bool]:
            if not again(cursor):
                # One new request at a time, fleet-wide: the caps are counted
                # and the request made under one lock, and a request another
                # instance made meanwhile is seen once we hold it.
                cursor.execute("SELECT pg_advisory_xact_lock(%s)", (PENDING_LOCK,))
                if not again(cursor):
                    return self._newPending(
                        cursor,
                        peer,
                        source,
                        host,
                        now,
                        requestId,
                        expires,
                        maxPerSource,
                        maxTotal,
                    ), True
            return _fetch(cursor, peer.fingerprint), False

        def added(result: tuple[KeyRecord, bool]) -> tuple[KeyRecord, bool]:
            record, created = result
            self._noteChange(peer.fingerprint)
            self._remember(peer.fingerprint, None)
            if record.state is KeyState.pending:
                self._asked[peer.fingerprint] = (record.requestId, record.expires)
            if created:
                self.log.info(
                    "dwtrust: new pending request {request_id} for {peer_name}"
                    " {fingerprint} from {source}",
                    event="dwtrust.store.pending_created",
                    request_id=record.requestId,
                    peer_name=peer.name,
                    fingerprint=peer.fingerprint,
                    source=source,
                    store=self.where,
                )
            return result

        return self._run(add).addCallback(added)

    def _newPending(
        self,
        cursor: Cursor,
        peer: PeerIdentity,
        source: str,
        host: str,
        now: float,
        requestId: str,
        expires: float,
        maxPerSource: int,
        maxTotal: int,
    ) -> KeyRecord:
        cursor.execute(
            "SELECT COUNT(*),"
            " COALESCE(SUM(CASE WHEN source_host = %s THEN 1 ELSE 0 END), 0)"
            " FROM peers WHERE state = 'pending'",
            (host,),
        )
        total, fromSource = cursor.fetchone() or (0, 0)
        if fromSource >= maxPerSource:
            raise PendingFull(
                f"{host} already has {fromSource} pending requests"
                f" (at most {maxPerSource})"
            )
        if total >= maxTotal:
            raise PendingFull(
                f"{total} requests are pending already (at most {maxTotal})"
            )
        # Noted before it commits, so that a catch-up that reads it knows
        # it for this store's own (see _catchUp).
        self._made[peer.fingerprint] = (requestId, expires)
        # A row that is there but not pending is one whose decision did not
        # verify (its policy treats the key as unknown): the request replaces
        # it.  The key's decisions stay, in their own table.
        cursor.execute(
            f"INSERT INTO peers ({PEER_COLUMNS}, source_host)"
            " VALUES (%s, %s, %s, %s, %s, 'pending', %s, %s, 1, %s, '', '\\x',"
            " %s, %s, %s)"
            " ON CONFLICT (fingerprint) DO UPDATE SET state = 'pending',"
            " last_seen = excluded.last_seen, attempts = peers.attempts + 1,"
            " source = excluded.source, source_host = excluded.source_host,"
            " decided_by = '', request_id = excluded.request_id,"
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
        self._notify(cursor, "pending", peer.fingerprint)
        return _fetch(cursor, peer.fingerprint)

    def pending(self) -> Deferred[list[KeyRecord]]:
        return self._all(SELECT_PENDING, (), recordOf)

    def decided(self) -> Deferred[list[KeyRecord]]:
        return self._all(SELECT_DECIDED, (), recordOf)

    def expirePending(self, now: float) -> Deferred[list[KeyRecord]]:
        """
        Delete the lapsed requests: each is deleted, and reported, by one
        instance.  The requests this store knew of that lapsed (deleted here
        or by another instance) are forgotten.
        """
        for requests in (self._requests or {}, self._made, self._asked):
            for fingerprint, (_, expires) in list(requests.items()):
                if expires < now:
                    del requests[fingerprint]
        return self._all(
            "WITH lapsed AS (DELETE FROM peers"
            f" WHERE state = 'pending' AND expires < %s RETURNING {PEER_COLUMNS})"
            f" SELECT {_columns(PEER_COLUMNS, 'l')}, {_columns(DECISION_COLUMNS, 'd')}"
            " FROM lapsed l LEFT JOIN LATERAL"
            f" ({SELECT_NEWEST_DECISION.format(p='l.fingerprint')}) d ON TRUE"
            " ORDER BY l.first_seen, l.fingerprint",
            (now,),
            recordOf,
        )

    def owners(self) -> Deferred[list[bytes]]:
        return self._all(
            "SELECT registration FROM owners ORDER BY fingerprint",
            (),
            lambda row: bytes(row[0]),
        )

    def addOwner(self, fingerprint: str, registration: bytes) -> Deferred[None]:
        def insert(cursor: Cursor) -> None:
            cursor.execute(
                "INSERT INTO owners (fingerprint, registration) VALUES (%s, %s)"
                " ON CONFLICT (fingerprint)"
                " DO UPDATE SET registration = excluded.registration",
                (fingerprint, registration),
            )
            self._notify(cursor, "owner", fingerprint)

        return self._run(insert)

    def seen(self, fingerprint: str, source: str) -> Deferred[None]:
        """
        Count the attempt now; write it, with the others counted meanwhile
        in one transaction, at most a second later (see L{AttemptCounter}), so that
        a known peer's connection costs no query.  The L{Deferred} fires
        once it is written (or dropped, while the server is unavailable).
        """
        if self._closed:
            return fail(StoreError(f"the trust store {self.where} is closed"))
        return self._attempts.count(fingerprint, source)

    def _writeAttempts(self, rows: Rows) -> Deferred[None]:
        def count(cursor: Cursor) -> None:
            cursor.executemany(
                "UPDATE peers SET attempts = attempts + %s, last_seen = %s,"
                " source = %s WHERE fingerprint = %s",
                rows,
            )

        def written(_: None) -> None:
            # The cached records count them too.
            for n, when, source, fingerprint in rows:
                cached = self._cache.get(fingerprint)
                if cached is not None:
                    self._cache[fingerprint] = evolve(
                        cached,
                        attempts=cached.attempts + n,
                        lastSeen=when,
                        source=source,
                    )

        def dropped(failure: Failure) -> None:
            failure.trap(StoreUnavailable)
            if not self._seenDropped:
                self._seenDropped = True
                self.log.warn(
                    "dwtrust: attempts with known keys are not counted while"
                    " the trust store {where} is unavailable",
                    event="dwtrust.store.seen_dropped",
                    where=self.where,
                )

        writing: Deferred[None]
        if self._poolDown():
            # Not worth waiting for a connection: drop them at once.
            writing = fail(
                StoreUnavailable(f"the trust store {self.where} is unavailable")
            )
        else:
            writing = self._run(count).addCallback(written)
        return writing.addErrback(dropped)

    # IKnownServices

    def pinned(self, address: str) -> Deferred[Pin | None]:
        def query(cursor: Cursor) -> Pin | None:
            cursor.execute(
                f"SELECT {PIN_COLUMNS} FROM known_services WHERE address = %s",
                (address,),
            )
            row = cursor.fetchone()
            return None if row is None else pinOf(row)

        return self._run(query, transaction=False)

    def pinnedService(self, org: str, service: str) -> Deferred[list[Pin]]:
        return self._all(
            f"SELECT {PIN_COLUMNS} FROM known_services"
            " WHERE org = %s AND service = %s ORDER BY first_seen, address",
            (org, service),
            pinOf,
        )

    def pin(self, address: str, peer: PeerIdentity) -> Deferred[Pin]:
        pin = Pin.of(address, peer, self._now())

        def insert(cursor: Cursor) -> Pin:
            cursor.execute(
                f"INSERT INTO known_services ({PIN_COLUMNS})"
                " VALUES (%s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (address) DO UPDATE SET org = excluded.org,"
                " service = excluded.service, algorithm = excluded.algorithm,"
                " public_key = excluded.public_key,"
                " fingerprint = excluded.fingerprint,"
                " first_seen = excluded.first_seen",
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

        return self._run(insert, transaction=False)

    def unpin(self, address: str) -> Deferred[bool]:
        def delete(cursor: Cursor) -> bool:
            cursor.execute("DELETE FROM known_services WHERE address = %s", (address,))
            return bool(cursor.rowcount)

        return self._run(delete, transaction=False)

    def _all(
        self,
        sql: str,
        parameters: tuple[Any, ...],
        convert: Callable[[Sequence[Any]], T],
    ) -> Deferred[list[T]]:
        def query(cursor: Cursor) -> list[T]:
            cursor.execute(sql.encode(), parameters)
            return [convert(row) for row in cursor.fetchall()]

        return self._run(query, transaction=False)
