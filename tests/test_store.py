"""
Tests for L{dwtrust.store}: the SQLite trust store, on real files in a
temporary directory, and the contract it shares with
L{dwtrust.testing.MemoryTrustStore}.
"""

from __future__ import annotations

import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable

from twisted.internet.defer import Deferred
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from dwtrust import Identity, PeerIdentity
from dwtrust.store import (
    SCHEMA_VERSION,
    DecisionConflict,
    IKnownServices,
    ITrustStore,
    KeyRecord,
    KeyState,
    PendingFull,
    Pin,
    SQLiteStore,
    StoreError,
    sourceHost,
)
from dwtrust.store._sqlite import MIGRATIONS, migrateFile
from dwtrust.testing import MemoryTrustStore

TrustAndPins = SQLiteStore | MemoryTrustStore


def temporaryDirectory(case: SynchronousTestCase) -> FilePath[str]:
    """
    A new, empty directory, removed when C{case} ends.  (Trial's C{mktemp}
    is relative to the working directory, which under pytest is the
    checkout.)
    """
    path = tempfile.mkdtemp(prefix="dwtrust-test-")
    case.addCleanup(shutil.rmtree, path, ignore_errors=True)
    return FilePath(path)


def peerIdentity(org: str = "acme", service: str = "billing") -> PeerIdentity:
    """
    A peer with a fresh Ed25519 key.
    """
    identity = Identity.generate(org, service)
    return PeerIdentity(identity.org, identity.service, identity.publicKey)


class FakeNow:
    """
    A clock for the store's C{now}: it says what the test last set.
    """

    def __init__(self, when: float = 1000.0) -> None:
        self.when = when

    def __call__(self) -> float:
        return self.when


def userVersion(path: str) -> int:
    connection = sqlite3.connect(path)
    try:
        (version,) = connection.execute("PRAGMA user_version").fetchone()
        return int(version)
    finally:
        connection.close()


def schemaObjects(path: str) -> list[tuple[str, str]]:
    connection = sqlite3.connect(path)
    try:
        rows = connection.execute(
            "SELECT type, name FROM sqlite_master ORDER BY type, name"
        ).fetchall()
        return [(str(kind), str(name)) for kind, name in rows]
    finally:
        connection.close()


EXPECTED_SCHEMA = [
    ("index", "known_services_by_service"),
    ("index", "peers_by_service"),
    ("index", "peers_pending_by_source"),
    ("index", "sqlite_autoindex_decisions_1"),
    ("index", "sqlite_autoindex_known_services_1"),
    ("index", "sqlite_autoindex_owners_1"),
    ("index", "sqlite_autoindex_peers_1"),
    ("table", "decisions"),
    ("table", "known_services"),
    ("table", "owners"),
    ("table", "peers"),
    ("trigger", "decisions_are_not_deleted"),
    ("trigger", "decisions_are_not_updated"),
]


