"""
Tests for L{dwtrust.store.PostgreSQLStore} against a real, throwaway
PostgreSQL server (see L{tests.postgres}): the store's contract (the same
tests as the SQLite store's), its schema and migrations, concurrency between
two store objects (as two instances), notifications, and outages.
"""

from __future__ import annotations

import io
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase

from dwtrust import Identity
from dwtrust._machine import Refusal
from dwtrust._policy import ApprovalPolicy
from dwtrust._wire import ErrorCode
from dwtrust.approval import ApprovalRequest, Decision
from dwtrust.cli import main as cliMain
from dwtrust.store import (
    SCHEMA_VERSION,
    IStoreEvents,
    KeyRecord,
    KeyState,
    PendingFull,
    PostgreSQLStore,
    StoreChange,
    StoreError,
    StoreUnavailable,
    openStore,
)
from dwtrust.store._postgres import MIGRATIONS, driver, migrateURL
from dwtrust.testing import MemoryTrustStore

from .test_store import FakeNow, StoreContractMixin, TrustAndPins, peerIdentity

if TYPE_CHECKING:
    from .postgres import PostgreSQLServer

pytest_plugins = ["tests.postgres"]

#: Seconds a test waits for a notification before it fails.
NOTIFICATION_DEADLINE = 10.0

TABLES = ["dwtrust_schema", "known_services", "owners", "peers"]


def tables(server: PostgreSQLServer, url: str) -> list[str]:
    return sorted(
        str(name)
        for (name,) in server.sql(
            url,
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'",
        )
    )


def schemaVersion(server: PostgreSQLServer, url: str) -> int:
    [(version,)] = server.sql(url, "SELECT version FROM dwtrust_schema")
    assert isinstance(version, int)
    return version


class Changes:
    """
    The changes a store announced to a watcher, and a way to wait for one.
    """

    def __init__(self, store: IStoreEvents) -> None:
        self.seen: list[StoreChange] = []
        self._waiting: list[tuple[Callable[[StoreChange], bool], Deferred[Any]]] = []
        store.watch(self._changed)

    def _changed(self, change: StoreChange) -> None:
        self.seen.append(change)
        for entry in list(self._waiting):
            match, waiting = entry
            if match(change):
                self._waiting.remove(entry)
                waiting.callback(change)

    def next(self, match: Callable[[StoreChange], bool]) -> Deferred[StoreChange]:
        """
        The first change (already seen, or to come) that C{match}es; fails
        after L{NOTIFICATION_DEADLINE} seconds.
        """
        for change in self.seen:
            if match(change):
                return _fired(change)
        waiting: Deferred[StoreChange] = Deferred()
        self._waiting.append((match, waiting))
        waiting.addTimeout(NOTIFICATION_DEADLINE, reactor)
        return waiting


def _fired(change: StoreChange) -> Deferred[StoreChange]:
    done: Deferred[StoreChange] = Deferred()
    done.callback(change)
    return done


def about(
    kind: str, fingerprint: str, local: bool | None = None
) -> Callable[[StoreChange], bool]:
    def match(change: StoreChange) -> bool:
        return (
            change.kind == kind
            and change.fingerprint == fingerprint
            and (local is None or change.local == local)
        )

    return match


class PostgreSQLStoreContractTests(StoreContractMixin, TestCase):
    """
    L{PostgreSQLStore}, on a real server, keeps the store's contract.
    """

    url: str

    @pytest.fixture(autouse=True)
    def _database(self, database: str) -> None:
        self.url = database

    async def makeStore(self, now: Callable[[], float]) -> TrustAndPins:
        store = await PostgreSQLStore.open(self.url, 2, now)
        return store  # type: ignore[return-value]


# Schema and migrations


def test_migrateCreatesSchema(postgres: PostgreSQLServer, database: str) -> None:
    """
    Migrating a new database creates the tables of the SQLite store's schema
    and the version table, at L{SCHEMA_VERSION}; migrating again changes
    nothing.
    """
    assert migrateURL(database) == 0
    assert tables(postgres, database) == TABLES
    assert schemaVersion(postgres, database) == SCHEMA_VERSION
    assert migrateURL(database) == SCHEMA_VERSION
    assert schemaVersion(postgres, database) == SCHEMA_VERSION


