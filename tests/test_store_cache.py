"""
Tests for the SQLite store's hot path: decided records and pins served from
memory (L{dwtrust.store._cache}), kept exact for the store's own writes and
refreshed when another process commits; and attempts counted in memory and
written in batches.

The store's own timers run on a L{Clock}; its queries run in its real
database thread, on the real reactor.
"""

from __future__ import annotations

import sqlite3

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import TestCase

from dwtrust.store import KeyState, SQLiteStore
from dwtrust.store._attempts import SEEN_INTERVAL
from dwtrust.store._cache import CHECK_INTERVAL

from .test_store import peerIdentity, temporaryDirectory


class CacheTests(TestCase):
    """
    What a lookup returns, and when it goes to the file.
    """

    def setUp(self) -> Deferred[None]:
        self.clock = Clock()
        self.path = temporaryDirectory(self).child("trust.sqlite3")
        self.peer = peerIdentity()

        def opened(store: SQLiteStore) -> None:
            self.store = store
            self.addCleanup(store.close)

        return SQLiteStore.open(self.path, clock=self.clock).addCallback(opened)

    def writeBehindItsBack(self, state: str) -> None:
        """
        Change the peer's state as another process would: one more decision
        in its history.
        """
        connection = sqlite3.connect(self.path.path)
        try:
            with connection:
                connection.execute(
                    "UPDATE peers SET state = ? WHERE fingerprint = ?",
                    (state, self.peer.fingerprint),
                )
                connection.execute(
                    "INSERT INTO decisions SELECT fingerprint,"
                    " (SELECT COALESCE(MAX(sequence), 0) + 1 FROM decisions"
                    "  WHERE fingerprint = ?), org, service, algorithm,"
                    " public_key, ?, 'other', 'other', 0, x'' FROM peers"
                    " WHERE fingerprint = ?",
                    (self.peer.fingerprint, state, self.peer.fingerprint),
                )
        finally:
            connection.close()

    async def settle(self) -> None:
        """
        Let the store's database thread finish what it was given.
        """
        from twisted.internet import reactor

        for _ in range(5):
            await deferLater(reactor, 0.01, lambda: None)  # type: ignore[arg-type]

    async def cached(self) -> None:
        """
        Record the peer as approved and read it until it is kept in memory.
        """
        await self.store.record(self.peer, KeyState.approved, "10.0.0.1:1", "t")
        await self.store.lookup(self.peer.fingerprint)
        await self.settle()
        await self.store.lookup(self.peer.fingerprint)

    async def test_decidedRecordServedFromMemory(self) -> None:
        """
        A decided record read once is served from memory: a change written
        behind the store's back is not seen until the next check.
        """
        await self.cached()
        self.writeBehindItsBack("revoked")
        record = await self.store.lookup(self.peer.fingerprint)
        assert record is not None
        self.assertEqual(record.state, KeyState.approved)

    async def test_otherWriterSeenAfterCheck(self) -> None:
        """
        Once the store checks (every L{CHECK_INTERVAL} seconds), a commit by
        another connection drops what it kept, and the next lookup reads the
        file.
        """
        await self.cached()
        self.writeBehindItsBack("revoked")
        self.clock.advance(CHECK_INTERVAL)
        await self.settle()
        record = await self.store.lookup(self.peer.fingerprint)
        assert record is not None
        self.assertEqual(record.state, KeyState.revoked)

    async def test_ownWriteSeenAtOnce(self) -> None:
        """
        The store's own write is seen by the very next lookup, with no check.
        """
        await self.cached()
        await self.store.record(self.peer, KeyState.revoked, "10.0.0.1:1", "t", b"", 2)
        record = await self.store.lookup(self.peer.fingerprint)
        assert record is not None
        self.assertEqual(record.state, KeyState.revoked)

    async def test_writeDuringReadNotKept(self) -> None:
        """
        A read under way while the store writes is answered, but not kept:
        the lookup after the write reads the file.
        """
        await self.store.record(self.peer, KeyState.approved, "10.0.0.1:1", "t")
        await self.store.lookup(self.peer.fingerprint)
        await self.settle()
        reading = self.store.lookup(self.peer.fingerprint)
        writing = self.store.record(
            self.peer, KeyState.denied, "10.0.0.1:1", "t", b"", 2
        )
        await reading
        await writing
        record = await self.store.lookup(self.peer.fingerprint)
        assert record is not None
        self.assertEqual(record.state, KeyState.denied)

    async def test_pendingNotKept(self) -> None:
        """
        A pending request is read from the file every time: it changes with
        every attempt.
        """
        await self.store.addPending(self.peer, "10.0.0.1:1", "r1", 1e12, 10, 10)
        await self.store.lookup(self.peer.fingerprint)
        await self.settle()
        self.writeBehindItsBack("denied")
        record = await self.store.lookup(self.peer.fingerprint)
        assert record is not None
        self.assertEqual(record.state, KeyState.denied)

    async def test_pinServedFromMemoryAndForgotten(self) -> None:
        """
        A pin read once is served from memory; unpinning forgets it at once.
        """
        await self.store.pin("ledger:7443", self.peer)
        await self.store.pinned("ledger:7443")
        await self.settle()
        await self.store.pinned("ledger:7443")
        connection = sqlite3.connect(self.path.path)
        try:
            with connection:
                connection.execute("DELETE FROM known_services")
        finally:
            connection.close()
        self.assertIsNotNone(await self.store.pinned("ledger:7443"))
        await self.store.unpin("ledger:7443")
        self.assertIsNone(await self.store.pinned("ledger:7443"))


class SeenTests(TestCase):
    """
    Attempts are counted in memory and written together.
    """

    def setUp(self) -> Deferred[None]:
        self.clock = Clock()
        self.path = temporaryDirectory(self).child("trust.sqlite3")
        self.peer = peerIdentity()

        def opened(store: SQLiteStore) -> None:
            self.store = store

        return SQLiteStore.open(self.path, clock=self.clock).addCallback(opened)

    def attempts(self) -> tuple[int, str]:
        connection = sqlite3.connect(self.path.path)
        try:
            [(attempts, source)] = connection.execute(
                "SELECT attempts, source FROM peers WHERE fingerprint = ?",
                (self.peer.fingerprint,),
            ).fetchall()
        finally:
            connection.close()
        return attempts, source

    async def test_writtenTogether(self) -> None:
        """
        Attempts are written L{SEEN_INTERVAL} seconds after the first one,
        all at once, with the latest source; each caller's L{Deferred} fires
        then.
        """
        await self.store.record(self.peer, KeyState.approved, "10.0.0.1:1", "t")
        first = self.store.seen(self.peer.fingerprint, "10.0.0.2:2")
        second = self.store.seen(self.peer.fingerprint, "10.0.0.3:3")
        self.assertEqual(self.attempts(), (1, "10.0.0.1:1"))
        self.assertNoResult(first)
        self.clock.advance(SEEN_INTERVAL)
        await first
        await second
        self.assertEqual(self.attempts(), (3, "10.0.0.3:3"))
        await self.store.close()

    async def test_closeWritesThem(self) -> None:
        """
        Closing the store writes the attempts not written yet: none is lost.
        """
        await self.store.record(self.peer, KeyState.approved, "10.0.0.1:1", "t")
        counted = self.store.seen(self.peer.fingerprint, "10.0.0.2:2")
        await self.store.close()
        await counted
        self.assertEqual(self.attempts(), (2, "10.0.0.2:2"))
        self.assertEqual(self.clock.getDelayedCalls(), [])
