"""
Tests for the client sidecar, C{twistd dwtrust --connect LOCAL=REMOTE}: its
options, the daemon it builds, and real processes, where a plain TCP client
(a Python socket, no dwtrust code) reaches a service behind a remote dwtrust
daemon through a sidecar daemon with its own identity.

Everything runs on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP4ServerEndpoint,
    connectProtocol,
)
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import (
    EventLoggingObserver,
    StringTransportWithDisconnection,
)
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from dwtrust import ErrorCode, HandshakeFailed, ServerEndpoint
from dwtrust._forward import ForwardingFactory
from dwtrust._sidecar import Mapping, SidecarFactory, SidecarProtocol
from dwtrust.approval import AutoApprover
from dwtrust.tap import Options, makeService

from .helpers import RecordingFactory, makeIdentity
from .helpers import makeService as dwtrustEnd
from .processes import (
    DEADLINE,
    LOOPBACK,
    STORE,
    Daemon,
    EchoServer,
    keygen,
    refusing_port,
    wait_for,
)
from .test_e2e import pins
from .test_tap import running, stopIfRunning, temporaryDirectory

HELLO = b"hello\n"


def parse(*argv: str) -> Options:
    options = Options()
    options.parseOptions(list(argv))
    return options


# Options


def test_connectSplitsAtLastEquals() -> None:
    """
    C{--connect LOCAL=REMOTE} splits at the last C{=}, so a local endpoint
    description keeps its own; C{HOST:PORT} becomes a TCP description, and the
    pin name is the remote as given.
    """
    options = parse("--connect", "tcp:7000:interface=127.0.0.1=ledger.example:7443")
    assert options["connect"] == [
        Mapping(
            "tcp:7000:interface=127.0.0.1",
            "ledger.example:7443",
            "tcp:host=ledger.example:port=7443",
        )
    ]


def test_connectRepeatable() -> None:
    """
    C{--connect} may be given several times, kept in order; an IPv6 remote is
    written C{[ADDRESS]:PORT}, and any other remote is taken to be a client
    endpoint description.
    """
    options = parse(
        "--connect",
        "tcp:7000=127.0.0.1:7443",
        "--connect",
        "unix:/tmp/app.sock=[::1]:8443",
        "--connect",
        "tcp:7001=unix:/run/ledger.sock",
    )
    assert [(m.local, m.remote, m.remoteDescription) for m in options["connect"]] == [
        ("tcp:7000", "127.0.0.1:7443", "tcp:host=127.0.0.1:port=7443"),
        ("unix:/tmp/app.sock", "[::1]:8443", r"tcp:host=\:\:1:port=8443"),
        ("tcp:7001", "unix:/run/ledger.sock", "unix:/run/ledger.sock"),
    ]


@pytest.mark.parametrize("bad", ["tcp:7000", "=127.0.0.1:7443", "tcp:7000="])
def test_connectMalformed(bad: str) -> None:
    """
    A C{--connect} without both sides is a usage error that says what is
    expected.
    """
    with pytest.raises(UsageError, match="LOCAL_ENDPOINT=REMOTE_HOST:PORT"):
        parse("--connect", bad)


def test_listenDefaults() -> None:
    """
    Without C{--connect} the daemon listens on C{tcp:7443} as always; with
    C{--connect} it listens only if C{--listen} is given.
    """
    assert parse()["listen"] == "tcp:7443"
    assert parse("--connect", "tcp:7000=127.0.0.1:7443")["listen"] is None
    both = parse("--connect", "tcp:7000=127.0.0.1:7443", "--listen", "tcp:7444")
    assert both["listen"] == "tcp:7444"


@pytest.mark.parametrize(
    ("mapping", "message"),
    [
        ("bogus:1=127.0.0.1:7443", "bad local endpoint 'bogus:1'"),
        ("tcp:notaport=127.0.0.1:7443", "bad local endpoint"),
        ("tcp:7000=bogus:thing", "bad remote 'bogus:thing'"),
        # The split is at the last '=': a remote cannot hold one.
        ("tcp:7000=tcp:host=127.0.0.1:port=7443", "bad local endpoint"),
    ],
)
def test_connectBadEndpoint(tmp_path: Path, mapping: str, message: str) -> None:
    """
    A side of C{--connect} that is not an endpoint description ends twistd
    with a one-line message (no traceback), before anything is created.
    """
    identity = tmp_path / "identity"
    with pytest.raises(SystemExit) as raised:
        makeService(parse("--identity", str(identity), "--connect", mapping))
    text = str(raised.value)
    assert text.startswith("twistd dwtrust: error: --connect: "), text
    assert message in text, text
    assert "\n" not in text
    assert not identity.exists()


class ServiceTests(TestCase):
    """
    The daemon L{makeService} builds with C{--connect}.
    """

    def setUp(self) -> None:
        self.directory = temporaryDirectory(self).child("identity")

    async def make(self, *argv: str) -> list[Any]:
        await running()
        service = makeService(parse("--identity", self.directory.path, *argv))
        self.addCleanup(stopIfRunning, service)
        service.startService()
        return list(service)  # type: ignore[call-overload]

    def test_sidecarOnly(self) -> Deferred[None]:
        """
        With C{--connect} and no C{--listen}, the daemon has no dwtrust
        listener: only the local sidecar ports, the owners' control channel
        and the expiry timer.
        """

        async def run() -> None:
            children = await self.make(
                "--connect",
                f"tcp:0:interface={LOOPBACK}=127.0.0.1:7443",
                "--connect",
                f"tcp:0:interface={LOOPBACK}=127.0.0.1:7444",
            )
            # and the service manager's part (readiness, SIGHUP).
            self.assertEqual(len(children), 5)
            first, second, control, expiry, _ = children
            for sidecar, remote in [
                (first, "127.0.0.1:7443"),
                (second, "127.0.0.1:7444"),
            ]:
                self.assertIsInstance(sidecar, StreamServerEndpointService)
                self.assertNotIsInstance(sidecar.endpoint, ServerEndpoint)
                self.assertIsInstance(sidecar.factory, SidecarFactory)
                self.assertEqual(sidecar.factory.remoteName, remote)
            self.assertIsInstance(control.endpoint, ServerEndpoint)
            self.assertIsInstance(expiry, TimerService)
            self.assertFalse(
                any(isinstance(c.factory, ForwardingFactory) for c in children[:3])
            )

        return Deferred.fromCoroutine(run())

    def test_listenAndConnect(self) -> Deferred[None]:
        """
        With both C{--listen} and C{--connect}, the daemon does both.
        """

        async def run() -> None:
            children = await self.make(
                "--listen",
                f"tcp:0:interface={LOOPBACK}",
                "--connect",
                f"tcp:0:interface={LOOPBACK}=127.0.0.1:7443",
            )
            self.assertEqual(len(children), 5)
            port, sidecar = children[:2]
            self.assertIsInstance(port.factory, ForwardingFactory)
            self.assertIsInstance(sidecar.factory, SidecarFactory)

        return Deferred.fromCoroutine(run())


# The relay, over in-memory transports

CLIENT = IPv4Address("TCP", "127.0.0.1", 50000)
REMOTE = IPv4Address("TCP", "10.1.2.3", 7443)


class RemoteTransport(StringTransportWithDisconnection):
    """
    The authenticated transport of a remote connection, whose acceptance the
    test decides (L{trusted}).
    """

    def __init__(self) -> None:
        super().__init__(peerAddress=REMOTE)
        self.trusted: Deferred[None] = Deferred()

    def whenTrusted(self) -> Deferred[None]:
        return self.trusted


@implementer(IStreamClientEndpoint)
class FakeRemote:
    """
    A dwtrust client endpoint whose connection attempts the test completes.
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

    def succeed(self) -> RemoteTransport:
        """
        The server proved itself: connect the application, then fire.
        """
        factory, attempt = self.attempts[-1]
        protocol = factory.buildProtocol(REMOTE)
        assert protocol is not None
        transport = RemoteTransport()
        transport.protocol = protocol
        protocol.makeConnection(transport)
        attempt.callback(protocol)
        return transport


