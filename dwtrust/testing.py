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

from attrs import define, field
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IReactorTime
from twisted.internet.task import Clock
from twisted.test.iosim import IOPump, connectedServerAndClient
from zope.interface import implementer

from ._identity import Identity, PeerIdentity
from ._policy import ApprovalPolicy, PinningPolicy
from ._wrap import Authenticator
from .approval import ApprovalRequest, Decision, IApprover
from .store import IKnownServices, ITrustStore, KeyRecord, KeyState, Pin

#: The address in-memory connections appear to come from.
_PEER = IPv4Address("TCP", "127.0.0.1", 40000)

__all__ = [
    "FakeApprover",
    "MemoryTrustStore",
    "PendingApproval",
    "connectInMemory",
    "memoryAuthenticator",
]


@implementer(ITrustStore, IKnownServices)
class MemoryTrustStore:
    """
    A trust store and pin store held in dictionaries.

    @ivar peers: the records, by fingerprint.
    @ivar pins: the pins, by address.
    """

    def __init__(self, now: Callable[[], float] = time.time) -> None:
        self.peers: dict[str, KeyRecord] = {}
        self.pins: dict[str, Pin] = {}
        self._now = now

    def lookup(self, fingerprint: str) -> Deferred[KeyRecord | None]:
        return succeed(self.peers.get(fingerprint))

    def keysFor(self, org: str, service: str) -> Deferred[list[KeyRecord]]:
        return succeed(
            [r for r in self.peers.values() if (r.org, r.service) == (org, service)]
        )

    def record(
        self, peer: PeerIdentity, state: KeyState, source: str, decidedBy: str
    ) -> Deferred[KeyRecord]:
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
        return succeed(record)

    def seen(self, fingerprint: str, source: str) -> Deferred[None]:
        old = self.peers.get(fingerprint)
        if old is not None:
            self.peers[fingerprint] = KeyRecord(
                old.fingerprint,
                old.org,
                old.service,
                old.algorithm,
                old.publicKey,
                old.state,
                old.firstSeen,
                self._now(),
                old.attempts + 1,
                source,
                old.decidedBy,
            )
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
        ApprovalPolicy(store, approver, identity.name),
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

    @return: the client's and the server's outermost protocols, and the pump
        (call C{pump.flush()} after anything that sends).
    """
    clientProtocol, serverProtocol, pump = connectedServerAndClient(
        lambda: server.wrapServerFactory(serverFactory).buildProtocol(_PEER),
        lambda: client.wrapClientFactory(clientFactory, address).buildProtocol(_PEER),
        greet=False,
        clock=clock,
    )
    assert clientProtocol is not None and serverProtocol is not None
    pump.flush()
    return clientProtocol, serverProtocol, pump
