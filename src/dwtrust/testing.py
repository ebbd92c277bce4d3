"""
In-memory fakes, for testing code that uses dwtrust (approval callbacks,
wrapped protocols) without sockets, threads or files.

    >>> store = MemoryTrustStore()
    >>> approver = FakeApprover()
    >>> server = memoryAuthenticator(serverIdentity, store, approver, clock)
    >>> ...
    >>> approver.requests[0].deferred.callback(Decision(True, "ok", "test"))
"""

from __future__ import annotations

import time
from collections.abc import Callable

from attrs import define, evolve, field
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IReactorTime
from twisted.internet.task import Clock
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.test.iosim import IOPump, connectedServerAndClient
from zope.interface import implementer

from ._decision import SignedDecision
from ._identity import Identity, PeerIdentity
from ._policy import ApprovalPolicy, PinningPolicy
from ._protocol import HandshakeProtocol
from ._wrap import Authenticator
from .approval import (
    ApprovalCallback,
    ApprovalRequest,
    CallableApprover,
    Decision,
    IApprover,
)
from .store import (
    DecisionConflict,
    IKnownServices,
    ITrustStore,
    KeyRecord,
    KeyState,
    PendingFull,
    Pin,
    sourceHost,
)
from .store._interface import checkPendingCaps

#: The address in-memory connections appear to come from.
_PEER = IPv4Address("TCP", "127.0.0.1", 40000)

__all__ = [
    "FakeApprover",
    "MemoryTrustStore",
    "NotDecided",
    "PendingApproval",
    "approvalRequest",
    "connectInMemory",
    "decide",
    "memoryAuthenticator",
    "recordDecision",
]


@implementer(ITrustStore, IKnownServices)
class MemoryTrustStore:
    """
    A trust store and pin store held in dictionaries.

    @ivar peers: the records, by fingerprint, without their decisions.
    @ivar history: each key's decisions (as records holding them), by
        fingerprint and place in its history: append-only, as in the SQL
        stores.
    @ivar pins: the pins, by address.
    """

    def __init__(self, now: Callable[[], float] = time.time) -> None:
        self.peers: dict[str, KeyRecord] = {}
        self.history: dict[str, dict[int, KeyRecord]] = {}
        self.pins: dict[str, Pin] = {}
        self.ownerRegistrations: dict[str, bytes] = {}
        self._now = now

    def _combined(self, fingerprint: str) -> KeyRecord | None:
        """
        The key's record with its newest decision, as the SQL stores read it.
        """
        peer = self.peers.get(fingerprint)
        decisions = self.history.get(fingerprint)
        if not decisions:
            return peer
        newest = decisions[max(decisions)]
        if peer is None:
            return newest
        if peer.state is KeyState.pending:
            return evolve(
                peer,
                decision=newest.decision,
                sequence=newest.sequence,
                sentBy=newest.sentBy,
            )
        return evolve(
            peer,
            state=newest.state,
            decidedBy=newest.decidedBy,
            decision=newest.decision,
            sequence=newest.sequence,
            sentBy=newest.sentBy,
        )

    def _all(self) -> list[KeyRecord]:
        keys = dict.fromkeys([*self.peers, *self.history])
        records = (self._combined(f) for f in keys)
        return [r for r in records if r is not None]

    def lookup(self, fingerprint: str) -> Deferred[KeyRecord | None]:
        return succeed(self._combined(fingerprint))

    def keysFor(self, org: str, service: str) -> Deferred[list[KeyRecord]]:
        return succeed([r for r in self._all() if (r.org, r.service) == (org, service)])

    def record(
        self,
        peer: PeerIdentity,
        state: KeyState,
        source: str,
        decidedBy: str,
        decision: bytes = b"",
        sequence: int = 0,
        sentBy: str = "",
    ) -> Deferred[KeyRecord]:
        decisions = self.history.setdefault(peer.fingerprint, {})
        if sequence in decisions:
            return fail(
                DecisionConflict(
                    f"the store already holds decision {sequence} about"
                    f" {peer.fingerprint}"
                )
            )
        now = self._now()
        old = self.peers.get(peer.fingerprint)
        self.peers[peer.fingerprint] = record = KeyRecord(
            peer.fingerprint,
            peer.org,
            peer.service,
            peer.algorithm,
            peer.publicKey.blob,
            state,
            old.firstSeen if old else now,
            now,
            old.attempts if old else 1,
            source,
            decidedBy,
        )
        decisions[sequence] = evolve(
            record, decision=decision, sequence=sequence, sentBy=sentBy
        )
        combined = self._combined(peer.fingerprint)
        assert combined is not None
        return succeed(combined)

    def seen(self, fingerprint: str, source: str) -> Deferred[None]:
        old = self.peers.get(fingerprint)
        if old is not None:
            self.peers[fingerprint] = evolve(
                old, lastSeen=self._now(), attempts=old.attempts + 1, source=source
            )
        return succeed(None)

    def addPending(
        self,
        peer: PeerIdentity,
        source: str,
        requestId: str,
        expires: float,
        maxPerSource: int,
        maxTotal: int,
    ) -> Deferred[tuple[KeyRecord, bool]]:
        old = self.peers.get(peer.fingerprint)
        if old is not None and old.state is KeyState.pending:
            self.seen(peer.fingerprint, source)
            return succeed((self._combined(peer.fingerprint) or old, False))
        pending = [r for r in self.peers.values() if r.state is KeyState.pending]
        host = sourceHost(source)
        fromHost = sum(sourceHost(r.source) == host for r in pending)
        try:
            checkPendingCaps(host, fromHost, len(pending), maxPerSource, maxTotal)
        except PendingFull as e:
            return fail(e)
        now = self._now()
        self.peers[peer.fingerprint] = record = KeyRecord(
            peer.fingerprint,
            peer.org,
            peer.service,
            peer.algorithm,
            peer.publicKey.blob,
            KeyState.pending,
            now,
            now,
            1,
            source,
            "",
            b"",
            requestId,
            expires,
        )
        return succeed((self._combined(peer.fingerprint) or record, True))

    def pending(self) -> Deferred[list[KeyRecord]]:
        return succeed([r for r in self._all() if r.state is KeyState.pending])

    def decided(self) -> Deferred[list[KeyRecord]]:
        return succeed([r for r in self._all() if r.state is not KeyState.pending])

    def expirePending(self, now: float) -> Deferred[list[KeyRecord]]:
        lapsed = [
            r for r in self._all() if r.state is KeyState.pending and r.expires < now
        ]
        for record in lapsed:
            del self.peers[record.fingerprint]
        return succeed(lapsed)

    def owners(self) -> Deferred[list[bytes]]:
        return succeed(list(self.ownerRegistrations.values()))

    def addOwner(self, fingerprint: str, registration: bytes) -> Deferred[None]:
        self.ownerRegistrations[fingerprint] = registration
        return succeed(None)

    def close(self) -> Deferred[None]:
        return succeed(None)

    def pinned(self, address: str) -> Deferred[Pin | None]:
        return succeed(self.pins.get(address))

    def pinnedService(self, org: str, service: str) -> Deferred[list[Pin]]:
        return succeed(
            [p for p in self.pins.values() if (p.org, p.service) == (org, service)]
        )

    def pin(self, address: str, peer: PeerIdentity) -> Deferred[Pin]:
        self.pins[address] = pin = Pin.of(address, peer, self._now())
        return succeed(pin)

    def unpin(self, address: str) -> Deferred[bool]:
        return succeed(self.pins.pop(address, None) is not None)