class StoreContractMixin:
    """
    What every L{ITrustStore} and L{IKnownServices} must do.  Subclasses say
    how to make the store, with the given C{now}.
    """

    # Provided by twisted.trial.unittest.TestCase.
    assertEqual: Callable[..., None]
    assertIs: Callable[..., None]
    assertIsNone: Callable[..., None]
    assertTrue: Callable[..., None]
    assertFalse: Callable[..., None]
    addCleanup: Callable[..., None]

    async def makeStore(self, now: Callable[[], float]) -> TrustAndPins:
        raise NotImplementedError()

    async def _store(self, now: Callable[[], float]) -> TrustAndPins:
        store = await self.makeStore(now)
        self.addCleanup(store.close)
        return store

    def test_interfaces(self) -> Deferred[None]:
        """
        The store provides both L{ITrustStore} and L{IKnownServices}.
        """

        async def run() -> None:
            store = await self._store(FakeNow())
            self.assertTrue(verifyObject(ITrustStore, store))
            self.assertTrue(verifyObject(IKnownServices, store))

        return Deferred.fromCoroutine(run())

    def test_lookupUnknown(self) -> Deferred[None]:
        """
        C{lookup} of a key that was never recorded gives L{None}.
        """

        async def run() -> None:
            store = await self._store(FakeNow())
            self.assertIsNone(await store.lookup("SHA256:nothing"))

        return Deferred.fromCoroutine(run())

    def test_recordThenLookup(self) -> Deferred[None]:
        """
        C{record} stores every fact about the peer, the state, the source and
        who decided, at the injected time, and C{lookup} gives the same record.
        """

        async def run() -> None:
            now = FakeNow(1234.5)
            store = await self._store(now)
            peer = peerIdentity()
            recorded = await store.record(
                peer, KeyState.approved, "10.1.2.3:5000", "owner:alice"
            )
            expected = KeyRecord(
                fingerprint=peer.fingerprint,
                org="acme",
                service="billing",
                algorithm="ssh-ed25519",
                publicKey=peer.publicKey.blob,
                state=KeyState.approved,
                firstSeen=1234.5,
                lastSeen=1234.5,
                attempts=1,
                source="10.1.2.3:5000",
                decidedBy="owner:alice",
                sequence=0,
            )
            self.assertEqual(recorded, expected)
            self.assertEqual(await store.lookup(peer.fingerprint), expected)

        return Deferred.fromCoroutine(run())

    def test_recordUpsertChangesState(self) -> Deferred[None]:
        """
        Recording a key again changes its state, source, decider and last
        time, and keeps its first time: one record per key.
        """

        async def run() -> None:
            now = FakeNow(100.0)
            store = await self._store(now)
            peer = peerIdentity()
            await store.record(peer, KeyState.approved, "10.0.0.1:1", "", b"a", 1)
            now.when = 250.0
            updated = await store.record(
                peer, KeyState.revoked, "10.0.0.2:2", "owner:bob", b"r", 2, "bob"
            )
            self.assertEqual((updated.decision, updated.sequence), (b"r", 2))
            self.assertEqual(updated.sentBy, "bob")
            self.assertIs(updated.state, KeyState.revoked)
            self.assertEqual(updated.firstSeen, 100.0)
            self.assertEqual(updated.lastSeen, 250.0)
            self.assertEqual(updated.source, "10.0.0.2:2")
            self.assertEqual(updated.decidedBy, "owner:bob")
            self.assertEqual(await store.lookup(peer.fingerprint), updated)
            self.assertEqual(await store.keysFor("acme", "billing"), [updated])

        return Deferred.fromCoroutine(run())

    def test_seenAdvancesAttemptsAndLastSeen(self) -> Deferred[None]:
        """
        C{seen} adds one attempt, and moves the last time and source on; the
        state and the first time stay.
        """

        async def run() -> None:
            now = FakeNow(10.0)
            store = await self._store(now)
            peer = peerIdentity()
            await store.record(peer, KeyState.approved, "10.0.0.1:1", "auto")
            now.when = 20.0
            await store.seen(peer.fingerprint, "10.0.0.9:9")
            now.when = 30.0
            await store.seen(peer.fingerprint, "10.0.0.8:8")
            record = await store.lookup(peer.fingerprint)
            assert record is not None
            self.assertEqual(record.attempts, 3)
            self.assertEqual(record.lastSeen, 30.0)
            self.assertEqual(record.firstSeen, 10.0)
            self.assertEqual(record.source, "10.0.0.8:8")
            self.assertIs(record.state, KeyState.approved)
            self.assertEqual(record.decidedBy, "auto")

        return Deferred.fromCoroutine(run())

    def test_seenUnknownRecordsNothing(self) -> Deferred[None]:
        """
        C{seen} for a key that was never recorded creates no record.
        """

        async def run() -> None:
            store = await self._store(FakeNow())
            peer = peerIdentity()
            await store.seen(peer.fingerprint, "10.0.0.1:1")
            self.assertIsNone(await store.lookup(peer.fingerprint))
            self.assertEqual(await store.keysFor("acme", "billing"), [])

        return Deferred.fromCoroutine(run())

    def test_keysFor(self) -> Deferred[None]:
        """
        C{keysFor} gives the records of every key that claimed that
        organization and service, oldest first, and no others.
        """

        async def run() -> None:
            now = FakeNow(1.0)
            store = await self._store(now)
            first, second = peerIdentity(), peerIdentity()
            other = peerIdentity("acme", "ledger")
            elsewhere = peerIdentity("globex", "billing")
            await store.record(first, KeyState.approved, "a", "x")
            now.when = 2.0
            await store.record(other, KeyState.approved, "b", "x")
            await store.record(elsewhere, KeyState.approved, "b", "x")
            now.when = 3.0
            await store.record(second, KeyState.denied, "c", "y")
            records = await store.keysFor("acme", "billing")
            self.assertEqual(
                [(r.fingerprint, r.state) for r in records],
                [
                    (first.fingerprint, KeyState.approved),
                    (second.fingerprint, KeyState.denied),
                ],
            )
            self.assertEqual(await store.keysFor("nobody", "billing"), [])

        return Deferred.fromCoroutine(run())

    def test_pins(self) -> Deferred[None]:
        """
        C{pin} remembers a server's key for an address; C{pinned} gives it
        back, C{pinnedService} finds it by name, and C{unpin} forgets it,
        firing with L{True} and then, with nothing left, L{False}.
        """

        async def run() -> None:
            now = FakeNow(77.0)
            store = await self._store(now)
            server = peerIdentity("acme", "ledger")
            self.assertIsNone(await store.pinned("ledger.example:8443"))
            pin = await store.pin("ledger.example:8443", server)
            expected = Pin(
                address="ledger.example:8443",
                org="acme",
                service="ledger",
                algorithm="ssh-ed25519",
                publicKey=server.publicKey.blob,
                fingerprint=server.fingerprint,
                firstSeen=77.0,
            )
            self.assertEqual(pin, expected)
            self.assertEqual(await store.pinned("ledger.example:8443"), expected)
            self.assertIsNone(await store.pinned("ledger.example:9999"))
            self.assertEqual(await store.pinnedService("acme", "ledger"), [expected])
            self.assertEqual(await store.pinnedService("acme", "billing"), [])

            self.assertTrue(await store.unpin("ledger.example:8443"))
            self.assertIsNone(await store.pinned("ledger.example:8443"))
            self.assertEqual(await store.pinnedService("acme", "ledger"), [])
            self.assertFalse(await store.unpin("ledger.example:8443"))

        return Deferred.fromCoroutine(run())

    def test_pinnedServiceAtSeveralAddresses(self) -> Deferred[None]:
        """
        C{pinnedService} gives every address where that service was pinned,
        oldest first.
        """

        async def run() -> None:
            now = FakeNow(1.0)
            store = await self._store(now)
            one, two = peerIdentity("acme", "ledger"), peerIdentity("acme", "ledger")
            await store.pin("a.example:1", one)
            now.when = 2.0
            await store.pin("b.example:1", two)
            pins = await store.pinnedService("acme", "ledger")
            self.assertEqual(
                [(p.address, p.fingerprint) for p in pins],
                [("a.example:1", one.fingerprint), ("b.example:1", two.fingerprint)],
            )

        return Deferred.fromCoroutine(run())

    def test_pendingDeduplicatedPerKey(self) -> Deferred[None]:
        """
        A second request for one key counts an attempt on the request already
        pending, rather than making another.
        """

        async def run() -> None:
            store = await self._store(FakeNow(10.0))
            peer = peerIdentity()
            _first, created = await store.addPending(peer, "10.0.0.1:1", "a", 99, 5, 5)
            again, createdAgain = await store.addPending(
                peer, "10.0.0.1:2", "b", 99, 5, 5
            )
            self.assertEqual((created, createdAgain), (True, False))
            self.assertEqual(again.requestId, "a")
            self.assertEqual(again.attempts, 2)
            self.assertEqual(len(await store.pending()), 1)

        return Deferred.fromCoroutine(run())

    def test_pendingCappedPerHost(self) -> Deferred[None]:
        """
        The cap per source counts the address prefix (an IPv4 /24),
        whatever address in it and port each connection came from; another
        prefix still gets its requests in, up to the total.
        """

        async def run() -> None:
            store = await self._store(FakeNow(10.0))
            for port in range(2):
                await store.addPending(
                    peerIdentity(), f"10.0.0.1:{40000 + port}", f"r{port}", 99, 2, 3
                )
            error = await self.assertFailure(
                store.addPending(peerIdentity(), "10.0.0.1:40009", "x", 99, 2, 3),
                PendingFull,
            )
            self.assertIn("10.0.0.0/24", str(error))
            # Another address of the same /24 is the same source.
            await self.assertFailure(
                store.addPending(peerIdentity(), "10.0.0.77:1", "z", 99, 2, 3),
                PendingFull,
            )
            await store.addPending(peerIdentity(), "[::1]:40000", "v6", 99, 2, 3)
            await self.assertFailure(
                store.addPending(peerIdentity(), "10.9.0.2:1", "y", 99, 2, 3),
                PendingFull,
            )
            self.assertEqual(len(await store.pending()), 3)

        return Deferred.fromCoroutine(run())

    def test_pendingBesideUnverifiedDecision(self) -> Deferred[None]:
        """
        A request for a key whose newest decision nobody could verify (the
        policy treats the key as unknown) makes the key pending; the
        decision stays in its history, which is append-only.
        """

        async def run() -> None:
            store = await self._store(FakeNow(10.0))
            peer = peerIdentity()
            await store.record(peer, KeyState.approved, "10.0.0.1:1", "forger", b"x", 3)
            record, created = await store.addPending(
                peer, "10.0.0.1:2", "req", 99, 5, 5
            )
            self.assertTrue(created)
            self.assertIs(record.state, KeyState.pending)
            self.assertEqual((record.decision, record.sequence), (b"x", 3))
            self.assertEqual(record.requestId, "req")
            self.assertEqual(await store.lookup(peer.fingerprint), record)
            self.assertEqual(await store.pending(), [record])

        return Deferred.fromCoroutine(run())

    def test_historyIsAppendOnly(self) -> Deferred[None]:
        """
        A decision at a place in a key's history that is taken already is
        refused with L{DecisionConflict}, and changes nothing.
        """

        async def run() -> None:
            store = await self._store(FakeNow(10.0))
            peer = peerIdentity()
            await store.record(peer, KeyState.approved, "s", "alice", b"a1", 1, "a")
            revoked = await store.record(
                peer, KeyState.revoked, "s", "alice", b"r2", 2, "a"
            )
            failure = None
            try:
                await store.record(peer, KeyState.approved, "s", "bob", b"b1", 1, "b")
            except DecisionConflict as e:
                failure = e
            self.assertIsInstance(failure, DecisionConflict)
            self.assertEqual(await store.lookup(peer.fingerprint), revoked)
            self.assertEqual(await store.decided(), [revoked])

        return Deferred.fromCoroutine(run())

    def test_newestIsTheHighestPlace(self) -> Deferred[None]:
        """
        The record holds the decision with the highest place in the key's
        history, whatever the order they were stored in.
        """

        async def run() -> None:
            store = await self._store(FakeNow(10.0))
            peer = peerIdentity()
            await store.record(peer, KeyState.revoked, "s", "alice", b"r5", 5)
            await store.record(peer, KeyState.approved, "s", "alice", b"a4", 4)
            record = await store.lookup(peer.fingerprint)
            assert record is not None
            self.assertEqual((record.decision, record.sequence), (b"r5", 5))
            self.assertIs(record.state, KeyState.revoked)
            self.assertEqual(await store.keysFor("acme", "billing"), [record])

        return Deferred.fromCoroutine(run())


