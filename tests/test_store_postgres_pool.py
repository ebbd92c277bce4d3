"""
Tests for the connections of L{dwtrust.store.PostgreSQLStore}, which
psycopg's own pool (C{psycopg_pool}) manages, against a real, throwaway
PostgreSQL server (see L{tests.postgres}): a connection the server cut is
replaced before it is used, the pool never opens more connections than its
size, connections are replaced when they get old or when the listener
reconnects, they name themselves in C{pg_stat_activity}, and closing the
store closes them.  In an outage, cached keys are answered without waiting
for the pool, while notifications are still read from the server.
"""

from __future__ import annotations

import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any

import pytest
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import deferLater
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase

from dwtrust.store import (
    KeyState,
    PostgreSQLStore,
    StoreError,
    StoreUnavailable,
    _postgres,
)
from dwtrust.store._postgres import (
    APPLICATION_NAME,
    CHANNEL,
    LISTENER_NAME,
    PROBE_INTERVAL,
)

from .test_postgres_store import Changes, about, cutListeners, reconnected
from .test_store import peerIdentity

if TYPE_CHECKING:
    from .postgres import PostgreSQLServer

pytest_plugins = ["tests.postgres"]

#: Seconds a test waits for the server to show a change in its sessions.
DEADLINE = 20.0


def backend(store: PostgreSQLStore) -> Deferred[int]:
    """
    The server process id of the pooled connection a query of C{store}
    runs on.
    """

    def query(cursor: Any) -> int:
        cursor.execute("SELECT pg_backend_pid()")
        (pid,) = cursor.fetchone()
        return int(pid)

    return store._run(query)


