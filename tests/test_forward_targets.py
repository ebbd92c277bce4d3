"""
Tests for L{dwtrust._forward} with several application endpoints: each
connection goes to the next endpoint in turn, and on to the following one
when that cannot be reached.
"""

from __future__ import annotations

from typing import cast

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import (
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
)
from twisted.internet.testing import (
    EventLoggingObserver,
    StringTransportWithDisconnection,
)
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from dwtrust._forward import ForwardingFactory, ForwardingProtocol

PEER = IPv4Address("TCP", "10.1.2.3", 40000)
LOCAL = IPv4Address("TCP", "127.0.0.1", 8080)


@implementer(IStreamClientEndpoint)
class ImmediateEndpoint:
    """
    An endpoint whose every connection attempt succeeds or fails at once.

    @ivar connections: the local side of each connection made.
    @ivar attempts: how many connections were attempted.
    """

    def __init__(self, reachable: bool) -> None:
        self.reachable = reachable
        self.attempts = 0
        self.connections: list[StringTransportWithDisconnection] = []

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        self.attempts += 1
        if not self.reachable:
            return fail(ConnectionRefusedError("connection refused"))
        protocol = protocolFactory.buildProtocol(LOCAL)
        assert protocol is not None
        transport = StringTransportWithDisconnection(peerAddress=LOCAL)
        transport.protocol = protocol
        protocol.makeConnection(transport)
        self.connections.append(transport)
        return succeed(protocol)


class ForwardingCase(SynchronousTestCase):
    """
    Records the log events, and connects authenticated peers.
    """

    def setUp(self) -> None:
        self.events = EventLoggingObserver()
        globalLogPublisher.addObserver(self.events)
        self.addCleanup(globalLogPublisher.removeObserver, self.events)

    def failures(self) -> list[str]:
        return [
            str(e["target"])
            for e in self.events
            if e.get("event") == "dwtrust.forward.failed"
        ]

    def accept(
        self, factory: ForwardingFactory
    ) -> tuple[ForwardingProtocol, StringTransportWithDisconnection]:
        """
        Connect an authenticated peer (an in-memory transport) to C{factory}.
        """
        protocol = cast(ForwardingProtocol, factory.buildProtocol(PEER))
        peer = StringTransportWithDisconnection(peerAddress=PEER)
        peer.protocol = protocol
        protocol.makeConnection(peer)
        return protocol, peer


