"""
Helpers shared by the test modules.

- A cache of key pairs, so that RSA key generation happens once per key and
  not once per test.
- Recording application protocols, to see exactly when (and whether) an
  application is connected and every byte it is given.
- L{Service} and L{connect}: two real dwtrust ends in memory (iosim, real TLS,
  one shared L{Clock}).
- The attacker's toolkit: L{ScriptedPeer}, a raw protocol over real TLS that
  sends whatever frames (or bytes) a test scripts and records what comes
  back, and L{Relay}, a man in the middle holding two TLS sessions.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

from attrs import define
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IAddress, IHandshakeListener
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import Clock
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.test.iosim import (
    FakeTransport,
    IOPump,
    connectedServerAndClient,
    makeFakeServer,
)
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from dwtrust import Authenticator, Identity
from dwtrust._identity import SHORT_NAMES, PrivateKey
from dwtrust._policy import ApprovalPolicy, PinningPolicy
from dwtrust._proof import makeProof
from dwtrust._protocol import HandshakeProtocol
from dwtrust._tls import Channel, ConnectionCreator, channelOf
from dwtrust._wire import (
    Challenge,
    Error,
    Frame,
    FrameDecoder,
    Hello,
    Proof,
    ProofFrame,
    Role,
    WireError,
    encodeFrame,
)
from dwtrust._wrap import DEFAULT_DECISION_TIMEOUT, DEFAULT_TIMEOUT
from dwtrust.approval import IApprover
from dwtrust.store import KeyRecord, Pin
from dwtrust.testing import FakeApprover, MemoryTrustStore

#: Every algorithm a service may generate, by its command-line name.
ALGORITHMS = ("ed25519", "ecdsa-p256", "ecdsa-p384", "rsa-3072")

#: The address the client dials, under which it pins the server.
SERVER_ADDRESS = "server.example:8443"

#: Where in-memory connections come from (the same as dwtrust.testing's).
PEER_ADDRESS = IPv4Address("TCP", "127.0.0.1", 40000)

_KEYS: dict[tuple[str, str], PrivateKey] = {}


def privateKey(algorithm: str, slot: str) -> PrivateKey:
    """
    A private key for C{algorithm}, made once per C{(algorithm, slot)} for
    the whole test run.
    """
    key = _KEYS.get((algorithm, slot))
    if key is None:
        key = _KEYS[(algorithm, slot)] = SHORT_NAMES[algorithm].generate()
    return key


def makeIdentity(
    org: str = "acme",
    service: str = "billing",
    algorithm: str = "ed25519",
    slot: str | None = None,
) -> Identity:
    """
    An identity with a cached key.  Different names get different keys; pass
    C{slot} to give one name another key (or two names the same one).
    """
    key = privateKey(algorithm, slot if slot is not None else f"{org}/{service}")
    return Identity.fromPrivateKey(org, service, key)


def temporaryDirectory(case: SynchronousTestCase) -> FilePath[str]:
    """
    A new, empty directory, removed when C{case} ends.  (Trial's C{mktemp} is
    relative to the working directory, which under pytest is the checkout.)
    """
    path = tempfile.mkdtemp(prefix="dwtrust-test-")
    case.addCleanup(shutil.rmtree, path, ignore_errors=True)
    return FilePath(path)


# Applications


class RecordingProtocol(Protocol):
    """
    An application protocol that records what it is told, and writes its
    factory's greeting when it is connected.
    """

    transport: Any

    def __init__(self, factory: RecordingFactory) -> None:
        self.factory = factory
        self.connected = False
        self.chunks: list[bytes] = []
        self.lostReason: Failure | None = None
        self.peer: Any = None

    def connectionMade(self) -> None:
        self.connected = True
        self.peer = self.transport.peer
        if self.factory.onConnect is not None:
            self.factory.onConnect(self)
        for chunk in self.factory.greeting:
            self.transport.write(chunk)

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lostReason = reason

    @property
    def received(self) -> bytes:
        return b"".join(self.chunks)


class RecordingFactory(Factory):
    """
    Builds L{RecordingProtocol}s and keeps every one.

    @ivar greeting: chunks each protocol writes as soon as it is connected.
    @ivar onConnect: called with each protocol in its C{connectionMade}.
    """

    def __init__(
        self,
        greeting: list[bytes] | None = None,
        onConnect: Callable[[RecordingProtocol], None] | None = None,
    ) -> None:
        self.greeting = greeting or []
        self.onConnect = onConnect
        self.protocols: list[RecordingProtocol] = []

    def buildProtocol(self, addr: IAddress | None) -> RecordingProtocol:
        protocol = RecordingProtocol(self)
        self.protocols.append(protocol)
        return protocol

    @property
    def connected(self) -> list[RecordingProtocol]:
        return [p for p in self.protocols if p.connected]

    @property
    def received(self) -> bytes:
        return b"".join(p.received for p in self.protocols)


# Real dwtrust ends


@define
class Service:
    """
    One dwtrust end: an identity, its in-memory stores, its approver and the
    L{Authenticator} over them.
    """

    identity: Identity
    store: MemoryTrustStore
    approver: IApprover
    authenticator: Authenticator

    @property
    def fakeApprover(self) -> FakeApprover:
        assert isinstance(self.approver, FakeApprover)
        return self.approver


def makeService(
    clock: Clock,
    identity: Identity,
    approver: IApprover | None = None,
    store: MemoryTrustStore | None = None,
    strict: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
    decisionTimeout: float = DEFAULT_DECISION_TIMEOUT,
    versions: tuple[int, ...] = (2, 1),
) -> Service:
    if store is None:
        store = MemoryTrustStore(now=clock.seconds)
    if approver is None:
        approver = FakeApprover()
    authenticator = Authenticator(
        identity,
        ApprovalPolicy(store, approver, identity),
        PinningPolicy(store, strict),
        clock,
        timeout,
        decisionTimeout,
        versions=versions,
    )
    return Service(identity, store, approver, authenticator)


def snapshot(store: MemoryTrustStore) -> tuple[dict[str, KeyRecord], dict[str, Pin]]:
    """
    A copy of everything C{store} holds (its records are frozen).
    """
    return dict(store.peers), dict(store.pins)


@define
class Connection:
    """
    Two real dwtrust ends joined in memory.
    """

    clientTLS: TLSMemoryBIOProtocol
    serverTLS: TLSMemoryBIOProtocol
    pump: IOPump
    clientApp: RecordingFactory
    serverApp: RecordingFactory
    clientHandshake: HandshakeProtocol
    serverHandshake: HandshakeProtocol

    def flush(self) -> None:
        self.pump.flush()


def connect(
    clock: Clock,
    server: Service,
    client: Service,
    serverApp: RecordingFactory | None = None,
    clientApp: RecordingFactory | None = None,
    address: str = SERVER_ADDRESS,
    serverTransportFactory: Callable[[Any], FakeTransport] = makeFakeServer,
) -> Connection:
    """
    Connect C{client} to C{server} in memory, as
    L{dwtrust.testing.connectInMemory} does, and run the exchange until it is
    quiet; but keep hold of both handshake protocols (TLS lets go of them
    when the connection is lost), and let the server have another transport.
    """
    serverApp = serverApp if serverApp is not None else RecordingFactory()
    clientApp = clientApp if clientApp is not None else RecordingFactory()
    serverTLS = server.authenticator.wrapServerFactory(serverApp).buildProtocol(
        PEER_ADDRESS
    )
    clientTLS = client.authenticator.wrapClientFactory(
        clientApp, address
    ).buildProtocol(PEER_ADDRESS)
    assert isinstance(clientTLS, TLSMemoryBIOProtocol)
    assert isinstance(serverTLS, TLSMemoryBIOProtocol)
    clientHandshake = clientTLS.wrappedProtocol
    serverHandshake = serverTLS.wrappedProtocol
    assert isinstance(clientHandshake, HandshakeProtocol)
    assert isinstance(serverHandshake, HandshakeProtocol)
    _, _, pump = connectedServerAndClient(
        lambda: serverTLS,
        lambda: clientTLS,
        serverTransportFactory=serverTransportFactory,
        greet=False,
        clock=clock,
    )
    pump.flush()
    return Connection(
        clientTLS,
        serverTLS,
        pump,
        clientApp,
        serverApp,
        clientHandshake,
        serverHandshake,
    )


class PausableTransport(FakeTransport):
    """
    An iosim transport that stops reading while it is paused, as a TCP
    transport does, and hands the protocol what it reads in pieces of at most
    C{readSize} bytes.

    @ivar events: C{"pause"} and C{"resume"}, in the order they happened.
    """

    readSize = 16 * 1024

    def __init__(self, protocol: Any, isServer: bool) -> None:
        super().__init__(protocol, isServer)
        self.paused = False
        self.backlog = bytearray()
        self.events: list[str] = []

    def bufferReceived(self, buf: Any) -> None:
        if not isinstance(buf, bytes):
            super().bufferReceived(buf)
            return
        self.backlog += buf
        self._read()

    def _read(self) -> None:
        while self.backlog and not self.paused and not self.disconnected:
            piece = bytes(self.backlog[: self.readSize])
            del self.backlog[: self.readSize]
            self.protocol.dataReceived(piece)

    def pauseProducing(self) -> None:
        self.events.append("pause")
        self.paused = True

    def resumeProducing(self) -> None:
        self.events.append("resume")
        self.paused = False
        self._read()


# The attacker's toolkit


class _OneProtocol(Factory):
    def __init__(self, protocol: Protocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        return self._protocol


@implementer(IHandshakeListener)
class ScriptedPeer(Protocol):
    """
    The raw end of a dwtrust connection, over real TLS made with
    C{identity}'s key, doing exactly what a test scripts: C{onTLS} runs when
    the TLS handshake is over, and C{onFrame} for each frame received.
    It offers the dwtrust C{versions} by ALPN (by default version 1 only,
    with no ALPN, as a peer written before version 2), and speaks in frames
    of the version negotiated.

    @ivar frames: every frame received, in order.
    @ivar decodeError: the first undecodable bytes received, if any.
    @ivar lostReason: why the connection closed, once it has.
    """

    transport: TLSMemoryBIOProtocol

    def __init__(
        self,
        identity: Identity,
        onTLS: Callable[[ScriptedPeer], None] | None = None,
        onFrame: Callable[[ScriptedPeer, Frame], None] | None = None,
        challenge: bytes | None = None,
        versions: tuple[int, ...] = (1,),
    ) -> None:
        self.identity = identity
        self.versions = versions
        self.onTLS = onTLS
        self.onFrame = onFrame
        self.challenge = challenge if challenge is not None else os.urandom(32)
        self.channel: Channel | None = None
        self.frames: list[Frame] = []
        self.sent: list[bytes] = []
        self.decodeError: WireError | None = None
        self.lostReason: Failure | None = None
        self._decoder = FrameDecoder()

    def handshakeCompleted(self) -> None:
        self.channel = channelOf(self.transport.getHandle())
        if self.channel.protocol != 1:
            self._decoder = FrameDecoder(self.channel.protocol)
        if self.onTLS is not None:
            self.onTLS(self)

    def dataReceived(self, data: bytes) -> None:
        self._decoder.feed(data)
        while self.decodeError is None:
            try:
                frame = self._decoder.next()
            except WireError as e:
                self.decodeError = e
                return
            if frame is None:
                return
            self.frames.append(frame)
            if self.onFrame is not None:
                self.onFrame(self, frame)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lostReason = reason

    @property
    def exporter(self) -> bytes:
        assert self.channel is not None, "the TLS handshake is not over"
        return self.channel.exporter

    @property
    def errorCodes(self) -> list[str]:
        """
        The codes of the C{ERROR} frames received.
        """
        return [f.code for f in self.frames if isinstance(f, Error)]

    def sendFrame(self, frame: Frame) -> None:
        version = self.channel.protocol if self.channel is not None else 1
        self.sendRaw(encodeFrame(frame, version))

    def sendRaw(self, data: bytes) -> None:
        self.sent.append(data)
        self.transport.write(data)

    def tls(self, isClient: bool, clock: Clock) -> TLSMemoryBIOProtocol:
        """
        This peer under TLS, ready to be joined to the other end.
        """
        factory = TLSMemoryBIOFactory(
            ConnectionCreator(self.identity, self.versions),
            isClient,
            _OneProtocol(self),
            clock=clock,
        )
        protocol = factory.buildProtocol(PEER_ADDRESS)
        assert isinstance(protocol, TLSMemoryBIOProtocol)
        return protocol


def sendHello(peer: ScriptedPeer) -> None:
    """
    An C{onTLS} script: send C{HELLO} with the peer's challenge.
    """
    peer.sendFrame(Hello(peer.challenge))


def honestProof(peer: ScriptedPeer, frame: Challenge) -> Proof:
    """
    The proof an honest client makes on this connection.
    """
    return makeProof(peer.identity, Role.client, frame.challenge, peer.exporter)


def answerChallenge(
    makeClientProof: Callable[[ScriptedPeer, Challenge], Proof] = honestProof,
    after: bytes = b"",
) -> Callable[[ScriptedPeer, Frame], None]:
    """
    An C{onFrame} script: answer C{CHALLENGE} with a C{PROOF} frame carrying
    the proof C{makeClientProof} makes, followed by C{after} in the same write.
    """

    def onFrame(peer: ScriptedPeer, frame: Frame) -> None:
        if isinstance(frame, Challenge):
            peer.sendRaw(encodeFrame(ProofFrame(makeClientProof(peer, frame))) + after)

    return onFrame


@define
class ScriptedClientConnection:
    """
    A scripted client joined to a real dwtrust server.
    """

    attacker: ScriptedPeer
    serverTLS: TLSMemoryBIOProtocol
    pump: IOPump
    serverApp: RecordingFactory
    serverHandshake: HandshakeProtocol


def connectScriptedClient(
    clock: Clock,
    server: Service,
    attacker: ScriptedPeer,
    serverApp: RecordingFactory | None = None,
) -> ScriptedClientConnection:
    """
    Connect a scripted client to a real dwtrust server over real TLS, and run
    the exchange until it is quiet.
    """
    serverApp = serverApp if serverApp is not None else RecordingFactory()
    wrapped = server.authenticator.wrapServerFactory(serverApp)
    serverTLS = wrapped.buildProtocol(PEER_ADDRESS)
    assert isinstance(serverTLS, TLSMemoryBIOProtocol)
    handshake = serverTLS.wrappedProtocol
    assert isinstance(handshake, HandshakeProtocol)
    _, _, pump = connectedServerAndClient(
        lambda: serverTLS,
        lambda: attacker.tls(True, clock),
        greet=False,
        clock=clock,
    )
    pump.flush()
    return ScriptedClientConnection(attacker, serverTLS, pump, serverApp, handshake)


@define
class ScriptedServerConnection:
    """
    A real dwtrust client joined to a scripted server.
    """

    attacker: ScriptedPeer
    clientTLS: TLSMemoryBIOProtocol
    pump: IOPump
    clientApp: RecordingFactory
    clientHandshake: HandshakeProtocol


def connectScriptedServer(
    clock: Clock,
    attacker: ScriptedPeer,
    client: Service,
    clientApp: RecordingFactory | None = None,
    address: str = SERVER_ADDRESS,
) -> ScriptedServerConnection:
    """
    Connect a real dwtrust client to a scripted server over real TLS, and run
    the exchange until it is quiet.
    """
    clientApp = clientApp if clientApp is not None else RecordingFactory()
    wrapped = client.authenticator.wrapClientFactory(clientApp, address)
    clientTLS = wrapped.buildProtocol(PEER_ADDRESS)
    assert isinstance(clientTLS, TLSMemoryBIOProtocol)
    handshake = clientTLS.wrappedProtocol
    assert isinstance(handshake, HandshakeProtocol)
    _, _, pump = connectedServerAndClient(
        lambda: attacker.tls(False, clock),
        lambda: clientTLS,
        greet=False,
        clock=clock,
    )
    pump.flush()
    return ScriptedServerConnection(attacker, clientTLS, pump, clientApp, handshake)


def flushAll(*pumps: IOPump) -> None:
    """
    Pump several connections until none of them moves a byte.
    """
    for _ in range(1000):
        if not any([pump.flush() for pump in pumps]):
            return
    raise AssertionError("the connections never went quiet")


class Relay:
    """
    A man in the middle holding two TLS sessions, both with its own
    certificate: as a server to the victim client (C{towardClient}) and as a
    client to the real server (C{towardServer}).  It passes the handshake
    frames on, each way, after C{rewrite} (by default, unchanged).
    """

    def __init__(
        self,
        identity: Identity,
        rewriteForClient: Callable[[Relay, Frame], Frame] | None = None,
    ) -> None:
        self.identity = identity
        self.rewriteForClient = rewriteForClient
        self.towardClient = ScriptedPeer(identity, onFrame=self._fromClient)
        self.towardServer = ScriptedPeer(identity, onFrame=self._fromServer)
        self.helloFromClient: Hello | None = None

    def _fromClient(self, peer: ScriptedPeer, frame: Frame) -> None:
        if isinstance(frame, Hello):
            self.helloFromClient = frame
        if self.towardServer.lostReason is None:
            self.towardServer.sendFrame(frame)

    def _fromServer(self, peer: ScriptedPeer, frame: Frame) -> None:
        if self.rewriteForClient is not None:
            frame = self.rewriteForClient(self, frame)
        if self.towardClient.lostReason is None:
            self.towardClient.sendFrame(frame)