@define
class PendingApproval:
    """
    One request a L{FakeApprover} received; fire C{deferred} to decide it.
    """

    request: ApprovalRequest
    deferred: Deferred[Decision]
    cancelled: bool = False

    def approve(self, reason: str = "approved in a test") -> None:
        self.deferred.callback(Decision(True, reason, "test"))

    def deny(self, reason: str = "denied in a test") -> None:
        self.deferred.callback(Decision(False, reason, "test"))


@implementer(IApprover)
@define
class FakeApprover:
    """
    An approver whose decisions the test makes, as C{FakeUI} does in Twisted's
    own C{knownhosts} tests.

    @ivar requests: every request received, oldest first.
    """

    requests: list[PendingApproval] = field(factory=list)

    def requestApproval(self, request: ApprovalRequest) -> Deferred[Decision]:
        def cancelled(d: Deferred[Decision]) -> None:
            pending.cancelled = True

        pending = PendingApproval(request, Deferred(cancelled))
        self.requests.append(pending)
        return pending.deferred


def memoryAuthenticator(
    identity: Identity,
    store: MemoryTrustStore,
    approver: IApprover,
    clock: IReactorTime,
    strict: bool = False,
) -> Authenticator:
    """
    An L{Authenticator} over in-memory fakes.
    """
    return Authenticator(
        identity,
        ApprovalPolicy(store, approver, identity),
        PinningPolicy(store, strict),
        clock,
    )