class ForwardingTargetsTests(ForwardingCase):
    """
    L{ForwardingFactory} with several endpoints that answer at once.
    """

    def test_noTargets(self) -> None:
        self.assertRaises(ValueError, ForwardingFactory, [])

    def test_inTurnRoundRobin(self) -> None:
        """
        L{ForwardingFactory.inTurn} starts with each endpoint in turn, then
        starts again, and lists the others after it in order.
        """
        a, b, c = (ImmediateEndpoint(True) for _ in range(3))
        factory = ForwardingFactory([(a, "a"), (b, "b"), (c, "c")])
        self.assertEqual(
            [factory.inTurn()[0][1] for _ in range(7)],
            ["a", "b", "c", "a", "b", "c", "a"],
        )
        turn = factory.inTurn()
        self.assertIs(turn[0][0], b)
        self.assertEqual([name for _, name in turn], ["b", "c", "a"])

    def test_connectionsInTurn(self) -> None:
        """
        Successive connections go to each endpoint in turn, and the bytes of
        each reach its own endpoint.
        """
        a, b = ImmediateEndpoint(True), ImmediateEndpoint(True)
        factory = ForwardingFactory([(a, "a"), (b, "b")])
        for i in range(4):
            protocol, _ = self.accept(factory)
            protocol.dataReceived(b"%d" % i)
        self.assertEqual([t.value() for t in a.connections], [b"0", b"2"])
        self.assertEqual([t.value() for t in b.connections], [b"1", b"3"])
        self.assertEqual(self.failures(), [])

    def test_failover(self) -> None:
        """
        When the endpoint whose turn it is cannot be reached, the connection
        goes to the next; the failure is logged, naming that endpoint, and
        the bytes kept meanwhile reach the next endpoint.
        """
        down, up = ImmediateEndpoint(False), ImmediateEndpoint(True)
        factory = ForwardingFactory([(down, "down"), (up, "up")])
        protocol = cast(ForwardingProtocol, factory.buildProtocol(PEER))
        peer = StringTransportWithDisconnection(peerAddress=PEER)
        peer.protocol = protocol
        protocol.makeConnection(peer)
        protocol.dataReceived(b"hello")
        self.assertEqual((down.attempts, up.attempts), (1, 1))
        [local] = up.connections
        self.assertEqual(local.value(), b"hello")
        self.assertTrue(peer.connected)
        self.assertEqual(peer.producerState, "producing")
        self.assertEqual(self.failures(), ["down"])
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_failoverWrapsAround(self) -> None:
        """
        Failing over starts from the endpoint whose turn it is and wraps
        around the list.
        """
        up, down = ImmediateEndpoint(True), ImmediateEndpoint(False)
        factory = ForwardingFactory([(up, "up"), (down, "down")])
        self.accept(factory)
        self.accept(factory)
        self.assertEqual((up.attempts, down.attempts), (2, 1))
        self.assertEqual(len(up.connections), 2)
        self.assertEqual(self.failures(), ["down"])

    def test_allFail(self) -> None:
        """
        When no endpoint can be reached, each is tried once, each failure is
        logged, and the authenticated connection is closed.
        """
        endpoints = [ImmediateEndpoint(False) for _ in range(3)]
        factory = ForwardingFactory([(e, f"app{i}") for i, e in enumerate(endpoints)])
        factory.inTurn()
        protocol, peer = self.accept(factory)
        protocol.dataReceived(b"lost")
        self.assertEqual([e.attempts for e in endpoints], [1, 1, 1])
        self.assertFalse(peer.connected)
        self.assertEqual(self.failures(), ["app1", "app2", "app0"])
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_peerGoneStopsFailover(self) -> None:
        """
        If the peer goes away while an endpoint is being tried, no other
        endpoint is tried.
        """
        pending: list[Deferred[IProtocol]] = []

        @implementer(IStreamClientEndpoint)
        class Slow:
            attempts = 0

            def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
                Slow.attempts += 1
                d: Deferred[IProtocol] = Deferred()
                pending.append(d)
                return d

        other = ImmediateEndpoint(True)
        factory = ForwardingFactory([(Slow(), "slow"), (other, "other")])
        _, peer = self.accept(factory)
        peer.loseConnection()
        self.assertEqual((Slow.attempts, other.attempts), (1, 0))
        self.assertEqual(self.failures(), [])


@implementer(IStreamClientEndpoint)
class HeldEndpoint:
    """
    An endpoint whose connection attempts wait until the test fails them.
    """

    def __init__(self) -> None:
        self.attempts: list[Deferred[IProtocol]] = []

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        attempt: Deferred[IProtocol] = Deferred()
        self.attempts.append(attempt)
        return attempt

    def refuse(self, index: int) -> None:
        self.attempts[index].errback(ConnectionRefusedError("connection refused"))


class ConcurrentFailoverTests(ForwardingCase):
    """
    Failing over while other connections are being made.
    """

    def test_failoverWhileOthersConnect(self) -> None:
        """
        A connection whose endpoint fails while another connection is being
        made still tries every other endpoint, not the one that failed.
        """
        a, b = HeldEndpoint(), HeldEndpoint()
        factory = ForwardingFactory([(a, "a"), (b, "b")])
        _, first = self.accept(factory)
        self.accept(factory)
        self.assertEqual((len(a.attempts), len(b.attempts)), (1, 1))
        a.refuse(0)
        self.assertEqual(
            (len(a.attempts), len(b.attempts)), (1, 2), "the failover goes to b"
        )
        self.assertTrue(first.connected)
