"""
The C{dwtrust:} client endpoint strings share one authenticator (and so one
store) per identity, store and options on a reactor: connections do not
open the store each, pins one connection writes are seen by the next, the
store is closed a little after the last connection ended, and a program that
stops its reactor with connections open exits cleanly.  Real loopback TCP
and TLS, real SQLite stores.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import textwrap
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, gatherResults
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory
from twisted.internet.task import deferLater
from twisted.python.filepath import FilePath
from twisted.trial.unittest import TestCase

from dwtrust import (
    ErrorCode,
    HandshakeFailed,
    Identity,
    PeerIdentity,
    _endpoints,
    closeEndpointStores,
)
from dwtrust._endpoints import IDLE_CLOSE

from .processes import LOOPBACK
from .test_e2e import ClientApp, ServerApp, openPools, portNumber

#: Seconds a test waits for something that should happen soon.
DEADLINE = 20.0


class SharedClientTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        base = FilePath(tempfile.mkdtemp(prefix="dwtrust-strings-"))
        self.addCleanup(shutil.rmtree, base.path, ignore_errors=True)
        self.base = base
        self.serverDir = base.child("server")
        Identity.generate("acme", "ledger").save(self.serverDir)
        self.clientDir = base.child("client")
        Identity.generate("acme", "billing", "ecdsa-p256").save(self.clientDir)
        self.opens = 0
        real = _endpoints.openAuthenticator

        def counting(*args: Any, **kwargs: Any) -> Any:
            if "strict" in kwargs:
                self.opens += 1  # a client's (the server's are not counted)
            return real(*args, **kwargs)

        self.patch(_endpoints, "openAuthenticator", counting)
        # Whatever this test leaves open is closed before the next one.
        self.addCleanup(closeEndpointStores, reactor)

    async def listen(self, serverDir: FilePath[str]) -> tuple[int, list[Deferred[Any]]]:
        description = (
            f"dwtrust:tcp:0:interface={LOOPBACK}:identity={serverDir.path}"
            ":approver=auto"
        )
        events: list[Deferred[Any]] = []

        def build() -> ServerApp:
            connected: Deferred[PeerIdentity] = Deferred()
            lost: Deferred[None] = Deferred()
            events.extend([connected, lost])
            return ServerApp(connected, lost)

        port: IListeningPort = await serverFromString(reactor, description).listen(
            Factory.forProtocol(build)
        )
        self.addCleanup(port.stopListening)
        return portNumber(port), events

    def client(self, port: int, extra: str = "") -> Any:
        return clientFromString(
            reactor,
            f"dwtrust:tcp:host={LOOPBACK}:port={port}"
            f":identity={self.clientDir.path}{extra}",
        )

    async def exchange(self, endpoint: Any) -> ClientApp:
        app = ClientApp()
        await endpoint.connect(Factory.forProtocol(lambda: app))
        await app.answered
        return app

    async def close(self, *apps: ClientApp) -> None:
        for app in apps:
            app.transport.loseConnection()  # type: ignore[union-attr]
        await DeferredList([app.lost for app in apps])

    async def until(self, condition: Any, what: str) -> None:
        for _ in range(int(DEADLINE / 0.05)):
            if condition():
                return
            await deferLater(reactor, 0.05, lambda: None)
        raise AssertionError(f"waited {DEADLINE} s for {what}")

    def test_storeOpenedOnce(self) -> Deferred[None]:
        """
        Eight connections through one endpoint string, and through another
        string parsed alike, one after another and four at once, open the
        store once between them.
        """

        async def run() -> None:
            port, _ = await self.listen(self.serverDir)
            endpoint = self.client(port)
            for _ in range(3):
                await self.close(await self.exchange(endpoint))
            again = self.client(port)
            together = await gatherResults(
                [Deferred.fromCoroutine(self.exchange(e)) for e in (endpoint, again)]
                + [Deferred.fromCoroutine(self.exchange(again)) for _ in range(2)]
            )
            await self.close(*together)
            await self.close(await self.exchange(again))
            self.assertEqual(self.opens, 1)

        return Deferred.fromCoroutine(run())

    def test_concurrentFirstConnections(self) -> Deferred[None]:
        """
        Connections started together, before any store is open, share the
        one the first of them opens.
        """

        async def run() -> None:
            port, _ = await self.listen(self.serverDir)
            # The server approves the client first (with a string of other
            # options, so another authenticator), so that the four below
            # are not four first approvals at once.
            await self.close(
                await self.exchange(self.client(port, ":expect=acme/ledger"))
            )
            endpoint = self.client(port)
            apps = await gatherResults(
                [Deferred.fromCoroutine(self.exchange(endpoint)) for _ in range(4)]
            )
            await self.close(*apps)
            self.assertEqual(self.opens, 2)

        return Deferred.fromCoroutine(run())

    def test_otherOptionsOtherStore(self) -> Deferred[None]:
        """
        Strings with other options (here C{expect}) get an authenticator of
        their own: each string's options hold for its connections.
        """

        async def run() -> None:
            port, _ = await self.listen(self.serverDir)
            await self.close(await self.exchange(self.client(port)))
            await self.close(
                await self.exchange(self.client(port, ":expect=acme/ledger"))
            )
            with self.assertRaises(HandshakeFailed) as refused:
                await self.exchange(self.client(port, ":expect=acme/other"))
            self.assertEqual(refused.exception.code, ErrorCode.denied)
            self.assertEqual(self.opens, 3)

        return Deferred.fromCoroutine(run())

    def test_pinsSeenByTheNext(self) -> Deferred[None]:
        """
        A pin the first connection wrote holds for the next one through the
        shared store: another server presenting another key under the same
        pin name is refused with C{identity_changed}.
        """

        async def run() -> None:
            port, _ = await self.listen(self.serverDir)
            impostorDir = self.base.child("impostor")
            Identity.generate("acme", "ledger").save(impostorDir)
            impostor, events = await self.listen(impostorDir)
            await self.close(await self.exchange(self.client(port, ":pin=ledger")))
            with self.assertRaises(HandshakeFailed) as refused:
                await self.exchange(self.client(impostor, ":pin=ledger"))
            self.assertEqual(refused.exception.code, ErrorCode.identity_changed)
            self.assertEqual(self.opens, 1)
            self.assertEqual([e.called for e in events[:1]], [False])

        return Deferred.fromCoroutine(run())

    def test_closedWhenIdle(self) -> Deferred[None]:
        """
        The shared store is closed (no store thread left) about
        L{IDLE_CLOSE} seconds after the last connection ended, not while a
        connection still uses it; the next connection opens it again.
        """

        def clientPools() -> set[Any]:
            return {
                pool
                for pool in openPools()
                if str(pool.connargs[0]).startswith(self.clientDir.path)
            }

        async def run() -> None:
            port, _ = await self.listen(self.serverDir)
            endpoint = self.client(port)
            first = await self.exchange(endpoint)
            second = await self.exchange(endpoint)
            await self.close(first)
            await deferLater(reactor, IDLE_CLOSE * 1.5, lambda: None)
            # The second connection still uses it.
            self.assertEqual(len(clientPools()), 2)
            await self.close(second)
            await self.until(lambda: not clientPools(), "the store closed")
            await self.close(await self.exchange(endpoint))
            self.assertEqual(self.opens, 2)

        return Deferred.fromCoroutine(run())

    def test_failedOpenTriedAgain(self) -> Deferred[None]:
        """
        A store that cannot be opened fails the connection with the store's
        error, and the next connection tries again.
        """

        async def run() -> None:
            port, _ = await self.listen(self.serverDir)
            missing = self.base.child("missing").child("trust.sqlite3")
            endpoint = self.client(port, f":store={missing.path}")
            for _ in range(2):
                with self.assertRaises(Exception) as failed:
                    await self.exchange(endpoint)
                self.assertNotIsInstance(failed.exception, AssertionError)
            self.assertEqual(self.opens, 2)
            missing.parent().makedirs()
            await self.close(await self.exchange(endpoint))
            self.assertEqual(self.opens, 3)

        return Deferred.fromCoroutine(run())


PROGRAM = """
import sys
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import clientFromString
from twisted.internet.protocol import Factory, Protocol
from dwtrust._endpoints import sharedAuthenticators