def connectInMemory(
    server: Authenticator,
    serverFactory: IProtocolFactory,
    client: Authenticator,
    clientFactory: IProtocolFactory,
    clock: Clock,
    address: str = "server.example:8443",
) -> tuple[IProtocol, IProtocol, IOPump]:
    """
    Connect a wrapped client and server through memory, with real TLS, and
    run the exchange until it is quiet.

    @return: the client's and the server's protocols, as C{clientFactory}
        and C{serverFactory} built them (each connected once its peer is
        trusted: check C{protocol.transport}), and the pump (call
        C{pump.flush()} after anything that sends).
    """
    serverTLS = server.wrapServerFactory(serverFactory).buildProtocol(_PEER)
    clientTLS = client.wrapClientFactory(clientFactory, address).buildProtocol(_PEER)
    assert clientTLS is not None and serverTLS is not None
    # Taken now: TLS lets go of the protocol it wraps once the connection is
    # lost, as a refused one is during the exchange.
    applications = _application(clientTLS), _application(serverTLS)
    _, _, pump = connectedServerAndClient(
        lambda: serverTLS, lambda: clientTLS, greet=False, clock=clock
    )
    pump.flush()
    return applications[0], applications[1], pump


def _application(tls: IProtocol) -> IProtocol:
    """
    The application's protocol under a wrapped factory's TLS protocol.
    """
    assert isinstance(tls, TLSMemoryBIOProtocol)
    handshake = tls.wrappedProtocol
    assert isinstance(handshake, HandshakeProtocol)
    return handshake._application


def recordDecision(
    store: ITrustStore,
    signer: Identity,
    service: Identity | PeerIdentity,
    peer: PeerIdentity,
    state: KeyState,
    source: str = "test",
    now: float = 0.0,
    sequence: int | None = None,
) -> Deferred[KeyRecord]:
    """
    Store a decision about C{peer} for C{service} (the service's identity:
    decisions are bound to its name and its key), signed by C{signer} (the
    service's own identity, or a registered owner's), as the control channel
    would: at the next place in the key's history, unless C{sequence} says
    which.
    """

    async def record() -> KeyRecord:
        place = sequence
        if place is None:
            existing = await store.lookup(peer.fingerprint)
            place = max(existing.sequence if existing else 0, 0) + 1
        decision = SignedDecision.make(
            signer,
            service.name,
            peer,
            state.value,
            now or time.time(),
            "recorded in a test",
            service.fingerprint,
            place,
        )
        return await store.record(
            peer,
            state,
            source,
            signer.fingerprint,
            decision.encode(),
            place,
            signer.fingerprint,
        )

    return Deferred.fromCoroutine(record())


# --- Testing approval callbacks ------------------------------------------------


def approvalRequest(
    org: str = "acme",
    service: str = "billing",
    source: str = "10.0.0.1:1234",
    serviceName: str = "acme/ledger",
    algorithm: str = "ed25519",
) -> ApprovalRequest:
    """
    A request from C{org/service}, with a fresh key, to connect from
    C{source} to the service C{serviceName}: what an approver is asked.

    @param algorithm: the key's algorithm, by its command-line name.
    """
    key = Identity.generate(org, service, algorithm).publicKey
    return ApprovalRequest(PeerIdentity(org, service, key), source, serviceName)


class NotDecided(AssertionError):
    """
    L{decide} found the approver still deciding.
    """


def decide(
    approver: IApprover | ApprovalCallback,
    request: ApprovalRequest | None = None,
) -> Decision | None:
    """
    Ask C{approver} about C{request} and return its answer at once: a
    L{Decision}, or L{None} if it abstains.

    C{approver} is an L{IApprover}, or an approval callback (what
    C{python:package.module.callable} names), which is run exactly as
    C{--approver python:...} runs it: C{True} or C{False} become decisions,
    and an exception a logged refusal.

        >>> decision = decide(myPolicy, approvalRequest(org="acme"))
        >>> assert decision is not None and decision.approved

    An approver that waits (on a L{Clock}, say) has not decided yet: advance
    the clock or fire what it waits for first, or use
    C{successResultOf(approver.requestApproval(request))}.

    @param request: by default, L{approvalRequest}C{()}.
    @raise NotDecided: if it has not decided yet; its L{Deferred} is then
        cancelled, as when a client goes away.
    @raise Exception: whatever the approver's L{Deferred} failed with.
    """
    if not IApprover.providedBy(approver):
        approver = CallableApprover(approver, "test")
    asked = approver.requestApproval(
        request if request is not None else approvalRequest()
    )
    results: list[object] = []
    asked.addBoth(results.append)
    if not results:
        asked.cancel()
        raise NotDecided(f"{approver!r} has not decided yet")
    [result] = results
    if isinstance(result, Failure):
        result.raiseException()
    assert result is None or isinstance(result, Decision), result
    return result
