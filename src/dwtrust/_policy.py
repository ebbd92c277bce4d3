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

from ._authority import Decisions, refuseChangedIdentity
from ._bus import ControlBus
from ._decision import SignedDecision, Signers
from ._identity import Identity, PeerIdentity, PublicKey
from ._machine import Refusal
from ._wire import ErrorCode
from .approval import ApprovalRequest, Decision, IApprover
from .store import (
    DecisionConflict,
    IKnownServices,
    ITrustStore,
    KeyRecord,
    KeyState,
    StoreUnavailable,
)
from .store._newest import NewestDecisions

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


class IEarlyTrust(Interface):
    """
    A client policy that can tell, from the server's TLS certificate key
    alone, whether that server is already known (dwtrust version 2): a known
    server's application is connected before its proof arrives, so that the
    client's first bytes leave with its C{PROOF}.  The server's proof is
    still verified, and must prove the identity this returns, before any of
    the server's bytes are delivered.
    """

    def knownKey(
        key: PublicKey, source: str, claimed: tuple[str, str] | None = None
    ) -> Deferred[PeerIdentity | None]:
        """
        Fire with the identity pinned with exactly C{key} for C{source} (the
        address dialled), or under its C{org/service} elsewhere, or L{None}
        if none is; fail with a L{Refusal} (C{identity_changed}) if C{source}
        is pinned to another key, or (C{denied}) if the policy refuses
        unknown servers.

        @param claimed: the C{(org, service)} the server's certificate names:
            a claim, which only says where to look for C{key}.
        """


