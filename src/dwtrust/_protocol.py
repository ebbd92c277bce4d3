"""
The thin protocol between TLS and the application: it feeds the handshake
machine and, once the machine says so, hands the connection to the
application protocol.

Inbound bytes go through three stages:

1. I{frames}: decoded one at a time and fed to the machine;
2. I{held}: after the last handshake frame the peer sends (C{PROOF} for a
   server, C{ACCEPT} for a client), bytes are application data, kept back
   (and the transport paused past L{MAX_HELD}) until the handshake is over;
3. I{delivered}: handed to the application as they come, with no per-byte
   work, by binding the application's C{dataReceived} directly.

No byte reaches the application before stage 3, and none is lost or
delivered twice.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHandshakeListener,
    IProtocol,
    IProtocolFactory,
    IPushProducer,
    IReactorTime,
    ITransport,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface, implementer

from ._identity import Identity, PeerIdentity
from ._limits import Admission, Limits, Refused, sourcePrefix
from ._machine import (
    Core,
    Handshake,
    Refusal,
    buildClient,
    buildServer,
)
from ._policy import IEarlyTrust, ITrustPolicy
from ._status import LIMITED, Metrics
from ._tls import Channel, ConnectionCreator, channelOf
from ._wire import (
    EXPLANATIONS,
    VERSIONS,
    Accept,
    Challenge,
    Error,
    ErrorCode,
    Frame,
    FrameDecoder,
    Hello,
    ProofAccept,
    ProofFrame,
    WireError,
    encodeFrame,
)

#: Application bytes a server keeps while it decides; past this it stops
#: reading from the peer until the decision.
MAX_HELD = 256 * 1024
#: How long a failed connection may take to close before it is aborted.
CLOSE_GRACE = 2.0
#: Seconds a TLS handshake keeps its place among those in progress (see
#: L{Limits.maxTLSHandshakes}); a slower peer goes on without one, so slow
#: peers cannot keep others' handshakes waiting.
HANDSHAKE_PLACE_SECONDS = 1.0
#: Decisions that take away a key's standing as trusted before.
_DISTRUSTED = {ErrorCode.denied, ErrorCode.revoked, ErrorCode.identity_changed}

_newServer = buildServer()
_newClient = buildClient()


class HandshakeFailed(Exception):
    """
    A dwtrust handshake did not succeed.

    @ivar code: the L{ErrorCode}.
    @ivar message: a plain explanation.
    @ivar byPeer: L{True} if the peer refused us, L{False} if we refused it.
    """

    def __init__(self, code: ErrorCode, message: str, byPeer: bool) -> None:
        self.code = code
        self.message = message
        self.byPeer = byPeer
        who = "refused by the peer" if byPeer else "refused"
        super().__init__(f"{code.value} ({who}): {message}")


class IBeforeAccept(Interface):
    """
    An application protocol that must be ready before a server accepts its
    peer: the server asks it once the peer is trusted, and sends C{ACCEPT}
    only when it is ready, or refuses the peer with the L{Refusal} it fails
    with (anything else gives C{unavailable}).  The protocol is connected
    only after C{ACCEPT}, as any other.
    """

    def beforeAccept(peer: PeerIdentity) -> Deferred[None]:
        """
        Get ready to serve C{peer}; fire when ready, or fail with a
        L{Refusal}.  Cancelling the result gives up (the handshake failed).
        """


class IAuthenticatedTransport(ITransport):
    """
    The transport an application protocol gets once the peer is
    authenticated.  It is a plain transport plus the peer's identity.
    """

    peer = Attribute("The L{PeerIdentity} of the other end.")

    def whenTrusted() -> Deferred[None]:
        """
        Fires once both ends trust each other.  A server's application is
        connected only then, so for it this has fired already; a client's is
        connected as soon as the server has proved itself, and this fires when
        the server accepts the client, or fails with L{HandshakeFailed} if it
        refuses.
        """


def _connection(tls: TLSMemoryBIOProtocol) -> IPushProducer:
    """
    The connection under the TLS layer, which reads (and stops reading) the
    peer's bytes.
    """
    connection: IPushProducer = tls.transport  # type: ignore[assignment]
    return connection


class _Stage(enum.Enum):
    frames = "frames"
    held = "held"
    delivered = "delivered"
    discarded = "discarded"


@implementer(IAuthenticatedTransport, IPushProducer)
class AuthenticatedTransport:
    """
    What the application sees as its transport: exactly these methods, bound
    straight to the TLS transport, and C{peer}.  Nothing else of the TLS
    layer is exposed.
    """

    def __init__(
        self,
        tls: TLSMemoryBIOProtocol,
        handshake: HandshakeProtocol,
        peer: PeerIdentity,
    ) -> None:
        self.peer = peer
        self._tls = tls
        self._handshake = handshake
        self.write: Callable[[bytes], None] = tls.write
        self.writeSequence: Callable[[Any], None] = tls.writeSequence
        self.loseConnection: Callable[[], None] = tls.loseConnection
        self.abortConnection: Callable[[], None] = tls.abortConnection
        self.getPeer: Callable[[], IAddress] = tls.getPeer
        self.getHost: Callable[[], IAddress] = tls.getHost
        self.registerProducer: Callable[[Any, bool], None] = tls.registerProducer
        self.unregisterProducer: Callable[[], None] = tls.unregisterProducer

    @property
    def disconnecting(self) -> bool:
        return bool(self._tls.disconnecting)

    def pauseProducing(self) -> None:
        self._handshake.pauseApplication()

    def resumeProducing(self) -> None:
        self._handshake.resumeApplication()

    def stopProducing(self) -> None:
        _connection(self._tls).stopProducing()

    def whenTrusted(self) -> Deferred[None]:
        return self._handshake.whenTrusted()

    def __repr__(self) -> str:
        return f"<AuthenticatedTransport peer={self.peer.name} {self.peer.fingerprint}>"


@implementer(IHandshakeListener)
class HandshakeProtocol(Protocol):
    """
    Runs one connection's handshake, then gets out of the way.

    @ivar transport: the L{TLSMemoryBIOProtocol} below us.
    """

    transport: TLSMemoryBIOProtocol
    _log = Logger()

    def __init__(
        self,
        factory: HandshakeFactory,
        application: IProtocol,
        source: str,
        prefix: str = "",
    ) -> None:
        self._factory = factory
        self._application = application
        self._source = source
        # Limits (server side only): the source prefix this connection counts
        # under, and what it holds of the admission's counts.
        self._admission = factory.admission
        self._metrics = factory.metrics
        self._prefix = prefix
        self._untrusted = self._admission is not None
        # Among the TLS handshakes in progress: "none", "queued" or "held".
        self._place = "none"
        self._placeTimer: IDelayedCall | None = None
        self._waitingFor: str | None = None
        self._heldCounted = 0
        self._reached = "tcp"
        #: The dwtrust version of this connection, once TLS has settled it.
        self.protocolVersion: int | None = None
        self._decoder = FrameDecoder()
        self._stage = _Stage.frames
        self._held: list[bytes] = []
        self._heldSize = 0
        self._overflowing = False
        self._applicationPaused = False
        self._readingPaused = False
        self._tlsDone = False
        self._timer: IDelayedCall | None = None
        self._decision: Deferred[Any] | None = None
        self._failure: HandshakeFailed | None = None
        self.peer: PeerIdentity | None = None
        self.applicationConnected = False
        self._outcome: IProtocol | Failure | None = None
        self._waiters: list[Deferred[IProtocol]] = []
        self._closed = False
        self._closeWaiters: list[Deferred[None]] = []
        self._trusted = False
        self._trustWaiters: list[Deferred[None]] = []
        core = Core(factory.identity, self, factory.randomBytes)
        self._core = core
        self._machine: Handshake
        if factory.isClient:
            client = _newClient(core)
            self._machine = client
            self._known: Callable[[PeerIdentity | None], None] | None = client.known
            self._dispatch: dict[type, Callable[[Any], None]] = {
                Challenge: client.challenge,
                Accept: client.accept,
                ProofAccept: client.proofAccept,
                Error: client.error,
            }
            self._lastFrame: type = Accept
        else:
            server = _newServer(core)
            self._machine = server
            self._known = None
            self._dispatch = {
                Hello: server.hello,
                ProofFrame: server.proof,
                Error: server.error,
            }
            self._lastFrame = ProofFrame

    # Protocol and IHandshakeListener

    def connectionMade(self) -> None:
        if self._metrics is not None:
            self._metrics.open += 1
        self._timer = self._factory.clock.callLater(
            self._factory.timeout, self._machine.timedOut
        )
        if self._admission is not None:
            if not self._admission.takeHandshake(self._startTLS, self._prefix):
                # No place for another TLS handshake: read nothing (so do no
                # handshake work) until one is given to us.
                self._place = "queued"
                _connection(self.transport).pauseProducing()
                return
            self._placed()

    def _placed(self) -> None:
        self._place = "held"
        self._placeTimer = self._factory.clock.callLater(
            HANDSHAKE_PLACE_SECONDS, self._leavePlace
        )

    def _startTLS(self) -> None:
        # Given a place by a handshake that finished.
        self._placed()
        if self.connected:
            _connection(self.transport).resumeProducing()

    def _leavePlace(self) -> None:
        place, self._place = self._place, "none"
        timer, self._placeTimer = self._placeTimer, None
        if timer is not None and timer.active():
            timer.cancel()
        assert self._admission is not None
        if place == "queued":
            self._admission.withdraw(self._startTLS)
        elif place == "held":
            self._admission.releaseHandshake()

    def handshakeCompleted(self) -> None:
        self._tlsDone = True
        self._reached = "tls"
        if self._admission is not None:
            self._leavePlace()
        try:
            channel = channelOf(
                self.transport.getHandle(), self._factory.limits.maxCertificate
            )
        except WireError as e:
            self._machine.refuse(e.code, e.message)
            return
        version = self.protocolVersion = channel.protocol
        if version != 1:
            self._decoder = FrameDecoder(version)
            if self._factory.isClient:
                self._lastFrame = ProofAccept
        if version not in self._factory.versions:
            # A peer of a version we do not speak: one ERROR frame in its
            # version, then close.
            self._machine.refuse(
                ErrorCode.version_unsupported,
                f"the peer speaks dwtrust version {version}; this side speaks"
                f" {', '.join(map(str, self._factory.versions))}",
            )
            return
        if version == 1:
            self._machine.tlsReady(channel)
        else:
            self._machine.tlsReady2(channel)

    def dataReceived(self, data: bytes) -> None:
        if self._stage is _Stage.frames:
            self._decoder.feed(data)
            self._readFrames()
        elif self._stage is _Stage.held:
            self._hold(data)
        # Once delivered, this method is shadowed by the application's own;
        # once discarded, bytes are dropped.

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancelTimer()
        if not self._tlsDone and self._failure is None:
            suppressed = self._allowLog()
            if suppressed is not None:
                self._factory.log.info(
                    "dwtrust: connection from {source} closed before the TLS"
                    " handshake finished: {reason}",
                    event="dwtrust.tls_failed",
                    source=self._source,
                    prefix=self._prefix,
                    suppressed=suppressed,
                    reason=reason.getErrorMessage(),
                )
        elif self._untrusted and self._failure is None:
            self._logAbandoned()
        if self._metrics is not None:
            self._metrics.open -= 1
            if not self._trusted and self._failure is None:
                self._metrics.failed += 1
        self._releaseLimits()
        self._stage = _Stage.discarded
        self._machine.lost()
        self._factory.forget(self)
        failure = reason if self._failure is None else Failure(self._failure)
        if self.applicationConnected:
            self._application.connectionLost(failure)
        else:
            self._settle(failure)
        self._closed = True
        closeWaiters, self._closeWaiters = self._closeWaiters, []
        for waiting in closeWaiters:
            waiting.callback(None)

    def whenClosed(self) -> Deferred[None]:
        """
        Fires once the connection is gone (and the application told).
        """
        if self._closed:
            return succeed(None)
        waiting: Deferred[None] = Deferred()
        self._closeWaiters.append(waiting)
        return waiting

    def whenConnected(self) -> Deferred[IProtocol]:
        """
        Fires with the application protocol once it is connected, or fails
        with why the handshake did not get that far.
        """
        if isinstance(self._outcome, Failure):
            return fail(self._outcome)
        if self._outcome is not None:
            return succeed(self._outcome)
        waiting: Deferred[IProtocol] = Deferred(
            lambda _: self.transport.abortConnection()
        )
        self._waiters.append(waiting)
        return waiting

    def _settle(self, outcome: IProtocol | Failure) -> None:
        self._outcome = outcome
        waiters, self._waiters = self._waiters, []
        for waiting in waiters:
            waiting.callback(outcome)

    # Inbound stages

    def _readFrames(self) -> None:
        while self._stage is _Stage.frames:
            try:
                frame = self._decoder.next()
            except WireError as e:
                if e.answer:
                    self._machine.refuse(e.code, e.message)
                else:
                    self._machine.brokenError(e.message)
                return
            if frame is None:
                return
            if type(frame) is self._lastFrame:
                self._stage = _Stage.held
                self._hold(self._decoder.remainder())
            self._dispatch.get(type(frame), self._machine.unexpected)(frame)

    def _hold(self, data: bytes) -> None:
        if not data:
            return
        self._held.append(data)
        self._heldSize += len(data)
        overBudget = False
        if self._admission is not None:
            self._heldCounted += len(data)
            overBudget = self._admission.hold(len(data))
            if overBudget and self._isStranger():
                self._machine.refuse(ErrorCode.unavailable, self._overBudget())
                return
        if (self._heldSize > MAX_HELD or overBudget) and not self._overflowing:
            self._overflowing = True
            self._updateReading()

    # Limits on peers not yet trusted (server side)

    def _allowLog(self) -> int | None:
        """
        Whether to log this connection's end (L{None}: not now), and how
        many such lines about its source were held back before.
        """
        if self._admission is None:
            return 0
        return self._admission.scanLog.allow(self._prefix)

    def _logAbandoned(self) -> None:
        suppressed = self._allowLog()
        if suppressed is None:
            return
        self._factory.log.info(
            "dwtrust: {source} left during the handshake, after {stage}"
            " ({suppressed} more from {prefix} not logged)",
            event="dwtrust.abandoned",
            source=self._source,
            prefix=self._prefix,
            stage=self._reached,
            suppressed=suppressed,
            peer_name=self.peer.name if self.peer else None,
            fingerprint=self.peer.fingerprint if self.peer else None,
        )

    def _isStranger(self) -> bool:
        """
        Whether the peer has proved a key not trusted here before.  (Before
        its proof, it is given the benefit of the doubt until it has one.)
        """
        assert self._admission is not None
        return self.peer is not None and not self._admission.trustedBefore(
            self.peer.fingerprint
        )

    def _overBudget(self) -> str:
        assert self._admission is not None
        return (
            f"the service holds {self._admission.heldBytes} bytes for peers not"
            f" yet trusted, more than its {self._admission.limits.maxHeldBytes};"
            " try again later"
        )

    def _admitDecision(self, peer: PeerIdentity) -> Refusal | None:
        """
        Count this connection as waiting for a decision about C{peer}, or
        say why it may not wait.
        """
        admission = self._admission
        if admission is None:
            return None
        if (
            self._heldCounted
            and admission.heldBytes > admission.limits.maxHeldBytes
            and not admission.trustedBefore(peer.fingerprint)
        ):
            return Refusal(ErrorCode.unavailable, self._overBudget())
        try:
            admission.takeWaiting(peer.fingerprint)
        except Refused as e:
            return Refusal(ErrorCode.unavailable, f"{e}; try again later")
        self._waitingFor = peer.fingerprint
        return None

    def _decided(self) -> None:
        waitingFor, self._waitingFor = self._waitingFor, None
        if waitingFor is not None and self._admission is not None:
            self._admission.releaseWaiting(waitingFor)

    def _releaseHeld(self) -> None:
        counted, self._heldCounted = self._heldCounted, 0
        if counted and self._admission is not None:
            self._admission.hold(-counted)

    def _trustedNow(self) -> None:
        """
        The peer is trusted: it no longer counts against the limits on
        strangers.
        """
        self._releaseHeld()
        if self._untrusted:
            assert self._admission is not None
            self._untrusted = False
            self._admission.releaseUntrusted(self._prefix)
            if self.peer is not None:
                self._admission.rememberTrusted(self.peer.fingerprint, self._prefix)

    def _releaseLimits(self) -> None:
        if self._admission is None:
            return
        self._leavePlace()
        self._decided()
        self._releaseHeld()
        if self._untrusted:
            self._untrusted = False
            self._admission.releaseUntrusted(self._prefix)

    # Effects, called by the machine

    def sendFrame(self, frame: Frame) -> None:
        if isinstance(frame, Challenge):
            self._reached = "challenge"
        elif self._factory.isClient and isinstance(frame, ProofFrame):
            # The server may hold us for its whole decision time; wait longer
            # than that, so that its answer ("pending") reaches us first.
            self._resetTimer(self._factory.decisionTimeout + self._factory.timeout)
        self.transport.write(encodeFrame(frame, self.protocolVersion or 1))

    def checkEarly(self, channel: Channel) -> None:
        answer = self._known
        assert answer is not None
        policy = self._factory.policy
        if not IEarlyTrust.providedBy(policy):
            # A policy that cannot tell before the server's proof: the
            # application waits for it.
            answer(None)
            return
        checking = IEarlyTrust(policy).knownKey(
            channel.peerKey, self._source, channel.peerNames
        )
        self._decision = checking

        def known(identity: PeerIdentity | None) -> None:
            self._decision = None
            answer(identity)

        def refused(failure: Failure) -> None:
            if failure.check(CancelledError) and self._decision is None:
                return
            self._decision = None
            if failure.check(Refusal):
                refusal: Refusal = failure.value  # type: ignore[assignment]
                self._machine.refuse(refusal.code, refusal.message)
            else:
                self._log.failure("early trust check failed", failure)
                self._machine.refuse(
                    ErrorCode.unavailable, EXPLANATIONS[ErrorCode.unavailable]
                )

        checking.addCallbacks(known, refused)

    def requestDecision(self, peer: PeerIdentity) -> None:
        self.peer = peer
        self._reached = "proof"
        policy = self._factory.policy
        self._resetTimer(self._factory.decisionTimeout)
        limited = self._admitDecision(peer)
        asked = self._factory.clock.seconds() if limited is None else None
        decision = self._decision = (
            policy.check(peer, self._source) if limited is None else fail(limited)
        )

        def decided() -> None:
            # The policy's decision time, observed once (an application
            # that refuses after it does not count again).
            nonlocal asked
            if asked is not None and self._metrics is not None:
                self._metrics.latency.observe(self._factory.clock.seconds() - asked)
            asked = None

        def trusted(_: object) -> None:
            decided()
            gate = IBeforeAccept(self._application, None)
            if gate is None or self._factory.isClient:
                accepted(None)
                return
            # The application may still refuse, before ACCEPT: a daemon
            # whose application cannot be reached says so.
            ready = self._decision = gate.beforeAccept(peer)
            ready.addCallbacks(accepted, refused)

        def accepted(_: object) -> None:
            self._decision = None
            self._decided()
            self._machine.trusted()

        def refused(failure: Failure) -> None:
            if failure.check(CancelledError) and self._decision is None:
                return
            decided()
            self._decision = None
            self._decided()
            if failure.check(Refusal):
                refusal: Refusal = failure.value  # type: ignore[assignment]
                self._machine.refuse(refusal.code, refusal.message)
            else:
                self._log.failure(
                    "trust decision failed for {peer_name} {fingerprint}",
                    failure,
                    peer_name=peer.name,
                    fingerprint=peer.fingerprint,
                )
                self._machine.refuse(
                    ErrorCode.unavailable, EXPLANATIONS[ErrorCode.unavailable]
                )

        decision.addCallbacks(trusted, refused)

    def cancelDecision(self) -> None:
        self._decided()
        decision, self._decision = self._decision, None
        if decision is not None:
            decision.cancel()

    def connectApplication(self, peer: PeerIdentity) -> None:
        # A version 2 client connects to a pinned server before its proof.
        self.peer = peer
        self.applicationConnected = True
        self._factory.remember(self)
        self._application.makeConnection(
            AuthenticatedTransport(self.transport, self, peer)
        )
        self._settle(self._application)

    def whenTrusted(self) -> Deferred[None]:
        """
        Fires once the handshake is over on both sides; fails with why not.
        """
        if self._trusted:
            return succeed(None)
        if self._failure is not None:
            return fail(self._failure)
        waiting: Deferred[None] = Deferred()
        self._trustWaiters.append(waiting)
        return waiting

    def established(self) -> None:
        self._cancelTimer()
        self._trusted = True
        if self._metrics is not None:
            self._metrics.accepted += 1
        self._trustedNow()
        trustWaiters, self._trustWaiters = self._trustWaiters, []
        for waiting in trustWaiters:
            waiting.callback(None)
        self._factory.log.info(
            "dwtrust: authenticated {peerRole} {peer_name} {fingerprint} at {source}",
            event="dwtrust.authenticated",
            peer_name=self.peer.name if self.peer else None,
            fingerprint=self.peer.fingerprint if self.peer else None,
            algorithm=self.peer.algorithm if self.peer else None,
            peerRole="server" if self._factory.isClient else "client",
            source=self._source,
            protocol=self.protocolVersion,
        )
        self._overflowing = False
        self._deliverHeld()

    def _deliverHeld(self) -> None:
        """
        Hand the held bytes to the application, unless it has paused its
        transport; once none are left, let TLS hand bytes to it directly.
        """
        while self._held and not self._applicationPaused:
            held, self._held = b"".join(self._held), []
            self._heldSize = 0
            if not self.transport.disconnecting:
                self._application.dataReceived(held)
        if not self._held and self._stage is _Stage.held:
            self._stage = _Stage.delivered
            # From here on, TLS hands bytes straight to the application.
            self.dataReceived = self._application.dataReceived  # type: ignore[method-assign]
        self._updateReading()

    # Reading from the peer stops while we hold too much, or while the
    # application has paused its transport.

    def _updateReading(self) -> None:
        paused = self._overflowing or self._applicationPaused
        if paused != self._readingPaused and self.connected:
            self._readingPaused = paused
            connection = _connection(self.transport)
            if paused:
                connection.pauseProducing()
            else:
                connection.resumeProducing()

    def pauseApplication(self) -> None:
        self._applicationPaused = True
        self._updateReading()

    def resumeApplication(self) -> None:
        self._applicationPaused = False
        if self._stage is _Stage.held:
            self._deliverHeld()
        else:
            self._updateReading()

    def fail(self, code: ErrorCode, message: str, send: bool, byPeer: bool) -> None:
        self._cancelTimer()
        self._stage = _Stage.discarded
        self._held = []
        self._releaseHeld()
        if (
            self._admission is not None
            and self.peer is not None
            and code in _DISTRUSTED
            and not byPeer
        ):
            self._admission.forgetTrusted(self.peer.fingerprint)
        self._failure = HandshakeFailed(code, message, byPeer)
        if self._metrics is not None:
            if byPeer:
                self._metrics.failed += 1
            else:
                self._metrics.refuse(code.value)
        trustWaiters, self._trustWaiters = self._trustWaiters, []
        for waiting in trustWaiters:
            waiting.errback(Failure(self._failure))
        self._factory.log.info(
            "dwtrust: handshake with {peer} at {source} failed"
            " ({refusedBy}): {code}: {reason}",
            event="dwtrust.refused",
            code=code.value,
            reason=message,
            refusedBy="by the peer" if byPeer else "by us",
            byPeer=byPeer,
            peer=(
                f"{self.peer.name} {self.peer.fingerprint}"
                if self.peer
                else "a peer not yet identified"
            ),
            peer_name=self.peer.name if self.peer else None,
            fingerprint=self.peer.fingerprint if self.peer else None,
            source=self._source,
        )
        if not self._tlsDone:
            self.transport.abortConnection()
            return
        if send:
            self.sendFrame(Error(code.value, message))
        self.transport.loseConnection()
        # A peer that never answers our close_notify does not hold us.
        self._timer = self._factory.clock.callLater(
            CLOSE_GRACE, self.transport.abortConnection
        )

    # Timers

    def _resetTimer(self, delay: float) -> None:
        self._cancelTimer()
        self._timer = self._factory.clock.callLater(delay, self._machine.timedOut)

    def _cancelTimer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()


class HandshakeFactory(Factory):
    """
    Wraps an application's factory: every connection runs the dwtrust
    handshake before the application's protocol is connected.
    """

    protocol = HandshakeProtocol
    log = Logger()
    noisy = False

    def __init__(
        self,
        applicationFactory: IProtocolFactory,
        identity: Identity,
        policy: ITrustPolicy,
        isClient: bool,
        clock: IReactorTime,
        timeout: float,
        decisionTimeout: float,
        source: str | None = None,
        randomBytes: Callable[[int], bytes] = os.urandom,
        limits: Limits | None = None,
        admission: Admission | None = None,
        metrics: Metrics | None = None,
        versions: tuple[int, ...] = VERSIONS,
    ) -> None:
        """
        @param limits: the limits on peers; only C{maxCertificate} applies
            without C{admission}.
        @param admission: for a server, the counts its limits bound (shared
            with the other server factories of an authenticator); L{None} for
            no limits on connections.
        @param metrics: for a server, where to count handshakes by outcome,
            open connections and decision latency; L{None} to count nothing.
        @param versions: the dwtrust versions this side speaks, preferred
            first; the TLS layer (L{ConnectionCreator}) must offer the same.
        """
        self.applicationFactory = applicationFactory
        self.identity = identity
        self.policy = policy
        self.isClient = isClient
        self.clock = clock
        self.timeout = timeout
        self.decisionTimeout = decisionTimeout
        self.randomBytes = randomBytes
        self.versions = versions
        self._source = source
        self.limits = limits if limits is not None else Limits()
        self.admission = None if isClient else admission
        self.metrics = None if isClient else metrics
        self.sessions: dict[str, set[HandshakeProtocol]] = {}

    def doStart(self) -> None:
        self.applicationFactory.doStart()

    def doStop(self) -> None:
        self.applicationFactory.doStop()

    def buildProtocol(self, addr: IAddress) -> HandshakeProtocol | None:  # type: ignore[override]
        source = self._source or _describe(addr)
        prefix = sourcePrefix(addr)
        if self.admission is not None:
            try:
                self.admission.takeUntrusted(prefix)
            except Refused as e:
                # Before TLS no dwtrust frame can be sent: the connection is
                # closed at once, at the cost of one (rate-limited) log line.
                if self.metrics is not None:
                    self.metrics.refuse(LIMITED)
                suppressed = self.admission.refusalLog.allow(prefix)
                if suppressed is not None:
                    self.log.warn(
                        "dwtrust: refused a connection from {source}: {reason}"
                        " ({suppressed} more from {prefix} not logged)",
                        event="dwtrust.limited",
                        source=source,
                        prefix=prefix,
                        reason=str(e),
                        suppressed=suppressed,
                    )
                return None
        application = self.applicationFactory.buildProtocol(addr)
        if application is None:
            if self.admission is not None:
                self.admission.releaseUntrusted(prefix)
            return None
        return HandshakeProtocol(self, application, source, prefix)

    # Who is connected, for revocation.

    def remember(self, protocol: HandshakeProtocol) -> None:
        assert protocol.peer is not None
        self.sessions.setdefault(protocol.peer.fingerprint, set()).add(protocol)

    def forget(self, protocol: HandshakeProtocol) -> None:
        if protocol.peer is None:
            return
        sessions = self.sessions.get(protocol.peer.fingerprint)
        if sessions is not None:
            sessions.discard(protocol)
            if not sessions:
                del self.sessions[protocol.peer.fingerprint]


def _describe(address: IAddress) -> str:
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is not None and port is not None:
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    name = getattr(address, "name", None)
    return f"unix:{name!r}" if name is not None else repr(address)


def tlsFactory(
    handshakeFactory: HandshakeFactory, creator: ConnectionCreator
) -> TLSMemoryBIOFactory:
    """
    Put TLS under a L{HandshakeFactory}.
    """
    return _TLSFactory(
        creator,
        handshakeFactory.isClient,
        handshakeFactory,
        clock=handshakeFactory.clock,
    )


class _TLSFactory(TLSMemoryBIOFactory):
    """
    A TLS factory that, like any factory, may refuse a connection: when the
    wrapped factory builds no protocol, neither does this one (and the
    connection is closed at once).
    """

    def buildProtocol(self, addr: IAddress | None) -> TLSMemoryBIOProtocol | None:  # type: ignore[override]
        wrapped = self.wrappedFactory.buildProtocol(addr)
        if wrapped is None:
            return None
        return self.protocol(self, wrapped)
