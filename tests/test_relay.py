"""
Tests for L{dwtrust._relay}, the relays' fast path: writes that leave at
once, in order, with the transport's flow control intact, and Nagle's
algorithm off; and for both relays together over loopback sockets in this
process (a plain client, a sidecar, a forwarding dwtrust server and an echo
server), where every byte must come back whole and in order.
"""

from __future__ import annotations

import datetime
import os
import socket
from collections.abc import Callable
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP4ServerEndpoint,
    connectProtocol,
)
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IAddress, IListeningPort
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import Clock, deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from dwtrust._forward import ForwardingFactory, ForwardingProtocol
from dwtrust._relay import fastWrites, noDelay
from dwtrust._sidecar import SidecarFactory, SidecarProtocol
from dwtrust.approval import AutoApprover

from .helpers import RecordingFactory, connect, makeIdentity, makeService
from .processes import DEADLINE, LOOPBACK


async def until(check: Callable[[], bool], what: str) -> None:
    """
    Wait (on the real reactor) until C{check()} is true, for at most
    L{DEADLINE} seconds.
    """
    from twisted.internet import reactor

    waited = 0.0
    while not check():
        if waited > DEADLINE:
            raise AssertionError(f"timed out waiting for {what}")
        await deferLater(reactor, 0.01)
        waited += 0.01


class Keeper(Protocol):
    """
    A server protocol that keeps its transport and what it receives.
    """

    def __init__(self, kept: list[Keeper]) -> None:
        kept.append(self)
        self.received = b""
        self.lost: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = reason


class TCPCase(TestCase):
    """
    A Twisted TCP server on loopback, and a plain (non-blocking) socket
    connected to it.
    """

    async def accepted(self) -> tuple[Keeper, socket.socket]:
        from twisted.internet import reactor

        kept: list[Keeper] = []
        port: IListeningPort = await TCP4ServerEndpoint(
            reactor, 0, interface=LOOPBACK
        ).listen(Factory.forProtocol(lambda: Keeper(kept)))
        self.addCleanup(port.stopListening)
        client = socket.create_connection((LOOPBACK, port.getHost().port))  # type: ignore[attr-defined]
        self.addCleanup(client.close)
        client.setblocking(False)
        await until(lambda: bool(kept), "the connection to be accepted")
        return kept[0], client

    def readAvailable(self, client: socket.socket) -> bytes:
        """
        What C{client} can read now, without running the reactor.
        """
        received = b""
        while True:
            try:
                chunk = client.recv(1 << 20)
            except BlockingIOError:
                return received
            if not chunk:
                return received
            received += chunk