class SidecarProtocolTests(SynchronousTestCase):
    """
    L{SidecarProtocol}: one local connection, relayed to a remote peer.
    """

    def setUp(self) -> None:
        self.events = EventLoggingObserver()
        globalLogPublisher.addObserver(self.events)
        self.addCleanup(globalLogPublisher.removeObserver, self.events)
        self.remote = FakeRemote()
        self.clock = Clock()
        factory = SidecarFactory(self.remote, "ledger.example:7443", self.clock)
        protocol = factory.buildProtocol(CLIENT)
        assert isinstance(protocol, SidecarProtocol)
        self.protocol = protocol
        self.local = StringTransportWithDisconnection(peerAddress=CLIENT)
        self.local.protocol = protocol
        protocol.makeConnection(self.local)

    def test_localBytesWaitForTrust(self) -> None:
        """
        The local connection is paused and one attempt is made; bytes it sends
        meanwhile go nowhere until the remote accepts us, then go first, in
        order, and reading resumes.
        """
        self.assertEqual(len(self.remote.attempts), 1)
        self.assertEqual(self.local.producerState, "paused")
        self.protocol.dataReceived(b"first ")
        remote = self.remote.succeed()
        self.protocol.dataReceived(b"second ")
        self.assertEqual(remote.value(), b"")
        self.assertEqual(self.local.producerState, "paused")
        remote.trusted.callback(None)
        self.assertEqual(remote.value(), b"first second ")
        self.assertEqual(self.local.producerState, "producing")
        self.protocol.dataReceived(b"third")
        self.assertEqual(remote.value(), b"first second third")
        assert remote.protocol is not None
        remote.protocol.dataReceived(b"answer")
        self.assertEqual(self.local.value(), b"answer")
        self.assertIs(self.local.producer, remote)
        self.assertIs(remote.producer, self.local)

    def test_refusedAfterProof(self) -> None:
        """
        A remote that refuses us after proving itself closes the local
        connection, with nothing sent to it, and logs the refusal.
        """
        self.protocol.dataReceived(b"secret")
        remote = self.remote.succeed()
        refusal = HandshakeFailed(ErrorCode.denied, "not approved", True)
        remote.trusted.errback(Failure(refusal))
        remote.connected = False
        assert remote.protocol is not None
        remote.protocol.connectionLost(Failure(refusal))
        self.assertEqual(remote.value(), b"")
        self.assertFalse(self.local.connected)
        [event] = [
            e for e in self.events if e.get("event") == "dwtrust.sidecar.refused"
        ]
        self.assertEqual(
            (event["code"], event["byPeer"], event["local"], event["remote"]),
            ("denied", True, "127.0.0.1:50000", "ledger.example:7443"),
        )

    def test_refusedBeforeProof(self) -> None:
        """
        A connection attempt that fails with L{HandshakeFailed} is a refusal;
        any other failure is C{dwtrust.sidecar.failed}.  Both close the local
        connection.
        """
        refusal = HandshakeFailed(ErrorCode.identity_changed, "changed", False)
        self.remote.attempts[-1][1].errback(Failure(refusal))
        self.assertFalse(self.local.connected)
        [event] = [
            e for e in self.events if e.get("event") == "dwtrust.sidecar.refused"
        ]
        self.assertEqual((event["code"], event["byPeer"]), ("identity_changed", False))

    def test_localClosesWhileConnecting(self) -> None:
        """
        A local connection that ends while the remote is being dialled cancels
        the attempt, and logs nothing.
        """
        self.local.loseConnection()
        self.assertEqual(self.remote.cancelled, 1)
        self.assertEqual(
            [e for e in self.events if str(e.get("event", "")).startswith("dwtrust.")],
            [],
        )

    def test_localClosesRemote(self) -> None:
        """
        Either side closing closes the other.
        """
        remote = self.remote.succeed()
        remote.trusted.callback(None)
        self.local.loseConnection()
        self.assertFalse(remote.connected)