class PoolTests(TestCase):
    """
    The store's queries run on psycopg_pool's connections.
    """

    url: str
    server: PostgreSQLServer

    @pytest.fixture(autouse=True)
    def _database(self, postgres: PostgreSQLServer, database: str) -> None:
        self.server = postgres
        self.url = database

    async def store(self, size: int, url: str | None = None) -> PostgreSQLStore:
        opened = await PostgreSQLStore.open(url or self.url, size)
        self.addCleanup(opened.close)
        await opened.whenListening()
        return opened

    def sessions(self, name: str) -> list[tuple[object, ...]]:
        """
        The server's sessions on this test's database called C{name}: each
        one's process id and its latest query.
        """
        return self.server.sql(
            self.url,
            "SELECT pid, query FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name = %s"
            " AND pid <> pg_backend_pid() ORDER BY pid",
            name,
        )

    async def until(self, condition: Any, what: str) -> None:
        for _ in range(int(DEADLINE / 0.05)):
            if condition():
                return
            await deferLater(reactor, 0.05)
        raise AssertionError(f"waited {DEADLINE} s for {what}")

    def test_brokenConnectionReplaced(self) -> Deferred[None]:
        """
        A pooled connection whose backend the server ended (as an
        administrator's C{pg_terminate_backend} or a restart does) is
        checked as the next query takes it, and replaced: the query runs on
        a new connection, as if nothing happened, and the store does not
        report itself unavailable.
        """

        async def run() -> None:
            events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
            store = await self.store(1)
            # A pin, which no notification follows: nothing else queries
            # behind the test's back.
            pin = await store.pin("ledger.internal:443", peerIdentity())
            before = await backend(store)
            [(ended,)] = self.server.sql(
                self.url,
                "SELECT pg_terminate_backend(%s)",
                before,
            )
            self.assertTrue(ended)
            await self.until(
                lambda: (
                    before not in [pid for pid, _ in self.sessions(APPLICATION_NAME)]
                ),
                "the backend to end",
            )
            self.assertEqual(await store.pinned("ledger.internal:443"), pin)
            after = await backend(store)
            self.assertNotEqual(after, before)
            self.assertFalse(
                [e for e in events if e.get("event") == "dwtrust.store.unavailable"]
            )
            self.assertFalse([e for e in events if "log_failure" in e])

        return Deferred.fromCoroutine(run())

    def test_sizeLimitHolds(self) -> Deferred[None]:
        """
        Twenty queries at once on a store whose pool holds three connections
        never have more than three connections to the server open (as
        C{pg_stat_activity} counts them by their C{application_name}), and
        do use three.  The listener's connection is apart from the pool,
        under a name of its own.
        """

        async def run() -> None:
            size = 3
            store = await self.store(size)

            def count(cursor: Any) -> int:
                cursor.execute(
                    "SELECT COUNT(*) FROM pg_stat_activity"
                    " WHERE datname = current_database()"
                    " AND application_name = %s",
                    (APPLICATION_NAME,),
                )
                (open_,) = cursor.fetchone()
                # Held a while, so that the queries overlap.
                cursor.execute("SELECT pg_sleep(0.1)")
                return int(open_)

            counts = await gatherResults([store._run(count) for _ in range(20)])
            self.assertLessEqual(max(counts), size, counts)
            self.assertEqual(max(counts), size, counts)
            self.assertLessEqual(len(self.sessions(APPLICATION_NAME)), size)
            [(_, query)] = self.sessions(LISTENER_NAME)
            self.assertEqual(query, f"LISTEN {CHANNEL}")

        return Deferred.fromCoroutine(run())

    def test_oldConnectionsReplaced(self) -> Deferred[None]:
        """
        A connection older than the pool's longest lifetime is closed when
        it comes back to the pool, and the next query runs on a new one.
        """

        async def run() -> None:
            self.patch(_postgres, "MAX_LIFETIME", 0.5)
            store = await self.store(1)
            first = await backend(store)
            self.assertEqual(await backend(store), first)
            await deferLater(reactor, 1.0)
            await backend(store)  # It comes back old: the pool replaces it.
            await self.until(
                lambda: (
                    first not in [pid for pid, _ in self.sessions(APPLICATION_NAME)]
                ),
                "the old connection to close",
            )
            self.assertNotEqual(await backend(store), first)

        return Deferred.fromCoroutine(run())

    def test_reconnectedListenerDrainsThePool(self) -> Deferred[None]:
        """
        When the listener connects again after it lost its connection, the
        pool replaces the connections it opened before (the cause may have
        cut them too), even those that still work.
        """

        async def run() -> None:
            store = await self.store(1)
            before = await backend(store)
            connections = store._connections
            cutListeners(self.server, self.url)
            await reconnected(store, connections)
            self.assertNotEqual(await backend(store), before)

        return Deferred.fromCoroutine(run())

    def test_notificationReadAfresh(self) -> Deferred[None]:
        """
        A change announced while the store answers cached keys from its
        cache (a query failed a moment ago) is read from the server, not
        from the cache: a revocation through another instance reaches the
        watchers, and the cache, as a revocation.
        """

        async def run() -> None:
            first, second = await self.store(1), await self.store(1)
            heard = Changes(first)
            peer = peerIdentity()
            await second.record(peer, KeyState.approved, "", "alice", b"a")
            await heard.next(about("decided", peer.fingerprint))
            self.assertIsNotNone(first.cached(peer.fingerprint))
            first._poolFailedAt = time.monotonic() + DEADLINE
            await second.record(peer, KeyState.revoked, "", "bob", b"r", 1)
            change = await heard.next(
                lambda c: c.record is not None and c.record.sequence == 1
            )
            assert change.record is not None
            self.assertEqual(change.record.state, KeyState.revoked)
            record = await first.lookup(peer.fingerprint)
            assert record is not None
            self.assertEqual(record.state, KeyState.revoked)

        return Deferred.fromCoroutine(run())

    def test_applicationNameFromURL(self) -> Deferred[None]:
        """
        A URL that sets C{application_name} names the store's connections
        itself, the pool's and the listener's alike.
        """

        async def run() -> None:
            store = await self.store(1, f"{self.url}?application_name=ledger-7")
            await backend(store)
            names = [
                name
                for (name,) in self.server.sql(
                    self.url,
                    "SELECT application_name FROM pg_stat_activity"
                    " WHERE datname = current_database()"
                    " AND pid <> pg_backend_pid()",
                )
            ]
            self.assertEqual(sorted(names), ["ledger-7", "ledger-7"])

        return Deferred.fromCoroutine(run())

    def test_closeClosesThePool(self) -> Deferred[None]:
        """
        Closing the store closes its pool: every connection it had open is
        closed (the listener's too), and a query after that fails with
        L{StoreError}, at once.
        """

        async def run() -> None:
            store = await PostgreSQLStore.open(self.url, 3)
            await store.whenListening()
            await gatherResults([backend(store) for _ in range(6)])
            self.assertTrue(self.sessions(APPLICATION_NAME))
            await store.close()
            await self.until(
                lambda: (
                    not (
                        self.sessions(APPLICATION_NAME) or self.sessions(LISTENER_NAME)
                    )
                ),
                "the store's connections to close",
            )
            with self.assertRaises(StoreError) as caught:
                await store.lookup(peerIdentity().fingerprint)
            self.assertIn("is closed", str(caught.exception))

        return Deferred.fromCoroutine(run())


