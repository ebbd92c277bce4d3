"""
A refused peer that does not close is cut off after 2 s.

When dwtrust refuses a peer after the TLS handshake, it sends an C{ERROR}
frame and closes TLS: it sends its C{close_notify} and waits for the peer's.
A peer that stops reading never answers, and would hold the connection (a
descriptor, TLS buffers) for as long as it likes; so the connection is
aborted 2 s after the refusal.  These tests play such a peer, over real TLS in
memory with a L{Clock}, on each side of the handshake: its transport stops
reading as soon as its own TLS handshake is over, as a client that stops
calling C{recv} does.

The client sidecar has its own cut-off, on the plain side: when its remote
connection ends (refused, say), it half-closes the local client's connection
and aborts it 2 s later if that client has not closed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
)
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.test.iosim import IOPump, connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from dwtrust._proof import makeProof
from dwtrust._protocol import HandshakeFailed, HandshakeProtocol
from dwtrust._sidecar import SidecarFactory
from dwtrust._wire import Challenge, ErrorCode, Frame, Hello, Role

from .helpers import (
    SERVER_ADDRESS,
    PausableTransport,
    RecordingFactory,
    ScriptedPeer,
    makeIdentity,
    makeService,
)

#: The cut-off that C{docs/security.rst} promises, in seconds.
CUT_OFF = 2.0
#: A little time, well under the cut-off.
EPSILON = 0.1


def pausable(isServer: bool) -> Callable[[Any], PausableTransport]:
    """
    A transport factory for a peer that will stop reading when it pauses.
    """
    return lambda protocol: PausableTransport(protocol, isServer)


def stopReading(peer: ScriptedPeer) -> None:
    """
    Stop C{peer}'s transport reading: whatever comes next, C{close_notify}
    included, is left unread.
    """
    raw = peer.transport.transport
    assert isinstance(raw, PausableTransport), raw
    raw.pauseProducing()


class CutOffTests(SynchronousTestCase):
    """
    The end that refuses aborts a connection whose peer does not answer its
    close within 2 s.
    """

    def setUp(self) -> None:
        self.clock = Clock()

    def assertCutOff(
        self, pump: IOPump, ownTLS: TLSMemoryBIOProtocol, peer: ScriptedPeer
    ) -> None:
        """
        C{ownTLS}, the refusing end, has sent its refusal and closed TLS; its
        connection stays open while the peer is silent, until 2 s after the
        refusal, when it is aborted.
        """
        raw = ownTLS.transport
        self.assertTrue(ownTLS.disconnecting, "the refusing end did not close TLS")
        self.assertFalse(raw.disconnecting, "the peer answered the close")
        self.clock.advance(CUT_OFF - EPSILON)
        pump.flush()
        self.assertFalse(raw.disconnecting, "cut off before 2 s")
        self.assertIsNone(peer.lostReason)
        self.clock.advance(EPSILON)
        pump.flush()
        self.assertTrue(
            raw.disconnected,
            f"the connection of a silent refused peer is still open after"
            f" {CUT_OFF:g} s",
        )
        self.assertIsNotNone(peer.lostReason)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_refusedClient(self) -> None:
        """
        A server that refuses a client (here for a first frame that is not
        dwtrust at all) aborts the connection 2 s later if the client does
        not answer its close.
        """
        server = makeService(self.clock, makeIdentity("acme", "ledger"))

        def onTLS(peer: ScriptedPeer) -> None:
            peer.sendRaw(b"GET / HTTP/1.1\r\n\r\n")
            stopReading(peer)

        attacker = ScriptedPeer(makeIdentity("evil", "mallory"), onTLS=onTLS)
        serverApp = RecordingFactory()
        serverTLS = server.authenticator.wrapServerFactory(serverApp).buildProtocol(
            None
        )
        assert isinstance(serverTLS, TLSMemoryBIOProtocol)
        handshake = serverTLS.wrappedProtocol
        assert isinstance(handshake, HandshakeProtocol)
        _, _, pump = connectedServerAndClient(
            lambda: serverTLS,
            lambda: attacker.tls(True, self.clock),
            clientTransportFactory=pausable(False),
            greet=False,
            clock=self.clock,
        )
        outcome = handshake.whenConnected()
        pump.flush()
        self.assertCutOff(pump, serverTLS, attacker)
        failure = self.failureResultOf(outcome, HandshakeFailed)
        self.assertIs(failure.value.code, ErrorCode.version_unsupported)
        self.assertFalse(failure.value.byPeer)
        self.assertEqual(serverApp.connected, [])

    def test_refusedServer(self) -> None:
        """
        A client that refuses a server (here for a proof that does not
        verify) aborts the connection 2 s later if the server does not answer
        its close.
        """
        client = makeService(self.clock, makeIdentity("acme", "billing"))

        def onFrame(peer: ScriptedPeer, frame: Frame) -> None:
            if isinstance(frame, Hello):
                # Its own key's proof, but for another connection.
                proof = makeProof(
                    peer.identity, Role.server, frame.challenge, bytes(32)
                )
                peer.sendFrame(Challenge(peer.challenge, proof))
                stopReading(peer)

        attacker = ScriptedPeer(makeIdentity("evil", "mallory"), onFrame=onFrame)
        clientApp = RecordingFactory()
        clientTLS = client.authenticator.wrapClientFactory(
            clientApp, SERVER_ADDRESS
        ).buildProtocol(None)
        assert isinstance(clientTLS, TLSMemoryBIOProtocol)
        handshake = clientTLS.wrappedProtocol
        assert isinstance(handshake, HandshakeProtocol)
        _, _, pump = connectedServerAndClient(
            lambda: attacker.tls(False, self.clock),
            lambda: clientTLS,
            serverTransportFactory=pausable(True),
            greet=False,
            clock=self.clock,
        )
        outcome = handshake.whenConnected()
        pump.flush()
        self.assertCutOff(pump, clientTLS, attacker)
        failure = self.failureResultOf(outcome, HandshakeFailed)
        self.assertIs(failure.value.code, ErrorCode.bad_signature)
        self.assertFalse(failure.value.byPeer)
        self.assertEqual(clientApp.connected, [])


class HalfClosingTransport(StringTransport):
    """
    A local TCP connection, as the sidecar sees it: it can be half-closed,
    and records being aborted.
    """

    def __init__(self) -> None:
        super().__init__(peerAddress=IPv4Address("TCP", "127.0.0.1", 50000))
        self.halfClosed = False
        self.aborted = False

    def loseWriteConnection(self) -> None:
        self.halfClosed = True

    def abortConnection(self) -> None:
        self.aborted = True
        self.disconnecting = True


@implementer(IStreamClientEndpoint)
class RefusingRemote:
    """
    The sidecar's dwtrust endpoint to its remote, whose connection attempts
    the test refuses.
    """

    def __init__(self) -> None:
        self.attempts: list[Deferred[IProtocol]] = []

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        attempt: Deferred[IProtocol] = Deferred()
        self.attempts.append(attempt)
        return attempt


class SidecarCutOffTests(SynchronousTestCase):
    """
    The client sidecar aborts a local connection that does not close within
    2 s of the end of its remote connection.
    """

    def test_refusedLocalClientCutOff(self) -> None:
        """
        When the remote refuses the sidecar, the local client's connection is
        half-closed at once, and aborted 2 s later if the client, still
        sending, has not closed it.
        """
        clock = Clock()
        remote = RefusingRemote()
        factory = SidecarFactory(remote, "ledger.example:7443", clock)
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000))
        assert protocol is not None
        local = HalfClosingTransport()
        protocol.makeConnection(local)
        [attempt] = remote.attempts
        attempt.errback(
            Failure(HandshakeFailed(ErrorCode.denied, "not approved", True))
        )
        self.assertTrue(local.halfClosed)
        self.assertFalse(local.aborted)
        clock.advance(CUT_OFF - EPSILON)
        protocol.dataReceived(b"still talking")
        self.assertFalse(local.aborted, "cut off before 2 s")
        clock.advance(EPSILON)
        self.assertTrue(
            local.aborted,
            f"the local connection is still open {CUT_OFF:g} s after the refusal",
        )
        self.assertEqual(local.value(), b"")
        self.assertEqual(clock.getDelayedCalls(), [])