# Real sockets, in this process


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


class PlainClient(Protocol):
    """
    A plain TCP client of the sidecar: sends C{request} once connected, and
    keeps what it receives.
    """

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.received = b""
        self.lost: Failure | None = None

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = reason


class RealSocketTests(TestCase):
    """
    A sidecar on loopback sockets, between a plain client and a dwtrust
    server (both in this process).
    """

    async def relay(self, greeting: bytes) -> tuple[PlainClient, RecordingFactory]:
        """
        Start a dwtrust server whose application writes C{greeting} once
        connected, and a sidecar in front of it; connect a plain client that
        sends C{HELLO}, and wait until each end has the other's bytes.
        """
        from twisted.internet import reactor

        server = dwtrustEnd(
            reactor, makeIdentity("acme", "ledger"), approver=AutoApprover()
        )
        client = dwtrustEnd(reactor, makeIdentity("acme", "billing"))
        application = RecordingFactory(greeting=[greeting])
        port = await server.authenticator.serverEndpoint(
            TCP4ServerEndpoint(reactor, 0, interface=LOOPBACK)
        ).listen(application)
        self.addCleanup(port.stopListening)
        address = f"{LOOPBACK}:{port.getHost().port}"
        sidecar = SidecarFactory(
            client.authenticator.clientEndpoint(
                TCP4ClientEndpoint(reactor, LOOPBACK, port.getHost().port), address
            ),
            address,
            reactor,
        )
        local = await TCP4ServerEndpoint(reactor, 0, interface=LOOPBACK).listen(sidecar)
        self.addCleanup(local.stopListening)
        plain = PlainClient(HELLO)
        await connectProtocol(
            TCP4ClientEndpoint(reactor, LOOPBACK, local.getHost().port), plain
        )
        await until(
            lambda: application.received == HELLO and plain.received == greeting,
            "the bytes of both ends to go through",
        )
        return plain, application

    def test_localClosesFirst(self) -> Deferred[None]:
        """
        When the local client closes first, the sidecar ends the TLS session
        cleanly (C{close_notify}): the remote application sees an orderly
        end, not a connection cut off.
        """

        async def run() -> None:
            plain, application = await self.relay(b"welcome\n")
            assert plain.transport is not None
            plain.transport.loseConnection()
            [served] = application.protocols
            await until(lambda: served.lostReason is not None, "the remote to end")
            assert served.lostReason is not None
            self.assertTrue(
                served.lostReason.check(ConnectionDone),
                f"the TLS session was not closed cleanly: {served.lostReason}",
            )

        return Deferred.fromCoroutine(run())

    def test_remoteClosesFirst(self) -> Deferred[None]:
        """
        When the remote application closes first, the local client reads
        everything it sent, then an orderly end.
        """

        async def run() -> None:
            big = os.urandom(1 << 20)
            plain, application = await self.relay(big)
            [served] = application.protocols
            served.transport.loseConnection()
            await until(lambda: plain.lost is not None, "the local client to end")
            assert plain.lost is not None
            self.assertEqual(plain.received, big)
            self.assertTrue(plain.lost.check(ConnectionDone), str(plain.lost))

        return Deferred.fromCoroutine(run())