def test_migrateUpgradesOneStep(postgres: PostgreSQLServer, database: str) -> None:
    """
    A database at version 1 (no decisions, no owners) with a row in it is
    upgraded to the current version, and keeps the row, with the new columns
    at their defaults.
    """
    postgres.sql(
        database,
        "CREATE TABLE dwtrust_schema (single BOOLEAN PRIMARY KEY DEFAULT TRUE"
        " CHECK (single), version INTEGER NOT NULL)",
    )
    postgres.sql(database, "INSERT INTO dwtrust_schema VALUES (TRUE, 1)")
    for statement in MIGRATIONS[0].split(";"):
        if statement.strip():
            postgres.sql(database, statement)
    postgres.sql(
        database,
        "INSERT INTO peers (fingerprint, org, service, algorithm, public_key,"
        " state, first_seen, last_seen, attempts, source, decided_by)"
        " VALUES ('SHA256:old', 'acme', 'billing', 'ssh-ed25519', '\\x00',"
        " 'denied', 1, 2, 3, '10.0.0.1:1', 'someone')",
    )
    assert migrateURL(database) == 1
    assert schemaVersion(postgres, database) == SCHEMA_VERSION
    assert postgres.sql(
        database, "SELECT state, attempts, decision, request_id FROM peers"
    ) == [("denied", 3, b"", "")]
    assert tables(postgres, database) == TABLES


def test_newerSchemaRefused(postgres: PostgreSQLServer, database: str) -> None:
    """
    A database whose schema is newer than this code is refused with a
    L{StoreError} that says so, and left untouched.
    """
    postgres.sql(
        database,
        "CREATE TABLE dwtrust_schema (single BOOLEAN PRIMARY KEY DEFAULT TRUE"
        " CHECK (single), version INTEGER NOT NULL)",
    )
    postgres.sql(database, "INSERT INTO dwtrust_schema VALUES (TRUE, 99)")
    with pytest.raises(StoreError, match="schema version 99, newer than"):
        migrateURL(database)
    assert tables(postgres, database) == ["dwtrust_schema"]
    assert schemaVersion(postgres, database) == 99