class OutagePoolTests(TestCase):
    """
    The pool in an outage.
    """

    server: PostgreSQLServer

    @pytest.fixture(autouse=True)
    def _server(self, ownServer: PostgreSQLServer) -> None:
        self.server = ownServer

    def test_closeInAnOutage(self) -> Deferred[None]:
        """
        A store whose server is down closes (its pool included) while a
        query waits for a connection: the query fails, and the close
        finishes.
        """

        async def run() -> None:
            url = self.server.newDatabase()
            store = await PostgreSQLStore.open(url, 2)
            await store.whenListening()
            await backend(store)
            self.server.stop()
            waiting = store.lookup(peerIdentity().fingerprint)
            await store.close()
            with self.assertRaises(StoreError):
                await waiting

        return Deferred.fromCoroutine(run())

    def test_outageServesTheCacheAtOnce(self) -> Deferred[None]:
        """
        Once a query failed for want of the server, a key in the cache is
        answered from it, and an attempt on a known key is dropped, without
        asking the pool for a connection (and so without waiting for one);
        an unknown key still asks it, and fails with L{StoreUnavailable}.
        Every L{PROBE_INTERVAL}, one lookup of a cached key asks the pool
        again (and still gets the cached record), while the others at the
        same time do not.
        """

        async def run() -> None:
            url = self.server.newDatabase()
            store = await PostgreSQLStore.open(url, 2)
            self.addCleanup(store.close)
            await store.whenListening()
            peer = peerIdentity()
            await store.record(peer, KeyState.approved, "", "alice", b"ok")
            self.assertIsNotNone(await store.lookup(peer.fingerprint))
            # The heartbeat (a NOTIFY every HEARTBEAT_INTERVAL) asks the pool
            # too: stopped, so that the requests counted are the lookups'.
            store._stopBeating()
            self.server.stop()

            def requests() -> int:
                return int(store._pool.get_stats().get("requests_num", 0))

            asked = requests()
            with self.assertRaises(StoreUnavailable):
                await store.lookup(peerIdentity().fingerprint)
            self.assertEqual(requests(), asked + 1)
            # As if the failure were just now, however long the steps above
            # took on a busy machine (PROBE_INTERVAL is wall-clock time).
            store._poolFailedAt = time.monotonic()
            record = await store.lookup(peer.fingerprint)
            assert record is not None
            self.assertEqual(record.state, KeyState.approved)
            store._poolFailedAt = time.monotonic()
            await store.seen(peer.fingerprint, "10.0.0.1:1")
            self.assertEqual(requests(), asked + 1)

            assert store._poolFailedAt is not None
            store._poolFailedAt -= PROBE_INTERVAL
            records = await gatherResults(
                [store.lookup(peer.fingerprint) for _ in range(3)]
            )
            self.assertEqual([r.state for r in records], [KeyState.approved] * 3)
            self.assertEqual(requests(), asked + 2)

        return Deferred.fromCoroutine(run())


def test_withoutPsycopgPool(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    Without psycopg_pool, a PostgreSQL store is a one-line L{StoreError}
    that says what to install.
    """
    monkeypatch.setitem(sys.modules, "psycopg_pool", None)
    with pytest.raises(
        StoreError, match=r"needs psycopg-pool: pip install dwtrust\[postgresql\]$"
    ):
        PostgreSQLStore("postgresql://nobody@127.0.0.1:1/unused")


def test_poolWarningsNotPrinted() -> None:
    """
    psycopg_pool's warnings (one for each failed attempt to connect, in an
    outage) do not reach stderr, which C{twistd} logs line by line, in a
    process that did not configure Python's logging: the store logs an
    outage once, itself.
    """
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import logging\n"
            "from dwtrust.store._postgres import poolDriver\n"
            "poolDriver()\n"
            "logging.getLogger('psycopg.pool').warning('error connecting')\n"
            "logging.getLogger('other').warning('shown')\n",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stderr == "shown\n"
