"""
Tests for dwtrust protocol version 2: its negotiation by ALPN, its frames and
signed payload, its two-frame exchange with the client's early trust, and
version 1 peers on either side of a version 2 one.

Real TLS throughout: over loopback TCP with the reactor (every key type,
TLS 1.3 and 1.2, every pairing of versions), and in memory (iosim, a shared
clock) where a test must stop the exchange half-way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from OpenSSL import SSL
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from dwtrust import Authenticator, ErrorCode, HandshakeFailed, PeerIdentity, _protocol
from dwtrust._machine import Core, _unexpected, buildClient, buildServer
from dwtrust._policy import ApprovalPolicy, IEarlyTrust, ITrustPolicy, PinningPolicy
from dwtrust._proof import ProofRejected, makeProof, verifyProof
from dwtrust._protocol import HandshakeProtocol
from dwtrust._tls import (
    ALPN_IDS,
    Channel,
    ConnectionCreator,
    channelOf,
    checkVersions,
    makeContext,
)
from dwtrust._wire import (
    HEADER,
    MAX_BODY,
    Accept,
    Challenge,
    Error,
    Frame,
    FrameDecoder,
    FrameType,
    Hello,
    Proof,
    ProofAccept,
    ProofFrame,
    Role,
    WireError,
    decodeFields,
    encodeFields,
    encodeFrame,
    signedPayload,
)
from dwtrust.approval import ApprovalRequest, Decision, IApprover
from dwtrust.testing import MemoryTrustStore

from .helpers import (
    ALGORITHMS,
    SERVER_ADDRESS,
    Connection,
    RecordingFactory,
    ScriptedPeer,
    Service,
    connect,
    connectScriptedClient,
    connectScriptedServer,
    makeIdentity,
    makeService,
)

reactor: Any = _reactor

SERVER = makeIdentity("acme", "ledger")
CLIENT = makeIdentity("acme", "billing")
EXPORTER = b"E" * 32
#: The versions a side may speak, and the version two sides end up with.
PAIRINGS = {
    "v2_v2": ((2, 1), (2, 1), 2),
    "v1client_v2server": ((1,), (2, 1), 1),
    "v2client_v1server": ((2, 1), (1,), 1),
    "v1_v1": ((1,), (1,), 1),
}


def failureOf(case: SynchronousTestCase, d: Deferred[Any]) -> HandshakeFailed:
    failure = case.failureResultOf(d, HandshakeFailed)
    value = failure.value
    assert isinstance(value, HandshakeFailed)
    return value


def authenticatedEvents(case: SynchronousTestCase) -> list[LogEvent]:
    """
    Every C{dwtrust.authenticated} event logged while C{case} runs.
    """
    events: list[LogEvent] = []

    @implementer(ILogObserver)
    def observe(event: LogEvent) -> None:
        if event.get("event") == "dwtrust.authenticated":
            events.append(event)

    globalLogPublisher.addObserver(observe)
    case.addCleanup(globalLogPublisher.removeObserver, observe)
    return events


@implementer(IApprover)
class ApproveAll:
    """
    Approves every key, remembering nothing.
    """

    def requestApproval(self, request: ApprovalRequest) -> Deferred[Decision]:
        return succeed(Decision(True, "a test approves all", "test", remember=False))


# Over loopback TCP, with the reactor.


class Echo(Protocol):
    """
    Echoes; fires C{factory.closed} entries when the connection ends.
    """

    def connectionMade(self) -> None:
        self.factory.opened.append(self)

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.factory.closed.callback(None)


class EchoFactory(Factory):
    protocol = Echo

    def __init__(self) -> None:
        self.opened: list[Echo] = []
        self.closed: Deferred[None] = Deferred()


class Pinger(Protocol):
    """
    Sends C{b"ping"} as soon as it is connected; fires C{echoed} once it has
    it back.
    """

    def __init__(self) -> None:
        self.received = b""
        self.echoed: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(b"ping")  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.received == b"ping":
            self.echoed.callback(self.received)


def _loopbackTest(
    algorithm: str, pairing: str, tls12: bool
) -> Callable[[LoopbackTests], Deferred[None]]:
    clientVersions, serverVersions, expected = PAIRINGS[pairing]

    def test(self: LoopbackTests) -> Deferred[None]:
        return Deferred.fromCoroutine(
            self.check(algorithm, clientVersions, serverVersions, expected, tls12)
        )

    test.__doc__ = (
        f"{algorithm} keys, {'TLS 1.2' if tls12 else 'TLS 1.3'}: a client"
        f" speaking {clientVersions} and a server speaking {serverVersions}"
        f" authenticate each other with version {expected}, and the first"
        " application bytes go both ways."
    )
    return test


class LoopbackTests(TestCase):
    """
    Real dwtrust ends over loopback TCP: every key type, both TLS versions,
    every pairing of versions.
    """

    async def check(
        self,
        algorithm: str,
        clientVersions: tuple[int, ...],
        serverVersions: tuple[int, ...],
        expected: int,
        tls12: bool,
    ) -> None:
        events = authenticatedEvents(self)
        server = makeIdentity("acme", "ledger", algorithm)
        client = makeIdentity("acme", "billing", algorithm)
        serverSide = Authenticator(
            server,
            ApprovalPolicy(MemoryTrustStore(), ApproveAll(), server),
            None,
            reactor,
            versions=serverVersions,
        )
        clientSide = Authenticator(
            client,
            None,
            PinningPolicy(MemoryTrustStore()),
            reactor,
            versions=clientVersions,
        )
        if tls12:
            # The client offers TLS 1.2 at most (a context option, private to
            # the test).
            clientSide._creator._context.set_max_proto_version(SSL.TLS1_2_VERSION)
        echo = EchoFactory()
        port = await serverSide.serverEndpoint(
            TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
        ).listen(echo)
        self.addCleanup(port.stopListening)
        endpoint = clientSide.clientEndpoint(
            TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port),
            "ledger.test:1",
        )
        application, handshake = await endpoint.connectHandshake(
            Factory.forProtocol(Pinger)
        )
        assert isinstance(application, Pinger)
        self.assertEqual(await application.echoed, b"ping")
        await handshake.whenTrusted()
        self.assertEqual(handshake.protocolVersion, expected)
        tls = handshake.transport.getHandle().get_protocol_version_name()
        self.assertEqual(tls, "TLSv1.2" if tls12 else "TLSv1.3")
        self.assertEqual(application.transport.peer.name, "acme/ledger")  # type: ignore[union-attr]
        [serverApp] = echo.opened
        self.assertEqual(serverApp.transport.peer.name, "acme/billing")  # type: ignore[union-attr]
        application.transport.loseConnection()  # type: ignore[union-attr]
        await handshake.whenClosed()
        await echo.closed
        self.assertEqual(
            sorted((e["peerRole"], e["protocol"]) for e in events),
            [("client", expected), ("server", expected)],
        )


for _algorithm in ALGORITHMS:
    for _pairing in PAIRINGS:
        for _tls12 in (False, True):
            setattr(
                LoopbackTests,
                f"test_{_algorithm}_{_pairing}_tls1{2 if _tls12 else 3}".replace(
                    "-", "_"
                ),
                _loopbackTest(_algorithm, _pairing, _tls12),
            )


class LoopbackRefusalTests(TestCase):
    """
    Over loopback TCP, a side that does not speak the version of its peer
    refuses it with C{version_unsupported}.
    """

    async def refused(
        self, clientVersions: tuple[int, ...], serverVersions: tuple[int, ...]
    ) -> HandshakeFailed:
        serverSide = Authenticator(
            SERVER,
            ApprovalPolicy(MemoryTrustStore(), ApproveAll(), SERVER),
            None,
            reactor,
            versions=serverVersions,
        )
        clientSide = Authenticator(
            CLIENT,
            None,
            PinningPolicy(MemoryTrustStore()),
            reactor,
            versions=clientVersions,
        )
        echo = EchoFactory()
        port = await serverSide.serverEndpoint(
            TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
        ).listen(echo)
        self.addCleanup(port.stopListening)
        endpoint = clientSide.clientEndpoint(
            TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port),
            "ledger.test:1",
        )
        try:
            await endpoint.connect(Factory.forProtocol(Pinger))
        except HandshakeFailed as e:
            self.assertEqual(echo.opened, [])
            return e
        raise AssertionError("the handshake did not fail")

    def test_v2OnlyServerRefusesV1Client(self) -> Deferred[None]:
        async def check() -> None:
            failed = await self.refused((1,), (2,))
            self.assertIs(failed.code, ErrorCode.version_unsupported)
            self.assertTrue(failed.byPeer)

        return Deferred.fromCoroutine(check())

    def test_v2OnlyClientRefusesV1Server(self) -> Deferred[None]:
        async def check() -> None:
            failed = await self.refused((2,), (1,))
            self.assertIs(failed.code, ErrorCode.version_unsupported)
            self.assertFalse(failed.byPeer)

        return Deferred.fromCoroutine(check())


# In memory: real TLS, iosim, one clock.


class CountedFrames:
    """
    Records the version and type of every frame the handshake protocols
    encode.
    """

    def __init__(self, case: SynchronousTestCase) -> None:
        self.sent: list[tuple[int, str]] = []
        encode = _protocol.encodeFrame

        def counting(frame: Frame, version: int = 1) -> bytes:
            self.sent.append((version, frame.type.name))
            return encode(frame, version)

        case.patch(_protocol, "encodeFrame", counting)


class FrameCountTests(SynchronousTestCase):
    """
    Version 2 takes two frames per connection; version 1 four.
    """

    def run_(self, clientVersions: tuple[int, ...]) -> list[tuple[int, str]]:
        clock = Clock()
        frames = CountedFrames(self)
        server = makeService(clock, SERVER)
        client = makeService(clock, CLIENT, versions=clientVersions)
        connection = connect(clock, server, client)
        [pending] = server.fakeApprover.requests
        pending.approve()
        connection.flush()
        self.successResultOf(connection.clientHandshake.whenTrusted())
        self.assertEqual(len(connection.serverApp.connected), 1)
        return frames.sent

    def test_v2TwoFrames(self) -> None:
        self.assertEqual(self.run_((2, 1)), [(2, "PROOF"), (2, "ACCEPT")])

    def test_v1FourFrames(self) -> None:
        self.assertEqual(
            self.run_((1,)),
            [(1, "HELLO"), (1, "CHALLENGE"), (1, "PROOF"), (1, "ACCEPT")],
        )


class EarlyTrustTests(SynchronousTestCase):
    """
    A version 2 client whose policy knows the server's certificate key
    connects its application at once, its bytes following its C{PROOF}; it
    delivers nothing from the server before the server's proof.  Otherwise
    it waits for C{ACCEPT}.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.server = makeService(self.clock, SERVER)
        self.client = makeService(self.clock, CLIENT)

    def connect(self, server: Service | None = None) -> Connection:
        return connect(
            self.clock,
            server if server is not None else self.server,
            self.client,
            serverApp=RecordingFactory([b"server speaks"]),
            clientApp=RecordingFactory([b"client speaks"]),
        )

    def approve(self, server: Service, connection: Connection) -> None:
        [pending] = server.fakeApprover.requests
        pending.approve()
        connection.flush()

    def pinServer(self) -> None:
        connection = self.connect()
        self.approve(self.server, connection)
        self.assertIn(SERVER_ADDRESS, self.client.store.pins)

    def test_unknownServerWaitsForAccept(self) -> None:
        """
        A server not pinned: the client application is connected only once
        the server has accepted and proved itself, and the server is pinned
        then, not before.
        """
        connection = self.connect()
        self.assertEqual(connection.clientHandshake.protocolVersion, 2)
        self.assertEqual(connection.clientApp.connected, [])
        self.assertEqual(connection.serverApp.connected, [])
        self.assertNoResult(connection.clientHandshake.whenConnected())
        self.assertEqual(self.client.store.pins, {})

        self.approve(self.server, connection)
        [clientApp] = connection.clientApp.connected
        self.assertEqual(clientApp.received, b"server speaks")
        self.assertEqual(connection.serverApp.received, b"client speaks")
        self.assertEqual(
            self.client.store.pins[SERVER_ADDRESS].fingerprint, SERVER.fingerprint
        )

    def test_pinnedServerConnectsAtOnce(self) -> None:
        """
        A pinned server: the client application is connected before
        C{ACCEPT}, and its bytes cross with the C{PROOF}; the server holds
        them until it trusts the client, and the client delivers the
        server's bytes only after its proof.
        """
        self.pinServer()
        # The same server key, now with owners who have not decided yet.
        again = makeService(self.clock, SERVER)
        connection = self.connect(again)
        [clientApp] = connection.clientApp.connected
        self.assertEqual(clientApp.transport.peer.name, "acme/ledger")
        self.assertNoResult(connection.clientHandshake.whenTrusted())
        self.assertEqual(clientApp.received, b"")
        self.assertEqual(connection.serverApp.connected, [])
        # The client's bytes are at the server already, held.
        self.assertEqual(b"".join(connection.serverHandshake._held), b"client speaks")

        self.approve(again, connection)
        self.successResultOf(connection.clientHandshake.whenTrusted())
        self.assertEqual(clientApp.received, b"server speaks")
        self.assertEqual(connection.serverApp.received, b"client speaks")

    def test_pinnedServerRefuses(self) -> None:
        """
        A pinned server that refuses the client: the early-connected
        application loses its connection with the server's code, and never
        got a byte.
        """
        self.pinServer()
        again = makeService(self.clock, SERVER)
        connection = self.connect(again)
        [pending] = again.fakeApprover.requests
        pending.deny()
        connection.flush()
        [clientApp] = connection.clientApp.protocols
        assert clientApp.lostReason is not None
        failed = clientApp.lostReason.value
        assert isinstance(failed, HandshakeFailed)
        self.assertIs(failed.code, ErrorCode.denied)
        self.assertTrue(failed.byPeer)
        self.assertEqual(clientApp.received, b"")

    def test_pinnedAddressOtherKey(self) -> None:
        """
        The address is pinned to another key: the client refuses the
        server's certificate with C{identity_changed} before its proof (an
        C{ERROR} the server reads), and no one is asked about it.
        """
        self.pinServer()
        pins = dict(self.client.store.pins)
        impostor = makeService(
            self.clock, makeIdentity("acme", "ledger", slot="impostor")
        )
        connection = self.connect(impostor)
        failed = failureOf(self, connection.clientHandshake.whenConnected())
        self.assertIs(failed.code, ErrorCode.identity_changed)
        self.assertFalse(failed.byPeer)
        serverSide = failureOf(self, connection.serverHandshake.whenConnected())
        self.assertIs(serverSide.code, ErrorCode.identity_changed)
        self.assertTrue(serverSide.byPeer)
        self.assertEqual(impostor.fakeApprover.requests, [])
        self.assertEqual(connection.clientApp.connected, [])
        self.assertEqual(self.client.store.pins, pins)

    def test_pinnedKeyOtherNames(self) -> None:
        """
        The pinned key, proving other names than the pinned ones: the client
        refuses with C{identity_changed} once it sees the server's proof,
        delivering none of the server's bytes; having sent its C{PROOF}, it
        just closes.
        """
        self.pinServer()
        pins = dict(self.client.store.pins)
        renamed = makeService(
            self.clock, makeIdentity("acme", "other", slot="acme/ledger")
        )
        connection = self.connect(renamed)
        [clientApp] = connection.clientApp.connected
        self.approve(renamed, connection)
        assert clientApp.lostReason is not None
        failed = clientApp.lostReason.value
        assert isinstance(failed, HandshakeFailed)
        self.assertIs(failed.code, ErrorCode.identity_changed)
        self.assertFalse(failed.byPeer)
        self.assertEqual(clientApp.received, b"")
        self.assertEqual(self.client.store.pins, pins)
        # No ERROR frame after PROOF: the server saw the connection close.
        [serverApp] = connection.serverApp.protocols
        assert serverApp.lostReason is not None
        self.assertNotIsInstance(serverApp.lostReason.value, HandshakeFailed)

    def test_knownElsewhere(self) -> None:
        """
        A server pinned at another address, with the names its certificate
        claims: known early (and pinned for this address too).
        """
        self.pinServer()
        again = makeService(self.clock, SERVER)
        connection = connect(
            self.clock, again, self.client, address="ledger-2.example:8443"
        )
        self.assertEqual(len(connection.clientApp.connected), 1)
        self.assertEqual(
            self.client.store.pins["ledger-2.example:8443"].fingerprint,
            SERVER.fingerprint,
        )
        self.approve(again, connection)
        self.successResultOf(connection.clientHandshake.whenTrusted())

    def test_impostorElsewhere(self) -> None:
        """
        Another key claiming the pinned names, at another address: not known
        early (the application waits), and refused with C{identity_changed}
        once it has proved those names.
        """
        self.pinServer()
        impostor = makeService(
            self.clock, makeIdentity("acme", "ledger", slot="impostor")
        )
        connection = connect(
            self.clock,
            impostor,
            self.client,
            serverApp=RecordingFactory([b"impostor speaks"]),
            address="ledger-2.example:8443",
        )
        self.assertEqual(connection.clientApp.connected, [])
        self.approve(impostor, connection)
        failed = failureOf(self, connection.clientHandshake.whenConnected())
        self.assertIs(failed.code, ErrorCode.identity_changed)
        self.assertEqual(connection.clientApp.connected, [])
        self.assertNotIn("ledger-2.example:8443", self.client.store.pins)

    def strictClient(self, expected: str | None = None) -> None:
        store = self.client.store
        self.client.authenticator = Authenticator(
            CLIENT, None, PinningPolicy(store, True, expected), self.clock
        )

    def test_strictRefusesUnknownBeforeProof(self) -> None:
        """
        A strict client refuses a server it does not know before it proves
        anything (an C{ERROR} the server reads): the server asks no one, and
        the client pins nothing.
        """
        self.strictClient()
        connection = self.connect()
        failed = failureOf(self, connection.clientHandshake.whenConnected())
        self.assertIs(failed.code, ErrorCode.denied)
        self.assertFalse(failed.byPeer)
        self.assertIn("strict", failed.message)
        serverSide = failureOf(self, connection.serverHandshake.whenConnected())
        self.assertIs(serverSide.code, ErrorCode.denied)
        self.assertTrue(serverSide.byPeer)
        self.assertEqual(self.server.fakeApprover.requests, [])
        self.assertEqual(self.client.store.pins, {})

    def test_strictAdmitsPinned(self) -> None:
        self.pinServer()
        self.strictClient()
        connection = self.connect()
        self.assertEqual(len(connection.clientApp.connected), 1)

    def test_expectedOtherService(self) -> None:
        """
        A client expecting another service does not judge a server by the
        names in its certificate (nothing proves them): it waits for the
        server's proof, then refuses the names proved, connecting nothing
        and pinning nothing.
        """
        store = self.client.store
        self.client.authenticator = Authenticator(
            CLIENT, None, PinningPolicy(store, False, "acme/other"), self.clock
        )
        connection = self.connect()
        self.assertEqual(connection.clientApp.connected, [])
        self.approve(self.server, connection)
        failed = failureOf(self, connection.clientHandshake.whenConnected())
        self.assertIs(failed.code, ErrorCode.denied)
        self.assertIn(
            "expected acme/other, but the server is acme/ledger", failed.message
        )
        self.assertEqual(connection.clientApp.connected, [])
        self.assertEqual(self.client.store.pins, {})

    def test_policyWithoutEarlyTrust(self) -> None:
        """
        A client policy that does not provide L{IEarlyTrust}: the client
        application waits for the server's C{ACCEPT}.
        """

        @implementer(ITrustPolicy)
        class TrustAll:
            def check(self, peer: PeerIdentity, source: str) -> Deferred[None]:
                return succeed(None)

        self.assertFalse(IEarlyTrust.providedBy(TrustAll()))
        self.assertTrue(IEarlyTrust.providedBy(self.client.authenticator.outbound))
        self.client.authenticator = Authenticator(CLIENT, None, TrustAll(), self.clock)
        connection = self.connect()
        self.assertEqual(connection.clientApp.connected, [])
        self.approve(self.server, connection)
        self.assertEqual(len(connection.clientApp.connected), 1)


