"""
The handshake state machines, one per role, written with Automat.

They do no I/O.  A thin protocol (L{dwtrust._protocol}) feeds them the TLS
channel, the frames it decodes, trust decisions, time-outs and disconnection,
and carries out what they ask for through L{Effects}.

The version 1 exchange, after the TLS handshake::

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

Version 2 (negotiated by ALPN in the TLS handshake) has no challenges: the
TLS exporter value is the joint challenge, and each proof is over it::

    client                                  server
      [early check: is the server's
       certificate key pinned here?]
      PROOF(client proof)              -->
      [if it is: application connected;
       its bytes follow, held by the server]
                                            [verify client, ask the
                                             trust store and approver]
                                       <--  ACCEPT(server proof), then
                                            application data
                                            (or ERROR, then close)
      [verify server; check its pin unless
       the early check found this identity]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

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
    ProofAccept,
    ProofFrame,
    Role,
)


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

    def checkEarly(self, channel: Channel) -> None:
        """
        (Version 2 client.)  Ask whether the server's certificate key (on
        C{channel}) is known; answer with C{known}, or C{refuse}.
        """

    def cancelDecision(self) -> None:
        """
        Abandon an outstanding decision (or early check).
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
    #: (Version 2 client.)  The server identity pinned for its certificate
    #: key, found before the handshake frames; the application is connected
    #: at once when there is one.
    early: PeerIdentity | None = None

    @property
    def version(self) -> int:
        """
        The dwtrust version of this connection (known once TLS is done).
        """
        return 1 if self.channel is None else self.channel.protocol


class Handshake(Protocol):
    """
    The inputs common to both roles.
    """

    def tlsReady(self, channel: Channel) -> None:
        "The TLS handshake finished on C{channel}, which speaks version 1."

    def tlsReady2(self, channel: Channel) -> None:
        "The TLS handshake finished on C{channel}, which speaks version 2."

    def unexpected(self, frame: Frame) -> None:
        "A frame of a type this role never receives."

    def error(self, frame: Error) -> None:
        "The peer failed the handshake."

    def refuse(self, code: ErrorCode, message: str) -> None:
        "Fail the handshake: bad bytes, a rejected proof, or a refusal."

    def brokenError(self, message: str) -> None:
        "The peer sent an C{ERROR} frame that is not valid: close, unanswered."

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
        "The server accepted us (version 1)."

    def proofAccept(self, frame: ProofAccept) -> None:
        "The server accepted us, and proved itself (version 2)."

    def known(self, early: PeerIdentity | None) -> None:
        "The early check's answer: the pinned server, or L{None} if unknown."


def _verify(
    machine: Handshake,
    core: Core,
    frame: ProofFrame | Challenge | ProofAccept,
    role: Role,
) -> None:
    assert core.channel is not None
    try:
        peer = verifyProof(
            frame.proof, role, core.ourChallenge, core.channel, core.version
        )
    except ProofRejected as e:
        machine.refuse(e.code, e.message)
    else:
        core.peer = peer
        machine._verified(peer)


# What the machines do when a handshake fails, in any role and state.  The
# suffixes say where: "Deciding" in a state that waits for a trust decision
# (or a client's early check), which is cancelled; "Quietly" in a state
# whose peer no longer reads frames (a client after its PROOF: the server
# takes what follows as application data), so no ERROR frame is sent.


def _refuse(m: Handshake, core: Core, code: ErrorCode, message: str) -> None:
    core.effects.fail(code, message, True, False)


def _refuseQuietly(m: Handshake, core: Core, code: ErrorCode, message: str) -> None:
    core.effects.fail(code, message, False, False)


def _refuseDeciding(m: Handshake, core: Core, code: ErrorCode, message: str) -> None:
    core.effects.cancelDecision()
    core.effects.fail(code, message, True, False)


def _refuseDecidingQuietly(
    m: Handshake, core: Core, code: ErrorCode, message: str
) -> None:
    core.effects.cancelDecision()
    core.effects.fail(code, message, False, False)


def _brokenError(m: Handshake, core: Core, message: str) -> None:
    # An ERROR frame is never answered, even a broken one.
    core.effects.fail(ErrorCode.protocol_error, message, False, False)


def _brokenErrorDeciding(m: Handshake, core: Core, message: str) -> None:
    core.effects.cancelDecision()
    core.effects.fail(ErrorCode.protocol_error, message, False, False)