class MemoryTrustStoreContractTests(StoreContractMixin, TestCase):
    """
    L{MemoryTrustStore} keeps the store's contract.
    """

    async def makeStore(self, now: Callable[[], float]) -> TrustAndPins:
        return MemoryTrustStore(now)


class SQLiteStoreContractTests(StoreContractMixin, TestCase):
    """
    L{SQLiteStore}, on a real file, keeps the store's contract.
    """

    async def makeStore(self, now: Callable[[], float]) -> TrustAndPins:
        path = temporaryDirectory(self).child("trust.sqlite3")
        return await SQLiteStore.open(path, now)


class SQLiteFileTests(TestCase):
    """
    L{SQLiteStore} and its schema, on real files.
    """

    def setUp(self) -> None:
        self.directory = temporaryDirectory(self)
        self.path = self.directory.child("trust.sqlite3")

    async def _open(self, now: Callable[[], float] | None = None) -> SQLiteStore:
        store = await SQLiteStore.open(self.path, now or FakeNow())
        self.addCleanup(store.close)
        return store

    def test_openCreatesSchema(self) -> Deferred[None]:
        """
        Opening a store where there is no file creates it, with the schema at
        L{SCHEMA_VERSION} in C{PRAGMA user_version}, in WAL mode.
        """

        async def run() -> None:
            self.assertFalse(self.path.exists())
            await self._open()
            self.assertTrue(self.path.exists())
            self.assertEqual(userVersion(self.path.path), SCHEMA_VERSION)
            self.assertEqual(schemaObjects(self.path.path), EXPECTED_SCHEMA)
            connection = sqlite3.connect(self.path.path)
            try:
                (mode,) = connection.execute("PRAGMA journal_mode").fetchone()
            finally:
                connection.close()
            self.assertEqual(mode, "wal")

        return Deferred.fromCoroutine(run())

    def test_fromPathCreatesSchema(self) -> None:
        """
        L{SQLiteStore.fromPath} creates and migrates the file at once.
        """
        store = SQLiteStore.fromPath(self.path)
        self.addCleanup(store.close)
        self.assertEqual(userVersion(self.path.path), SCHEMA_VERSION)
        self.assertEqual(schemaObjects(self.path.path), EXPECTED_SCHEMA)

    def test_decisionsCannotBeChangedInPlace(self) -> Deferred[None]:
        """
        The file refuses to update or delete a stored decision, whoever asks.
        """

        async def run() -> None:
            store = await self._open()
            peer = peerIdentity()
            await store.record(peer, KeyState.revoked, "s", "alice", b"r", 2)
            connection = sqlite3.connect(self.path.path)
            try:
                for statement in (
                    "UPDATE decisions SET sequence = 9",
                    "DELETE FROM decisions",
                ):
                    with self.assertRaises(sqlite3.DatabaseError) as caught:
                        connection.execute(statement)
                    self.assertIn("append-only", str(caught.exception))
            finally:
                connection.close()
            record = await store.lookup(peer.fingerprint)
            assert record is not None
            self.assertEqual((record.decision, record.sequence), (b"r", 2))

        return Deferred.fromCoroutine(run())

    def test_decisionOutlivesItsPeerRow(self) -> Deferred[None]:
        """
        A key whose C{peers} row was removed behind the store's back is still
        found, with its newest decision: removing the row does not make a
        revoked key unknown.
        """

        async def run() -> None:
            store = await self._open(FakeNow(50.0))
            peer = peerIdentity()
            await store.record(peer, KeyState.revoked, "s", "alice", b"r", 2, "a")
            connection = sqlite3.connect(self.path.path)
            try:
                with connection:
                    connection.execute("DELETE FROM peers")
            finally:
                connection.close()
            store._cache.changed(record=peer.fingerprint)
            record = await store.lookup(peer.fingerprint)
            assert record is not None
            self.assertEqual(
                (record.state, record.decision, record.sequence, record.sentBy),
                (KeyState.revoked, b"r", 2, "a"),
            )
            self.assertEqual((record.org, record.service), ("acme", "billing"))

        return Deferred.fromCoroutine(run())

    def test_migrationKeepsOldDecisionsAtPlaceZero(self) -> Deferred[None]:
        """
        Migrating a version 2 file puts each stored decision in the new
        history at place 0 (it has none of its own), and leaves pending
        requests pending.
        """
        connection = sqlite3.connect(self.path.path, isolation_level=None)
        try:
            for step in MIGRATIONS[:2]:
                connection.executescript(step)
            connection.execute("PRAGMA user_version = 2")
            peer, waiting = peerIdentity(), peerIdentity("acme", "other")
            for who, state, decision in (
                (peer, "approved", b"d"),
                (waiting, "pending", b""),
            ):
                connection.execute(
                    "INSERT INTO peers (fingerprint, org, service, algorithm,"
                    " public_key, state, first_seen, last_seen, attempts, source,"
                    " decided_by, decision) VALUES (?, ?, ?, ?, ?, ?, 1, 2, 3,"
                    " 'src', 'alice', ?)",
                    (
                        who.fingerprint,
                        who.org,
                        who.service,
                        who.algorithm,
                        who.publicKey.blob,
                        state,
                        decision,
                    ),
                )
        finally:
            connection.close()
        self.assertEqual(migrateFile(self.path.path), 2)

        async def run() -> None:
            store = await self._open()
            old = await store.lookup(peer.fingerprint)
            assert old is not None
            self.assertEqual(
                (old.state, old.decision, old.sequence, old.decidedBy, old.attempts),
                (KeyState.approved, b"d", 0, "alice", 3),
            )
            pending = await store.pending()
            self.assertEqual([r.fingerprint for r in pending], [waiting.fingerprint])

        return Deferred.fromCoroutine(run())

    def test_reopenKeepsRecordsAndPins(self) -> Deferred[None]:
        """
        Records and pins are still there when the file is closed and opened
        again, and opening it again does not migrate it again.
        """

        async def run() -> None:
            client, server = peerIdentity(), peerIdentity("acme", "ledger")
            store = await SQLiteStore.open(self.path, FakeNow(5.0))
            try:
                record = await store.record(client, KeyState.approved, "s", "owner")
                pin = await store.pin("ledger.example:8443", server)
            finally:
                await store.close()

            self.assertEqual(migrateFile(self.path.path), SCHEMA_VERSION)
            again = await self._open(FakeNow(6.0))
            self.assertEqual(await again.lookup(client.fingerprint), record)
            self.assertEqual(await again.pinned("ledger.example:8443"), pin)
            self.assertEqual(userVersion(self.path.path), SCHEMA_VERSION)

        return Deferred.fromCoroutine(run())

    async def _refused(self, path: FilePath[str] | None = None) -> StoreError:
        """
        Open the store, expecting a L{StoreError}; return it.
        """
        try:
            store = await SQLiteStore.open(path or self.path)
        except StoreError as e:
            return e
        await store.close()
        self.fail("the store opened")

    def _newerFile(self) -> bytes:
        """
        Make a file as a newer dwtrust might leave it: a valid SQLite
        database with a higher schema version, in SQLite's default
        (rollback-journal) mode.  Return its bytes.
        """
        connection = sqlite3.connect(self.path.path)
        connection.execute("CREATE TABLE future (x TEXT)")
        connection.execute("INSERT INTO future VALUES ('keep me')")
        connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
        connection.commit()
        connection.close()
        return self.path.getContent()

    def test_newerSchemaRefused(self) -> Deferred[None]:
        """
        A file with a schema newer than this code's is refused with a
        L{StoreError} that names both versions and says to upgrade.
        """
        self._newerFile()

        async def run() -> None:
            message = str(await self._refused())
            self.assertIn(f"schema version {SCHEMA_VERSION + 1}", message)
            self.assertIn(f"this dwtrust's {SCHEMA_VERSION}", message)
            self.assertIn("upgrade dwtrust", message)
            self.assertEqual(userVersion(self.path.path), SCHEMA_VERSION + 1)

        return Deferred.fromCoroutine(run())

    def test_newerSchemaFileUntouched(self) -> Deferred[None]:
        """
        A refused newer file is left exactly as it was, byte for byte, with no
        journal files beside it.
        """
        before = self._newerFile()

        async def run() -> None:
            await self._refused()
            self.assertEqual(sorted(self.directory.listdir()), ["trust.sqlite3"])
            after = self.path.getContent()
            changed = [
                i for i, (a, b) in enumerate(zip(before, after, strict=False)) if a != b
            ]
            self.assertEqual(
                (len(after), changed[:8]),
                (len(before), []),
                "the refused file was modified (byte offsets shown)",
            )

        return Deferred.fromCoroutine(run())

    def test_notSQLite(self) -> Deferred[None]:
        """
        A file that is not an SQLite database is refused with a L{StoreError}
        that names the file, and it is left as it was.
        """
        garbage = bytes(range(256)) * 16
        self.path.setContent(garbage)

        async def run() -> None:
            error = await self._refused()
            self.assertIn(self.path.path, str(error))
            self.assertIn("not a database", str(error))
            self.assertEqual(self.path.getContent(), garbage)

        return Deferred.fromCoroutine(run())

    def test_notSQLiteFromPath(self) -> None:
        """
        L{SQLiteStore.fromPath} too raises L{StoreError} for a file that is not
        SQLite.
        """
        self.path.setContent(b"this is a text file, not a database\n" * 20)
        error = self.assertRaises(StoreError, SQLiteStore.fromPath, self.path)
        self.assertIn(self.path.path, str(error))

    def test_unopenablePath(self) -> Deferred[None]:
        """
        A path in a directory that does not exist gives a L{StoreError}.
        """
        path = self.directory.child("missing").child("trust.sqlite3")

        async def run() -> None:
            error = await self._refused(path)
            self.assertIn(path.path, str(error))

        return Deferred.fromCoroutine(run())

    def test_durableAcrossSIGKILL(self) -> Deferred[None]:
        """
        A decision whose L{Deferred} has fired survives the process being
        killed with C{SIGKILL} at once: a new store on the file has it.
        """
        script = (
            "import os, signal, sys\n"
            "from twisted.internet import reactor\n"
            "from twisted.python.filepath import FilePath\n"
            "from dwtrust import Identity, PeerIdentity\n"
            "from dwtrust.store import KeyState, SQLiteStore\n"
            "me = Identity.generate('acme', 'billing')\n"
            "peer = PeerIdentity(me.org, me.service, me.publicKey)\n"
            "def opened(store):\n"
            "    return store.record(peer, KeyState.approved, '10.9.8.7:6', 'bob')\n"
            "def recorded(record):\n"
            "    sys.stdout.write(record.fingerprint + '\\n')\n"
            "    sys.stdout.flush()\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n"
            "def failed(failure):\n"
            "    failure.printTraceback()\n"
            "    os._exit(3)\n"
            "d = SQLiteStore.open(FilePath(sys.argv[1]))\n"
            "d.addCallback(opened).addCallback(recorded).addErrback(failed)\n"
            "reactor.run()\n"
        )
        child = subprocess.run(
            [sys.executable, "-c", script, self.path.path],
            capture_output=True,
            timeout=60,
        )
        self.assertEqual(child.returncode, -signal.SIGKILL, child.stderr)
        fingerprint = child.stdout.decode("ascii").strip()
        self.assertTrue(fingerprint.startswith("SHA256:"), child.stdout)
        # The process died with its connection open: the decision is in the
        # write-ahead log, not yet checkpointed into the main file.
        wal = self.directory.child("trust.sqlite3-wal")
        self.assertTrue(wal.exists() and wal.getsize() > 0)

        async def run() -> None:
            store = await self._open()
            record = await store.lookup(fingerprint)
            assert record is not None
            self.assertIs(record.state, KeyState.approved)
            self.assertEqual(record.decidedBy, "bob")
            self.assertEqual(record.source, "10.9.8.7:6")

        return Deferred.fromCoroutine(run())