class V2TimeoutTests(SynchronousTestCase):
    """
    Time-outs in version 2: the server's decision time-out gives C{pending};
    a client waits the decision time-out plus the handshake time-out for
    C{ACCEPT} after its C{PROOF}, then closes without an C{ERROR}.
    """

    def test_pending(self) -> None:
        clock = Clock()
        server = makeService(clock, SERVER, decisionTimeout=5)
        client = makeService(clock, CLIENT)
        connection = connect(clock, server, client)
        clock.advance(5)
        connection.flush()
        failed = failureOf(self, connection.clientHandshake.whenConnected())
        self.assertIs(failed.code, ErrorCode.pending)
        self.assertTrue(failed.byPeer)
        self.assertEqual(connection.clientApp.connected, [])

    def test_silentServer(self) -> None:
        clock = Clock()
        client = makeService(clock, CLIENT, timeout=10, decisionTimeout=30)
        server = ScriptedPeer(SERVER, versions=(2, 1))
        connection = connectScriptedServer(clock, server, client)
        [proof] = server.frames
        self.assertIsInstance(proof, ProofFrame)
        connected = connection.clientHandshake.whenConnected()
        clock.advance(39)
        connection.pump.flush()
        self.assertNoResult(connected)
        clock.advance(1)
        connection.pump.flush()
        failed = failureOf(self, connected)
        self.assertIs(failed.code, ErrorCode.timeout)
        self.assertEqual(server.frames, [proof])
        self.assertIsNotNone(server.lostReason)