# Real processes


def exchange(port: int, data: bytes) -> bytes:
    """
    Connect to 127.0.0.1:C{port} with a plain socket, send C{data} (from a
    thread, so that a large echo cannot dead-lock), and read until the
    connection ends or as many bytes came back.
    """
    with socket.create_connection((LOOPBACK, port), timeout=DEADLINE) as client:
        sender = threading.Thread(target=client.sendall, args=(data,), daemon=True)
        sender.start()
        received = bytearray()
        while len(received) < len(data):
            chunk = client.recv(1 << 16)
            if not chunk:
                break
            received += chunk
        sender.join(DEADLINE)
        return bytes(received)


def audited(path: Path) -> list[dict[str, Any]]:
    """
    The audit log's events.
    """
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def test_plainClientThroughSidecar(tmp_path: Path) -> None:
    """
    A plain TCP client reaches the echo server behind a remote daemon through
    a sidecar-only daemon, which authenticates with its own identity and pins
    the remote's key under the address given.  Large transfers go through
    whole.  The sidecar does not listen for dwtrust peers.
    """
    ledger, billing = tmp_path / "ledger", tmp_path / "billing"
    ledgerKey = keygen(ledger, "acme", "ledger")
    billingKey = keygen(billing, "acme", "billing")
    with (
        EchoServer(tmp_path / "echo") as echo,
        Daemon(
            tmp_path / "remote",
            "--identity",
            str(ledger),
            "--forward",
            echo.forward,
            "--approver",
            "auto",
        ) as remote,
        Daemon(
            tmp_path / "sidecar",
            "--identity",
            str(billing),
            "--connect",
            f"tcp:0:interface={LOOPBACK}={remote.address}",
            listen=False,
        ) as sidecar,
    ):
        local = sidecar.port_of("SidecarFactory")
        assert exchange(local, HELLO) == HELLO
        big = os.urandom(4 << 20)
        assert exchange(local, big) == big
        remote.wait_for_log(
            rf"authenticated client acme/billing {re.escape(billingKey)}"
        )
        log = sidecar.log()
    assert pins(billing / STORE) == {remote.address: ledgerKey}
    assert f"client sidecar tcp:0:interface={LOOPBACK} -> {remote.address}" in log
    assert "not listening for dwtrust peers" in log
    assert "listening on" not in log
    assert echo.received() == {1: len(HELLO), 2: len(big)}