def _timedOut(m: Handshake, core: Core) -> None:
    core.effects.fail(ErrorCode.timeout, EXPLANATIONS[ErrorCode.timeout], True, False)


def _timedOutQuietly(m: Handshake, core: Core) -> None:
    core.effects.fail(ErrorCode.timeout, EXPLANATIONS[ErrorCode.timeout], False, False)


def _notDecidedInTime(m: Handshake, core: Core) -> None:
    # A server whose owners did not decide in time: the client is pending.
    core.effects.cancelDecision()
    core.effects.fail(ErrorCode.pending, EXPLANATIONS[ErrorCode.pending], True, False)


def _checkTimedOut(m: Handshake, core: Core) -> None:
    # A client whose own pin check did not answer in time.
    core.effects.cancelDecision()
    code = ErrorCode.unavailable
    core.effects.fail(code, EXPLANATIONS[code], True, False)


def _checkTimedOutQuietly(m: Handshake, core: Core) -> None:
    core.effects.cancelDecision()
    code = ErrorCode.unavailable
    core.effects.fail(code, EXPLANATIONS[code], False, False)


def _unexpected(frame: Frame) -> str:
    return f"unexpected {frame.type.name} frame"


def _outOfOrder(m: Handshake, core: Core, frame: Frame) -> None:
    core.effects.fail(ErrorCode.protocol_error, _unexpected(frame), True, False)


def _outOfOrderQuietly(m: Handshake, core: Core, frame: Frame) -> None:
    core.effects.fail(ErrorCode.protocol_error, _unexpected(frame), False, False)


def _outOfOrderDeciding(m: Handshake, core: Core, frame: Frame) -> None:
    core.effects.cancelDecision()
    core.effects.fail(ErrorCode.protocol_error, _unexpected(frame), True, False)


def _outOfOrderDecidingQuietly(m: Handshake, core: Core, frame: Frame) -> None:
    core.effects.cancelDecision()
    core.effects.fail(ErrorCode.protocol_error, _unexpected(frame), False, False)


def _peerFailed(m: Handshake, core: Core, frame: Error) -> None:
    core.effects.fail(frame.errorCode, frame.explanation, False, True)


def _peerFailedDeciding(m: Handshake, core: Core, frame: Error) -> None:
    core.effects.cancelDecision()
    core.effects.fail(frame.errorCode, frame.explanation, False, True)


def _lost(m: Handshake, core: Core) -> None:
    pass


def _lostDeciding(m: Handshake, core: Core) -> None:
    core.effects.cancelDecision()


# Once a handshake is over (established or failed), every input does nothing.


def _ignore(m: Handshake, core: Core) -> None:
    pass


def _ignoreRefusal(m: Handshake, core: Core, code: ErrorCode, message: str) -> None:
    pass


def _ignoreMessage(m: Handshake, core: Core, message: str) -> None:
    pass


def _ignoreFrame(m: Handshake, core: Core, frame: Frame) -> None:
    pass


def _ignoreChannel(m: Handshake, core: Core, channel: Channel) -> None:
    pass