class ServerBytesBeforeAcceptTests(SynchronousTestCase):
    """
    A version 2 server that sends bytes before its C{ACCEPT}: the client's
    application never sees them.
    """

    def test_bytesBeforeAccept(self) -> None:
        clock = Clock()
        client = makeService(clock, CLIENT)

        def onFrame(peer: ScriptedPeer, frame: Frame) -> None:
            if isinstance(frame, ProofFrame):
                peer.sendRaw(b"unauthenticated bytes")
                proof = makeProof(SERVER, Role.server, b"", peer.exporter, 2)
                peer.sendFrame(ProofAccept(proof))

        server = ScriptedPeer(SERVER, onFrame=onFrame, versions=(2, 1))
        connection = connectScriptedServer(
            clock, server, client, clientApp=RecordingFactory()
        )
        self.assertEqual(connection.clientApp.connected, [])
        self.assertEqual(connection.clientApp.received, b"")
        failed = failureOf(self, connection.clientHandshake.whenConnected())
        self.assertIn(
            failed.code, [ErrorCode.protocol_error, ErrorCode.version_unsupported]
        )
        self.assertFalse(failed.byPeer)
        self.assertEqual(server.errorCodes, [])
        self.assertEqual(client.store.pins, {})

    def test_honestScriptedServer(self) -> None:
        """
        The same scripted server, honest: the client accepts it (so the test
        above fails for the bytes, not the script).
        """
        clock = Clock()
        client = makeService(clock, CLIENT)

        def onFrame(peer: ScriptedPeer, frame: Frame) -> None:
            if isinstance(frame, ProofFrame):
                proof = makeProof(SERVER, Role.server, b"", peer.exporter, 2)
                peer.sendRaw(encodeFrame(ProofAccept(proof), 2) + b"hello")

        server = ScriptedPeer(SERVER, onFrame=onFrame, versions=(2, 1))
        connection = connectScriptedServer(clock, server, client)
        [app] = connection.clientApp.connected
        self.assertEqual(app.received, b"hello")