def test_refusalClosesLocal(tmp_path: Path) -> None:
    """
    When the remote refuses the sidecar's key, the plain client's connection
    is closed (an end of stream, nothing echoed), the echo server gets
    nothing, and the sidecar's audit log has the refusal with its code.
    """
    ledger, billing = tmp_path / "ledger", tmp_path / "billing"
    keygen(ledger, "acme", "ledger")
    keygen(billing, "acme", "billing")
    audit = tmp_path / "sidecar-audit.jsonl"
    with (
        EchoServer(tmp_path / "echo") as echo,
        Daemon(
            tmp_path / "remote",
            "--identity",
            str(ledger),
            "--forward",
            echo.forward,
            "--approver",
            "known-only",
        ) as remote,
        Daemon(
            tmp_path / "sidecar",
            "--identity",
            str(billing),
            "--connect",
            f"tcp:0:interface={LOOPBACK}={remote.address}",
            "--audit-log",
            str(audit),
            listen=False,
        ) as sidecar,
    ):
        local = sidecar.port_of("SidecarFactory")
        with socket.create_connection((LOOPBACK, local), timeout=DEADLINE) as client:
            client.sendall(HELLO)
            assert client.recv(1024) == b""
        remote.wait_for_log(r"failed \(by us\): denied")

        def refused() -> dict[str, Any] | None:
            for event in audited(audit):
                if event.get("event") == "dwtrust.sidecar.refused":
                    return event
            return None

        event = wait_for(refused, "the refusal in the sidecar's audit log")
    assert event["code"] == "denied", event
    assert event["byPeer"] is True, event
    assert event["remote"] == remote.address, event
    assert event["local"].startswith(f"{LOOPBACK}:"), event
    assert echo.connections() == 0


def test_remoteDown(tmp_path: Path) -> None:
    """
    When the remote cannot be reached, the plain client's connection is
    closed and the sidecar logs C{dwtrust.sidecar.failed}.
    """
    billing = tmp_path / "billing"
    keygen(billing, "acme", "billing")
    audit = tmp_path / "sidecar-audit.jsonl"
    with (
        refusing_port() as nowhere,
        Daemon(
            tmp_path / "sidecar",
            "--identity",
            str(billing),
            "--connect",
            f"tcp:0:interface={LOOPBACK}={LOOPBACK}:{nowhere}",
            "--audit-log",
            str(audit),
            listen=False,
        ) as sidecar,
    ):
        local = sidecar.port_of("SidecarFactory")
        with socket.create_connection((LOOPBACK, local), timeout=DEADLINE) as client:
            client.sendall(HELLO)
            assert client.recv(1024) == b""
        failed = wait_for(
            lambda: [
                e for e in audited(audit) if e.get("event") == "dwtrust.sidecar.failed"
            ],
            "the failure in the sidecar's audit log",
        )
    assert failed[0]["remote"] == f"{LOOPBACK}:{nowhere}"