class Ping(Protocol):
    def connectionMade(self):
        self.answered = Deferred()
        self.transport.write(b"ping")

    def dataReceived(self, data):
        self.answered.callback(data)


async def main():
    endpoint = clientFromString(reactor, sys.argv[1])
    for _ in range(5):
        app = await endpoint.connect(Factory.forProtocol(Ping))
        await app.answered
    # The last connection stays open while the reactor stops.
    print("opened", sharedAuthenticators(reactor).opened, flush=True)
    reactor.stop()


ensureDeferred(main()).addErrback(lambda f: (f.printTraceback(), reactor.stop()))
reactor.run()
print("stopped closed", sharedAuthenticators(reactor).closed, flush=True)
"""


class ShutdownTests(TestCase):
    timeout = 120

    def test_programExits(self) -> Deferred[None]:
        """
        A program that made five connections through an endpoint string
        (one store opened) and stops its reactor with one still open exits
        at once and cleanly: the shared store is closed as the reactor
        stops, and no store thread keeps the process alive.
        """
        base = FilePath(tempfile.mkdtemp(prefix="dwtrust-strings-"))
        self.addCleanup(shutil.rmtree, base.path, ignore_errors=True)
        serverDir, clientDir = base.child("server"), base.child("client")
        Identity.generate("acme", "ledger").save(serverDir)
        Identity.generate("acme", "billing").save(clientDir)

        async def run() -> None:
            events: list[Deferred[Any]] = []

            def build() -> ServerApp:
                connected: Deferred[PeerIdentity] = Deferred()
                lost: Deferred[None] = Deferred()
                events.extend([connected, lost])
                return ServerApp(connected, lost)

            port = await serverFromString(
                reactor,
                f"dwtrust:tcp:0:interface={LOOPBACK}:identity={serverDir.path}"
                ":approver=auto",
            ).listen(Factory.forProtocol(build))
            self.addCleanup(port.stopListening)
            description = (
                f"dwtrust:tcp:host={LOOPBACK}:port={portNumber(port)}"
                f":identity={clientDir.path}"
            )
            process = await deferToProcess(
                [sys.executable, "-c", textwrap.dedent(PROGRAM), description]
            )
            self.assertEqual(
                (process.returncode, process.stdout.split()),
                (0, ["opened", "1", "stopped", "closed", "1"]),
                process.stderr,
            )
            self.assertNotIn("Traceback", process.stderr)
            self.assertNotIn("Unhandled", process.stderr)

        return Deferred.fromCoroutine(run())


def deferToProcess(command: list[str]) -> Deferred[subprocess.CompletedProcess[str]]:
    """
    Run C{command} in a thread (so that this reactor serves it meanwhile).
    """
    from twisted.internet.threads import deferToThread

    result: Deferred[subprocess.CompletedProcess[str]] = deferToThread(
        subprocess.run, command, capture_output=True, text=True, timeout=60
    )
    return result