class VersionRefusalTests(SynchronousTestCase):
    """
    A side that does not speak the version negotiated refuses with
    C{version_unsupported}, in an C{ERROR} frame of version 1, and nothing is
    asked of the owners.
    """

    def check(
        self, clientVersions: tuple[int, ...], serverVersions: tuple[int, ...]
    ) -> tuple[HandshakeFailed, HandshakeFailed, Service]:
        clock = Clock()
        server = makeService(clock, SERVER, versions=serverVersions)
        client = makeService(clock, CLIENT, versions=clientVersions)
        connection = connect(clock, server, client)
        self.assertEqual(server.fakeApprover.requests, [])
        self.assertEqual(connection.clientApp.connected, [])
        self.assertEqual(connection.serverApp.connected, [])
        return (
            failureOf(self, connection.clientHandshake.whenConnected()),
            failureOf(self, connection.serverHandshake.whenConnected()),
            server,
        )

    def test_v2OnlyServer(self) -> None:
        clientSide, serverSide, _ = self.check((1,), (2,))
        self.assertIs(clientSide.code, ErrorCode.version_unsupported)
        self.assertTrue(clientSide.byPeer)
        self.assertIs(serverSide.code, ErrorCode.version_unsupported)
        self.assertFalse(serverSide.byPeer)

    def test_v2OnlyClient(self) -> None:
        clientSide, serverSide, _ = self.check((2,), (1,))
        self.assertIs(clientSide.code, ErrorCode.version_unsupported)
        self.assertFalse(clientSide.byPeer)
        self.assertIs(serverSide.code, ErrorCode.version_unsupported)
        self.assertTrue(serverSide.byPeer)

    def test_v2OnlyBoth(self) -> None:
        """
        Two sides that speak only version 2 use it.
        """
        clock = Clock()
        server = makeService(clock, SERVER, versions=(2,))
        client = makeService(clock, CLIENT, versions=(2,))
        connection = connect(clock, server, client)
        server.fakeApprover.requests[0].approve()
        connection.flush()
        self.successResultOf(connection.clientHandshake.whenTrusted())
        self.assertEqual(connection.serverHandshake.protocolVersion, 2)