@implementer(ITrustPolicy)
class ApprovalPolicy:
    """
    A service's policy for the clients that connect to it.

    What a stored decision means is for L{Decisions} to say (its signature,
    its service, its place in the key's history); this policy adds the
    identity: a decision is about a key I{and} the names that key proved,
    so a known key that claims other names is refused with
    C{identity_changed}.  Keys with no decision in force go to the approver;
    decisions of approvers other than the owners are signed with the
    service's own key.

    @ivar decisions: the decisions in force.
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
        decisions: Decisions | None = None,
    ) -> None:
        """
        @param signers: the owners, whose decisions count (with the
            service's own); ignored if C{decisions} is given.
        @param decisions: the service's decisions; by default, ones that
            remember the newest decision about each key in memory only.
        """
        self.store = store
        self.approver = approver
        self.identity = identity
        if decisions is None:
            decisions = Decisions(
                identity,
                store,
                Signers(signers if signers is not None else ()),
                NewestDecisions.inMemory(),
                bus,
                now,
            )
        self.decisions = decisions
        self.bus = bus
        #: If set, told the source of every connection of an approved key
        #: (the daemon's L{KnownSources <dwtrust.approval.KnownSources>}).
        self.approvedFrom: Callable[[str], object] | None = None

    @property
    def serviceName(self) -> str:
        return self.identity.name

    def check(self, peer: PeerIdentity, source: str) -> Deferred[None]:
        # A known key's check is callbacks on Deferreds that have fired
        # already (the stores answer it from memory): no coroutine, and no
        # wait for the reactor.
        checking = self.store.lookup(peer.fingerprint).addCallback(
            self._checkRecord, peer, source
        )
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

    def _seen(self, peer: PeerIdentity, source: str) -> None:
        # Counting the attempt need not hold up the handshake.
        self.store.seen(peer.fingerprint, source).addErrback(self._countFailed)

    def _checkRecord(
        self, record: KeyRecord | None, peer: PeerIdentity, source: str
    ) -> Deferred[None]:
        if record is None:
            return Deferred.fromCoroutine(self._ask(peer, source))
        return self.decisions.current(record).addCallback(
            self._decided, record, peer, source
        )

    def _decided(
        self,
        decision: SignedDecision | None,
        record: KeyRecord,
        peer: PeerIdentity,
        source: str,
    ) -> Deferred[None] | None:
        if decision is not None:
            self._sameIdentity(peer, source, decision)
            self._seen(peer, source)
            if decision.state != KeyState.approved.value:
                code = _REFUSED_STATES[KeyState(decision.state)]
                raise Refusal(code, f"this key is {decision.state}")
            if self.approvedFrom is not None:
                self.approvedFrom(source)
            return None
        if record.state not in (KeyState.pending, KeyState.approved):
            # A refusal stands even unsigned: failing closed is safe.
            self._seen(peer, source)
            code = _REFUSED_STATES[record.state]
            raise Refusal(code, f"this key is {record.state.value}")
        # An approval nobody signed counts for nothing: ask afresh.
        return Deferred.fromCoroutine(self._ask(peer, source))

    async def _ask(self, peer: PeerIdentity, source: str) -> None:
        """
        A key with no decision in force: refuse a new key for a known
        identity, else ask the approver.
        """
        for other in await self.store.keysFor(peer.org, peer.service):
            if (
                other.fingerprint != peer.fingerprint
                and other.state is KeyState.approved
                and self.decisions.verify(other) is not None
            ):
                self._identityChanged(peer, source, other)
        # An approver that abstains (fires with None) refuses, storing nothing.
        answer = await self.approver.requestApproval(
            ApprovalRequest(peer, source, self.serviceName)
        ) or Decision(False, "no approver decided", "policy", remember=False)
        if answer.signed is not None:
            # An owner's decision woke this connection: it holds for the
            # identity the owner saw, which must be the one proved here.
            self._sameIdentity(peer, source, answer.signed)
        self.log.info(
            "dwtrust: {decided} {peer_name} {fingerprint} from {source}"
            " ({decided_by}: {reason})",
            event="dwtrust.decision",
            decided="approved" if answer.approved else "refused",
            peer_name=peer.name,
            fingerprint=peer.fingerprint,
            source=source,
            decided_by=answer.decidedBy,
            reason=answer.reason,
        )
        if answer.remember:
            try:
                await self.decisions.decideFor(
                    peer,
                    KeyState.approved if answer.approved else KeyState.denied,
                    f"{answer.decidedBy}: {answer.reason}",
                    source,
                    answer.decidedBy,
                )
            except DecisionConflict:
                # Another connection with this key (here or on another
                # instance) stored its decision first: that one stands, for
                # this connection too.
                record = await self.store.lookup(peer.fingerprint)
                await self._checkRecord(record, peer, source)
                return
        if not answer.approved:
            raise Refusal(ErrorCode.denied, answer.reason)

    def _sameIdentity(
        self, peer: PeerIdentity, source: str, decision: SignedDecision
    ) -> None:
        """
        Refuse C{peer} with C{identity_changed} unless it proved the names
        C{decision} was made about.
        """
        known = f"{decision.org}/{decision.subjectService}"
        if known == peer.name:
            return
        raise refuseChangedIdentity(
            self.bus,
            self.serviceName,
            peer,
            source,
            f"{peer.fingerprint} claims {peer.name}, but it is {decision.state}"
            f" as {known}",
            knownAs=known,
        )

    def _identityChanged(
        self, peer: PeerIdentity, source: str, known: KeyRecord
    ) -> None:
        raise refuseChangedIdentity(
            self.bus,
            self.serviceName,
            peer,
            source,
            f"{peer.name} presented {peer.fingerprint} from {source}, but its"
            f" approved key is {known.fingerprint}",
            knownKeys=(known.fingerprint,),
        )


@implementer(ITrustPolicy, IEarlyTrust)
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

    def knownKey(
        self, key: PublicKey, source: str, claimed: tuple[str, str] | None = None
    ) -> Deferred[PeerIdentity | None]:
        """
        The server pinned for C{source} if its key is C{key} (and it is the
        expected service, if one is set), or pinned with C{key} under the
        names its certificate C{claimed} (then pinned for C{source} too, as
        L{check} does); L{None} if neither (the server's proof then goes to
        L{check}).  A L{Refusal}: C{identity_changed} if C{source} is pinned
        to another key; C{denied} in strict mode for a server not known, or
        for one whose certificate names another service than the expected
        one, before this client proves anything.
        """
        return Deferred.fromCoroutine(self._knownKey(key, source, claimed))

    async def _knownKey(
        self, key: PublicKey, address: str, claimed: tuple[str, str] | None
    ) -> PeerIdentity | None:
        pin = await self.known.pinned(address)
        if pin is None:
            return await self._knownElsewhere(key, address, claimed)
        if pin.fingerprint != key.fingerprint:
            self._changed(
                PeerIdentity(pin.org, pin.service, key),
                address,
                f"{pin.org}/{pin.service} {pin.fingerprint}",
                "a key",
            )
        if self.expected is not None and f"{pin.org}/{pin.service}" != self.expected:
            # Not the service expected: let the full check refuse it.
            return None
        return PeerIdentity(pin.org, pin.service, key)

    async def _knownElsewhere(
        self, key: PublicKey, address: str, claimed: tuple[str, str] | None
    ) -> PeerIdentity | None:
        # The names in the certificate are only where to look: nothing
        # proves them (a peer need not even put its names there), so they
        # never refuse a server.  An expected service is checked against the
        # names the server proves.
        if claimed is not None and (
            self.expected is None or "/".join(claimed) == self.expected
        ):
            for other in await self.known.pinnedService(*claimed):
                if other.fingerprint == key.fingerprint:
                    # The key proved these names before: it is this service.
                    peer = PeerIdentity(other.org, other.service, key)
                    await self._pin(address, peer)
                    return peer
        if self.strict:
            raise Refusal(
                ErrorCode.denied,
                f"the server at {address} ({key.fingerprint}) is not a known"
                " service, and strict checking is on",
            )
        return None

    async def _pin(self, address: str, peer: PeerIdentity) -> None:
        await self.known.pin(address, peer)
        self.log.info(
            "dwtrust: pinned {peer_name} {fingerprint} for {address}",
            event="dwtrust.pinned",
            peer_name=peer.name,
            fingerprint=peer.fingerprint,
            address=address,
        )

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
        await self._pin(address, peer)

    def _changed(
        self, peer: PeerIdentity, address: str, known: str, presented: str = ""
    ) -> None:
        """
        Refuse C{peer} with C{identity_changed}.

        @param presented: what the server presented, if not its proved
            name (the early check knows only its certificate key).
        """
        presented = presented or peer.name
        self.log.warn(
            "dwtrust: IDENTITY CHANGED at {address}: the server presented"
            " {presented} {fingerprint}; known: {known}",
            event="dwtrust.identity_changed",
            address=address,
            presented=presented,
            peer_name=peer.name if presented == peer.name else None,
            fingerprint=peer.fingerprint,
            known=known,
        )
        raise Refusal(
            ErrorCode.identity_changed,
            f"the server at {address} presented {presented} {peer.fingerprint},"
            f" but {known} is on record",
        )