def test_concurrentMigrations(postgres: PostgreSQLServer, database: str) -> None:
    """
    Four instances migrating one new database at once migrate it once: each
    succeeds, and the schema is whole.
    """
    results: list[object] = []

    def run() -> None:
        try:
            results.append(migrateURL(database))
        except Exception as e:
            results.append(e)

    workers = [threading.Thread(target=run) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert all(isinstance(result, int) for result in results), results
    assert sorted(results)[0] == 0  # type: ignore[type-var]
    assert schemaVersion(postgres, database) == SCHEMA_VERSION
    assert tables(postgres, database) == TABLES


def test_unreachable(postgres: PostgreSQLServer) -> None:
    """
    A server that does not answer is L{StoreUnavailable}, with the URL (its
    password hidden) in the message.
    """
    from .processes import free_port

    url = f"postgresql://dwtrust:secret@127.0.0.1:{free_port()}/nothing"
    with pytest.raises(StoreUnavailable) as raised:
        migrateURL(url)
    assert "dwtrust:***@127.0.0.1" in str(raised.value)
    assert "secret" not in str(raised.value)


def test_withoutPsycopg(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    Without psycopg, a PostgreSQL store is a one-line L{StoreError} that says
    what to install.
    """
    monkeypatch.setitem(sys.modules, "psycopg", None)
    with pytest.raises(StoreError, match=r"pip install dwtrust\[postgresql\]"):
        driver()


def test_migrateCommand(postgres: PostgreSQLServer, database: str) -> None:
    """
    C{dwtrust migrate --store URL} creates the schema and says from which
    version to which; run again, it says the schema is up to date.
    """
    out, err = io.StringIO(), io.StringIO()
    assert cliMain(["migrate", "--store", database], out, err) == 0, err.getvalue()
    assert out.getvalue() == f"{database}: schema version 0 -> {SCHEMA_VERSION}\n"
    assert tables(postgres, database) == TABLES
    out = io.StringIO()
    assert cliMain(["migrate", "--store", database], out, err) == 0, err.getvalue()
    assert out.getvalue() == (
        f"{database}: schema version {SCHEMA_VERSION}, up to date\n"
    )


def test_migrateCommandFailures(postgres: PostgreSQLServer, database: str) -> None:
    """
    C{dwtrust migrate} with no C{--store} is a usage error (2); with a newer
    schema, it fails (1) and says why.
    """
    out, err = io.StringIO(), io.StringIO()
    assert cliMain(["migrate"], out, err) == 2
    assert "--store is required" in err.getvalue()
    postgres.sql(
        database,
        "CREATE TABLE dwtrust_schema (single BOOLEAN PRIMARY KEY DEFAULT TRUE"
        " CHECK (single), version INTEGER NOT NULL)",
    )
    postgres.sql(database, "INSERT INTO dwtrust_schema VALUES (TRUE, 99)")
    err = io.StringIO()
    assert cliMain(["migrate", "--store", database], out, err) == 1
    assert "newer than this dwtrust's" in err.getvalue()


# Two instances at once


class FleetTests(TestCase):
    """
    Two store objects on one database behave as two instances of a fleet.
    """

    url: str
    server: PostgreSQLServer

    @pytest.fixture(autouse=True)
    def _database(self, postgres: PostgreSQLServer, database: str) -> None:
        self.server = postgres
        self.url = database

    async def instance(self) -> PostgreSQLStore:
        opened = await openStore(self.url, 3, FakeNow())
        assert isinstance(opened, PostgreSQLStore)
        self.addCleanup(opened.close)
        return opened

    def test_racingPendingRequests(self) -> Deferred[None]:
        """
        Two instances asking at once, ten times each, about one unknown key
        make one pending request: one call creates it, the 19 others count
        their attempt on it.
        """

        async def run() -> None:
            first, second = await self.instance(), await self.instance()
            peer = peerIdentity()
            calls = [
                store.addPending(peer, f"10.0.0.{n}:1", f"id{n}", 5000.0, 100, 100)
                for n in range(10)
                for store in (first, second)
            ]
            results = await gatherResults(calls)
            created = [record for record, new in results if new]
            self.assertEqual(len(created), 1)
            ids = {record.requestId for record, _ in results}
            self.assertEqual(ids, {created[0].requestId})
            [pending] = await first.pending()
            self.assertEqual(pending.attempts, 20)
            self.assertEqual(pending.requestId, created[0].requestId)

        return Deferred.fromCoroutine(run())

    def test_capsHoldUnderConcurrency(self) -> Deferred[None]:
        """
        Ten unknown keys asking at once through two instances, with at most
        three pending requests in all, make exactly three; the others are
        refused with L{PendingFull}.
        """

        async def run() -> None:
            first, second = await self.instance(), await self.instance()
            stores = [first, second]

            async def ask(n: int) -> str:
                try:
                    await stores[n % 2].addPending(
                        peerIdentity(), f"10.0.1.{n}:1", f"id{n}", 5000.0, 100, 3
                    )
                except PendingFull:
                    return "full"
                return "created"

            outcomes = await gatherResults(
                [Deferred.fromCoroutine(ask(n)) for n in range(10)]
            )
            self.assertEqual(sorted(outcomes), ["created"] * 3 + ["full"] * 7)
            self.assertEqual(len(await second.pending()), 3)

        return Deferred.fromCoroutine(run())

    def test_concurrentDecisions(self) -> Deferred[None]:
        """
        Two owners deciding about one key at once, through two instances,
        leave one row whose state is the state of the decision it holds, and
        both decisions are in the log, the second one naming the first as
        what it replaced.
        """

        async def run() -> None:
            events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
            first, second = await self.instance(), await self.instance()
            peer = peerIdentity()
            await first.record(peer, KeyState.denied, "", "policy", b"denied")
            await gatherResults(
                [
                    first.record(peer, KeyState.approved, "", "alice", b"approved"),
                    second.record(peer, KeyState.revoked, "", "bob", b"revoked"),
                ]
            )
            [row] = self.server.sql(
                self.url,
                "SELECT state, decided_by, decision FROM peers WHERE fingerprint = %s",
                peer.fingerprint,
            )
            self.assertIn(
                row,
                [("approved", "alice", b"approved"), ("revoked", "bob", b"revoked")],
            )
            stored = [
                (e["state"], e["previous"])
                for e in events
                if e.get("event") == "dwtrust.store.decision"
            ]
            self.assertEqual(stored[0], ("denied", None))
            later = sorted(stored[1:])
            final = str(row[0])
            other = "revoked" if final == "approved" else "approved"
            # The one that committed first replaced the denial; the other
            # replaced it.
            self.assertEqual(later, sorted([(other, "denied"), (final, other)]))
            for store in (first, second):
                record = await store.lookup(peer.fingerprint)
                assert record is not None
                self.assertEqual(record.state.value, final)

        return Deferred.fromCoroutine(run())

    def test_notifications(self) -> Deferred[None]:
        """
        A decision or a new pending request made through one instance is
        announced to the other (with the record as it now is), and to the
        one that made it, marked local.  A request refused by a cap is
        rolled back, and nobody hears of it: the announcement that follows
        it is the next one to arrive.
        """

        async def run() -> None:
            first, second = await self.instance(), await self.instance()
            heard, own = Changes(first), Changes(second)
            # Let both listeners connect before anything changes.
            await first.lookup("SHA256:nothing")
            await second.lookup("SHA256:nothing")
            await first.whenListening()
            await second.whenListening()

            peer, refused, later = peerIdentity(), peerIdentity(), peerIdentity()
            record, created = await second.addPending(
                peer, "10.0.0.1:1", "abc", 5000.0, 1, 100
            )
            self.assertTrue(created)
            change = await heard.next(about("pending", peer.fingerprint))
            self.assertEqual(change.record, record)
            self.assertFalse(change.local)
            mine = await own.next(about("pending", peer.fingerprint))
            self.assertTrue(mine.local)

            await second.record(peer, KeyState.approved, "", "alice", b"signed")
            change = await heard.next(about("decided", peer.fingerprint))
            assert change.record is not None
            self.assertEqual(change.record.state, KeyState.approved)
            self.assertEqual(change.record.decision, b"signed")

            blocker = peerIdentity()
            await second.addPending(blocker, "10.0.0.9:1", "b", 5000.0, 1, 100)
            await heard.next(about("pending", blocker.fingerprint))
            with self.assertRaises(PendingFull):
                await second.addPending(refused, "10.0.0.9:2", "x", 5000.0, 1, 100)
            await second.record(later, KeyState.denied, "", "alice", b"later")
            await heard.next(about("decided", later.fingerprint))
            self.assertEqual(
                [(c.kind, c.fingerprint) for c in heard.seen],
                [
                    ("pending", peer.fingerprint),
                    ("decided", peer.fingerprint),
                    ("pending", blocker.fingerprint),
                    ("decided", later.fingerprint),
                ],
            )

        return Deferred.fromCoroutine(run())


# Outages


class OutageTests(TestCase):
    """
    A store whose server stops and starts again.
    """

    server: PostgreSQLServer

    @pytest.fixture(autouse=True)
    def _server(self, ownServer: PostgreSQLServer) -> None:
        self.server = ownServer

    def test_outage(self) -> Deferred[None]:
        """
        While the server is down, a key the store has read answers from the
        cache (as the latest change heard made it, not as first read), an
        unknown key and every write fail with L{StoreUnavailable}, and
        counting an attempt is dropped with one line in the log.  When the
        server is back, the same store objects serve again, no decision made
        before is lost, and changes are announced again.
        """

        async def run() -> None:
            events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
            url = self.server.newDatabase()
            first = await PostgreSQLStore.open(url, 2)
            self.addCleanup(first.close)
            second = await PostgreSQLStore.open(url, 2)
            self.addCleanup(second.close)
            heard = Changes(first)
            await first.lookup("SHA256:nothing")
            await first.whenListening()

            kept, revoked, unknown = peerIdentity(), peerIdentity(), peerIdentity()
            await second.record(kept, KeyState.approved, "", "alice", b"kept")
            await second.record(revoked, KeyState.approved, "", "alice", b"ok")
            for peer in (kept, revoked):
                record = await first.lookup(peer.fingerprint)
                assert record is not None
                self.assertEqual(record.state, KeyState.approved)
            await heard.next(about("decided", revoked.fingerprint))
            await second.record(revoked, KeyState.revoked, "", "bob", b"revoked")
            await heard.next(
                lambda c: (
                    c.fingerprint == revoked.fingerprint
                    and c.record is not None
                    and c.record.state is KeyState.revoked
                )
            )

            self.server.stop()
            record = await first.lookup(kept.fingerprint)
            assert record is not None
            self.assertEqual(
                (record.state, record.decision), (KeyState.approved, b"kept")
            )
            record = await first.lookup(revoked.fingerprint)
            assert record is not None
            self.assertEqual(record.state, KeyState.revoked)
            with self.assertRaises(StoreUnavailable):
                await first.lookup(unknown.fingerprint)
            with self.assertRaises(StoreUnavailable):
                await first.record(unknown, KeyState.approved, "", "alice", b"x")
            with self.assertRaises(StoreUnavailable):
                await first.addPending(unknown, "10.0.0.1:1", "r", 5000.0, 10, 10)
            await first.seen(kept.fingerprint, "10.0.0.1:1")
            await first.seen(kept.fingerprint, "10.0.0.1:1")
            dropped = [
                e for e in events if e.get("event") == "dwtrust.store.seen_dropped"
            ]
            self.assertEqual(len(dropped), 1)
            self.assertTrue(
                any(e.get("event") == "dwtrust.store.unavailable" for e in events)
            )
            self.assertFalse([e for e in events if "log_failure" in e])

            self.server.start()
            self.assertIsNone(await first.lookup(unknown.fingerprint))
            record = await first.lookup(kept.fingerprint)
            assert record is not None
            self.assertEqual(record.decision, b"kept")
            await first.whenListening()
            await second.record(unknown, KeyState.denied, "", "alice", b"after")
            change = await heard.next(about("decided", unknown.fingerprint))
            assert change.record is not None
            self.assertEqual(change.record.state, KeyState.denied)
            self.assertTrue(
                any(e.get("event") == "dwtrust.store.available" for e in events)
            )

        return Deferred.fromCoroutine(run())


# The policy in an outage


class UnavailableStore(MemoryTrustStore):
    """
    A store whose server is down: every lookup fails.
    """

    def lookup(self, fingerprint: str) -> Deferred[KeyRecord | None]:
        failed: Deferred[KeyRecord | None] = Deferred()
        failed.errback(StoreUnavailable("the trust store is down"))
        return failed


class NeverAsked:
    name = "never"

    def requestApproval(self, request: ApprovalRequest) -> Deferred[Decision]:
        raise AssertionError("the approver was asked")


class PolicyTests(TestCase):
    def test_unavailableRefusesWithoutTraceback(self) -> None:
        """
        L{ApprovalPolicy} turns L{StoreUnavailable} into a refusal with
        C{unavailable}, logged as one warning with no traceback.
        """
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        identity = Identity.generate("acme", "ledger")
        policy = ApprovalPolicy(
            UnavailableStore(),
            NeverAsked(),
            identity,  # type: ignore[arg-type]
        )
        peer = peerIdentity()
        refusal = self.failureResultOf(policy.check(peer, "10.0.0.1:1"), Refusal)
        self.assertEqual(refusal.value.code, ErrorCode.unavailable)  # type: ignore[attr-defined]
        self.assertFalse([e for e in events if "log_failure" in e])
        [warning] = [e for e in events if e.get("event") == "dwtrust.store_unavailable"]
        self.assertEqual(warning["fingerprint"], peer.fingerprint)
