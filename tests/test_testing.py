"""
Tests for L{dwtrust.testing}, the fakes users test their own code with.
"""

from __future__ import annotations

from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from dwtrust import IAuthenticatedTransport, Identity
from dwtrust.testing import (
    FakeApprover,
    MemoryTrustStore,
    connectInMemory,
    memoryAuthenticator,
)


class Echo(Protocol):
    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)


class Hello(Protocol):
    received = b""

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(b"hello")

    def dataReceived(self, data: bytes) -> None:
        self.received += data


class ConnectInMemoryTests(SynchronousTestCase):
    """
    L{connectInMemory} hands back the user's own protocols.
    """

    def test_returnsTheFactoriesProtocols(self) -> None:
        """
        It returns the protocols the client's and the server's factories
        built, not the TLS protocols around them: the server's is connected,
        with an authenticated transport, once its approver lets the client
        in.
        """
        clock = Clock()
        approver = FakeApprover()
        server = memoryAuthenticator(
            Identity.generate("acme", "ledger"), MemoryTrustStore(), approver, clock
        )
        client = memoryAuthenticator(
            Identity.generate("acme", "billing"),
            MemoryTrustStore(),
            FakeApprover(),
            clock,
        )
        hello, echo, pump = connectInMemory(
            server, Factory.forProtocol(Echo), client, Factory.forProtocol(Hello), clock
        )
        assert isinstance(hello, Hello) and isinstance(echo, Echo)
        self.assertIsNone(echo.transport)
        self.assertEqual(hello.received, b"")

        approver.requests[0].approve()
        pump.flush()
        self.assertTrue(IAuthenticatedTransport.providedBy(echo.transport))
        self.assertEqual(hello.received, b"hello")