class BrokenErrorTests(SynchronousTestCase):
    """
    A frame of type C{ERROR} that fails the checks is not answered, in
    either version: the server closes, sending nothing.
    """

    def check(self, versions: tuple[int, ...], frame: bytes) -> None:
        clock = Clock()
        server = makeService(clock, SERVER)
        peer = ScriptedPeer(CLIENT, onTLS=lambda p: p.sendRaw(frame), versions=versions)
        connection = connectScriptedClient(clock, server, peer)
        failed = failureOf(self, connection.serverHandshake.whenConnected())
        self.assertIs(failed.code, ErrorCode.protocol_error)
        self.assertFalse(failed.byPeer)
        self.assertEqual(peer.frames, [])
        self.assertIsNotNone(peer.lostReason)

    def brokenFrames(self, version: int) -> list[bytes]:
        return [
            # A code that is not UTF-8.
            HEADER.pack(version, FrameType.ERROR, 6) + encodeFields(b"\xff\xfe", b""),
            # One field, not two.
            HEADER.pack(version, FrameType.ERROR, 3) + encodeFields(b"x"),
            # Too long a body.
            HEADER.pack(version, FrameType.ERROR, MAX_BODY + 1),
        ]

    def test_version1(self) -> None:
        for frame in self.brokenFrames(1):
            self.check((1,), frame)

    def test_version2(self) -> None:
        for frame in self.brokenFrames(2):
            self.check((2, 1), frame)

    def test_otherFramesAnswered(self) -> None:
        """
        A broken frame of another type is answered with C{protocol_error},
        as before.
        """
        clock = Clock()
        server = makeService(clock, SERVER)
        frame = HEADER.pack(2, FrameType.PROOF, 3) + encodeFields(b"x")
        peer = ScriptedPeer(CLIENT, onTLS=lambda p: p.sendRaw(frame), versions=(2,))
        connectScriptedClient(clock, server, peer)
        self.assertEqual(peer.errorCodes, ["protocol_error"])