def _ignoreKnown(m: Handshake, core: Core, early: PeerIdentity | None) -> None:
    pass


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

    @pep614(awaitingTLS.upon(ServerHandshake.tlsReady2).to(awaitingProof))
    def bind2(m: ServerHandshake, core: Core, channel: Channel) -> None:
        # Version 2: no HELLO, no CHALLENGE; the client's PROOF comes first.
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
        assert core.peer is not None and core.channel is not None
        if core.version == 1:
            core.effects.sendFrame(Accept())
        else:
            # Version 2: the server proves itself only to a client it trusts.
            proof = makeProof(
                core.identity, Role.server, b"", core.channel.exporter, core.version
            )
            core.effects.sendFrame(ProofAccept(proof))
        core.effects.connectApplication(core.peer)
        core.effects.established()

    # Failures, state by state: every input a state does not expect fails
    # the handshake.
    # awaitingTLS
    awaitingTLS.upon(ServerHandshake.refuse).to(failed)(_refuse)
    awaitingTLS.upon(ServerHandshake.brokenError).to(failed)(_brokenError)
    awaitingTLS.upon(ServerHandshake.timedOut).to(failed)(_timedOut)
    awaitingTLS.upon(ServerHandshake.lost).to(failed)(_lost)
    awaitingTLS.upon(ServerHandshake.error).to(failed)(_peerFailed)
    awaitingTLS.upon(ServerHandshake.unexpected).to(failed)(_outOfOrder)
    awaitingTLS.upon(ServerHandshake.hello).to(failed)(_outOfOrder)
    awaitingTLS.upon(ServerHandshake.proof).to(failed)(_outOfOrder)
    # awaitingHello
    awaitingHello.upon(ServerHandshake.refuse).to(failed)(_refuse)
    awaitingHello.upon(ServerHandshake.brokenError).to(failed)(_brokenError)
    awaitingHello.upon(ServerHandshake.timedOut).to(failed)(_timedOut)
    awaitingHello.upon(ServerHandshake.lost).to(failed)(_lost)
    awaitingHello.upon(ServerHandshake.error).to(failed)(_peerFailed)
    awaitingHello.upon(ServerHandshake.unexpected).to(failed)(_outOfOrder)
    awaitingHello.upon(ServerHandshake.proof).to(failed)(_outOfOrder)
    # awaitingProof
    awaitingProof.upon(ServerHandshake.refuse).to(failed)(_refuse)
    awaitingProof.upon(ServerHandshake.brokenError).to(failed)(_brokenError)
    awaitingProof.upon(ServerHandshake.timedOut).to(failed)(_timedOut)
    awaitingProof.upon(ServerHandshake.lost).to(failed)(_lost)
    awaitingProof.upon(ServerHandshake.error).to(failed)(_peerFailed)
    awaitingProof.upon(ServerHandshake.unexpected).to(failed)(_outOfOrder)
    awaitingProof.upon(ServerHandshake.hello).to(failed)(_outOfOrder)
    # verifying
    verifying.upon(ServerHandshake.refuse).to(failed)(_refuse)
    verifying.upon(ServerHandshake.brokenError).to(failed)(_brokenError)
    verifying.upon(ServerHandshake.timedOut).to(failed)(_timedOut)
    verifying.upon(ServerHandshake.lost).to(failed)(_lost)
    verifying.upon(ServerHandshake.error).to(failed)(_peerFailed)
    verifying.upon(ServerHandshake.unexpected).to(failed)(_outOfOrder)
    verifying.upon(ServerHandshake.hello).to(failed)(_outOfOrder)
    verifying.upon(ServerHandshake.proof).to(failed)(_outOfOrder)
    # deciding
    deciding.upon(ServerHandshake.refuse).to(failed)(_refuseDeciding)
    deciding.upon(ServerHandshake.brokenError).to(failed)(_brokenErrorDeciding)
    deciding.upon(ServerHandshake.timedOut).to(failed)(_notDecidedInTime)
    deciding.upon(ServerHandshake.lost).to(failed)(_lostDeciding)
    deciding.upon(ServerHandshake.error).to(failed)(_peerFailedDeciding)
    deciding.upon(ServerHandshake.unexpected).to(failed)(_outOfOrderDeciding)
    deciding.upon(ServerHandshake.hello).to(failed)(_outOfOrderDeciding)
    deciding.upon(ServerHandshake.proof).to(failed)(_outOfOrderDeciding)
    # established
    established.upon(ServerHandshake.refuse).loop()(_ignoreRefusal)
    established.upon(ServerHandshake.brokenError).loop()(_ignoreMessage)
    established.upon(ServerHandshake.timedOut).loop()(_ignore)
    established.upon(ServerHandshake.lost).loop()(_ignore)
    established.upon(ServerHandshake.error).loop()(_ignoreFrame)
    established.upon(ServerHandshake.unexpected).loop()(_ignoreFrame)
    established.upon(ServerHandshake.trusted).loop()(_ignore)
    established.upon(ServerHandshake.tlsReady).loop()(_ignoreChannel)
    established.upon(ServerHandshake.tlsReady2).loop()(_ignoreChannel)
    established.upon(ServerHandshake.hello).loop()(_ignoreFrame)
    established.upon(ServerHandshake.proof).loop()(_ignoreFrame)
    # failed
    failed.upon(ServerHandshake.refuse).loop()(_ignoreRefusal)
    failed.upon(ServerHandshake.brokenError).loop()(_ignoreMessage)
    failed.upon(ServerHandshake.timedOut).loop()(_ignore)
    failed.upon(ServerHandshake.lost).loop()(_ignore)
    failed.upon(ServerHandshake.error).loop()(_ignoreFrame)
    failed.upon(ServerHandshake.unexpected).loop()(_ignoreFrame)
    failed.upon(ServerHandshake.trusted).loop()(_ignore)
    failed.upon(ServerHandshake.tlsReady).loop()(_ignoreChannel)
    failed.upon(ServerHandshake.tlsReady2).loop()(_ignoreChannel)
    failed.upon(ServerHandshake.hello).loop()(_ignoreFrame)
    failed.upon(ServerHandshake.proof).loop()(_ignoreFrame)
    return builder.build()


