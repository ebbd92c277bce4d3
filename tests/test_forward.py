"""
Tests for L{dwtrust._forward}: the daemon's relay from an authenticated
connection to the local application, over in-memory transports and an
endpoint whose connection attempt the test completes or fails.
"""

from __future__ import annotations

from typing import cast

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.interfaces import (
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
)
from twisted.internet.testing import (
    EventLoggingObserver,
    StringTransportWithDisconnection,
)
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from dwtrust._forward import ForwardingFactory, ForwardingProtocol
from dwtrust._identity import PeerIdentity

from .helpers import makeIdentity

TARGET = "tcp:host=127.0.0.1:port=8080"
PEER = IPv4Address("TCP", "10.1.2.3", 40000)
LOCAL = IPv4Address("TCP", "127.0.0.1", 8080)


@implementer(IStreamClientEndpoint)
class FakeEndpoint:
    """
    An endpoint whose connection attempts the test completes (L{succeed}) or
    fails (L{fail}).

    @ivar attempts: the factory of each attempt, with its L{Deferred}.
    @ivar cancelled: how many attempts were cancelled.
    """

    def __init__(self) -> None:
        self.attempts: list[tuple[IProtocolFactory, Deferred[IProtocol]]] = []
        self.cancelled = 0

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        def cancel(d: Deferred[IProtocol]) -> None:
            self.cancelled += 1

        attempt: Deferred[IProtocol] = Deferred(cancel)
        self.attempts.append((protocolFactory, attempt))
        return attempt

    def succeed(self) -> StringTransportWithDisconnection:
        """
        Complete the latest attempt as a real endpoint does: build the
        protocol, connect it to a transport, then fire.

        @return: the local application's side of the transport.
        """
        factory, attempt = self.attempts[-1]
        protocol = factory.buildProtocol(LOCAL)
        assert protocol is not None
        transport = StringTransportWithDisconnection(peerAddress=LOCAL)
        transport.protocol = protocol
        protocol.makeConnection(transport)
        attempt.callback(protocol)
        return transport

    def fail(self) -> None:
        self.attempts[-1][1].errback(ConnectionRefusedError("connection refused"))


def observe(case: SynchronousTestCase) -> EventLoggingObserver:
    """
    Record every log event until C{case} ends.
    """
    observer = EventLoggingObserver()
    globalLogPublisher.addObserver(observer)
    case.addCleanup(globalLogPublisher.removeObserver, observer)
    return observer


