"""
The handshake state machines, one per role, written with Automat.

They do no I/O.  A thin protocol (L{dwtrust._protocol}) feeds them the TLS
channel, the frames it decodes, trust decisions, time-outs and disconnection,
and carries out what they ask for through L{Effects}.

The exchange, after the TLS handshake::

    client                                  server
      HELLO(client challenge)          -->
                                       <--  CHALLENGE(server challenge,
                                                      server proof)
      [verify server, check pin]
      PROOF(client proof)              -->
      [application connected; its
       bytes follow, held by the server]
                                            [verify client, ask the
                                             trust store and approver]
                                       <--  ACCEPT, then application data
                                            (or ERROR, then close)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from automat import TypeMachineBuilder, pep614

from ._identity import Identity, PeerIdentity
from ._proof import ProofRejected, makeProof, verifyProof
from ._tls import Channel
from ._wire import (
    CHALLENGE_SIZE,
    EXPLANATIONS,
    Accept,
    Challenge,
    Error,
    ErrorCode,
    Frame,
    Hello,
    ProofFrame,
    Role,
)

if TYPE_CHECKING:
    from automat._typed import TypedState


class Refusal(Exception):
    """
    A trust decision that says no.

    @ivar code: the L{ErrorCode} sent to the peer.
    @ivar message: a plain explanation, sent to the peer too.
    """

    def __init__(self, code: ErrorCode, message: str | None = None) -> None:
        self.code = code
        self.message = message if message is not None else EXPLANATIONS[code]
        super().__init__(f"{code.value}: {self.message}")


class Effects(Protocol):
    """
    What a handshake machine asks its protocol to do.
    """

    def sendFrame(self, frame: Frame) -> None:
        """
        Send a handshake frame.
        """

    def requestDecision(self, peer: PeerIdentity) -> None:
        """
        Ask whether C{peer} is trusted; answer with C{decided}.
        """

    def cancelDecision(self) -> None:
        """
        Abandon an outstanding decision.
        """

    def connectApplication(self, peer: PeerIdentity) -> None:
        """
        Connect the application protocol; it may write from now on.
        """

    def established(self) -> None:
        """
        The handshake is over: deliver received application bytes.
        """

    def fail(self, code: ErrorCode, message: str, send: bool, byPeer: bool) -> None:
        """
        Close the connection because of C{code}, first sending an C{ERROR}
        frame if C{send}.  C{byPeer} says the peer refused us.
        """


@dataclass
class Core:
    """
    What a handshake machine knows, in either role.
    """

    identity: Identity
    effects: Effects
    randomBytes: Callable[[int], bytes]
    channel: Channel | None = None
    ourChallenge: bytes = b""
    theirChallenge: bytes = b""
    peer: PeerIdentity | None = field(default=None)


class Handshake(Protocol):
    """
    The inputs common to both roles.
    """

    def tlsReady(self, channel: Channel) -> None:
        "The TLS handshake finished on C{channel}."

    def unexpected(self, frame: Frame) -> None:
        "A frame of a type this role never receives."

    def error(self, frame: Error) -> None:
        "The peer failed the handshake."

    def refuse(self, code: ErrorCode, message: str) -> None:
        "Fail the handshake: bad bytes, a rejected proof, or a refusal."

    def trusted(self) -> None:
        "The trust decision says go on."

    def timedOut(self) -> None:
        "The handshake (or the wait for approval) took too long."

    def lost(self) -> None:
        "The connection is gone."

    def _verified(self, peer: PeerIdentity) -> None:
        "The peer's proof checked out."


class ServerHandshake(Handshake, Protocol):
    def hello(self, frame: Hello) -> None:
        "The client's auth request."

    def proof(self, frame: ProofFrame) -> None:
        "The client's proof."


class ClientHandshake(Handshake, Protocol):
    def challenge(self, frame: Challenge) -> None:
        "The server's challenge and proof."

    def accept(self, frame: Accept) -> None:
        "The server accepted us."


def _verify(
    machine: Handshake, core: Core, frame: ProofFrame | Challenge, role: Role
) -> None:
    assert core.channel is not None
    try:
        peer = verifyProof(frame.proof, role, core.ourChallenge, core.channel)
    except ProofRejected as e:
        machine.refuse(e.code, e.message)
    else:
        core.peer = peer
        machine._verified(peer)


def _registerCommon(
    builder: TypeMachineBuilder[Any, Core],
    inputs: Any,
    handshaking: list[TypedState[Any, Core]],
    deciding: TypedState[Any, Core],
    decidingTimeout: ErrorCode,
    silent: list[TypedState[Any, Core]],
    done: list[TypedState[Any, Core]],
    failed: TypedState[Any, Core],
    frameInputs: list[Callable[..., None]],
    expected: set[tuple[TypedState[Any, Core], Callable[..., None]]],
) -> None:
    """
    Register what both roles do the same way: refusals, the peer's errors,
    time-outs, disconnection, frames out of order, and anything arriving once
    the handshake is over.

    @param deciding: the state that waits for a trust decision, which is
        cancelled when the handshake fails there.
    @param decidingTimeout: the code for running out of time there.
    @param silent: states in which a failure closes without an C{ERROR}
        frame, because the peer no longer reads frames (a client after its
        C{PROOF}: the server takes what follows as application data).
    """

    def failing(
        whileDeciding: bool, send: bool
    ) -> Callable[[Handshake, Core, ErrorCode, str], None]:
        def fail(m: Handshake, core: Core, code: ErrorCode, message: str) -> None:
            if whileDeciding:
                core.effects.cancelDecision()
            core.effects.fail(code, message, send, False)

        return fail

    for state in handshaking:
        fail = failing(state is deciding, state not in silent)

        def refuse(
            m: Handshake, core: Core, code: ErrorCode, message: str, fail: Any = fail
        ) -> None:
            fail(m, core, code, message)

        def timedOut(
            m: Handshake, core: Core, fail: Any = fail, state: Any = state
        ) -> None:
            code = decidingTimeout if state is deciding else ErrorCode.timeout
            fail(m, core, code, EXPLANATIONS[code])

        def outOfOrder(
            m: Handshake, core: Core, frame: Frame, fail: Any = fail
        ) -> None:
            fail(
                m, core, ErrorCode.protocol_error, f"unexpected {frame.type.name} frame"
            )

        def peerFailed(
            m: Handshake, core: Core, frame: Error, state: Any = state
        ) -> None:
            if state is deciding:
                core.effects.cancelDecision()
            core.effects.fail(frame.errorCode, frame.explanation, False, True)

        def lost(m: Handshake, core: Core, state: Any = state) -> None:
            if state is deciding:
                core.effects.cancelDecision()

        state.upon(inputs.refuse).to(failed)(refuse)
        state.upon(inputs.timedOut).to(failed)(timedOut)
        state.upon(inputs.lost).to(failed)(lost)
        state.upon(inputs.error).to(failed)(peerFailed)
        state.upon(inputs.unexpected).to(failed)(outOfOrder)
        for frameInput in frameInputs:
            if (state, frameInput) not in expected:
                state.upon(frameInput).to(failed)(outOfOrder)

    def ignore(m: Handshake, core: Core, *args: object) -> None:
        pass

    for state in [*done, failed]:
        for each in [
            inputs.refuse,
            inputs.timedOut,
            inputs.lost,
            inputs.error,
            inputs.unexpected,
            inputs.trusted,
            inputs.tlsReady,
            *frameInputs,
        ]:
            state.upon(each).loop()(ignore)


def buildServer() -> Callable[[Core], ServerHandshake]:
    """
    Build the server's machine; call the result with a L{Core} for each
    connection.
    """
    builder = TypeMachineBuilder(ServerHandshake, Core)
    awaitingTLS = builder.state("AwaitingTLS")
    awaitingHello = builder.state("AwaitingHello")
    awaitingProof = builder.state("AwaitingProof")
    verifying = builder.state("Verifying")
    deciding = builder.state("Deciding")
    established = builder.state("Established")
    failed = builder.state("Failed")

    @pep614(awaitingTLS.upon(ServerHandshake.tlsReady).to(awaitingHello))
    def bind(m: ServerHandshake, core: Core, channel: Channel) -> None:
        core.channel = channel

    @pep614(awaitingHello.upon(ServerHandshake.hello).to(awaitingProof))
    def challenge(m: ServerHandshake, core: Core, frame: Hello) -> None:
        assert core.channel is not None
        core.ourChallenge = core.randomBytes(CHALLENGE_SIZE)
        proof = makeProof(
            core.identity, Role.server, frame.challenge, core.channel.exporter
        )
        core.effects.sendFrame(Challenge(core.ourChallenge, proof))

    @pep614(awaitingProof.upon(ServerHandshake.proof).to(verifying))
    def verify(m: ServerHandshake, core: Core, frame: ProofFrame) -> None:
        _verify(m, core, frame, Role.client)

    @pep614(verifying.upon(ServerHandshake._verified).to(deciding))
    def decide(m: ServerHandshake, core: Core, peer: PeerIdentity) -> None:
        core.effects.requestDecision(peer)

    @pep614(deciding.upon(ServerHandshake.trusted).to(established))
    def accept(m: ServerHandshake, core: Core) -> None:
        assert core.peer is not None
        core.effects.sendFrame(Accept())
        core.effects.connectApplication(core.peer)
        core.effects.established()

    _registerCommon(
        builder,
        ServerHandshake,
        [awaitingTLS, awaitingHello, awaitingProof, verifying, deciding],
        deciding,
        ErrorCode.pending,
        [],
        [established],
        failed,
        [ServerHandshake.hello, ServerHandshake.proof],
        {
            (awaitingHello, ServerHandshake.hello),
            (awaitingProof, ServerHandshake.proof),
        },
    )
    return builder.build()


def buildClient() -> Callable[[Core], ClientHandshake]:
    """
    Build the client's machine; call the result with a L{Core} for each
    connection.
    """
    builder = TypeMachineBuilder(ClientHandshake, Core)
    awaitingTLS = builder.state("AwaitingTLS")
    awaitingChallenge = builder.state("AwaitingChallenge")
    verifying = builder.state("Verifying")
    checking = builder.state("Checking")
    awaitingAccept = builder.state("AwaitingAccept")
    established = builder.state("Established")
    failed = builder.state("Failed")

    @pep614(awaitingTLS.upon(ClientHandshake.tlsReady).to(awaitingChallenge))
    def hello(m: ClientHandshake, core: Core, channel: Channel) -> None:
        core.channel = channel
        core.ourChallenge = core.randomBytes(CHALLENGE_SIZE)
        core.effects.sendFrame(Hello(core.ourChallenge))

    @pep614(awaitingChallenge.upon(ClientHandshake.challenge).to(verifying))
    def verify(m: ClientHandshake, core: Core, frame: Challenge) -> None:
        core.theirChallenge = frame.challenge
        _verify(m, core, frame, Role.server)

    @pep614(verifying.upon(ClientHandshake._verified).to(checking))
    def check(m: ClientHandshake, core: Core, peer: PeerIdentity) -> None:
        core.effects.requestDecision(peer)

    @pep614(checking.upon(ClientHandshake.trusted).to(awaitingAccept))
    def prove(m: ClientHandshake, core: Core) -> None:
        assert core.channel is not None and core.peer is not None
        proof = makeProof(
            core.identity, Role.client, core.theirChallenge, core.channel.exporter
        )
        core.effects.sendFrame(ProofFrame(proof))
        core.effects.connectApplication(core.peer)

    @pep614(awaitingAccept.upon(ClientHandshake.accept).to(established))
    def accepted(m: ClientHandshake, core: Core, frame: Accept) -> None:
        core.effects.established()

    _registerCommon(
        builder,
        ClientHandshake,
        [awaitingTLS, awaitingChallenge, verifying, checking, awaitingAccept],
        checking,
        ErrorCode.unavailable,
        [awaitingAccept],
        [established],
        failed,
        [ClientHandshake.challenge, ClientHandshake.accept],
        {
            (awaitingChallenge, ClientHandshake.challenge),
            (awaitingAccept, ClientHandshake.accept),
        },
    )
    return builder.build()