class FastWritesTests(TCPCase):
    """
    L{fastWrites} and L{noDelay} on a Twisted TCP connection.
    """

    def test_sentAtOnce(self) -> Deferred[None]:
        """
        A write leaves in the call itself, not on the reactor's next turn:
        the peer can read it before the reactor runs again, and nothing is
        left queued in the transport.
        """

        async def run() -> None:
            server, client = await self.accepted()
            write = fastWrites(server.transport)
            write(b"hello")
            self.assertEqual(self.readAvailable(client), b"hello")
            transport: Any = server.transport
            self.assertEqual(
                (transport.dataBuffer, transport._tempDataBuffer), (b"", [])
            )

        return Deferred.fromCoroutine(run())

    def test_restQueuedInOrder(self) -> Deferred[None]:
        """
        What the socket does not take is queued by the transport, which
        pauses its producer as usual; a later write waits behind it; and
        everything arrives whole and in order.
        """

        async def run() -> None:
            server, client = await self.accepted()
            transport: Any = server.transport

            class Producer:
                paused = 0

                def pauseProducing(self) -> None:
                    self.paused += 1

                def resumeProducing(self) -> None:
                    pass

                def stopProducing(self) -> None:
                    pass

            producer = Producer()
            transport.registerProducer(producer, True)
            write = fastWrites(transport)
            big = os.urandom(16 << 20)
            write(big)
            self.assertTrue(transport._tempDataBuffer, "nothing was queued")
            self.assertEqual(producer.paused, 1)
            write(b"tail")
            self.assertEqual(transport._tempDataBuffer[-1], b"tail")
            received = bytearray()
            while len(received) < len(big) + 4:
                received += self.readAvailable(client)
                await deferLater(self._reactor(), 0)
            self.assertEqual(bytes(received), big + b"tail")

        return Deferred.fromCoroutine(run())

    def _reactor(self) -> Any:
        from twisted.internet import reactor

        return reactor

    def test_queuedWhileClosing(self) -> Deferred[None]:
        """
        Once the transport is closing, writes go through its own C{write}, so
        the bytes still go out before the end of stream.
        """

        async def run() -> None:
            server, client = await self.accepted()
            transport: Any = server.transport
            write = fastWrites(transport)
            transport.loseWriteConnection()
            write(b"last words")
            received = b""
            while not received.endswith(b"last words"):
                received += self.readAvailable(client)
                await deferLater(self._reactor(), 0.01)
            self.assertEqual(received, b"last words")

        return Deferred.fromCoroutine(run())

    def test_nothingAfterAbort(self) -> Deferred[None]:
        """
        What is written once the transport is being aborted is dropped, as
        with the transport's own C{write}: the peer gets a reset, not the
        bytes.
        """

        async def run() -> None:
            server, client = await self.accepted()
            transport: Any = server.transport
            write = fastWrites(transport)
            transport.abortConnection()
            write(b"too late")
            await until(lambda: server.lost is not None, "the abort")
            client.setblocking(True)
            client.settimeout(DEADLINE)
            with self.assertRaises(ConnectionResetError):
                self.assertEqual(client.recv(100), b"", "ended in order")

        return Deferred.fromCoroutine(run())

    def test_tlsStartedOnConnection(self) -> Deferred[None]:
        """
        A connection with TLS started on it (C{startTLS}) keeps its own
        C{write}, which encrypts: nothing goes out in clear.  (An C{ssl:}
        endpoint puts a TLS layer over the connection instead, which
        L{fastWrites} writes through.)
        """
        from twisted.internet import reactor, ssl

        async def run() -> None:
            key = ec.generate_private_key(ec.SECP256R1())
            name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
            now = datetime.datetime.now(datetime.UTC)
            certificate = (
                x509.CertificateBuilder()
                .subject_name(name)
                .issuer_name(name)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(days=1))
                .not_valid_after(now + datetime.timedelta(days=1))
                .sign(key, hashes.SHA256())
            )
            options = ssl.CertificateOptions(privateKey=key, certificate=certificate)
            kept: list[Keeper] = []

            class Starter(Keeper):
                def connectionMade(self) -> None:
                    self.transport.startTLS(options)  # type: ignore[union-attr]

            port = await TCP4ServerEndpoint(reactor, 0, interface=LOOPBACK).listen(
                Factory.forProtocol(lambda: Starter(kept))
            )
            self.addCleanup(port.stopListening)
            received: list[bytes] = []

            class Reader(Protocol):
                def connectionMade(self) -> None:
                    self.transport.startTLS(ssl.CertificateOptions(verify=False))  # type: ignore[union-attr]
                    self.transport.write(b"hello")  # type: ignore[union-attr]

                def dataReceived(self, data: bytes) -> None:
                    received.append(data)

            reader = Reader()
            await connectProtocol(
                TCP4ClientEndpoint(reactor, LOOPBACK, port.getHost().port),  # type: ignore[attr-defined]
                reader,
            )
            await until(lambda: bool(kept) and kept[0].received == b"hello", "TLS")
            [server] = kept
            transport: Any = server.transport
            await until(
                lambda: not (transport.dataBuffer or transport._tempDataBuffer),
                "the TLS handshake to be sent",
            )
            write = fastWrites(transport)
            noDelay(transport)
            write(b"secret")
            await until(lambda: bool(received), "the bytes")
            self.assertEqual(b"".join(received), b"secret")
            assert reader.transport is not None
            reader.transport.loseConnection()
            await until(lambda: server.lost is not None, "the close")

        return Deferred.fromCoroutine(run())

    def test_noDelay(self) -> Deferred[None]:
        """
        L{noDelay} turns Nagle's algorithm off on a TCP connection.
        """

        async def run() -> None:
            server, _ = await self.accepted()
            transport: Any = server.transport
            self.assertFalse(transport.getTcpNoDelay())
            noDelay(transport)
            self.assertTrue(transport.getTcpNoDelay())

        return Deferred.fromCoroutine(run())


