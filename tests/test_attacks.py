"""
The attacks of the security evaluation, each played against a real dwtrust
end over real TLS in memory.  Each must be refused with the right error code,
store nothing, and never connect the application.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.test.iosim import connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase

from dwtrust import ErrorCode, HandshakeFailed, Identity, PeerIdentity
from dwtrust._proof import makeProof
from dwtrust._wire import (
    MAX_BODY,
    VERSION,
    Accept,
    Challenge,
    Error,
    Frame,
    FrameType,
    Hello,
    Proof,
    ProofFrame,
    Role,
    encodeFields,
    encodeFrame,
    signedPayload,
)
from dwtrust._wrap import DEFAULT_TIMEOUT
from dwtrust.approval import KnownOnlyApprover
from dwtrust.store import KeyState
from dwtrust.testing import recordDecision

from .helpers import (
    PEER_ADDRESS,
    RecordingFactory,
    Relay,
    ScriptedClientConnection,
    ScriptedPeer,
    ScriptedServerConnection,
    Service,
    answerChallenge,
    connect,
    connectScriptedClient,
    connectScriptedServer,
    flushAll,
    makeIdentity,
    makeService,
    sendHello,
    snapshot,
)

HEADER = struct.Struct("!BBH")


def signedBy(
    signer: Identity,
    peer: ScriptedPeer,
    frame: Challenge,
    org: str | None = None,
    service: str | None = None,
    algorithm: str | None = None,
    publicKey: bytes | None = None,
    claim: tuple[str, str, str, bytes] | None = None,
) -> Proof:
    """
    A client proof for this connection, signed by C{signer}, over the claim
    C{claim} (by default, what the proof says), and saying C{org},
    C{service}, C{algorithm} and C{publicKey} (by default, the signer's).
    """
    said = (
        org if org is not None else signer.org,
        service if service is not None else signer.service,
        algorithm if algorithm is not None else signer.algorithm.name,
        publicKey if publicKey is not None else signer.publicKey.blob,
    )
    signedClaim = claim if claim is not None else said
    payload = signedPayload(Role.client, *signedClaim, frame.challenge, peer.exporter)
    return Proof(*said, signer.sign(payload))


class AttackCase(SynchronousTestCase):
    """
    A real dwtrust server, C{acme/ledger}, that one client key
    (C{acme/billing}) has already been approved for.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.server = makeService(self.clock, makeIdentity("acme", "ledger"))
        self.legitimate = makeIdentity("acme", "billing")
        self.attackerIdentity = makeIdentity("evil", "mallory")
        recordDecision(
            self.server.store,
            self.server.identity,
            self.server.identity,
            PeerIdentity("acme", "billing", self.legitimate.publicKey),
            KeyState.approved,
            "10.0.0.1:1234",
        )

    def attack(
        self,
        identity: Identity | None = None,
        onFrame: Callable[[ScriptedPeer, Frame], None] | None = None,
        onTLS: Callable[[ScriptedPeer], None] | None = sendHello,
        serverApp: RecordingFactory | None = None,
    ) -> ScriptedClientConnection:
        """
        Run a scripted client against the server, keeping a record of what the
        server stored before.
        """
        self.before = snapshot(self.server.store)
        self.requestsBefore = len(self.server.fakeApprover.requests)
        attacker = ScriptedPeer(
            identity if identity is not None else self.attackerIdentity,
            onTLS=onTLS,
            onFrame=onFrame,
        )
        return connectScriptedClient(self.clock, self.server, attacker, serverApp)

    def assertRefused(
        self, connection: ScriptedClientConnection, code: ErrorCode
    ) -> None:
        """
        The server answered with one C{ERROR} frame with C{code} and closed
        the connection; it stored nothing, asked no one, and never connected
        its application.
        """
        attacker = connection.attacker
        self.assertEqual(attacker.errorCodes, [code.value])
        self.assertIsInstance(attacker.frames[-1], Error)
        self.assertIsNotNone(attacker.lostReason, "the connection is still open")
        failure = self.failureResultOf(
            connection.serverHandshake.whenConnected(), HandshakeFailed
        )
        self.assertIs(failure.value.code, code)
        self.assertFalse(failure.value.byPeer)
        self.assertNothingHappened(connection)

    def assertNothingHappened(self, connection: ScriptedClientConnection) -> None:
        self.assertEqual(connection.serverApp.connected, [])
        self.assertEqual(connection.serverApp.received, b"")
        self.assertEqual(snapshot(self.server.store), self.before)
        self.assertEqual(len(self.server.fakeApprover.requests), self.requestsBefore)
        self.assertEqual(
            self.server.authenticator.sessionsOf(self.legitimate.fingerprint), []
        )
        self.assertEqual(self.clock.getDelayedCalls(), [])


class ControlTests(AttackCase):
    """
    The scripted client, when honest, gets in: the attacks below fail for
    the reason they show, not because the toolkit is broken.
    """

    def test_honestScriptedClient(self) -> None:
        connection = self.attack(
            self.legitimate, onFrame=answerChallenge(after=b"app bytes")
        )
        self.assertEqual(
            [type(f) for f in connection.attacker.frames], [Challenge, Accept]
        )
        [serverApp] = connection.serverApp.connected
        self.assertEqual(serverApp.received, b"app bytes")

    def test_proofBuiltFromTheSpec(self) -> None:
        """
        A proof built here from L{signedPayload} with this connection's
        challenge and exporter, as the attacks below build theirs, gets in:
        so what they change is what makes them fail.
        """

        def proof(peer: ScriptedPeer, frame: Challenge) -> Proof:
            return signedBy(self.legitimate, peer, frame)

        connection = self.attack(self.legitimate, onFrame=answerChallenge(proof))
        self.assertEqual(len(connection.serverApp.connected), 1)

    def test_unknownScriptedClientAsksOwners(self) -> None:
        connection = self.attack(onFrame=answerChallenge())
        [pending] = self.server.fakeApprover.requests
        self.assertEqual(pending.request.peer.name, "evil/mallory")
        self.assertEqual(connection.serverApp.connected, [])


class ReplayTests(AttackCase):
    """
    A C{PROOF} frame recorded on one connection is worthless on another.
    """

    def recordProof(self) -> bytes:
        """
        Let the legitimate client connect, and keep the C{PROOF} frame it sent.
        """
        honest = self.attack(self.legitimate, onFrame=answerChallenge())
        self.assertEqual(len(honest.serverApp.connected), 1)
        proofFrame = honest.attacker.sent[-1]
        self.assertEqual(proofFrame[1], FrameType.PROOF)
        honest.serverTLS.loseConnection()
        honest.pump.flush()
        return proofFrame

    def replay(self, identity: Identity, recorded: bytes) -> ScriptedClientConnection:
        def onFrame(peer: ScriptedPeer, frame: Frame) -> None:
            if isinstance(frame, Challenge):
                peer.sendRaw(recorded)

        return self.attack(identity, onFrame=onFrame)

    def test_replayWithAnotherCertificate(self) -> None:
        """
        An attacker with its own certificate replays a recorded proof:
        C{bad_signature}.
        """
        recorded = self.recordProof()
        self.assertRefused(
            self.replay(self.attackerIdentity, recorded), ErrorCode.bad_signature
        )

    def test_replayWithTheSameKey(self) -> None:
        """
        Even on a connection whose certificate has the proof's key, a proof
        made for another connection (another challenge, another exporter)
        fails: C{bad_signature}.
        """
        recorded = self.recordProof()
        self.assertRefused(
            self.replay(self.legitimate, recorded), ErrorCode.bad_signature
        )

    def test_otherExporter(self) -> None:
        """
        A proof over this connection's challenge but another connection's
        exporter value fails.
        """

        def proof(peer: ScriptedPeer, frame: Challenge) -> Proof:
            payload = signedPayload(
                Role.client,
                "acme",
                "billing",
                self.legitimate.algorithm.name,
                self.legitimate.publicKey.blob,
                frame.challenge,
                b"\x00" * 32,
            )
            return Proof(
                "acme",
                "billing",
                self.legitimate.algorithm.name,
                self.legitimate.publicKey.blob,
                self.legitimate.sign(payload),
            )

        self.assertRefused(
            self.attack(self.legitimate, onFrame=answerChallenge(proof)),
            ErrorCode.bad_signature,
        )

    def test_otherChallenge(self) -> None:
        def proof(peer: ScriptedPeer, frame: Challenge) -> Proof:
            return makeProof(self.legitimate, Role.client, b"\x01" * 32, peer.exporter)

        self.assertRefused(
            self.attack(self.legitimate, onFrame=answerChallenge(proof)),
            ErrorCode.bad_signature,
        )

    def test_reflectedRole(self) -> None:
        """
        A proof made for the server's role does not pass as a client's.
        """

        def proof(peer: ScriptedPeer, frame: Challenge) -> Proof:
            return makeProof(
                self.legitimate, Role.server, frame.challenge, peer.exporter
            )

        self.assertRefused(
            self.attack(self.legitimate, onFrame=answerChallenge(proof)),
            ErrorCode.bad_signature,
        )

    def test_reflectedServerProof(self) -> None:
        """
        The server's own proof, sent back to it, fails.
        """

        def onFrame(peer: ScriptedPeer, frame: Frame) -> None:
            if isinstance(frame, Challenge):
                peer.sendFrame(ProofFrame(frame.proof))

        self.assertRefused(
            self.attack(self.server.identity, onFrame=onFrame),
            ErrorCode.bad_signature,
        )


class RelayTests(SynchronousTestCase):
    """
    A man in the middle holding two TLS sessions, each with its own
    certificate, cannot pass proofs from one to the other.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.server = makeService(self.clock, makeIdentity("acme", "ledger"))
        self.client = makeService(self.clock, makeIdentity("acme", "billing"))

    def relayThrough(
        self, relay: Relay, address: str = "server.example:8443"
    ) -> tuple[ScriptedClientConnection, ScriptedServerConnection]:
        toServer = connectScriptedClient(self.clock, self.server, relay.towardServer)
        toClient = connectScriptedServer(
            self.clock, relay.towardClient, self.client, address=address
        )
        flushAll(toServer.pump, toClient.pump)
        return toServer, toClient

    def test_relayToClient(self) -> None:
        """
        The relay passes the server's proof to the client unchanged: the
        client refuses it with C{bad_signature} (the proof's key is not the
        key of the certificate it sees), connects nothing and pins nothing;
        the server connects nothing and stores nothing.
        """
        relay = Relay(makeIdentity("evil", "relay"))
        toServer, toClient = self.relayThrough(relay)
        failure = self.failureResultOf(
            toClient.clientHandshake.whenConnected(), HandshakeFailed
        )
        self.assertIs(failure.value.code, ErrorCode.bad_signature)
        self.assertFalse(failure.value.byPeer)
        self.assertEqual(toClient.clientApp.connected, [])
        self.assertEqual(toServer.serverApp.connected, [])
        self.assertEqual(self.client.store.pins, {})
        self.assertEqual(self.server.store.peers, {})
        self.assertEqual(self.server.fakeApprover.requests, [])
        self.assertIn(ErrorCode.bad_signature.value, relay.towardClient.errorCodes)

    def test_relayToServer(self) -> None:
        """
        A relay that the client trusts (it dialled the relay's own address
        and pinned its key) answers the client with its own proof, over the
        server's challenge, and passes the client's proof on to the server:
        the server refuses it with C{bad_signature}, connects nothing, stores
        nothing and asks no one.
        """

        def ownProof(relay: Relay, frame: Frame) -> Frame:
            if isinstance(frame, Challenge):
                assert relay.helloFromClient is not None
                proof = makeProof(
                    relay.identity,
                    Role.server,
                    relay.helloFromClient.challenge,
                    relay.towardClient.exporter,
                )
                return Challenge(frame.challenge, proof)
            return frame

        relay = Relay(makeIdentity("evil", "relay"), rewriteForClient=ownProof)
        toServer, _ = self.relayThrough(relay, address="relay.example:8443")
        # The client did prove itself, to the relay it meant to talk to...
        self.assertTrue(
            any(isinstance(f, ProofFrame) for f in relay.towardClient.frames)
        )
        # ...but that proof is worthless to the server.
        self.assertEqual(relay.towardServer.errorCodes, [ErrorCode.bad_signature.value])
        failure = self.failureResultOf(
            toServer.serverHandshake.whenConnected(), HandshakeFailed
        )
        self.assertIs(failure.value.code, ErrorCode.bad_signature)
        self.assertEqual(toServer.serverApp.connected, [])
        self.assertEqual(toServer.serverApp.received, b"")
        self.assertEqual(self.server.store.peers, {})
        self.assertEqual(self.server.fakeApprover.requests, [])

    def keyHoldingRelay(
        self,
        towardClient: Identity,
        towardServer: Identity,
        rewriteForClient: Callable[[Relay, Frame], Frame] | None = None,
    ) -> Relay:
        """
        A relay whose TLS sessions present C{towardClient}'s certificate to
        the client and C{towardServer}'s to the server, so that the
        certificate-key check passes on both sides: only the exporter value
        in the signed payload tells the two sessions apart.
        """
        relay = Relay(towardClient, rewriteForClient=rewriteForClient)
        relay.towardServer = ScriptedPeer(towardServer, onFrame=relay._fromServer)
        return relay

    def test_relayToClientWithTheServersKey(self) -> None:
        """
        A relay presenting the server's own key to the client passes the
        server's proof on unchanged: the proof's key is the certificate's,
        its names, role and the client's challenge are right, but it signs
        the exporter value of the other TLS session, so the client refuses
        it with C{bad_signature}: no application is connected, nothing is
        pinned or stored, and no one is asked.
        """
        relay = self.keyHoldingRelay(
            self.server.identity, makeIdentity("evil", "relay")
        )
        toServer, toClient = self.relayThrough(relay)
        failure = self.failureResultOf(
            toClient.clientHandshake.whenConnected(), HandshakeFailed
        )
        self.assertIs(failure.value.code, ErrorCode.bad_signature)
        self.assertFalse(failure.value.byPeer)
        self.assertEqual(toClient.clientApp.connected, [])
        self.assertEqual(toServer.serverApp.connected, [])
        self.assertEqual(self.client.store.pins, {})
        self.assertEqual(self.server.store.peers, {})
        self.assertEqual(self.server.fakeApprover.requests, [])

    def test_relayToServerWithTheClientsKey(self) -> None:
        """
        A relay that the client trusts, and that presents the client's own
        key to the server, passes the client's proof on unchanged, over the
        server's challenge: key, names, role and challenge are right, but the
        proof signs the exporter value of the client's session with the
        relay, so the server refuses it with C{bad_signature}, connects
        nothing, stores nothing and asks no one.
        """

        def ownProof(relay: Relay, frame: Frame) -> Frame:
            if isinstance(frame, Challenge):
                assert relay.helloFromClient is not None
                proof = makeProof(
                    relay.identity,
                    Role.server,
                    relay.helloFromClient.challenge,
                    relay.towardClient.exporter,
                )
                return Challenge(frame.challenge, proof)
            return frame

        relay = self.keyHoldingRelay(
            makeIdentity("evil", "relay"),
            self.client.identity,
            rewriteForClient=ownProof,
        )
        toServer, _ = self.relayThrough(relay, address="relay.example:8443")
        self.assertTrue(
            any(isinstance(f, ProofFrame) for f in relay.towardClient.frames)
        )
        self.assertEqual(relay.towardServer.errorCodes, [ErrorCode.bad_signature.value])
        failure = self.failureResultOf(
            toServer.serverHandshake.whenConnected(), HandshakeFailed
        )
        self.assertIs(failure.value.code, ErrorCode.bad_signature)
        self.assertEqual(toServer.serverApp.connected, [])
        self.assertEqual(toServer.serverApp.received, b"")
        self.assertEqual(self.server.store.peers, {})
        self.assertEqual(self.server.fakeApprover.requests, [])


class KeySubstitutionTests(AttackCase):
    """
    A proof must be made with the key of the certificate of its TLS session.
    """

    def test_proofWithAnotherKey(self) -> None:
        """
        The proof names and is validly signed by a key other than the
        certificate's.
        """
        other = makeIdentity("evil", "mallory", slot="other")

        def proof(peer: ScriptedPeer, frame: Challenge) -> Proof:
            return signedBy(other, peer, frame)

        self.assertRefused(
            self.attack(onFrame=answerChallenge(proof)), ErrorCode.bad_signature
        )

    def test_approvedKeyNotHeld(self) -> None:
        """
        The proof names the approved key (which the attacker does not hold)
        and is signed with the attacker's own.
        """

        def proof(peer: ScriptedPeer, frame: Challenge) -> Proof:
            return signedBy(
                self.attackerIdentity,
                peer,
                frame,
                org="acme",
                service="billing",
                publicKey=self.legitimate.publicKey.blob,
            )

        self.assertRefused(
            self.attack(onFrame=answerChallenge(proof)), ErrorCode.bad_signature
        )

    def test_certificateKeyOtherSigner(self) -> None:
        """
        The proof names the certificate's key but is signed by another.
        """
        other = makeIdentity("evil", "mallory", slot="other")

        def proof(peer: ScriptedPeer, frame: Challenge) -> Proof:
            return signedBy(
                other, peer, frame, publicKey=self.attackerIdentity.publicKey.blob
            )

        self.assertRefused(
            self.attack(onFrame=answerChallenge(proof)), ErrorCode.bad_signature
        )


class AlgorithmConfusionTests(AttackCase):
    """
    The algorithm a proof names must be the one of its key.
    """

    def confuse(self, algorithm: str, claimed: str) -> None:
        identity = makeIdentity("evil", "mallory", algorithm)

        def proof(peer: ScriptedPeer, frame: Challenge) -> Proof:
            return signedBy(identity, peer, frame, algorithm=claimed)

        self.assertRefused(
            self.attack(identity, onFrame=answerChallenge(proof)),
            ErrorCode.bad_signature,
        )

    def test_ed25519AsECDSA(self) -> None:
        self.confuse("ed25519", "ecdsa-sha2-nistp256")

    def test_p256AsP384(self) -> None:
        self.confuse("ecdsa-p256", "ecdsa-sha2-nistp384")

    def test_p384AsP256(self) -> None:
        self.confuse("ecdsa-p384", "ecdsa-sha2-nistp256")

    def test_rsaAsSHA1(self) -> None:
        """
        An RSA key offered for SHA-1 signatures (C{ssh-rsa}) is refused.
        """
        self.confuse("rsa-3072", "ssh-rsa")

    def test_unknownAlgorithm(self) -> None:
        self.confuse("ed25519", "ssh-dss")


class SpoofingTests(AttackCase):
    """
    A client cannot claim a name it did not sign, nor a name whose approved
    key is another.
    """

    def test_nameNotSigned(self) -> None:
        """
        The signature covers C{evil/mallory}; the frame claims
        C{acme/billing}.
        """

        def proof(peer: ScriptedPeer, frame: Challenge) -> Proof:
            identity = self.attackerIdentity
            return signedBy(
                identity,
                peer,
                frame,
                org="acme",
                service="billing",
                claim=(
                    identity.org,
                    identity.service,
                    identity.algorithm.name,
                    identity.publicKey.blob,
                ),
            )

        self.assertRefused(
            self.attack(onFrame=answerChallenge(proof)), ErrorCode.bad_signature
        )

    def test_serviceNotSigned(self) -> None:
        def proof(peer: ScriptedPeer, frame: Challenge) -> Proof:
            identity = self.attackerIdentity
            return signedBy(
                identity,
                peer,
                frame,
                service="admin",
                claim=(
                    identity.org,
                    identity.service,
                    identity.algorithm.name,
                    identity.publicKey.blob,
                ),
            )

        self.assertRefused(
            self.attack(onFrame=answerChallenge(proof)), ErrorCode.bad_signature
        )

    def test_impostor(self) -> None:
        """
        An impostor with its own valid key, honestly proving it, claims
        C{acme/billing}, whose approved key is another: C{identity_changed},
        and no owner is asked.
        """
        impostor = makeIdentity("acme", "billing", slot="impostor")
        self.assertRefused(
            self.attack(impostor, onFrame=answerChallenge()),
            ErrorCode.identity_changed,
        )

    def test_lookalikeName(self) -> None:
        """
        An impostor claiming C{acme/billing} followed by a newline (which
        looks the same to an owner reading the request) is refused as an
        invalid name, and no owner is asked.
        """
        for org, service in [("acme", "billing\n"), ("acme\n", "billing")]:
            impostor = makeIdentity("acme", "x", slot="impostor")

            def proof(
                peer: ScriptedPeer,
                frame: Challenge,
                impostor: Identity = impostor,
                org: str = org,
                service: str = service,
            ) -> Proof:
                return signedBy(impostor, peer, frame, org=org, service=service)

            self.setUp()
            self.assertRefused(
                self.attack(impostor, onFrame=answerChallenge(proof)),
                ErrorCode.protocol_error,
            )

    def test_impostorAfterDenial(self) -> None:
        """
        A name whose only record is a denied key can be claimed by a new key:
        that goes to the owners (it is not a changed identity).
        """
        self.server.store.peers.clear()
        recordDecision(
            self.server.store,
            self.server.identity,
            self.server.identity,
            PeerIdentity("acme", "billing", self.legitimate.publicKey),
            KeyState.denied,
            "10.0.0.1:1234",
        )
        impostor = makeIdentity("acme", "billing", slot="impostor")
        connection = self.attack(impostor, onFrame=answerChallenge())
        self.assertEqual(len(self.server.fakeApprover.requests), 1)
        self.assertEqual(connection.serverApp.connected, [])

    def test_invalidName(self) -> None:
        """
        A claimed name that is not a valid name is a protocol error.
        """

        def proof(peer: ScriptedPeer, frame: Challenge) -> Proof:
            return signedBy(self.attackerIdentity, peer, frame, org="ACME")

        self.assertRefused(
            self.attack(onFrame=answerChallenge(proof)), ErrorCode.protocol_error
        )


# Frames from a hostile client, for the fuzzing test below.

frameTypes = st.sampled_from([1, 2, 3, 4, 5])


@st.composite
def hostileBytes(draw: st.DrawFn) -> tuple[bytes, ErrorCode | None]:
    """
    Bytes a client might send first after TLS, and the code the server must
    answer with (L{None}: none yet, it waits for more until its time-out).
    """
    kind = draw(
        st.sampled_from(
            ["version", "type", "oversized", "body", "outOfOrder", "truncated"]
        )
    )
    rest = draw(st.binary(max_size=64))
    if kind == "version":
        version = draw(st.integers(0, 255).filter(lambda v: v != VERSION))
        # (A broken frame of type ERROR is not answered: see test_v2.py.)
        head = bytes([version]) + draw(
            st.binary(min_size=3, max_size=3).filter(lambda b: b[0] != 5)
        )
        return head + rest, ErrorCode.version_unsupported
    if kind == "type":
        frameType = draw(st.integers(0, 255).filter(lambda t: t not in range(1, 6)))
        length = draw(st.integers(0, 0xFFFF))
        return HEADER.pack(VERSION, frameType, length) + rest, ErrorCode.protocol_error
    if kind == "oversized":
        length = draw(st.integers(MAX_BODY + 1, 0xFFFF))
        frameType = draw(frameTypes.filter(lambda t: t != 5))
        head = HEADER.pack(VERSION, frameType, length)
        return head + rest, ErrorCode.protocol_error
    if kind == "body":
        # A HELLO whose body is not one 32-byte field.
        body = draw(
            st.one_of(
                st.binary(max_size=80),
                st.lists(st.binary(max_size=40), max_size=3).map(
                    lambda fields: encodeFields(*fields)
                ),
            )
        )
        assume(body[:2] != b"\x00\x20" or len(body) != 34)
        return HEADER.pack(VERSION, 1, len(body)) + body, ErrorCode.protocol_error
    if kind == "outOfOrder":
        choices: list[Frame] = [
            Accept(),
            Challenge(b"c" * 32, Proof("a", "b", "c", b"k", b"s")),
            ProofFrame(Proof("acme", "billing", "ssh-ed25519", b"k", b"s")),
        ]
        frame = draw(st.sampled_from(choices))
        return encodeFrame(frame) + rest, ErrorCode.protocol_error
    hello = encodeFrame(Hello(b"h" * 32))
    cut = draw(st.integers(1, len(hello) - 1))
    return hello[:cut], None


class PinnedAddressTests(SynchronousTestCase):
    """
    A client that has pinned a server for the address it dials refuses any
    other key there, even under another name, whose own C{org/service}
    nothing is pinned for: only the address's pin can refuse it.
    """

    def test_anotherServiceAtAPinnedAddress(self) -> None:
        """
        C{acme/ledger} is pinned for the address; then C{evil/ledger}, with
        its own key, answers there: the client refuses it with
        C{identity_changed}, sends no proof, connects nothing and keeps its
        pins as they were.
        """
        clock = Clock()
        # Version 1: the client pins before the server decides.
        client = makeService(clock, makeIdentity("acme", "billing"), versions=(1,))
        server = makeService(clock, makeIdentity("acme", "ledger"))
        first = connect(clock, server, client)
        self.assertEqual(len(first.clientApp.connected), 1)
        pins = dict(client.store.pins)
        self.assertEqual(len(pins), 1)
        impostor = makeService(clock, makeIdentity("evil", "ledger"))
        connection = connect(clock, impostor, client)
        failure = self.failureResultOf(
            connection.clientHandshake.whenConnected(), HandshakeFailed
        )
        self.assertIs(failure.value.code, ErrorCode.identity_changed)
        self.assertFalse(failure.value.byPeer)
        self.assertEqual(connection.clientApp.connected, [])
        self.assertEqual(connection.serverApp.connected, [])
        self.assertEqual(impostor.fakeApprover.requests, [])
        self.assertEqual(client.store.pins, pins)


class MalformedFrameTests(AttackCase):
    """
    Truncated, oversized and garbage frames are refused, and store nothing.
    """

    @settings(
        max_examples=40,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    @given(hostileBytes())
    def test_hostileFirstFrame(self, case: tuple[bytes, ErrorCode | None]) -> None:
        data, code = case
        self.setUp()

        def onTLS(peer: ScriptedPeer) -> None:
            peer.sendRaw(data)

        connection = self.attack(onTLS=onTLS)
        if code is None:
            self.assertEqual(connection.attacker.frames, [])
            self.assertIsNone(connection.attacker.lostReason)
            self.clock.advance(DEFAULT_TIMEOUT)
            connection.pump.flush()
            code = ErrorCode.timeout
        self.assertRefused(connection, code)

    def test_oversizedRefusedBeforeBody(self) -> None:
        """
        A header announcing too big a body is refused at once, without the
        server waiting for the body.
        """

        def onTLS(peer: ScriptedPeer) -> None:
            peer.sendRaw(HEADER.pack(VERSION, FrameType.PROOF, MAX_BODY + 1))

        self.assertRefused(self.attack(onTLS=onTLS), ErrorCode.protocol_error)

    def test_oversizedProof(self) -> None:
        """
        An oversized C{PROOF} after a good C{HELLO}.
        """

        def onFrame(peer: ScriptedPeer, frame: Frame) -> None:
            if isinstance(frame, Challenge):
                peer.sendRaw(HEADER.pack(VERSION, FrameType.PROOF, 0xFFFF))

        self.assertRefused(self.attack(onFrame=onFrame), ErrorCode.protocol_error)

    def test_garbageProof(self) -> None:
        def onFrame(peer: ScriptedPeer, frame: Frame) -> None:
            if isinstance(frame, Challenge):
                body = encodeFields(b"acme", b"billing")
                peer.sendRaw(HEADER.pack(VERSION, FrameType.PROOF, len(body)) + body)

        self.assertRefused(self.attack(onFrame=onFrame), ErrorCode.protocol_error)

    def test_secondHello(self) -> None:
        def onFrame(peer: ScriptedPeer, frame: Frame) -> None:
            if isinstance(frame, Challenge):
                sendHello(peer)

        self.assertRefused(self.attack(onFrame=onFrame), ErrorCode.protocol_error)

    def test_peerError(self) -> None:
        """
        A client that sends C{ERROR} is dropped without an answer.
        """

        def onTLS(peer: ScriptedPeer) -> None:
            peer.sendFrame(Error("denied", "no"))

        connection = self.attack(onTLS=onTLS)
        self.assertEqual(connection.attacker.frames, [])
        self.assertIsNotNone(connection.attacker.lostReason)
        failure = self.failureResultOf(
            connection.serverHandshake.whenConnected(), HandshakeFailed
        )
        self.assertTrue(failure.value.byPeer)
        self.assertNothingHappened(connection)


class StallTests(AttackCase):
    """
    A client that stops mid-handshake is cut off at the handshake time-out,
    which bytes trickling in do not extend.
    """

    def assertCutOffAtTimeout(self, connection: ScriptedClientConnection) -> None:
        self.clock.advance(DEFAULT_TIMEOUT - 0.5)
        connection.pump.flush()
        self.assertEqual(connection.attacker.errorCodes, [])
        self.assertIsNone(connection.attacker.lostReason)
        self.clock.advance(0.5)
        connection.pump.flush()
        self.assertRefused(connection, ErrorCode.timeout)

    def test_silentAfterTLS(self) -> None:
        self.assertCutOffAtTimeout(self.attack(onTLS=None))

    def test_halfAFrame(self) -> None:
        def onTLS(peer: ScriptedPeer) -> None:
            peer.sendRaw(encodeFrame(Hello(b"h" * 32))[:18])

        self.assertCutOffAtTimeout(self.attack(onTLS=onTLS))

    def test_halfAHeader(self) -> None:
        def onTLS(peer: ScriptedPeer) -> None:
            peer.sendRaw(b"\x01\x01")

        self.assertCutOffAtTimeout(self.attack(onTLS=onTLS))

    def test_silentAfterHello(self) -> None:
        """
        A client that says C{HELLO}, gets its C{CHALLENGE}, and never proves
        itself.
        """
        connection = self.attack()
        self.assertEqual([type(f) for f in connection.attacker.frames], [Challenge])
        self.clock.advance(DEFAULT_TIMEOUT)
        connection.pump.flush()
        self.assertRefused(connection, ErrorCode.timeout)

    def test_trickle(self) -> None:
        """
        One byte a second: the deadline does not move.
        """
        connection = self.attack(onTLS=None)
        hello = encodeFrame(Hello(b"h" * 32))
        for i in range(int(DEFAULT_TIMEOUT) - 1):
            connection.attacker.sendRaw(hello[i : i + 1])
            self.clock.advance(1)
            connection.pump.flush()
        self.assertEqual(connection.attacker.errorCodes, [])
        connection.attacker.sendRaw(hello[int(DEFAULT_TIMEOUT) - 1 :][:1])
        self.clock.advance(1)
        connection.pump.flush()
        self.assertRefused(connection, ErrorCode.timeout)

    def test_noTLS(self) -> None:
        """
        A client that opens TCP and never starts TLS is dropped at the
        time-out.
        """
        self.before = snapshot(self.server.store)
        self.requestsBefore = 0
        serverApp = RecordingFactory()
        serverTLS = self.server.authenticator.wrapServerFactory(
            serverApp
        ).buildProtocol(PEER_ADDRESS)
        lost: list[object] = []

        class Silent(Protocol):
            def connectionLost(self, reason: object = None) -> None:
                lost.append(reason)

        _, _, pump = connectedServerAndClient(
            lambda: serverTLS, Silent, greet=False, clock=self.clock
        )
        pump.flush()
        self.clock.advance(DEFAULT_TIMEOUT)
        pump.flush()
        self.assertEqual(len(lost), 1)
        self.assertEqual(serverApp.connected, [])
        self.assertEqual(snapshot(self.server.store), self.before)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_serverStalls(self) -> None:
        """
        A server that never answers C{HELLO}: the client gives up with
        C{timeout}, its application never connected, nothing pinned.
        """
        client = makeService(self.clock, self.legitimate)
        silent = ScriptedPeer(makeIdentity("evil", "mallory"))
        connection = connectScriptedServer(self.clock, silent, client)
        self.assertEqual([type(f) for f in silent.frames], [Hello])
        self.clock.advance(DEFAULT_TIMEOUT)
        connection.pump.flush()
        failure = self.failureResultOf(
            connection.clientHandshake.whenConnected(), HandshakeFailed
        )
        self.assertIs(failure.value.code, ErrorCode.timeout)
        self.assertEqual(silent.errorCodes, [ErrorCode.timeout.value])
        self.assertIsNotNone(silent.lostReason)
        self.assertEqual(connection.clientApp.connected, [])
        self.assertEqual(client.store.pins, {})


class DataBeforeApprovalTests(AttackCase):
    """
    No application byte reaches an application before its peer is
    authenticated and approved.
    """

    def test_rawBytesAfterHello(self) -> None:
        """
        A client that sends application bytes right after C{HELLO}, without
        waiting to prove itself, is refused with C{protocol_error}.
        """

        def onTLS(peer: ScriptedPeer) -> None:
            peer.sendRaw(encodeFrame(Hello(peer.challenge)) + b"hello, server")

        self.assertRefused(self.attack(onTLS=onTLS), ErrorCode.protocol_error)

    def test_rawBytesInsteadOfProof(self) -> None:
        def onFrame(peer: ScriptedPeer, frame: Frame) -> None:
            if isinstance(frame, Challenge):
                peer.sendRaw(b"\x01 application data")

        self.assertRefused(self.attack(onFrame=onFrame), ErrorCode.protocol_error)

    def test_bytesWithBadProof(self) -> None:
        """
        Application bytes sent with a proof that fails are dropped with it.
        """

        def proof(peer: ScriptedPeer, frame: Challenge) -> Proof:
            return makeProof(
                self.legitimate, Role.server, frame.challenge, peer.exporter
            )

        self.assertRefused(
            self.attack(
                self.legitimate,
                onFrame=answerChallenge(proof, after=b"GET /secrets HTTP/1.1\r\n"),
            ),
            ErrorCode.bad_signature,
        )

    def test_bytesWhileRefused(self) -> None:
        """
        An unknown client's application bytes, sent with its proof and after,
        are never seen by the server's application when the owners deny it.
        """
        connection = self.attack(onFrame=answerChallenge(after=b"first "))
        connection.attacker.sendRaw(b"second")
        connection.pump.flush()
        [pending] = self.server.fakeApprover.requests
        pending.deny()
        connection.pump.flush()
        self.assertEqual(connection.attacker.errorCodes, [ErrorCode.denied.value])
        self.assertEqual(connection.serverApp.connected, [])
        self.assertEqual(connection.serverApp.received, b"")

    def test_deniedClientApplication(self) -> None:
        """
        A real client whose application writes as soon as it can, refused by
        a C{known-only} server: the server's application never sees a byte.
        """
        clock = Clock()
        server = makeService(
            clock, makeIdentity("acme", "ledger"), approver=KnownOnlyApprover()
        )
        # Version 1: the client connects before the server decides.
        client = makeService(clock, self.attackerIdentity, versions=(1,))
        clientApp = RecordingFactory([b"DROP TABLE peers;"])
        connection = connect(clock, server, client, clientApp=clientApp)
        [app] = clientApp.protocols
        self.assertTrue(app.connected)
        app.transport.write(b" and more")
        connection.flush()
        self.assertEqual(connection.serverApp.connected, [])
        self.assertEqual(connection.serverApp.received, b"")
        self.assertEqual(server.store.peers, {})

    def test_serverBytesBeforeAccept(self) -> None:
        """
        A server that sends application bytes before C{ACCEPT}: the client's
        application never sees them, and loses its connection with
        C{protocol_error}.
        """
        client = makeService(self.clock, self.legitimate)
        serverIdentity = makeIdentity("acme", "ledger")

        def onFrame(peer: ScriptedPeer, frame: Frame) -> None:
            if isinstance(frame, Hello):
                proof = makeProof(
                    serverIdentity, Role.server, frame.challenge, peer.exporter
                )
                peer.sendFrame(Challenge(b"s" * 32, proof))
            elif isinstance(frame, ProofFrame):
                peer.sendRaw(b"unauthenticated bytes")
                peer.sendFrame(Accept())

        fake = ScriptedPeer(serverIdentity, onFrame=onFrame)
        connection = connectScriptedServer(self.clock, fake, client)
        [app] = connection.clientApp.protocols
        self.assertTrue(app.connected)
        self.assertEqual(app.received, b"")
        assert app.lostReason is not None
        failed = app.lostReason.value
        assert isinstance(failed, HandshakeFailed)
        # Which of the two codes is DataBeforeApprovalTests.test_rawBytesAfterHello's
        # business; here, what matters is that no byte got through.
        self.assertIn(
            failed.code, [ErrorCode.protocol_error, ErrorCode.version_unsupported]
        )
        self.assertFalse(failed.byPeer)
        # The client has sent its proof, and may have sent application bytes
        # after it: the server would read an ERROR frame as application data,
        # so the client just closes.
        self.assertEqual(fake.errorCodes, [])
        self.assertIsNotNone(fake.lostReason)


class KnownClientTests(SynchronousTestCase):
    """
    Attacks on a service whose store already knows a client key, through a
    real client.
    """

    def test_revokedKeyNeverAsks(self) -> None:
        """
        A revoked key is refused with C{revoked} and never goes back to the
        owners.
        """
        clock = Clock()
        server: Service = makeService(clock, makeIdentity("acme", "ledger"))
        # Version 1: the client connects before the server decides.
        client = makeService(clock, makeIdentity("acme", "billing"), versions=(1,))
        recordDecision(
            server.store,
            server.identity,
            server.identity,
            PeerIdentity("acme", "billing", client.identity.publicKey),
            KeyState.revoked,
            "10.0.0.1:1234",
        )
        connection = connect(clock, server, client, clientApp=RecordingFactory([b"x"]))
        [app] = connection.clientApp.protocols
        assert app.lostReason is not None
        failed = app.lostReason.value
        assert isinstance(failed, HandshakeFailed)
        self.assertIs(failed.code, ErrorCode.revoked)
        self.assertEqual(server.fakeApprover.requests, [])
        self.assertEqual(connection.serverApp.received, b"")
        self.assertIs(
            server.store.peers[client.identity.fingerprint].state, KeyState.revoked
        )
