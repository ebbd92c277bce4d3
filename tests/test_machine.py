"""
Tests for L{dwtrust._machine}: the handshake machines driven directly, with a
recording L{Effects}.  No TLS, no transport, no clock.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from attrs import define, field
from twisted.trial.unittest import SynchronousTestCase

from dwtrust._identity import PeerIdentity
from dwtrust._machine import (
    ClientHandshake,
    Core,
    ServerHandshake,
    buildClient,
    buildServer,
)
from dwtrust._proof import makeProof
from dwtrust._tls import Channel
from dwtrust._wire import (
    CHALLENGE_SIZE,
    Accept,
    Challenge,
    Error,
    ErrorCode,
    Frame,
    Hello,
    Proof,
    ProofFrame,
    Role,
)

from .helpers import makeIdentity

SERVER = makeIdentity("acme", "ledger")
CLIENT = makeIdentity("acme", "billing")
EXPORTER = b"E" * 32
SERVER_CHANNEL = Channel(EXPORTER, CLIENT.publicKey, "TLSv1.3")
CLIENT_CHANNEL = Channel(EXPORTER, SERVER.publicKey, "TLSv1.3")
CLIENT_CHALLENGE = b"c" * CHALLENGE_SIZE
SERVER_CHALLENGE = b"s" * CHALLENGE_SIZE

newServer = buildServer()
newClient = buildClient()


@define
class RecordingEffects:
    """
    An L{Effects} that records every call, in order.
    """

    calls: list[tuple[str, Any]] = field(factory=list)

    def sendFrame(self, frame: Frame) -> None:
        self.calls.append(("sendFrame", frame))

    def requestDecision(self, peer: PeerIdentity) -> None:
        self.calls.append(("requestDecision", peer))

    def cancelDecision(self) -> None:
        self.calls.append(("cancelDecision", None))

    def connectApplication(self, peer: PeerIdentity) -> None:
        self.calls.append(("connectApplication", peer))

    def established(self) -> None:
        self.calls.append(("established", None))

    def fail(self, code: ErrorCode, message: str, send: bool, byPeer: bool) -> None:
        self.calls.append(("fail", (code, message, send, byPeer)))

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]

    def failures(self) -> list[tuple[ErrorCode, str, bool, bool]]:
        return [args for name, args in self.calls if name == "fail"]

    def clear(self) -> None:
        del self.calls[:]


def randomBytes(sequence: list[bytes]) -> Callable[[int], bytes]:
    def take(n: int) -> bytes:
        value = sequence.pop(0)
        assert len(value) == n
        return value

    return take


def clientProof(challenge: bytes = SERVER_CHALLENGE) -> Proof:
    return makeProof(CLIENT, Role.client, challenge, EXPORTER)


def serverProof(challenge: bytes = CLIENT_CHALLENGE) -> Proof:
    return makeProof(SERVER, Role.server, challenge, EXPORTER)


# Every frame of each type, whether or not its role may receive it.
ANY_PROOF = Proof("acme", "billing", "ssh-ed25519", b"k", b"s")
FRAMES: dict[str, Frame] = {
    "HELLO": Hello(CLIENT_CHALLENGE),
    "CHALLENGE": Challenge(SERVER_CHALLENGE, ANY_PROOF),
    "PROOF": ProofFrame(ANY_PROOF),
    "ACCEPT": Accept(),
}


def feedServer(machine: ServerHandshake, frame: Frame) -> None:
    """
    Give the server machine a frame the way the protocol does.
    """
    if isinstance(frame, Hello):
        machine.hello(frame)
    elif isinstance(frame, ProofFrame):
        machine.proof(frame)
    elif isinstance(frame, Error):
        machine.error(frame)
    else:
        machine.unexpected(frame)


def feedClient(machine: ClientHandshake, frame: Frame) -> None:
    if isinstance(frame, Challenge):
        machine.challenge(frame)
    elif isinstance(frame, Accept):
        machine.accept(frame)
    elif isinstance(frame, Error):
        machine.error(frame)
    else:
        machine.unexpected(frame)


def serverIn(state: str) -> tuple[ServerHandshake, RecordingEffects]:
    """
    A server machine driven to C{state}, and its effects with the record
    cleared.
    """
    effects = RecordingEffects()
    machine = newServer(Core(SERVER, effects, randomBytes([SERVER_CHALLENGE])))
    steps: list[Callable[[], None]] = [
        lambda: machine.tlsReady(SERVER_CHANNEL),
        lambda: machine.hello(Hello(CLIENT_CHALLENGE)),
        lambda: machine.proof(ProofFrame(clientProof())),
        machine.trusted,
    ]
    order = ["AwaitingTLS", "AwaitingHello", "AwaitingProof", "Deciding", "Established"]
    if state == "Failed":
        machine.refuse(ErrorCode.protocol_error, "test")
    else:
        for step in steps[: order.index(state)]:
            step()
    if state == "Deciding":
        assert effects.names()[-1] == "requestDecision", effects.calls
    effects.clear()
    return machine, effects


def clientIn(state: str) -> tuple[ClientHandshake, RecordingEffects]:
    effects = RecordingEffects()
    machine = newClient(Core(CLIENT, effects, randomBytes([CLIENT_CHALLENGE])))
    steps: list[Callable[[], None]] = [
        lambda: machine.tlsReady(CLIENT_CHANNEL),
        lambda: machine.challenge(Challenge(SERVER_CHALLENGE, serverProof())),
        machine.trusted,
        lambda: machine.accept(Accept()),
    ]
    order = [
        "AwaitingTLS",
        "AwaitingChallenge",
        "Checking",
        "AwaitingAccept",
        "Established",
    ]
    if state == "Failed":
        machine.refuse(ErrorCode.protocol_error, "test")
    else:
        for step in steps[: order.index(state)]:
            step()
    if state == "Checking":
        assert effects.names()[-1] == "requestDecision", effects.calls
    effects.clear()
    return machine, effects


SERVER_HANDSHAKING = ["AwaitingTLS", "AwaitingHello", "AwaitingProof", "Deciding"]
CLIENT_HANDSHAKING = ["AwaitingTLS", "AwaitingChallenge", "Checking", "AwaitingAccept"]
#: States whose failures send no C{ERROR} frame: a client that has sent its
#: C{PROOF} may already have sent application bytes after it, so the server
#: reads whatever follows as application data.
SILENT = {"AwaitingAccept"}
SERVER_EXPECTS = {"AwaitingHello": "HELLO", "AwaitingProof": "PROOF"}
CLIENT_EXPECTS = {"AwaitingChallenge": "CHALLENGE", "AwaitingAccept": "ACCEPT"}


class ServerSuccessTests(SynchronousTestCase):
    """
    The server machine's way through a good handshake.
    """

    def test_handshake(self) -> None:
        effects = RecordingEffects()
        machine = newServer(Core(SERVER, effects, randomBytes([SERVER_CHALLENGE])))
        machine.tlsReady(SERVER_CHANNEL)
        self.assertEqual(effects.calls, [])

        machine.hello(Hello(CLIENT_CHALLENGE))
        [(name, challenge)] = effects.calls
        self.assertEqual(name, "sendFrame")
        assert isinstance(challenge, Challenge)
        self.assertEqual(challenge.challenge, SERVER_CHALLENGE)
        self.assertEqual(challenge.proof, serverProof())
        effects.clear()

        machine.proof(ProofFrame(clientProof()))
        [(name, peer)] = effects.calls
        self.assertEqual(name, "requestDecision")
        self.assertEqual(peer, PeerIdentity("acme", "billing", CLIENT.publicKey))
        effects.clear()

        machine.trusted()
        self.assertEqual(
            effects.calls,
            [
                ("sendFrame", Accept()),
                ("connectApplication", peer),
                ("established", None),
            ],
        )

    def test_badProof(self) -> None:
        """
        A proof over another challenge fails with C{bad_signature}, and no
        decision is asked for.
        """
        machine, effects = serverIn("AwaitingProof")
        machine.proof(ProofFrame(clientProof(challenge=b"x" * CHALLENGE_SIZE)))
        self.assertEqual(effects.names(), ["fail"])
        [(code, _, send, byPeer)] = effects.failures()
        self.assertIs(code, ErrorCode.bad_signature)
        self.assertTrue(send)
        self.assertFalse(byPeer)

    def test_badName(self) -> None:
        """
        A proof claiming a name that is not allowed is a protocol error.
        """
        machine, effects = serverIn("AwaitingProof")
        proof = clientProof()
        bad = Proof(
            "ACME", proof.service, proof.algorithm, proof.publicKey, proof.signature
        )
        machine.proof(ProofFrame(bad))
        [(code, _, _, _)] = effects.failures()
        self.assertIs(code, ErrorCode.protocol_error)
        self.assertNotIn("requestDecision", effects.names())


class ClientSuccessTests(SynchronousTestCase):
    """
    The client machine's way through a good handshake.
    """

    def test_handshake(self) -> None:
        effects = RecordingEffects()
        machine = newClient(Core(CLIENT, effects, randomBytes([CLIENT_CHALLENGE])))
        machine.tlsReady(CLIENT_CHANNEL)
        self.assertEqual(effects.calls, [("sendFrame", Hello(CLIENT_CHALLENGE))])
        effects.clear()

        machine.challenge(Challenge(SERVER_CHALLENGE, serverProof()))
        server = PeerIdentity("acme", "ledger", SERVER.publicKey)
        self.assertEqual(effects.calls, [("requestDecision", server)])
        effects.clear()

        machine.trusted()
        self.assertEqual(
            effects.calls,
            [
                ("sendFrame", ProofFrame(clientProof())),
                ("connectApplication", server),
            ],
        )
        effects.clear()

        machine.accept(Accept())
        self.assertEqual(effects.calls, [("established", None)])

    def test_badServerProof(self) -> None:
        """
        A server proof made for the client role (a reflected proof) fails with
        C{bad_signature}.
        """
        machine, effects = clientIn("AwaitingChallenge")
        reflected = makeProof(SERVER, Role.client, CLIENT_CHALLENGE, EXPORTER)
        machine.challenge(Challenge(SERVER_CHALLENGE, reflected))
        [(code, _, send, byPeer)] = effects.failures()
        self.assertIs(code, ErrorCode.bad_signature)
        self.assertTrue(send)
        self.assertFalse(byPeer)
        self.assertNotIn("requestDecision", effects.names())


class OutOfOrderTests(SynchronousTestCase):
    """
    Every frame a role does not expect in a state fails the handshake with
    C{protocol_error}; once the handshake is over, frames do nothing.
    """

    def assertProtocolError(
        self, effects: RecordingEffects, state: str, deciding: bool, context: str
    ) -> None:
        expected = ["cancelDecision", "fail"] if deciding else ["fail"]
        self.assertEqual(effects.names(), expected, context)
        [(code, _, send, byPeer)] = effects.failures()
        self.assertIs(code, ErrorCode.protocol_error, context)
        self.assertEqual(send, state not in SILENT, context)
        self.assertFalse(byPeer, context)

    def checkServer(self, states: list[str]) -> None:
        for state in states:
            for name, frame in FRAMES.items():
                if SERVER_EXPECTS.get(state) == name:
                    continue
                machine, effects = serverIn(state)
                feedServer(machine, frame)
                self.assertProtocolError(
                    effects, state, state == "Deciding", f"{name} in {state}"
                )
                # And the machine is done: nothing more happens.
                effects.clear()
                machine.timedOut()
                machine.trusted()
                feedServer(machine, FRAMES["HELLO"])
                self.assertEqual(effects.calls, [], f"after {name} in {state}")

    def checkClient(self, states: list[str]) -> None:
        for state in states:
            for name, frame in FRAMES.items():
                if CLIENT_EXPECTS.get(state) == name:
                    continue
                machine, effects = clientIn(state)
                feedClient(machine, frame)
                self.assertProtocolError(
                    effects, state, state == "Checking", f"{name} in {state}"
                )
                effects.clear()
                machine.timedOut()
                machine.trusted()
                feedClient(machine, FRAMES["ACCEPT"])
                self.assertEqual(effects.calls, [], f"after {name} in {state}")

    def test_server(self) -> None:
        self.checkServer(["AwaitingTLS", "AwaitingHello", "AwaitingProof"])

    def test_serverWhileDeciding(self) -> None:
        """
        A frame out of order while the decision is awaited also cancels the
        decision: nothing is left waiting on the owners for a connection that
        failed.
        """
        self.checkServer(["Deciding"])

    def test_client(self) -> None:
        self.checkClient(["AwaitingTLS", "AwaitingChallenge", "AwaitingAccept"])

    def test_clientWhileChecking(self) -> None:
        """
        A frame out of order while the client checks its pins (for instance
        an C{ACCEPT} sent straight after the C{CHALLENGE}) cancels the check.
        """
        self.checkClient(["Checking"])

    def test_ignoredOnceOver(self) -> None:
        """
        In C{Established} and C{Failed}, every input does nothing.
        """
        for state in ["Established", "Failed"]:
            server, serverEffects = serverIn(state)
            for frame in [*FRAMES.values(), Error("denied", "no")]:
                feedServer(server, frame)
            server.timedOut()
            server.lost()
            server.trusted()
            server.refuse(ErrorCode.denied, "late")
            server.tlsReady(SERVER_CHANNEL)
            self.assertEqual(serverEffects.calls, [], state)

            client, clientEffects = clientIn(state)
            for frame in [*FRAMES.values(), Error("denied", "no")]:
                feedClient(client, frame)
            client.timedOut()
            client.lost()
            client.trusted()
            client.refuse(ErrorCode.denied, "late")
            client.tlsReady(CLIENT_CHANNEL)
            self.assertEqual(clientEffects.calls, [], state)


class PeerErrorTests(SynchronousTestCase):
    """
    An C{ERROR} frame from the peer fails the handshake with the peer's code,
    without sending one back; a pending decision is cancelled.
    """

    def check(
        self,
        machines: Callable[[str], tuple[Any, RecordingEffects]],
        feed: Callable[[Any, Frame], None],
        states: list[str],
        deciding: str,
    ) -> None:
        for state in states:
            for code in [ErrorCode.denied, ErrorCode.timeout, ErrorCode.pending]:
                machine, effects = machines(state)
                feed(machine, Error(code.value, "peer says"))
                expected = ["cancelDecision", "fail"] if state == deciding else ["fail"]
                self.assertEqual(effects.names(), expected, state)
                self.assertEqual(
                    effects.failures(), [(code, "peer says", False, True)], state
                )
                self.assertNotIn("sendFrame", effects.names())

    def test_server(self) -> None:
        self.check(
            serverIn,
            feedServer,
            ["AwaitingTLS", "AwaitingHello", "AwaitingProof"],
            "Deciding",
        )

    def test_serverWhileDeciding(self) -> None:
        """
        The peer's C{ERROR} while the decision is awaited cancels the
        decision, as losing the connection does.
        """
        self.check(serverIn, feedServer, ["Deciding"], "Deciding")

    def test_client(self) -> None:
        self.check(
            clientIn,
            feedClient,
            ["AwaitingTLS", "AwaitingChallenge", "AwaitingAccept"],
            "Checking",
        )

    def test_clientWhileChecking(self) -> None:
        """
        The server's C{ERROR} while the client checks its pins cancels the
        check.
        """
        self.check(clientIn, feedClient, ["Checking"], "Checking")

    def test_unknownCode(self) -> None:
        """
        A code this version does not know reads as C{protocol_error}, and the
        code is kept in the message.
        """
        machine, effects = clientIn("AwaitingChallenge")
        machine.error(Error("from_the_future", "?"))
        [(code, message, send, byPeer)] = effects.failures()
        self.assertIs(code, ErrorCode.protocol_error)
        self.assertIn("from_the_future", message)
        self.assertEqual((send, byPeer), (False, True))


class TimeoutTests(SynchronousTestCase):
    """
    A time-out fails the handshake with C{timeout}; while a decision is
    awaited, the decision is cancelled and the code says why it took long:
    C{pending} (the server's owners have not decided) or C{unavailable} (the
    client's own pin store did not answer).
    """

    def check(
        self,
        machines: Callable[[str], tuple[Any, RecordingEffects]],
        states: list[str],
        deciding: str,
        decidingCode: ErrorCode,
    ) -> None:
        for state in states:
            machine, effects = machines(state)
            machine.timedOut()
            if state == deciding:
                self.assertEqual(effects.names(), ["cancelDecision", "fail"])
                [(code, _, send, byPeer)] = effects.failures()
                self.assertIs(code, decidingCode)
            else:
                self.assertEqual(effects.names(), ["fail"], state)
                [(code, _, send, byPeer)] = effects.failures()
                self.assertIs(code, ErrorCode.timeout, state)
            self.assertEqual(send, state not in SILENT, state)
            self.assertFalse(byPeer)
            effects.clear()
            machine.trusted()
            self.assertEqual(effects.calls, [], "a late decision does nothing")

    def test_server(self) -> None:
        self.check(serverIn, SERVER_HANDSHAKING, "Deciding", ErrorCode.pending)

    def test_client(self) -> None:
        self.check(clientIn, CLIENT_HANDSHAKING, "Checking", ErrorCode.unavailable)


class LostTests(SynchronousTestCase):
    """
    Losing the connection ends the handshake quietly, cancelling a decision
    being awaited.
    """

    def check(
        self,
        machines: Callable[[str], tuple[Any, RecordingEffects]],
        states: list[str],
        deciding: str,
    ) -> None:
        for state in states:
            machine, effects = machines(state)
            machine.lost()
            expected = ["cancelDecision"] if state == deciding else []
            self.assertEqual(effects.names(), expected, state)
            effects.clear()
            machine.trusted()
            machine.timedOut()
            self.assertEqual(effects.calls, [], state)

    def test_server(self) -> None:
        self.check(serverIn, SERVER_HANDSHAKING, "Deciding")

    def test_client(self) -> None:
        self.check(clientIn, CLIENT_HANDSHAKING, "Checking")


class RefuseTests(SynchronousTestCase):
    """
    A refusal (bad bytes, or a decision that says no) fails the handshake
    with its code, sending an C{ERROR} unless the peer no longer reads
    frames.
    """

    def check(
        self,
        machines: Callable[[str], tuple[Any, RecordingEffects]],
        states: list[str],
        deciding: str,
    ) -> None:
        for state in states:
            machine, effects = machines(state)
            machine.refuse(ErrorCode.denied, "no")
            expected = ["cancelDecision", "fail"] if state == deciding else ["fail"]
            self.assertEqual(effects.names(), expected, state)
            self.assertEqual(
                effects.failures(),
                [(ErrorCode.denied, "no", state not in SILENT, False)],
                state,
            )

    def test_server(self) -> None:
        self.check(serverIn, SERVER_HANDSHAKING, "Deciding")

    def test_client(self) -> None:
        self.check(clientIn, CLIENT_HANDSHAKING, "Checking")
