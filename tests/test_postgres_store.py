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
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import attrs
import psycopg
import pytest
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import deferLater
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
    DecisionConflict,
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
from dwtrust.store._postgres import (
    CHANNEL,
    MIGRATIONS,
    _records,
    driver,
    migrateURL,
)
from dwtrust.testing import MemoryTrustStore

from .test_store import FakeNow, StoreContractMixin, TrustAndPins, peerIdentity

if TYPE_CHECKING:
    from .postgres import PostgreSQLServer

pytest_plugins = ["tests.postgres"]

#: Seconds a test waits for a notification before it fails.
NOTIFICATION_DEADLINE = 10.0

TABLES = ["decisions", "dwtrust_schema", "known_services", "owners", "peers"]


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


def _schemaAt(server: PostgreSQLServer, url: str, version: int) -> None:
    """
    Make the schema of C{version}, as that version's dwtrust left it.
    """
    server.sql(
        url,
        "CREATE TABLE dwtrust_schema (single BOOLEAN PRIMARY KEY DEFAULT TRUE"
        " CHECK (single), version INTEGER NOT NULL)",
    )
    server.sql(url, "INSERT INTO dwtrust_schema VALUES (TRUE, %s)", version)
    for step in MIGRATIONS[:version]:
        server.sql(url, step)


def test_migrateFromVersion1(postgres: PostgreSQLServer, database: str) -> None:
    """
    A database at version 1 (no decisions, no owners) with a row in it is
    upgraded to the current version, and keeps the row, with the new columns
    at their defaults and no decision in its history.
    """
    _schemaAt(postgres, database, 1)
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
    assert postgres.sql(database, "SELECT * FROM decisions") == []
    assert tables(postgres, database) == TABLES