class TLSFastWritesTests(TestCase):
    """
    L{fastWrites} on the authenticated transport of a real dwtrust
    connection (in memory).
    """

    def test_nothingReordered(self) -> None:
        """
        Bytes the TLS layer still gathers from earlier writes go first, and
        later ones are encrypted at once, without waiting for the clock.
        """
        clock = Clock()
        server = makeService(
            clock, makeIdentity("acme", "ledger"), approver=AutoApprover()
        )
        client = makeService(clock, makeIdentity("acme", "billing"))
        connection = connect(clock, server, client)
        clock.advance(0)
        connection.flush()
        [served] = connection.serverApp.connected
        [clientApp] = connection.clientApp.connected
        served.transport.write(b"gathered ")
        tls: Any = connection.serverTLS
        self.assertEqual(tls._aggregator._buffer, [b"gathered "])
        write = fastWrites(served.transport)
        write(b"then at once")
        # Nothing waits for the clock (the reactor's next turn) any more.
        self.assertEqual(tls._aggregator._buffer, [])
        served.transport.write(b"; the transport's own write too")
        self.assertEqual(tls._aggregator._buffer, [])
        connection.flush()
        self.assertEqual(
            clientApp.received,
            b"gathered then at once; the transport's own write too",
        )

    def test_abortIsACut(self) -> Deferred[None]:
        """
        Aborting an authenticated transport (as a revocation does) cuts the
        connection: the TLS layer's close_notify, which Twisted writes as it
        aborts, does not go, so the peer sees a cut, not an orderly end.
        """
        from twisted.internet import reactor

        async def run() -> None:
            server = makeService(
                reactor, makeIdentity("acme", "ledger"), approver=AutoApprover()
            )
            client = makeService(reactor, makeIdentity("acme", "billing"))
            served = RecordingFactory()
            port = await server.authenticator.serverEndpoint(
                TCP4ServerEndpoint(reactor, 0, interface=LOOPBACK)
            ).listen(served)
            self.addCleanup(port.stopListening)
            number = port.getHost().port  # type: ignore[attr-defined]
            clients = RecordingFactory()
            await client.authenticator.clientEndpoint(
                TCP4ClientEndpoint(reactor, LOOPBACK, number), f"{LOOPBACK}:{number}"
            ).connect(clients)
            await until(lambda: bool(served.connected), "the server's application")
            [application] = served.connected
            write = fastWrites(application.transport)
            write(b"last words")
            tcp = application.transport._tls.transport
            self.assertEqual(tcp._tempDataBuffer, [], "not sent at once")
            application.transport.abortConnection()
            # The close_notify is left to the abort, which drops it.
            self.assertNotEqual(tcp._tempDataBuffer, [], "close_notify was sent")
            [peer] = clients.protocols
            await until(lambda: peer.lostReason is not None, "the client to see it")
            assert peer.lostReason is not None
            self.assertFalse(
                peer.lostReason.check(ConnectionDone),
                "the abort ended the session in order",
            )

        return Deferred.fromCoroutine(run())

    def test_otherTransports(self) -> None:
        """
        A transport that is neither TCP nor TLS is left as it is.
        """
        from twisted.internet.testing import StringTransport

        transport = StringTransport()
        write = fastWrites(transport)
        noDelay(transport)
        write(b"plain")
        self.assertEqual(transport.value(), b"plain")


# Both relays, over loopback


class Echo(Protocol):
    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)


class Client(Protocol):
    """
    A plain client: sends C{data} once connected and keeps what comes back.
    """

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.received = bytearray()
        self.lost: Failure | None = None

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.data)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = reason


class Recording(Factory):
    """
    Wraps a factory, keeping the protocols it builds.
    """

    def __init__(self, factory: Factory) -> None:
        self.factory = factory
        self.built: list[Any] = []

    def buildProtocol(self, addr: IAddress) -> Any:
        protocol = self.factory.buildProtocol(addr)
        self.built.append(protocol)
        return protocol