# The wire format of version 2.


class WireTests(SynchronousTestCase):
    def decode(self, version: int, data: bytes) -> Frame | None:
        decoder = FrameDecoder(version)
        decoder.feed(data)
        return decoder.next()

    def test_proofAcceptRoundTrip(self) -> None:
        proof = Proof("acme", "ledger", "ssh-ed25519", b"k" * 32, b"s" * 64)
        encoded = encodeFrame(ProofAccept(proof), 2)
        self.assertEqual(encoded[:2], b"\x02\x04")
        self.assertEqual(self.decode(2, encoded), ProofAccept(proof))
        # In version 1, type 4 is the empty ACCEPT.
        self.assertEqual(self.decode(1, encodeFrame(Accept())), Accept())

    def test_noHelloOrChallenge(self) -> None:
        """
        Types 1 (HELLO) and 2 (CHALLENGE) do not exist in version 2.
        """
        proof = Proof("a", "b", "c", b"k", b"s")
        for frame in [Hello(b"h" * 32), Challenge(b"c" * 32, proof)]:
            error = self.assertRaises(WireError, self.decode, 2, encodeFrame(frame, 2))
            self.assertIs(error.code, ErrorCode.protocol_error)
            self.assertTrue(error.answer)

    def test_otherVersion(self) -> None:
        """
        A version 1 frame first on a version 2 connection is
        C{version_unsupported}; after a version 2 frame, C{protocol_error}.
        """
        error = self.assertRaises(
            WireError, self.decode, 2, encodeFrame(Error("denied", "no"), 1)
        )
        self.assertIs(error.code, ErrorCode.version_unsupported)
        decoder = FrameDecoder(2)
        decoder.feed(encodeFrame(Error("denied", "no"), 2) + encodeFrame(Accept(), 1))
        self.assertEqual(decoder.next(), Error("denied", "no"))
        error = self.assertRaises(WireError, decoder.next)
        self.assertIs(error.code, ErrorCode.protocol_error)

    def test_errorCodeNotUTF8(self) -> None:
        """
        An C{ERROR} whose code is not UTF-8 is a C{protocol_error}, not
        answered; its message is still read leniently.
        """
        for version in (1, 2):
            body = encodeFields(b"\xc3(", b"")
            error = self.assertRaises(
                WireError,
                self.decode,
                version,
                HEADER.pack(version, FrameType.ERROR, len(body)) + body,
            )
            self.assertIs(error.code, ErrorCode.protocol_error)
            self.assertFalse(error.answer)
        lenient = Error.parse(encodeFields(b"denied", b"\xff"))
        self.assertEqual(lenient, Error("denied", "\ufffd"))

    def test_signedPayload(self) -> None:
        """
        Version 2's payload has eight fields, its version field is 2, and it
        has no challenge.
        """
        args = (Role.server, "acme", "ledger", "ssh-ed25519", b"key")
        payload = signedPayload(*args, b"ignored", EXPORTER, 2)
        self.assertEqual(
            decodeFields(payload, 8),
            [
                b"dwtrust-handshake-proof",
                b"\x02",
                b"server",
                b"acme",
                b"ledger",
                b"ssh-ed25519",
                b"key",
                EXPORTER,
            ],
        )
        self.assertEqual(payload, signedPayload(*args, b"", EXPORTER, 2))
        self.assertEqual(len(decodeFields(signedPayload(*args, b"c", EXPORTER), 9)), 9)

    def test_proofsBound(self) -> None:
        """
        A version 2 proof verifies only in version 2, for its role, on its
        connection.
        """
        proof = makeProof(SERVER, Role.server, b"", EXPORTER, 2)
        channel = Channel(EXPORTER, SERVER.publicKey, "TLSv1.3", 2)
        self.assertEqual(
            verifyProof(proof, Role.server, b"", channel, 2),
            PeerIdentity("acme", "ledger", SERVER.publicKey),
        )
        for role, exporter, version in [
            (Role.client, EXPORTER, 2),
            (Role.server, b"F" * 32, 2),
            (Role.server, EXPORTER, 1),
        ]:
            other = Channel(exporter, SERVER.publicKey, "TLSv1.3", version)
            error = self.assertRaises(
                ProofRejected, verifyProof, proof, role, b"", other, version
            )
            self.assertIs(error.code, ErrorCode.bad_signature)


