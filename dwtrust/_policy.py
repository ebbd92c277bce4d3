"""
Trust policies: the one question the handshake asks once a peer has proved
its identity — go on, or refuse with which code?

- L{ApprovalPolicy} answers for a service about the clients that connect to
  it, from its trust store and, for keys the store does not know, its
  approver.
- L{PinningPolicy} answers for a client about the servers it dials: the first
  key seen at an address is pinned, as ssh's C{accept-new}, and a different
  one later is refused with C{identity_changed}.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import Interface, implementer

from ._identity import PeerIdentity
from ._machine import Refusal
from ._wire import ErrorCode
from .approval import ApprovalRequest, IApprover
from .store import IKnownServices, ITrustStore, KeyState

_REFUSED_STATES = {
    KeyState.denied: ErrorCode.denied,
    KeyState.blocked: ErrorCode.denied,
    KeyState.revoked: ErrorCode.revoked,
    KeyState.pending: ErrorCode.pending,
}


class ITrustPolicy(Interface):
    """
    Decides whether an authenticated peer may go on.
    """

    def check(peer: PeerIdentity, source: str) -> Deferred[None]:
        """
        Fire with L{None} to go on, or fail with a L{Refusal}.

        @param source: where the peer is: the address it connects from (for a
            server) or the address we dialled (for a client).
        """


@implementer(ITrustPolicy)
class ApprovalPolicy:
    """
    A service's policy for the clients that connect to it.

    @ivar serviceName: the C{org/service} of the service, for requests.
    """

    log = Logger()

    def __init__(
        self, store: ITrustStore, approver: IApprover, serviceName: str
    ) -> None:
        self.store = store
        self.approver = approver
        self.serviceName = serviceName

    def check(self, peer: PeerIdentity, source: str) -> Deferred[None]:
        return Deferred.fromCoroutine(self._check(peer, source))

    async def _check(self, peer: PeerIdentity, source: str) -> None:
        record = await self.store.lookup(peer.fingerprint)
        if record is not None:
            await self.store.seen(peer.fingerprint, source)
            if record.state is KeyState.approved:
                return
            code = _REFUSED_STATES[record.state]
            raise Refusal(code, f"this key is {record.state.value}")
        for other in await self.store.keysFor(peer.org, peer.service):
            if other.state is KeyState.approved:
                self.log.warn(
                    "dwtrust: IDENTITY CHANGED: {peer_name} presented"
                    " {fingerprint} from {source}, but its approved key is"
                    " {known}",
                    event="dwtrust.identity_changed",
                    peer_name=peer.name,
                    fingerprint=peer.fingerprint,
                    known=other.fingerprint,
                    source=source,
                )
                raise Refusal(
                    ErrorCode.identity_changed,
                    f"{peer.name} is known with another key",
                )
        decision = await self.approver.requestApproval(
            ApprovalRequest(peer, source, self.serviceName)
        )
        self.log.info(
            "dwtrust: {decided} {peer_name} {fingerprint} from {source}"
            " ({decided_by}: {reason})",
            event="dwtrust.decision",
            decided="approved" if decision.approved else "refused",
            peer_name=peer.name,
            fingerprint=peer.fingerprint,
            source=source,
            decided_by=decision.decidedBy,
            reason=decision.reason,
        )
        if decision.remember:
            state = KeyState.approved if decision.approved else KeyState.denied
            await self.store.record(peer, state, source, decision.decidedBy)
        if not decision.approved:
            raise Refusal(ErrorCode.denied, decision.reason)


@implementer(ITrustPolicy)
class PinningPolicy:
    """
    A client's policy for the servers it dials.

    @ivar strict: refuse servers with no pin, rather than pinning them.
    @ivar expected: if given, the C{org/service} the server must be.
    """

    log = Logger()

    def __init__(
        self,
        known: IKnownServices,
        strict: bool = False,
        expected: str | None = None,
    ) -> None:
        self.known = known
        self.strict = strict
        self.expected = expected

    def check(self, peer: PeerIdentity, source: str) -> Deferred[None]:
        return Deferred.fromCoroutine(self._check(peer, source))

    async def _check(self, peer: PeerIdentity, address: str) -> None:
        if self.expected is not None and peer.name != self.expected:
            raise Refusal(
                ErrorCode.denied,
                f"expected {self.expected}, but the server is {peer.name}",
            )
        pin = await self.known.pinned(address)
        if pin is not None:
            if (
                pin.fingerprint == peer.fingerprint
                and pin.org == peer.org
                and (pin.service == peer.service)
            ):
                return
            self._changed(peer, address, f"{pin.org}/{pin.service} {pin.fingerprint}")
        for other in await self.known.pinnedService(peer.org, peer.service):
            if other.fingerprint != peer.fingerprint:
                self._changed(peer, address, f"{other.fingerprint} at {other.address}")
        if self.strict:
            raise Refusal(
                ErrorCode.denied,
                f"{peer.name} ({peer.fingerprint}) at {address} is not a known"
                " service, and strict checking is on",
            )
        await self.known.pin(address, peer)
        self.log.info(
            "dwtrust: pinned {peer_name} {fingerprint} for {address}",
            event="dwtrust.pinned",
            peer_name=peer.name,
            fingerprint=peer.fingerprint,
            address=address,
        )

    def _changed(self, peer: PeerIdentity, address: str, known: str) -> None:
        self.log.warn(
            "dwtrust: IDENTITY CHANGED at {address}: the server presented"
            " {peer_name} {fingerprint}; known: {known}",
            event="dwtrust.identity_changed",
            address=address,
            peer_name=peer.name,
            fingerprint=peer.fingerprint,
            known=known,
        )
        raise Refusal(
            ErrorCode.identity_changed,
            f"the server at {address} presented {peer.name} {peer.fingerprint},"
            f" but {known} is on record",
        )
