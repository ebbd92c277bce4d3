"""
The handshake rows of the attack table (C{docs/security.rst}, "Attacks and
the tests that show them refused") played again in protocol version 2, over
real loopback TCP and real TLS: a real dwtrust server (or client) in this
process, on the reactor, and a raw attacker in a thread, built from the
specification with pyOpenSSL and C{cryptography} (L{tests.independent}), that
sends whatever bytes a test scripts.

Each refusal must carry the right error code, store nothing, ask no one, and
never connect (or feed) the application.

Stripping or altering the ALPN offer is not played: ALPN is part of the TLS
transcript that both Finished messages authenticate, so a man in the middle
who changes it breaks the TLS handshake itself.  What is played instead: a
version 2-only side refuses version 1, and a proof of one version is worthless
in the other.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable
from typing import Any

from attrs import define, field
from OpenSSL import SSL
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IAddress
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from dwtrust import ErrorCode, HandshakeFailed, Identity, PeerIdentity
from dwtrust._policy import ApprovalPolicy, PinningPolicy
from dwtrust._protocol import HandshakeProtocol
from dwtrust._wrap import Authenticator
from dwtrust.approval import KnownOnlyApprover
from dwtrust.store import KeyState
from dwtrust.testing import FakeApprover, MemoryTrustStore, recordDecision

from . import independent as raw
from .helpers import RecordingFactory, RecordingProtocol, privateKey, snapshot

#: What a version 2 client offers by ALPN.
OFFER_V2 = [raw.ALPN[2], raw.ALPN[1]]
#: The address the dwtrust client dials (and pins the server under).
ADDRESS = "ledger.example:8443"
#: A generous handshake time-out, for servers not under a stall attack.
TIMEOUT = 30.0
#: The handshake time-out of servers and clients under a stall attack.
STALL_TIMEOUT = 4.0


def choose(versions: tuple[int, ...]) -> Callable[[list[bytes]], bytes]:
    """
    A raw server's ALPN choice: the first of C{versions} the client offers,
    or nothing.
    """

    def pick(offered: list[bytes]) -> bytes:
        for version in versions:
            if raw.ALPN[version] in offered:
                return raw.ALPN[version]
        return SSL.NO_OVERLAPPING_PROTOCOLS  # type: ignore[no-any-return]

    return pick


def key(name: str, algorithm: str = "ed25519") -> raw.PrivateKey:
    return privateKey(algorithm, name)  # type: ignore[return-value]


def identityOf(name: str, algorithm: str = "ed25519") -> Identity:
    org, service = name.split("/")
    return Identity.fromPrivateKey(org, service, privateKey(algorithm, name))


def claimOf(privateKey: raw.PrivateKey) -> tuple[str, bytes]:
    return raw.algorithmOf(privateKey), raw.blobOf(privateKey)


def errorCode(frame: tuple[int, int, bytes]) -> str:
    _version, kind, body = frame
    assert kind == raw.ERROR, frame
    return raw.decodeFields(body)[0].decode("ascii")


def certificateKey(tls: raw.RawTLS) -> Any:
    certificate = tls.connection.get_peer_certificate()
    assert certificate is not None
    return certificate.to_cryptography().public_key()


@define
class Outcome:
    """
    What a raw attacker saw: the ALPN protocol chosen, the frames it was sent
    until the peer closed, and anything its script kept.
    """

    alpn: bytes
    frames: list[tuple[int, int, bytes]]
    kept: dict[str, Any] = field(factory=dict)


Script = Callable[[raw.RawTLS, dict[str, Any]], None]


def clientAttack(
    port: int,
    privateKey: raw.PrivateKey,
    script: Script,
    offer: list[bytes] | None = OFFER_V2,
) -> Outcome:
    """
    In a thread: dial the server, run C{script}, then read every frame until
    the server closes.
    """
    tls = raw.RawTLS.connect(port, privateKey, offer)
    kept: dict[str, Any] = {}
    try:
        script(tls, kept)
        return Outcome(tls.alpn(), tls.frames(), kept)
    finally:
        tls.close()


def serverAttack(
    listener: socket.socket,
    privateKey: raw.PrivateKey,
    script: Script,
    versions: tuple[int, ...] | None = (2, 1),
) -> Outcome:
    """
    In a thread: accept one client, run C{script}, then read every frame
    until the client closes.
    """
    tls = raw.RawTLS.accept(
        listener, privateKey, choose(versions) if versions is not None else None
    )
    kept: dict[str, Any] = {}
    try:
        script(tls, kept)
        return Outcome(tls.alpn(), tls.frames(), kept)
    finally:
        tls.close()


def honestProof(
    privateKey: raw.PrivateKey,
    name: str = "acme/billing",
    version: int = 2,
    role: str = "client",
) -> Script:
    """
    A script that sends the proof C{privateKey} honestly makes for C{name}
    on this connection.
    """
    org, service = name.split("/")

    def script(tls: raw.RawTLS, kept: dict[str, Any]) -> None:
        body = raw.proofFor(privateKey, version, role, org, service, tls.exporter())
        kept["sent"] = raw.frame(2, raw.PROOF, body)
        tls.send(kept["sent"])

    return script


def sendProof(
    signer: raw.PrivateKey,
    org: str = "acme",
    service: str = "billing",
    algorithm: str | None = None,
    blob: bytes | None = None,
    signed: tuple[str, str, str, bytes] | None = None,
    exporter: bytes | None = None,
    version: int = 2,
    role: str = "client",
    challenge: bytes | None = None,
    after: bytes = b"",
) -> Script:
    """
    A script that sends a version 2 C{PROOF} saying C{org}, C{service},
    C{algorithm} and C{blob} (by default the signer's), signed by C{signer}
    over the payload of C{signed} (by default what it says), C{exporter} (by
    default this connection's), C{version} and C{role}; then C{after}.
    """

    def script(tls: raw.RawTLS, kept: dict[str, Any]) -> None:
        said = (
            org,
            service,
            algorithm if algorithm is not None else raw.algorithmOf(signer),
            blob if blob is not None else raw.blobOf(signer),
        )
        payload = raw.payload(
            version,
            role,
            *(signed or said),
            exporter if exporter is not None else tls.exporter(),
            challenge,
        )
        tls.send(
            raw.frame(2, raw.PROOF, raw.proofBody(*said, raw.sign(signer, payload)))
            + after
        )

    return script


def sendRaw(data: bytes) -> Script:
    def script(tls: raw.RawTLS, kept: dict[str, Any]) -> None:
        tls.send(data)

    return script


def nothing(tls: raw.RawTLS, kept: dict[str, Any]) -> None:
    pass


class Tracker(WrappingFactory):
    """
    Keeps every connection a factory makes, so that a test can wait until
    they have all closed (and leave a clean reactor).
    """

    def __init__(self, wrapped: Any) -> None:
        super().__init__(wrapped)
        self.handshakes: list[HandshakeProtocol] = []

    def buildProtocol(self, addr: IAddress) -> ProtocolWrapper:
        protocol = super().buildProtocol(addr)
        assert protocol is not None
        handshake = protocol.wrappedProtocol.wrappedProtocol
        assert isinstance(handshake, HandshakeProtocol)
        self.handshakes.append(handshake)
        return protocol

    async def drained(self, within: float = 120.0) -> None:
        deadline = time.monotonic() + within
        while self.protocols:
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(self.protocols)} connections stay open")
            await deferLater(reactor, 0.05, lambda: None)


class LoopbackCase(TestCase):
    """
    A real dwtrust server, C{acme/ledger}, on a loopback port, that the
    client key C{acme/billing} has already been approved for; and the means
    to put a real dwtrust client in front of a raw server.
    """

    timeout = 300

    async def setUp(self) -> None:
        self.serverKey = key("acme/ledger")
        self.legitimateKey = key("acme/billing")
        self.attackerKey = key("evil/mallory")
        self.refusals: list[LogEvent] = []

        @implementer(ILogObserver)
        def observe(event: LogEvent) -> None:
            if event.get("event") == "dwtrust.refused":
                self.refusals.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    async def startServer(
        self,
        versions: tuple[int, ...] = (2, 1),
        timeout: float = TIMEOUT,
        knownOnly: bool = False,
    ) -> int:
        """
        Listen with the dwtrust server; return its port.
        """
        self.server = identityOf("acme/ledger")
        self.store = MemoryTrustStore()
        self.approver = FakeApprover()
        await recordDecision(
            self.store,
            self.server,
            self.server,
            PeerIdentity("acme", "billing", identityOf("acme/billing").publicKey),
            KeyState.approved,
            "127.0.0.1:1234",
        )
        self.authenticator = Authenticator(
            self.server,
            ApprovalPolicy(
                self.store,
                KnownOnlyApprover() if knownOnly else self.approver,
                self.server,
            ),
            None,
            reactor,
            timeout,
            versions=versions,
        )
        self.serverApp = RecordingFactory()
        self.serverTracker = Tracker(
            self.authenticator.wrapServerFactory(self.serverApp)
        )
        port = reactor.listenTCP(0, self.serverTracker, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.addCleanup(lambda: Deferred.fromCoroutine(self.serverTracker.drained()))
        self.before = snapshot(self.store)
        return int(port.getHost().port)

    def attack(
        self,
        script: Script,
        privateKey: raw.PrivateKey | None = None,
        offer: list[bytes] | None = OFFER_V2,
    ) -> Deferred[Outcome]:
        """
        Run a raw client against the server (in a thread).
        """
        chosen = privateKey if privateKey is not None else self.attackerKey
        return deferToThread(clientAttack, self.port, chosen, script, offer)

    def assertRefused(
        self, outcome: Outcome, code: ErrorCode, version: int = 2
    ) -> None:
        """
        The server answered with one C{ERROR} frame of C{version} carrying
        C{code}, closed, logged the refusal, stored nothing, asked no one and
        never connected its application.
        """
        self.assertEqual(len(outcome.frames), 1, outcome.frames)
        [frame] = outcome.frames
        self.assertEqual((frame[0], errorCode(frame)), (version, code.value))
        self.assertIn(code.value, [e["code"] for e in self.refusals])
        self.assertNothingHappened()

    def assertNothingHappened(self) -> None:
        self.assertEqual(self.serverApp.connected, [])
        self.assertEqual(self.serverApp.received, b"")
        self.assertEqual(snapshot(self.store), self.before)
        self.assertEqual(self.approver.requests, [])
        self.assertEqual(
            self.authenticator.sessionsOf(identityOf("acme/billing").fingerprint), []
        )

    # The dwtrust client, against a raw server

    def startRawServer(self) -> socket.socket:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(5)
        self.addCleanup(listener.close)
        return listener

    async def dial(
        self,
        listener: socket.socket,
        script: Script,
        serverKey: raw.PrivateKey,
        serverVersions: tuple[int, ...] | None = (2, 1),
        clientVersions: tuple[int, ...] = (2, 1),
        pinned: raw.PrivateKey | None = None,
        timeout: float = TIMEOUT,
        greeting: list[bytes] | None = None,
    ) -> tuple[Exception | RecordingProtocol, Outcome]:
        """
        Connect a real dwtrust client (C{acme/billing}) to a raw server
        running C{script}; the client has C{pinned}'s key pinned as
        C{acme/ledger} for the address, if given.  Return how the client's
        handshake ended and what the raw server saw.
        """
        self.clientStore = MemoryTrustStore()
        if pinned is not None:
            ledger = Identity.fromPrivateKey("acme", "ledger", pinned)
            await self.clientStore.pin(
                ADDRESS, PeerIdentity("acme", "ledger", ledger.publicKey)
            )
        self.pinsBefore = dict(self.clientStore.pins)
        client = Authenticator(
            identityOf("acme/billing"),
            None,
            PinningPolicy(self.clientStore),
            reactor,
            timeout,
            2.0 if timeout < TIMEOUT else 60.0,
            versions=clientVersions,
        )
        rawServer = deferToThread(
            serverAttack, listener, serverKey, script, serverVersions
        )
        self.clientApp = RecordingFactory(greeting)
        tracker = Tracker(client.wrapClientFactory(self.clientApp, ADDRESS))
        port = listener.getsockname()[1]
        await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(tracker)
        handshake = tracker.handshakes[-1]
        result: Exception | RecordingProtocol
        try:
            connected = await handshake.whenConnected()
            assert isinstance(connected, RecordingProtocol)
            result = connected
        except Exception as e:  # HandshakeFailed, or the connection's end
            result = e
        outcome = await rawServer
        await tracker.drained()
        if isinstance(result, RecordingProtocol) and result.lostReason is not None:
            failed = result.lostReason.value
            if isinstance(failed, HandshakeFailed):
                result = failed
        return result, outcome

    def assertClientRefused(
        self, result: Exception | RecordingProtocol, code: ErrorCode
    ) -> None:
        """
        The dwtrust client refused the server with C{code}: its application
        was given no server byte, and its pins did not change.
        """
        assert isinstance(result, HandshakeFailed), result
        self.assertIs(result.code, code)
        self.assertFalse(result.byPeer)
        self.assertEqual(b"".join(p.received for p in self.clientApp.protocols), b"")
        self.assertEqual(dict(self.clientStore.pins), self.pinsBefore)


class ControlTests(LoopbackCase):
    """
    The raw client and server, when honest, get in: the attacks below fail
    for the reason they show, not because the toolkit is broken.
    """

    async def test_honestRawClient(self) -> None:
        """
        The approved key's proof, made from the specification, gets the
        server's version 2 C{ACCEPT}, whose proof verifies for the role
        C{server} over this connection's exporter with the certificate's
        key; the application bytes after C{PROOF} reach the application.
        """
        self.port = await self.startServer()

        def script(tls: raw.RawTLS, kept: dict[str, Any]) -> None:
            honestProof(self.legitimateKey)(tls, kept)
            tls.send(b"first bytes")
            kept["accept"] = tls.readFrame()
            kept["exporter"] = tls.exporter()
            kept["serverKey"] = certificateKey(tls)
            kept["reply"] = tls.readExactly(len(b"first bytes"))
            tls.close()

        self.serverApp.onConnect = lambda p: p.transport.write(b"first bytes")
        outcome = await self.attack(script, self.legitimateKey)
        self.assertEqual(outcome.alpn, b"dwtrust/2")
        version, kind, body = outcome.kept["accept"]
        self.assertEqual((version, kind), (2, raw.ACCEPT))
        org, service, algorithm, blob, signature = raw.decodeFields(body)
        self.assertEqual((org, service), (b"acme", b"ledger"))
        self.assertEqual(blob, raw.blobOf(self.serverKey))
        payload = raw.payload(
            2, "server", "acme", "ledger", algorithm.decode(), blob,
            outcome.kept["exporter"],
        )  # fmt: skip
        outcome.kept["serverKey"].verify(signature, payload)
        self.assertEqual(outcome.kept["reply"], b"first bytes")
        [app] = self.serverApp.connected
        self.assertEqual(app.received, b"first bytes")

    async def test_honestRawServer(self) -> None:
        """
        A raw server that answers the client's C{PROOF} with an C{ACCEPT}
        carrying its own honest proof gets the client connected, and the
        client's bytes follow.
        """
        listener = self.startRawServer()

        def script(tls: raw.RawTLS, kept: dict[str, Any]) -> None:
            kept["proof"] = tls.readFrame()
            tls.send(
                raw.frame(
                    2,
                    raw.ACCEPT,
                    raw.proofFor(
                        self.serverKey, 2, "server", "acme", "ledger", tls.exporter()
                    ),
                )
                + b"server bytes"
            )
            kept["greeting"] = tls.readExactly(len(b"client bytes"))
            tls.close()

        result, outcome = await self.dial(
            listener, script, self.serverKey, greeting=[b"client bytes"]
        )
        self.assertEqual(outcome.alpn, b"dwtrust/2")
        self.assertEqual(outcome.kept["proof"][:2], (2, raw.PROOF))
        self.assertEqual(outcome.kept["greeting"], b"client bytes")
        assert isinstance(result, RecordingProtocol)
        self.assertEqual(result.received, b"server bytes")


class ReplayTests(LoopbackCase):
    """
    A version 2 C{PROOF} recorded on one connection is worthless on another.
    """

    async def recordProof(self) -> bytes:
        def script(tls: raw.RawTLS, kept: dict[str, Any]) -> None:
            honestProof(self.legitimateKey)(tls, kept)
            kept["accept"] = tls.readFrame()
            tls.close()

        outcome = await self.attack(script, self.legitimateKey)
        self.assertEqual(outcome.kept["accept"][:2], (2, raw.ACCEPT))
        self.assertEqual(len(self.serverApp.connected), 1)
        await self.serverTracker.drained()
        self.serverApp.protocols.clear()
        self.before = snapshot(self.store)
        self.refusals.clear()
        return bytes(outcome.kept["sent"])

    async def test_replayWithTheSameKey(self) -> None:
        """
        A recorded proof, replayed on a connection whose certificate has the
        proof's key, fails: the exporter differs.
        """
        self.port = await self.startServer()
        recorded = await self.recordProof()
        outcome = await self.attack(sendRaw(recorded), self.legitimateKey)
        self.assertRefused(outcome, ErrorCode.bad_signature)

    async def test_replayWithAnotherCertificate(self) -> None:
        self.port = await self.startServer()
        recorded = await self.recordProof()
        self.assertRefused(
            await self.attack(sendRaw(recorded)), ErrorCode.bad_signature
        )

    async def test_otherExporter(self) -> None:
        """
        A proof signed over another exporter value fails.
        """
        self.port = await self.startServer()
        outcome = await self.attack(
            sendProof(self.legitimateKey, exporter=b"\x00" * 32), self.legitimateKey
        )
        self.assertRefused(outcome, ErrorCode.bad_signature)


class ReflectionTests(LoopbackCase):
    """
    A proof made for one role does not pass for the other.
    """

    async def test_reflectedRole(self) -> None:
        """
        A client proof signed for the role C{server} fails at the server.
        """
        self.port = await self.startServer()
        outcome = await self.attack(
            sendProof(self.legitimateKey, role="server"), self.legitimateKey
        )
        self.assertRefused(outcome, ErrorCode.bad_signature)

    async def test_clientProofReflected(self) -> None:
        """
        A server that sends the client's own C{PROOF} back as its C{ACCEPT},
        on the same connection (same exporter) and even presenting the
        client's own key: the client refuses it with C{bad_signature}, as the
        role is signed, and closes without an C{ERROR} (it has sent
        C{PROOF}).
        """
        listener = self.startRawServer()

        def script(tls: raw.RawTLS, kept: dict[str, Any]) -> None:
            _version, _kind, body = tls.readFrame()
            tls.send(raw.frame(2, raw.ACCEPT, body))

        result, outcome = await self.dial(listener, script, self.legitimateKey)
        self.assertClientRefused(result, ErrorCode.bad_signature)
        self.assertEqual(self.clientApp.connected, [])
        self.assertEqual(outcome.frames, [])


class RelayTests(LoopbackCase):
    """
    A man in the middle holding two TLS sessions cannot pass version 2 proofs
    from one to the other, even presenting on each side the key of the peer
    it relays.
    """

    async def test_relayToServerWithTheClientsKey(self) -> None:
        """
        The real client dials the relay; the relay presents the client's own
        key to the server and passes the client's C{PROOF} on unchanged: it
        signs the exporter of the client's session with the relay, so the
        server refuses it with C{bad_signature}, connects nothing, stores
        nothing and asks no one.
        """
        self.port = await self.startServer()
        listener = self.startRawServer()
        relayKey = key("evil/relay")
        port = self.port

        def relay(tls: raw.RawTLS, kept: dict[str, Any]) -> None:
            proof = tls.readFrame()
            kept["server"] = clientAttack(
                port,
                self.legitimateKey,
                sendRaw(raw.frame(*proof)),
            )
            tls.close()

        result, outcome = await self.dial(listener, relay, relayKey)
        toServer: Outcome = outcome.kept["server"]
        self.assertRefused(toServer, ErrorCode.bad_signature)
        # The relay closed on the client, which never got an ACCEPT.
        self.assertIsInstance(result, Exception)
        self.assertEqual(self.clientApp.connected, [])

    async def test_relayToClientWithTheServersKey(self) -> None:
        """
        The relay presents the server's own key to the client, gets itself
        accepted by the server with an approved client key, and passes the
        server's C{ACCEPT} on unchanged: its proof signs the exporter of the
        relay's session with the server, so the client refuses it with
        C{bad_signature}, connects nothing and pins nothing.
        """
        self.port = await self.startServer()
        listener = self.startRawServer()
        port = self.port

        def relay(tls: raw.RawTLS, kept: dict[str, Any]) -> None:
            tls.readFrame()  # the client's PROOF, kept from the server

            def getAccept(toServer: raw.RawTLS, kept: dict[str, Any]) -> None:
                honestProof(self.legitimateKey)(toServer, kept)
                kept["accept"] = toServer.readFrame()
                toServer.close()

            kept["server"] = clientAttack(port, self.legitimateKey, getAccept)
            tls.send(raw.frame(*kept["server"].kept["accept"]))

        result, outcome = await self.dial(listener, relay, self.serverKey)
        self.assertEqual(outcome.kept["server"].kept["accept"][:2], (2, raw.ACCEPT))
        self.assertClientRefused(result, ErrorCode.bad_signature)
        self.assertEqual(self.clientApp.connected, [])
        self.assertEqual(outcome.frames, [])


class KeySubstitutionTests(LoopbackCase):
    """
    A version 2 proof must be made with the key of its TLS certificate.
    """

    async def test_proofWithAnotherKey(self) -> None:
        """
        The proof names and is validly signed by a key other than the
        certificate's.
        """
        self.port = await self.startServer()
        other = key("evil/other")
        self.assertRefused(
            await self.attack(sendProof(other, "evil", "mallory")),
            ErrorCode.bad_signature,
        )

    async def test_approvedKeyNotHeld(self) -> None:
        """
        The proof names the approved key (which the attacker does not hold)
        and is signed with the attacker's own.
        """
        self.port = await self.startServer()
        blob = raw.blobOf(self.legitimateKey)
        self.assertRefused(
            await self.attack(sendProof(self.attackerKey, blob=blob)),
            ErrorCode.bad_signature,
        )

    async def test_certificateKeyOtherSigner(self) -> None:
        """
        The proof names the certificate's key but is signed by another.
        """
        self.port = await self.startServer()
        blob = raw.blobOf(self.attackerKey)
        self.assertRefused(
            await self.attack(
                sendProof(key("evil/other"), "evil", "mallory", blob=blob)
            ),
            ErrorCode.bad_signature,
        )


class AlgorithmConfusionTests(LoopbackCase):
    """
    The algorithm a version 2 proof names must be the one of its key.
    """

    async def confuse(self, algorithm: str, claimed: str) -> None:
        self.port = await self.startServer()
        attacker = key("evil/mallory", algorithm)
        outcome = await self.attack(
            sendProof(attacker, "evil", "mallory", algorithm=claimed), attacker
        )
        self.assertRefused(outcome, ErrorCode.bad_signature)

    async def test_ed25519AsECDSA(self) -> None:
        await self.confuse("ed25519", "ecdsa-sha2-nistp256")

    async def test_p256AsP384(self) -> None:
        await self.confuse("ecdsa-p256", "ecdsa-sha2-nistp384")

    async def test_p384AsP256(self) -> None:
        await self.confuse("ecdsa-p384", "ecdsa-sha2-nistp256")

    async def test_rsaAsSHA1(self) -> None:
        await self.confuse("rsa-3072", "ssh-rsa")

    async def test_unknownAlgorithm(self) -> None:
        await self.confuse("ed25519", "ssh-dss")


class SpoofingTests(LoopbackCase):
    """
    A client cannot claim a name it did not sign, nor a name outside the
    rules; a server cannot answer at a pinned address with another key.
    """

    async def test_nameNotSigned(self) -> None:
        """
        The signature covers C{evil/mallory}; the frame claims C{acme/billing}.
        """
        self.port = await self.startServer()
        signed = ("evil", "mallory", *claimOf(self.attackerKey))
        self.assertRefused(
            await self.attack(sendProof(self.attackerKey, signed=signed)),
            ErrorCode.bad_signature,
        )

    async def test_lookalikeName(self) -> None:
        self.port = await self.startServer()
        outcome = await self.attack(sendProof(self.attackerKey, service="billing\n"))
        self.assertRefused(outcome, ErrorCode.protocol_error)

    async def test_invalidName(self) -> None:
        self.port = await self.startServer()
        outcome = await self.attack(sendProof(self.attackerKey, org="ACME"))
        self.assertRefused(outcome, ErrorCode.protocol_error)

    async def test_anotherKeyAtAPinnedAddress(self) -> None:
        """
        The client has C{acme/ledger} pinned for the address; a server with
        another key answers there.  The early check refuses it from its
        certificate, before the client proves itself: one version 2 C{ERROR}
        with C{identity_changed}, no C{PROOF}, nothing connected.
        """
        listener = self.startRawServer()
        result, outcome = await self.dial(
            listener, nothing, key("evil/ledger"), pinned=self.serverKey
        )
        self.assertClientRefused(result, ErrorCode.identity_changed)
        self.assertEqual(self.clientApp.connected, [])
        self.assertEqual(len(outcome.frames), 1, outcome.frames)
        self.assertEqual(outcome.frames[0][0], 2)
        self.assertEqual(errorCode(outcome.frames[0]), "identity_changed")


class DowngradeTests(LoopbackCase):
    """
    A version 2-only side refuses version 1, and a proof of one version is
    worthless in the other.
    """

    async def test_serverChoosesVersion2(self) -> None:
        """
        The server picks C{dwtrust/2} whenever it is offered, whatever the
        order of the offer.
        """
        self.port = await self.startServer()
        for offer in (OFFER_V2, [raw.ALPN[1], raw.ALPN[2]], [raw.ALPN[2]]):

            def script(tls: raw.RawTLS, kept: dict[str, Any]) -> None:
                kept["alpn"] = tls.alpn()
                tls.close()

            outcome = await self.attack(script, offer=offer)
            self.assertEqual(outcome.kept["alpn"], b"dwtrust/2")
        await self.serverTracker.drained()

    async def test_v2OnlyServerRefusesV1(self) -> None:
        """
        A server with C{versions=(2,)} refuses a client offering no ALPN (a
        version 1 client) and one offering only C{dwtrust/1}: one version 1
        C{ERROR} with C{version_unsupported}.
        """
        self.port = await self.startServer(versions=(2,))
        hello = raw.frame(1, raw.HELLO, raw.field(b"c" * 32))
        for offer in (None, [raw.ALPN[1]]):
            outcome = await self.attack(sendRaw(hello), offer=offer)
            self.assertEqual(outcome.alpn, b"")
            self.assertRefused(outcome, ErrorCode.version_unsupported, version=1)

    async def test_v2OnlyClientRefusesV1Server(self) -> None:
        """
        A client with C{versions=(2,)} facing a version 1 server (no ALPN):
        it refuses with C{version_unsupported}, sends no C{HELLO} and no
        proof, only a version 1 C{ERROR}.
        """
        listener = self.startRawServer()
        result, outcome = await self.dial(
            listener, nothing, self.serverKey, serverVersions=None, clientVersions=(2,)
        )
        self.assertClientRefused(result, ErrorCode.version_unsupported)
        self.assertEqual(self.clientApp.connected, [])
        self.assertEqual([(f[0], errorCode(f)) for f in outcome.frames], [
            (1, "version_unsupported")
        ])  # fmt: skip

    async def test_v1ProofAsV2(self) -> None:
        """
        A version 1 proof for this very connection (the version 1 payload,
        with a challenge, over this exporter) sent in a version 2 C{PROOF}:
        C{bad_signature}.
        """
        self.port = await self.startServer()
        outcome = await self.attack(
            sendProof(self.legitimateKey, version=1, challenge=b"s" * 32),
            self.legitimateKey,
        )
        self.assertRefused(outcome, ErrorCode.bad_signature)

    async def test_v1FramesOnV2(self) -> None:
        """
        On a version 2 connection, a version 1 first frame is
        C{version_unsupported}; a version 1 C{HELLO} relabelled version 2 is
        a C{protocol_error}.
        """
        self.port = await self.startServer()
        hello = raw.field(b"c" * 32)
        self.assertRefused(
            await self.attack(sendRaw(raw.frame(1, raw.HELLO, hello))),
            ErrorCode.version_unsupported,
        )
        self.refusals.clear()
        self.assertRefused(
            await self.attack(sendRaw(raw.frame(2, raw.HELLO, hello))),
            ErrorCode.protocol_error,
        )

    async def test_v2ProofAsV1(self) -> None:
        """
        A version 1 client (no ALPN) that answers the server's C{CHALLENGE}
        with a version 2 proof for this connection (the version 2 payload
        over this exporter) in a version 1 C{PROOF}: C{bad_signature}.
        """
        self.port = await self.startServer()

        def script(tls: raw.RawTLS, kept: dict[str, Any]) -> None:
            tls.send(raw.frame(1, raw.HELLO, raw.field(b"c" * 32)))
            version, kind, _body = tls.readFrame()
            assert (version, kind) == (1, raw.CHALLENGE)
            proof = raw.proofFor(
                self.legitimateKey, 2, "client", "acme", "billing", tls.exporter()
            )
            tls.send(raw.frame(1, raw.PROOF, proof))

        outcome = await self.attack(script, self.legitimateKey, offer=None)
        self.assertEqual(outcome.alpn, b"")
        self.assertRefused(outcome, ErrorCode.bad_signature, version=1)


class StallTests(LoopbackCase):
    """
    A peer that stops mid-handshake is cut off at the handshake time-out,
    which bytes trickling in do not extend.
    """

    async def test_silentAfterTLS(self) -> None:
        self.port = await self.startServer(timeout=STALL_TIMEOUT)
        self.assertRefused(await self.attack(nothing), ErrorCode.timeout)

    async def test_halfAHeader(self) -> None:
        self.port = await self.startServer(timeout=STALL_TIMEOUT)
        outcome = await self.attack(sendRaw(b"\x02\x03"))
        self.assertRefused(outcome, ErrorCode.timeout)

    async def test_halfAProof(self) -> None:
        self.port = await self.startServer(timeout=STALL_TIMEOUT)

        def script(tls: raw.RawTLS, kept: dict[str, Any]) -> None:
            body = raw.proofFor(
                self.attackerKey, 2, "client", "evil", "mallory", tls.exporter()
            )
            tls.send(raw.frame(2, raw.PROOF, body)[:40])

        self.assertRefused(await self.attack(script), ErrorCode.timeout)

    async def test_trickle(self) -> None:
        """
        The proof one byte every half second: the server cuts the client off
        at its time-out, before the proof is whole.
        """
        self.port = await self.startServer(timeout=STALL_TIMEOUT)

        def script(tls: raw.RawTLS, kept: dict[str, Any]) -> None:
            body = raw.proofFor(
                self.legitimateKey, 2, "client", "acme", "billing", tls.exporter()
            )
            proof = raw.frame(2, raw.PROOF, body)
            kept["total"] = len(proof)
            kept["sent"] = 0
            for i in range(len(proof)):
                try:
                    tls.send(proof[i : i + 1])
                except (SSL.Error, OSError):
                    return
                kept["sent"] = i + 1
                time.sleep(0.5)
                if tls.poll():
                    return
            raise AssertionError("the whole proof went through")

        outcome = await self.attack(script, self.legitimateKey)
        self.assertLess(outcome.kept["sent"], outcome.kept["total"])
        self.assertRefused(outcome, ErrorCode.timeout)

    async def test_noTLS(self) -> None:
        """
        A client that opens TCP and never starts TLS is dropped at the
        time-out, and logged.
        """
        port = await self.startServer(timeout=STALL_TIMEOUT)

        def silent() -> bytes:
            with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
                data = b""
                try:
                    while chunk := sock.recv(4096):
                        data += chunk
                except ConnectionError:
                    pass
                return data

        self.assertEqual(await deferToThread(silent), b"")
        self.assertIn("timeout", [e["code"] for e in self.refusals])
        self.assertNothingHappened()

    async def test_serverStalls(self) -> None:
        """
        A server that takes the client's C{PROOF} and never answers: the
        client gives up with C{timeout}, its application never connected,
        nothing pinned, and it sends no C{ERROR} after its C{PROOF}.
        """
        listener = self.startRawServer()

        def script(tls: raw.RawTLS, kept: dict[str, Any]) -> None:
            kept["proof"] = tls.readFrame()

        result, outcome = await self.dial(
            listener, script, self.serverKey, timeout=STALL_TIMEOUT
        )
        self.assertEqual(outcome.kept["proof"][:2], (2, raw.PROOF))
        self.assertClientRefused(result, ErrorCode.timeout)
        self.assertEqual(self.clientApp.connected, [])
        self.assertEqual(outcome.frames, [])


class MalformedFrameTests(LoopbackCase):
    """
    Oversized, truncated and garbage version 2 frames are refused, and store
    nothing.
    """

    async def test_rejectedFrameVectors(self) -> None:
        """
        Each frame of the version 2 vectors' C{rejected_frames}, sent as the
        first frame after TLS, is refused with the vector's code; an
        C{ERROR} frame that fails its checks is not answered.
        """
        from .test_vectors import V2

        self.port = await self.startServer()
        for name, vector in sorted(V2["rejected_frames"].items()):
            self.refusals.clear()
            data = bytes.fromhex(vector["frame"])
            outcome = await self.attack(sendRaw(data))
            if data[1] == raw.ERROR:
                self.assertEqual(outcome.frames, [], name)
                self.assertNothingHappened()
                continue
            self.assertRefused(outcome, ErrorCode(vector["error"]))

    async def test_oversizedRefusedBeforeBody(self) -> None:
        self.port = await self.startServer()
        outcome = await self.attack(sendRaw(struct.pack("!BBH", 2, raw.PROOF, 0xFFFF)))
        self.assertRefused(outcome, ErrorCode.protocol_error)

    async def test_garbageProof(self) -> None:
        self.port = await self.startServer()
        body = raw.fields(b"acme", b"billing")
        outcome = await self.attack(sendRaw(raw.frame(2, raw.PROOF, body)))
        self.assertRefused(outcome, ErrorCode.protocol_error)

    async def test_acceptFromClient(self) -> None:
        """
        A client that sends an C{ACCEPT} (with a well-formed proof) where
        its C{PROOF} belongs.
        """
        self.port = await self.startServer()

        def script(tls: raw.RawTLS, kept: dict[str, Any]) -> None:
            body = raw.proofFor(
                self.legitimateKey, 2, "client", "acme", "billing", tls.exporter()
            )
            tls.send(raw.frame(2, raw.ACCEPT, body))

        outcome = await self.attack(script, self.legitimateKey)
        self.assertRefused(outcome, ErrorCode.protocol_error)

    async def test_peerError(self) -> None:
        """
        A client that sends C{ERROR} is dropped without an answer.
        """
        self.port = await self.startServer()
        error = raw.frame(2, raw.ERROR, raw.fields(b"denied", b"no"))
        outcome = await self.attack(sendRaw(error))
        self.assertEqual(outcome.frames, [])
        self.assertNothingHappened()


class DataBeforeApprovalTests(LoopbackCase):
    """
    No application byte reaches an application before its peer is
    authenticated and approved.
    """

    async def test_rawBytesInsteadOfProof(self) -> None:
        self.port = await self.startServer()
        outcome = await self.attack(sendRaw(b"GET /secrets HTTP/1.1\r\n\r\n"))
        self.assertRefused(outcome, ErrorCode.version_unsupported)

    async def test_bytesWithBadProof(self) -> None:
        """
        Application bytes sent with a proof that fails are dropped with it.
        """
        self.port = await self.startServer()
        outcome = await self.attack(
            sendProof(self.legitimateKey, role="server", after=b"DROP TABLE peers;"),
            self.legitimateKey,
        )
        self.assertRefused(outcome, ErrorCode.bad_signature)

    async def test_bytesWhileRefused(self) -> None:
        """
        An unknown client's bytes, sent with its proof and after, are never
        seen by the server's application when the owners deny it.
        """
        self.port = await self.startServer()

        def script(tls: raw.RawTLS, kept: dict[str, Any]) -> None:
            sendProof(self.attackerKey, "evil", "mallory", after=b"first ")(tls, kept)
            tls.send(b"second")

        outcome = self.attack(script)
        deadline = time.monotonic() + 120
        while not self.approver.requests:
            self.assertLess(time.monotonic(), deadline, "the owners were never asked")
            await deferLater(reactor, 0.05, lambda: None)
        [pending] = self.approver.requests
        self.assertEqual(self.serverApp.connected, [])
        pending.deny()
        result = await outcome
        self.assertEqual([errorCode(f) for f in result.frames], ["denied"])
        self.assertEqual(self.serverApp.connected, [])
        self.assertEqual(self.serverApp.received, b"")

    async def test_deniedRealClient(self) -> None:
        """
        A real version 2 client that has the server pinned, so that its
        application is connected at once and its bytes follow its C{PROOF},
        refused by a C{known-only} server: the server's application never
        sees a byte.
        """
        self.port = await self.startServer(knownOnly=True)
        clientStore = MemoryTrustStore()
        await clientStore.pin(
            ADDRESS, PeerIdentity("acme", "ledger", self.server.publicKey)
        )
        client = Authenticator(
            identityOf("evil/mallory"),
            None,
            PinningPolicy(clientStore),
            reactor,
            TIMEOUT,
        )
        app = RecordingFactory([b"DROP TABLE peers;"])
        tracker = Tracker(client.wrapClientFactory(app, ADDRESS))
        await TCP4ClientEndpoint(reactor, "127.0.0.1", self.port).connect(tracker)
        await tracker.drained()
        await self.serverTracker.drained()
        self.assertEqual(self.serverApp.connected, [])
        self.assertEqual(self.serverApp.received, b"")
        self.assertEqual(self.store.peers, self.before[0])
        [handshake] = self.serverTracker.handshakes
        self.assertEqual(handshake.protocolVersion, 2)
        [early] = app.protocols
        self.assertTrue(early.connected)

    async def test_serverBytesBeforeAccept(self) -> None:
        """
        A server that sends application bytes before its C{ACCEPT}: the
        client's application never sees them, and the client refuses the
        server without an C{ERROR} (it has sent C{PROOF}).
        """
        listener = self.startRawServer()

        def script(tls: raw.RawTLS, kept: dict[str, Any]) -> None:
            tls.readFrame()
            accept = raw.proofFor(
                self.serverKey, 2, "server", "acme", "ledger", tls.exporter()
            )
            tls.send(b"unauthenticated bytes" + raw.frame(2, raw.ACCEPT, accept))

        result, outcome = await self.dial(listener, script, self.serverKey)
        assert isinstance(result, HandshakeFailed), result
        self.assertIn(
            result.code, [ErrorCode.protocol_error, ErrorCode.version_unsupported]
        )
        self.assertClientRefused(result, result.code)
        self.assertEqual(self.clientApp.connected, [])
        self.assertEqual(outcome.frames, [])

    async def test_pinnedServerBadProof(self) -> None:
        """
        A client whose pinned server answers with the pinned key's
        certificate: its application is connected at once (early trust) and
        its first bytes leave with C{PROOF}.  The server's C{ACCEPT} then
        carries a proof that fails (signed for the role C{client}) and
        application bytes: the client's application never sees them and
        loses its connection with C{bad_signature}.
        """
        listener = self.startRawServer()

        def script(tls: raw.RawTLS, kept: dict[str, Any]) -> None:
            kept["proof"] = tls.readFrame()
            kept["early"] = tls.readExactly(len(b"early bytes"))
            accept = raw.proofFor(
                self.serverKey, 2, "client", "acme", "ledger", tls.exporter()
            )
            tls.send(raw.frame(2, raw.ACCEPT, accept) + b"server bytes")

        result, outcome = await self.dial(
            listener,
            script,
            self.serverKey,
            pinned=self.serverKey,
            greeting=[b"early bytes"],
        )
        self.assertEqual(outcome.kept["early"], b"early bytes")
        self.assertClientRefused(result, ErrorCode.bad_signature)
        [app] = self.clientApp.protocols
        self.assertTrue(app.connected)
        self.assertEqual(app.received, b"")
        self.assertEqual(outcome.frames, [])

    async def test_pinnedServerOtherName(self) -> None:
        """
        A pinned server whose key is right but whose C{ACCEPT} proves another
        name (C{acme/other}) than the pin's: C{identity_changed}, and the
        client's application sees no server byte.
        """
        listener = self.startRawServer()

        def script(tls: raw.RawTLS, kept: dict[str, Any]) -> None:
            tls.readFrame()
            accept = raw.proofFor(
                self.serverKey, 2, "server", "acme", "other", tls.exporter()
            )
            tls.send(raw.frame(2, raw.ACCEPT, accept) + b"server bytes")

        result, outcome = await self.dial(
            listener, script, self.serverKey, pinned=self.serverKey
        )
        self.assertClientRefused(result, ErrorCode.identity_changed)
        self.assertEqual(outcome.frames, [])