class ConcurrentMigrationTests(SynchronousTestCase):
    """
    Several processes may open one new file at the same moment.
    """

    #: Rounds of the race; each round is a fresh file and two threads
    #: released together.  A race that loses one round in twenty is caught
    #: in all but a vanishing fraction of runs.
    ROUNDS = 200

    def test_twoMigrationsOfOneFreshFile(self) -> None:
        """
        Two threads that call L{migrateFile} on one fresh file at the same
        moment both succeed, and the schema is created once, at
        L{SCHEMA_VERSION}.
        """
        base = temporaryDirectory(self)
        failures: list[tuple[int, BaseException]] = []
        for round in range(self.ROUNDS):
            path = base.child(f"trust-{round}.sqlite3").path
            start = threading.Barrier(2)
            results: list[int | BaseException] = []

            def migrateNow(
                path: str = path,
                start: threading.Barrier = start,
                results: list[int | BaseException] = results,
            ) -> None:
                start.wait()
                try:
                    results.append(migrateFile(path))
                except BaseException as e:
                    results.append(e)

            workers = [threading.Thread(target=migrateNow) for _ in range(2)]
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join(30)
            self.assertEqual(len(results), 2)
            failures.extend((round, r) for r in results if isinstance(r, BaseException))
            if not failures:
                self.assertEqual(userVersion(path), SCHEMA_VERSION)
                self.assertEqual(schemaObjects(path), EXPECTED_SCHEMA)
        self.assertEqual(
            failures,
            [],
            f"{len(failures)} of {self.ROUNDS} concurrent migrations failed",
        )