def buildClient() -> Callable[[Core], ClientHandshake]:
    """
    Build the client's machine; call the result with a L{Core} for each
    connection.
    """
    builder = TypeMachineBuilder(ClientHandshake, Core)
    awaitingTLS = builder.state("AwaitingTLS")
    # Version 1.
    awaitingChallenge = builder.state("AwaitingChallenge")
    verifying = builder.state("Verifying")
    checking = builder.state("Checking")
    awaitingAccept = builder.state("AwaitingAccept")
    # Version 2.
    checkingEarly = builder.state("CheckingEarly")
    awaitingProofAccept = builder.state("AwaitingProofAccept")
    verifyingAccept = builder.state("VerifyingAccept")
    checkingServer = builder.state("CheckingServer")
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

    # Version 2.

    @pep614(awaitingTLS.upon(ClientHandshake.tlsReady2).to(checkingEarly))
    def checkEarly(m: ClientHandshake, core: Core, channel: Channel) -> None:
        core.channel = channel
        core.effects.checkEarly(channel)

    @pep614(checkingEarly.upon(ClientHandshake.known).to(awaitingProofAccept))
    def prove2(m: ClientHandshake, core: Core, early: PeerIdentity | None) -> None:
        assert core.channel is not None
        core.early = early
        proof = makeProof(
            core.identity, Role.client, b"", core.channel.exporter, core.version
        )
        core.effects.sendFrame(ProofFrame(proof))
        if early is not None:
            # A server pinned here: the application goes ahead now, its bytes
            # straight after the PROOF; the server holds them until it trusts
            # us, and we deliver none of its bytes before its proof.
            core.effects.connectApplication(early)

    @pep614(awaitingProofAccept.upon(ClientHandshake.proofAccept).to(verifyingAccept))
    def verify2(m: ClientHandshake, core: Core, frame: ProofAccept) -> None:
        _verify(m, core, frame, Role.server)

    @pep614(verifyingAccept.upon(ClientHandshake._verified).to(checkingServer))
    def check2(m: ClientHandshake, core: Core, peer: PeerIdentity) -> None:
        if core.early is None:
            core.effects.requestDecision(peer)
        elif core.early == peer:
            # The identity the early check found: nothing more to ask.
            m.trusted()
        else:
            m.refuse(
                ErrorCode.identity_changed,
                f"the server's key is pinned as {core.early.name}, but it"
                f" proved {peer.name}",
            )

    @pep614(checkingServer.upon(ClientHandshake.trusted).to(established))
    def trusted2(m: ClientHandshake, core: Core) -> None:
        assert core.peer is not None
        if core.early is None:
            core.effects.connectApplication(core.peer)
        core.effects.established()

    # Failures, state by state: every input a state does not expect fails
    # the handshake.
    # awaitingTLS
    awaitingTLS.upon(ClientHandshake.refuse).to(failed)(_refuse)
    awaitingTLS.upon(ClientHandshake.brokenError).to(failed)(_brokenError)
    awaitingTLS.upon(ClientHandshake.timedOut).to(failed)(_timedOut)
    awaitingTLS.upon(ClientHandshake.lost).to(failed)(_lost)
    awaitingTLS.upon(ClientHandshake.error).to(failed)(_peerFailed)
    awaitingTLS.upon(ClientHandshake.unexpected).to(failed)(_outOfOrder)
    awaitingTLS.upon(ClientHandshake.challenge).to(failed)(_outOfOrder)
    awaitingTLS.upon(ClientHandshake.accept).to(failed)(_outOfOrder)
    awaitingTLS.upon(ClientHandshake.proofAccept).to(failed)(_outOfOrder)
    # awaitingChallenge
    awaitingChallenge.upon(ClientHandshake.refuse).to(failed)(_refuse)
    awaitingChallenge.upon(ClientHandshake.brokenError).to(failed)(_brokenError)
    awaitingChallenge.upon(ClientHandshake.timedOut).to(failed)(_timedOut)
    awaitingChallenge.upon(ClientHandshake.lost).to(failed)(_lost)
    awaitingChallenge.upon(ClientHandshake.error).to(failed)(_peerFailed)
    awaitingChallenge.upon(ClientHandshake.unexpected).to(failed)(_outOfOrder)
    awaitingChallenge.upon(ClientHandshake.accept).to(failed)(_outOfOrder)
    awaitingChallenge.upon(ClientHandshake.proofAccept).to(failed)(_outOfOrder)
    # verifying
    verifying.upon(ClientHandshake.refuse).to(failed)(_refuse)
    verifying.upon(ClientHandshake.brokenError).to(failed)(_brokenError)
    verifying.upon(ClientHandshake.timedOut).to(failed)(_timedOut)
    verifying.upon(ClientHandshake.lost).to(failed)(_lost)
    verifying.upon(ClientHandshake.error).to(failed)(_peerFailed)
    verifying.upon(ClientHandshake.unexpected).to(failed)(_outOfOrder)
    verifying.upon(ClientHandshake.challenge).to(failed)(_outOfOrder)
    verifying.upon(ClientHandshake.accept).to(failed)(_outOfOrder)
    verifying.upon(ClientHandshake.proofAccept).to(failed)(_outOfOrder)
    # checking
    checking.upon(ClientHandshake.refuse).to(failed)(_refuseDeciding)
    checking.upon(ClientHandshake.brokenError).to(failed)(_brokenErrorDeciding)
    checking.upon(ClientHandshake.timedOut).to(failed)(_checkTimedOut)
    checking.upon(ClientHandshake.lost).to(failed)(_lostDeciding)
    checking.upon(ClientHandshake.error).to(failed)(_peerFailedDeciding)
    checking.upon(ClientHandshake.unexpected).to(failed)(_outOfOrderDeciding)
    checking.upon(ClientHandshake.challenge).to(failed)(_outOfOrderDeciding)
    checking.upon(ClientHandshake.accept).to(failed)(_outOfOrderDeciding)
    checking.upon(ClientHandshake.proofAccept).to(failed)(_outOfOrderDeciding)
    # awaitingAccept
    awaitingAccept.upon(ClientHandshake.refuse).to(failed)(_refuseQuietly)
    awaitingAccept.upon(ClientHandshake.brokenError).to(failed)(_brokenError)
    awaitingAccept.upon(ClientHandshake.timedOut).to(failed)(_timedOutQuietly)
    awaitingAccept.upon(ClientHandshake.lost).to(failed)(_lost)
    awaitingAccept.upon(ClientHandshake.error).to(failed)(_peerFailed)
    awaitingAccept.upon(ClientHandshake.unexpected).to(failed)(_outOfOrderQuietly)
    awaitingAccept.upon(ClientHandshake.challenge).to(failed)(_outOfOrderQuietly)
    awaitingAccept.upon(ClientHandshake.proofAccept).to(failed)(_outOfOrderQuietly)
    # checkingEarly
    checkingEarly.upon(ClientHandshake.refuse).to(failed)(_refuseDeciding)
    checkingEarly.upon(ClientHandshake.brokenError).to(failed)(_brokenErrorDeciding)
    checkingEarly.upon(ClientHandshake.timedOut).to(failed)(_checkTimedOut)
    checkingEarly.upon(ClientHandshake.lost).to(failed)(_lostDeciding)
    checkingEarly.upon(ClientHandshake.error).to(failed)(_peerFailedDeciding)
    checkingEarly.upon(ClientHandshake.unexpected).to(failed)(_outOfOrderDeciding)
    checkingEarly.upon(ClientHandshake.challenge).to(failed)(_outOfOrderDeciding)
    checkingEarly.upon(ClientHandshake.accept).to(failed)(_outOfOrderDeciding)
    checkingEarly.upon(ClientHandshake.proofAccept).to(failed)(_outOfOrderDeciding)
    # awaitingProofAccept
    awaitingProofAccept.upon(ClientHandshake.refuse).to(failed)(_refuseQuietly)
    awaitingProofAccept.upon(ClientHandshake.brokenError).to(failed)(_brokenError)
    awaitingProofAccept.upon(ClientHandshake.timedOut).to(failed)(_timedOutQuietly)
    awaitingProofAccept.upon(ClientHandshake.lost).to(failed)(_lost)
    awaitingProofAccept.upon(ClientHandshake.error).to(failed)(_peerFailed)
    awaitingProofAccept.upon(ClientHandshake.unexpected).to(failed)(_outOfOrderQuietly)
    awaitingProofAccept.upon(ClientHandshake.challenge).to(failed)(_outOfOrderQuietly)
    awaitingProofAccept.upon(ClientHandshake.accept).to(failed)(_outOfOrderQuietly)
    # verifyingAccept
    verifyingAccept.upon(ClientHandshake.refuse).to(failed)(_refuseQuietly)
    verifyingAccept.upon(ClientHandshake.brokenError).to(failed)(_brokenError)
    verifyingAccept.upon(ClientHandshake.timedOut).to(failed)(_timedOutQuietly)
    verifyingAccept.upon(ClientHandshake.lost).to(failed)(_lost)
    verifyingAccept.upon(ClientHandshake.error).to(failed)(_peerFailed)
    verifyingAccept.upon(ClientHandshake.unexpected).to(failed)(_outOfOrderQuietly)
    verifyingAccept.upon(ClientHandshake.challenge).to(failed)(_outOfOrderQuietly)
    verifyingAccept.upon(ClientHandshake.accept).to(failed)(_outOfOrderQuietly)
    verifyingAccept.upon(ClientHandshake.proofAccept).to(failed)(_outOfOrderQuietly)
    # checkingServer
    checkingServer.upon(ClientHandshake.refuse).to(failed)(_refuseDecidingQuietly)
    checkingServer.upon(ClientHandshake.brokenError).to(failed)(_brokenErrorDeciding)
    checkingServer.upon(ClientHandshake.timedOut).to(failed)(_checkTimedOutQuietly)
    checkingServer.upon(ClientHandshake.lost).to(failed)(_lostDeciding)
    checkingServer.upon(ClientHandshake.error).to(failed)(_peerFailedDeciding)
    checkingServer.upon(ClientHandshake.unexpected).to(failed)(
        _outOfOrderDecidingQuietly
    )
    checkingServer.upon(ClientHandshake.challenge).to(failed)(
        _outOfOrderDecidingQuietly
    )
    checkingServer.upon(ClientHandshake.accept).to(failed)(_outOfOrderDecidingQuietly)
    checkingServer.upon(ClientHandshake.proofAccept).to(failed)(
        _outOfOrderDecidingQuietly
    )
    # established
    established.upon(ClientHandshake.refuse).loop()(_ignoreRefusal)
    established.upon(ClientHandshake.brokenError).loop()(_ignoreMessage)
    established.upon(ClientHandshake.timedOut).loop()(_ignore)
    established.upon(ClientHandshake.lost).loop()(_ignore)
    established.upon(ClientHandshake.error).loop()(_ignoreFrame)
    established.upon(ClientHandshake.unexpected).loop()(_ignoreFrame)
    established.upon(ClientHandshake.trusted).loop()(_ignore)
    established.upon(ClientHandshake.tlsReady).loop()(_ignoreChannel)
    established.upon(ClientHandshake.tlsReady2).loop()(_ignoreChannel)
    established.upon(ClientHandshake.known).loop()(_ignoreKnown)
    established.upon(ClientHandshake.challenge).loop()(_ignoreFrame)
    established.upon(ClientHandshake.accept).loop()(_ignoreFrame)
    established.upon(ClientHandshake.proofAccept).loop()(_ignoreFrame)
    # failed
    failed.upon(ClientHandshake.refuse).loop()(_ignoreRefusal)
    failed.upon(ClientHandshake.brokenError).loop()(_ignoreMessage)
    failed.upon(ClientHandshake.timedOut).loop()(_ignore)
    failed.upon(ClientHandshake.lost).loop()(_ignore)
    failed.upon(ClientHandshake.error).loop()(_ignoreFrame)
    failed.upon(ClientHandshake.unexpected).loop()(_ignoreFrame)
    failed.upon(ClientHandshake.trusted).loop()(_ignore)
    failed.upon(ClientHandshake.tlsReady).loop()(_ignoreChannel)
    failed.upon(ClientHandshake.tlsReady2).loop()(_ignoreChannel)
    failed.upon(ClientHandshake.known).loop()(_ignoreKnown)
    failed.upon(ClientHandshake.challenge).loop()(_ignoreFrame)
    failed.upon(ClientHandshake.accept).loop()(_ignoreFrame)
    failed.upon(ClientHandshake.proofAccept).loop()(_ignoreFrame)
    return builder.build()