# ALPN, on bare OpenSSL connections.


def tlsHandshake(
    client: SSL.Connection, server: SSL.Connection
) -> tuple[SSL.Connection, SSL.Connection]:
    client.set_connect_state()
    server.set_accept_state()
    for _ in range(20):
        for this, other in ((client, server), (server, client)):
            with contextlib.suppress(SSL.WantReadError):
                this.do_handshake()
            with contextlib.suppress(SSL.WantReadError):
                other.bio_write(this.bio_read(65536))
    return client, server


class ALPNTests(SynchronousTestCase):
    """
    The version is negotiated by ALPN in the TLS handshake.
    """

    def offered(self, clientVersions: tuple[int, ...]) -> list[list[bytes]]:
        """
        What a client speaking C{clientVersions} offers by ALPN (one list per
        time the server's callback ran).
        """
        offers: list[list[bytes]] = []

        def select(connection: SSL.Connection, offered: list[bytes]) -> bytes:
            offers.append(offered)
            return offered[0]

        context = makeContext(SERVER, (1,))
        context.set_alpn_select_callback(select)
        client = ConnectionCreator(CLIENT, clientVersions).clientConnectionForTLS(
            None  # type: ignore[arg-type]
        )
        tlsHandshake(client, SSL.Connection(context, None))
        return offers

    def test_offers(self) -> None:
        """
        A version 1 client offers no ALPN at all (exactly the old bytes); a
        version 2 one its versions, newest first.
        """
        self.assertEqual(self.offered((1,)), [])
        self.assertEqual(self.offered((2, 1)), [[b"dwtrust/2", b"dwtrust/1"]])
        self.assertEqual(self.offered((2,)), [[b"dwtrust/2"]])

    def negotiated(
        self, clientVersions: tuple[int, ...], serverVersions: tuple[int, ...]
    ) -> tuple[bytes, int]:
        client, server = tlsHandshake(
            ConnectionCreator(CLIENT, clientVersions).clientConnectionForTLS(None),  # type: ignore[arg-type]
            ConnectionCreator(SERVER, serverVersions).serverConnectionForTLS(None),  # type: ignore[arg-type]
        )
        self.assertEqual(
            client.get_alpn_proto_negotiated(), server.get_alpn_proto_negotiated()
        )
        self.assertEqual(channelOf(client).protocol, channelOf(server).protocol)
        return client.get_alpn_proto_negotiated(), channelOf(client).protocol

    def test_selection(self) -> None:
        self.assertEqual(self.negotiated((2, 1), (2, 1)), (ALPN_IDS[2], 2))
        self.assertEqual(self.negotiated((2, 1), (2,)), (ALPN_IDS[2], 2))
        self.assertEqual(self.negotiated((1,), (2, 1)), (b"", 1))
        self.assertEqual(self.negotiated((1,), (2,)), (b"", 1))
        self.assertEqual(self.negotiated((2, 1), (1,)), (b"", 1))
        self.assertEqual(self.negotiated((2,), (1,)), (b"", 1))
        # The server's preference wins.
        self.assertEqual(self.negotiated((2, 1), (1, 2)), (ALPN_IDS[1], 1))

    def test_noOverlap(self) -> None:
        """
        A client offering other ALPN ids only: the server selects none, and
        the handshake goes on as version 1.
        """
        client = SSL.Connection(makeContext(CLIENT), None)
        client.set_alpn_protos([b"h2", b"http/1.1"])
        server = ConnectionCreator(SERVER).serverConnectionForTLS(None)  # type: ignore[arg-type]
        tlsHandshake(client, server)
        self.assertEqual(server.get_alpn_proto_negotiated(), b"")
        self.assertEqual(channelOf(server).protocol, 1)

    def test_checkVersions(self) -> None:
        self.assertEqual(checkVersions((2, 1)), (2, 1))
        for bad in [(), (3,), (2, 2), (0, 1)]:
            self.assertRaises(ValueError, checkVersions, bad)
        self.assertRaises(
            ValueError, Authenticator, CLIENT, None, None, Clock(), versions=(3,)
        )


# The machines, driven directly.


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def __getattr__(self, name: str) -> Callable[..., None]:
        def record(*args: Any) -> None:
            self.calls.append((name, args))

        return record

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


SERVER_CHANNEL = Channel(EXPORTER, CLIENT.publicKey, "TLSv1.3", 2)
CLIENT_CHANNEL = Channel(EXPORTER, SERVER.publicKey, "TLSv1.3", 2)
CLIENT_PROOF = makeProof(CLIENT, Role.client, b"", EXPORTER, 2)
SERVER_PROOF = makeProof(SERVER, Role.server, b"", EXPORTER, 2)
LEDGER = PeerIdentity("acme", "ledger", SERVER.publicKey)