def test_migrateUpgradesOneStep(postgres: PostgreSQLServer, database: str) -> None:
    """
    Migrating a version 2 database puts each stored decision in the new
    history at place 0 (it has none of its own), sent by nobody known, and
    empties the old column; a pending request stays pending, with no
    history.
    """
    _schemaAt(postgres, database, 2)
    peer, waiting = peerIdentity(), peerIdentity("acme", "other")
    for who, state, decision in ((peer, "approved", b"d"), (waiting, "pending", b"")):
        postgres.sql(
            database,
            "INSERT INTO peers (fingerprint, org, service, algorithm, public_key,"
            " state, first_seen, last_seen, attempts, source, decided_by,"
            " decision, request_id, expires) VALUES"
            " (%s, %s, %s, %s, %s, %s, 1, 2, 3, 'src', 'alice', %s, %s, %s)",
            who.fingerprint,
            who.org,
            who.service,
            who.algorithm,
            who.publicKey.blob,
            state,
            decision,
            "req" if state == "pending" else "",
            99.0 if state == "pending" else 0.0,
        )
    assert migrateURL(database) == 2
    assert schemaVersion(postgres, database) == SCHEMA_VERSION == 3
    assert postgres.sql(
        database,
        "SELECT fingerprint, sequence, org, service, state, decided_by, sent_by,"
        " recorded_at, decision FROM decisions",
    ) == [(peer.fingerprint, 0, "acme", "billing", "approved", "alice", "", 2.0, b"d")]
    assert postgres.sql(database, "SELECT DISTINCT decision FROM peers") == [(b"",)]
    with psycopg.connect(database) as connection, connection.cursor() as cursor:
        records = _records(cursor, [peer.fingerprint, waiting.fingerprint])
    old, pending = records[peer.fingerprint], records[waiting.fingerprint]
    assert (old.state, old.decision, old.sequence, old.sentBy, old.attempts) == (
        KeyState.approved,
        b"d",
        0,
        "",
        3,
    )
    assert (pending.state, pending.requestId, pending.sequence) == (
        KeyState.pending,
        "req",
        -1,
    )


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
    from .processes import refusing_port

    with refusing_port() as nowhere, pytest.raises(StoreUnavailable) as raised:
        migrateURL(f"postgresql://dwtrust:secret@127.0.0.1:{nowhere}/nothing")
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
        each at the next place in its history: one decision is stored, the
        other is refused with L{DecisionConflict} (nothing stored, nothing
        logged as a failure, the store still available).  Two decisions at
        different places, stored at once, are both kept, and the higher
        place is the key's newest, whichever committed last.
        """

        async def run() -> None:
            events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
            first, second = await self.instance(), await self.instance()
            peer = peerIdentity()
            await first.record(peer, KeyState.denied, "", "policy", b"denied", 0)

            async def outcome(deciding: Deferred[KeyRecord]) -> str:
                try:
                    return (await deciding).state.value
                except DecisionConflict:
                    return "conflict"

            outcomes = await gatherResults(
                [
                    Deferred.fromCoroutine(
                        outcome(
                            first.record(
                                peer, KeyState.approved, "", "alice", b"a1", 1, "a"
                            )
                        )
                    ),
                    Deferred.fromCoroutine(
                        outcome(
                            second.record(
                                peer, KeyState.revoked, "", "bob", b"r1", 1, "b"
                            )
                        )
                    ),
                ]
            )
            self.assertEqual(sorted(outcomes).count("conflict"), 1, outcomes)
            [final] = [o for o in outcomes if o != "conflict"]
            history = self.server.sql(
                self.url,
                "SELECT sequence, state FROM decisions WHERE fingerprint = %s"
                " ORDER BY sequence",
                peer.fingerprint,
            )
            self.assertEqual(history, [(0, "denied"), (1, final)])
            stored = [
                (e["state"], e["previous"], e["sequence"])
                for e in events
                if e.get("event") == "dwtrust.store.decision"
            ]
            self.assertEqual(stored, [("denied", None, 0), (final, "denied", 1)])
            self.assertFalse([e for e in events if "log_failure" in e])
            self.assertFalse(
                [e for e in events if e.get("event") == "dwtrust.store.unavailable"]
            )
            for store in (first, second):
                record = await store.lookup(peer.fingerprint)
                assert record is not None
                self.assertEqual((record.state.value, record.sequence), (final, 1))

            await gatherResults(
                [
                    first.record(peer, KeyState.revoked, "", "alice", b"r3", 3, "a"),
                    second.record(peer, KeyState.approved, "", "bob", b"a2", 2, "b"),
                ]
            )
            for store in (first, second):
                record = await store.lookup(peer.fingerprint)
                assert record is not None
                self.assertEqual(
                    (record.state, record.sequence, record.decision, record.sentBy),
                    (KeyState.revoked, 3, b"r3", "a"),
                )

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


# The history of decisions, and who may write it


def documentedGrants(database: str, role: str) -> list[str]:
    """
    The C{GRANT} statements that docs/fleet.rst gives the instances' role,
    for C{role} on C{database}.
    """
    text = (Path(__file__).parent.parent / "docs" / "fleet.rst").read_text()
    grants = [
        line.strip()
        for line in text.splitlines()
        if line.startswith("    GRANT ") and line.endswith(" TO ledger;")
    ]
    assert len(grants) == 5, grants
    return [
        grant.replace("DATABASE ledger_trust ", f"DATABASE {database} ").replace(
            " TO ledger;", f" TO {role};"
        )
        for grant in grants
    ]


class HistoryTests(TestCase):
    """
    Each key's decisions in PostgreSQL: append-only, for every role.
    """

    url: str
    server: PostgreSQLServer

    @pytest.fixture(autouse=True)
    def _database(self, postgres: PostgreSQLServer, database: str) -> None:
        self.server = postgres
        self.url = database

    async def instance(self, url: str | None = None) -> PostgreSQLStore:
        opened = await PostgreSQLStore.open(url or self.url, 2, FakeNow(100.0))
        self.addCleanup(opened.close)
        return opened

    def test_decisionsCannotBeChangedInPlace(self) -> Deferred[None]:
        """
        The database refuses to update, delete or truncate a stored decision,
        even for its superuser.
        """

        async def run() -> None:
            store = await self.instance()
            peer = peerIdentity()
            await store.record(peer, KeyState.revoked, "s", "alice", b"r", 2, "a")
            for statement in (
                "UPDATE decisions SET sequence = 9",
                "UPDATE decisions SET state = 'approved'",
                "DELETE FROM decisions",
                "TRUNCATE decisions",
            ):
                with self.assertRaises(psycopg.errors.RaiseException) as caught:
                    self.server.sql(self.url, statement)
                self.assertIn("decisions are append-only", str(caught.exception))
            record = await store.lookup(peer.fingerprint)
            assert record is not None
            self.assertEqual(
                (record.state, record.decision, record.sequence),
                (KeyState.revoked, b"r", 2),
            )

        return Deferred.fromCoroutine(run())

    def test_decisionOutlivesItsPeerRow(self) -> Deferred[None]:
        """
        A key whose C{peers} row was removed behind the store's back is still
        found, with its newest decision: removing the row does not make a
        revoked key unknown.
        """

        async def run() -> None:
            store = await self.instance()
            peer = peerIdentity()
            await store.record(peer, KeyState.approved, "s", "alice", b"a", 1, "a")
            await store.record(peer, KeyState.revoked, "s", "alice", b"r", 2, "a")
            self.server.sql(self.url, "DELETE FROM peers")
            record = await store.lookup(peer.fingerprint)
            assert record is not None
            self.assertEqual(
                (record.state, record.decision, record.sequence, record.sentBy),
                (KeyState.revoked, b"r", 2, "a"),
            )
            self.assertEqual((record.org, record.service), ("acme", "billing"))
            self.assertEqual(record.publicKey, peer.publicKey.blob)

        return Deferred.fromCoroutine(run())

    def _roles(self) -> tuple[str, str, str]:
        """
        Make a role that owns this test's database, and one for its
        instances; return the database's name and the two roles'.
        """
        name = self.url.rsplit("/", 1)[1]
        owner, instance = f"{name}_schema", f"{name}_instance"
        for role in (owner, instance):
            self.server.sql(self.url, f"CREATE ROLE {role} LOGIN")
        self.server.sql(self.url, f"ALTER DATABASE {name} OWNER TO {owner}")
        return name, owner, instance

    def _as(self, role: str) -> str:
        """
        This test's database's URL, for C{role}.
        """
        parts = urlsplit(self.url)
        return parts._replace(netloc=f"{role}@{parts.hostname}:{parts.port}").geturl()

    def test_leastPrivilege(self) -> Deferred[None]:
        """
        With the schema made by its owner (C{dwtrust migrate}), a store whose
        role has exactly the grants docs/fleet.rst gives does all an
        instance does: it opens the store, makes, counts and expires
        requests, stores and reads decisions (and is refused a taken place
        in a key's history), pins, and hears of changes.  That role cannot
        update, delete or truncate a decision, nor change the schema.
        """

        async def run() -> None:
            events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
            name, owner, role = self._roles()
            out, err = io.StringIO(), io.StringIO()
            self.assertEqual(
                cliMain(["migrate", "--store", self._as(owner)], out, err),
                0,
                err.getvalue(),
            )
            for grant in documentedGrants(name, role):
                self.server.sql(self._as(owner), grant)
            store = await self.instance(self._as(role))
            heard = Changes(store)
            await store.whenListening()

            peer, lapsing = peerIdentity(), peerIdentity()
            record, created = await store.addPending(
                peer, "10.0.0.1:1", "req", 5000.0, 5, 5
            )
            self.assertTrue(created)
            await heard.next(about("pending", peer.fingerprint, local=True))
            _, again = await store.addPending(peer, "10.0.0.1:2", "x", 5000.0, 5, 5)
            self.assertFalse(again)
            self.assertEqual(
                [r.fingerprint for r in await store.pending()], [peer.fingerprint]
            )
            approved = await store.record(
                peer, KeyState.approved, "10.0.0.1:2", "alice", b"a1", 1, "owner-a"
            )
            await heard.next(about("decided", peer.fingerprint, local=True))
            with self.assertRaises(DecisionConflict):
                await store.record(
                    peer, KeyState.revoked, "10.0.0.1:2", "bob", b"r1", 1, "owner-b"
                )
            await store.seen(peer.fingerprint, "10.0.0.1:3")
            record = await store.lookup(peer.fingerprint)
            assert record is not None
            self.assertEqual(
                (record.state, record.decision, record.sequence, record.sentBy),
                (KeyState.approved, b"a1", 1, "owner-a"),
            )
            self.assertEqual(record.attempts, approved.attempts + 1)
            self.assertEqual(await store.decided(), [record])
            self.assertEqual(await store.keysFor("acme", "billing"), [record])
            await store.addPending(lapsing, "10.0.0.2:1", "lapse", 150.0, 5, 5)
            lapsed = await store.expirePending(200.0)
            self.assertEqual([r.fingerprint for r in lapsed], [lapsing.fingerprint])
            self.assertEqual(await store.pending(), [])
            pin = await store.pin("tcp:host=ledger:port=1", peer)
            self.assertEqual(await store.pinned("tcp:host=ledger:port=1"), pin)
            self.assertTrue(await store.unpin("tcp:host=ledger:port=1"))
            self.assertEqual(await store.owners(), [])
            self.assertEqual(store.ownersNow(), [])

            for statement in (
                "UPDATE decisions SET state = 'revoked'",
                "DELETE FROM decisions",
                "TRUNCATE decisions",
            ):
                with self.assertRaises(psycopg.errors.InsufficientPrivilege) as caught:
                    self.server.sql(self._as(role), statement)
                self.assertIn(
                    "permission denied for table decisions", str(caught.exception)
                )
            for statement in (
                "CREATE TABLE decisions2 (a INTEGER)",
                "DROP TRIGGER decisions_are_not_changed ON decisions",
                "UPDATE dwtrust_schema SET version = 2",
            ):
                with self.assertRaises(psycopg.errors.InsufficientPrivilege):
                    self.server.sql(self._as(role), statement)
            record = await store.lookup(peer.fingerprint)
            assert record is not None
            self.assertEqual((record.state, record.sequence), (KeyState.approved, 1))
            self.assertFalse([e for e in events if "log_failure" in e])
            self.assertFalse(
                [e for e in events if e.get("event") == "dwtrust.store.unavailable"]
            )

        return Deferred.fromCoroutine(run())

    def test_olderSchemaWithoutPrivilege(self) -> Deferred[None]:
        """
        An instance whose role may not change the schema, on a store with an
        older schema, is refused with a L{StoreError} that says to run
        C{dwtrust migrate} as the schema's owner; the schema is untouched.
        """

        async def run() -> None:
            name, owner, role = self._roles()
            _schemaAt(self.server, self._as(owner), 2)
            for grant in documentedGrants(name, role):
                if " decisions " not in grant:
                    self.server.sql(self._as(owner), grant)
            with self.assertRaises(StoreError) as caught:
                await PostgreSQLStore.open(self._as(role), 1)
            self.assertIn("permission denied", str(caught.exception))
            self.assertIn(
                "dwtrust migrate as the role that owns", str(caught.exception)
            )
            self.assertEqual(schemaVersion(self.server, self.url), 2)

        return Deferred.fromCoroutine(run())


def test_cacheNeverGoesBack() -> None:
    """
    The cache of decided records (what an instance serves in an outage)
    never replaces a key's record with one whose newest decision is older:
    such a record was read before the cached one.
    """
    store = PostgreSQLStore("postgresql://nobody@127.0.0.1:1/unused")
    peer = peerIdentity()
    newer = KeyRecord(
        peer.fingerprint,
        "acme",
        "billing",
        peer.algorithm,
        peer.publicKey.blob,
        KeyState.revoked,
        1.0,
        2.0,
        1,
        "",
        "bob",
        b"r2",
        sequence=2,
    )
    older = attrs.evolve(newer, state=KeyState.approved, decision=b"a1", sequence=1)
    store._remember(peer.fingerprint, newer)
    store._remember(peer.fingerprint, older)
    assert store.cached(peer.fingerprint) == newer
    newest = attrs.evolve(newer, decision=b"r3", sequence=3)
    store._remember(peer.fingerprint, newest)
    assert store.cached(peer.fingerprint) == newest


# Catching up after the listener was cut off


def cutListeners(server: PostgreSQLServer, url: str) -> None:
    """
    End every store's listening connection to C{url}'s database, as a
    network fault would, while the server stays up for everyone else.
    """
    [(count,)] = server.sql(
        url,
        "SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity"
        " WHERE datname = current_database() AND query = %s"
        " AND pid <> pg_backend_pid()",
        f"LISTEN {CHANNEL}",
    )
    assert count, "no store was listening"


async def reconnected(store: PostgreSQLStore, connections: int) -> None:
    """
    Wait until C{store}'s listener has connected again after its
    C{connections}th connection, and caught up.
    """
    for _ in range(int(NOTIFICATION_DEADLINE / 0.05)):
        if store._connections > connections:
            await store.whenListening()
            return
        await deferLater(reactor, 0.05)
    raise AssertionError("the listener did not connect again")


def deafened(store: PostgreSQLStore) -> None:
    """
    Make C{store}'s writes send no notification, as if every listener had
    been cut off when they were made.
    """
    store._notify = lambda cursor, kind, fingerprint: None  # type: ignore[method-assign]


class CatchUpTests(TestCase):
    """
    An instance whose listener was cut off announces, once it listens again,
    what it missed meanwhile.
    """

    url: str
    server: PostgreSQLServer

    @pytest.fixture(autouse=True)
    def _database(self, postgres: PostgreSQLServer, database: str) -> None:
        self.server = postgres
        self.url = database

    async def instance(self) -> PostgreSQLStore:
        opened = await PostgreSQLStore.open(self.url, 2, FakeNow(100.0))
        self.addCleanup(opened.close)
        return opened

    def test_missedChangesAnnounced(self) -> Deferred[None]:
        """
        Changes made while an instance heard nothing are announced when its
        listener connects again, each once, as their notifications would
        have been: a new request through another instance, and one through
        itself (marked local); the decision on a request it had announced,
        and on one it had counted an attempt on and never heard of; and a
        newer decision about a key in its cache, which the cache then
        holds.  A request it had announced before is not announced again,
        and a listener that connects again with nothing missed announces
        nothing.
        """

        async def run() -> None:
            events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
            first, second = await self.instance(), await self.instance()
            heard = Changes(first)
            await first.whenListening()
            held, cached, fresh, mine, asked = (peerIdentity() for _ in range(5))
            await second.addPending(held, "10.0.0.1:1", "held", 5000.0, 10, 10)
            await heard.next(about("pending", held.fingerprint))
            await second.record(cached, KeyState.approved, "", "alice", b"a1", 1)
            await heard.next(about("decided", cached.fingerprint))
            await first.lookup(cached.fingerprint)
            before = len(heard.seen)

            deafened(first)
            deafened(second)
            await second.addPending(fresh, "10.0.0.2:1", "fresh", 5000.0, 10, 10)
            await first.addPending(mine, "10.0.0.3:1", "mine", 5000.0, 10, 10)
            await second.record(held, KeyState.approved, "", "alice", b"h1", 1)
            await second.record(cached, KeyState.revoked, "", "bob", b"r2", 2, "b")
            # A request this instance counted an attempt on (it may hold a
            # connection for it), decided before it could hear of either.
            await second.addPending(asked, "10.0.0.4:1", "asked", 5000.0, 10, 10)
            _, created = await first.addPending(
                asked, "10.0.0.4:2", "x", 5000.0, 10, 10
            )
            self.assertFalse(created)
            await second.record(asked, KeyState.denied, "", "alice", b"d1", 1)
            connections = first._connections
            cutListeners(self.server, self.url)
            await reconnected(first, connections)

            missed = {(c.kind, c.fingerprint): c for c in heard.seen[before:]}
            self.assertEqual(len(missed), len(heard.seen[before:]), heard.seen)
            self.assertEqual(
                set(missed),
                {
                    ("pending", fresh.fingerprint),
                    ("pending", mine.fingerprint),
                    ("decided", held.fingerprint),
                    ("decided", cached.fingerprint),
                    ("decided", asked.fingerprint),
                },
            )
            change = missed["pending", fresh.fingerprint]
            assert change.record is not None
            self.assertEqual((change.record.requestId, change.local), ("fresh", False))
            change = missed["pending", mine.fingerprint]
            assert change.record is not None
            self.assertEqual((change.record.requestId, change.local), ("mine", True))
            change = missed["decided", held.fingerprint]
            assert change.record is not None
            self.assertEqual(
                (change.record.state, change.record.decision, change.local),
                (KeyState.approved, b"h1", False),
            )
            change = missed["decided", cached.fingerprint]
            assert change.record is not None
            self.assertEqual(
                (change.record.state, change.record.sequence, change.record.sentBy),
                (KeyState.revoked, 2, "b"),
            )
            change = missed["decided", asked.fingerprint]
            assert change.record is not None
            self.assertEqual(change.record.state, KeyState.denied)
            [caughtUp] = [
                e
                for e in events
                if e.get("event") == "dwtrust.store.caught_up"
                and e["log_source"] is first
            ]
            self.assertEqual(caughtUp["count"], 5)
            cachedRecord = first.cached(cached.fingerprint)
            assert cachedRecord is not None
            self.assertEqual(cachedRecord.state, KeyState.revoked)

            # Nothing missed this time: nothing announced.
            after = len(heard.seen)
            connections = first._connections
            cutListeners(self.server, self.url)
            await reconnected(first, connections)
            self.assertEqual(heard.seen[after:], [])
            self.assertFalse([e for e in events if "log_failure" in e])

        return Deferred.fromCoroutine(run())

    def test_notHeardTwice(self) -> Deferred[None]:
        """
        A request made just after the listener connects again is both heard
        (its notification) and read by the catch-up: it is announced once.
        """

        async def run() -> None:
            # One connection: the reads after the notifications run in turn.
            first = await PostgreSQLStore.open(self.url, 1, FakeNow(100.0))
            self.addCleanup(first.close)
            second = await self.instance()
            heard = Changes(first)
            await first.whenListening()
            # Its pool is open (it opens with the store's first use).
            await second.whenListening()
            peer, later = peerIdentity(), peerIdentity()
            catchUp = first._catchUp

            def requestThenCatchUp(connection: int) -> None:
                # Listening again, not caught up yet: the request's
                # notification comes, and the catch-up reads it.
                del first._catchUp  # type: ignore[method-assign]
                second._transact(
                    lambda cursor: second._newPending(
                        cursor, peer, "10.0.0.1:1", "10.0.0.1", 100.0, "r", 5000.0, 9, 9
                    )
                )
                catchUp(connection)

            first._catchUp = requestThenCatchUp  # type: ignore[method-assign]
            connections = first._connections
            cutListeners(self.server, self.url)
            await reconnected(first, connections)
            await heard.next(about("pending", peer.fingerprint))
            # Once a later change is announced, the request's notification
            # has been read too.
            await second.record(later, KeyState.denied, "", "alice", b"d")
            await heard.next(about("decided", later.fingerprint))
            announced = [c for c in heard.seen if c.fingerprint == peer.fingerprint]
            self.assertEqual(len(announced), 1, announced)
            self.assertFalse(announced[0].local)

        return Deferred.fromCoroutine(run())

    def test_missedBeforeListening(self) -> Deferred[None]:
        """
        A request made after an instance opened the store, but before its
        listener first connected, is announced when it connects; one that
        was there when it opened is not.
        """

        async def run() -> None:
            second = await self.instance()
            old, fresh = peerIdentity(), peerIdentity()
            await second.addPending(old, "10.0.0.1:1", "old", 5000.0, 10, 10)
            first = await self.instance()
            await second.addPending(fresh, "10.0.0.2:1", "fresh", 5000.0, 10, 10)
            heard = Changes(first)
            change = await heard.next(about("pending", fresh.fingerprint))
            self.assertFalse(change.local)
            await first.whenListening()
            self.assertEqual(
                [(c.kind, c.fingerprint) for c in heard.seen],
                [("pending", fresh.fingerprint)],
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
            await second.record(revoked, KeyState.revoked, "", "bob", b"revoked", 1)
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
