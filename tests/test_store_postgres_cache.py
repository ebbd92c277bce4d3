"""
The PostgreSQL store answers a known key's lookup from memory, kept current
by its notifications, against a real, throwaway PostgreSQL server (see
L{tests.postgres}).  Memory is trusted only while the store's own
heartbeats, sent through the server, come back through its listener: when
the listener's connection is ended, or silently stops delivering (its
server process stopped with C{SIGSTOP}, which the store cannot see), lookups
read the table again within L{FRESHNESS} seconds, so that a revocation made
elsewhere is never answered stale for longer; and memory is trusted again
once the listener is back.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase

from dwtrust import PeerIdentity
from dwtrust.store import (
    KeyRecord,
    KeyState,
    PostgreSQLStore,
    StoreUnavailable,
    _postgres,
)
from dwtrust.store._postgres import FRESHNESS, LISTENER_NAME

from .test_postgres_store import cutListeners
from .test_store import peerIdentity

if TYPE_CHECKING:
    from .postgres import PostgreSQLServer

pytest_plugins = ["tests.postgres"]

#: Seconds a test waits for what should happen soon.
DEADLINE = 30.0


def fromMemory(store: PostgreSQLStore, fingerprint: str) -> KeyRecord | None:
    """
    The record C{store}'s lookup answers at once, from memory; fails the
    test if the lookup reads the server (which takes a trip to a thread).
    """
    looking = store.lookup(fingerprint)
    results: list[Any] = []
    looking.addBoth(results.append)
    assert results, "the lookup read the server"
    result = results[0]
    assert isinstance(result, KeyRecord), result
    return result


def answeredAtOnce(store: PostgreSQLStore, fingerprint: str) -> bool:
    looking = store.lookup(fingerprint)
    results: list[Any] = []
    looking.addBoth(results.append)
    return bool(results)


class CacheTests(TestCase):
    url: str
    server: PostgreSQLServer
    timeout = 120

    @pytest.fixture(autouse=True)
    def _database(self, postgres: PostgreSQLServer, database: str) -> None:
        self.server = postgres
        self.url = database

    async def instance(self) -> PostgreSQLStore:
        opened = await PostgreSQLStore.open(self.url, 2)
        self.addCleanup(opened.close)
        await opened.whenListening()
        return opened

    async def until(self, condition: Callable[[], object], what: str) -> None:
        for _ in range(int(DEADLINE / 0.05)):
            if condition():
                return
            await deferLater(reactor, 0.05, lambda: None)
        raise AssertionError(f"waited {DEADLINE} s for {what}")

    async def known(
        self, store: PostgreSQLStore, writer: PostgreSQLStore
    ) -> PeerIdentity:
        """
        A key C{writer} approved, which C{store} has read and answers from
        memory.
        """
        peer = peerIdentity()
        await writer.record(peer, KeyState.approved, "s", "alice", b"a", 1, "a")
        await store.lookup(peer.fingerprint)
        await self.until(
            lambda: answeredAtOnce(store, peer.fingerprint),
            "the lookups to be answered from memory",
        )
        return peer

    async def neverStale(
        self, store: PostgreSQLStore, peer: PeerIdentity, committed: float
    ) -> list[tuple[float, KeyState, bool]]:
        """
        Look C{peer} up, again and again, until its revocation is answered
        from memory; fail if an approval is answered later than
        L{FRESHNESS} seconds after C{committed} (the revocation committed
        before then).  Return what each lookup answered, when, and whether
        at once.
        """
        answers = []
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline:
            before = time.monotonic()
            looking = store.lookup(peer.fingerprint)
            atOnce = looking.called
            record = await looking
            assert record is not None
            answers.append((before - committed, record.state, atOnce))
            if record.state is not KeyState.revoked:
                self.assertLess(
                    before - committed,
                    FRESHNESS,
                    f"an approval answered {before - committed:.2f} s after its"
                    " revocation committed",
                )
            elif atOnce:
                return answers
            await deferLater(reactor, 0.05, lambda: None)
        raise AssertionError(f"the revocation was never answered at once: {answers}")

    def test_knownKeyFromMemory(self) -> Deferred[None]:
        """
        Once read, a decided key's lookups are answered at once, with the
        record the table holds, without a query.
        """

        async def run() -> None:
            store = await self.instance()
            peer = await self.known(store, store)
            record = fromMemory(store, peer.fingerprint)
            assert record is not None
            self.assertEqual((record.state, record.decision), (KeyState.approved, b"a"))
            self.assertEqual(record, (await store.keysFor(peer.org, peer.service))[0])

        return Deferred.fromCoroutine(run())

    def test_changeElsewhereReachesMemory(self) -> Deferred[None]:
        """
        A revocation another instance stores (another connection) reaches
        this instance's memory through the notification: its lookups answer
        it, at once, within moments, and never the approval past the bound.
        """

        async def run() -> None:
            store, other = await self.instance(), await self.instance()
            peer = await self.known(store, other)
            await other.record(peer, KeyState.revoked, "s", "alice", b"r", 2, "a")
            answers = await self.neverStale(store, peer, time.monotonic())
            self.assertLess(answers[-1][0], FRESHNESS, answers)

        return Deferred.fromCoroutine(run())

    def test_listenerEnded(self) -> Deferred[None]:
        """
        When the listener's connection is ended (C{pg_terminate_backend}),
        memory is not trusted from that moment: a revocation stored
        elsewhere while the listener cannot reconnect is answered at the
        next lookup, from the table.  Once the listener is back, lookups
        are answered from memory again, with the revocation.
        """

        async def run() -> None:
            events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
            store, other = await self.instance(), await self.instance()
            peer = await self.known(store, other)
            real = _postgres.connect
            blocked = [True]

            def refusing(url: str, name: str = _postgres.APPLICATION_NAME) -> Any:
                if name == LISTENER_NAME and blocked[0]:
                    raise StoreUnavailable("the listener is kept out by the test")
                return real(url, name)

            self.patch(_postgres, "connect", refusing)
            cutListeners(self.server, self.url)
            await self.until(
                lambda: any(
                    e.get("event") == "dwtrust.store.unavailable" for e in events
                ),
                "the store to notice",
            )
            await other.record(peer, KeyState.revoked, "s", "alice", b"r", 2, "a")
            looking = store.lookup(peer.fingerprint)
            self.assertFalse(looking.called, "answered from memory")
            record = await looking
            assert record is not None
            self.assertEqual(record.state, KeyState.revoked)
            blocked[0] = False
            await self.until(
                lambda: answeredAtOnce(store, peer.fingerprint),
                "the lookups to be answered from memory again",
            )
            again = fromMemory(store, peer.fingerprint)
            assert again is not None
            self.assertEqual(again.state, KeyState.revoked)

        return Deferred.fromCoroutine(run())

    def test_listenerStalled(self) -> Deferred[None]:
        """
        When the listener's server process stops delivering anything (it is
        stopped with C{SIGSTOP}: its connection stays open and quiet, which
        the store cannot tell from a quiet fleet), lookups read the table
        within L{FRESHNESS} seconds of a revocation stored elsewhere, before
        the listener reconnects; the listener then reconnects by itself
        (its heartbeats are overdue), and lookups are answered from memory
        again.
        """

        async def run() -> None:
            events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
            store, other = await self.instance(), await self.instance()
            peer = await self.known(store, other)
            listeners = self.server.sql(
                self.url,
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                " AND application_name = %s",
                LISTENER_NAME,
            )
            pids = [int(str(pid)) for (pid,) in listeners]
            # Both instances' (and any a reconnection left behind).
            self.assertGreaterEqual(len(pids), 2)
            for pid in pids:
                os.kill(pid, signal.SIGSTOP)
                self.addCleanup(os.kill, pid, signal.SIGCONT)
            connections = store._connections
            await other.record(peer, KeyState.revoked, "s", "alice", b"r", 2, "a")
            committed = time.monotonic()
            answers = await self.neverStale(store, peer, committed)
            # The table answered the revocation while the listener was still
            # stalled (before it reconnected)...
            fromTable = [a for a in answers if a[1] is KeyState.revoked and not a[2]]
            self.assertTrue(fromTable, answers)
            self.assertTrue(
                any(e.get("event") == "dwtrust.store.listener_stalled" for e in events),
            )
            # ...and memory answers it once the listener is back.
            self.assertGreater(store._connections, connections)

        return Deferred.fromCoroutine(run())

    def test_attemptsCountedInMemoryToo(self) -> Deferred[None]:
        """
        Attempts are written together, and the record in memory counts them
        as the table does.
        """

        async def run() -> None:
            store = await self.instance()
            peer = await self.known(store, store)
            before = fromMemory(store, peer.fingerprint)
            assert before is not None
            await store.seen(peer.fingerprint, "10.0.0.1:1")
            await store.seen(peer.fingerprint, "10.0.0.1:2")
            after = fromMemory(store, peer.fingerprint)
            assert after is not None
            self.assertEqual(after.attempts, before.attempts + 2)
            self.assertEqual(after, (await store.keysFor(peer.org, peer.service))[0])

        return Deferred.fromCoroutine(run())
