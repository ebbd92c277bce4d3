"""
Trust policies: the one question the handshake asks once a peer has proved
its identity — go on, or refuse with which code?

- L{ApprovalPolicy} answers for a service about the clients that connect to
  it, from its trust store and, for keys the store does not know, its
  approver.
- L{PinningPolicy} answers for a client about the servers it dials: the first
  key seen at an address is pinned, as ssh's C{accept-new}, and a different
  one later is refused with C{identity_changed}.  A server whose
  C{org/service} is pinned with the same key under another name (another
  address, or the C{service:ORG/SERVICE} pseudo-address that
  L{dwtrust.provisioning.instantiate} installs) is known, even in strict mode.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from ._decision import DecisionError, SignedDecision, Signers
from ._identity import Identity, PeerIdentity
from ._machine import Refusal
from ._wire import ErrorCode
from .approval import ApprovalRequest, Decision, IApprover
from .control import ControlBus, ControlMessage
from .store import IKnownServices, ITrustStore, KeyRecord, KeyState, StoreUnavailable

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

    Every stored decision is checked against C{signers} (the owners, and the
    service itself) before it counts: a row that says C{approved} without a
    valid signature is treated as unknown, and reported.  Decisions of
    approvers other than the owners are signed with the service's own key.

    @ivar identity: the service's identity.
    @ivar signers: the keys trusted to sign decisions.
    @ivar bus: where control messages go, if anywhere.
    """

    log = Logger()

    def __init__(
        self,
        store: ITrustStore,
        approver: IApprover,
        identity: Identity,
        signers: Signers | None = None,
        bus: ControlBus | None = None,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.approver = approver
        self.identity = identity
        # A copy: the service's own key signs its approvers' decisions, but
        # must not join a set the caller shares (with the control channel,
        # say, which admits owners only).
        self.signers = Signers(signers if signers is not None else ())
        self.signers.add(identity.publicKey)
        self.bus = bus
        self._now = now

    @property
    def serviceName(self) -> str:
        return self.identity.name

    def check(self, peer: PeerIdentity, source: str) -> Deferred[None]:
        checking = Deferred.fromCoroutine(self._check(peer, source))
        return checking.addErrback(self._unavailable, peer, source)

    def _unavailable(self, failure: Failure, peer: PeerIdentity, source: str) -> None:
        """
        A store that cannot be reached (a shared store in an outage) refuses
        the peer with C{unavailable}: one line in the log, no traceback.
        """
        failure.trap(StoreUnavailable)
        self.log.warn(
            "dwtrust: REFUSED {peer_name} {fingerprint} from {source}: {reason}",
            event="dwtrust.store_unavailable",
            peer_name=peer.name,
            fingerprint=peer.fingerprint,
            source=source,
            reason=failure.getErrorMessage(),
        )
        raise Refusal(
            ErrorCode.unavailable,
            "the trust store is unavailable; try again later",
        )

    def _countFailed(self, failure: Failure) -> None:
        if failure.check(StoreUnavailable):
            # The store says so itself, once per outage.
            return
        self.log.failure("dwtrust: counting an attempt failed", failure)

    def verified(self, record: KeyRecord) -> SignedDecision | None:
        """
        The signed decision behind C{record}, if it verifies and matches the
        record; L{None} (and a warning) otherwise.
        """
        try:
            decision = SignedDecision.decode(record.decision)
            self.signers.verify(decision, self.serviceName)
            if (decision.fingerprint, decision.state) != (
                record.fingerprint,
                record.state.value,
            ):
                raise DecisionError("the decision does not match the stored record")
        except DecisionError as e:
            self.log.warn(
                "dwtrust: REFUSED a stored decision: {fingerprint} is {state} in"
                " the store, but {error}",
                event="dwtrust.forged_decision",
                fingerprint=record.fingerprint,
                state=record.state.value,
                error=str(e),
            )
            self._publish(
                ControlMessage.about(
                    "forged_decision",
                    self.serviceName,
                    record,
                    state=record.state.value,
                    reason=f"the store says {record.state.value}, but {e}",
                )
            )
            return None
        return decision

    def _publish(self, message: ControlMessage) -> None:
        if self.bus is not None:
            self.bus.publish(message)

    async def _check(self, peer: PeerIdentity, source: str) -> None:
        record = await self.store.lookup(peer.fingerprint)
        if record is not None and record.state is not KeyState.pending:
            # Counting the attempt need not hold up the handshake.
            self.store.seen(peer.fingerprint, source).addErrback(self._countFailed)
            stored = self.verified(record)
            if record.state is not KeyState.approved:
                # A refusal stands even unsigned: failing closed is safe.
                code = _REFUSED_STATES[record.state]
                raise Refusal(code, f"this key is {record.state.value}")
            if stored is not None:
                return
            # An approval nobody signed counts for nothing: ask afresh.
        for other in await self.store.keysFor(peer.org, peer.service):
            if (
                other.fingerprint != peer.fingerprint
                and other.state is KeyState.approved
                and self.verified(other) is not None
            ):
                self._identityChanged(peer, source, other)
        # An approver that abstains (fires with None) refuses, storing nothing.
        decision = await self.approver.requestApproval(
            ApprovalRequest(peer, source, self.serviceName)
        ) or Decision(False, "no approver decided", "policy", remember=False)
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
            signed = SignedDecision.make(
                self.identity,
                self.serviceName,
                peer,
                state.value,
                self._now(),
                f"{decision.decidedBy}: {decision.reason}",
            )
            await self.store.record(
                peer, state, source, decision.decidedBy, signed.encode()
            )
        if not decision.approved:
            raise Refusal(ErrorCode.denied, decision.reason)

    def _identityChanged(
        self, peer: PeerIdentity, source: str, known: KeyRecord
    ) -> None:
        self.log.warn(
            "dwtrust: IDENTITY CHANGED: {peer_name} presented"
            " {fingerprint} from {source}, but its approved key is"
            " {known}",
            event="dwtrust.identity_changed",
            peer_name=peer.name,
            fingerprint=peer.fingerprint,
            known=known.fingerprint,
            source=source,
        )
        self._publish(
            ControlMessage.about(
                "identity_changed",
                self.serviceName,
                peer,
                source=source,
                knownKeys=(known.fingerprint,),
                reason=(
                    f"{peer.name} presented a new key; its approved key is"
                    f" {known.fingerprint}"
                ),
            )
        )
        raise Refusal(
            ErrorCode.identity_changed,
            f"{peer.name} is known with another key",
        )


@implementer(ITrustPolicy)
class PinningPolicy:
    """
    A client's policy for the servers it dials.

    A server is known if its key is pinned for the address dialled, or if its
    C{org/service} is pinned with the same key under any other name: another
    address, or the pseudo-address C{service:ORG/SERVICE} (see
    L{dwtrust.provisioning.instantiate}).  A known server passes, and is
    pinned for the address dialled too.  A different key for a pinned
    address, or for a pinned C{org/service}, is refused with
    C{identity_changed}.

    @ivar strict: refuse servers that are not known, rather than pinning them.
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
        known = False
        for other in await self.known.pinnedService(peer.org, peer.service):
            if other.fingerprint != peer.fingerprint:
                self._changed(peer, address, f"{other.fingerprint} at {other.address}")
            known = True
        if self.strict and not known:
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