class ForwardingProtocolTests(SynchronousTestCase):
    """
    L{ForwardingProtocol}.
    """

    events: EventLoggingObserver
    endpoint: FakeEndpoint
    protocol: ForwardingProtocol
    peer: StringTransportWithDisconnection

    def setUp(self) -> None:
        self.events = observe(self)
        self.endpoint = FakeEndpoint()
        factory = ForwardingFactory([(self.endpoint, TARGET)])
        self.protocol = cast(ForwardingProtocol, factory.buildProtocol(PEER))
        self.assertIsInstance(self.protocol, ForwardingProtocol)
        self.peer = StringTransportWithDisconnection(peerAddress=PEER)
        self.peer.protocol = self.protocol
        self.protocol.makeConnection(self.peer)

    def errors(self) -> list[dict[str, object]]:
        return [dict(e) for e in self.events if e["log_level"] >= LogLevel.error]

    def test_dialsOnConnect(self) -> None:
        """
        An authenticated connection starts one connection attempt to the
        local application, and pauses the peer meanwhile.
        """
        self.assertEqual(len(self.endpoint.attempts), 1)
        self.assertEqual(self.peer.producerState, "paused")

    def test_bytesBeforeLocalKeptInOrder(self) -> None:
        """
        Bytes from the peer before the local connection is up are kept, then
        written to it, in order, once it is; later bytes follow them.
        """
        self.protocol.dataReceived(b"first ")
        self.protocol.dataReceived(b"second ")
        self.protocol.dataReceived(b"third ")
        local = self.endpoint.succeed()
        self.assertEqual(local.value(), b"first second third ")
        self.protocol.dataReceived(b"fourth")
        self.assertEqual(local.value(), b"first second third fourth")

    def test_nothingWrittenBeforeLocal(self) -> None:
        """
        Nothing goes anywhere while the local connection is being made.
        """
        self.protocol.dataReceived(b"early")
        self.assertEqual(self.peer.value(), b"")
        self.assertTrue(self.peer.connected)

    def test_pausedUntilLocal(self) -> None:
        """
        The peer is paused until the local connection is up, then resumed;
        each side is then registered as the other's producer, so that either
        stops reading when the other cannot keep up.
        """
        self.assertEqual(self.peer.producerState, "paused")
        local = self.endpoint.succeed()
        self.assertEqual(self.peer.producerState, "producing")
        self.assertIs(local.producer, self.peer)
        self.assertIs(self.peer.producer, local)
        self.assertTrue(local.streaming)
        self.assertTrue(self.peer.streaming)

    def test_localToPeer(self) -> None:
        """
        Bytes from the local application go to the peer.
        """
        local = self.endpoint.succeed()
        local.protocol.dataReceived(b"reply")
        self.assertEqual(self.peer.value(), b"reply")

    def test_localConnectFails(self) -> None:
        """
        If the local application cannot be reached, the peer connection is
        closed, and an error event names the target, with no traceback.
        """
        self.protocol.dataReceived(b"lost")
        self.endpoint.fail()
        self.assertFalse(self.peer.connected)
        [error] = self.errors()
        self.assertEqual(error["event"], "dwtrust.forward.failed")
        self.assertEqual(error["target"], TARGET)
        self.assertIn("connection refused", str(error["error"]))
        self.assertNotIn("log_failure", error)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_peerGoneWhileConnecting(self) -> None:
        """
        If the peer goes away while the local connection is being made, the
        attempt is cancelled, quietly.
        """
        self.protocol.dataReceived(b"never delivered")
        self.peer.loseConnection()
        self.assertEqual(self.endpoint.cancelled, 1)
        self.assertEqual(self.errors(), [])
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_localClosesPeer(self) -> None:
        """
        When the local application closes its side, the peer is closed.
        """
        local = self.endpoint.succeed()
        self.assertTrue(self.peer.connected)
        local.loseConnection()
        self.assertFalse(self.peer.connected)
        self.assertEqual(self.errors(), [])

    def test_peerClosesLocal(self) -> None:
        """
        When the peer closes its side, the local connection is closed.
        """
        local = self.endpoint.succeed()
        self.assertTrue(local.connected)
        self.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertFalse(local.connected)
        self.assertEqual(self.errors(), [])


class BeforeAcceptTests(SynchronousTestCase):
    """
    L{ForwardingProtocol} behind a dwtrust server, which reaches the
    application before it accepts the peer (L{ForwardingProtocol.beforeAccept}).
    """

    def test_applicationBytesWaitForPeer(self) -> None:
        """
        The local connection, made before the peer is accepted, is paused
        until the peer is connected: what the application sends first (a
        greeting) waits in its socket, then reaches the peer; the peer's
        bytes reach the application.
        """
        endpoint = FakeEndpoint()
        factory = ForwardingFactory([(endpoint, TARGET)])
        protocol = cast(ForwardingProtocol, factory.buildProtocol(PEER))
        client = makeIdentity("acme", "billing")
        ready = protocol.beforeAccept(PeerIdentity("acme", "billing", client.publicKey))
        self.assertNoResult(ready)
        local = endpoint.succeed()
        self.successResultOf(ready)
        self.assertEqual(local.producerState, "paused")
        peer = StringTransportWithDisconnection(peerAddress=PEER)
        peer.protocol = protocol
        protocol.makeConnection(peer)
        self.assertEqual(local.producerState, "producing")
        assert local.protocol is not None
        local.protocol.dataReceived(b"greeting")
        self.assertEqual(peer.value(), b"greeting")
        protocol.dataReceived(b"hello")
        self.assertEqual(local.value(), b"hello")
