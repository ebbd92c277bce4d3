"""
Wrapping factories and endpoints: the few lines a Twisted program needs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from attrs import define, field
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
    IStreamServerEndpoint,
)
from twisted.python.filepath import FilePath
from zope.interface import implementer

from ._authority import Decisions
from ._decision import Signers
from ._identity import Identity
from ._limits import Admission, Limits
from ._policy import ApprovalPolicy, ITrustPolicy, PinningPolicy
from ._protocol import HandshakeFactory, HandshakeProtocol, tlsFactory
from ._status import Metrics
from ._tls import ConnectionCreator
from ._wire import VERSIONS
from .approval import IApprover, approverFromName
from .store import SQLiteStore
from .store._newest import NEWEST_FILE, NewestDecisions

#: Seconds from TCP connect to the end of the handshake, approval aside.
DEFAULT_TIMEOUT = 10.0
#: Seconds a connection waits for a trust decision.
DEFAULT_DECISION_TIMEOUT = 30.0
#: The store's file name inside an identity directory.
STORE_FILE = "trust.sqlite3"


@define
class Authenticator:
    """
    Everything one side needs to authenticate connections: its identity, and
    the policies for the peers that connect to it (C{inbound}) and for the
    servers it dials (C{outbound}).

    @ivar clock: schedules time-outs; the reactor, or a fake clock in tests.
    @ivar timeout: seconds allowed from connect to the end of the handshake.
    @ivar decisionTimeout: seconds a connection may wait for a decision.
    @ivar limits: the limits on what peers not yet trusted can make the
        server side hold (see L{Limits}); one set of counts covers every
        server factory this authenticator wraps.
    @ivar metrics: what the server side counts (handshakes by outcome, open
        connections, decision latency), for the daemon's C{/metrics}.
    @ivar versions: the dwtrust protocol versions this side offers and
        accepts, preferred first (negotiated by ALPN in the TLS handshake).
        C{(1,)} behaves exactly as a version 1 peer; C{(2,)} refuses version
        1 peers with C{version_unsupported}.
    """

    identity: Identity
    inbound: ITrustPolicy | None
    outbound: ITrustPolicy | None
    clock: IReactorTime
    timeout: float = DEFAULT_TIMEOUT
    decisionTimeout: float = DEFAULT_DECISION_TIMEOUT
    limits: Limits = field(factory=Limits)
    metrics: Metrics = field(factory=Metrics)
    versions: tuple[int, ...] = field(default=VERSIONS, kw_only=True, converter=tuple)
    _creator: ConnectionCreator = field(init=False)
    _admission: Admission = field(init=False)
    _servers: list[HandshakeFactory] = field(init=False, factory=list)
    _closers: list[Callable[[], Deferred[None]]] = field(init=False, factory=list)

    def __attrs_post_init__(self) -> None:
        self._creator = ConnectionCreator(self.identity, self.versions)
        self._admission = Admission(self.limits, self.clock.seconds)

    def _handshakeFactory(
        self,
        applicationFactory: IProtocolFactory,
        policy: ITrustPolicy | None,
        isClient: bool,
        source: str | None = None,
    ) -> HandshakeFactory:
        if policy is None:
            role = "dial servers" if isClient else "accept clients"
            raise ValueError(f"this Authenticator has no policy to {role} with")
        return HandshakeFactory(
            applicationFactory,
            self.identity,
            policy,
            isClient,
            self.clock,
            self.timeout,
            self.decisionTimeout,
            source,
            limits=self.limits,
            admission=None if isClient else self._admission,
            metrics=None if isClient else self.metrics,
            versions=self.versions,
        )

    def wrapServerFactory(
        self, applicationFactory: IProtocolFactory
    ) -> IProtocolFactory:
        """
        Wrap a server factory: each connection gets TLS and the handshake, and
        the application protocol is connected only once the client is
        authenticated and trusted.
        """
        handshakes = self._handshakeFactory(applicationFactory, self.inbound, False)
        self._servers.append(handshakes)
        return tlsFactory(handshakes, self._creator)

    def wrapClientFactory(
        self, applicationFactory: IProtocolFactory, address: str
    ) -> IProtocolFactory:
        """
        Wrap a client factory for a connection to C{address} (the name the
        server's key is pinned under, such as C{"ledger.example:8443"}).
        """
        handshakes = self._handshakeFactory(
            applicationFactory, self.outbound, True, address
        )
        return tlsFactory(handshakes, self._creator)

    def serverEndpoint(self, inner: IStreamServerEndpoint) -> IStreamServerEndpoint:
        """
        An endpoint that listens on C{inner} with dwtrust.
        """
        return ServerEndpoint(self, inner)

    def clientEndpoint(
        self, inner: IStreamClientEndpoint, address: str
    ) -> IStreamClientEndpoint:
        """
        An endpoint that dials C{inner} with dwtrust; C{address} names the
        server for pinning.
        """
        return ClientEndpoint(self, inner, address)

    def closeWith(self, closer: Callable[[], Deferred[None]]) -> None:
        """
        Have L{close} call C{closer} (to close a store, say).
        """
        self._closers.append(closer)

    def close(self) -> Deferred[None]:
        """
        Release what this authenticator holds (the stores
        L{openAuthenticator} opened).  Connections are not affected.
        """
        closers, self._closers = self._closers, []
        return gatherResults([c() for c in closers]).addCallback(lambda _: None)

    @property
    def admission(self) -> Admission:
        """
        The server side's counts of connections not yet trusted, held bytes
        and connections waiting for a decision (see L{Limits}).
        """
        return self._admission

    def sessionsOf(self, fingerprint: str) -> list[HandshakeProtocol]:
        """
        The open, authenticated server-side connections of a peer key.
        """
        return [p for f in self._servers for p in f.sessions.get(fingerprint, ())]


@implementer(IStreamServerEndpoint)
class ServerEndpoint:
    def __init__(self, authenticator: Authenticator, inner: IStreamServerEndpoint):
        self._authenticator = authenticator
        self._inner = inner

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        return self._inner.listen(
            self._authenticator.wrapServerFactory(protocolFactory)
        )


@implementer(IStreamClientEndpoint)
class ClientEndpoint:
    """
    Connects with dwtrust.  C{connect} fires with the application protocol once
    the server has proved its identity and passed the pinning check, or fails
    with L{HandshakeFailed}.
    """

    def __init__(
        self,
        authenticator: Authenticator,
        inner: IStreamClientEndpoint,
        address: str,
    ) -> None:
        self._authenticator = authenticator
        self._inner = inner
        self._address = address

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        connecting = self.connectHandshake(protocolFactory)
        return connecting.addCallback(lambda connected: connected[0])

    def connectHandshake(
        self, protocolFactory: IProtocolFactory
    ) -> Deferred[tuple[IProtocol, HandshakeProtocol]]:
        """
        Like C{connect}, but fire with the handshake protocol too, whose
        C{whenClosed} tells when the connection ends.
        """
        wrapped = self._authenticator.wrapClientFactory(protocolFactory, self._address)
        connecting = self._inner.connect(wrapped)

        def tcpConnected(tls: Any) -> Deferred[tuple[IProtocol, HandshakeProtocol]]:
            handshake: HandshakeProtocol = tls.wrappedProtocol
            return handshake.whenConnected().addCallback(
                lambda application: (application, handshake)
            )

        return connecting.addCallback(tcpConnected)


def openAuthenticator(
    clock: IReactorTime,
    identity: Identity,
    store: FilePath[str],
    approver: IApprover | str = "known-only",
    strict: bool = False,
    expectedServer: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    decisionTimeout: float = DEFAULT_DECISION_TIMEOUT,
) -> Deferred[Authenticator]:
    """
    An L{Authenticator} over the SQLite store at C{store}, for both roles,
    remembering the newest decision about each key in
    C{newest-decisions.sqlite3} beside it (see L{Decisions}).  Its
    L{Authenticator.close} closes both.

    @param approver: an L{IApprover}, or the name of a built-in one.
    @param strict: refuse servers with no pin, rather than pinning them.
    @param expectedServer: if given, the C{org/service} servers must be.
    """
    chosen = approverFromName(approver) if isinstance(approver, str) else approver

    async def open() -> Authenticator:
        trustStore = await SQLiteStore.open(store)
        try:
            newest = await NewestDecisions.open(store.sibling(NEWEST_FILE))
        except BaseException:
            await trustStore.close()
            raise
        decisions = Decisions(identity, trustStore, Signers(), newest, clock=clock)
        authenticator = Authenticator(
            identity,
            ApprovalPolicy(trustStore, chosen, identity, decisions=decisions),
            PinningPolicy(trustStore, strict, expectedServer),
            clock,
            timeout,
            decisionTimeout,
        )
        decisions.sessions = authenticator.sessionsOf
        authenticator.closeWith(trustStore.close)
        authenticator.closeWith(newest.close)
        return authenticator

    return Deferred.fromCoroutine(open())
