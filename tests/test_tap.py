"""
Tests for L{dwtrust.tap}: the C{twistd dwtrust} options and service.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from typing import Any

from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.application.service import IService, IServiceMaker
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import CannotListenError, ConnectionRefusedError
from twisted.internet.interfaces import IListeningPort, IReactorFDSet, IReactorTCP
from twisted.internet.protocol import Factory, Protocol, ServerFactory
from twisted.internet.task import deferLater
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.plugin import getPlugins
from twisted.python.filepath import FilePath
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase, TestCase

from dwtrust import Identity, ServerEndpoint
from dwtrust._forward import ForwardingFactory
from dwtrust._systemd import ServiceManager
from dwtrust.tap import Options, makeService

LOOPBACK = "tcp:0:interface=127.0.0.1"


def temporaryDirectory(case: SynchronousTestCase) -> FilePath[str]:
    """
    A new, empty directory, removed when C{case} ends.
    """
    path = tempfile.mkdtemp(prefix="dwtrust-test-")
    case.addCleanup(shutil.rmtree, path, ignore_errors=True)
    return FilePath(path)


def parse(*argv: str) -> Options:
    options = Options()
    options.parseOptions(list(argv))
    return options


def listeningPorts() -> set[IListeningPort]:
    """
    The reactor's listening TCP ports.
    """
    readers = IReactorFDSet(reactor).getReaders()
    return {r for r in readers if IListeningPort.providedBy(r)}


def storeThreads() -> set[threading.Thread]:
    """
    The live threads of database connection pools (the reactor's own thread
    pool is named after the reactor).
    """
    return {
        t
        for t in threading.enumerate()
        if t.name.startswith("PoolThread-") and "reactor" not in t.name
    }


def running() -> Deferred[None]:
    """
    Fire once the reactor is running (trial runs it only while it waits).
    """
    return deferLater(reactor, 0, lambda: None)


def stopIfRunning(service: IService) -> Deferred[object] | None:
    """
    Stop C{service} if it is running: a clean-up that closes its store.
    (Register it just before C{startService}, so that no failure can come
    between the two and leave the store's thread behind.)
    """
    if service.running:
        stopping: Deferred[object] = service.stopService()
        return stopping
    return None


class OptionsTests(SynchronousTestCase):
    """
    L{Options}: the command line of C{twistd dwtrust}.
    """

    def test_defaults(self) -> None:
        """
        With no options: listen on C{tcp:7443}, forward to 127.0.0.1:8080,
        admit only known keys, use C{~/.dwtrust} expanded, and an Ed25519 key.
        """
        options = parse()
        self.assertEqual(options["listen"], "tcp:7443")
        self.assertEqual(options["forward"], ["tcp:host=127.0.0.1:port=8080"])
        self.assertEqual(options["approvers"], ["owners"])
        self.assertEqual(options["owners"], [])
        self.assertEqual(
            options["control"],
            "unix:" + os.path.join(os.path.expanduser("~/.dwtrust"), "control.sock"),
        )
        self.assertEqual(options["algorithm"], "ed25519")
        self.assertEqual(
            options["identity"], os.path.join(os.path.expanduser("~"), ".dwtrust")
        )
        self.assertNotIn("~", options["identity"])
        self.assertIsNone(options["org"])
        self.assertIsNone(options["service"])
        self.assertIsNone(options["store"])
        self.assertEqual((options["timeout"], options["decision-timeout"]), (10, 30))

    def test_identityExpandsHome(self) -> None:
        """
        C{--identity ~/x} is expanded.
        """
        options = parse("--identity", "~/dwtrust-elsewhere")
        self.assertEqual(
            options["identity"],
            os.path.join(os.path.expanduser("~"), "dwtrust-elsewhere"),
        )

    def test_values(self) -> None:
        """
        Given options are kept; time-outs are numbers.
        """
        options = parse(
            "--approver=auto",
            "--algorithm=ecdsa-p384",
            "--timeout=2.5",
            "--decision-timeout=60",
            "--org=acme",
            "--service=billing",
        )
        self.assertEqual(
            (
                options["approvers"],
                options["algorithm"],
                options["timeout"],
                options["decision-timeout"],
                options["org"],
                options["service"],
            ),
            (["auto"], "ecdsa-p384", 2.5, 60.0, "acme", "billing"),
        )

    def test_approverChain(self) -> None:
        """
        C{--approver} repeats, to chain approvers in the order given.
        """
        options = parse("--approver=python:os.getcwd", "--approver=owners")
        self.assertEqual(options["approvers"], ["python:os.getcwd", "owners"])

    def test_ownerKeys(self) -> None:
        """
        C{--owner} reads an owner's public key file; one that is not a key is
        a usage error naming the file.
        """
        directory = temporaryDirectory(self)
        owner = Identity.generate("acme", "alice")
        owner.save(directory.child("alice"))
        options = parse(
            "--owner", directory.child("alice").child("id_dwtrust.pub").path
        )
        [key] = options["owners"]
        self.assertEqual(key.fingerprint, owner.fingerprint)
        self.assertEqual(key.name, "acme/alice")
        bad = directory.child("bad.pub")
        bad.setContent(b"not a key\n")
        self.assertUsageError(["--owner", bad.path], bad.path)
        self.assertUsageError(["--owner", directory.child("missing").path], "missing")

    def assertUsageError(self, argv: list[str], *expected: str) -> None:
        error = self.assertRaises(UsageError, parse, *argv)
        for text in expected:
            self.assertIn(text, str(error))

    def test_unknownApprover(self) -> None:
        """
        An unknown approver is a usage error that lists the built-in ones.
        """
        self.assertUsageError(
            ["--approver", "yes-please"],
            "unknown approver 'yes-please'",
            "auto, known-only",
        )

    def test_unknownAlgorithm(self) -> None:
        """
        An unknown algorithm is a usage error that lists the known ones.
        """
        self.assertUsageError(
            ["--algorithm", "dsa"],
            "unknown algorithm 'dsa'",
            "ecdsa-p256, ecdsa-p384, ed25519, rsa-3072, rsa-4096",
        )

    def test_nonPositiveTimeout(self) -> None:
        """
        A time-out that is zero, negative or not a number is a usage error
        that says it must be a positive number of seconds.
        """
        for value in ["0", "-1", "nan"]:
            self.assertUsageError(
                [f"--timeout={value}"], "is not a positive number of seconds"
            )
            self.assertUsageError(
                [f"--decision-timeout={value}"],
                "is not a positive number of seconds",
            )
        self.assertUsageError(
            ["--timeout=soon"], "--timeout: invalid value 'soon'", "positive number"
        )


class PluginTests(SynchronousTestCase):
    """
    The dropin makes C{twistd dwtrust}.
    """

    def test_serviceMaker(self) -> None:
        """
        An L{IServiceMaker} named C{dwtrust} uses L{dwtrust.tap}.
        """
        makers = {m.tapname: m for m in getPlugins(IServiceMaker)}
        maker = makers["dwtrust"]
        self.assertIs(maker.options, Options)
        self.assertIs(maker.makeService, makeService)


class MakeServiceTests(TestCase):
    """
    L{makeService}, with a temporary identity directory.

    The store's database pool starts only once the reactor runs, and its
    thread keeps the process alive until the store is closed.  Trial runs the
    reactor only while it waits for a test's L{Deferred}, so every test that
    opens a store does its work in a coroutine that has let the reactor run,
    and stops the service (closing the store) when it ends.
    """

    def setUp(self) -> None:
        self.directory = temporaryDirectory(self).child("identity")

    def options(self, *argv: str) -> Options:
        return parse("--identity", self.directory.path, "--listen", LOOPBACK, *argv)

    async def make(self, *argv: str) -> IService:
        """
        Make the service with the reactor running, and start it on a loopback
        port; it is stopped, closing its store, when the test ends.
        """
        await running()
        service = makeService(self.options(*argv))
        self.addCleanup(stopIfRunning, service)
        service.startService()
        return service

    def test_createsDefaultIdentity(self) -> Deferred[None]:
        """
        In an empty directory, the service creates the identity
        C{local/dwtrust}, and logs that it did.
        """

        async def run() -> None:
            events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
            await self.make()
            identity = Identity.load(self.directory)
            self.assertEqual((identity.org, identity.service), ("local", "dwtrust"))
            self.assertEqual(identity.algorithm.name, "ssh-ed25519")
            [created] = [
                e for e in events if e.get("event") == "dwtrust.identity.created"
            ]
            self.assertEqual(created["identity"], "local/dwtrust")
            self.assertEqual(created["fingerprint"], identity.fingerprint)

        return Deferred.fromCoroutine(run())

    def test_createsGivenIdentity(self) -> Deferred[None]:
        """
        C{--org}, C{--service} and C{--algorithm} name and key a new identity.
        """

        async def run() -> None:
            await self.make(
                "--org", "acme", "--service", "billing", "--algorithm", "ecdsa-p256"
            )
            identity = Identity.load(self.directory)
            self.assertEqual((identity.org, identity.service), ("acme", "billing"))
            self.assertEqual(identity.algorithm.name, "ecdsa-sha2-nistp256")

        return Deferred.fromCoroutine(run())

    def test_usesExistingIdentity(self) -> Deferred[None]:
        """
        With an identity in the directory and no names given, that identity
        is used, unchanged, rather than the defaults.
        """

        async def run() -> None:
            Identity.generate("acme", "billing").save(self.directory)
            key = self.directory.child("id_dwtrust").getContent()
            events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
            await self.make()
            self.assertEqual(self.directory.child("id_dwtrust").getContent(), key)
            [started] = [
                e for e in events if e.get("event") == "dwtrust.daemon.started"
            ]
            self.assertEqual(started["identity"], "acme/billing")
            self.assertEqual(
                [e for e in events if e.get("event") == "dwtrust.identity.created"],
                [],
            )

        return Deferred.fromCoroutine(run())

    def test_matchingNamesAccepted(self) -> Deferred[None]:
        """
        Names that match the existing identity are accepted.
        """

        async def run() -> None:
            Identity.generate("acme", "billing").save(self.directory)
            service = await self.make("--org", "acme", "--service", "billing")
            self.assertTrue(service.running)

        return Deferred.fromCoroutine(run())

    def test_mismatchingOrg(self) -> None:
        """
        An C{--org} that differs from the existing identity's ends twistd with
        a one-line message (no traceback) naming both, and the identity stays
        as it was.
        """
        Identity.generate("acme", "billing").save(self.directory)
        before = {c.basename(): c.getContent() for c in self.directory.children()}
        error = self.assertRaises(
            SystemExit, makeService, self.options("--org", "globex")
        )
        self.assertIn("acme/billing", str(error))
        self.assertIn("'globex'", str(error))
        after = {c.basename(): c.getContent() for c in self.directory.children()}
        self.assertEqual(after, before)

    def test_mismatchingService(self) -> None:
        """
        So is a C{--service} that differs.
        """
        Identity.generate("acme", "billing").save(self.directory)
        error = self.assertRaises(
            SystemExit, makeService, self.options("--service", "ledger")
        )
        self.assertIn("'ledger'", str(error))

    def test_badListenEndpoint(self) -> None:
        """
        A C{--listen} that is not an endpoint description ends twistd with a
        one-line message (no traceback).
        """
        Identity.generate("acme", "billing").save(self.directory)
        for bad in ["bogus:1", "tcp:notaport"]:
            error = self.assertRaises(
                SystemExit,
                makeService,
                parse("--identity", self.directory.path, "--listen", bad),
            )
            self.assertIn("bad endpoint description", str(error))

    def test_badForwardEndpoint(self) -> None:
        """
        A C{--forward} that is not an endpoint description ends twistd with a
        one-line message (no traceback).
        """
        Identity.generate("acme", "billing").save(self.directory)
        for bad in ["bogus:1", "tcp:host=127.0.0.1:port=http", "tcp:localhost"]:
            error = self.assertRaises(
                SystemExit, makeService, self.options("--forward", bad)
            )
            self.assertIn("bad endpoint description", str(error))

    def test_badStore(self) -> None:
        """
        A C{--store} that is not an SQLite file ends twistd with a one-line
        message (no traceback) that names it.
        """
        Identity.generate("acme", "billing").save(self.directory)
        store = self.directory.child("not-a-store")
        store.setContent(b"\x00garbage" * 100)
        error = self.assertRaises(
            SystemExit, makeService, self.options("--store", store.path)
        )
        self.assertIn(store.path, str(error))

    def test_serviceShape(self) -> Deferred[None]:
        """
        The service is an L{IService} whose child listens on a dwtrust
        endpoint and forwards to the C{--forward} target.
        """

        async def run() -> None:
            service = await self.make("--forward", "tcp:host=127.0.0.1:port=9999")
            self.assertTrue(IService.providedBy(service))
            children: list[Any] = list(service)  # type: ignore[call-overload]
            # The forwarding port, the owners' control port, the expiry
            # timer, and the service manager's part (readiness, SIGHUP).
            self.assertEqual(len(children), 4)
            port, control, expiry, manager = children
            self.assertIsInstance(manager, ServiceManager)
            self.assertIsInstance(control, StreamServerEndpointService)
            self.assertIsInstance(control.endpoint, ServerEndpoint)
            self.assertIsInstance(expiry, TimerService)
            self.assertIsInstance(port, StreamServerEndpointService)
            self.assertIsInstance(port.endpoint, ServerEndpoint)
            self.assertIsInstance(port.factory, ForwardingFactory)
            self.assertEqual(
                [d for _, d in port.factory.targets], ["tcp:host=127.0.0.1:port=9999"]
            )

        return Deferred.fromCoroutine(run())

    def test_storeBesideIdentity(self) -> Deferred[None]:
        """
        Without C{--store}, the trust store is C{trust.sqlite3} in the
        identity directory; with it, the file given.
        """

        async def run() -> None:
            await self.make()
            self.assertTrue(self.directory.child("trust.sqlite3").exists())
            other = temporaryDirectory(self)
            elsewhere = other.child("elsewhere.sqlite3")
            # A second daemon on one identity needs a control socket of its own.
            control = "unix:" + other.child("control.sock").path
            await self.make("--store", elsewhere.path, "--control", control)
            self.assertTrue(elsewhere.exists())

        return Deferred.fromCoroutine(run())

    def test_startAndStop(self) -> Deferred[None]:
        """
        Started, the service listens on the loopback port; stopped, it stops
        listening (a connection is refused) and closes its store and its own
        newest-decisions file (their database threads end).
        """

        async def run() -> None:
            await running()
            threadsBefore, portsBefore = storeThreads(), listeningPorts()
            service = makeService(self.options())
            self.addCleanup(stopIfRunning, service)
            service.startService()
            openThreads = storeThreads() - threadsBefore
            # The trust store's, and the newest-decisions file's.
            self.assertEqual(len(openThreads), 2)
            self.assertTrue(service.running)
            ports = listeningPorts() - portsBefore
            # The forwarding port and the owners' control socket.
            self.assertEqual(len(ports), 2)
            [port] = [p for p in ports if isinstance(p.getHost(), IPv4Address)]
            address = port.getHost()
            assert isinstance(address, IPv4Address)
            self.assertEqual(address.host, "127.0.0.1")
            self.assertNotEqual(address.port, 0)

            await service.stopService()
            self.assertFalse(service.running)
            self.assertEqual(listeningPorts() - portsBefore, set())
            self.assertEqual(
                {t for t in openThreads if t.is_alive()},
                set(),
                "the store's database thread is still running",
            )
            endpoint = TCP4ClientEndpoint(
                reactor,
                "127.0.0.1",
                address.port,
            )
            connecting = endpoint.connect(Factory.forProtocol(Protocol))
            await self.assertFailure(connecting, ConnectionRefusedError)

        return Deferred.fromCoroutine(run())

    def test_cannotListen(self) -> Deferred[None]:
        """
        If the port cannot be had, C{startService} fails at once rather than
        running without one; stopping then still closes the store.
        """

        async def run() -> None:
            await running()
            refuser = ServerFactory()
            refuser.protocol = Protocol
            busy = IReactorTCP(reactor).listenTCP(0, refuser, interface="127.0.0.1")
            busyAddress = busy.getHost()
            assert isinstance(busyAddress, IPv4Address)
            # A port taken after makeService checked it (one taken before is
            # refused there, see tests/test_startup.py).
            await busy.stopListening()
            threadsBefore = storeThreads()
            service = makeService(
                parse(
                    "--identity",
                    self.directory.path,
                    "--listen",
                    f"tcp:{busyAddress.port}:interface=127.0.0.1",
                )
            )
            busy = IReactorTCP(reactor).listenTCP(
                busyAddress.port, refuser, interface="127.0.0.1"
            )
            self.addCleanup(busy.stopListening)
            self.addCleanup(stopIfRunning, service)
            self.assertRaises(CannotListenError, service.startService)
            # The failed start undid itself: nothing runs, the store is shut.
            self.assertFalse(service.running)
            self.assertEqual(
                {t for t in storeThreads() - threadsBefore if t.is_alive()}, set()
            )
            await service.stopService()

        return Deferred.fromCoroutine(run())
