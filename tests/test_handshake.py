"""
The dwtrust handshake end to end, in memory: real TLS over iosim, both ends
real, one shared L{Clock}.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.test.iosim import FakeTransport, makeFakeServer
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from dwtrust import (
    Authenticator,
    ErrorCode,
    HandshakeFailed,
    IAuthenticatedTransport,
    Identity,
    PeerIdentity,
    PinningPolicy,
)
from dwtrust._proof import makeProof
from dwtrust._protocol import MAX_HELD
from dwtrust._wire import Challenge, Error, Frame, Hello, Role
from dwtrust._wrap import DEFAULT_DECISION_TIMEOUT, DEFAULT_TIMEOUT
from dwtrust.approval import KnownOnlyApprover
from dwtrust.store import IKnownServices, KeyState, Pin
from dwtrust.testing import FakeApprover, MemoryTrustStore, connectInMemory

from .helpers import (
    ALGORITHMS,
    SERVER_ADDRESS,
    Connection,
    PausableTransport,
    RecordingFactory,
    RecordingProtocol,
    ScriptedPeer,
    Service,
    connect,
    connectScriptedServer,
    makeIdentity,
    makeService,
)

#: More than the server holds before it stops reading, in a pattern that shows
#: any byte lost, doubled or out of place.
LARGE = b"".join(i.to_bytes(4, "big") for i in range((MAX_HELD + 200 * 1024) // 4))


def assertHandshakeFailed(
    case: SynchronousTestCase, reason: Failure | None, code: ErrorCode, byPeer: bool
) -> HandshakeFailed:
    case.assertIsNotNone(reason)
    assert reason is not None
    case.assertIsInstance(reason.value, HandshakeFailed)
    failed = reason.value
    assert isinstance(failed, HandshakeFailed)
    case.assertIs(failed.code, code)
    case.assertEqual(failed.byPeer, byPeer)
    return failed


class HandshakeCase(SynchronousTestCase):
    """
    A server and a client, each with its own in-memory store, and a clock.
    They speak version 1 (whose client connects its application as soon as
    the server has proved itself); C{tests/test_v2.py} has version 2.
    """

    versions = (1,)

    def setUp(self) -> None:
        self.clock = Clock()
        self.server = self.makeService(makeIdentity("acme", "ledger"))
        self.client = self.makeService(makeIdentity("acme", "billing"))

    def makeService(
        self,
        identity: Identity,
        store: MemoryTrustStore | None = None,
        strict: bool = False,
        **kwargs: Any,
    ) -> Service:
        return makeService(
            self.clock,
            identity,
            store=store,
            strict=strict,
            versions=self.versions,
            **kwargs,
        )

    def connect(
        self,
        serverApp: RecordingFactory | None = None,
        clientApp: RecordingFactory | None = None,
        address: str = SERVER_ADDRESS,
        serverTransportFactory: Callable[[Any], FakeTransport] = makeFakeServer,
    ) -> Connection:
        return connect(
            self.clock,
            self.server,
            self.client,
            serverApp,
            clientApp,
            address,
            serverTransportFactory,
        )

    def approveFirst(self, connection: Connection) -> None:
        [pending] = self.server.fakeApprover.requests
        pending.approve()
        connection.flush()


def _algorithmTest(serverAlgorithm: str, clientAlgorithm: str) -> object:
    def test(self: AlgorithmTests) -> None:
        self.checkHandshake(serverAlgorithm, clientAlgorithm)

    test.__doc__ = (
        f"A {serverAlgorithm} server and a {clientAlgorithm} client authenticate"
        " each other."
    )
    return test


class AlgorithmTests(SynchronousTestCase):
    """
    Every pair of key algorithms completes the handshake, and each side sees
    who the other is.
    """

    def checkHandshake(self, serverAlgorithm: str, clientAlgorithm: str) -> None:
        clock = Clock()
        server = makeService(clock, makeIdentity("acme", "ledger", serverAlgorithm))
        client = makeService(clock, makeIdentity("acme", "billing", clientAlgorithm))
        serverApps = RecordingFactory()
        clientApps = RecordingFactory([b"ping"])
        _, _, pump = connectInMemory(
            server.authenticator, serverApps, client.authenticator, clientApps, clock
        )
        server.fakeApprover.requests[0].approve()
        pump.flush()

        [serverApp] = serverApps.connected
        [clientApp] = clientApps.connected
        self.assertEqual(serverApp.received, b"ping")
        self.assertEqual(
            serverApp.peer, PeerIdentity("acme", "billing", client.identity.publicKey)
        )
        self.assertEqual(
            clientApp.peer, PeerIdentity("acme", "ledger", server.identity.publicKey)
        )
        self.assertEqual(serverApp.peer.algorithm, client.identity.algorithm.name)
        self.assertEqual(clientApp.peer.fingerprint, server.identity.fingerprint)
        serverApp.transport.write(b"pong")
        pump.flush()
        self.assertEqual(clientApp.received, b"pong")


for _server in ALGORITHMS:
    for _client in ALGORITHMS:
        setattr(
            AlgorithmTests,
            f"test_{_server}_{_client}".replace("-", "_"),
            _algorithmTest(_server, _client),
        )


class HandshakeTests(HandshakeCase):
    """
    A handshake that succeeds.
    """

    def test_connectionMadeOnlyAfterSuccess(self) -> None:
        """
        The server's application is connected only once the client is
        approved; the client's only once the server has proved its key and it
        is pinned.  Neither sees a byte before.
        """
        seen: list[tuple[str, bool]] = []

        def serverConnected(protocol: RecordingProtocol) -> None:
            record = self.server.store.peers.get(self.client.identity.fingerprint)
            seen.append(
                ("server", record is not None and record.state is KeyState.approved)
            )

        def clientConnected(protocol: RecordingProtocol) -> None:
            pin = self.client.store.pins.get(SERVER_ADDRESS)
            seen.append(
                (
                    "client",
                    pin is not None
                    and pin.fingerprint == self.server.identity.fingerprint,
                )
            )

        connection = self.connect(
            serverApp=RecordingFactory(onConnect=serverConnected),
            clientApp=RecordingFactory(onConnect=clientConnected),
        )
        self.assertEqual(connection.serverApp.connected, [])
        self.assertEqual(seen, [("client", True)])
        [clientApp] = connection.clientApp.connected
        self.assertEqual(clientApp.chunks, [])

        self.approveFirst(connection)
        self.assertEqual(seen, [("client", True), ("server", True)])

    def test_authenticatedTransport(self) -> None:
        """
        The application's transport provides L{IAuthenticatedTransport}, and
        its C{peer} tells who is at the other end.
        """
        connection = self.connect()
        self.approveFirst(connection)
        [serverApp] = connection.serverApp.connected
        [clientApp] = connection.clientApp.connected
        for app, other in [(serverApp, self.client), (clientApp, self.server)]:
            self.assertTrue(verifyObject(IAuthenticatedTransport, app.transport))
            peer = app.transport.peer
            self.assertEqual(peer.org, other.identity.org)
            self.assertEqual(peer.service, other.identity.service)
            self.assertEqual(peer.algorithm, "ssh-ed25519")
            self.assertEqual(peer.fingerprint, other.identity.fingerprint)
            self.assertEqual(peer.name, other.identity.name)

    def test_serverRecordsApprovedKey(self) -> None:
        connection = self.connect()
        [pending] = self.server.fakeApprover.requests
        self.assertEqual(
            pending.request.peer.fingerprint, self.client.identity.fingerprint
        )
        self.assertEqual(pending.request.service, "acme/ledger")
        self.assertEqual(pending.request.source, "127.0.0.1:40000")
        self.assertEqual(self.server.store.peers, {})
        self.approveFirst(connection)
        record = self.server.store.peers[self.client.identity.fingerprint]
        self.assertIs(record.state, KeyState.approved)
        self.assertEqual((record.org, record.service), ("acme", "billing"))
        self.assertEqual(record.publicKey, self.client.identity.publicKey.blob)
        self.assertEqual(record.algorithm, "ssh-ed25519")
        self.assertEqual(record.decidedBy, "test")

    def test_clientPinsServer(self) -> None:
        self.connect()
        pin = self.client.store.pins[SERVER_ADDRESS]
        self.assertEqual(pin.fingerprint, self.server.identity.fingerprint)
        self.assertEqual((pin.org, pin.service), ("acme", "ledger"))
        self.assertEqual(pin.publicKey, self.server.identity.publicKey.blob)
        # A server does not pin its clients, and a client records no peers.
        self.assertEqual(self.server.store.pins, {})
        self.assertEqual(self.client.store.peers, {})

    def test_secondConnectionPassesAtOnce(self) -> None:
        """
        Once approved, the same key connects at once, with no new request.
        """
        self.approveFirst(self.connect())
        second = self.connect(clientApp=RecordingFactory([b"again"]))
        self.assertEqual(len(self.server.fakeApprover.requests), 1)
        [serverApp] = second.serverApp.connected
        self.assertEqual(serverApp.received, b"again")
        self.assertEqual(len(second.clientApp.connected), 1)
        self.assertEqual(
            self.server.store.peers[self.client.identity.fingerprint].attempts, 2
        )

    def test_noTimersLeft(self) -> None:
        """
        A finished handshake leaves nothing scheduled, and advancing the clock
        afterwards does not disturb the connection.
        """
        connection = self.connect()
        self.approveFirst(connection)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(DEFAULT_DECISION_TIMEOUT + DEFAULT_TIMEOUT + 1)
        connection.flush()
        [serverApp] = connection.serverApp.connected
        self.assertIsNone(serverApp.lostReason)

    def test_whenConnected(self) -> None:
        connection = self.connect()
        [clientApp] = connection.clientApp.connected
        self.assertIs(
            self.successResultOf(connection.clientHandshake.whenConnected()), clientApp
        )
        waiting = connection.serverHandshake.whenConnected()
        self.assertNoResult(waiting)
        self.approveFirst(connection)
        [serverApp] = connection.serverApp.connected
        self.assertIs(self.successResultOf(waiting), serverApp)

    def test_closeAfterwards(self) -> None:
        """
        After the handshake, closing is the application's own business: the
        other application's C{connectionLost} is a clean close, not a
        L{HandshakeFailed}.
        """
        connection = self.connect()
        self.approveFirst(connection)
        [clientApp] = connection.clientApp.connected
        clientApp.transport.loseConnection()
        connection.flush()
        [serverApp] = connection.serverApp.connected
        assert serverApp.lostReason is not None
        self.assertNotIsInstance(serverApp.lostReason.value, HandshakeFailed)


class HeldBytesTests(HandshakeCase):
    """
    Bytes the client's application writes straight away travel with the
    C{PROOF} frame; the server holds them until the client is approved, then
    gives them to its application exactly once, in order.
    """

    def test_greeting(self) -> None:
        connection = self.connect(clientApp=RecordingFactory([b"hello, ", b"ledger"]))
        [serverApp] = connection.serverApp.protocols
        self.assertFalse(serverApp.connected)
        self.assertEqual(serverApp.chunks, [])
        self.approveFirst(connection)
        self.assertEqual(serverApp.received, b"hello, ledger")

    def test_writesWhilePending(self) -> None:
        """
        Bytes written while the server decides are held too, after the first
        ones.
        """
        connection = self.connect(clientApp=RecordingFactory([b"one "]))
        [clientApp] = connection.clientApp.connected
        clientApp.transport.write(b"two ")
        connection.flush()
        clientApp.transport.write(b"three")
        connection.flush()
        [serverApp] = connection.serverApp.protocols
        self.assertEqual(serverApp.chunks, [])
        self.approveFirst(connection)
        self.assertEqual(serverApp.received, b"one two three")
        clientApp.transport.write(b" four")
        connection.flush()
        self.assertEqual(serverApp.received, b"one two three four")

    def test_knownKeyGreeting(self) -> None:
        """
        For a key already approved, the bytes sent with the proof are delivered
        in the same turn as the approval.
        """
        self.approveFirst(self.connect())
        connection = self.connect(clientApp=RecordingFactory([b"quick"]))
        [serverApp] = connection.serverApp.connected
        self.assertEqual(serverApp.chunks, [b"quick"])

    def test_serverGreeting(self) -> None:
        """
        Bytes the server's application writes on connection reach the client
        right after the C{ACCEPT}.
        """
        connection = self.connect(serverApp=RecordingFactory([b"welcome"]))
        self.approveFirst(connection)
        [clientApp] = connection.clientApp.connected
        self.assertEqual(clientApp.received, b"welcome")

    def connectPaused(
        self, clientApp: RecordingFactory, serverApp: RecordingFactory | None = None
    ) -> tuple[Connection, PausableTransport]:
        """
        Connect with a server transport that really stops reading when paused.
        """
        transports: list[PausableTransport] = []

        def serverTransport(protocol: object) -> PausableTransport:
            transport = PausableTransport(protocol, isServer=True)
            transports.append(transport)
            return transport

        connection = self.connect(
            clientApp=clientApp,
            serverApp=serverApp,
            serverTransportFactory=serverTransport,
        )
        [transport] = transports
        return connection, transport

    def test_largeWrite(self) -> None:
        """
        More than L{MAX_HELD} bytes written at once: the server stops reading
        while it decides, then delivers everything, once and in order, and
        reads again.
        """
        connection, transport = self.connectPaused(RecordingFactory([LARGE]))
        [serverApp] = connection.serverApp.protocols
        self.assertEqual(transport.events, ["pause"])
        self.assertTrue(transport.backlog, "the server kept reading while paused")
        self.assertEqual(serverApp.chunks, [])

        self.approveFirst(connection)
        self.assertEqual(transport.events, ["pause", "resume"])
        self.assertEqual(len(serverApp.received), len(LARGE))
        self.assertEqual(serverApp.received, LARGE)
        self.assertEqual(transport.backlog, b"")

    def test_largeWriteDenied(self) -> None:
        """
        More than L{MAX_HELD} bytes from a client that is then denied: none
        reaches the server's application, and the connection closes.
        """
        connection, _ = self.connectPaused(RecordingFactory([LARGE]))
        self.server.fakeApprover.requests[0].deny()
        connection.flush()
        self.assertEqual(connection.serverApp.connected, [])
        self.assertEqual(connection.serverApp.received, b"")
        [clientApp] = connection.clientApp.protocols
        assertHandshakeFailed(self, clientApp.lostReason, ErrorCode.denied, True)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_applicationPausesOnConnect(self) -> None:
        """
        An application that pauses its transport as soon as it is connected
        (as the daemon's forwarder does, until its local connection is up)
        stays paused: the end of the handshake does not resume reading behind
        its back.
        """

        def pause(protocol: RecordingProtocol) -> None:
            protocol.transport.pauseProducing()

        connection, transport = self.connectPaused(
            RecordingFactory([LARGE]), RecordingFactory(onConnect=pause)
        )
        self.approveFirst(connection)
        [serverApp] = connection.serverApp.connected
        self.assertTrue(
            transport.paused,
            f"the transport was resumed after the application paused it"
            f" ({transport.events})",
        )
        serverApp.transport.resumeProducing()
        connection.flush()
        self.assertEqual(serverApp.received, LARGE)


class RefusalTests(HandshakeCase):
    """
    Handshakes that fail, and how each side hears of it.
    """

    def test_knownOnlyRefusesUnknown(self) -> None:
        """
        The C{known-only} approver refuses a key it does not know: the
        client's application loses its connection with
        C{HandshakeFailed(denied, byPeer=True)}, the server's is never
        connected, and nothing is stored.
        """
        self.server = self.makeService(
            self.server.identity, approver=KnownOnlyApprover()
        )
        connection = self.connect(clientApp=RecordingFactory([b"secret"]))
        [clientApp] = connection.clientApp.protocols
        assertHandshakeFailed(self, clientApp.lostReason, ErrorCode.denied, True)
        self.assertEqual(connection.serverApp.connected, [])
        self.assertEqual(connection.serverApp.received, b"")
        self.assertEqual(self.server.store.peers, {})
        failure = self.failureResultOf(
            connection.serverHandshake.whenConnected(), HandshakeFailed
        )
        self.assertIs(failure.value.code, ErrorCode.denied)
        self.assertFalse(failure.value.byPeer)

    def test_knownOnlyAdmitsKnown(self) -> None:
        """
        The C{known-only} approver lets in a key the store approves.
        """
        self.approveFirst(self.connect())
        self.server = self.makeService(
            self.server.identity,
            approver=KnownOnlyApprover(),
            store=self.server.store,
        )
        connection = self.connect()
        self.assertEqual(len(connection.serverApp.connected), 1)

    def test_denied(self) -> None:
        """
        An owner's denial is recorded; the next attempt with that key is
        refused at once, with no new request.
        """
        connection = self.connect(clientApp=RecordingFactory([b"secret"]))
        self.server.fakeApprover.requests[0].deny("not today")
        connection.flush()
        [clientApp] = connection.clientApp.protocols
        failed = assertHandshakeFailed(
            self, clientApp.lostReason, ErrorCode.denied, True
        )
        self.assertEqual(failed.message, "not today")
        self.assertEqual(connection.serverApp.connected, [])
        self.assertEqual(connection.serverApp.received, b"")
        record = self.server.store.peers[self.client.identity.fingerprint]
        self.assertIs(record.state, KeyState.denied)

        again = self.connect()
        self.assertEqual(len(self.server.fakeApprover.requests), 1)
        [clientApp] = again.clientApp.protocols
        assertHandshakeFailed(self, clientApp.lostReason, ErrorCode.denied, True)

    def test_pinMismatch(self) -> None:
        """
        A server presenting another key than the one pinned for its address is
        refused with C{identity_changed}; the client never sends its proof,
        so the server never connects its application.
        """
        impostor = self.makeService(makeIdentity("acme", "ledger", slot="impostor"))
        self.connect()  # pins the real server
        pins = dict(self.client.store.pins)
        self.server = impostor
        connection = self.connect()
        failure = self.failureResultOf(
            connection.clientHandshake.whenConnected(), HandshakeFailed
        )
        self.assertIs(failure.value.code, ErrorCode.identity_changed)
        self.assertFalse(failure.value.byPeer)
        self.assertEqual(connection.clientApp.connected, [])
        self.assertEqual(connection.serverApp.connected, [])
        self.assertEqual(impostor.fakeApprover.requests, [])
        self.assertEqual(self.client.store.pins, pins)
        serverSide = self.failureResultOf(
            connection.serverHandshake.whenConnected(), HandshakeFailed
        )
        self.assertIs(serverSide.value.code, ErrorCode.identity_changed)
        self.assertTrue(serverSide.value.byPeer)

    def test_serviceKeyChangedAtAnotherAddress(self) -> None:
        """
        A service pinned at one address that shows up with another key at a
        new address is refused too.
        """
        self.connect(address="ledger-1.example:8443")
        self.server = self.makeService(makeIdentity("acme", "ledger", slot="impostor"))
        connection = self.connect(address="ledger-2.example:8443")
        failure = self.failureResultOf(
            connection.clientHandshake.whenConnected(), HandshakeFailed
        )
        self.assertIs(failure.value.code, ErrorCode.identity_changed)
        self.assertNotIn("ledger-2.example:8443", self.client.store.pins)

    def test_strictRefusesUnknownServer(self) -> None:
        """
        A strict client refuses a server it has no pin for, and pins nothing.
        """
        self.client = self.makeService(self.client.identity, strict=True)
        connection = self.connect()
        failure = self.failureResultOf(
            connection.clientHandshake.whenConnected(), HandshakeFailed
        )
        self.assertIs(failure.value.code, ErrorCode.denied)
        self.assertFalse(failure.value.byPeer)
        self.assertIn("strict", failure.value.message)
        self.assertEqual(self.client.store.pins, {})
        self.assertEqual(connection.clientApp.connected, [])
        self.assertEqual(connection.serverApp.connected, [])
        self.assertEqual(self.server.fakeApprover.requests, [])

    def test_strictAdmitsPinnedServer(self) -> None:
        self.connect()
        self.client = self.makeService(
            self.client.identity, store=self.client.store, strict=True
        )
        connection = self.connect()
        self.assertEqual(len(connection.clientApp.connected), 1)

    def test_cancelledWhenClientLeaves(self) -> None:
        """
        A client that goes away while its approval is pending cancels the
        request; the server's application is never connected.
        """
        connection = self.connect(clientApp=RecordingFactory([b"secret"]))
        [pending] = self.server.fakeApprover.requests
        self.assertFalse(pending.cancelled)
        [clientApp] = connection.clientApp.connected
        clientApp.transport.loseConnection()
        connection.flush()
        self.assertTrue(pending.cancelled)
        self.assertEqual(connection.serverApp.connected, [])
        self.assertEqual(connection.serverApp.received, b"")
        self.assertEqual(self.server.store.peers, {})
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_cancelledWhenConnectionDrops(self) -> None:
        """
        The same when the connection underneath just drops.
        """
        connection = self.connect()
        [pending] = self.server.fakeApprover.requests
        transport = connection.clientTLS.transport
        assert isinstance(transport, FakeTransport)
        transport.abortConnection()
        connection.flush()
        self.assertTrue(pending.cancelled)
        self.assertEqual(connection.serverApp.connected, [])

    def test_decisionTimeout(self) -> None:
        """
        With both ends on the default settings, a decision that takes too
        long fails the handshake with C{pending}: the client hears that its
        key waits for approval (not that the server stopped answering), and
        the request is cancelled.
        """
        connection = self.connect(clientApp=RecordingFactory([b"secret"]))
        [pending] = self.server.fakeApprover.requests
        self.clock.advance(DEFAULT_DECISION_TIMEOUT)
        connection.flush()
        self.assertTrue(pending.cancelled)
        self.assertEqual(connection.serverApp.connected, [])
        [clientApp] = connection.clientApp.protocols
        assertHandshakeFailed(self, clientApp.lostReason, ErrorCode.pending, True)

    def test_shortDecisionTimeout(self) -> None:
        """
        A server whose decision timeout is shorter than the client's tells the
        client C{pending} when it runs out.
        """
        self.server = self.makeService(self.server.identity, decisionTimeout=5)
        connection = self.connect()
        [pending] = self.server.fakeApprover.requests
        self.clock.advance(4.9)
        connection.flush()
        self.assertFalse(pending.cancelled)
        self.clock.advance(0.1)
        connection.flush()
        self.assertTrue(pending.cancelled)
        [clientApp] = connection.clientApp.protocols
        assertHandshakeFailed(self, clientApp.lostReason, ErrorCode.pending, True)
        serverSide = self.failureResultOf(
            connection.serverHandshake.whenConnected(), HandshakeFailed
        )
        self.assertIs(serverSide.value.code, ErrorCode.pending)
        self.assertFalse(serverSide.value.byPeer)
        self.assertEqual(connection.serverApp.connected, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_approverFailureIsUnavailable(self) -> None:
        """
        An approver that fails (rather than deciding) refuses the client with
        C{unavailable}, and the failure is logged.
        """
        connection = self.connect()
        [pending] = self.server.fakeApprover.requests
        pending.deferred.errback(RuntimeError("the approval service is down"))
        connection.flush()
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        [clientApp] = connection.clientApp.protocols
        assertHandshakeFailed(self, clientApp.lostReason, ErrorCode.unavailable, True)
        self.assertEqual(self.server.store.peers, {})


@implementer(IKnownServices)
class SlowKnownServices:
    """
    Pins whose first lookup waits until the test answers it.
    """

    def __init__(self, store: MemoryTrustStore) -> None:
        self.store = store
        self.waiting: list[Deferred[Pin | None]] = []
        self.cancelled = 0

    def pinned(self, address: str) -> Deferred[Pin | None]:
        def cancel(d: Deferred[Pin | None]) -> None:
            self.cancelled += 1

        waiting: Deferred[Pin | None] = Deferred(cancel)
        self.waiting.append(waiting)
        return waiting

    def pinnedService(self, org: str, service: str) -> Deferred[list[Pin]]:
        return self.store.pinnedService(org, service)

    def pin(self, address: str, peer: PeerIdentity) -> Deferred[Pin]:
        return self.store.pin(address, peer)

    def unpin(self, address: str) -> Deferred[bool]:
        return self.store.unpin(address)


class OutstandingCheckTests(SynchronousTestCase):
    """
    A check still running when the handshake fails is cancelled, and records
    nothing afterwards.
    """

    def test_serverErrorWhileClientChecks(self) -> None:
        clock = Clock()
        store = MemoryTrustStore(now=clock.seconds)
        known = SlowKnownServices(store)
        clientIdentity = makeIdentity("acme", "billing")
        client = Service(
            clientIdentity,
            store,
            FakeApprover(),
            Authenticator(clientIdentity, None, PinningPolicy(known), clock),
        )
        serverIdentity = makeIdentity("acme", "ledger")

        def onFrame(peer: ScriptedPeer, frame: Frame) -> None:
            if isinstance(frame, Hello):
                proof = makeProof(
                    serverIdentity, Role.server, frame.challenge, peer.exporter
                )
                peer.sendFrame(Challenge(b"s" * 32, proof))
                peer.sendFrame(Error("denied", "changed my mind"))

        attacker = ScriptedPeer(serverIdentity, onFrame=onFrame)
        connection = connectScriptedServer(clock, attacker, client)
        failure = self.failureResultOf(
            connection.clientHandshake.whenConnected(), HandshakeFailed
        )
        self.assertIs(failure.value.code, ErrorCode.denied)
        self.assertEqual(connection.clientApp.connected, [])
        cancelled = known.cancelled
        # Even if the store answers later, nothing is pinned for a server
        # whose handshake failed.
        for waiting in known.waiting:
            if not waiting.called:
                waiting.callback(None)
        self.assertEqual(store.pins, {})
        self.assertEqual(cancelled, 1)