class MemoryTrustStoreInterfaceTests(SynchronousTestCase):
    """
    L{MemoryTrustStore} provides the interfaces without a reactor.
    """

    def test_verifyObject(self) -> None:
        store = MemoryTrustStore()
        self.assertTrue(verifyObject(ITrustStore, store))
        self.assertTrue(verifyObject(IKnownServices, store))


class SourceHostTests(SynchronousTestCase):
    """
    L{sourceHost}: the address prefix a source is capped under (an IPv4
    /24, an IPv6 /64).
    """

    def test_hosts(self) -> None:
        for source, host in [
            ("10.1.2.3:5678", "10.1.2.0/24"),
            ("10.1.2.250:1", "10.1.2.0/24"),
            ("10.1.3.3:5678", "10.1.3.0/24"),
            ("[::1]:5678", "::/64"),
            ("[2001:db8::7]:443", "2001:db8::/64"),
            ("[2001:db8::ffff:1:2]:443", "2001:db8::/64"),
            ("[2001:db8:0:1::7]:443", "2001:db8:0:1::/64"),
            ("[::ffff:10.1.2.3]:443", "10.1.2.0/24"),
            ("[fe80::1%eth0]:443", "fe80::/64"),
            ("unix:'/run/x.sock'", "unix:'/run/x.sock'"),
            ("::1", "::/64"),
            ("10.1.2.3", "10.1.2.0/24"),
        ]:
            self.assertEqual(sourceHost(source), host, source)