class MachineTests(SynchronousTestCase):
    def test_server(self) -> None:
        effects = Recorder()
        machine = buildServer()(Core(SERVER, effects, lambda n: b"x" * n))  # type: ignore[arg-type]
        machine.tlsReady2(SERVER_CHANNEL)
        self.assertEqual(effects.calls, [])
        machine.proof(ProofFrame(CLIENT_PROOF))
        self.assertEqual(
            effects.calls,
            [("requestDecision", (PeerIdentity("acme", "billing", CLIENT.publicKey),))],
        )
        machine.trusted()
        self.assertEqual(effects.calls[1], ("sendFrame", (ProofAccept(SERVER_PROOF),)))
        self.assertEqual(effects.names()[2:], ["connectApplication", "established"])

    def test_serverRefusesV1Proof(self) -> None:
        """
        A version 1 proof (over a challenge) does not verify on a version 2
        connection.
        """
        effects = Recorder()
        machine = buildServer()(Core(SERVER, effects, lambda n: b"x" * n))  # type: ignore[arg-type]
        machine.tlsReady2(SERVER_CHANNEL)
        machine.proof(ProofFrame(makeProof(CLIENT, Role.client, b"", EXPORTER)))
        [(name, (code, _, send, byPeer))] = effects.calls
        self.assertEqual(
            (name, code, send, byPeer), ("fail", ErrorCode.bad_signature, True, False)
        )

    def client(self) -> tuple[Any, Recorder]:
        effects = Recorder()
        machine = buildClient()(Core(CLIENT, effects, lambda n: b"x" * n))  # type: ignore[arg-type]
        machine.tlsReady2(CLIENT_CHANNEL)
        self.assertEqual(effects.calls, [("checkEarly", (CLIENT_CHANNEL,))])
        effects.calls.clear()
        return machine, effects

    def test_clientUnknown(self) -> None:
        machine, effects = self.client()
        machine.known(None)
        self.assertEqual(effects.calls, [("sendFrame", (ProofFrame(CLIENT_PROOF),))])
        machine.proofAccept(ProofAccept(SERVER_PROOF))
        self.assertEqual(effects.calls[1], ("requestDecision", (LEDGER,)))
        machine.trusted()
        self.assertEqual(
            effects.calls[2:], [("connectApplication", (LEDGER,)), ("established", ())]
        )

    def test_clientKnown(self) -> None:
        machine, effects = self.client()
        machine.known(LEDGER)
        self.assertEqual(
            effects.calls,
            [
                ("sendFrame", (ProofFrame(CLIENT_PROOF),)),
                ("connectApplication", (LEDGER,)),
            ],
        )
        machine.proofAccept(ProofAccept(SERVER_PROOF))
        self.assertEqual(effects.names()[2:], ["established"])

    def test_clientKnownOtherNames(self) -> None:
        machine, effects = self.client()
        machine.known(PeerIdentity("acme", "other", SERVER.publicKey))
        machine.proofAccept(ProofAccept(SERVER_PROOF))
        self.assertNotIn("established", effects.names())
        [(name, (code, _, send, byPeer))] = effects.calls[-1:]
        self.assertEqual(
            (name, code, send, byPeer),
            ("fail", ErrorCode.identity_changed, False, False),
        )

    def test_clientEarlyRefusal(self) -> None:
        """
        Refused before its C{PROOF}, the client sends an C{ERROR}; after it,
        none.
        """
        machine, effects = self.client()
        machine.refuse(ErrorCode.identity_changed, "changed")
        self.assertEqual(
            effects.calls,
            [
                ("cancelDecision", ()),
                ("fail", (ErrorCode.identity_changed, "changed", True, False)),
            ],
        )
        machine, effects = self.client()
        machine.known(None)
        machine.refuse(ErrorCode.protocol_error, "bad")
        self.assertEqual(
            effects.calls[-1], ("fail", (ErrorCode.protocol_error, "bad", False, False))
        )

    def test_clientOutOfOrder(self) -> None:
        """
        Every frame a version 2 client does not expect fails with
        C{protocol_error}: answered (and the early check cancelled) before
        its C{PROOF}, not after.
        """
        frames: list[tuple[str, Frame]] = [
            ("challenge", Challenge(b"c" * 32, SERVER_PROOF)),
            ("accept", Accept()),
            ("unexpected", Hello(b"h" * 32)),
            ("proofAccept", ProofAccept(SERVER_PROOF)),
        ]
        for name, frame in frames:
            machine, effects = self.client()
            getattr(machine, name)(frame)
            self.assertEqual(
                effects.calls,
                [
                    ("cancelDecision", ()),
                    (
                        "fail",
                        (ErrorCode.protocol_error, _unexpected(frame), True, False),
                    ),
                ],
                name,
            )
        for name, frame in frames[:3]:
            machine, effects = self.client()
            machine.known(None)
            effects.calls.clear()
            getattr(machine, name)(frame)
            self.assertEqual(
                effects.calls,
                [
                    (
                        "fail",
                        (ErrorCode.protocol_error, _unexpected(frame), False, False),
                    )
                ],
                name,
            )

    def test_clientReflectedProof(self) -> None:
        """
        The client's own proof sent back as the server's fails.
        """
        machine, effects = self.client()
        machine.known(None)
        reflected = makeProof(SERVER, Role.client, b"", EXPORTER, 2)
        machine.proofAccept(ProofAccept(reflected))
        [(name, (code, _, send, _))] = effects.calls[1:]
        self.assertEqual((name, code, send), ("fail", ErrorCode.bad_signature, False))


class HandshakeProtocolTests(SynchronousTestCase):
    def test_protocolVersion(self) -> None:
        """
        C{protocolVersion} is L{None} until TLS is done.
        """
        clock = Clock()
        server = makeService(clock, SERVER)
        factory = server.authenticator.wrapServerFactory(RecordingFactory())
        tls = factory.buildProtocol(None)
        assert tls is not None
        handshake = tls.wrappedProtocol  # type: ignore[attr-defined]
        assert isinstance(handshake, HandshakeProtocol)
        self.assertIsNone(handshake.protocolVersion)