class TwoHopsTests(TestCase):
    """
    A plain client, a sidecar, a dwtrust server forwarding to an echo
    server: the whole relay, on loopback sockets.
    """

    async def hops(self) -> tuple[Recording, Recording]:
        from twisted.internet import reactor

        async def listen(factory: Factory) -> int:
            port = await TCP4ServerEndpoint(reactor, 0, interface=LOOPBACK).listen(
                factory
            )
            self.addCleanup(port.stopListening)
            number: int = port.getHost().port  # type: ignore[attr-defined]
            return number

        echo = await listen(Factory.forProtocol(Echo))
        server = makeService(
            reactor, makeIdentity("acme", "ledger"), approver=AutoApprover()
        )
        client = makeService(reactor, makeIdentity("acme", "billing"))
        forwarding = Recording(
            ForwardingFactory([(TCP4ClientEndpoint(reactor, LOOPBACK, echo), "echo")])
        )
        port = await server.authenticator.serverEndpoint(
            TCP4ServerEndpoint(reactor, 0, interface=LOOPBACK)
        ).listen(forwarding)
        self.addCleanup(port.stopListening)
        address = f"{LOOPBACK}:{port.getHost().port}"  # type: ignore[attr-defined]
        remote = client.authenticator.clientEndpoint(
            TCP4ClientEndpoint(reactor, LOOPBACK, port.getHost().port),  # type: ignore[attr-defined]
            address,
        )
        sidecars = Recording(SidecarFactory(remote, address, reactor))
        self.sidecarPort = await listen(sidecars)
        self.clients: list[Client] = []

        async def closeAll() -> None:
            for plain in self.clients:
                if plain.transport is not None:
                    plain.transport.loseConnection()
            await until(
                lambda: (
                    all(s._closed and s._remote is None for s in sidecars.built)
                    and all(f._closed and f._localGone for f in forwarding.built)
                ),
                "every connection to close",
            )

        self.addCleanup(lambda: Deferred.fromCoroutine(closeAll()))
        return sidecars, forwarding

    async def exchange(self, data: bytes) -> Client:
        from twisted.internet import reactor

        plain = Client(data)
        self.clients.append(plain)
        await connectProtocol(
            TCP4ClientEndpoint(reactor, LOOPBACK, self.sidecarPort), plain
        )
        await until(lambda: len(plain.received) >= len(data), "the echo")
        return plain

    def test_wholeAndInOrder(self) -> Deferred[None]:
        """
        Small and large messages, one after another on one connection and on
        several connections at once, come back whole and in order.
        """

        async def run() -> None:
            await self.hops()
            for size in (1, 100, 70_000, 4 << 20):
                data = os.urandom(size)
                plain = await self.exchange(data)
                self.assertEqual(bytes(plain.received), data)
                assert plain.transport is not None
                plain.transport.loseConnection()
            many = [os.urandom(1 << 20) for _ in range(4)]
            plains = [await self.exchange(b"") for _ in many]
            for plain, data in zip(plains, many, strict=True):
                plain.data = data
                assert plain.transport is not None
                plain.transport.write(data)
            await until(
                lambda: all(
                    len(p.received) >= len(d) for p, d in zip(plains, many, strict=True)
                ),
                "every echo",
            )
            for plain, data in zip(plains, many, strict=True):
                self.assertEqual(bytes(plain.received), data)

        return Deferred.fromCoroutine(run())

    def test_noDelayEverywhere(self) -> Deferred[None]:
        """
        Nagle's algorithm is off on all four sockets of the relays: the
        sidecar's local and remote ones, and the forwarder's remote (under
        TLS) and local ones.
        """

        async def run() -> None:
            sidecars, forwarding = await self.hops()
            await self.exchange(b"ping")
            [sidecar] = sidecars.built
            [forwarder] = forwarding.built
            assert isinstance(sidecar, SidecarProtocol)
            assert isinstance(forwarder, ForwardingProtocol)
            sockets = {
                "sidecar local": sidecar.transport,
                "sidecar remote": sidecar._remote._tls.transport,  # type: ignore[union-attr]
                "forwarder remote": forwarder.transport._tls.transport,
                "forwarder local": forwarder._local,
            }
            self.assertEqual(
                {name: t.getTcpNoDelay() for name, t in sockets.items()},
                dict.fromkeys(sockets, True),
            )

        return Deferred.fromCoroutine(run())
